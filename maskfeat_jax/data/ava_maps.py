"""AVA on the grain side: keyframe records as a source, and the box-aware clip maps.

**Source** (:class:`AvaSource`): one item per keyframe ``(video, second)``, from the official
files (:mod:`maskfeat_jax.data.ava`) under ``<root>/annotations`` and the videos under
``<root>/videos_15min/<video_id>.<ext>`` (PySlowFast's DATASET.md: each movie cut to its
15:00-30:00 minutes, so frame 0 is second 900). Which boxes, as PySlowFast's
``ava_helper.load_boxes_and_labels`` (facts read from its source, the code is written here):

* ``train``: the ground-truth boxes plus the detected boxes scoring at least the threshold
  (``AVA.TRAIN_PREDICT_BOX_LISTS`` of ``configs/AVA/*.yaml``: GT and the "include negative"
  detections; a detection without an action is a negative box, all-zero label);
* ``val``: the detected boxes at or above the threshold only (``TEST_PREDICT_BOX_LISTS``), the
  ground truth going to the evaluator (:func:`groundtruth`); the excluded timestamps are
  dropped here (the evaluator ignores them; dropping them early changes no score).

A keyframe whose video file is missing is skipped and counted (``missing_videos``,
``missing_keyframes``).

**Maps**, as ``ava_dataset.Ava._images_and_boxes_preprocessing_cv2`` (``AVA.IMG_PROC_BACKEND``
is ``cv2`` by default). The clip is ``num_frames`` frames every ``sampling_rate`` around the
keyframe (:func:`ava.clip_indices`) on a timeline of ``fps`` frames per second (30 in the
official frame dumps; ``make_ava_demo.FPS`` for the demo); frames are taken from the video by
time, so a video of another frame rate gives the frame shown at each timeline instant.
Normalised boxes become pixels (``x * W``, ``y * H``) clipped to ``[0, W - 1]`` x
``[0, H - 1]`` (pixel indices, the official convention), then

* training: short side to ``int(round(1 / U(1 / max, 1 / min)))`` of ``jitter_scales``
  (``DATA.TRAIN_JITTER_SCALES`` [256, 320]; the cv2 backend's inverse-uniform draw), boxes
  scaled with the frames; a random ``crop_size`` crop (``DATA.TRAIN_CROP_SIZE`` 224), offsets
  ``randint(0, L - size)`` along each longer axis; a horizontal flip with probability 0.5,
  boxes ``x1, x2 -> W - 1 - x2, W - 1 - x1``;
* evaluation (the ``val`` split): short side to ``crop_size`` (``DATA.TEST_CROP_SIZE``), a
  centre crop, offset ``ceil((L - size) / 2)``. (PySlowFast's final ``test`` split takes no
  crop: the whole short-side-scaled frame; equal for square videos such as the demo's.)

and last the boxes are clipped to ``[0, crop_size - 1]``. A box that the crop cut is counted
in ``boxes_clipped`` (and one left with no area in ``boxes_outside``; kept, as the official
loader keeps it). Boxes scale per axis with the frame (the official code scales both axes by
the long side's factor: at most a pixel apart). Resizing is Pillow's bilinear (antialiased
when shrinking, unlike ``cv2.INTER_LINEAR``).

Output, fixed shapes for batching: ``image (T, S, S, 3)`` uint8, ``boxes (B, 4)`` float32 in
crop pixels, ``labels (B, C)`` float32 multi-hot, ``box_valid (B,)`` bool (False on padding),
``valid`` (False when the video could not be decoded: blank image, no valid box), and the
counts ``num_boxes``, ``boxes_clipped``, ``boxes_outside``, ``boxes_truncated`` (boxes past
``max_boxes``, dropped). Evaluation adds ``ori_boxes (B, 4)`` (the normalised boxes the
evaluator writes detections for), ``box_scores (B,)`` (detector scores), ``video_index`` and
``second``.

**From the config** (``config.task = "detect"``, ``input.dataset`` ``"ava"`` or ``"ava_demo"``):
:func:`root`, :func:`train_source`, :func:`eval_source`, :func:`train_map`, :func:`eval_map`
read ``config.ava``, ``config.video`` (frames, rate, jitter), ``input.image_size`` and
``augment.flip``; ``config_validate`` checks those keys before anything is read.
"""
from __future__ import annotations

import logging
import math
import os

import grain
import numpy as np

