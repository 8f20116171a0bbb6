"""The embedded SSv2-like dataset: digits moving in one of four directions, in SSv2's own file formats.

    python -m maskfeat_jax.data.make_ssv2_demo --out DIR [--num_train 240 --num_val 80 \\
        --min_frames 16 --max_frames 32 --size 64 --seed 0]

writes what :class:`maskfeat_jax.data.ssv2.Ssv2Source` reads, laid out as the real
dataset::

    DIR/something-something-v2-labels.json        4 classes, {"Moving something up": "2", ...}
    DIR/something-something-v2-train.json         [{"id", "label", "template", "placeholders"}, ...]
    DIR/something-something-v2-validation.json
    DIR/20bn-something-something-v2/<id>.webm     VP9 at 12 fps, as SSv2's videos

Like SSv2, and unlike the Kinetics-style digit demo, the class is the motion, not the
object: each video shows one scikit-learn digit (any of the ten, tinted, half the
frame side) sliding in a straight line left to right, right to left, up or down, so
the class can only be told from the order of the frames, and a horizontal flip turns
"left to right" into "right to left" (why SSv2 recipes train without flips). Videos
have a random length in ``[min_frames, max_frames]``, so segment sampling sees short
and long videos. Classes are balanced (video ``i`` has class ``i % 4``); train videos
use the digits' train images, validation videos the held-out fifth.

Encoded with PyAV: VP9 (libvpx-vp9) in webm when the bundled FFmpeg has it, else VP8,
else H.264/MPEG-4 in mp4 (the reader finds ``<id>.webm`` or ``<id>.mp4``). Everything
is drawn from ``--seed``; single-threaded encoding and FFmpeg's bit-exact muxing make
the files byte-identical from run to run. The defaults take a few seconds.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
from PIL import Image

from maskfeat_jax import storage
from maskfeat_jax.data import make_video_demo, sources, ssv2

__all__ = ["CLASSES", "FPS", "make_ssv2_demo", "ensure_ssv2_demo", "render_motion", "pick_webm_codec", "main"]

#: (template, unit motion (dy, dx) in image coordinates: y grows downwards)
CLASSES = (("Moving [something] from left to right", (0, 1)),
           ("Moving [something] from right to left", (0, -1)),
           ("Moving [something] up", (-1, 0)),
           ("Moving [something] down", (1, 0)))
FPS = 12   # SSv2's videos are 12 fps
# One thread and the fastest libvpx mode keep encoding cheap and its output the same on every run.
_WEBM_CODECS = (("libvpx-vp9", {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b": "0", "threads": "1"}),
                ("libvpx", {"deadline": "realtime", "cpu-used": "8", "crf": "4", "b": "2M", "threads": "1"}))


def pick_webm_codec() -> tuple[str, dict, str]:
    """``(codec, options, file extension)``: VP9, else VP8, in webm; else the Kinetics demo's mp4 codec."""
    import av
    for name, options in _WEBM_CODECS:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # noqa: BLE001 - unknown or decode-only codec
            continue
        return name, dict(options), "webm"
    name, options = make_video_demo.pick_codec()
    return name, options, "mp4"


def render_motion(digit: np.ndarray, motion: tuple[int, int], rng: np.random.Generator, frames: int,
                  size: int) -> np.ndarray:
    """``(frames, size, size, 3)`` uint8: ``digit`` (HxWx3 uint8) scaled to ``size // 2``, tinted,
    sliding at constant speed along ``motion`` (unit ``(dy, dx)``) over 60-100% of the free
    room, with a sideways drift of at most a fifth of that, on black; it never leaves the frame."""
    side = size // 2
    sprite = np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC), np.float32)
    sprite = np.clip(sprite * rng.uniform(0.5, 1.0, 3).astype(np.float32), 0, 255).astype(np.uint8)
    room = size - side
    axis = 0 if motion[0] else 1
    sign = motion[axis]
    travel = rng.uniform(0.6, 1.0) * room
    along = rng.uniform(0, room - travel)          # the low end of the path on the motion axis
    start, end = np.zeros(2), np.zeros(2)
    start[axis], end[axis] = (along, along + travel) if sign > 0 else (along + travel, along)
    start[1 - axis] = rng.uniform(0, room)
    end[1 - axis] = np.clip(start[1 - axis] + rng.uniform(-0.2, 0.2) * travel, 0, room)
    clip = np.zeros((frames, size, size, 3), np.uint8)
    for t in range(frames):
        y, x = (int(round(p)) for p in start + (end - start) * t / max(frames - 1, 1))
        clip[t, y:y + side, x:x + side] = sprite
    return clip


