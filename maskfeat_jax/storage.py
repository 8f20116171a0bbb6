"""Where a run's files go: a local (or mounted) folder, or a Google Cloud Storage bucket.

``--workdir`` (and ``config.init_from``) may be a path or a ``gs://bucket/path`` URL. Orbax
writes checkpoints to either (for GCS through TensorStore, with a commit marker instead of a
rename: still atomic). Everything else this package writes goes through ``etils.epath``, which
reaches GCS through ``gcsfs`` (``pip install maskfeat_jax[gcs]``; no TensorFlow needed).
Files that are only ever local (exports, CSVs) are written with ``atomic_write``: a
temporary file beside the target, flushed to disk, then renamed onto it.

GCS objects cannot be appended to, so ``LineLog`` (``metrics.jsonl``) buffers its lines there and
adds them in chunks (at most every ``LineLog.GCS_FLUSH_S`` seconds, and at close): each chunk is
uploaded as an object of its own and composed onto the end of the log, so the bytes sent grow
with the run, not with its square; an object is replaced whole or not at all, never left
half-written. On a filesystem it appends line by line. gcsfs's listing cache is off by default
here: a listing must show what other hosts and processes wrote since (checkpoint steps above all).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
import tempfile
import time

import fsspec
from etils import epath

SCHEMES = ("gs://",)
for _protocol in ("gs", "gcs"):     # epath opens gcsfs through fsspec, which applies this config
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def is_url(path: str) -> bool:
    return "://" in str(path)


def path(p) -> epath.Path:
    """``p`` as an ``epath.Path``: URLs as they are, local paths made absolute."""
    p = str(p)
    return epath.Path(p) if is_url(p) else epath.Path(os.path.abspath(os.path.expanduser(p)))


def check_url(p: str, key: str) -> None:
    """Refuses URLs this package cannot write, before anything runs; ``key`` names the flag or
    config key in the message."""
    if not is_url(p):
        return
    if not str(p).startswith(SCHEMES):
        raise ValueError(f"{key}={p}: only {', '.join(SCHEMES)} URLs are supported (or a local or mounted path)")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        raise ValueError(f"{key}={p}: gs:// paths need gcsfs: pip install 'maskfeat_jax[gcs]' (or gcsfs)") from None


def check_workdir(p: str, key: str = "--workdir", *, write: bool = True) -> None:
    """Refuses, before anything starts, a local ``p`` that is not a folder this process can
    write in (``write``: created if missing, then a file made and removed in it, which answers
    truthfully for permissions, read-only mounts and root alike) or, without ``write``, one that
    does not exist. A ``ValueError`` names ``key``; URLs are checked by ``check_url`` only."""
    check_url(p, key)
    if is_url(p):
        return
    d = os.path.abspath(os.path.expanduser(str(p)))
    if os.path.exists(d) and not os.path.isdir(d):
        raise ValueError(f"{key}={p} is a file, not a folder")
    if not write:
        if not os.path.isdir(d):
            raise ValueError(f"{key}={p} does not exist")
        return
    try:
        os.makedirs(d, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=d, prefix=".write_check")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{key}={p}: cannot write there ({e.strerror or e})") from None


def is_disk_full(e: BaseException | None) -> bool:
    """Whether ``e`` or an exception it was raised from reports a full disk (``ENOSPC``; TensorStore
    reports it as a ``ValueError`` naming the OS error)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e) or "os_error_code='28'" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class _DropDiskFull(logging.Filter):
    """Orbax's background save threads (and asyncio, for their abandoned writes) log a full disk
    with the same traceback several times; ``checkpoint.Checkpointer`` reports it once, as one line."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        return not (record.levelno >= logging.ERROR and (is_disk_full(exc) or
                                                         "No space left on device" in record.getMessage()))


def quiet_disk_full_logs():
    """Installs ``_DropDiskFull``, and drops the "Event loop is closed" errors that TensorStore's
    remaining writes raise (and Python ignores) once a failed save has closed its event loop."""
    if any(isinstance(f, _DropDiskFull) for f in logging.getLogger("absl").filters):
        return
    for name in ("absl", "asyncio"):     # Orbax logs through absl; asyncio reports the abandoned writes
        logging.getLogger(name).addFilter(_DropDiskFull())
    previous = sys.unraisablehook

    def hook(u):
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            previous(u)
    sys.unraisablehook = hook


def free_space(p) -> str:
    """The free space of the filesystem holding the local ``p`` (or its nearest existing parent),
    as text: ``"12.0 KiB"``; ``"unknown"`` for URLs."""
    if is_url(p):
        return "unknown"
    d = os.path.abspath(str(p))
    while not os.path.exists(d) and os.path.dirname(d) != d:
        d = os.path.dirname(d)
    n = float(shutil.disk_usage(d).free)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


class LineLog:
    """A text file written one line at a time: appended on a filesystem; on an object store,
    buffered and appended in chunks (``flush``, at most ``GCS_FLUSH_S`` seconds apart, and
    ``close``) by composing each chunk onto the end of the object."""

    GCS_FLUSH_S = 30.0

    def __init__(self, p):
        self.path = path(p)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._url = is_url(self.path)
        if self._url:
            self._fs, self._key = fsspec.core.url_to_fs(str(self.path))
            self._lines, self._flushed_at = [], time.monotonic()
        else:
            self._file = open(self.path, "a")

    def write(self, line: str) -> None:
        if not self._url:
            self._file.write(line + "\n")
            self._file.flush()
            return
        self._lines.append(line + "\n")
        if time.monotonic() - self._flushed_at >= self.GCS_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Adds the buffered lines to the object (one upload of those lines, then a compose)."""
        if not self._url or not self._lines:
            return
        chunk, self._lines = "".join(self._lines), []
        self._flushed_at = time.monotonic()
        size = self._fs.size(self._key) if self._fs.exists(self._key) else 0
        if not size:
            self._fs.pipe_file(self._key, chunk.encode())
            return
        if self._fs.cat_file(self._key, start=size - 1) != b"\n":     # a line cut short by a crash
            chunk = "\n" + chunk
        part = f"{self._key}.part-{os.getpid()}"
        self._fs.pipe_file(part, chunk.encode())
        try:
            self._fs.merge(self._key, [self._key, part])
        finally:
            self._fs.rm_file(part)

    def close(self) -> None:
        if self._url:
            self.flush()
        else:
            self._file.close()


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
    """Opens a temporary file beside the local ``path`` for writing; on success it is flushed to
    disk and renamed to ``path`` (so ``path`` holds its old content or the whole new one, never a
    part), on failure removed."""
    tmp = f"{path}.tmp{os.getpid()}"     # same folder: os.replace is then an atomic rename
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def upload_tree(src: str, dst) -> None:
    """Copies the local folder ``src`` into ``dst`` (a path or URL), file by file."""
    dst = path(dst)
    for root, _, files in os.walk(src):
        rel = os.path.relpath(root, src)
        out = dst if rel == "." else dst / rel
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                (out / name).write_bytes(f.read())
