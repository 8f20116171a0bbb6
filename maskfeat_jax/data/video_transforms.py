"""Frame-consistent clip augmentations (numpy + Pillow), spec sections 9.1 / 9.2 (video rows).

A clip is a ``(T, H, W, 3)`` ``uint8`` numpy array. Every random function takes an
explicit :class:`numpy.random.Generator` and draws its parameters **once per clip**,
so every frame gets the same crop, flip and RandAugment ops -- as PySlowFast's
``slowfast/datasets/transform.py`` and ``utils.spatial_sampling`` do for Kinetics.

Geometry follows PySlowFast (facts read from its source, code written here):

* :func:`resize_short_side` -- ``random_short_side_scale_jitter`` with a fixed size:
  short side to ``size``, long side ``floor(long / short * size)``, bilinear; a clip
  whose short side already equals ``size`` is returned unchanged.
* :func:`random_resized_crop` -- ``transform.random_resized_crop``: torchvision's
  crop parameters (10 tries of area ``~U(scale)`` and log-uniform aspect, centre-crop
  fallback; :func:`maskfeat_jax.data.transforms.rrc_params`), then a bilinear resize
  of every frame to ``size x size``.
* :func:`random_flip` -- ``transform.horizontal_flip(0.5, ...)`` on all frames.
* :func:`random_short_side_jitter` -- ``random_short_side_scale_jitter`` with a random
  size: ``int(round(1 / U(1 / max, 1 / min)))`` with ``inverse_uniform`` (``DATA.INV_UNIFORM_SAMPLE``,
  as the SSv2 MViTv2 recipes), else ``int(round(U(min, max)))``; then :func:`resize_short_side`.
* :func:`random_crop` -- ``transform.random_crop``: offsets ``randint(0, L - size)`` along each
  axis longer than ``size`` (numpy's exclusive upper bound: the far edge itself is never the
  offset), 0 otherwise.
* :func:`uniform_crop` -- ``transform.uniform_crop``: ``spatial_index`` 0/1/2 is the
  left/centre/right crop along the long side (top/centre/bottom for portrait frames);
  the centre offset is ``ceil((L - size) / 2)``.
* :func:`rand_augment_clip` -- RandAugment (``rand-m7-mstd0.5-inc1`` in the video
  fine-tuning configs) with the same ops, magnitudes and signs for every frame, as
  PySlowFast's video ``AugmentOp`` (one draw, applied to the list of frames).

Resizing is done with Pillow (its bilinear filter antialiases when shrinking, unlike
``F.interpolate(..., align_corners=False)``; the difference only shows when a crop is
shrunk by a large factor).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from maskfeat_jax.data import rand_augment as RA
from maskfeat_jax.data import transforms as T

__all__ = ["check_clip", "short_side_shape", "resize_short_side", "random_resized_crop",
           "random_flip", "random_short_side_jitter", "random_crop", "uniform_crop", "center_crop",
           "rand_augment_clip"]


def check_clip(clip: np.ndarray) -> np.ndarray:
    """``clip`` as a ``(T, H, W, 3)`` uint8 array with ``T, H, W >= 1``; ValueError otherwise."""
    clip = np.asarray(clip)
    if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3 or min(clip.shape[:3]) < 1:
        raise ValueError(f"clip must be a non-empty (T, H, W, 3) uint8 array, got {clip.dtype} {clip.shape}")
    return clip


def _resize_frames(clip: np.ndarray, out_h: int, out_w: int, interpolation: str,
                   box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Every frame (optionally its ``box = (top, left, h, w)`` crop) resized to ``out_h x out_w``."""
    resample = T.pil_filter(interpolation)
    if box is not None:
        top, left, h, w = box
        clip = clip[:, top:top + h, left:left + w]
    if clip.shape[1:3] == (out_h, out_w):
        return np.ascontiguousarray(clip)
    out = np.empty((clip.shape[0], out_h, out_w, 3), np.uint8)
    for t, frame in enumerate(clip):
        out[t] = np.asarray(Image.fromarray(np.ascontiguousarray(frame)).resize((out_w, out_h), resample))
    return out


def short_side_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """``(new_h, new_w)`` with the short side ``size`` and the long side
    ``floor(long / short * size)`` (PySlowFast's ``random_short_side_scale_jitter``)."""
    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if width <= height:
        return max(int(math.floor(height / width * size)), 1), int(size)
    return int(size), max(int(math.floor(width / height * size)), 1)


