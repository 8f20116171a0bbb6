"""Keep freed host memory in the process, so XLA CPU does not page-fault its temporaries anew
every step.

XLA CPU allocates one call's temporaries as one block (1.9 GB for a ViT-B/16 train step at
batch 8) and frees it when the call ends. glibc's malloc serves a block that large with a fresh
``mmap`` and returns it with ``munmap`` (a thread's own arena cannot hold more than 64 MB), so
every step faults the block in again, page by page, and the kernel zeroes each page: 470k
faults per ViT-B/16 step, about 9% of its CPU time. ``keep_freed_memory`` sets malloc to one
arena, no ``mmap`` for allocations and no trimming, so the block stays in the heap and the next
step reuses it. Freed memory is not handed back, as with jemalloc or tcmalloc: the resident
memory settles within the first few steps at the default's peak during a step, or, where
another allocation splits the freed block once, one more copy of the temporaries above it
(3.5 or 7.0 GiB for that ViT-B/16 step). ``MASKFEAT_KEEP_HOST_MEMORY=off`` restores glibc's
default.

glibc fixes the arena limit when a second thread first allocates (numpy's BLAS threads do on
import), so this must run before numpy or jax is imported: ``maskfeat_jax.main`` and
``benchmarks/train_step.py`` call it first thing. This module imports only the standard library.

``MASKFEAT_KEEP_HOST_MEMORY``: ``auto`` (the default: on when JAX will run on the CPU only),
``on`` or ``off``.

Why ``mallopt`` here rather than glibc's environment (``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=...`` or ``GLIBC_TUNABLES=glibc.malloc.arena_max=1:...``) in the launch
scripts: glibc reads that environment once, when a process starts, so it would have to be set
by whoever starts Python. The runs it helps are CPU runs started as plain
``python -m maskfeat_jax.main`` (the demos, the tests, a laptop) with no launch script, while
``launch/*.sh`` start GPU and TPU runs, where ``auto`` leaves malloc alone; ``auto`` itself
depends on the JAX platform, which a fixed environment cannot follow. The call also changes
this process only, where the environment would reach every child (grain workers, compilers).
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil

ENV = "MASKFEAT_KEEP_HOST_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8      # mallopt parameters, <malloc.h>


def cpu_backend_only(env=None) -> bool:
    """Whether JAX will run on the CPU alone, told without importing it: ``JAX_PLATFORMS`` when
    set, else whether an accelerator plugin (a ``jax_plugins`` package or entry point, libtpu) is
    installed."""
    platforms = (os.environ if env is None else env).get("JAX_PLATFORMS", "")
    if platforms:
        return set(platforms.lower().split(",")) <= {"cpu"}
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and any(pkgutil.iter_modules(spec.submodule_search_locations or [])):
        return False
    return importlib.util.find_spec("libtpu") is None


def is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):    # no confstr, or not a GNU C library
        return False


def keep_freed_memory(mode: str | None = None) -> bool:
    """Apply the malloc settings above per ``mode`` (default: ``$MASKFEAT_KEEP_HOST_MEMORY`` or
    ``auto``). Returns whether they were applied: never with ``off``, with ``auto`` off the
    CPU, or with a C library other than glibc."""
    mode = (os.environ.get(ENV, "auto") if mode is None else mode).lower()
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"{ENV}={mode!r}: expected 'auto', 'on' or 'off'")
    if mode == "off" or (mode == "auto" and not cpu_backend_only()):
        return False
    if not is_glibc():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    # a trim threshold of -1 (as size_t: the largest) never trims; 0 mmaps: every block from the heap
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
