"""Tests of maskfeat_jax.targets.hog against an independent loop-level float64 reference
(``references.ref_hog_cells`` and ``references.ref_tokens``).

The numeric tests run both histogram forms ('scatter' and 'onehot') against the reference."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskfeat_jax.targets.hog import HISTOGRAMS, histogram_impl, hog_cells, hog_dim, hog_targets
from references import ref_hog_cells, ref_tokens


def _rand(shape, seed=0):
    return np.random.RandomState(seed).uniform(0.0, 1.0, shape).astype(np.float32)


@pytest.mark.parametrize("histogram", HISTOGRAMS)
@pytest.mark.parametrize("hw", [(16, 24), (32, 32), (24, 40), (20, 28)])
def test_cells_match_loop_reference(hw, histogram):
    x = _rand((2, *hw, 3), seed=hw[0] * 100 + hw[1])
    got = np.asarray(hog_cells(jnp.asarray(x), histogram=histogram))
    assert got.shape == (2, hw[0] // 8, hw[1] // 8, 3, 9)
    assert got.dtype == np.float32
    for b in range(2):
        np.testing.assert_allclose(got[b], ref_hog_cells(x[b]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("histogram", HISTOGRAMS)
def test_cells_gaussian_window_matches_reference(histogram):
    x = _rand((1, 32, 32, 3), seed=7)
    got = np.asarray(hog_cells(jnp.asarray(x), gaussian_window=8, histogram=histogram))
    want = ref_hog_cells(x[0], gaussian_window=8)
    np.testing.assert_allclose(got[0], want, atol=1e-5, rtol=0)
    # The window really changes the result.
    assert np.abs(want - ref_hog_cells(x[0])).max() > 1e-3


@pytest.mark.parametrize("histogram", HISTOGRAMS)
def test_cells_without_normalisation_match_reference_before_normalising(histogram):
    """``normalize=False`` (the paper's HOG without local contrast normalisation): the raw
    per-cell magnitude sums, in hog_cells and in hog_targets' token layout."""
    x = _rand((2, 24, 40, 3), seed=5)
    got = np.asarray(hog_cells(jnp.asarray(x), histogram=histogram, normalize=False))
    for b in range(2):
        want = ref_hog_cells(x[b], normalize=False)
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)
        assert np.abs(np.linalg.norm(want, axis=-1) - 1.0).min() > 0.1    # not unit histograms
    tokens = np.asarray(hog_targets(jnp.asarray(x), patch_size=8, histogram=histogram, normalize=False))
    np.testing.assert_allclose(tokens[1], ref_tokens(ref_hog_cells(x[1], normalize=False), 1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("histogram", HISTOGRAMS)
def test_cells_other_nbins_and_cell_size(histogram):
    x = _rand((1, 12, 16, 2), seed=3)
    got = np.asarray(hog_cells(jnp.asarray(x), nbins=6, cell_size=4, histogram=histogram))
    np.testing.assert_allclose(got[0], ref_hog_cells(x[0], nbins=6, cell=4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("histogram", HISTOGRAMS)
@pytest.mark.parametrize("hw,patch,cell", [((32, 48), 16, 8), ((24, 40), 8, 8), ((24, 48), 24, 8)])
def test_targets_token_layout_matches_reference(hw, patch, cell, histogram):
    x = _rand((2, *hw, 3), seed=11)
    q = patch // cell
    got = np.asarray(hog_targets(jnp.asarray(x), patch_size=patch, cell_size=cell, histogram=histogram))
    n_tok = (hw[0] // patch) * (hw[1] // patch)
    assert got.shape == (2, n_tok, hog_dim(patch, 9, cell, 3))
    for b in range(2):
        want = ref_tokens(ref_hog_cells(x[b], cell=cell), q)
        np.testing.assert_allclose(got[b], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape,kw", [
    ((2, 32, 48, 3), {}),
    ((2, 20, 28, 3), {}),                                    # cells' remainder dropped
    ((1, 12, 16, 2), dict(nbins=6, cell_size=4)),
    ((1, 32, 32, 3), dict(gaussian_window=8)),
    ((2, 24, 40, 3), dict(nbins=5, cell_size=4, gaussian_window=4))])
def test_histogram_forms_agree(shape, kw):
    x = jnp.asarray(_rand(shape, seed=sum(shape)) * 255.0)
    scatter = np.asarray(hog_cells(x, histogram="scatter", **kw))
    onehot = np.asarray(hog_cells(x, histogram="onehot", **kw))
    assert onehot.shape == scatter.shape and onehot.dtype == np.float32
    np.testing.assert_allclose(onehot, scatter, atol=1e-6, rtol=0)
    assert np.abs(scatter).max() > 0.5


def test_histogram_forms_agree_on_video_targets():
    v = jnp.asarray(_rand((2, 4, 16, 32, 3), seed=23))
    scatter = np.asarray(hog_targets(v, temporal_stride=2, histogram="scatter"))
    onehot = np.asarray(hog_targets(v, temporal_stride=2, histogram="onehot"))
    np.testing.assert_allclose(onehot, scatter, atol=1e-6, rtol=0)


def test_histogram_impl_per_platform():
    assert histogram_impl("tpu") == "onehot"
    assert histogram_impl("gpu") == "onehot"
    assert histogram_impl("cpu") == "scatter"
    assert all(histogram_impl(p) in HISTOGRAMS for p in ("cpu", "gpu", "tpu"))
    with pytest.raises(ValueError, match="platform"):
        histogram_impl("cuda")
    with pytest.raises(ValueError, match="histogram"):
        hog_cells(jnp.zeros((1, 16, 16, 3)), histogram="dot")


@pytest.mark.parametrize("histogram", HISTOGRAMS)
def test_tpu_lowering_of_each_histogram_form(histogram):
    # Lowered for TPU from this CPU host: the one-hot form's StableHLO holds no scatter
    # (the text includes source locations, so this test's name must not say 'scatter').
    fn = jax.jit(partial(hog_targets, histogram=histogram))
    exp = jax.export.export(fn, platforms=["tpu"])(jax.ShapeDtypeStruct((2, 32, 48, 3), jnp.uint8))
    text = exp.mlir_module()
    assert exp.platforms == ("tpu",)
    if histogram == "onehot":
        assert "scatter" not in text
    else:
        assert "stablehlo.scatter" in text
    assert exp.out_avals[0].shape == (2, 6, 108)


def test_token_layout_explicit_index():
    # Each token vector entry c*36 + k*4 + i*2 + j is cell (2*ty+i, 2*tx+j), channel c, bin k.
    x = jnp.asarray(_rand((1, 32, 48, 3), seed=5))
    cells = np.asarray(hog_cells(x))[0]
    tok = np.asarray(hog_targets(x))[0]
    for ty, tx, c, k, i, j in [(0, 0, 0, 0, 0, 0), (1, 2, 2, 8, 1, 1), (0, 1, 1, 3, 1, 0),
                               (1, 0, 0, 5, 0, 1), (1, 1, 2, 0, 1, 0)]:
        assert tok[ty * 3 + tx, c * 36 + k * 4 + i * 2 + j] == cells[2 * ty + i, 2 * tx + j, c, k]


@pytest.mark.parametrize("ramp,expected_bin", [
    (lambda y, x: x, 4), (lambda y, x: y, 0), (lambda y, x: x + y, 2), (lambda y, x: x - y, 6)])
def test_ramps_land_in_official_bins(ramp, expected_bin):
    yy, xx = np.mgrid[0:32, 0:40].astype(np.float32)
    img = np.repeat(ramp(yy, xx)[None, :, :, None], 3, axis=-1)
    cells = np.asarray(hog_cells(jnp.asarray(img)))[0]  # (4, 5, 3, 9)
    onehot = np.eye(9, dtype=np.float32)[expected_bin]
    interior = cells[1:-1, 1:-1]
    np.testing.assert_allclose(interior, np.broadcast_to(onehot, interior.shape), atol=1e-6)
    np.testing.assert_allclose(cells, ref_hog_cells(img[0]), atol=1e-5)


def test_constant_image_gives_zeros():
    out = np.asarray(hog_targets(jnp.full((2, 32, 32, 3), 0.7, jnp.float32)))
    assert out.shape == (2, 4, 108)
    assert np.all(out == 0.0)


def test_cell_norms_are_one_or_zero_and_values_in_unit_interval():
    x = _rand((2, 48, 48, 3), seed=9)
    x[:, :24, :24, :] = 0.3  # flat block: its inner cells get no gradient
    cells = np.asarray(hog_cells(jnp.asarray(x)))
    norms = np.linalg.norm(cells, axis=-1)
    assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0))
    assert np.any(norms == 0) and np.any(norms > 0.5)
    assert cells.min() >= 0.0 and cells.max() <= 1.0 + 1e-6


def test_invariant_to_per_channel_affine_normalisation():
    x = _rand((2, 32, 48, 3), seed=13)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    a = np.asarray(hog_targets(jnp.asarray(x)))
    b = np.asarray(hog_targets(jnp.asarray((x - mean) / std)))
    c = np.asarray(hog_targets(jnp.asarray(x * 255.0)))
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    np.testing.assert_allclose(a, c, atol=1e-5, rtol=0)
    assert np.abs(a).max() > 0.1


def test_negated_image_gives_same_hog():
    # Negating an image keeps every gradient's unsigned orientation: identical HOG.
    x = _rand((1, 32, 32, 3), seed=17)
    np.testing.assert_allclose(np.asarray(hog_cells(jnp.asarray(x))),
                               np.asarray(hog_cells(jnp.asarray(-x))), atol=1e-5)


@pytest.mark.parametrize("frames", [6, 7])
def test_video_equals_per_frame_hog(frames):
    v = _rand((2, frames, 16, 32, 3), seed=frames)
    got = np.asarray(hog_targets(jnp.asarray(v), temporal_stride=2))
    nt = frames // 2
    per_frame = [np.asarray(hog_targets(jnp.asarray(v[:, 2 * t]))) for t in range(nt)]
    assert got.shape == (2, nt * 2, 108)
    np.testing.assert_allclose(got, np.concatenate(per_frame, axis=1), atol=1e-6, rtol=0)
    # (t, h, w) order: the first 2 tokens are frame 0, the next 2 frame 2.
    np.testing.assert_allclose(got[:, 2:4], per_frame[1], atol=1e-6)
    assert np.abs(got[:, :2] - got[:, 2:4]).max() > 1e-3


def test_jit_grad_and_dtypes():
    x = jnp.asarray(_rand((2, 32, 32, 3), seed=21))
    eager = hog_targets(x)
    jitted = jax.jit(lambda im: hog_targets(im) * 1.0)(x)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), atol=1e-6)
    grad = jax.grad(lambda im: jnp.sum(hog_targets(im) ** 2))(x)
    assert grad.shape == x.shape and float(jnp.abs(grad).max()) == 0.0
    ints = (np.asarray(x) * 255).astype(np.uint8)
    out8 = hog_targets(jnp.asarray(ints))
    assert out8.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out8), np.asarray(hog_targets(jnp.asarray(ints, jnp.float32))),
                               atol=1e-6)
    assert hog_targets(x.astype(jnp.bfloat16)).dtype == jnp.float32


def test_hog_dim():
    assert hog_dim() == 108
    assert hog_dim(32) == 432
    assert hog_dim(8, channels=1) == 9
    with pytest.raises(ValueError):
        hog_dim(12)


def test_errors_for_bad_sizes():
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="multiple of cell_size"):
        hog_targets(x, patch_size=12)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        hog_targets(jnp.zeros((1, 32, 40, 3)))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        hog_targets(jnp.zeros((1, 24, 32, 3)))
    with pytest.raises(ValueError, match="temporal_stride"):
        hog_targets(jnp.zeros((1, 4, 32, 32, 3)))
    with pytest.raises(ValueError):
        hog_targets(jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError):
        hog_cells(jnp.zeros((1, 2, 32, 32, 3)))
    with pytest.raises(ValueError, match="gaussian_window"):
        hog_cells(jnp.zeros((1, 24, 24, 3)), gaussian_window=16)
