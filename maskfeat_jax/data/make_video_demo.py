"""The embedded video dataset: moving scikit-learn digits as real mp4 files.

    python -m maskfeat_jax.data.make_video_demo --out DIR [--num_train 200 --num_val 50 \\
        --frames 32 --size 64 --seed 0]

writes ``DIR/train/00000.mp4 ...``, ``DIR/val/00000.mp4 ...`` and ``DIR/train.csv`` /
``DIR/val.csv`` (``path label`` lines, paths relative to ``DIR``), the layout
:class:`maskfeat_jax.data.video_source.VideoCsvSource` reads. Each video shows one digit
(upscaled to half the frame side, tinted with a random colour) moving in a straight
line and bouncing off the borders on a black ``size x size`` background; its label is
the digit (10 classes, balanced: video ``i`` shows digit ``i % 10``). Train videos use
the digits' train images, val videos the held-out fifth (as the ``digits`` image
source). Encoded with PyAV at 30 fps, H.264 (libx264) when the bundled FFmpeg has it,
else MPEG-4 Part 2. Everything is drawn from ``--seed`` and the files are
byte-identical from run to run; the defaults take a few seconds.
"""
from __future__ import annotations

import inspect
import math
import os
import sys

import numpy as np
from PIL import Image

from maskfeat_jax import storage
from maskfeat_jax.data import sources

__all__ = ["make_video_demo", "ensure_video_demo", "render_clip", "pick_codec", "main"]

FPS = 30
# One thread, explicit timestamps and no x264 assembly make the files byte-identical on
# every run (with x264's assembly on, repeated encodes of the same frames differed).
_CODECS = (("libx264", {"crf": "15", "preset": "ultrafast", "threads": "1", "x264-params": "asm=0"}),
           ("h264", {"threads": "1"}),
           ("mpeg4", {"qscale": "2", "threads": "1"}))


def pick_codec() -> tuple[str, dict]:
    """The first of libx264, h264, mpeg4 that the bundled FFmpeg can encode, with its options."""
    import av
    for name, options in _CODECS:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # noqa: BLE001 - unknown or decode-only codec
            continue
        return name, dict(options)
    raise RuntimeError("PyAV's FFmpeg has none of the encoders libx264, h264, mpeg4")


def render_clip(digit: np.ndarray, rng: np.random.Generator, frames: int, size: int) -> np.ndarray:
    """``(frames, size, size, 3)`` uint8: ``digit`` (HxWx3 uint8) scaled to ``size // 2``,
    tinted, moving with a constant velocity and bouncing off the borders."""
    side = size // 2
    sprite = np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC), np.float32)
    tint = rng.uniform(0.5, 1.0, 3).astype(np.float32)
    sprite = np.clip(sprite * tint, 0, 255).astype(np.uint8)
    room = size - side
    pos = rng.uniform(0, room, 2)
    speed = max(room, 1) * 2.0 / max(frames, 1)
    vel = rng.uniform(0.3, 1.0, 2) * speed * rng.choice([-1.0, 1.0], 2)
    clip = np.zeros((frames, size, size, 3), np.uint8)
    for t in range(frames):
        y, x = (int(round(p)) for p in pos)
        clip[t, y:y + side, x:x + side] = sprite
        pos = pos + vel
        for a in range(2):  # reflect off the borders
            if pos[a] < 0:
                pos[a], vel[a] = -pos[a], -vel[a]
            elif pos[a] > room:
                pos[a], vel[a] = 2 * room - pos[a], -vel[a]
            pos[a] = min(max(pos[a], 0.0), room)
    return clip


