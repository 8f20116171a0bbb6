"""Per-token RGB pixel targets (the paper's pixel-colour target, MAE's target), matching
PySlowFast ``MaskMViT._get_pixel_label_2d`` / ``_get_pixel_label_3d`` on the MaskFeat path.

Official conventions:

* the pixels are those of the input the model sees: the mean/std-normalised images, detached
  (the targets are taken from the intact input, like HOG's);
* image ``(B, H, W, C)``: one token per ``p x p`` patch, its vector in (channel c, row i,
  column j) order, as torch ``unfold`` of the channels-last image leaves it;
* video ``(B, T, H, W, C)``, temporal patch (tubelet) size ``s`` = the model's temporal
  stride: by default frames 0, s, 2s, ... only, one frame per token, vector in (i, j, c)
  order. That is ``MASK.TIME_STRIDE_LOSS=True``, the config default, and the MaskFeat
  forward always uses it. ``all_frames=True`` is ``TIME_STRIDE_LOSS=False``, the whole
  ``s x p x p`` cube per token, vector in (frame u, i, j, c) order. The MViTv2 grid (16
  frames at 224, patch 16, temporal stride 2) gives 8 x 14 x 14 tokens either way;
* ``norm_pix`` (``MASK.NORM_PRED_PIXEL``, default True): each token's vector becomes
  ``(x - mean) / (var + 1e-6) ** 0.5`` with its own mean and its *unbiased* variance
  (torch ``Tensor.var`` divides by K - 1).

Tokens are row-major over the patch grid, (t, h, w) for video: ``hog.hog_targets``' order.
"""
from __future__ import annotations

from functools import partial

import einops
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["pixel_dim", "pixel_targets"]

NORM_EPS = 1e-6   # added to the variance, inside the square root (official)


def pixel_dim(patch_size: int = 16, channels: int = 3, frames: int = 1) -> int:
    """Length of one token's pixel target: ``frames * patch_size**2 * channels``."""
    return frames * patch_size * patch_size * channels


def _standardise(x_BxNxK: jax.Array) -> jax.Array:
    """Each token's vector minus its mean, over the square root of its unbiased variance + eps."""
    mean = x_BxNxK.mean(-1, keepdims=True)
    var = jnp.var(x_BxNxK, axis=-1, keepdims=True, ddof=1)
    return (x_BxNxK - mean) / jnp.sqrt(var + NORM_EPS)


@partial(jax.jit, static_argnames=("patch_size", "norm_pix", "temporal_stride", "all_frames"))
def pixel_targets(images: jax.Array, *, patch_size: int = 16, norm_pix: bool = True,
                  temporal_stride: int | None = None, all_frames: bool = False) -> jax.Array:
    """Per-token pixel targets, float32.

    * image ``(B, H, W, C)`` -> ``(B, (H//p)*(W//p), C*p*p)``, vector index ``c*p*p + i*p + j``.
    * video ``(B, T, H, W, C)`` needs ``temporal_stride=s``: frames 0, s, ... (T//s of them)
      -> ``(B, (T//s)*(H//p)*(W//p), p*p*C)``, index ``(i*p + j)*C + c``; with
      ``all_frames=True`` (T a multiple of s) -> ``(B, (T//s)*(H//p)*(W//p), s*p*p*C)``,
      index ``((u*p + i)*p + j)*C + c`` for frame u of the tubelet.
    """
    if images.ndim not in (4, 5):
        raise ValueError(f"expected (B, H, W, C) or (B, T, H, W, C), got shape {images.shape}")
    height, width = images.shape[-3:-1]
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of patch_size={patch_size}")
    x = lax.stop_gradient(jnp.asarray(images, jnp.float32))
    p = patch_size
    if x.ndim == 4:
        tokens = einops.rearrange(x, "b (h i) (w j) c -> b (h w) (c i j)", i=p, j=p)
    else:
        frames = x.shape[1]
        if temporal_stride is None or temporal_stride < 1:
            raise ValueError("video input (B, T, H, W, C) requires temporal_stride >= 1, "
                             f"got temporal_stride={temporal_stride}")
        s, nt = temporal_stride, frames // temporal_stride
        if nt == 0 or (all_frames and frames % s):
            raise ValueError(f"T={frames} frames do not split into tubelets of temporal_stride={s}")
        if all_frames:
            tokens = einops.rearrange(x, "b (t u) (h i) (w j) c -> b (t h w) (u i j c)", u=s, i=p, j=p)
        else:
            tokens = einops.rearrange(x[:, : nt * s : s], "b t (h i) (w j) c -> b (t h w) (i j c)", i=p, j=p)
    return _standardise(tokens) if norm_pix else tokens
