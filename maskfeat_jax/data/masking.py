"""Host-side mask generators for MaskFeat (spec section 4).

Two generators reproduce the sampling *procedure* of the official code, with
all randomness taken from a caller-supplied :class:`numpy.random.Generator` so
that masks are reproducible given a seed (the official code draws from
Python's global ``random`` module, so individual masks are not bit-identical,
only identically distributed):

* :func:`block_mask` -- BEiT-style block-wise masking of a 2-D token grid
  (images; 14x14 with ratio 0.4 gives at most 78 masked tokens).
* :func:`cube_mask` -- spatio-temporal "cube" masking of a 3-D grid
  (video; 8x7x7 with ratio 0.4 gives at most 157 masked units).

:func:`upsample_mask` maps a coarse mask to the token grid by nearest-neighbour
repetition along the spatial axes (e.g. 8x7x7 -> 8x14x14).

All masks are boolean arrays with ``True`` meaning *masked*.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from maskfeat_jax.data.transforms import uniform

__all__ = ["block_mask", "cube_mask", "upsample_mask"]


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

def _check_grid(grid: Sequence[int], ndim: int) -> tuple[int, ...]:
    try:
        dims = tuple(int(g) for g in grid)
    except TypeError as exc:
        raise ValueError(f"grid must be a sequence of {ndim} positive ints, got {grid!r}") from exc
    if len(dims) != ndim or any(d <= 0 for d in dims) or any(int(g) != g for g in grid):
        raise ValueError(f"grid must be a sequence of {ndim} positive ints, got {grid!r}")
    return dims


def _check_ratio(ratio: float) -> float:
    if not (0.0 < float(ratio) < 1.0):
        raise ValueError(f"ratio must be in (0, 1), got {ratio!r}")
    return float(ratio)


def _log_aspect_range(min_aspect: float, max_aspect: float | None) -> tuple[float, float]:
    if not min_aspect > 0:
        raise ValueError(f"min_aspect must be > 0, got {min_aspect!r}")
    if max_aspect is None:
        max_aspect = 1.0 / min_aspect
    if not max_aspect >= min_aspect:
        raise ValueError(
            f"max_aspect must be >= min_aspect, got max_aspect={max_aspect!r}, min_aspect={min_aspect!r}")
    return math.log(min_aspect), math.log(max_aspect)


def _check_tries(tries: int) -> int:
    if int(tries) != tries or tries < 1:
        raise ValueError(f"tries must be a positive int, got {tries!r}")
    return int(tries)


def _block_shape(rng: np.random.Generator, area: float, log_aspect: tuple[float, float]) -> tuple[int, int]:
    aspect = math.exp(uniform(rng, *log_aspect))
    h = int(round(math.sqrt(area * aspect)))
    w = int(round(math.sqrt(area / aspect)))
    return h, w


def _sample_boxes(rng: np.random.Generator, shape: tuple[int, ...], target: int,
                  draw_size: Callable[[int], tuple[int, ...]], tries: int,
                  max_new: int | None = None) -> np.ndarray:
    """The box-filling loop shared by :func:`block_mask` and :func:`cube_mask`.

    Boxes are added until ``target`` cells are masked or ``tries`` attempts in a row
    place none. Each attempt draws a box size with ``draw_size(budget)``, where
    ``budget = min(target - count, max_new)``; the two spatial (last) sides must be
    strictly smaller than the grid's. The box's corner is then drawn axis by axis,
    ``U{0..dim - side}``, and the box is kept if it masks ``0 < new <= budget`` cells.
    """
    mask = np.zeros(shape, dtype=bool)
    count = 0
    while count < target:
        budget = target - count if max_new is None else min(target - count, max_new)
        added = 0
        for _ in range(tries):
            size = draw_size(budget)
            if size[-2] < shape[-2] and size[-1] < shape[-1]:
                corner = [int(rng.integers(0, dim - side, endpoint=True)) for dim, side in zip(shape, size)]
                window = mask[tuple(slice(c, c + side) for c, side in zip(corner, size))]
                new = math.prod(size) - int(window.sum())
                if 0 < new <= budget:
                    window[...] = True
                    added = new
                    break
        if added == 0:
            break
        count += added
    return mask


# ----------------------------------------------------------------------------
# 2-D block-wise masking (spec 4.1)
# ----------------------------------------------------------------------------

def block_mask(
    rng: np.random.Generator,
    grid: Sequence[int] = (14, 14),
    ratio: float = 0.4,
    *,
    min_patches: int | None = None,
    max_patches: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    tries: int = 10,
) -> np.ndarray:
    """BEiT-style block-wise mask of shape ``grid = (H, W)``; ``True`` = masked.

    Target count ``N = round(H * W * ratio)``. Rectangles are added until ``N``
    cells are masked or a block cannot be placed in ``tries`` attempts:

    * ``budget = min(N - count, max_patches)``;
    * area ``A ~ U(min_patches, budget)`` (``random.uniform`` semantics, so
      ``budget < min_patches`` draws between the two), aspect ``r`` log-uniform
      in ``[min_aspect, max_aspect]``, ``h = round(sqrt(A r))``,
      ``w = round(sqrt(A / r))``;
    * require ``h < H`` and ``w < W`` (strict), ``top ~ U{0..H-h}``,
      ``left ~ U{0..W-w}``; accept if ``0 < newly masked <= budget``.

    The result therefore has **at most** ``N`` masked cells.

    Args:
      rng: source of all randomness.
      grid: ``(H, W)``.
      ratio: target mask ratio in ``(0, 1)``.
      min_patches: minimum block area; default ``N // 5`` (15 for 14x14/0.4).
      max_patches: maximum block area; default ``N``.
      min_aspect / max_aspect: aspect range; ``max_aspect`` defaults to
        ``1 / min_aspect``.
      tries: attempts per block before giving up.
    """
    height, width = _check_grid(grid, 2)
    ratio = _check_ratio(ratio)
    log_aspect = _log_aspect_range(min_aspect, max_aspect)
    tries = _check_tries(tries)
    target = int(round(height * width * ratio))
    if min_patches is None:
        min_patches = target // 5
    if max_patches is None:
        max_patches = target
    if min_patches < 0:
        raise ValueError(f"min_patches must be >= 0, got {min_patches!r}")
    if max_patches < 1 or max_patches < min_patches:
        raise ValueError(
            f"max_patches must be >= max(1, min_patches), got max_patches={max_patches!r}, "
            f"min_patches={min_patches!r}")

    def draw_size(budget: int) -> tuple[int, int]:
        return _block_shape(rng, uniform(rng, min_patches, budget), log_aspect)

    return _sample_boxes(rng, (height, width), target, draw_size, tries, max_new=max_patches)


# ----------------------------------------------------------------------------
# 3-D cube masking (spec 4.2)
# ----------------------------------------------------------------------------

def cube_mask(
    rng: np.random.Generator,
    grid: Sequence[int] = (8, 7, 7),
    ratio: float = 0.4,
    *,
    min_area: float | None = None,
    max_area: float | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    min_t: int = 1,
    max_t: int | None = None,
    tries: int = 100,
) -> np.ndarray:
    """Cube mask of shape ``grid = (T, H, W)`` (MaskFeat video); ``True`` = masked.

    Target count ``N = round(T * H * W * ratio)``. Cubes are added until ``N``
    voxels are masked or none can be placed in ``tries`` attempts:

    * spatial area ``A ~ U(min_area, max_area)`` -- fixed bounds, *not* the
      remaining budget (unlike :func:`block_mask`); aspect log-uniform;
      ``h = round(sqrt(A r))``, ``w = round(sqrt(A / r))``;
      ``t ~ U{min_t..max_t}``;
    * require ``h < H`` and ``w < W`` (strict); ``front ~ U{0..T-t}``,
      ``top ~ U{0..H-h}``, ``left ~ U{0..W-w}``;
    * accept if ``0 < newly masked <= N - count``.

    Defaults: ``max_area = H * W`` (49), ``min_area = max_area // 5`` (9),
    ``max_t = T``. The result has **at most** ``N`` masked voxels (157 for
    8x7x7 with ratio 0.4).
    """
    temporal, height, width = _check_grid(grid, 3)
    ratio = _check_ratio(ratio)
    log_aspect = _log_aspect_range(min_aspect, max_aspect)
    tries = _check_tries(tries)
    target = int(round(temporal * height * width * ratio))
    if max_area is None:
        max_area = height * width
    if min_area is None:
        min_area = max_area // 5
    if min_area < 0:
        raise ValueError(f"min_area must be >= 0, got {min_area!r}")
    if max_area < min_area or max_area <= 0:
        raise ValueError(
            f"max_area must be > 0 and >= min_area, got max_area={max_area!r}, min_area={min_area!r}")
    if max_t is None:
        max_t = temporal
    if int(min_t) != min_t or not 1 <= min_t <= temporal:
        raise ValueError(f"min_t must be an int in [1, {temporal}], got {min_t!r}")
    if int(max_t) != max_t or not min_t <= max_t <= temporal:
        raise ValueError(f"max_t must be an int in [min_t={min_t}, {temporal}], got {max_t!r}")

    def draw_size(budget: int) -> tuple[int, int, int]:
        h, w = _block_shape(rng, uniform(rng, min_area, max_area), log_aspect)
        return int(rng.integers(min_t, max_t, endpoint=True)), h, w

    return _sample_boxes(rng, (temporal, height, width), target, draw_size, tries)


# ----------------------------------------------------------------------------
# resizing to the token grid (spec 4.3)
# ----------------------------------------------------------------------------

def upsample_mask(mask: np.ndarray, token_grid: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a ``(H, W)`` or ``(T, H, W)`` mask.

    Only the two spatial (last) axes are resized, as ``F.interpolate(...,
    mode="nearest")`` does in the official code with time treated as
    channels. ``token_grid`` is ``(H', W')`` or, for 3-D masks, either
    ``(H', W')`` or ``(T, H', W')`` with ``T`` unchanged. ``H'`` and ``W'``
    must be integer multiples of ``H`` and ``W`` (factor 1 is the identity).
    Returns a new boolean array.
    """
    mask = np.asarray(mask)
    if mask.ndim not in (2, 3):
        raise ValueError(f"mask must be 2-D (H, W) or 3-D (T, H, W), got shape {mask.shape}")
    grid = tuple(int(g) for g in token_grid)
    if mask.ndim == 3 and len(grid) == 3:
        if grid[0] != mask.shape[0]:
            raise ValueError(
                f"token_grid time axis must equal the mask's ({mask.shape[0]}), got {token_grid!r}")
        grid = grid[1:]
    if len(grid) != 2:
        raise ValueError(f"token_grid must give (H, W) (or (T, H, W) for 3-D masks), got {token_grid!r}")
    out = mask.astype(bool)
    for axis, (src, dst) in zip((-2, -1), zip(mask.shape[-2:], grid)):
        if dst <= 0 or dst % src != 0:
            raise ValueError(
                f"token_grid {token_grid!r} must be positive integer multiples of the mask's "
                f"spatial shape {mask.shape[-2:]}")
        out = np.repeat(out, dst // src, axis=axis)
    return out