from maskfeat_jax.data import ava, video_decode
from maskfeat_jax.data.ava_geometry import eval_geometry, to_pixels, train_geometry
from maskfeat_jax.data.pipeline import read_batches
from maskfeat_jax.evaluators import ava_map

__all__ = ["VIDEO_EXTS", "AvaSource", "groundtruth", "decode_keyframe_clip", "AvaTrainMap", "AvaEvalMap",
           "eval_batches", "root", "train_source", "eval_source", "train_map", "eval_map"]

VIDEO_EXTS = ("mp4", "mkv", "webm")
_warned: set = set()


def _annotation(root: str, name: str) -> str:
    return os.path.join(os.fspath(root), ava.ANNOTATION_DIR, ava.FILES[name])


class AvaSource:
    """The keyframes of one split (module docstring); items ``{"video": path, "video_index",
    "second", "boxes" (N, 4) float32 normalised, "labels" (N, 80) uint8, "scores" (N,) float32
    (NaN for ground truth)}``, sorted by (video, second).

    ``videos`` names the split's videos, in ``video_index`` order; ``counts`` holds the
    reader's counts (:func:`ava.keyframes`) plus ``missing_videos`` / ``missing_keyframes``;
    ``max_boxes`` is the most boxes of any keyframe (the maps' ``max_boxes`` should cover it).

    ``detections=False`` trains on the ground truth alone (PySlowFast's default, an empty
    ``TRAIN_PREDICT_BOX_LISTS``); ``val`` always takes the detected boxes, so a val keyframe
    with none at or above ``score_thresh`` has no item (its ground truth counts as missed, as
    officially). ``second_stride=4`` is PySlowFast's in-training validation subset
    (``AVA.FULL_TEST_ON_VAL`` off). ValueError for an unknown split or one with no keyframe left."""

    def __init__(self, split: str, root: str, *, detections: bool = True,
                 score_thresh: float = ava.DETECTION_SCORE_THRESH, second_stride: int = 1,
                 video_dir: str | None = None):
        if split not in ("train", "val"):
            raise ValueError(f"AVA split must be 'train' or 'val', got {split!r}")
        video_dir = os.path.join(os.fspath(root), ava.VIDEO_DIR) if video_dir is None else os.fspath(video_dir)
        annotations, excluded = [], set()
        if split == "train":
            annotations.append(ava.read_annotations(_annotation(root, "train_groundtruth")))
        else:
            exclusions = _annotation(root, "val_exclusions")
            excluded = ava.read_exclusions(exclusions) if os.path.isfile(exclusions) else set()
        dets = [ava.read_detections(_annotation(root, f"{split}_detections"))] if detections or split == "val" else []
        records, counts = ava.keyframes(annotations, dets, score_thresh=score_thresh, excluded=excluded,
                                        second_stride=second_stride)
        paths = {}
        for name in sorted({video for video, _ in records}):
            found = [p for p in (os.path.join(video_dir, f"{name}.{e}") for e in VIDEO_EXTS) if os.path.isfile(p)]
            paths[name] = found[0] if found else None
        missing = sorted(name for name, p in paths.items() if p is None)
        if missing:
            logging.warning("AVA %s: skipping %d video(s) with no file under %s (first: %s)", split, len(missing),
                            video_dir, ", ".join(missing[:5]))
        self.videos = [name for name in paths if paths[name] is not None]
        index = {name: i for i, name in enumerate(self.videos)}
        self.items = [(paths[v], index[v], s, r) for (v, s), r in records.items() if v in index]
        self.counts = dict(counts, missing_videos=len(missing), missing_keyframes=len(records) - len(self.items))
        self.max_boxes = max((len(r.boxes) for *_, r in self.items), default=0)
        if not self.items:
            raise ValueError(f"AVA split {split!r} under {root!r} has no keyframes with a video ({self.counts})")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, video_index, second, record = self.items[i]
        return {"video": path, "video_index": video_index, "second": second, "boxes": record.boxes,
                "labels": record.labels, "scores": record.scores}


def groundtruth(root: str, split: str = "val") -> tuple[dict, list[int], set]:
    """What the evaluator needs from ``<root>/annotations``: ``({(video, second): (boxes, action
    ids)}`` of every ground-truth row (:func:`ava_map.per_frame`), the label map's class ids,
    and the excluded ``(video, second)`` keys); ``ava_map.frame_map`` takes them as they are."""
    rows = ava.read_annotations(_annotation(root, f"{split}_groundtruth"))
    exclusions = _annotation(root, "val_exclusions")
    excluded = ava.read_exclusions(exclusions) if split == "val" and os.path.isfile(exclusions) else set()
    gt = ava_map.per_frame(zip(rows.video, rows.second.tolist()), rows.boxes, rows.action)
    return gt, sorted(ava.read_label_map(_annotation(root, "label_map"))), excluded


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