def resize_short_side(clip: np.ndarray, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """Short side of every frame to ``size`` (see :func:`short_side_shape`); unchanged if already so."""
    clip = check_clip(clip)
    h, w = clip.shape[1:3]
    if min(h, w) == size:
        return clip
    return _resize_frames(clip, *short_side_shape(h, w, size), interpolation)


def random_resized_crop(clip: np.ndarray, rng: np.random.Generator, size: int | Sequence[int],
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        interpolation: str = "bilinear") -> np.ndarray:
    """One random crop box for the whole clip (:func:`transforms.rrc_params`), every frame
    resized to ``size`` (int or ``(h, w)``). Pre-training uses ``scale=(0.5, 1)``,
    fine-tuning ``(0.08, 1)``; ratio ``(3/4, 4/3)``; bilinear as PySlowFast."""
    clip = check_clip(clip)
    out_h, out_w = (size, size) if np.isscalar(size) else (int(size[0]), int(size[1]))
    box = T.rrc_params(clip.shape[1], clip.shape[2], rng, scale, ratio)
    return _resize_frames(clip, out_h, out_w, interpolation, box)


def random_flip(clip: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Horizontal flip of every frame together, with probability ``p`` (one draw per clip)."""
    clip = check_clip(clip)
    if float(rng.random()) < p:
        return np.ascontiguousarray(clip[:, :, ::-1])
    return clip


def random_short_side_jitter(clip: np.ndarray, rng: np.random.Generator, min_size: int, max_size: int, *,
                             inverse_uniform: bool = True, interpolation: str = "bilinear") -> np.ndarray:
    """Short side of every frame to one random size in ``[min_size, max_size]`` (module doc):
    inverse-uniform (``1 / size`` uniform, so small sizes are likelier) by default."""
    clip = check_clip(clip)
    if not 0 < min_size <= max_size:
        raise ValueError(f"need 0 < min_size <= max_size, got {min_size!r}, {max_size!r}")
    if inverse_uniform:
        size = int(round(1.0 / float(rng.uniform(1.0 / max_size, 1.0 / min_size))))
    else:
        size = int(round(float(rng.uniform(min_size, max_size))))
    return resize_short_side(clip, size, interpolation)


def _pad_to(clip: np.ndarray, size: int) -> np.ndarray:
    """``clip`` zero-padded (centred) so that both sides are at least ``size``."""
    h, w = clip.shape[1:3]
    if h >= size and w >= size:
        return clip
    ph, pw = max(size - h, 0), max(size - w, 0)
    return np.pad(clip, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))


def random_crop(clip: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """One random ``size x size`` window of every frame (module doc); a frame smaller than
    ``size`` is zero-padded (centred) first, so a blank or tiny clip never raises."""
    clip = check_clip(clip)
    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    clip = _pad_to(clip, size)
    h, w = clip.shape[1:3]
    y = int(rng.integers(0, h - size)) if h > size else 0
    x = int(rng.integers(0, w - size)) if w > size else 0
    return np.ascontiguousarray(clip[:, y:y + size, x:x + size])


def uniform_crop(clip: np.ndarray, size: int, spatial_index: int = 1) -> np.ndarray:
    """A ``size x size`` crop of every frame: ``spatial_index`` 0, 1, 2 = left, centre, right
    along the long side (top, centre, bottom when ``H > W``); the short axis is centred.

    Offsets as PySlowFast's ``uniform_crop``: centre ``ceil((L - size) / 2)``, far end
    ``L - size``. A frame smaller than ``size`` is zero-padded (centred) first, so a
    blank or tiny clip never raises.
    """
    clip = check_clip(clip)
    if spatial_index not in (0, 1, 2):
        raise ValueError(f"spatial_index must be 0, 1 or 2, got {spatial_index!r}")
    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    h, w = clip.shape[1:3]
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        clip = np.pad(clip, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
        h, w = clip.shape[1:3]
    y = int(math.ceil((h - size) / 2))
    x = int(math.ceil((w - size) / 2))
    if h > w:
        y = {0: 0, 1: y, 2: h - size}[spatial_index]
    else:
        x = {0: 0, 1: x, 2: w - size}[spatial_index]
    return np.ascontiguousarray(clip[:, y:y + size, x:x + size])


def center_crop(clip: np.ndarray, size: int) -> np.ndarray:
    """:func:`uniform_crop` with ``spatial_index=1``."""
    return uniform_crop(clip, size, 1)


def rand_augment_clip(clip: np.ndarray, rng: np.random.Generator, num_ops: int = 2,
                      magnitude: float = 7, magnitude_std: float = 0.5, *,
                      fill: Sequence[int] = (128, 128, 128), interpolation: str = "bicubic",
                      prob: float = 0.5) -> np.ndarray:
    """RandAugment (increasing op set) with **identical** ops for every frame.

    One 63-bit seed is drawn from ``rng``; each frame runs
    :func:`maskfeat_jax.data.rand_augment.rand_augment` with a fresh generator from that
    seed. Its draws (op indices, apply/skip, magnitude, sign, and the bilinear/bicubic
    pick for ``interpolation="random"``) never depend on pixel values, so every frame
    consumes the same random stream and gets the same ops, magnitudes and signs.
    Content-dependent ops (AutoContrast, Equalize) still use each frame's own
    histogram, as PIL does per frame in PySlowFast.

    Defaults are the video fine-tuning ones: ``rand-m7-mstd0.5-inc1``, fill
    ``(128, 128, 128)`` (PySlowFast's video RandAugment passes no ``img_mean``), bicubic.
    """
    clip = check_clip(clip)
    seed = int(rng.integers(0, 2 ** 63 - 1))
    out = np.empty_like(clip)
    for t, frame in enumerate(clip):
        out[t] = RA.rand_augment(frame, np.random.default_rng(seed), num_ops=num_ops, magnitude=magnitude,
                                 magnitude_std=magnitude_std, increasing=True, prob=prob, fill=fill,
                                 interpolation=interpolation)
    return out
