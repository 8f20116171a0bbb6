"""The grain maps of video clips ``(T, H, W, 3)``: training (decode, augment, mask) and evaluation views.

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

Temporal sampling (``config.video.sampling``): ``"clip"`` takes one window of
``num_frames`` frames every ``sampling_rate`` (Kinetics, :func:`video_decode.decode_clip`);
``"segment"`` spreads ``num_frames`` frames over the whole video, one per segment
(Something-Something v2, :func:`ssv2.segment_indices`: a random frame of each segment in
training, the middle one at test, so every test view of a video has the same frames and
only the spatial crop differs). Fine-tuning crops with a random resized crop, or with
``config.video.train_jitter_scales = (min, max)`` as PySlowFast's SSv2 recipes: frames
decoded at their own size, short side to an inverse-uniform draw in ``[min, max]``, a
random ``image_size`` crop.

Evaluation: every video of this process's slice exactly once, expanded to
``num_clips x num_crops`` views, in batches padded with ``valid=False`` rows. Each
row carries ``video_index`` (the video's index in the source; -1 on padding) and
``view`` (``clip * num_crops + crop``) so the caller can average logits per video.
"""
from __future__ import annotations

import grain
import jax
import numpy as np

from maskfeat_jax.data import image_maps, masking, ssv2, video_decode
from maskfeat_jax.data import video_transforms as VT

#: Fill of the video RandAugment: PySlowFast's video AugmentOp passes no ``img_mean``.
VIDEO_RANDAUG_FILL = (128, 128, 128)


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


SAMPLINGS = ("clip", "segment")


def sampling(config) -> str:
    """``config.video.sampling`` ("clip" when the key is absent); ValueError unless one of :data:`SAMPLINGS`."""
    s = config.video.get("sampling", "clip")
    if s not in SAMPLINGS:
        raise ValueError(f"config.video.sampling={s!r}: expected 'clip' (one window of frames, Kinetics) or "
                         f"'segment' (one frame per segment of the whole video, SSv2)")
    return s


def jitter_scales(config) -> tuple[int, int] | None:
    """``config.video.train_jitter_scales`` as ``(min, max)``, or None for ``(0, 0)`` (random resized
    crop); ValueError unless ``image_size <= min <= max`` (the crop must fit in the scaled frame)."""
    scales = tuple(config.video.get("train_jitter_scales", (0, 0)))
    if scales == (0, 0):
        return None
    size = config.input.image_size
    if len(scales) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in scales) \
            or not size <= scales[0] <= scales[1]:
        raise ValueError(f"config.video.train_jitter_scales={scales!r}: expected (0, 0) (random resized crop) or "
                         f"two ints (min, max) with config.input.image_size={size} <= min <= max")
    return int(scales[0]), int(scales[1])


def check_batch(config, process_count: int | None = None) -> int:
    """The videos per process and step, ``global_batch_size / (num_sample * process_count)``;
    ValueError naming both keys unless that is a positive integer."""
    pc = jax.process_count() if process_count is None else int(process_count)
    return _videos_per_batch(config.input.global_batch_size, num_sample(config), pc)


