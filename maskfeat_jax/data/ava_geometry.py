"""AVA's box-aware clip geometry, as PySlowFast's ``ava_dataset`` cv2 path does it (see
``ava_maps``): normalised boxes to pixels, the training short-side jitter, random crop and flip,
and the evaluation centre crop, with the boxes moved, scaled, flipped and clipped with the
frames and the boxes a crop cut counted."""
from __future__ import annotations

import math

import numpy as np

from maskfeat_jax.data import video_transforms as VT

__all__ = ["to_pixels", "train_geometry", "eval_geometry"]


def to_pixels(boxes_Nx4, height: int, width: int) -> np.ndarray:
    """Normalised ``x1 y1 x2 y2`` to pixels, clipped to ``[0, W - 1]`` x ``[0, H - 1]`` (official)."""
    px = np.asarray(boxes_Nx4, np.float32).reshape(-1, 4) * np.float32([width, height, width, height])
    return _clip(px, height, width)


def _clip(boxes, height, width) -> np.ndarray:
    return np.clip(boxes, 0.0, np.float32([width - 1, height - 1, width - 1, height - 1])).astype(np.float32)


def _scale_and_crop(frames, scaled, boxes, y: int, x: int, size: int):
    """``scaled`` (``frames`` resized) cropped at ``(y, x)``; the boxes scaled per axis and moved with it."""
    sy, sx = scaled.shape[1] / frames.shape[1], scaled.shape[2] / frames.shape[2]
    boxes = boxes * np.float32([sx, sy, sx, sy]) - np.float32([x, y, x, y])
    return np.ascontiguousarray(scaled[:, y:y + size, x:x + size]), boxes.astype(np.float32)


def _finish(frames, boxes, size):
    """``(frames, boxes clipped to the crop, boxes the crop cut, of which left without area)``."""
    cut = (boxes[:, :2] < 0).any(1) | (boxes[:, 2:] > size - 1).any(1)
    boxes = _clip(boxes, size, size)
    empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    return frames, boxes, int(cut.sum()), int((cut & empty).sum())


def train_geometry(frames, boxes_px, rng: np.random.Generator, crop_size: int, jitter_scales=(256, 320), *,
                   inverse_uniform: bool = True, flip_p: float = 0.5):
    """``(frames (T, S, S, 3), boxes (N, 4), clipped, outside)``: the training short-side jitter,
    random crop and flip of ``frames`` and their pixel boxes (module docstring), drawn once per
    clip from ``rng`` in that order. ``jitter_scales[0] >= crop_size``."""
    scaled = VT.random_short_side_jitter(frames, rng, *jitter_scales, inverse_uniform=inverse_uniform)
    h, w = scaled.shape[1:3]
    y = int(rng.integers(0, h - crop_size)) if h > crop_size else 0
    x = int(rng.integers(0, w - crop_size)) if w > crop_size else 0
    frames, boxes = _scale_and_crop(frames, scaled, boxes_px, y, x, crop_size)
    if rng.random() < flip_p:
        frames = np.ascontiguousarray(frames[:, :, ::-1])
        boxes = boxes.copy()
        boxes[:, [0, 2]] = crop_size - 1 - boxes[:, [2, 0]]          # x1, x2 -> W - 1 - x2, W - 1 - x1
    return _finish(frames, boxes, crop_size)


def eval_geometry(frames, boxes_px, crop_size: int):
    """``(frames (T, S, S, 3), boxes (N, 4), clipped, outside)``: the ``val`` split's short side
    to ``crop_size`` and centre crop (offsets ``ceil((L - S) / 2)``)."""
    scaled = VT.resize_short_side(frames, crop_size)
    h, w = scaled.shape[1:3]
    y, x = math.ceil((h - crop_size) / 2), math.ceil((w - crop_size) / 2)
    return _finish(*_scale_and_crop(frames, scaled, boxes_px, y, x, crop_size), crop_size)
