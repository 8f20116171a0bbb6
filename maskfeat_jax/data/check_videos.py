"""Checks every video of a Kinetics-style CSV before training, and writes a clean CSV.

    python -m maskfeat_jax.data.check_videos --csv=/data/k400/csv/train.csv [--root=DIR] \\
        [--out=clean.csv] [--workers=N] [--min_frames=K] [--decode=first|all]

The training input skips a video it cannot decode (a blank clip with ``valid=False``,
counted in ``data/invalid_examples``), so a damaged dataset trains on fewer videos
without stopping. This command finds those videos up front. The CSV is read with
:func:`maskfeat_jax.data.video_source.parse_csv` (a malformed line fails with the same
``file:line`` message) and each video is opened with the loader's own PyAV helpers,
then classified:

* ``ok``;
* ``missing``: no such file;
* ``unreadable``: the container cannot be opened or has no video stream. An mp4 cut
  short lands here when its index (the ``moov`` atom) follows the frames, as FFmpeg
  and PyAV write it by default; with the index first it opens and is ``corrupt``;
* ``corrupt``: opens, but decoding fails or yields no frame. ``--decode=first`` decodes
  the first frame only (fast); ``--decode=all`` decodes and counts every frame, which
  also finds damage further in;
* ``too_short``: fewer than ``--min_frames`` frames (counted with ``--decode=all``, else
  the container header's count). Training itself would use such a video (it repeats the
  last frame of a video shorter than its clip span); ``--min_frames`` is for leaving them out.

A video that passes these checks is also read once the way training reads it
(``video_decode.decode_clip``: seek to a clip start, decoding threads, 16 frames at rate 4); if that
fails it is ``corrupt`` too. ``--decode=all`` decodes on one thread and is stricter than
training, which may recover a damaged frame that this check reports.

Every video that is not ``ok`` prints one line ``category<TAB>line<TAB>path<TAB>reason``
on stdout (``path`` as opened, joined to the root), in CSV line order, also with
``--workers > 1``; the per-category summary goes to stderr. ``--out`` writes the ``ok``
lines as they are (same paths, same labels; surrounding whitespace and blank lines
dropped), so the file is a drop-in replacement when it resolves its relative paths against
the same root. Exit status: 0 when every video is ok, 1 when some are not, 2 on a usage
error, an unreadable or empty CSV, a worker process that died, or an ``--out`` that cannot
be written.
"""
from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import os
import sys
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple

from maskfeat_jax import storage
from maskfeat_jax.data import video_decode, video_source

__all__ = ["CATEGORIES", "Check", "check_video", "check_csv", "main"]

CATEGORIES = ("ok", "missing", "unreadable", "corrupt", "too_short")


class Check(NamedTuple):
    """What :func:`check_video` found; a tuple, so it crosses the process pool as is."""
    category: str
    reason: str = ""
    frames: int = 0         # decoded (--decode=all) or header count; 0 if unknown or bad
    seconds: float = 0.0    # frames / fps; 0 if unknown


def check_video(path: str, decode: str = "first", min_frames: int = 0) -> Check:
    """Classifies one video (module docstring). Never raises on a bad file."""
    if not os.path.exists(path):
        return Check("missing", "no such file")
    category = "unreadable"
    try:
        with video_decode.open_container(path) as container:
            stream = video_decode.video_stream(container)
            # One decoding thread: with frame threading FFmpeg can drop a damaged frame
            # without reporting it. The parallelism here is --workers.
            stream.thread_count = 1
            fps = video_decode.frame_rate(stream)
            header = video_decode.header_frame_count(container, stream, fps)
            category = "corrupt"
            frames = container.decode(stream)
            first = next(frames, None)
            if first is None:
                raise ValueError("no decodable video frames")
            first.to_ndarray(format="rgb24")   # as the loader does: catches odd pixel formats
            if decode == "all" or (min_frames and header == 0):
                n = 1 + sum(1 for _ in frames)
            else:
                n = header
    except Exception as e:  # noqa: BLE001 - any failure is a finding about this file
        return Check(category, " ".join(f"{type(e).__name__}: {e}".split()))
    seconds = n / fps if fps > 0 else 0.0
    if not video_decode.decode_clip(path, None, mode="test", num_clips=1)[1]:   # as training reads it
        return Check("corrupt", "video_decode.decode_clip (the training loader) could not read a clip")
    if min_frames and n < min_frames:
        return Check("too_short", f"{n} frames < --min_frames={min_frames} (the loader repeats the last frame)",
                     n, seconds)
    return Check("ok", "", n, seconds)


