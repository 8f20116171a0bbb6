"""Tests for maskfeat_jax.data.masking (host-side numpy mask generators)."""

import numpy as np
import pytest

from maskfeat_jax.data.masking import block_mask, cube_mask, upsample_mask


def _rng(seed):
    return np.random.default_rng(seed)


def _bounding_box(mask):
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0) + 1
    return lo, hi


# ----------------------------------------------------------------------------
# block_mask
# ----------------------------------------------------------------------------

def test_block_mask_shape_dtype_and_count_bounds():
    counts = []
    for seed in range(300):
        m = block_mask(_rng(seed))
        assert m.shape == (14, 14) and m.dtype == np.bool_
        counts.append(int(m.sum()))
    counts = np.array(counts)
    assert counts.max() <= 78
    # every mask gets at least one block (>= min area 15 with ratio 0.4)
    assert counts.min() >= 15
    # mean close to the target: the generator mostly reaches 78 exactly
    assert counts.mean() > 0.9 * 78
    assert (counts == 78).mean() > 0.3
    # the count is variable (the official generator is "at most 78")
    assert len(np.unique(counts)) > 1


def test_block_mask_deterministic_per_seed():
    a = block_mask(_rng(123))
    b = block_mask(_rng(123))
    np.testing.assert_array_equal(a, b)
    others = [block_mask(_rng(s)) for s in range(1, 6)]
    assert any(not np.array_equal(a, o) for o in others)


def test_block_mask_consumes_generator_state():
    rng = _rng(0)
    a, b = block_mask(rng), block_mask(rng)
    assert not np.array_equal(a, b)


def test_single_block_exact_shape_from_area_and_aspect():
    # target == min == max == 16 and a fixed aspect make the generator
    # deterministic in shape: exactly one h x w rectangle, h = round(sqrt(A r)).
    ratio = 16 / 196
    for aspect, (eh, ew) in [(1.0, (4, 4)), (4.0, (8, 2)), (0.25, (2, 8))]:
        for seed in range(20):
            m = block_mask(_rng(seed), (14, 14), ratio, min_patches=16, max_patches=16,
                           min_aspect=aspect, max_aspect=aspect)
            assert m.sum() == 16
            lo, hi = _bounding_box(m)
            assert tuple(hi - lo) == (eh, ew)


def test_block_sides_strictly_smaller_than_grid():
    # area 16 and aspect 1 on a 4 x 20 grid gives 4 x 4 blocks, which violate
    # h < H = 4; nothing can ever be placed.
    m = block_mask(_rng(0), (4, 20), 0.2, min_patches=16, max_patches=16,
                   min_aspect=1.0, max_aspect=1.0)
    assert not m.any()
    # on a 5 x 20 grid they fit.
    m = block_mask(_rng(0), (5, 20), 0.16, min_patches=16, max_patches=16,
                   min_aspect=1.0, max_aspect=1.0)
    assert m.sum() == 16


def test_single_block_rectangle_and_area_limits():
    # ratio such that the first block alone exhausts most of the budget: with
    # max_patches == target the first accepted rectangle is a full rectangle.
    seen_sizes = set()
    for seed in range(200):
        rng = _rng(seed)
        m = block_mask(rng, (14, 14), ratio=0.4, tries=1, max_patches=78, min_patches=15)
        if not m.any():
            continue
        # tries=1: generator stops after the first failed attempt; if only one
        # block was placed the mask is exactly a rectangle.
        lo, hi = _bounding_box(m)
        if m[lo[0]:hi[0], lo[1]:hi[1]].all():
            h, w = hi - lo
            assert h < 14 and w < 14
            assert h * w == m.sum() <= 78
            # area drawn in [15, 78]; rounding of sqrt can shrink it a little
            assert h * w >= 8
            seen_sizes.add((int(h), int(w)))
    assert len(seen_sizes) > 5


@pytest.mark.parametrize("grid,ratio", [((7, 20), 0.4), ((20, 7), 0.3), ((14, 14), 0.6),
                                        ((16, 16), 0.75), ((6, 6), 0.5)])
def test_block_mask_other_grids_and_ratios(grid, ratio):
    target = round(grid[0] * grid[1] * ratio)
    counts = []
    for seed in range(100):
        m = block_mask(_rng(seed), grid, ratio)
        assert m.shape == grid
        counts.append(m.sum())
    counts = np.array(counts)
    assert counts.max() <= target
    assert counts.mean() > 0.75 * target


def test_block_mask_non_square_blocks_respect_strict_sides():
    # Grid 3 x 30: blocks must have h < 3, i.e. at most 2 rows masked per block.
    for seed in range(50):
        m = block_mask(_rng(seed), (3, 30), 0.3, tries=1)
        if m.any():
            lo, hi = _bounding_box(m)
            if m[lo[0]:hi[0], lo[1]:hi[1]].all():
                assert hi[0] - lo[0] <= 2


