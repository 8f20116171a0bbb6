"""AVA v2.2 action detection: the official files, keyframe records, and clip frame indices.

The files, as the dataset ships them and PySlowFast reads them (``slowfast/datasets/ava_helper.py``,
``ava_dataset.py``; facts read from its source, the code is written here)::

    ava_train_v2.2.csv, ava_val_v2.2.csv    video_id,second,x1,y1,x2,y2,action_id,person_id
    *_predicted_boxes.csv,                  video_id,second,x1,y1,x2,y2,action_id or "",score
      ava_detection_*_boxes_and_labels*.csv
    ava_action_list_v2.2_for_activitynet_2019.pbtxt   item { name: "..." id: N }, 60 items
    ava_val_excluded_timestamps_v2.2.csv    video_id,second

Boxes are ``x1, y1, x2, y2`` normalised to [0, 1]; actions are 1-based ids of 80 classes, of
which the label map lists the 60 that are evaluated. A row is one (box, action) pair: a box with
several actions appears once per action, and :func:`keyframes` merges those rows into one box
with a multi-hot label (rows merge when their four coordinate fields read the same, as the
official loader keys them). A detected box with no action (an empty field) is a negative: kept,
with an all-zero label.

Which boxes a split uses (official rules):

* training: the ground-truth boxes, plus detected boxes scoring at least
  :data:`DETECTION_SCORE_THRESH` (0.8 in ``configs/AVA/*.yaml``; the library default in
  ``defaults.py`` is 0.9) from the listed detection files;
* evaluation: detected boxes at or above the threshold only; the ground truth goes to the
  evaluator (``maskfeat_jax.evaluators.ava_map``), not to the model.

Only keyframes at seconds :data:`VALID_SECONDS` (902..1798, ``AVA_VALID_FRAMES``) are used.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
from typing import Iterable

import numpy as np

__all__ = ["FPS", "VALID_SECONDS", "NUM_CLASSES", "DETECTION_SCORE_THRESH", "ANNOTATION_DIR", "VIDEO_DIR", "FILES",
           "BoxRows", "Keyframe", "read_label_map", "read_exclusions", "read_annotations", "read_detections",
           "keyframes", "keyframe_index", "clip_indices"]

FPS = 30                             # AVA frames are extracted at 30 fps
VALID_SECONDS = range(902, 1799)     # annotated keyframes: seconds 902..1798 of each movie
START_SECOND = 900                   # the extracted frames start at 15:00 (frame 0 is second 900)
NUM_CLASSES = 80                     # action ids 1..80; the model predicts all 80
DETECTION_SCORE_THRESH = 0.8         # AVA.DETECTION_SCORE_THRESH in configs/AVA/*.yaml

# PySlowFast's AVA folder (DATASET.md): <root>/annotations/<FILES>, and the movies cut to their
# 15:00-30:00 minutes (frame 0 is second 900) as <root>/videos_15min/<video_id>.<ext>.
ANNOTATION_DIR = "annotations"
VIDEO_DIR = "videos_15min"

FILES = {
    "train_groundtruth": "ava_train_v2.2.csv",
    "val_groundtruth": "ava_val_v2.2.csv",
    "label_map": "ava_action_list_v2.2_for_activitynet_2019.pbtxt",
    "val_exclusions": "ava_val_excluded_timestamps_v2.2.csv",
    # The person detections the official configs train and evaluate with.
    "train_detections": "person_box_67091280_iou90/ava_detection_train_boxes_and_labels_include_negative_v2.2.csv",
    "val_detections": "person_box_67091280_iou90/ava_detection_val_boxes_and_labels.csv",
}


@dataclasses.dataclass
class BoxRows:
    """The rows of one box CSV, column by column, in file order.

    ``boxes`` are clipped to [0, 1]; ``clipped`` counts the rows that needed it. ``box_keys``
    is each row's four coordinate fields as written, which is what identifies a box.
    ``action`` is -1 where the field was empty; ``value`` is the person id (annotations) or
    the detector score (detections)."""
    path: str
    video: list
    second: np.ndarray     # (N,) int64
    boxes: np.ndarray      # (N, 4) float32, x1 y1 x2 y2 in [0, 1]
    box_keys: list
    action: np.ndarray     # (N,) int64, 1..80 or -1
    value: np.ndarray      # (N,) float64
    clipped: int

    def __len__(self) -> int:
        return len(self.video)


@dataclasses.dataclass
class Keyframe:
    """The boxes of one (video, second) and their multi-hot action labels (column ``id - 1``);
    ``scores`` is each box's detector score, NaN for a ground-truth box (the highest score
    when several detection rows give the same box)."""
    boxes: np.ndarray      # (N, 4) float32
    labels: np.ndarray     # (N, NUM_CLASSES) uint8
    scores: np.ndarray | None = None     # (N,) float32


def _lines(path: str) -> Iterable[tuple[int, str]]:
    """(1-based line number, stripped line) for every non-blank line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if line:
                yield number, line


