"""PyAV clip decoding with PySlowFast's temporal sampling.

Temporal sampling follows PySlowFast (``decoder.get_start_end_idx`` and
``temporal_sampling``; facts read from its source, the code is written here): the
clip spans ``S = num_frames * sampling_rate`` frames (times ``fps / target_fps`` when
``target_fps`` is set), ``delta = max(n - S, 0)`` for a video of ``n`` frames, and

* train: ``start ~ U[0, delta]``;
* test with offset sampling (``use_offset=True``, ``DATA.USE_OFFSET_SAMPLING: True``
  in the MaskFeat video configs): ``start = floor(delta / 2)`` for one clip, else
  ``clip_index * floor(delta / (num_clips - 1))`` (first clip at 0, last at the end);
  without offset sampling ``start = delta * clip_index / num_clips``;
* the frame indices are ``floor(linspace(start, start + S - 1, num_frames))`` clamped
  to ``[0, n - 1]``: spacing ``(S - 1) / (num_frames - 1)``, about ``sampling_rate``.

A video shorter than the span (``n < S``) starts at 0 and its indices are clamped, so
its last frame is repeated to fill the clip.
"""
from __future__ import annotations

import io
import logging
import math
import os

import numpy as np

from maskfeat_jax.data import video_transforms as VT

__all__ = ["temporal_indices", "open_container", "video_stream", "frame_rate", "header_frame_count",
           "decode_clip"]

_warned: set = set()


def temporal_indices(num_video_frames: int, num_frames: int, sampling_rate: int, *,
                     clip_index: int = -1, num_clips: int = 1, start_fraction: float = 0.0,
                     use_offset: bool = True, span: float | None = None) -> np.ndarray:
    """The ``num_frames`` frame indices (int64) of one clip, PySlowFast semantics (module doc).

    ``clip_index = -1`` is random (train) sampling with ``start = start_fraction * delta``
    (the caller draws ``start_fraction ~ U[0, 1)``); ``clip_index >= 0`` picks the
    ``clip_index``-th of ``num_clips`` test clips. ``span`` overrides
    ``num_frames * sampling_rate``.
    """
    if num_video_frames < 1:
        raise ValueError(f"num_video_frames must be >= 1, got {num_video_frames!r}")
    if num_frames < 1 or sampling_rate < 1:
        raise ValueError(f"num_frames and sampling_rate must be >= 1, got {num_frames!r}, {sampling_rate!r}")
    if clip_index != -1 and not 0 <= clip_index < num_clips:
        raise ValueError(f"clip_index must be -1 or in [0, num_clips={num_clips}), got {clip_index!r}")
    clip_size = float(num_frames * sampling_rate if span is None else span)
    delta = max(num_video_frames - clip_size, 0.0)
    if clip_index == -1:
        start = float(start_fraction) * delta
    elif use_offset:
        start = math.floor(delta / 2) if num_clips == 1 else clip_index * math.floor(delta / (num_clips - 1))
    else:
        start = delta * clip_index / num_clips
    index = np.linspace(start, start + clip_size - 1, num_frames)
    # 1e-6: float64 linspace can land a hair below an exact integer (e.g. 20.999999999999996)
    return np.clip(np.floor(index + 1e-6), 0, num_video_frames - 1).astype(np.int64)


def open_container(src):
    """A PyAV container read from a path, a path-like or the file's bytes."""
    import av
    if isinstance(src, (bytes, bytearray)):
        src = io.BytesIO(src)
    elif isinstance(src, os.PathLike):
        src = os.fspath(src)
    return av.open(src, mode="r")


