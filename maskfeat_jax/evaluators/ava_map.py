"""AVA frame-mAP@0.5: Pascal VOC average precision per action class, meaned over the classes.

This is the ActivityNet AVA evaluation (``Evaluation/get_ava_performance.py`` and ``ava/``:
``object_detection_evaluation.py``, ``per_image_evaluation.py``, ``metrics.py``), which PySlowFast
vendors as ``ava_evaluation/`` and drives from ``slowfast/utils/ava_eval_helper.py`` (facts read
from their source, the code is written here). A "frame" is one (video, second) keyframe; a
detection is one (box, action class, score).

1. Only the classes of the label map count (60 of AVA's 80); other ground truth and detections
   are dropped. Keyframes listed as excluded are removed from both.
2. Per frame and class, detections are taken in order; each is paired with the ground-truth box
   of that class it overlaps most (IoU of ``x1 y1 x2 y2`` boxes, no +1 pixel); it is a true
   positive if that IoU is >= 0.5 and that box was not taken by an earlier detection, else a
   false positive. A detection does not fall back to its second-best box. Detections with
   ``x2 <= x1`` or ``y2 <= y1`` are dropped; those on frames with no ground truth are all false.
   The order within a frame depends on the ``protocol``:

   * ``"pyslowfast"`` (the default; what PySlowFast, and so the MaskFeat paper, reports):
     the order given (box by box, classes ascending), every detection kept;
   * ``"activitynet"``: the challenge script: the frame's detections sorted by descending
     score and only the top 50 kept.

3. Per class, all its detections are ranked by descending score (ties: the later one first, as
   the official reversed ascending sort gives on small inputs), precision and recall are taken
   at each rank, precision is made non-increasing from the right, and AP is the sum of
   precision times the recall step at every rank where recall grows (VOCdevkit's area).
4. A class with no ground truth (after exclusions) has AP NaN and is left out of the mean
   (the official ``np.nanmean``); a class with ground truth but no detections has AP 0.
"""
from __future__ import annotations

import collections
from typing import Hashable, Iterable, Mapping

import numpy as np

__all__ = ["PROTOCOLS", "per_frame", "detections_from_scores", "iou", "average_precision", "frame_map"]

PROTOCOLS = ("pyslowfast", "activitynet")
ACTIVITYNET_CAPACITY = 50     # detections kept per frame by get_ava_performance.py