def _read_box_csv(path: str, detections: bool) -> BoxRows:
    path = os.fspath(path)
    video, second, boxes, keys, action, value = [], [], [], [], [], []
    widths = (8,) if detections else (7, 8)
    for number, line in _lines(path):
        where = f"{path}:{number}"
        row = line.split(",")
        if len(row) not in widths:
            raise ValueError(f"{where}: expected {' or '.join(map(str, widths))} comma-separated fields, "
                             f"got {len(row)}: {line!r}")
        try:
            sec = int(row[1])
            box = [float(v) for v in row[2:6]]
            negative = detections and row[6].strip() in ("", "-1")     # a detected box with no action
            act = -1 if negative else int(row[6])
            val = float(row[7]) if len(row) == 8 else math.nan
        except ValueError:
            raise ValueError(f"{where}: a field is not a number where one is expected: {line!r}") from None
        if not row[0] or not all(map(math.isfinite, box + ([val] if detections else []))):
            raise ValueError(f"{where}: empty video id or non-finite number: {line!r}")
        if not negative and not 1 <= act <= NUM_CLASSES:
            raise ValueError(f"{where}: action id {act} is outside 1..{NUM_CLASSES}")
        video.append(row[0])
        second.append(sec)
        boxes.append(box)
        keys.append(",".join(v.strip() for v in row[2:6]))
        action.append(act)
        value.append(val)
    raw = np.asarray(boxes, np.float64).reshape(-1, 4)
    clipped = np.clip(raw, 0.0, 1.0)
    return BoxRows(path, video, np.asarray(second, np.int64), clipped.astype(np.float32), keys,
                   np.asarray(action, np.int64), np.asarray(value, np.float64),
                   int(np.any(clipped != raw, axis=1).sum()))


def read_annotations(path: str) -> BoxRows:
    """Ground-truth rows (``ava_{train,val}_v2.2.csv``): 8 fields, or 7 without the person id.
    A malformed line raises ValueError naming the file and line number."""
    return _read_box_csv(path, detections=False)


def read_detections(path: str) -> BoxRows:
    """Detected person boxes: 8 fields, the action possibly empty, the score last. A malformed
    line raises ValueError naming the file and line number."""
    return _read_box_csv(path, detections=True)


_NAME = re.compile(r'^name:\s*"([^"]*)"$')
_ID = re.compile(r"^(?:label_)?id:\s*(\d+)$")


def read_label_map(path: str) -> dict[int, str]:
    """``{action id: name}`` in file order from the label map pbtxt (the evaluated classes).
    ValueError naming the file and line for anything but ``item {``, ``name: "..."``,
    ``id: N`` (or ``label_id: N``) and ``}``, or for an item without one name and one new id."""
    path = os.fspath(path)
    classes, item = {}, None
    for number, line in _lines(path):
        where = f"{path}:{number}"
        name, class_id = _NAME.match(line), _ID.match(line)
        if item is None and re.match(r"^item\s*\{$", line):
            item = {}
        elif item is not None and line == "}":
            if set(item) != {"name", "id"} or item["id"] in classes:
                raise ValueError(f"{where}: an item needs one name and one id not seen before, got {item}")
            classes[item["id"]] = item["name"]
            item = None
        elif item is not None and (name or class_id):
            field = "name" if name else "id"
            if field in item:
                raise ValueError(f"{where}: a second {field} in one item")
            item[field] = name.group(1) if name else int(class_id.group(1))
        else:
            raise ValueError(f"{where}: unexpected line in the label map: {line!r}")
    if item is not None:
        raise ValueError(f"{path}: the last item is not closed")
    return classes


