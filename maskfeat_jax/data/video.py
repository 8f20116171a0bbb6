"""Video (Kinetics-style) input: CSV source, PyAV clip decoding and grain pipelines.

Mirrors :mod:`maskfeat_jax.data.pipeline` for clips ``(T, H, W, 3)``:

Training: ``VideoCsvSource -> seed/shuffle -> repeat -> decode + augment + mask
(random_map, in workers) -> this process's slice -> batch -> mp_prefetch``. Clips
leave the workers as uint8 (normalised on device); every element carries ``valid``:
False for a video that could not be decoded (a blank clip, weighted out of the loss).

Repeated augmentation (``config.video.num_sample = k > 1``, PySlowFast's
``AUG.NUM_SAMPLE``; 2 in the MViTv2-S Kinetics fine-tuning recipe): every sampled
video is decoded once, at one random temporal position, and yields ``k`` clips that
share those frames but each draw their own augmentation (RandAugment, crop, flip,
erasing; in pre-training crop, flip and mask). ``input.global_batch_size`` still
counts clips, so a step takes ``global_batch_size / k`` videos; the ``k`` views of a
video are adjacent rows of the batch and share its ``label`` and ``valid``. An epoch
stays one pass over the videos, ``num_videos * k / global_batch_size`` steps
(:func:`steps_per_epoch`), as PySlowFast, whose ``TRAIN.BATCH_SIZE`` counts videos.
Decoding costs ``1 / k`` of a video per clip; the augmentation is paid per clip.

Evaluation: every video of this process's slice exactly once, expanded to
``num_clips x num_crops`` views, in batches padded with ``valid=False`` rows. Each
row carries ``video_index`` (the video's index in the source; -1 on padding) and
``view`` (``clip * num_crops + crop``) so the caller can average logits per video.

CSV format (one line per video, as PySlowFast's Kinetics loader)::

    path/to/video_1.mp4 12
    /abs/path/video_2.webm,3

``path label`` separated by a space or a comma; relative paths are relative to
``root`` (default: the CSV's folder); blank lines are skipped.

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

import grain
import jax
import numpy as np

from maskfeat_jax import masking
from maskfeat_jax.data import pipeline
from maskfeat_jax.data import video_transforms as VT

__all__ = ["parse_csv", "VideoCsvSource", "make_source", "temporal_indices", "decode_clip",
           "VideoTrainMap", "VideoEvalMap", "prediction_grid", "num_sample", "check_batch",
           "steps_per_epoch", "train_dataset", "eval_batches"]

_warned: set = set()
#: Fill of the video RandAugment: PySlowFast's video AugmentOp passes no ``img_mean``.
VIDEO_RANDAUG_FILL = (128, 128, 128)


# ----------------------------------------------------------------------------
# CSV source
# ----------------------------------------------------------------------------

def csv_lines(path: str) -> list[tuple[int, str]]:
    """``(1-based line number, stripped text)`` of the non-blank lines of a CSV: the lines
    ``parse_csv`` turns into videos, one each."""
    with open(os.fspath(path), encoding="utf-8") as f:
        return [(lineno, line.strip()) for lineno, line in enumerate(f, start=1) if line.strip()]


def parse_csv(path: str, root: str | None = None) -> list[tuple[str, int]]:
    """``[(video_path, label), ...]`` from a ``path label`` / ``path,label`` file.

    A line with a comma is split at its comma (PySlowFast's ``PATH_LABEL_SEPARATOR: ","``),
    so its path may hold spaces (Kinetics folders named by class: ``air drumming/x.mp4,3``);
    a line without one is split at whitespace. Relative paths are joined to ``root``
    (default: the CSV's folder). Blank lines are skipped. A line with a missing label, a
    non-integer or negative label, or more than two fields raises ValueError naming the
    file and the 1-based line number.
    """
    path = os.fspath(path)
    if root is None:
        root = os.path.dirname(os.path.abspath(path))
    items = []
    for lineno, line in csv_lines(path):
        fields = [f.strip() for f in line.split(",")] if "," in line else line.split()
        if len(fields) != 2 or not fields[0]:
            raise ValueError(f"{path}:{lineno}: expected 'path label' (space or comma separated), "
                             f"got {len(fields)} field(s): {line!r}")
        video, label = fields
        try:
            label = int(label)
        except ValueError:
            raise ValueError(f"{path}:{lineno}: label {label!r} is not an integer: {line!r}") from None
        if label < 0:
            raise ValueError(f"{path}:{lineno}: label {label} is negative: {line!r}")
        items.append((os.path.join(root, video), label))
    return items


class VideoCsvSource:
    """Random-access source over a video CSV; items ``{"video": path, "label": int}``.

    ``num_classes`` is the largest label + 1. A missing or empty CSV raises ValueError
    naming it. Files are not opened here: a missing or corrupt video is skipped in the
    pipeline's workers (``valid=False``), never fatal.
    """

    def __init__(self, csv_path: str, root: str | None = None):
        self.csv_path = os.fspath(csv_path)
        if not os.path.isfile(self.csv_path):
            raise ValueError(f"video CSV {self.csv_path!r} does not exist")
        self.items = parse_csv(self.csv_path, root)
        if not self.items:
            raise ValueError(f"video CSV {self.csv_path!r} lists no videos")
        self.num_classes = max(label for _, label in self.items) + 1

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        return {"video": path, "label": label}


_SPLIT_FILES = {"validation": "val", "valid": "val"}


def make_source(config, split: str) -> VideoCsvSource:
    """``<config.video.csv_dir>/<split>.csv`` (``validation`` reads ``val.csv``), with paths
    relative to ``config.video.root`` (None: the CSV's folder)."""
    csv_dir = config.video.csv_dir
    name = split if os.path.isfile(os.path.join(csv_dir, f"{split}.csv")) else _SPLIT_FILES.get(split, split)
    return VideoCsvSource(os.path.join(csv_dir, f"{name}.csv"), config.video.get("root", None))


# ----------------------------------------------------------------------------
# temporal sampling and decoding
# ----------------------------------------------------------------------------

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


def _video_stream(container):
    if not container.streams.video:
        raise ValueError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _header_frame_count(container, stream, fps: float) -> int:
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
        stream = _video_stream(container)
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
            stream = _video_stream(container)
            fps = _fps(stream)
            span = None
            if target_fps:
                if fps <= 0:
                    raise ValueError("unknown frame rate, cannot apply target_fps")
                span = num_frames * sampling_rate * fps / target_fps
            n = _header_frame_count(container, stream, fps)
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
                stream = _video_stream(container)
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


# ----------------------------------------------------------------------------
# grain transforms
# ----------------------------------------------------------------------------

def prediction_grid(config) -> tuple[int, int, int]:
    """The stride-16 prediction grid ``(T // 2, size // 16, size // 16)`` of MViTv2 (spec 3)."""
    size = config.input.image_size
    return config.video.num_frames // 2, size // 16, size // 16


def num_sample(config) -> int:
    """``config.video.num_sample`` (1 when the key is absent): training clips per decoded
    video (repeated augmentation, module docstring). ValueError unless a positive int."""
    n = config.video.get("num_sample", 1)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"config.video.num_sample={n!r} must be a positive integer (1: no repeated augmentation)")
    return int(n)


def check_batch(config, process_count: int | None = None) -> int:
    """The videos per process and step, ``global_batch_size / (num_sample * process_count)``;
    ValueError naming both keys unless that is a positive integer."""
    pc = jax.process_count() if process_count is None else int(process_count)
    k, gb = num_sample(config), config.input.global_batch_size
    if gb <= 0 or gb % (k * pc):
        raise ValueError(
            f"config.input.global_batch_size={gb} (clips) must be divisible by config.video.num_sample={k} x "
            f"{pc} process(es) = {k * pc}: each process batches whole videos of {k} clips each")
    return gb // (k * pc)


def steps_per_epoch(config, num_videos: int) -> int:
    """Steps in one epoch, one pass over ``num_videos`` training videos: a step takes
    ``global_batch_size / num_sample`` videos, so ``num_videos * num_sample //
    global_batch_size`` (at least 1). Equals ``num_videos // global_batch_size`` for
    ``num_sample = 1``."""
    return max(int(num_videos) * num_sample(config) // config.input.global_batch_size, 1)


class VideoTrainMap(grain.transforms.RandomMap):
    """Decode one training video once, then build ``config.video.num_sample`` clips from it,
    each augmented identically on every frame and (pre-training) with its own cube mask.

    * decode at short side ``config.video.short_side`` (one random temporal start, shared
      by all the video's clips);
    * pre-training: random resized crop scale (0.5, 1), ratio (3/4, 4/3), bilinear, to
      ``config.input.image_size``, h-flip 0.5; cube mask on the grid
      ``(t, h / 2, w / 2)`` of ``grid = (t, h, w)`` (the stride-16 prediction grid,
      default :func:`prediction_grid`; one mask unit = 2x2 tokens = 32x32 pixels),
      upsampled to ``grid`` and flattened in (t, h, w) order as ``mask``;
    * fine-tuning: RandAugment with the same ops for every frame (on the decoded frames,
      before the crop, as PySlowFast), crop scale (0.08, 1), h-flip, and one
      ``erase_box`` per clip (the same box on every frame: PySlowFast's cube erasing).

    With ``num_sample = 1`` the output is ``{"image": uint8 (T, S, S, 3), "mask"?: bool
    (t*h*w,), "erase_box"?: int32 (4,), "label": int32, "valid": bool}``; with ``k > 1``
    every field gains a leading axis of ``k`` views (``label`` and ``valid`` repeated),
    drawn one after the other from the element's generator. A video that failed to decode
    gives all-zero clips.
    """

    def __init__(self, config, grid=None):
        v = config.video
        self.task, self.size = config.task, config.input.image_size
        self.num_frames, self.sampling_rate, self.short_side = v.num_frames, v.sampling_rate, v.short_side
        self.target_fps = float(v.target_fps) or None
        self.num_sample = num_sample(config)
        self.grid = tuple(int(g) for g in (prediction_grid(config) if grid is None else grid))
        if len(self.grid) != 3 or self.grid[1] % 2 or self.grid[2] % 2 or min(self.grid) < 1:
            raise ValueError(f"grid must be (t, h, w) with even h and w (one mask unit is 2x2 tokens), "
                             f"got {grid!r} (config.input.image_size={self.size}: use a multiple of 32)")
        self.ratio, self.min_aspect = config.mask.ratio, config.mask.min_aspect
        self.erase_p, self.flip_p = config.augment.erase_prob, 0.5 if config.augment.flip else 0.0
        self.crop_min_scale = config.augment.crop_min_scale
        self.randaug_ops, self.randaug_mag = config.augment.randaug_ops, config.augment.randaug_magnitude

    def _view(self, frames, ok: bool, rng: np.random.Generator) -> dict:
        """One augmented clip (and its mask or erase box) of the decoded ``frames``."""
        out = {}
        if self.task == "pretrain":
            clip = VT.random_resized_crop(frames, rng, self.size, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3))
            clip = VT.random_flip(clip, rng, self.flip_p)
            t, h, w = self.grid
            coarse = masking.cube_mask(rng, (t, h // 2, w // 2), self.ratio, min_aspect=self.min_aspect)
            out["mask"] = masking.upsample_mask(coarse, self.grid).reshape(-1)
        else:
            if self.randaug_ops > 0:
                frames = VT.rand_augment_clip(frames, rng, num_ops=self.randaug_ops, magnitude=self.randaug_mag,
                                              magnitude_std=0.5, fill=VIDEO_RANDAUG_FILL)
            clip = VT.random_resized_crop(frames, rng, self.size, scale=(self.crop_min_scale, 1.0),
                                          ratio=(3 / 4, 4 / 3))
            clip = VT.random_flip(clip, rng, self.flip_p)
            out["erase_box"] = pipeline.erase_box(rng, self.size, self.erase_p)
        if not ok:
            clip = np.zeros((self.num_frames, self.size, self.size, 3), np.uint8)
        out["image"] = clip
        return out

    def random_map(self, element, rng: np.random.Generator):
        frames, ok = decode_clip(element["video"], rng, num_frames=self.num_frames,
                                 sampling_rate=self.sampling_rate, mode="train",
                                 short_side=self.short_side, target_fps=self.target_fps)
        k = self.num_sample
        views = [self._view(frames, ok, rng) for _ in range(k)]
        if k == 1:
            out = views[0]
            out["label"], out["valid"] = np.int32(element["label"]), np.bool_(ok)
        else:
            out = {key: np.stack([view[key] for view in views]) for key in views[0]}
            out["label"] = np.full((k,), element["label"], np.int32)
            out["valid"] = np.full((k,), ok, np.bool_)
        return out


def _flatten_views(batch: dict) -> dict:
    """``(videos, num_sample, ...)`` -> ``(videos * num_sample, ...)``: a video's clips stay adjacent."""
    return {key: value.reshape((-1,) + value.shape[2:]) for key, value in batch.items()}


class VideoEvalMap(grain.transforms.Map):
    """One test view: the ``clip_index``-th of ``num_clips`` evenly spaced clips, then

    * ``spatial_index=None``: short side to ``config.video.short_side``, centre crop
      ``config.input.image_size`` (MaskFeat's 1-crop test);
    * ``spatial_index`` 0/1/2: short side to ``image_size``, then the left/centre/right
      crop along the long side (PySlowFast's 3-crop test: ``TEST_CROP_SIZE`` for all of
      min/max scale and crop).

    An element may carry ``clip_index`` / ``spatial_index`` (-1 = None) overriding the
    constructor's; ``video_index`` and ``view`` are passed through. Output ``{"image":
    uint8 (T, S, S, 3), "label", "valid", ...}``. The last decoded clip is cached, so
    the 3 crops of a clip decode it once.
    """

    def __init__(self, config, clip_index: int = 0, num_clips: int = 1, spatial_index: int | None = None):
        v = config.video
        self.size, self.short_side = config.input.image_size, v.short_side
        self.num_frames, self.sampling_rate = v.num_frames, v.sampling_rate
        self.target_fps = float(v.target_fps) or None
        self.clip_index, self.num_clips, self.spatial_index = clip_index, num_clips, spatial_index
        self._cache = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def _decode(self, path, clip_index, short_side):
        key = (path if isinstance(path, str) else id(path), clip_index, short_side)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, decode_clip(path, None, num_frames=self.num_frames,
                                            sampling_rate=self.sampling_rate, mode="test",
                                            clip_index=clip_index, num_clips=self.num_clips,
                                            short_side=short_side, target_fps=self.target_fps))
        return self._cache[1]

    def map(self, element):
        clip_index = int(element.get("clip_index", self.clip_index))
        spatial = element.get("spatial_index", self.spatial_index)
        spatial = None if spatial is None or int(spatial) < 0 else int(spatial)
        short = self.short_side if spatial is None else self.size
        frames, ok = self._decode(element["video"], clip_index, short)
        if ok:
            clip = VT.uniform_crop(VT.resize_short_side(frames, short), self.size, 1 if spatial is None else spatial)
        else:
            clip = np.zeros((self.num_frames, self.size, self.size, 3), np.uint8)
        out = {"image": clip, "label": np.int32(element["label"]), "valid": np.bool_(ok)}
        for k in ("video_index", "view"):
            if k in element:
                out[k] = np.int32(element[k])
        return out


# ----------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------

def train_dataset(config, source, grid=None, *, process_index=None, process_count=None,
                  start_batch: int = 0) -> grain.IterDataset:
    """The infinite, shuffled, per-process training stream of clips (module docstring).

    Batches hold ``global_batch_size / process_count`` clips: that many videos, or with
    ``config.video.num_sample = k`` a ``1 / k`` of that many videos with their ``k``
    clips in adjacent rows. :func:`check_batch` raises here, before anything is read
    or compiled, when the batch does not split into whole videos.
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    videos_per_batch = check_batch(config, pc)
    ds = grain.MapDataset.source(source).seed(config.seed).shuffle().repeat()
    # Augment/mask, batch, then take this host's batches (see pipeline.train_dataset).
    ds = ds.random_map(VideoTrainMap(config, grid)).batch(videos_per_batch, drop_remainder=True)[pi::pc]
    if num_sample(config) > 1:
        ds = ds.map(_flatten_views)
    ds = ds[start_batch:] if start_batch else ds      # resume on another topology (pipeline.train_dataset)
    return pipeline.in_workers(ds, pipeline.worker_count(config), per_worker_buffer_size=config.input.prefetch)


class _ViewSource:
    """This process's videos (``source[pi::pc]``), each expanded to ``num_clips * num_crops`` views."""

    def __init__(self, source, pi, pc, num_clips, num_crops):
        self.source, self.pi, self.pc = source, pi, pc
        self.num_clips, self.num_crops = num_clips, num_crops
        self.num_views = num_clips * num_crops
        self.num_videos = len(range(pi, len(source), pc))

    def __len__(self):
        return self.num_videos * self.num_views

    def __getitem__(self, i):
        local, view = divmod(int(i), self.num_views)
        video_index = self.pi + self.pc * local
        item = self.source[video_index]
        clip, crop = divmod(view, self.num_crops)
        return {"video": item["video"], "label": int(item["label"]), "video_index": video_index,
                "view": view, "clip_index": clip, "spatial_index": crop if self.num_crops > 1 else -1}


def eval_batches(config, source, batch_size: int, num_clips: int | None = None, num_crops: int | None = None,
                 *, process_index=None, process_count=None, worker_count: int = 0):
    """Yields padded batches covering every video of this process's slice of ``source``
    exactly once per view (``num_clips`` temporal clips x ``num_crops`` spatial crops;
    defaults ``config.video.test_clips`` / ``test_crops``; ``num_crops`` is 1 or 3).

    Videos are sliced across processes (``source[pi::pc]``), so all views of a video
    stay on one process, in order ``view = clip * num_crops + crop``. Every process
    yields ``ceil(ceil(len(source) / pc) * views / batch_size)`` batches (collectives
    stay in step). Batch keys: ``image`` uint8 ``(B, T, S, S, 3)``, ``label``,
    ``valid`` (False on padding and undecodable videos), ``video_index`` (-1 on
    padding) and ``view``. ``worker_count > 0`` decodes in grain worker processes.
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    num_clips = config.video.test_clips if num_clips is None else int(num_clips)
    num_crops = config.video.test_crops if num_crops is None else int(num_crops)
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    if num_crops not in (1, 3):
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
    views = _ViewSource(source, pi, pc, num_clips, num_crops)
    n_batches = math.ceil(math.ceil(len(source) / pc) * views.num_views / batch_size)
    ds = grain.MapDataset.source(views).map(VideoEvalMap(config, 0, num_clips))
    ds = ds.batch(batch_size, drop_remainder=False)
    t, size = config.video.num_frames, config.input.image_size
    empty = {"image": np.zeros((0, t, size, size, 3), np.uint8), "label": np.zeros((0,), np.int32),
             "valid": np.zeros((0,), bool), "video_index": np.zeros((0,), np.int32),
             "view": np.zeros((0,), np.int32)}
    read = pipeline.read_batches(ds, worker_count)
    try:
        for b in range(n_batches):
            batch = next(read) if b < len(ds) else empty
            pad = batch_size - len(batch["label"])
            if pad:
                batch = {k: np.concatenate([v, np.full((pad,) + v.shape[1:], -1 if k == "video_index" else 0,
                                                       v.dtype)]) for k, v in batch.items()}
            yield batch
    finally:
        read.close()