def per_frame(keys: Iterable[Hashable], boxes, labels, scores=None) -> dict:
    """Flat rows grouped by frame key: ``{key: (boxes (n, 4), labels (n,))}``, with ``scores
    (n,)`` added when given (detections). Row order is kept within a frame."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    labels = np.asarray(labels, np.int64)
    columns = (boxes, labels) if scores is None else (boxes, labels, np.asarray(scores, np.float64))
    rows = collections.defaultdict(list)
    for i, key in enumerate(keys):
        rows[key].append(i)
    return {key: tuple(c[idx] for c in columns) for key, idx in rows.items()}


def detections_from_scores(keys: Iterable[Hashable], boxes_Rx4, scores_RxC, class_ids) -> dict:
    """Per-frame detections from a model's per-box class scores, as PySlowFast's
    ``get_ava_eval_data`` makes them: every box is one detection per evaluated class id
    (column ``id - 1`` of ``scores_RxC``), boxes in the order given, class ids ascending."""
    ids = np.asarray(sorted(class_ids), np.int64)
    boxes_Rx4, scores_RxC = np.asarray(boxes_Rx4, np.float64), np.asarray(scores_RxC, np.float64)
    keys = list(keys)
    rows = np.repeat(np.arange(len(keys)), len(ids))
    return per_frame([keys[r] for r in rows], boxes_Rx4[rows], np.tile(ids, len(keys)),
                     scores_RxC[:, ids - 1].reshape(-1))


def iou(a_Nx4, b_Mx4) -> np.ndarray:
    """(N, M) intersection over union of ``x1 y1 x2 y2`` boxes (continuous, no +1)."""
    a, b = a_Nx4[:, None, :], b_Mx4[None, :, :]
    inter = (np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
             * np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None))
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / (area(a) + area(b) - inter)


def average_precision(scores, is_tp, num_gt: int) -> float:
    """VOC AP of one class: NaN without ground truth, 0 without detections."""
    if num_gt == 0:
        return float("nan")
    order = np.argsort(np.asarray(scores), kind="stable")[::-1]
    hits = np.cumsum(np.asarray(is_tp, bool)[order])
    recall = np.concatenate([[0.0], hits / num_gt, [1.0]])
    precision = np.concatenate([[0.0], hits / np.arange(1, len(hits) + 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]      # non-increasing from the right
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def _true_positives(det_boxes, det_labels, gt_boxes, gt_labels, threshold: float) -> np.ndarray:
    """Which detections of one frame are true positives, taken in order (rule 2 above). A
    detection is one exactly when it is the first over ``threshold`` whose best box is that box."""
    tp = np.zeros(len(det_boxes), bool)
    if not len(det_boxes) or not len(gt_boxes):
        return tp
    overlap = np.where(det_labels[:, None] == gt_labels[None, :], iou(det_boxes, gt_boxes), -1.0)
    best = np.argmax(overlap, axis=1)
    hit = np.flatnonzero(overlap[np.arange(len(best)), best] >= threshold)
    _, first = np.unique(best[hit], return_index=True)
    tp[hit[first]] = True
    return tp


def frame_map(groundtruth: Mapping, detections: Mapping, class_ids, excluded=frozenset(), *,
              iou_threshold: float = 0.5, protocol: str = "pyslowfast") -> dict:
    """Frame-mAP of ``detections`` ``{key: (boxes, labels, scores)}`` against ``groundtruth``
    ``{key: (boxes, labels)}`` (see :func:`per_frame`) over the label map's ``class_ids``.
    Returns ``{"mAP": float, "ap": {class id: AP or NaN}, "num_gt": {class id: count}}``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    ids = np.asarray(sorted(class_ids), np.int64)
    gt, num_gt = {}, collections.Counter()
    for key, (boxes, labels) in groundtruth.items():
        if key in excluded:
            continue
        labels = np.asarray(labels, np.int64)
        keep = np.isin(labels, ids)
        gt[key] = (np.asarray(boxes, np.float64).reshape(-1, 4)[keep], labels[keep])
        num_gt.update(labels[keep].tolist())
    no_gt = (np.zeros((0, 4)), np.zeros(0, np.int64))
    scores, hits, classes = [], [], []
    for key, (boxes, labels, score) in detections.items():
        if key in excluded:
            continue
        boxes, labels = np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(labels, np.int64)
        score = np.asarray(score, np.float64)
        keep = np.flatnonzero(np.isin(labels, ids))
        if protocol == "activitynet":
            keep = keep[np.argsort(-score[keep], kind="stable")][:ACTIVITYNET_CAPACITY]
        keep = keep[(boxes[keep, 0] < boxes[keep, 2]) & (boxes[keep, 1] < boxes[keep, 3])]
        hits.append(_true_positives(boxes[keep], labels[keep], *gt.get(key, no_gt), iou_threshold))
        scores.append(score[keep])
        classes.append(labels[keep])
    scores, hits, classes = (np.concatenate(x) if x else np.zeros(0, d)
                             for x, d in ((scores, np.float64), (hits, bool), (classes, np.int64)))
    ap = {int(c): average_precision(scores[classes == c], hits[classes == c], num_gt[int(c)]) for c in ids}
    finite = [v for v in ap.values() if not np.isnan(v)]
    return {"mAP": float(np.mean(finite)) if finite else float("nan"), "ap": ap,
            "num_gt": {int(c): num_gt[int(c)] for c in ids}}