def read_exclusions(path: str) -> set[tuple[str, int]]:
    """``{(video id, second)}`` from the excluded-timestamps CSV (``video_id,second``)."""
    path = os.fspath(path)
    excluded = set()
    for number, line in _lines(path):
        row = line.split(",")
        try:
            if len(row) != 2 or not row[0]:
                raise ValueError
            excluded.add((row[0], int(row[1])))
        except ValueError:
            raise ValueError(f"{path}:{number}: expected video_id,second: {line!r}") from None
    return excluded


def keyframes(annotations: Iterable[BoxRows] = (), detections: Iterable[BoxRows] = (), *,
              score_thresh: float = DETECTION_SCORE_THRESH, excluded: set = frozenset(),
              second_stride: int = 1) -> tuple[dict[tuple[str, int], Keyframe], dict[str, int]]:
    """Keyframe records ``{(video, second): Keyframe}`` sorted by key, and counts of what was
    used and dropped. Training passes ``annotations`` and ``detections``; evaluation passes
    ``detections`` only. Detected boxes below ``score_thresh`` are dropped (the official
    ``score < thresh`` test). Rows outside :data:`VALID_SECONDS` are dropped and counted (the
    official loader has no slot for them). ``excluded`` keys are dropped: the official loader
    keeps them and the evaluator ignores them, so dropping them early saves their compute
    and changes no score. ``second_stride=4`` is the official loader's in-training ``val``
    subsampling (seconds divisible by 4; off with ``AVA.FULL_TEST_ON_VAL``)."""
    merged: dict = collections.defaultdict(dict)
    counts = collections.Counter(rows=0, clipped=0, below_threshold=0, outside_valid=0, excluded=0)
    sources = [(r, False) for r in annotations] + [(r, True) for r in detections]
    for rows, is_detection in sources:
        counts["clipped"] += rows.clipped
        for i in range(len(rows)):
            key = (rows.video[i], int(rows.second[i]))
            if is_detection and rows.value[i] < score_thresh:
                counts["below_threshold"] += 1
            elif key[1] not in VALID_SECONDS:
                counts["outside_valid"] += 1
            elif key in excluded:
                counts["excluded"] += 1
            elif key[1] % second_stride == 0:
                counts["rows"] += 1
                box = merged[key].setdefault(rows.box_keys[i], [rows.boxes[i], set(), math.nan])
                if rows.action[i] > 0:
                    box[1].add(int(rows.action[i]))
                if is_detection:
                    box[2] = float(np.fmax(box[2], rows.value[i]))
    records = {}
    for key in sorted(merged):
        boxes = list(merged[key].values())
        labels = np.zeros((len(boxes), NUM_CLASSES), np.uint8)
        for j, (_, actions, _) in enumerate(boxes):
            labels[j, [a - 1 for a in actions]] = 1
        records[key] = Keyframe(np.stack([b[0] for b in boxes]).astype(np.float32), labels,
                                np.asarray([b[2] for b in boxes], np.float32))
    counts.update(keyframes=len(records), boxes=sum(len(r.boxes) for r in records.values()))
    return records, dict(counts)


def keyframe_index(second: int, *, fps: int = FPS, start_second: int = START_SECOND) -> int:
    """The frame index of a keyframe: ``(second - 900) * 30`` in the official frame dumps, which
    start at second 900; ``start_second=0`` for frames decoded from the start of the movie."""
    return (second - start_second) * fps


def clip_indices(second: int, num_frames: int, sampling_rate: int, video_frames: int, *,
                 fps: int = FPS, start_second: int = START_SECOND) -> np.ndarray:
    """Frame indices of the clip around a keyframe, as the official loader takes them: from
    ``centre - L // 2`` up to (not including) ``centre + L // 2`` every ``sampling_rate``
    frames, ``L = num_frames * sampling_rate``, each clamped into ``[0, video_frames - 1]``
    (the clip repeats the first or last frame at the video's ends).

    With ``sampling_rate == 1`` and an odd ``num_frames`` that window holds one frame too few;
    the model needs a fixed length, so that case is refused."""
    half = num_frames * sampling_rate // 2
    centre = keyframe_index(second, fps=fps, start_second=start_second)
    idx = np.arange(centre - half, centre + half, sampling_rate)
    if len(idx) != num_frames:
        raise ValueError(f"num_frames={num_frames} at sampling_rate={sampling_rate} gives {len(idx)} frames "
                         f"with the official window; use an even num_frames * sampling_rate or a rate > 1")
    return np.clip(idx, 0, video_frames - 1)