def _frame_numbers(second, num_frames, sampling_rate, fps, native_fps, count) -> np.ndarray:
    """The video's frame numbers of the clip: timeline indices (:func:`ava.clip_indices` over
    the timeline's length) mapped by time to the video's own ``count`` frames."""
    ratio = native_fps / fps
    timeline = max(int(math.floor(count / ratio + 1e-6)), 1)
    index = ava.clip_indices(second, num_frames, sampling_rate, timeline, fps=fps)
    return np.minimum(np.floor(index * ratio + 1e-6).astype(np.int64), count - 1)


def decode_keyframe_clip(path, second: int, num_frames: int, sampling_rate: int, *, fps: float = ava.FPS,
                         short_side: int | None = None) -> tuple[np.ndarray, bool]:
    """``(clip (num_frames, H, W, 3) uint8, ok)``: the frames around keyframe ``second`` of the
    video at ``path`` (its frame 0 being second 900), on a timeline of ``fps`` frames per second
    (module docstring); ``short_side`` resizes as the Kinetics decoder. The frame count comes
    from the header, else from decoding. Any error (missing, corrupt, no video stream) gives
    ``(zeros, False)`` with ``H = W = short_side or 8`` and one warning per path."""
    try:
        with video_decode.open_container(path) as container:
            stream = video_decode.video_stream(container)
            native = video_decode.frame_rate(stream) or float(fps)
            count = video_decode.header_frame_count(container, stream, native)
            frames = None
            if count > 0:
                index = _frame_numbers(second, num_frames, sampling_rate, fps, native, count)
                frames = video_decode._read(container, stream, index, native, short_side, seek=True)
        if frames is None:      # no or wrong header count, or an untrustworthy seek: count, then read
            count = video_decode._count_frames(path)
            if count == 0:
                raise ValueError("no decodable video frames")
            index = _frame_numbers(second, num_frames, sampling_rate, fps, native, count)
            with video_decode.open_container(path) as container:
                frames = video_decode._read(container, video_decode.video_stream(container), index, native,
                                            short_side, seek=False)
            if frames is None:
                raise ValueError(f"stream ended before frame {int(index.max())} of {count}")
        return np.ascontiguousarray(frames, np.uint8), True
    except Exception as e:  # noqa: BLE001 - any undecodable video is skipped, never fatal
        name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else f"<{type(path).__name__}>"
        if name not in _warned:
            _warned.add(name)
            logging.warning("skipping undecodable AVA video %s: %s: %s", name, type(e).__name__, e)
        side = short_side or 8
        return np.zeros((num_frames, side, side, 3), np.uint8), False


# ---------------------------------------------------------------------------------------------
# Maps
# ---------------------------------------------------------------------------------------------

