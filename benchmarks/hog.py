"""Benchmark: jitted ``hog_targets`` vs a plain vectorised numpy HOG (same definition).

    python benchmarks/hog.py [--batch 8] [--size 224] [--iters 20]

``time_hog(batch, size, iters)`` returns the median seconds per jitted call, for reuse.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from maskfeat_jax.targets.hog import hog_targets  # noqa: E402


def numpy_hog_targets(images: np.ndarray, patch_size: int = 16, nbins: int = 9,
                      cell_size: int = 8) -> np.ndarray:
    """Straightforward numpy HOGLayerC + per-token flatten: (B, H, W, C) -> (B, N, C*nbins*q*q)."""
    x = np.transpose(np.asarray(images, np.float32), (0, 3, 1, 2))  # (B, C, H, W)
    bsz, chans, height, width = x.shape
    p = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    left = p[:, :, :-2, :-2] + 2 * p[:, :, 1:-1, :-2] + p[:, :, 2:, :-2]
    right = p[:, :, :-2, 2:] + 2 * p[:, :, 1:-1, 2:] + p[:, :, 2:, 2:]
    top = p[:, :, :-2, :-2] + 2 * p[:, :, :-2, 1:-1] + p[:, :, :-2, 2:]
    bottom = p[:, :, 2:, :-2] + 2 * p[:, :, 2:, 1:-1] + p[:, :, 2:, 2:]
    gx, gy = left - right, top - bottom
    mag = np.sqrt(gx * gx + gy * gy)
    bins = np.mod(np.floor(np.arctan2(gx, gy) / np.pi * nbins), nbins).astype(np.int64)
    hist = np.zeros((bsz, chans, nbins, height, width), np.float32)
    np.put_along_axis(hist, bins[:, :, None], mag[:, :, None], axis=2)  # scatter (hard vote)
    nh, nw = height // cell_size, width // cell_size
    hist = hist.reshape(bsz, chans, nbins, nh, cell_size, nw, cell_size).sum((4, 6))
    hist /= np.maximum(np.linalg.norm(hist, axis=2, keepdims=True), 1e-12)
    q = patch_size // cell_size
    hist = hist.reshape(bsz, chans, nbins, nh // q, q, nw // q, q)
    return hist.transpose(0, 3, 5, 1, 2, 4, 6).reshape(bsz, (nh // q) * (nw // q), -1)


def _images(batch: int, size: int) -> np.ndarray:
    return np.random.RandomState(0).randn(batch, size, size, 3).astype(np.float32)


def _median_time(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_hog(batch: int = 8, size: int = 224, iters: int = 20) -> float:
    """Median seconds per call of jitted ``hog_targets`` on a (batch, size, size, 3) float32 input."""
    x = jnp.asarray(_images(batch, size))
    fn = jax.jit(hog_targets)
    jax.block_until_ready(fn(x))  # compile
    return _median_time(lambda: jax.block_until_ready(fn(x)), iters)


def time_numpy(batch: int = 8, size: int = 224, iters: int = 20) -> float:
    x = _images(batch, size)
    numpy_hog_targets(x)
    return _median_time(lambda: numpy_hog_targets(x), iters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()

    x = _images(args.batch, args.size)
    err = float(np.abs(np.asarray(hog_targets(jnp.asarray(x))) - numpy_hog_targets(x)).max())
    t_jax = time_hog(args.batch, args.size, args.iters)
    t_np = time_numpy(args.batch, args.size, args.iters)
    print(f"HOG targets, batch {args.batch}, {args.size}x{args.size}x3, median of {args.iters} "
          f"({jax.devices()[0].platform}); max |jax - numpy| = {err:.1e}")
    print(f"{'implementation':<22}{'ms/batch':>10}{'ms/image':>10}{'speed-up':>10}")
    for name, t in (("jax hog_targets (jit)", t_jax), ("numpy vectorised", t_np)):
        print(f"{name:<22}{t * 1e3:>10.2f}{t * 1e3 / args.batch:>10.3f}{t_np / t:>9.1f}x")


if __name__ == "__main__":
    main()
