"""Benchmark: jitted HOG targets against vectorised numpy, and HOG's share of the train step.

Jitted ``hog_targets`` in both histogram forms ('scatter' and 'onehot', timed interleaved)
against a plain vectorised numpy HOG of the same definition:

    python benchmarks/hog.py [--batch 8] [--size 224] [--iters 20]
    python benchmarks/hog.py --share [--variant B/16] [--batch 8] [--repeats 3]

``--share`` also builds the trainer's real pre-training step twice (``train_step.hog_share``):
as is (HOG targets computed in the step from the uint8 batch) and with ``hog_targets``
replaced by zeros of its shape, times both interleaved, and prints HOG's share of the step
two ways: the step-time difference (noisy: two multi-second steps) and HOG alone, jitted, over
the full step (the robust one).

``time_hog(batch, size, iters, histogram)`` returns the median seconds per jitted call, for reuse.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from maskfeat_jax.targets.hog import HISTOGRAMS, hog_targets  # noqa: E402


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


def _median_times(fns: dict, iters: int) -> dict:
    """Median seconds per call of each function; the calls are interleaved, so load changes hit all alike."""
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def time_hog_forms(batch: int = 8, size: int = 224, iters: int = 20,
                   forms: tuple[str, ...] = HISTOGRAMS) -> dict:
    """Median seconds per call of jitted ``hog_targets`` for each histogram form, on a
    (batch, size, size, 3) float32 input."""
    x = jnp.asarray(_images(batch, size))
    fns = {h: jax.jit(partial(hog_targets, histogram=h)) for h in forms}
    for fn in fns.values():
        jax.block_until_ready(fn(x))  # compile

    def call(fn):
        return lambda: jax.block_until_ready(fn(x))
    return _median_times({h: call(fn) for h, fn in fns.items()}, iters)


def time_hog(batch: int = 8, size: int = 224, iters: int = 20, histogram: str = "scatter") -> float:
    """Median seconds per call of jitted ``hog_targets`` (one histogram form)."""
    return time_hog_forms(batch, size, iters, (histogram,))[histogram]


def time_numpy(batch: int = 8, size: int = 224, iters: int = 20) -> float:
    x = _images(batch, size)
    numpy_hog_targets(x)
    return _median_times({"numpy": lambda: numpy_hog_targets(x)}, iters)["numpy"]


def print_share(variant: str, batch: int, size: int, dtype: str, repeats: int, iters: int) -> dict:
    """Time the train step with and without its HOG targets (see the module docstring)."""
    from benchmarks import train_step                 # the trainer's step, as benchmarked there
    config = train_step.make_config(variant, batch, size, dtype, "auto", "none")
    args = argparse.Namespace(iters=iters, repeats=repeats, warmup=1)
    s = train_step.hog_share(config, args)
    print(f"\nHOG share of the {variant} MaskFeat train step ({dtype}, batch {batch}, {size}px; fastest of "
          f"{repeats} x {iters} steps, interleaved; 'no HOG' = the same step with zeros as targets)")
    head = (f"{'variant':<8}{'step ms':>10}{'no HOG ms':>11}{'HOG jit ms':>12}{'numpy HOG ms':>14}"
            f"{'share (diff)':>14}{'share (jit)':>13}{'jit vs numpy':>14}")
    print(head + "\n" + "-" * len(head))
    print(f"{variant:<8}{s['step'] * 1e3:>10.1f}{s['no_hog'] * 1e3:>11.1f}{s['hog'] * 1e3:>12.2f}"
          f"{s['numpy'] * 1e3:>14.2f}{(s['step'] - s['no_hog']) / s['step']:>14.2%}"
          f"{s['hog'] / s['step']:>13.2%}{s['numpy'] / s['hog']:>13.1f}x", flush=True)
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--share", action="store_true",
                    help="also time the real train step with and without HOG (see the docstring)")
    ap.add_argument("--variant", default="B/16", help="ViT variant of the train step for --share")
    ap.add_argument("--dtype", default="float32", help="compute dtype of the train step for --share")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds of the two steps for --share")
    ap.add_argument("--step_iters", type=int, default=2, help="steps per timed round for --share")
    args = ap.parse_args()

    x = _images(args.batch, args.size)
    want = numpy_hog_targets(x)
    err = {h: float(np.abs(np.asarray(hog_targets(jnp.asarray(x), histogram=h)) - want).max())
           for h in HISTOGRAMS}
    t_jax = time_hog_forms(args.batch, args.size, args.iters)
    t_np = time_numpy(args.batch, args.size, args.iters)
    print(f"HOG targets, batch {args.batch}, {args.size}x{args.size}x3, median of {args.iters} "
          f"({jax.devices()[0].platform}; jax forms interleaved); max |jax - numpy|: "
          + ", ".join(f"{h} {e:.1e}" for h, e in err.items()))
    head = f"{'implementation':<30}{'ms/batch':>10}{'ms/image':>10}{'speed-up':>10}{'time/scatter':>14}"
    print(head + "\n" + "-" * len(head))
    rows = [(f"jax hog_targets {h} (jit)", t) for h, t in t_jax.items()] + [("numpy vectorised", t_np)]
    for name, t in rows:
        print(f"{name:<30}{t * 1e3:>10.2f}{t * 1e3 / args.batch:>10.3f}{t_np / t:>9.1f}x"
              f"{t / t_jax['scatter']:>13.2f}x")
    if args.share:
        print_share(args.variant, args.batch, args.size, args.dtype, args.repeats, args.step_iters)


if __name__ == "__main__":
    main()
