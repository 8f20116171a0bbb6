"""HOG targets of MaskFeat, matching PySlowFast ``HOGLayerC`` (nbins=9, pool=8).

Official conventions (spec sections 1-3), applied to each RGB channel separately:

* reflect-pad by 1 (numpy ``'reflect'``: the mirror excludes the edge pixel);
* cross-correlate with ``Kx = [[1,0,-1],[2,0,-2],[1,0,-1]]`` and ``Ky = Kx.T``, so
  ``gx`` is left minus right and ``gy`` top minus bottom;
* ``mag = sqrt(gx² + gy²)``; ``bin = floor(atan2(gx, gy) / pi * nbins) mod nbins``
  (gx FIRST, floored modulo): unsigned orientation, bins of 180°/nbins;
* optional Gaussian window (``gaussian_window=g > 0``; 0, i.e. off, in MaskFeat);
* hard vote of ``mag`` into one bin, summed over non-overlapping ``cell x cell``
  windows (remainder dropped);
* L2-normalise each nbins-histogram per (channel, cell): ``h / max(||h||, 1e-12)``
  (``normalize=False`` skips it: the paper's HOG without local contrast normalisation).

Per-token targets flatten each patch in the official order (channel c, bin k,
cell-row i, cell-col j); tokens are row-major over the patch grid, and (t, h, w)
for video, where frames 0, s, 2s, ... of the clip are used.

Speed notes: the bin is found without ``atan2`` by folding the gradient onto the
half-plane [0, pi) and counting the bin boundaries it passes (nbins-1
multiply-compares; same bins as the formula up to float rounding at a boundary).
The histogram has two forms with the same numbers (up to summation order),
chosen by ``histogram=``:

* ``'scatter'``: one scatter-add of ``mag`` into (cell, bin) slots, one update
  per pixel and channel (about 150k per 224x224 RGB image); no
  (B, C, nbins, H, W) tensor is built. Fastest on XLA CPU.
* ``'onehot'``: ``mag`` masked by the bin one-hot, summed per cell with a
  reshape and a reduction; no scatter, which TPUs run slowly.

``histogram_impl(platform)`` gives the form to use on 'cpu', 'gpu' or 'tpu'.
"""
from __future__ import annotations

import math
from functools import partial

import einops
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["HISTOGRAMS", "histogram_impl", "hog_cells", "hog_targets", "hog_dim"]

HISTOGRAMS = ("scatter", "onehot")  # the forms of the per-cell histogram, see histogram_impl