class _KeyframeClip:
    """What the train and eval maps share: decoding a keyframe's clip and packing fixed shapes."""

    def __init__(self, num_frames: int, sampling_rate: int, crop_size: int, max_boxes: int, *,
                 fps: float = ava.FPS, short_side: int | None = None):
        if min(num_frames, sampling_rate, crop_size, max_boxes) < 1:
            raise ValueError(f"num_frames, sampling_rate, crop_size and max_boxes must be >= 1, got "
                             f"{num_frames}, {sampling_rate}, {crop_size}, {max_boxes}")
        ava.clip_indices(ava.START_SECOND + 2, num_frames, sampling_rate, 10 ** 6)   # refuses a short window
        self.num_frames, self.sampling_rate, self.crop_size = num_frames, sampling_rate, crop_size
        self.max_boxes, self.fps, self.short_side = max_boxes, fps, short_side

    def _decode(self, element):
        frames, ok = decode_keyframe_clip(element["video"], int(element["second"]), self.num_frames,
                                          self.sampling_rate, fps=self.fps, short_side=self.short_side)
        return frames, to_pixels(element["boxes"], *frames.shape[1:3]), ok

    def blank(self, num_classes: int = ava.NUM_CLASSES) -> dict:
        """One padding row: zeros, ``valid=False``, no valid box (the eval map adds its keys, with
        ``video_index = second = -1``); also the shapes and dtypes of every row this map gives."""
        element = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros((0, num_classes), np.uint8),
                   "scores": np.zeros((0,), np.float32), "video_index": -1, "second": -1}
        return self._extras(element, self._pack(element, None, None, False, 0, 0))

    def _extras(self, element, out) -> dict:
        return out

    def _pack(self, element, frames, boxes, ok, clipped, outside) -> dict:
        b, labels = self.max_boxes, np.asarray(element["labels"])
        n = len(labels)
        keep = min(n, b) if ok else 0
        out_boxes = np.zeros((b, 4), np.float32)
        out_labels = np.zeros((b, labels.shape[1]), np.float32)
        if keep:
            out_boxes[:keep], out_labels[:keep] = boxes[:keep], labels[:keep]
        if not ok:
            frames = np.zeros((self.num_frames, self.crop_size, self.crop_size, 3), np.uint8)
        counts = (clipped, outside, max(n - b, 0)) if ok else (0, 0, 0)
        return {"image": frames, "boxes": out_boxes, "labels": out_labels, "box_valid": np.arange(b) < keep,
                "valid": np.bool_(ok), "num_boxes": np.int32(n), "boxes_clipped": np.int32(counts[0]),
                "boxes_outside": np.int32(counts[1]), "boxes_truncated": np.int32(counts[2])}


class AvaTrainMap(_KeyframeClip, grain.transforms.RandomMap):
    """A training keyframe (an :class:`AvaSource` item) to a fixed-shape clip with its boxes:
    decode, :func:`train_geometry`, pad (module docstring). ``jitter_scales`` default to the
    official (256, 320) for ``crop_size`` 224; a smaller crop scales them with it (the demo's
    64: (73, 91)). ``global_batch_size`` (optional) lets :func:`pipeline.train_stream` batch it."""

    num_sample = 1

    def __init__(self, num_frames: int, sampling_rate: int, crop_size: int = 224, max_boxes: int = 16, *,
                 jitter_scales=(256, 320), inverse_uniform: bool = True, flip_p: float = 0.5,
                 fps: float = ava.FPS, short_side: int | None = None, global_batch_size: int | None = None):
        super().__init__(num_frames, sampling_rate, crop_size, max_boxes, fps=fps, short_side=short_side)
        if not crop_size <= jitter_scales[0] <= jitter_scales[1]:
            raise ValueError(f"need crop_size={crop_size} <= jitter_scales[0] <= jitter_scales[1], got {jitter_scales}")
        self.jitter_scales, self.inverse_uniform, self.flip_p = tuple(jitter_scales), inverse_uniform, flip_p
        self.global_batch_size = global_batch_size

    def elements_per_batch(self, process_count: int) -> int:
        """Keyframes in one process's batch: ``global_batch_size / process_count``."""
        gb = self.global_batch_size
        if not gb or gb % int(process_count):
            raise ValueError(f"global_batch_size={gb} must be a positive multiple of {process_count} process(es)")
        return gb // int(process_count)

    def random_map(self, element, rng: np.random.Generator) -> dict:
        frames, boxes, ok = self._decode(element)
        clipped = outside = 0
        if ok:
            frames, boxes, clipped, outside = train_geometry(frames, boxes, rng, self.crop_size, self.jitter_scales,
                                                             inverse_uniform=self.inverse_uniform, flip_p=self.flip_p)
        return self._pack(element, frames, boxes, ok, clipped, outside)


class AvaEvalMap(_KeyframeClip, grain.transforms.Map):
    """A ``val`` keyframe to a fixed-shape clip: decode, :func:`eval_geometry`, pad; adds
    ``ori_boxes``, ``box_scores``, ``video_index`` and ``second`` (module docstring)."""

    def map(self, element) -> dict:
        frames, boxes, ok = self._decode(element)
        clipped = outside = 0
        if ok:
            frames, boxes, clipped, outside = eval_geometry(frames, boxes, self.crop_size)
        return self._extras(element, self._pack(element, frames, boxes, ok, clipped, outside))

    def _extras(self, element, out) -> dict:
        b, n = self.max_boxes, min(len(element["boxes"]), self.max_boxes)
        out["ori_boxes"] = np.zeros((b, 4), np.float32)
        out["ori_boxes"][:n] = element["boxes"][:n]
        out["box_scores"] = np.zeros((b,), np.float32)
        out["box_scores"][:n] = np.nan_to_num(element["scores"][:n])
        out["video_index"], out["second"] = np.int32(element["video_index"]), np.int32(element["second"])
        return out