@pytest.mark.parametrize("kwargs,name", [
    (dict(ratio=0.0), "ratio"), (dict(ratio=1.0), "ratio"), (dict(ratio=-0.1), "ratio"),
    (dict(grid=(0, 14)), "grid"), (dict(grid=(14,)), "grid"), (dict(grid=(14, 14.5)), "grid"),
    (dict(min_aspect=0.0), "min_aspect"), (dict(min_aspect=2.0, max_aspect=1.0), "max_aspect"),
    (dict(tries=0), "tries"), (dict(min_patches=-1), "min_patches"),
    (dict(min_patches=20, max_patches=10), "max_patches"),
])
def test_block_mask_argument_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        block_mask(_rng(0), **kwargs)


# ----------------------------------------------------------------------------
# cube_mask
# ----------------------------------------------------------------------------

def test_cube_mask_shape_and_counts():
    counts = []
    for seed in range(200):
        m = cube_mask(_rng(seed))
        assert m.shape == (8, 7, 7) and m.dtype == np.bool_
        counts.append(int(m.sum()))
    counts = np.array(counts)
    assert counts.max() <= 157
    assert counts.mean() > 0.9 * 157
    assert (counts == 157).mean() > 0.2


def test_cube_mask_deterministic_per_seed():
    np.testing.assert_array_equal(cube_mask(_rng(7)), cube_mask(_rng(7)))
    assert not np.array_equal(cube_mask(_rng(7)), cube_mask(_rng(8)))


def test_cube_mask_blocks_are_cuboids_with_strict_spatial_sides():
    # tries=1 and a tiny ratio: often a single cube is placed
    checked = 0
    for seed in range(200):
        m = cube_mask(_rng(seed), (8, 7, 7), ratio=0.3, tries=1)
        if not m.any():
            continue
        lo, hi = _bounding_box(m)
        if m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].all():
            t, h, w = hi - lo
            assert 1 <= t <= 8 and h < 7 and w < 7
            checked += 1
    assert checked > 20


def test_cube_mask_temporal_extent_limits():
    # target 9 voxels, 3x3 spatial blocks, t == 1: exactly one 1x3x3 cube
    kw = dict(min_area=9, max_area=9, min_aspect=1.0, max_aspect=1.0)
    for seed in range(20):
        m = cube_mask(_rng(seed), (8, 7, 7), 9 / 392, min_t=1, max_t=1, **kw)
        lo, hi = _bounding_box(m)
        assert m.sum() == 9 and tuple(hi - lo) == (1, 3, 3)
    # t == 3 gives one 3x3x3 cube when the target is 27
    for seed in range(20):
        m = cube_mask(_rng(seed), (8, 7, 7), 27 / 392, min_t=3, max_t=3, **kw)
        lo, hi = _bounding_box(m)
        assert m.sum() == 27 and tuple(hi - lo) == (3, 3, 3)
    # min_t=max_t=T: every cube is a full tube
    for seed in range(20):
        m = cube_mask(_rng(seed), (8, 7, 7), 0.4, min_t=8)
        assert (m == m[:1]).all()


@pytest.mark.parametrize("grid,ratio", [((4, 14, 14), 0.5), ((16, 8, 6), 0.4), ((2, 5, 9), 0.3)])
def test_cube_mask_other_grids(grid, ratio):
    target = round(np.prod(grid) * ratio)
    counts = [cube_mask(_rng(s), grid, ratio).sum() for s in range(60)]
    assert max(counts) <= target
    assert np.mean(counts) > 0.7 * target


@pytest.mark.parametrize("kwargs,name", [
    (dict(ratio=1.5), "ratio"), (dict(grid=(8, 7)), "grid"), (dict(min_t=0), "min_t"),
    (dict(min_t=9), "min_t"), (dict(max_t=9), "max_t"), (dict(min_t=4, max_t=2), "max_t"),
    (dict(min_area=-1), "min_area"), (dict(min_area=30, max_area=10), "max_area"),
    (dict(tries=0), "tries"), (dict(min_aspect=-1), "min_aspect"),
])
def test_cube_mask_argument_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        cube_mask(_rng(0), **kwargs)


# ----------------------------------------------------------------------------
# upsample_mask
# ----------------------------------------------------------------------------

def test_upsample_2d_identity_and_factor():
    m = block_mask(_rng(0))
    np.testing.assert_array_equal(upsample_mask(m, (14, 14)), m)
    small = np.array([[1, 0], [0, 1]], bool)
    up = upsample_mask(small, (4, 6))
    expected = np.array([[1, 1, 1, 0, 0, 0]] * 2 + [[0, 0, 0, 1, 1, 1]] * 2, bool)
    np.testing.assert_array_equal(up, expected)
    assert up.dtype == np.bool_


def test_upsample_3d_cube_to_tokens():
    m = cube_mask(_rng(3))
    for grid in [(14, 14), (8, 14, 14)]:
        up = upsample_mask(m, grid)
        assert up.shape == (8, 14, 14)
        np.testing.assert_array_equal(up[:, ::2, ::2], m)
        np.testing.assert_array_equal(up[:, 1::2, 1::2], m)
        assert up.sum() == 4 * m.sum()
    up = upsample_mask(m, (56, 56))
    assert up.shape == (8, 56, 56) and up.sum() == 64 * m.sum()
    np.testing.assert_array_equal(up[:, 7::8, 3::8], m)