def _gradients(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(N, C, H, W) -> (gx, gy): depthwise Kx / Ky cross-correlation on the reflect-padded image."""
    p = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    # Materialise the padded image once; otherwise XLA re-derives the pad inside
    # every consumer fusion.
    p = lax.optimization_barrier(p)
    dx = p[..., :-2] - p[..., 2:]  # left - right, (N, C, H+2, W)
    gx = dx[..., :-2, :] + 2.0 * dx[..., 1:-1, :] + dx[..., 2:, :]
    dy = p[..., :-2, :] - p[..., 2:, :]  # top - bottom, (N, C, H, W+2)
    gy = dy[..., :-2] + 2.0 * dy[..., 1:-1] + dy[..., 2:]
    return gx, gy


def _orientation_bin(gx: jax.Array, gy: jax.Array, nbins: int) -> jax.Array:
    """``floor(atan2(gx, gy) / pi * nbins) mod nbins`` as int32, without atan2.

    ``atan2(gx, gy)`` is the angle of the vector (gy, gx). Negating the vector
    adds pi to the angle, i.e. nbins to ``s``, which the modulo removes, so fold
    it onto [0, pi) first; then the bin is the number of boundaries
    ``theta_k = k*pi/nbins`` (k = 1..nbins-1) at or below the angle, and
    ``angle >= theta_k  <=>  gx*cos(theta_k) - gy*sin(theta_k) >= 0`` there.
    """
    flip = (gx < 0) | ((gx == 0) & (gy < 0))
    v = jnp.abs(gx)
    u = jnp.where(flip, -gy, gy)
    b = jnp.zeros(gx.shape, jnp.int32)
    for k in range(1, nbins):
        theta = k * math.pi / nbins
        b = b + (v * np.float32(math.cos(theta)) >= u * np.float32(math.sin(theta))).astype(jnp.int32)
    return b


def histogram_impl(platform: str) -> str:
    """The histogram form for a platform: 'scatter' on 'cpu', 'onehot' on 'gpu' and 'tpu'.

    On XLA CPU the scatter-add is the faster form (benchmarks/README.md). TPUs run
    scatters slowly, so they get the scatter-free form; so do GPUs, whose float
    scatter-add is atomic and so not deterministic in its summation order.
    """
    impls = {"cpu": "scatter", "gpu": "onehot", "tpu": "onehot"}
    if platform not in impls:
        raise ValueError(f"unknown platform {platform!r}, expected one of {sorted(impls)}")
    return impls[platform]


def _histogram_scatter(mag_BxCxHxW: jax.Array, bins_BxCxHxW: jax.Array, nbins: int,
                       cell_size: int) -> jax.Array:
    """Hard vote + cell pooling as one scatter-add into (B, nh, nw, C, nbins) slots.

    H and W are multiples of ``cell_size``. Slot ids come from iotas, which XLA
    fuses, so they are never stored as a big constant.
    """
    bsz, chans, height, width = mag_BxCxHxW.shape
    nh, nw = height // cell_size, width // cell_size
    cell_HxW = (jnp.arange(height) // cell_size)[:, None] * nw + (jnp.arange(width) // cell_size)[None, :]
    slot_BxCxHxW = ((jnp.arange(bsz)[:, None, None, None] * (nh * nw) + cell_HxW[None, None]) * chans
                    + jnp.arange(chans)[None, :, None, None])
    seg_BxCxHxW = slot_BxCxHxW * nbins + bins_BxCxHxW
    hist = jax.ops.segment_sum(mag_BxCxHxW.reshape(-1), seg_BxCxHxW.reshape(-1),
                               num_segments=bsz * nh * nw * chans * nbins)
    return hist.reshape(bsz, nh, nw, chans, nbins)


def _histogram_onehot(mag_BxCxHxW: jax.Array, bins_BxCxHxW: jax.Array, nbins: int,
                      cell_size: int) -> jax.Array:
    """The same (B, nh, nw, C, nbins) histogram without a scatter: ``mag`` masked by
    the bin one-hot, then summed over each cell's rows and columns.

    The bin axis goes before (H, W) so that W stays the minor axis of the
    one-hot product (TPU lanes); XLA fuses the product into the reduction.
    """
    bsz, chans, height, width = mag_BxCxHxW.shape
    nh, nw = height // cell_size, width // cell_size
    onehot_BxCxKxHxW = bins_BxCxHxW[:, :, None] == jnp.arange(nbins)[None, None, :, None, None]
    votes_BxCxKxHxW = jnp.where(onehot_BxCxKxHxW, mag_BxCxHxW[:, :, None], 0.0)
    hist_BxCxKxNhxNw = votes_BxCxKxHxW.reshape(
        bsz, chans, nbins, nh, cell_size, nw, cell_size).sum((4, 6))
    return jnp.transpose(hist_BxCxKxNhxNw, (0, 3, 4, 1, 2))


def _gaussian_window(g: int, h: int, w: int) -> np.ndarray:
    """The official g x g kernel (sigma = g // 2, sums to 1), tiled to (h, w)."""
    n = np.arange(g, dtype=np.float64)
    w1 = np.exp(-0.5 * ((n - (g - 1) / 2.0) / (g // 2)) ** 2)
    k2 = np.outer(w1, w1)
    k2 /= k2.sum()
    return np.tile(k2, (h // g, w // g)).astype(np.float32)


@partial(jax.jit, static_argnames=("nbins", "cell_size", "gaussian_window", "histogram", "normalize"))
def hog_cells(images: jax.Array, *, nbins: int = 9, cell_size: int = 8,
              gaussian_window: int = 0, histogram: str = "scatter", normalize: bool = True) -> jax.Array:
    """Per-cell HOG: ``(B, H, W, C)`` -> ``(B, H//cell, W//cell, C, nbins)``, float32.

    Each (cell, channel) histogram has L2 norm 1, or 0 where the cell has no gradient.
    ``normalize=False`` returns the raw magnitude sums instead: the paper's ablation of
    HOG without local contrast normalisation, where a cell's target scales with its contrast.
    ``histogram`` is 'scatter' or 'onehot' (see ``histogram_impl``); both give the
    same numbers up to float summation order.
    """
    if images.ndim != 4:
        raise ValueError(f"hog_cells expects (B, H, W, C) images, got shape {images.shape}")
    if nbins < 1 or cell_size < 1 or gaussian_window < 0:
        raise ValueError(f"bad HOG parameters nbins={nbins}, cell_size={cell_size}, "
                         f"gaussian_window={gaussian_window}")
    if histogram not in HISTOGRAMS:
        raise ValueError(f"histogram={histogram!r}, expected one of {HISTOGRAMS}")
    bsz, height, width, chans = images.shape
    if height < 2 or width < 2:
        raise ValueError(f"HOG needs H, W >= 2 for reflect padding, got {height}x{width}")
    nh, nw = height // cell_size, width // cell_size

    x = lax.stop_gradient(jnp.asarray(images, jnp.float32))
    x = jnp.transpose(x, (0, 3, 1, 2))  # (B, C, H, W): the per-channel planes are contiguous
    gx, gy = _gradients(x)
    mag = jnp.sqrt(gx * gx + gy * gy)
    if gaussian_window > 0:
        g = gaussian_window
        if height % g or width % g:
            raise ValueError(f"gaussian_window={g} must divide H and W, got {height}x{width}")
        mag = mag * _gaussian_window(g, height, width)[None, None]
    bins = _orientation_bin(gx, gy, nbins)

    hc, wc = nh * cell_size, nw * cell_size  # drop the remainder, like unfold
    pool = _histogram_onehot if histogram == "onehot" else _histogram_scatter
    hist = pool(mag[..., :hc, :wc], bins[..., :hc, :wc], nbins, cell_size)
    if not normalize:
        return hist
    norm = jnp.sqrt(jnp.sum(hist * hist, axis=-1, keepdims=True))
    return hist / jnp.maximum(norm, 1e-12)


def hog_dim(patch_size: int = 16, nbins: int = 9, cell_size: int = 8, channels: int = 3) -> int:
    """Length of one token's HOG target: ``channels * nbins * (patch_size // cell_size)**2``."""
    if patch_size % cell_size:
        raise ValueError(f"patch_size={patch_size} is not a multiple of cell_size={cell_size}")
    return channels * nbins * (patch_size // cell_size) ** 2


@partial(jax.jit, static_argnames=("patch_size", "nbins", "cell_size", "gaussian_window",
                                   "temporal_stride", "histogram", "normalize"))
def hog_targets(images: jax.Array, *, patch_size: int = 16, nbins: int = 9, cell_size: int = 8,
                gaussian_window: int = 0, temporal_stride: int | None = None,
                histogram: str = "scatter", normalize: bool = True) -> jax.Array:
    """Per-token HOG targets in the official layout.

    * image ``(B, H, W, C)`` -> ``(B, (H//p)*(W//p), C*nbins*q*q)``, q = p // cell,
      tokens row-major; token vector index ``c*nbins*q*q + k*q*q + i*q + j``.
    * video ``(B, T, H, W, C)`` needs ``temporal_stride=s``: frames 0, s, ... (T//s of
      them) -> ``(B, (T//s)*(H//p)*(W//p), C*nbins*q*q)``, tokens in (t, h, w) order.
      ``temporal_stride`` is ignored for images.

    ``histogram`` picks the histogram form, 'scatter' or 'onehot': pass
    ``histogram_impl(platform)``. ``normalize``: per-cell L2 normalisation (``hog_cells``).
    """
    if images.ndim not in (4, 5):
        raise ValueError(f"expected (B, H, W, C) or (B, T, H, W, C), got shape {images.shape}")
    if patch_size % cell_size:
        raise ValueError(f"patch_size={patch_size} is not a multiple of cell_size={cell_size}")
    height, width = images.shape[-3:-1]
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of patch_size={patch_size}")
    q = patch_size // cell_size
    kw = dict(nbins=nbins, cell_size=cell_size, gaussian_window=gaussian_window, histogram=histogram,
              normalize=normalize)
    if images.ndim == 4:
        cells = hog_cells(images, **kw)
        return einops.rearrange(cells, "b (h i) (w j) c k -> b (h w) (c k i j)", i=q, j=q)
    if temporal_stride is None or temporal_stride < 1:
        raise ValueError("video input (B, T, H, W, C) requires temporal_stride >= 1, "
                         f"got temporal_stride={temporal_stride}")
    bsz, frames = images.shape[:2]
    nt = frames // temporal_stride
    if nt == 0:
        raise ValueError(f"T={frames} frames is shorter than temporal_stride={temporal_stride}")
    clip = images[:, : nt * temporal_stride : temporal_stride]
    cells = hog_cells(clip.reshape(bsz * nt, *clip.shape[2:]), **kw)
    return einops.rearrange(cells, "(b t) (h i) (w j) c k -> b (t h w) (c k i j)",
                            b=bsz, i=q, j=q)