def _write_json(path: str, data) -> None:
    with storage.atomic_write(path) as f:   # a JSON file exists only once all its videos do
        json.dump(data, f, indent=1)
        f.write("\n")


def _entry(video_id: int, label: int, digit: int) -> dict:
    template = CLASSES[label][0]
    thing = f"the digit {digit}"
    text = template.replace("[something]", thing)
    return {"id": str(video_id), "label": text[0].lower() + text[1:], "template": template,
            "placeholders": [thing]}


def make_ssv2_demo(out: str, *, num_train: int = 240, num_val: int = 80, min_frames: int = 16,
                   max_frames: int = 32, size: int = 64, seed: int = 0) -> str:
    """Writes the demo videos and the three JSON files under ``out``; returns ``out``."""
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even int >= 16 (yuv420p), got {size!r}")
    if not 2 <= min_frames <= max_frames:
        raise ValueError(f"need 2 <= min_frames <= max_frames, got {min_frames}, {max_frames}")
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")
    codec, options, ext = pick_webm_codec()
    # about 8 ms per 24-frame 64x64 video (render + VP9) on one core of the 2-core development machine
    seconds = math.ceil((num_train + num_val) * (min_frames + max_frames) / 2 * size * size / 1.2e7)
    print(f"writing {num_train + num_val} SSv2-like demo videos ({codec}) to {out} (once, ~{seconds} s)", flush=True)
    video_dir = os.path.join(out, ssv2.VIDEO_DIR)
    os.makedirs(video_dir, exist_ok=True)
    next_id = 1
    for split, count in (("train", num_train), ("validation", num_val)):
        src = sources.DigitsSource(split)
        rng = np.random.default_rng((seed, 0 if split == "train" else 1))
        entries = []
        for i in range(count):
            label = i % len(CLASSES)
            k = int(rng.integers(len(src)))
            frames = int(rng.integers(min_frames, max_frames + 1))
            clip = render_motion(src.images[k], CLASSES[label][1], rng, frames, size)
            make_video_demo.encode(os.path.join(video_dir, f"{next_id}.{ext}"), clip, codec, options, fps=FPS)
            entries.append(_entry(next_id, label, int(src.labels[k])))
            next_id += 1
        _write_json(os.path.join(out, ssv2.ANNOTATION_FILES[split]), entries)
    _write_json(os.path.join(out, ssv2.LABELS_FILE),
                {ssv2.template_key(t): str(k) for k, (t, _) in enumerate(CLASSES)})
    return out


def ensure_ssv2_demo(out: str, **kwargs) -> str:
    """``out`` holding the demo dataset: made with :func:`make_ssv2_demo` (``kwargs``) unless its
    labels file, written last, already exists there."""
    if not os.path.isfile(os.path.join(out, ssv2.LABELS_FILE)):
        make_ssv2_demo(out, **kwargs)
    return out


_define_flags = make_video_demo.maker_flags(make_ssv2_demo, {"min_frames": "Shortest video, in frames.",
                                                            "max_frames": "Longest video, in frames."})


def main(argv) -> int:
    """``python -m maskfeat_jax.data.make_ssv2_demo``: writes the dataset to ``--out``."""
    return make_video_demo.maker_main(make_ssv2_demo, _define_flags, argv, "the SSv2 label files")


if __name__ == "__main__":
    from maskfeat_jax import config_cli
    config_cli.run(main, _define_flags)