def check_csv(csv_path: str, root: str | None = None, *, decode: str = "first", min_frames: int = 0,
              workers: int = 1):
    """Yields ``((line number, line text), video path, Check)`` for every video of ``csv_path``,
    in line order. Raises ValueError (naming file and line) on a malformed CSV, before any
    video is opened."""
    items = video_source.parse_csv(csv_path, root)
    lines = video_source.csv_lines(csv_path)         # the lines parse_csv read, one per item
    paths = [path for path, _ in items]
    check = functools.partial(check_video, decode=decode, min_frames=min_frames)
    if workers <= 1 or len(paths) < 2:
        yield from zip(lines, paths, map(check, paths))
        return
    # spawn, not fork: the parent may have imported jax (threads) before getting here. A worker
    # that dies (a crash inside FFmpeg) raises BrokenProcessPool here instead of hanging.
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(paths)),
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from zip(lines, paths, pool.map(check, paths, chunksize=8))   # map keeps the order


def _define_flags(flag_values):
    from absl import flags
    fv = flag_values
    flags.DEFINE_string("csv", None, "The CSV to check (train.csv, val.csv).", flag_values=fv)
    flags.DEFINE_string("root", None, "Folder of relative video paths, as config.video.root (default: the "
                        "CSV's folder).", flag_values=fv)
    flags.DEFINE_string("out", None, "Writes the ok lines, unchanged, to this CSV (relative paths stay relative: "
                        "keep it next to the input CSV or set config.video.root).", flag_values=fv)
    flags.DEFINE_integer("workers", 1, "Processes checking videos in parallel (1: this one).", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("min_frames", 0, "Reports videos with fewer frames as too_short and leaves them out of "
                         "--out (0: no check); training would use them, repeating the last frame.",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_enum("decode", "first", ["first", "all"], "first: decodes the first frame only (fast); all: "
                      "decodes and counts every frame.", flag_values=fv)
    flags.mark_flags_as_required(["csv"], flag_values=fv)
    flags.register_validator("out", lambda out: not out or os.path.isdir(os.path.dirname(os.path.abspath(out))),
                             "no such folder", flag_values=fv)
    return fv


def main(argv) -> int:
    """``python -m maskfeat_jax.data.check_videos``: the report, and the exit status."""
    from maskfeat_jax import config_cli
    a = config_cli.command_flags(_define_flags, argv, "check_videos")
    counts = dict.fromkeys(CATEGORIES, 0)
    good, frames, seconds = [], 0, 0.0
    try:
        for (lineno, text), path, r in check_csv(a.csv, a.root, decode=a.decode, min_frames=a.min_frames,
                                               workers=a.workers):
            counts[r.category] += 1
            if r.category == "ok":
                good.append(text)
                frames, seconds = frames + r.frames, seconds + r.seconds
            else:
                print(f"{r.category}\t{lineno}\t{path}\t{r.reason}", flush=True)
    except (OSError, ValueError) as e:   # no such CSV, malformed line (file:line in the message)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenProcessPool:
        print("error: a worker process died (a crash while decoding?); rerun with --workers=1 to find "
              "the video", file=sys.stderr)
        return 2
    total = sum(counts.values())
    if total == 0:
        print(f"error: {a.csv} lists no videos (training refuses it)", file=sys.stderr)
        return 2
    if a.out:
        try:
            with storage.atomic_write(a.out) as f:
                f.writelines(f"{line}\n" for line in good)
        except OSError as e:
            print(f"error: --out={a.out}: {e}", file=sys.stderr)
            return 2
    err = sys.stderr
    print(f"{a.csv}: {total} videos checked (--decode={a.decode})", file=err)
    for category, n in counts.items():
        print(f"  {category:<10} {n:>8}", file=err)
    print(f"  ok videos: {frames} frames, {seconds / 3600:.2f} h"
          + (" (header counts)" if a.decode == "first" else ""), file=err)
    if a.out:
        print(f"wrote {len(good)} ok lines to {a.out}", file=err)
    return 0 if counts["ok"] == total else 1


if __name__ == "__main__":
    from maskfeat_jax import config_cli
    config_cli.run(main, _define_flags)
