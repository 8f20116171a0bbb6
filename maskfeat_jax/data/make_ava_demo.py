"""The embedded AVA-like dataset: moving digits as "persons", in AVA v2.2's own file formats.

    python -m maskfeat_jax.data.make_ava_demo --out DIR [--num_train 8 --num_val 4 \\
        --seconds 10 --size 64 --seed 0]

writes what :class:`maskfeat_jax.data.ava_maps.AvaSource` reads, laid out as PySlowFast's
AVA folder (``annotations/``; videos as ``videos_15min/``, the 15-minute cuts its frames are
extracted from)::

    DIR/videos_15min/<video_id>.mp4                 seconds 900 .. 900 + seconds, FPS = 6
    DIR/annotations/ava_train_v2.2.csv              video_id,second,x1,y1,x2,y2,action_id,person_id
    DIR/annotations/ava_val_v2.2.csv
    DIR/annotations/person_box_67091280_iou90/ava_detection_train_boxes_and_labels_include_negative_v2.2.csv
    DIR/annotations/person_box_67091280_iou90/ava_detection_val_boxes_and_labels.csv
    DIR/annotations/ava_val_excluded_timestamps_v2.2.csv     two val keyframes
    DIR/annotations/ava_action_list_v2.2_for_activitynet_2019.pbtxt   written last

**Timeline.** A video's frame 0 is second 900 and it runs at :data:`FPS` (6) frames per second,
so keyframe second ``s`` is frame ``(s - 900) * FPS``, the official convention at the demo's
rate: readers pass ``fps=FPS`` to :func:`ava.keyframe_index` / :func:`ava.clip_indices`
(``sampling_rate`` then counts demo frames). Keyframes are seconds 902 .. 900 + seconds - 2.

**Content.** Video ``i`` shows ``1 + i % 3`` persons: scikit-learn digits (train videos use the
digits' train images, val videos the held-out fifth), each drawn as a ``3/4 h x h`` sprite
(``h = 5/16`` of the frame) in its own colour channel (person id ``p`` is channel ``p``;
overlaps take the brighter pixel), so a person can be told apart from the others in every
frame. Each second ``s`` owns the frames ``[(s - 900) * FPS - FPS // 2, ... + FPS)`` around its
keyframe; within them a person moves at a constant ``size / 32`` pixels per frame in one of
eight directions, or stands still (one in five); a move that would leave the frame is turned
back. A person's box at keyframe ``s`` is its sprite's bounds at the keyframe frame, and its
actions (:data:`ACTIONS`, multi-label) say what it does in that second: moving left/right
and/or up/down (diagonal moves have two), or standing still; and whether its digit is even
or odd. The label map lists :data:`EVALUATED` (1..6): like AVA's 60 of 80, class 7 is
annotated and trained on but not evaluated.

**Detections**, as a person detector's, from the same seed: per val keyframe, each person is
found with probability 0.9 (box jittered by ~1.5% of the frame, score in [0.8, 1)) and
otherwise scores below :data:`ava.DETECTION_SCORE_THRESH`; a false box is added with
probability 0.4 (score in [0.5, 0.95): some above the threshold). Val rows have no action,
as the official val detection file. The train file ("include negative") has jittered boxes
of half the persons with their actions, and false boxes with no action (negatives). The
excluded keyframes keep their ground-truth and detection rows, so readers must drop them.

Encoded with PyAV as mp4 (the Kinetics demo's codec: libx264, else h264, else mpeg4);
everything is drawn from ``--seed`` and the files are byte-identical from run to run. The
defaults take about a second.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from maskfeat_jax import storage
from maskfeat_jax.data import ava, make_video_demo, sources

__all__ = ["FPS", "ACTIONS", "EVALUATED", "keyframe_seconds", "video_ids",
           "render_people", "actions_of", "make_ava_demo", "ensure_ava_demo", "main"]

FPS = 6                          # the demo videos' frame rate: pass fps=FPS to the clip index functions
ACTIONS = {1: "move left", 2: "move right", 3: "move up", 4: "move down", 5: "stand still",
           6: "even digit", 7: "odd digit"}
EVALUATED = (1, 2, 3, 4, 5, 6)   # the label map's classes; 7 is annotated, not evaluated
_DIRECTIONS = [(dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dx or dy]   # (dx, dy), y down
_STILL_P, _FOUND_P, _FALSE_P, _TRAIN_DET_P = 0.2, 0.9, 0.4, 0.5


def keyframe_seconds(seconds: int) -> range:
    """The annotated seconds of a demo video ``seconds`` long: 902 .. 900 + seconds - 2."""
    return range(ava.START_SECOND + 2, ava.START_SECOND + seconds - 1)


def video_ids(split: str, count: int) -> list[str]:
    """``train000``, ``train001``, ... (``val000``, ...): the demo's video ids."""
    return [f"{split}{i:03d}" for i in range(count)]


