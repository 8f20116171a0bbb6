"""Video CSV source (Kinetics-style, as PySlowFast's loader reads it).

One line per video::

    path/to/video_1.mp4 12
    /abs/path/video_2.webm,3

``path label`` separated by a space or a comma; relative paths are relative to
``root`` (default: the CSV's folder); blank lines are skipped.
"""
from __future__ import annotations

import os

__all__ = ["csv_lines", "parse_csv", "VideoCsvSource", "make_source"]


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
