"""RoIAlign in JAX: torchvision / detectron2 ``roi_align`` semantics, static shapes, no loops.

What the official AVA heads use (PySlowFast ``slowfast/models/head_helper.py``, ``ResNetRoIHead``,
which the MViT detection model also builds): detectron2 ``ROIAlign(resolution=7x7,
spatial_scale=1/16, sampling_ratio=0, aligned=DETECTION.ALIGNED)``; ``ALIGNED`` is True by
default and in ``configs/AVA/SLOWFAST_32x2_R50_SHORT.yaml`` (False in the older ``c2`` configs).
The head averages the features over time first, then RoIAligns, then max-pools the 7x7 bins.

The definition, per box ``(b, x1, y1, x2, y2)`` (input pixels) and output bin ``(p, q)``:

* ``start = x1 * spatial_scale - 0.5`` (``aligned``; no shift otherwise), ``size = (x2 - x1) *
  spatial_scale``; without ``aligned`` the size is at least 1;
* each bin is ``size / out`` wide and averages a ``grid_h x grid_w`` grid of bilinear samples at
  the centres of its sub-cells; ``grid = sampling_ratio``, or with ``sampling_ratio=0`` (adaptive)
  ``ceil(size / out)`` per box: a box of zero or negative size has no samples and gives 0;
* a sample beyond ``[-1, H]`` reads 0; one in ``[-1, 0)`` reads row 0; one past ``H - 1``
  reads row ``H - 1`` (the same per column).

Adaptive sampling varies the sample count per box, which a static-shape program cannot do by
itself. Here every box gets ``max_grid`` sample slots per bin and axis, of which the first
``grid`` count (the rest are masked out), which gives exactly the adaptive result for boxes with
``ceil(size / out) <= max_grid``. The default ``max_grid = ceil(H / out) + 1`` covers every box
inside the feature map (the official dataset clips boxes to the image) with one slot to spare
for rounding; a larger box is sampled ``max_grid`` times per bin and axis.

Bilinear sampling and the sub-cell average factor per axis, so each box becomes two small
weight matrices, rows ``(out_h, H)`` and columns ``(out_w, W)``, and the output is one einsum.
The einsum reads each box's whole feature map (``R x H x W x C``, gathered by batch index, in
float32): small at AVA sizes per device (tens of boxes, 14 x 14 maps), and exact to float32.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["roi_align"]


def _axis_weights(start, size, out: int, length: int, sampling_ratio: int, max_grid: int):
    """(R, out, length) weights: row ``p`` averages the bilinear weights of bin ``p``'s samples
    along one axis of a feature map ``length`` long."""
    if sampling_ratio > 0:
        grid = jnp.full(start.shape, sampling_ratio, jnp.int32)
        slots = sampling_ratio
    else:
        grid = jnp.clip(jnp.ceil(size / out), 0, max_grid).astype(jnp.int32)
        slots = max_grid
    grid = jnp.where(jnp.isfinite(size), grid, 0)              # a NaN box has no samples, as in torchvision
    per_sample = jnp.maximum(grid, 1).astype(start.dtype)
    bin_size = size / out
    p = jnp.arange(out, dtype=start.dtype)[None, :, None]
    s = jnp.arange(slots, dtype=start.dtype)[None, None, :]
    pos_RxOxS = (start[:, None, None] + p * bin_size[:, None, None]
                 + (s + 0.5) * bin_size[:, None, None] / per_sample[:, None, None])
    used = (pos_RxOxS >= -1.0) & (pos_RxOxS <= length) & (s < grid[:, None, None])
    pos = jnp.maximum(jnp.where(used, pos_RxOxS, 0.0), 0.0)
    low = jnp.floor(pos).astype(jnp.int32)
    at_end = low >= length - 1
    low = jnp.where(at_end, length - 1, low)
    high = jnp.where(at_end, length - 1, low + 1)
    frac = jnp.where(at_end, 0.0, pos - low)
    w = (jax.nn.one_hot(low, length, dtype=start.dtype) * (1.0 - frac)[..., None]
         + jax.nn.one_hot(high, length, dtype=start.dtype) * frac[..., None])
    w = jnp.where(used[..., None], w, 0.0)
    return w.sum(axis=2) / per_sample[:, None, None]


def roi_align(features_BxHxWxC, rois_Rx5, output_size=(7, 7), *, spatial_scale: float = 1.0 / 16,
              sampling_ratio: int = 0, aligned: bool = True, max_grid: int | None = None):
    """``(R, out_h, out_w, C)`` RoIAlign features of ``rois_Rx5`` rows ``[batch index, x1, y1, x2,
    y2]`` (input pixels; times ``spatial_scale`` gives feature-map pixels). ``sampling_ratio=0``
    is the adaptive grid the official head uses (see the module docstring for ``max_grid``)."""
    out_h, out_w = output_size
    _, height, width, _ = features_BxHxWxC.shape
    rois = rois_Rx5.astype(jnp.float32)
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, i] * spatial_scale - offset for i in range(1, 5))
    w, h = x2 - x1, y2 - y1
    if not aligned:                      # the legacy definition forces a size of at least 1
        w, h = jnp.maximum(w, 1.0), jnp.maximum(h, 1.0)
    grid_h = max_grid or math.ceil(height / out_h) + 1
    grid_w = max_grid or math.ceil(width / out_w) + 1
    rows_RxPxH = _axis_weights(y1, h, out_h, height, sampling_ratio, grid_h)
    cols_RxQxW = _axis_weights(x1, w, out_w, width, sampling_ratio, grid_w)
    feats_RxHxWxC = features_BxHxWxC[rois[:, 0].astype(jnp.int32)]
    out = jnp.einsum("rph,rqw,rhwc->rpqc", rows_RxPxH, cols_RxQxW, feats_RxHxWxC.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.astype(features_BxHxWxC.dtype)