def render_people(digits, rng: np.random.Generator, seconds: int, size: int):
    """``(clip, boxes, motion)`` for one video of ``len(digits)`` (at most 3) persons:
    ``clip (seconds * FPS, size, size, 3)`` uint8; ``boxes (P, frames, 4)`` int, each person's
    sprite bounds ``x1 y1 x2 y2`` in pixels per frame; ``motion (P, seconds + 1, 2)`` int, the
    ``(dx, dy)`` signs of each second's move (module docstring)."""
    if not 1 <= len(digits) <= 3:
        raise ValueError(f"1 to 3 persons (one colour channel each), got {len(digits)}")
    frames, h = seconds * FPS, size * 5 // 16
    w, speed = h * 3 // 4, size / 32
    room = np.array([size - w, size - h], np.float64)
    clip = np.zeros((frames, size, size, 3), np.uint8)
    boxes = np.zeros((len(digits), frames, 4), np.int64)
    motion = np.zeros((len(digits), seconds + 1, 2), np.int64)
    for p, digit in enumerate(digits):
        ink = np.asarray(Image.fromarray(np.ascontiguousarray(digit[..., 0])).resize((w, h), Image.Resampling.BICUBIC),
                         np.float32)
        sprite = np.clip(ink * rng.uniform(0.7, 1.0), 0, 255).astype(np.uint8)
        pos = rng.uniform(0, 1, 2) * room                                  # (x, y) of the top-left corner
        for s in range(seconds + 1):
            lo = max(s * FPS - FPS // 2, 0)
            hi = min(s * FPS - FPS // 2 + FPS, frames)
            v = np.zeros(2) if rng.random() < _STILL_P else np.array(_DIRECTIONS[rng.integers(len(_DIRECTIONS))], float)
            end = pos + v * speed * max(hi - lo, 0)
            v[(end < 0) | (end > room)] *= -1                              # turned back at the border
            motion[p, s] = v
            for f in range(lo, hi):
                x, y = (int(round(c)) for c in pos)
                boxes[p, f] = x, y, x + w, y + h
                clip[f, y:y + h, x:x + w, p] = np.maximum(clip[f, y:y + h, x:x + w, p], sprite)
                pos = np.clip(pos + v * speed, 0, room)
    return clip, boxes, motion


def actions_of(move, digit: int) -> list[int]:
    """The action ids of a person moving ``move = (dx, dy)`` (signs) who shows ``digit``."""
    dx, dy = (int(np.sign(m)) for m in move)
    acts = [a for a, hit in ((1, dx < 0), (2, dx > 0), (3, dy < 0), (4, dy > 0), (5, dx == dy == 0)) if hit]
    return acts + [6 if digit % 2 == 0 else 7]


def _box_text(box) -> str:
    return ",".join(f"{v:.3f}" for v in box)


def _jitter(box, rng) -> np.ndarray:
    """``box`` (normalised) moved by ~1.5% of the frame per coordinate, kept a valid box inside [0, 1]."""
    j = np.clip(np.asarray(box) + rng.normal(0, 0.015, 4), 0, 1)
    return np.array([min(j[0], j[2] - 0.02), min(j[1], j[3] - 0.02), max(j[2], j[0] + 0.02), max(j[3], j[1] + 0.02)])


def _false_box(rng) -> np.ndarray:
    x, y = rng.uniform(0, 0.7, 2)
    return np.array([x, y, x + rng.uniform(0.15, 0.3), y + rng.uniform(0.2, 0.3)])


def _write_lines(path: str, lines: list[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with storage.atomic_write(path) as f:      # a file exists only whole
        f.writelines(line + "\n" for line in lines)


def _split(out, split, count, seconds, size, rng, codec, options):
    """Writes ``split``'s videos; returns its ground-truth and detection rows."""
    src = sources.DigitsSource("train" if split == "train" else "validation")
    gt, det = [], []
    for i, vid in enumerate(video_ids(split, count)):
        picks = rng.integers(len(src), size=1 + i % 3)
        clip, boxes, motion = render_people(src.images[picks], rng, seconds, size)
        make_video_demo.encode(os.path.join(out, ava.VIDEO_DIR, f"{vid}.mp4"), clip, codec, options, fps=FPS)
        for sec in keyframe_seconds(seconds):
            s, frame = sec - ava.START_SECOND, (sec - ava.START_SECOND) * FPS
            people = [(boxes[p, frame] / size, actions_of(motion[p, s], int(src.labels[k])))
                      for p, k in enumerate(picks)]
            for p, (box, acts) in enumerate(people):
                gt += [f"{vid},{sec:04d},{_box_text(box)},{a},{p}" for a in acts]
            if split == "train":
                for box, acts in people:
                    if rng.random() < _TRAIN_DET_P:
                        text, score = _box_text(_jitter(box, rng)), rng.uniform(0.8, 1.0)
                        det += [f"{vid},{sec:04d},{text},{a},{score:.6f}" for a in acts]
                if rng.random() < _FALSE_P:
                    det.append(f"{vid},{sec:04d},{_box_text(_false_box(rng))},,{rng.uniform(0.5, 1.0):.6f}")
            else:
                for box, _ in people:
                    score = rng.uniform(0.8, 1.0) if rng.random() < _FOUND_P else rng.uniform(0.3, 0.79)
                    det.append(f"{vid},{sec:04d},{_box_text(_jitter(box, rng))},,{score:.6f}")
                if rng.random() < _FALSE_P:
                    det.append(f"{vid},{sec:04d},{_box_text(_false_box(rng))},,{rng.uniform(0.5, 0.95):.6f}")
    return gt, det


def make_ava_demo(out: str, *, num_train: int = 8, num_val: int = 4, seconds: int = 10, size: int = 64,
                  seed: int = 0) -> str:
    """Writes the demo videos and annotation files under ``out``; returns ``out``."""
    if size < 32 or size % 2:
        raise ValueError(f"size must be an even int >= 32 (yuv420p, sprites of 5/16 of it), got {size!r}")
    if seconds < 5:
        raise ValueError(f"seconds must be >= 5 (keyframes 902 .. 900 + seconds - 2), got {seconds!r}")
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")
    codec, options = make_video_demo.pick_codec()
    print(f"writing {num_train + num_val} AVA-like demo videos to {out} (once, ~1 s)", flush=True)
    ann = os.path.join(out, ava.ANNOTATION_DIR)
    rows = {}
    for split, count in (("train", num_train), ("val", num_val)):
        rng = np.random.default_rng((seed, 0 if split == "train" else 1))
        rows[split] = _split(out, split, count, seconds, size, rng, codec, options)
        _write_lines(os.path.join(ann, ava.FILES[f"{split}_groundtruth"]), rows[split][0])
        _write_lines(os.path.join(ann, ava.FILES[f"{split}_detections"]), rows[split][1])
    vals, secs = video_ids("val", num_val), keyframe_seconds(seconds)
    _write_lines(os.path.join(ann, ava.FILES["val_exclusions"]),
                 [f"{vals[0]},{secs[1]:04d}", f"{vals[-1]},{secs[-1]:04d}"])
    _write_lines(os.path.join(ann, ava.FILES["label_map"]),
                 [line for a in EVALUATED for line in ("item {", f'  name: "{ACTIONS[a]}"', f"  id: {a}", "}")])
    return out


def ensure_ava_demo(out: str, **kwargs) -> str:
    """``out`` holding the demo dataset: made with :func:`make_ava_demo` (``kwargs``) unless its
    label map, written last, already exists there."""
    if not os.path.isfile(os.path.join(out, ava.ANNOTATION_DIR, ava.FILES["label_map"])):
        make_ava_demo(out, **kwargs)
    return out


_define_flags = make_video_demo.maker_flags(make_ava_demo, {"seconds": "Video length: seconds 900 .. 900 + seconds."})


def main(argv) -> int:
    """``python -m maskfeat_jax.data.make_ava_demo``: writes the dataset to ``--out``."""
    return make_video_demo.maker_main(make_ava_demo, _define_flags, argv, "the AVA annotation files")


if __name__ == "__main__":
    from maskfeat_jax import config_cli
    config_cli.run(main, _define_flags)