def _videos_per_batch(gb: int, k: int, pc: int) -> int:
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

    * decode at short side ``config.video.short_side`` (at the video's own size with
      ``train_jitter_scales``), one random temporal start or one random frame per segment
      (``config.video.sampling``), shared by all the video's clips;
    * pre-training: random resized crop scale (0.5, 1), ratio (3/4, 4/3), bilinear, to
      ``config.input.image_size``, h-flip 0.5; cube mask (none under ``config.mae.enabled``:
      the step draws MAE's, the batch holds an all-False placeholder) on the grid
      ``(t, h / 2, w / 2)`` of ``grid = (t, h, w)`` (the stride-16 prediction grid,
      default :func:`prediction_grid`; one mask unit = 2x2 tokens = 32x32 pixels),
      upsampled to ``grid`` and flattened in (t, h, w) order as ``mask``;
    * fine-tuning: RandAugment with the same ops for every frame (on the decoded frames,
      before the crop, as PySlowFast), crop scale (``augment.crop_min_scale``, 1) or the
      short-side jitter and random crop (``train_jitter_scales``), h-flip, and one
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
        self.sampling, self.jitter = sampling(config), jitter_scales(config)
        self.num_sample = num_sample(config)
        self.global_batch_size = config.input.global_batch_size
        self.grid = tuple(int(g) for g in (prediction_grid(config) if grid is None else grid))
        self.mae = bool((config.get("mae") or {}).get("enabled", False))   # the step draws MAE's mask
        if len(self.grid) != 3 or min(self.grid) < 1 or (not self.mae and (self.grid[1] % 2 or self.grid[2] % 2)):
            raise ValueError(f"grid must be (t, h, w) with even h and w (one mask unit is 2x2 tokens), "
                             f"got {grid!r} (config.input.image_size={self.size}: use a multiple of 32)")
        self.ratio, self.min_aspect = config.mask.ratio, config.mask.min_aspect
        self.erase_p, self.flip_p = config.augment.erase_prob, 0.5 if config.augment.flip else 0.0
        self.crop_min_scale = config.augment.crop_min_scale
        self.randaug_ops, self.randaug_mag = config.augment.randaug_ops, config.augment.randaug_magnitude

    def elements_per_batch(self, process_count: int) -> int:
        """Videos in one process's batch (:func:`check_batch`): whole videos of ``num_sample`` clips."""
        return _videos_per_batch(self.global_batch_size, self.num_sample, int(process_count))

    def _view(self, frames, ok: bool, rng: np.random.Generator) -> dict:
        """One augmented clip (and its mask or erase box) of the decoded ``frames``."""
        out = {}
        if self.task == "pretrain":
            clip = VT.random_resized_crop(frames, rng, self.size, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3))
            clip = VT.random_flip(clip, rng, self.flip_p)
            t, h, w = self.grid
            if self.mae:                  # MAE draws its mask on device: a placeholder keeps the batch's shapes
                out["mask"] = np.zeros(t * h * w, bool)
            else:
                coarse = masking.cube_mask(rng, (t, h // 2, w // 2), self.ratio, min_aspect=self.min_aspect)
                out["mask"] = masking.upsample_mask(coarse, self.grid).reshape(-1)
        else:
            if self.randaug_ops > 0:
                frames = VT.rand_augment_clip(frames, rng, num_ops=self.randaug_ops, magnitude=self.randaug_mag,
                                              magnitude_std=0.5, fill=VIDEO_RANDAUG_FILL)
            if self.jitter is None:
                clip = VT.random_resized_crop(frames, rng, self.size, scale=(self.crop_min_scale, 1.0),
                                              ratio=(3 / 4, 4 / 3))
            else:
                clip = VT.random_crop(VT.random_short_side_jitter(frames, rng, *self.jitter), rng, self.size)
            clip = VT.random_flip(clip, rng, self.flip_p)
            out["erase_box"] = image_maps.erase_box(rng, self.size, self.erase_p)
        if not ok:
            clip = np.zeros((self.num_frames, self.size, self.size, 3), np.uint8)
        out["image"] = clip
        return out

    def _decode(self, video, rng: np.random.Generator):
        # the jitter scales frames of their own size, as PySlowFast (which reads them at full size)
        short = self.short_side if self.jitter is None or self.task == "pretrain" else None
        if self.sampling == "segment":
            return ssv2.decode_segments(video, self.num_frames, training=True, rng=rng, short_side=short)
        return video_decode.decode_clip(video, rng, num_frames=self.num_frames, sampling_rate=self.sampling_rate,
                                        mode="train", short_side=short, target_fps=self.target_fps)

    def random_map(self, element, rng: np.random.Generator):
        frames, ok = self._decode(element["video"], rng)
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


def flatten_views(batch: dict) -> dict:
    """``(videos, num_sample, ...)`` -> ``(videos * num_sample, ...)``: a video's clips stay adjacent."""
    return {key: value.reshape((-1,) + value.shape[2:]) for key, value in batch.items()}


class VideoEvalMap(grain.transforms.Map):
    """One test view: the ``clip_index``-th of ``num_clips`` evenly spaced clips, then

    * ``spatial_index=None``: short side to ``config.video.short_side``, centre crop
      ``config.input.image_size`` (MaskFeat's 1-crop test);
    * ``spatial_index`` 0/1/2: short side to ``image_size``, then the left/centre/right
      crop along the long side (PySlowFast's 3-crop test: ``TEST_CROP_SIZE`` for all of
      min/max scale and crop).

    With ``config.video.sampling = "segment"`` the frames are the middle of each segment
    (:func:`ssv2.segment_indices`) for every ``clip_index``. An element may carry
    ``clip_index`` / ``spatial_index`` (-1 = None) overriding the constructor's;
    ``video_index`` and ``view`` are passed through. Output ``{"image": uint8 (T, S, S, 3),
    "label", "valid", ...}``. The last decoded clip is cached, so the 3 crops of a clip
    decode it once.
    """

    pad_values = {"video_index": -1}   # padding rows: zeros, ``valid=False``, no video

    def __init__(self, config, clip_index: int = 0, num_clips: int = 1, spatial_index: int | None = None):
        v = config.video
        self.size, self.short_side = config.input.image_size, v.short_side
        self.num_frames, self.sampling_rate = v.num_frames, v.sampling_rate
        self.target_fps = float(v.target_fps) or None
        self.sampling = sampling(config)
        self.clip_index, self.num_clips, self.spatial_index = clip_index, num_clips, spatial_index
        self._cache = None

    def empty(self) -> dict:
        """A batch of no rows, padded to a full batch by a process past the end of its slice."""
        t, size = self.num_frames, self.size
        return {"image": np.zeros((0, t, size, size, 3), np.uint8), "label": np.zeros((0,), np.int32),
                "valid": np.zeros((0,), bool), "video_index": np.zeros((0,), np.int32),
                "view": np.zeros((0,), np.int32)}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def _decode(self, path, clip_index, short_side):
        segment = self.sampling == "segment"
        name = path if isinstance(path, str) else tuple(path) if isinstance(path, (list, tuple)) else id(path)
        key = (name, None if segment else clip_index, short_side)
        if self._cache is None or self._cache[0] != key:
            if segment:    # the middle frame of each segment, whatever the clip_index
                decoded = ssv2.decode_segments(path, self.num_frames, training=False, short_side=short_side)
            else:
                decoded = video_decode.decode_clip(
                    path, None, num_frames=self.num_frames, sampling_rate=self.sampling_rate, mode="test",
                    clip_index=clip_index, num_clips=self.num_clips, short_side=short_side,
                    target_fps=self.target_fps)
            self._cache = (key, decoded)
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


class ViewSource:
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


def eval_views(config, source, process_index: int, process_count: int, num_clips: int | None = None,
               num_crops: int | None = None) -> ViewSource:
    """:class:`ViewSource` of this process's videos, ``num_clips`` x ``num_crops`` views each
    (defaults ``config.video.test_clips`` / ``test_crops``; ``num_crops`` is 1 or 3)."""
    num_clips = config.video.test_clips if num_clips is None else int(num_clips)
    num_crops = config.video.test_crops if num_crops is None else int(num_crops)
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    if num_crops not in (1, 3):
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
    return ViewSource(source, process_index, process_count, num_clips, num_crops)