def video_stream(container):
    """The first video stream of ``container``, decoded with FFmpeg's own threads."""
    if not container.streams.video:
        raise ValueError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def frame_rate(stream) -> float:
    """The stream's frames per second (average, else guessed, else base rate); 0 if unknown."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def header_frame_count(container, stream, fps: float) -> int:
    """Frames per the container header (mp4), else estimated from the duration (webm/mkv); 0 if unknown."""
    if stream.frames and stream.frames > 0:
        return int(stream.frames)
    if fps > 0:
        if stream.duration and stream.time_base:
            return int(round(float(stream.duration * stream.time_base) * fps))
        if container.duration:
            return int(round(container.duration / 1e6 * fps))
    return 0


def _to_rgb(frame, short_side: int | None) -> np.ndarray:
    if short_side is None or min(frame.width, frame.height) == short_side:
        return frame.to_ndarray(format="rgb24")
    h, w = VT.short_side_shape(frame.height, frame.width, short_side)
    return frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="BILINEAR")


def _read(container, stream, index: np.ndarray, fps: float, short_side, seek: bool):
    """The frames at ``index`` (frame numbers in presentation order), or None when the
    stream ends early or a seek cannot be trusted (the caller then counts the frames)."""
    needed = set(int(i) for i in index)
    first, last = min(needed), max(needed)
    start_pts = stream.start_time or 0
    seek = seek and first > 0 and fps > 0 and stream.time_base is not None
    if seek:
        target = start_pts + int(math.floor(first / fps / stream.time_base))
        container.seek(target, stream=stream, backward=True, any_frame=False)
    got, k = {}, None
    for frame in container.decode(stream):
        if k is None and seek:
            if frame.pts is None:
                return None
            # anchor on the first frame after the seek, then count (exact for constant frame rate)
            k = int(round(float((frame.pts - start_pts) * stream.time_base) * fps))
            if k > first:
                return None
        else:
            k = 0 if k is None else k + 1
        if k in needed:
            got[k] = _to_rgb(frame, short_side)
        if k >= last:
            break
    if len(got) < len(needed):
        return None
    return np.stack([got[int(i)] for i in index])


def _count_frames(src) -> int:
    with open_container(src) as container:
        stream = video_stream(container)
        return sum(1 for _ in container.decode(stream))


def decode_clip(path, rng: np.random.Generator | None = None, *, num_frames: int = 16,
                sampling_rate: int = 4, mode: str = "train", clip_index: int = 0, num_clips: int = 10,
                short_side: int | None = None, use_offset: bool = True,
                target_fps: float | None = None) -> tuple[np.ndarray, bool]:
    """One clip ``(num_frames, H, W, 3)`` uint8 of the video at ``path`` (or encoded bytes).

    Decoded with PyAV (any codec the bundled FFmpeg reads: h264/mpeg4 mp4, vp8/vp9
    webm, ...), ``thread_type="AUTO"``, seeking to the clip start. ``mode="train"``
    draws a random start from ``rng``; ``mode="test"`` takes the ``clip_index``-th of
    ``num_clips`` evenly spaced clips. Sampling is described in the module docstring;
    a video shorter than the span repeats its last frame. ``short_side`` resizes
    every frame (bilinear, FFmpeg's swscale) so its short side is ``short_side`` and
    its long side ``floor(long / short * short_side)``. ``target_fps`` rescales the
    span to the video's own frame rate (``span * fps / target_fps``), as PySlowFast's
    ``DATA.TARGET_FPS``; None uses the video's frames as they are.

    The frame count comes from the header (or the duration); if the stream turns out
    shorter, the frames are counted by decoding and the clip is sampled again from the
    frames that decode. Any error (missing, empty, truncated or corrupt file, no video
    stream) returns ``(zeros, False)`` with ``H = W = short_side or 8`` and logs one
    warning per path.
    """
    if mode not in ("train", "test"):
        raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
    if mode == "train" and rng is None:
        raise ValueError("mode='train' needs an rng")
    u = float(rng.random()) if mode == "train" else 0.0
    ci, nc = (-1, 1) if mode == "train" else (int(clip_index), int(num_clips))
    try:
        with open_container(path) as container:
            stream = video_stream(container)
            fps = frame_rate(stream)
            span = None
            if target_fps:
                if fps <= 0:
                    raise ValueError("unknown frame rate, cannot apply target_fps")
                span = num_frames * sampling_rate * fps / target_fps
            n = header_frame_count(container, stream, fps)
            frames = None
            if n > 0:
                index = temporal_indices(n, num_frames, sampling_rate, clip_index=ci, num_clips=nc,
                                         start_fraction=u, use_offset=use_offset, span=span)
                frames = _read(container, stream, index, fps, short_side, seek=True)
        if frames is None:  # no or wrong header count, or an untrustworthy seek: count, then read
            n = _count_frames(path)
            if n == 0:
                raise ValueError("no decodable video frames")
            index = temporal_indices(n, num_frames, sampling_rate, clip_index=ci, num_clips=nc,
                                     start_fraction=u, use_offset=use_offset, span=span)
            with open_container(path) as container:
                stream = video_stream(container)
                frames = _read(container, stream, index, fps, short_side, seek=False)
            if frames is None:
                raise ValueError(f"stream ended before frame {int(index.max())} of {n}")
        if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape[1:3]) < 1:
            raise ValueError(f"unexpected frame shape {frames.shape}")
        return np.ascontiguousarray(frames, dtype=np.uint8), True
    except Exception as e:  # noqa: BLE001 - any undecodable video is skipped, never fatal
        name = path if isinstance(path, (str, os.PathLike)) else f"<{type(path).__name__}>"
        if name not in _warned:
            _warned.add(name)
            logging.warning("skipping undecodable video %s: %s: %s", name, type(e).__name__, e)
        side = short_side or 8
        return np.zeros((num_frames, side, side, 3), np.uint8), False