def encode(path: str, clip: np.ndarray, codec: str, options: dict, fps: int = FPS) -> None:
    """Writes ``clip`` ``(T, H, W, 3)`` uint8 as a video file at ``fps`` (the demo writers' one
    encoder). ``+bitexact``: no muxer version string or random segment id, so the same frames
    give the same bytes."""
    import av
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with av.open(path, mode="w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height = clip.shape[2], clip.shape[1]
        stream.pix_fmt = "yuv420p"
        for i, array in enumerate(clip):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_csv(path: str, rows: list[tuple[str, int]]) -> None:
    with storage.atomic_write(path) as f:   # a CSV exists only once all its videos do
        f.writelines(f"{rel} {label}\n" for rel, label in rows)


def make_video_demo(out: str, *, num_train: int = 200, num_val: int = 50, frames: int = 32, size: int = 64,
                    seed: int = 0) -> str:
    """Writes the demo videos and ``train.csv`` / ``val.csv`` under ``out``; returns ``out``."""
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even int >= 16 (yuv420p), got {size!r}")
    if frames < 1 or num_train < 1 or num_val < 1:
        raise ValueError(f"frames, num_train and num_val must be >= 1, got {frames}, {num_train}, {num_val}")
    codec, options = pick_codec()
    # about 30 ms per 32-frame 64x64 video on one core of the 2-core development machine
    seconds = math.ceil((num_train + num_val) * frames * size * size / 4e6)
    print(f"writing {num_train + num_val} demo videos to {out} (once, ~{seconds} s)", flush=True)
    for split, count in (("train", num_train), ("val", num_val)):
        src = sources.DigitsSource("train" if split == "train" else "validation")
        by_label = [np.flatnonzero(src.labels == k) for k in range(10)]
        rng = np.random.default_rng((seed, 0 if split == "train" else 1))
        os.makedirs(os.path.join(out, split), exist_ok=True)
        rows = []
        for i in range(count):
            label = i % 10
            digit = src.images[int(rng.choice(by_label[label]))]
            rel = f"{split}/{i:05d}.mp4"
            encode(os.path.join(out, rel), render_clip(digit, rng, frames, size), codec, options)
            rows.append((rel, label))
        _write_csv(os.path.join(out, f"{split}.csv"), rows)
    return out


def ensure_video_demo(out: str, **kwargs) -> str:
    """``out`` holding the demo dataset: made with :func:`make_video_demo` (``kwargs``) unless
    both ``train.csv`` and ``val.csv`` already exist there."""
    if not all(os.path.isfile(os.path.join(out, f"{s}.csv")) for s in ("train", "val")):
        make_video_demo(out, **kwargs)
    return out


_FLAG_HELP = {"num_train": "Training videos.", "num_val": "Validation videos.",
              "size": "Frame side in pixels (even).", "seed": "Seed of everything drawn."}


def maker_flags(make, helps: dict[str, str]):
    """``define(flag_values)`` for a demo maker's command: ``--out`` and an integer flag for each
    keyword argument of ``make``, with its default, described by ``helps`` (or the common help)."""
    def define(flag_values):
        from absl import flags
        # the flags belong to make's module (so its --help lists them), as if defined there
        module = sys.argv[0] if make.__module__ == "__main__" else make.__module__
        flags.DEFINE_string("out", None, "Output folder.", flag_values=flag_values, module_name=module)
        for name, p in inspect.signature(make).parameters.items():
            if p.kind is p.KEYWORD_ONLY:
                flags.DEFINE_integer(name, p.default, helps.get(name) or _FLAG_HELP[name], flag_values=flag_values,
                                     module_name=module)
        flags.mark_flags_as_required(["out"], flag_values=flag_values)
        return flag_values
    return define


def maker_main(make, define, argv, wrote: str) -> int:
    """A demo maker's ``main``: ``make(--out, **the other flags)``, then one line of what it wrote."""
    from maskfeat_jax import config_cli
    a = config_cli.command_flags(define, argv, make.__name__)
    make(a.out, **{name: a[name].value for name, p in inspect.signature(make).parameters.items()
                   if p.kind is p.KEYWORD_ONLY})
    print(f"wrote {a.num_train} + {a.num_val} videos and {wrote} to {a.out}")
    return 0


_define_flags = maker_flags(make_video_demo, {"frames": "Frames per video."})


def main(argv) -> int:
    """``python -m maskfeat_jax.data.make_video_demo``: writes the dataset to ``--out``."""
    return maker_main(make_video_demo, _define_flags, argv, "train.csv, val.csv")


if __name__ == "__main__":
    from maskfeat_jax import config_cli
    config_cli.run(main, _define_flags)