def eval_batches(source, eval_map: AvaEvalMap, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1, worker_count: int = 0):
    """Yields batches covering this process's keyframes (``source[pi::pc]``) exactly once, read in
    ``worker_count`` grain workers; every process yields ``ceil(ceil(len / pc) / batch_size)``
    batches, the last ones padded with rows of zeros, ``valid=False``, no valid box and
    ``video_index = second = -1``."""
    pi, pc = int(process_index), int(process_count)
    ds = grain.MapDataset.source(source)[pi::pc].map(eval_map).batch(batch_size, drop_remainder=False)
    num_batches = math.ceil(math.ceil(len(source) / pc) / batch_size)
    blank = eval_map.blank(np.shape(source[0]["labels"])[1])
    read = read_batches(ds, worker_count if len(ds) else 0)
    try:
        for k in range(num_batches):
            batch = next(read) if k < len(ds) else {key: v[None][:0] for key, v in blank.items()}
            pad = batch_size - len(batch["valid"])
            if pad:
                batch = {key: np.concatenate([v, np.repeat(blank[key][None], pad, 0)]) for key, v in batch.items()}
            yield batch
    finally:
        read.close()


# ---------------------------------------------------------------------------------------------
# From the config (config.task = "detect")
# ---------------------------------------------------------------------------------------------

DEFAULT_DEMO_DIR = os.path.join(os.path.expanduser("~"), ".cache", "maskfeat_jax", "ava_demo")
_NEEDED = ("label_map", "train_groundtruth", "val_groundtruth", "val_detections")


def root(config) -> str:
    """The AVA folder: ``config.ava.root``; for ``input.dataset="ava_demo"`` the embedded demo,
    written there (default: a cache folder) on first use. A ValueError names the key when a file
    the run reads is not there."""
    if config.input.dataset == "ava_demo":
        from maskfeat_jax.data import make_ava_demo
        d = make_ava_demo.ensure_ava_demo(config.ava.root or DEFAULT_DEMO_DIR)
    else:
        d = config.ava.root
    needed = _NEEDED + (("train_detections",) if config.ava.train_detections else ())
    missing = [_annotation(d, name) for name in needed if not os.path.isfile(_annotation(d, name))]
    if missing:
        raise ValueError(f"config.ava.root={d!r}: {missing[0]!r} does not exist (the AVA folder holds "
                         f"{ava.ANNOTATION_DIR}/ with the v2.2 files and {ava.VIDEO_DIR}/ with the videos)")
    return d


def train_source(config) -> AvaSource:
    """The ``train`` keyframes: ground truth, plus the detected boxes at or above
    ``config.ava.detection_score_thresh`` when ``config.ava.train_detections``."""
    return AvaSource("train", root(config), detections=config.ava.train_detections,
                     score_thresh=config.ava.detection_score_thresh)


def eval_source(config) -> AvaSource:
    """The ``val`` keyframes with their detected boxes (every ``config.ava.eval_second_stride``-th second)."""
    return AvaSource("val", root(config), score_thresh=config.ava.detection_score_thresh,
                     second_stride=config.ava.eval_second_stride)


def train_map(config) -> AvaTrainMap:
    """The training map of ``config``: clips of ``video.num_frames`` x ``video.sampling_rate`` on a
    timeline of ``ava.fps``, the short side jittered in ``video.train_jitter_scales``, an
    ``input.image_size`` crop, a flip with ``augment.flip``, ``ava.max_boxes`` boxes."""
    lo, hi = config.video.train_jitter_scales
    return AvaTrainMap(config.video.num_frames, config.video.sampling_rate, config.input.image_size,
                       config.ava.max_boxes, jitter_scales=(int(lo), int(hi)),
                       flip_p=0.5 if config.augment.flip else 0.0, fps=config.ava.fps,
                       global_batch_size=config.input.global_batch_size)


def eval_map(config, max_boxes: int) -> AvaEvalMap:
    """The evaluation map of ``config`` with room for ``max_boxes`` boxes (the split's most: every
    box is scored)."""
    return AvaEvalMap(config.video.num_frames, config.video.sampling_rate, config.input.image_size,
                      max(int(max_boxes), 1), fps=config.ava.fps)