@pytest.mark.parametrize("mask,grid", [
    (np.zeros((7, 7), bool), (15, 14)), (np.zeros((7, 7), bool), (0, 7)),
    (np.zeros((8, 7, 7), bool), (4, 14, 14)), (np.zeros((7,), bool), (7,)),
    (np.zeros((7, 7), bool), (14, 14, 14)),
])
def test_upsample_errors(mask, grid):
    with pytest.raises(ValueError):
        upsample_mask(mask, grid)


def test_default_block_and_cube_limits():
    # defaults: block min N // 5, max N; cube max_area H*W, min_area max_area // 5, max_t T
    for seed in range(10):
        np.testing.assert_array_equal(block_mask(_rng(seed)),
                                      block_mask(_rng(seed), min_patches=15, max_patches=78))
        np.testing.assert_array_equal(block_mask(_rng(seed), (10, 10), 0.5),
                                      block_mask(_rng(seed), (10, 10), 0.5, min_patches=10,
                                                 max_patches=50, max_aspect=1 / 0.3))
        np.testing.assert_array_equal(cube_mask(_rng(seed)),
                                      cube_mask(_rng(seed), min_area=9, max_area=49, min_t=1, max_t=8))


def test_block_area_follows_budget_but_cube_area_does_not():
    # 3x3 blocks (area 9, aspect 1) and a target of 10. After the first block
    # the budget is 1: the 2-D generator draws its area in U(9, 1) and can
    # place a 1x1 block, the 3-D generator keeps drawing from U(9, 9) and can
    # never add a single voxel.
    kw = dict(min_aspect=1.0, max_aspect=1.0)
    ratio = 10 / 49
    blocks = [block_mask(_rng(s), (7, 7), ratio, min_patches=9, max_patches=9, **kw).sum()
              for s in range(30)]
    cubes = [cube_mask(_rng(s), (1, 7, 7), ratio, min_area=9, max_area=9, **kw).sum()
             for s in range(30)]
    assert max(blocks) == 10
    assert set(cubes) == {9}


# Masks of the generators as first written (one loop per generator), packed with
# np.packbits over the flattened mask: the shared box sampler must reproduce them bit for bit.
_PINNED = [
    ("block", 0, (14, 14), 0.4, {}, 78,
     [0, 0, 0, 15, 252, 63, 240, 255, 195, 255, 239, 255, 191, 254, 0, 56, 0, 224, 3, 128, 0, 0, 0, 0, 0]),
    ("block", 1, (14, 14), 0.4, {}, 78,
     [120, 1, 224, 7, 128, 30, 64, 121, 1, 224, 7, 128, 30, 224, 123, 129, 255, 7, 252, 31, 240, 31, 192, 0, 0]),
    ("block", 7, (14, 14), 0.4, {}, 78,
     [0, 0, 7, 192, 31, 0, 126, 63, 248, 255, 227, 255, 0, 124, 1, 240, 7, 192, 31, 0, 124, 1, 240, 0, 0]),
    ("block", 3, (6, 9), 0.5, {"min_aspect": 0.5, "tries": 3}, 26, [7, 31, 143, 135, 224, 240, 96]),
    ("cube", 0, (8, 7, 7), 0.4, {}, 155,
     [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 30, 60, 120, 240, 0, 7, 143, 30, 60, 120, 0, 207, 223, 191,
      126, 252, 0, 231, 239, 223, 191, 126, 48, 115, 247, 239, 223, 191, 0, 1, 195, 135, 14, 28, 0]),
    ("cube", 5, (8, 7, 7), 0.4, {}, 156,
     [253, 251, 247, 231, 0, 0, 126, 253, 251, 243, 128, 0, 48, 120, 241, 225, 192, 0, 24, 60, 120, 240, 224, 0,
      12, 30, 60, 120, 112, 0, 6, 15, 30, 60, 56, 0, 3, 7, 143, 30, 28, 0, 1, 131, 199, 143, 14, 0, 0]),
    ("cube", 11, (4, 2, 2), 0.4, {}, 6, [34, 226]),
    ("cube", 2, (4, 6, 5), 0.3, {"min_t": 2, "max_t": 3, "tries": 5}, 24,
     [0, 0, 0, 0, 0, 0, 0, 0, 123, 222, 0, 1, 239, 120, 0]),
]


@pytest.mark.parametrize("kind,seed,grid,ratio,kwargs,count,packed", _PINNED)
def test_masks_pinned_under_seed(kind, seed, grid, ratio, kwargs, count, packed):
    fn = block_mask if kind == "block" else cube_mask
    m = fn(_rng(seed), grid, ratio, **kwargs)
    assert m.shape == grid and int(m.sum()) == count
    np.testing.assert_array_equal(np.packbits(m.reshape(-1)), np.array(packed, np.uint8))
