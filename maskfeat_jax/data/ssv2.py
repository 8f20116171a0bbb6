"""Something-Something v2: the official label files, segment sampling, and clip decoding.

The files, as the dataset ships them and PySlowFast's ``slowfast/datasets/ssv2.py``
reads them (facts read from its source, the code is written here)::

    <data_dir>/something-something-v2-labels.json       {"Moving something up": "3", ...}
    <data_dir>/something-something-v2-train.json        [{"id": "78687", "label": "...",
    <data_dir>/something-something-v2-validation.json     "template": "Moving [something] up",
                                                          "placeholders": ["..."]}, ...]
    <data_dir>/20bn-something-something-v2/<id>.webm    the videos (VP9, 12 fps)
    <data_dir>/train.csv, val.csv                       optional PySlowFast frame lists

A video's class is its ``template`` with the brackets removed (``"Moving [something]
up"`` -> ``"Moving something up"``), looked up in the labels file: the free-text
``label`` names the objects and is not a class. The frame lists (``original_vido_id
video_id frame_id path labels``, space separated, one header line) list the frames
PySlowFast extracted at 30 fps; its SSv2 reader takes the class from the JSON and
ignores their ``labels`` column, and so does this one.

Sampling is not Kinetics' fixed-stride window: SSv2 actions are short and whole-video,
so ``num_frames`` frames are spread over the whole video, one per segment
(:func:`segment_indices`). ``DATA.SAMPLING_RATE`` plays no part. Segments are
fractions of the video, so decoding the 12 fps webm directly picks the same moments
as PySlowFast's 30 fps frames, to within a frame.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np

from maskfeat_jax.data import video_decode
from maskfeat_jax.data import video_transforms as VT

__all__ = ["LABELS_FILE", "ANNOTATION_FILES", "FRAME_LIST_FILES", "VIDEO_DIR", "template_key", "read_labels",
           "read_annotations", "read_frame_lists", "segment_indices", "video_records", "frame_records",
           "Ssv2Source", "decode_segments"]

LABELS_FILE = "something-something-v2-labels.json"
ANNOTATION_FILES = {"train": "something-something-v2-train.json",
                    "validation": "something-something-v2-validation.json"}
FRAME_LIST_FILES = {"train": "train.csv", "validation": "val.csv"}
VIDEO_DIR = "20bn-something-something-v2"
FRAME_LIST_HEADER = "original_vido_id"   # sic: the frame lists' first column, as PySlowFast checks it

_warned: set = set()


def _split(split: str) -> str:
    split = {"val": "validation", "valid": "validation"}.get(split, split)
    if split not in ANNOTATION_FILES:
        raise ValueError(f"SSv2 split must be 'train' or 'validation' (or 'val'), got {split!r}")
    return split


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None


def template_key(template: str) -> str:
    """The labels-file key of a template: its ``[`` and ``]`` removed, nothing else changed."""
    return template.replace("[", "").replace("]", "")


def read_labels(path: str) -> dict[str, int]:
    """``{template without brackets: class id}`` from ``something-something-v2-labels.json``,
    whose ids are strings (``"0"`` .. ``"173"``). ValueError naming the file and the key
    unless the file is one object of non-negative integer ids."""
    path = os.fspath(path)
    data = _load_json(path)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON object {{template: class id}}, "
                         f"got {type(data).__name__}")
    labels = {}
    for key, value in data.items():
        try:
            label = int(value) if not isinstance(value, (bool, float)) else None
        except (TypeError, ValueError):
            label = None
        if label is None or label < 0:
            raise ValueError(f"{path}: class id of {key!r} must be a non-negative integer, got {value!r}")
        labels[key] = label
    return labels


def read_annotations(path: str, labels: dict[str, int]) -> list[tuple[str, int]]:
    """``[(video id, class), ...]`` in file order from ``something-something-v2-train.json``
    or ``-validation.json``; the class is ``labels[template_key(template)]``.

    An entry that is not an object, lacks ``id`` or ``template``, or whose template is
    no class of ``labels`` raises ValueError naming the file, the entry's 0-based index
    and its id. (The test split's file has no templates; its answers ship separately.)
    """
    path = os.fspath(path)
    data = _load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of videos, got {type(data).__name__}")
    records = []
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {entry!r}")
        video_id, template = entry.get("id"), entry.get("template")
        if isinstance(video_id, bool) or not isinstance(video_id, (str, int)) or not str(video_id):
            raise ValueError(f"{where}: missing or invalid 'id': {entry!r}")
        where += f" (id {str(video_id)!r})"
        if not isinstance(template, str):
            raise ValueError(f"{where}: missing or invalid 'template': {entry!r}")
        key = template_key(template)
        if key not in labels:
            raise ValueError(f"{where}: template {template!r} ({key!r}) is not a class of the labels file")
        records.append((str(video_id), labels[key]))
    return records


def read_frame_lists(path: str, prefix: str = "") -> dict[str, list[str]]:
    """``{original_vido_id: [frame path, ...]}`` from a PySlowFast frame list, frames in
    file order, paths joined to ``prefix`` (PySlowFast's ``DATA.PATH_PREFIX``) when given.

    The first line must be the header (it starts with ``original_vido_id``); every other
    non-blank line has exactly 5 whitespace-separated fields, else ValueError naming the
    file and the 1-based line number. The ``labels`` column is not read (SSv2's classes
    come from the JSON files).
    """
    path = os.fspath(path)
    frames: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        header = f.readline()
        if not header.startswith(FRAME_LIST_HEADER):
            raise ValueError(f"{path}:1: expected the header 'original_vido_id video_id frame_id path labels', "
                             f"got {header.strip()!r}")
        for lineno, line in enumerate(f, start=2):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 5:
                raise ValueError(f"{path}:{lineno}: expected 5 fields 'original_vido_id video_id frame_id "
                                 f"path labels', got {len(fields)}: {line.strip()!r}")
            frames.setdefault(fields[0], []).append(os.path.join(prefix, fields[3]) if prefix else fields[3])
    return frames


def segment_indices(num_video_frames: int, num_frames: int, *, training: bool,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """The ``num_frames`` frame indices (int64) of one SSv2 clip, PySlowFast's ``get_seq_frames``.

    With ``seg = (n - 1) / num_frames`` for a video of ``n`` frames, segment ``i`` spans
    ``[round(seg * i), round(seg * (i + 1))]`` (``np.round``: halves to even, so ``2.5``
    rounds to 2), both ends included; neighbouring segments share their boundary frame.
    Training draws one index uniformly in each segment (from ``rng``), evaluation takes
    ``(start + end) // 2``. Every test view of a video gets these same indices: the
    views of PySlowFast's SSv2 test differ only in their spatial crop. A video shorter
    than ``num_frames`` repeats frames.
    """
    if num_video_frames < 1:
        raise ValueError(f"num_video_frames must be >= 1, got {num_video_frames!r}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames!r}")
    if training and rng is None:
        raise ValueError("training sampling needs an rng")
    seg = (num_video_frames - 1) / num_frames
    bounds = np.round(seg * np.arange(num_frames + 1)).astype(np.int64)
    start, end = bounds[:-1], bounds[1:]
    if training:
        return rng.integers(start, end + 1).astype(np.int64)
    return (start + end) // 2


def _annotations(data_dir: str, split: str) -> list[tuple[str, int]]:
    labels = read_labels(os.path.join(data_dir, LABELS_FILE))
    return read_annotations(os.path.join(data_dir, ANNOTATION_FILES[_split(split)]), labels)


def _report_missing(what: str, missing: list[str], where: str) -> None:
    if missing:
        logging.warning("SSv2: skipping %d video(s) of %s with no %s (first: %s)", len(missing), where, what,
                        ", ".join(missing[:5]))


def video_records(data_dir: str, split: str, video_root: str | None = None,
                  exts: tuple[str, ...] = ("webm", "mp4")) -> tuple[list[tuple[str, int]], int]:
    """``([(video path, class), ...], missing)`` of ``split``'s annotated videos.

    A video is ``<video_root>/<id>.<ext>`` with the first of ``exts`` that exists
    (``video_root`` defaults to ``<data_dir>/20bn-something-something-v2``, the
    dataset's archive folder). A video with no file is skipped and counted in
    ``missing`` (logged once with its first ids), as one that failed to download.
    """
    items = _annotations(data_dir, split)
    root = os.path.join(data_dir, VIDEO_DIR) if video_root is None else video_root
    records, missing = [], []
    for video_id, label in items:
        paths = [os.path.join(root, f"{video_id}.{ext}") for ext in exts]
        found = next((p for p in paths if os.path.isfile(p)), None)
        if found is None:
            missing.append(video_id)
        else:
            records.append((found, label))
    _report_missing("file under " + root, missing, ANNOTATION_FILES[_split(split)])
    return records, len(missing)


def frame_records(data_dir: str, split: str, prefix: str = "") -> tuple[list[tuple[list[str], int]], int]:
    """``([(frame paths, class), ...], missing)``: ``split``'s annotated videos read from the
    frame list ``<data_dir>/train.csv`` or ``val.csv`` (:func:`read_frame_lists`), as
    PySlowFast's SSv2 loader reads them. A video absent from the frame list is skipped
    and counted (frame files themselves are not checked here)."""
    items = _annotations(data_dir, split)
    frame_lists = read_frame_lists(os.path.join(data_dir, FRAME_LIST_FILES[_split(split)]), prefix)
    records = [(frame_lists[v], label) for v, label in items if v in frame_lists]
    missing = [v for v, _ in items if v not in frame_lists]
    _report_missing("frame list", missing, ANNOTATION_FILES[_split(split)])
    return records, len(missing)


class Ssv2Source:
    """Random-access source of one SSv2 split; items ``{"video": path or [frame paths],
    "label": int}``, the same item layout as the Kinetics CSV source.

    Videos by default (:func:`video_records`); with ``frame_prefix`` set, frames from the
    PySlowFast frame lists (:func:`frame_records`; ``""`` keeps the lists' paths as
    they are). ``num_classes`` is the labels file's (174 for SSv2), ``missing`` the
    videos skipped. A split with no video left raises ValueError.
    """

    def __init__(self, data_dir: str, split: str, *, video_root: str | None = None,
                 frame_prefix: str | None = None):
        data_dir = os.fspath(data_dir)
        if frame_prefix is None:
            self.items, self.missing = video_records(data_dir, split, video_root)
        else:
            self.items, self.missing = frame_records(data_dir, split, frame_prefix)
        self.num_classes = max(read_labels(os.path.join(data_dir, LABELS_FILE)).values()) + 1
        if not self.items:
            raise ValueError(f"SSv2 split {split!r} under {data_dir!r} has no videos ({self.missing} missing)")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        video, label = self.items[i]
        return {"video": video, "label": label}


def _decode_video(path, num_frames, training, rng, short_side) -> np.ndarray:
    """Every frame is decoded (SSv2 clips are a few seconds long, and the segments span all
    of them); only the sampled ones are converted. Counting by decoding also gives the
    exact length that a webm header, which stores only a duration, does not."""
    with video_decode.open_container(path) as container:
        stream = video_decode.video_stream(container)
        decoded = list(container.decode(stream))
    if not decoded:
        raise ValueError("no decodable video frames")
    index = segment_indices(len(decoded), num_frames, training=training, rng=rng)
    return np.stack([video_decode._to_rgb(decoded[int(i)], short_side) for i in index])


def _load_frames(paths, num_frames, training, rng, short_side) -> np.ndarray:
    from PIL import Image
    index = segment_indices(len(paths), num_frames, training=training, rng=rng)
    frames = []
    for i in index:
        with Image.open(paths[int(i)]) as image:
            frames.append(np.asarray(image.convert("RGB")))
    clip = np.stack(frames)
    return clip if short_side is None else VT.resize_short_side(clip, short_side)


def _video_name(video) -> str:
    """What a warning calls ``video``: its path, its first frame's path, or its type (bytes)."""
    if isinstance(video, (list, tuple)):
        return str(video[0]) if video else "<empty frame list>"
    return os.fspath(video) if isinstance(video, (str, os.PathLike)) else f"<{type(video).__name__}>"


def decode_segments(video, num_frames: int, *, training: bool, rng: np.random.Generator | None = None,
                    short_side: int | None = None) -> tuple[np.ndarray, bool]:
    """One clip ``(num_frames, H, W, 3)`` uint8 sampled by :func:`segment_indices`.

    ``video`` is a path (or the file's bytes) decoded with PyAV, or a list of frame image
    paths (a frame-list record). ``short_side`` resizes every frame as the Kinetics
    decoder does. Any error (missing, corrupt or empty video, unreadable frame) returns
    ``(zeros, False)`` with ``H = W = short_side or 8`` and logs one warning per video,
    so a bad video is skipped in the pipeline's workers, never fatal.
    """
    if training and rng is None:
        raise ValueError("training sampling needs an rng")
    try:
        if isinstance(video, (list, tuple)):
            clip = _load_frames(video, num_frames, training, rng, short_side)
        else:
            clip = _decode_video(video, num_frames, training, rng, short_side)
        return np.ascontiguousarray(clip, dtype=np.uint8), True
    except Exception as e:  # noqa: BLE001 - any unreadable video is skipped, never fatal
        name = _video_name(video)
        if name not in _warned:
            _warned.add(name)
            logging.warning("skipping unreadable SSv2 video %s: %s: %s", name, type(e).__name__, e)
        side = short_side or 8
        return np.zeros((num_frames, side, side, 3), np.uint8), False
