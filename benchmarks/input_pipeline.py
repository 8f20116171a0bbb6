"""Input-pipeline throughput: Pillow decode floor vs the pre-training grain pipeline.

Writes ImageNet-sized JPEGs (about 500x375) into a temporary ``folder:`` dataset, then
measures images/s for

* ``decode``: single-process ``PIL.Image.open(path).convert('RGB')`` to numpy, nothing else;
* ``pipeline wN``: ``pipeline.train_dataset`` (decode + pretrain_transform + block mask +
  batch) with ``input.worker_count = N`` (0 = in the main process, N > 0 = grain
  ``mp_prefetch`` worker processes).

Ratios are against the decode floor, both in total and per core (a pipeline with N
workers is charged min(N, cores) cores, the in-process pipeline one core).

    python benchmarks/input_pipeline.py [--num_images 256] [--batch_size 32] [--image_size 224]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # an input benchmark: keep jax off accelerators
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def make_jpegs(root: str, n: int, num_classes: int = 8, seed: int = 0) -> float:
    """``n`` photo-like JPEGs (smooth colour field + texture, ~500x375) under ``root/train``.

    Returns the mean file size in KiB."""
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(n):
        w, h = (500, 375) if i % 4 else (375, 500)        # some portrait images, as in ImageNet
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
        texture = rng.normal(0.0, 18.0, (h, w, 1)).astype(np.float32)
        img = np.clip(base + texture, 0, 255).astype(np.uint8)
        d = os.path.join(root, "train", f"class_{i % num_classes:02d}")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"img_{i:05d}.JPEG")
        Image.fromarray(img).save(path, format="JPEG", quality=90)
        sizes.append(os.path.getsize(path))
    return float(np.mean(sizes)) / 1024


def bench_decode(paths: list[str], repeats: int) -> float:
    """Best-of-``repeats`` images/s for plain Pillow decode to an RGB uint8 array."""
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in paths:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"))
            assert arr.ndim == 3
        best = max(best, len(paths) / (time.perf_counter() - t0))
    return best


def bench_pipeline(root: str, workers: int, args) -> tuple[float, float]:
    """(images/s in steady state, seconds to the first batch) for the pre-training pipeline."""
    from maskfeat_jax import config as config_lib
    from maskfeat_jax.data import pipeline, sources

    c = config_lib.base_config()
    c.task = "pretrain"
    c.input.dataset = f"folder:{root}"
    c.input.image_size = args.image_size
    c.input.global_batch_size = args.batch_size
    c.input.worker_count = workers
    c.input.prefetch = 2
    c.model.variant = "B/16"
    src = sources.make(c, "train")
    grid = (args.image_size // 16, args.image_size // 16)
    n_batches = max(1, args.epochs * len(src) // args.batch_size)

    t0 = time.perf_counter()
    it = iter(pipeline.train_dataset(c, src, grid))
    try:
        first = next(it)                                   # includes worker start-up
        t_first = time.perf_counter() - t0
        assert first["image"].shape == (args.batch_size, args.image_size, args.image_size, 3)
        assert first["mask"].shape == (args.batch_size, grid[0] * grid[1])
        t1 = time.perf_counter()
        valid = 0
        for _ in range(n_batches):
            b = next(it)
            valid += int(b["valid"].sum())
        dt = time.perf_counter() - t1
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    assert valid == n_batches * args.batch_size, "undecodable images in the benchmark set"
    return n_batches * args.batch_size / dt, t_first


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num_images", type=int, default=256, help="JPEG files to generate")
    ap.add_argument("--batch_size", type=int, default=32, help="per-host batch size")
    ap.add_argument("--image_size", type=int, default=224, help="output side (multiple of 16)")
    ap.add_argument("--epochs", type=int, default=2, help="timed passes over the files per pipeline run")
    ap.add_argument("--workers", type=str, default="0,1,2", help="comma-separated worker counts")
    ap.add_argument("--decode_repeats", type=int, default=2, help="decode passes (best is kept)")
    args = ap.parse_args(argv)
    if args.image_size % 16:
        ap.error("--image_size must be a multiple of 16")

    from absl import flags
    flags.FLAGS.mark_as_parsed()   # grain's mp_prefetch reads absl flags (google/grain#1355)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    with tempfile.TemporaryDirectory(prefix="maskfeat_bench_") as root:
        t = time.perf_counter()
        kib = make_jpegs(root, args.num_images)
        print(f"{args.num_images} JPEGs, mean {kib:.0f} KiB, written in {time.perf_counter() - t:.1f}s; "
              f"{cores} cores; batch {args.batch_size}; output {args.image_size}px; grid "
              f"{args.image_size // 16}x{args.image_size // 16}")
        paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
        floor = bench_decode(paths, args.decode_repeats)

        rows = [("decode only (PIL, 1 proc)", floor, 1, None)]
        for w in workers:
            ips, t_first = bench_pipeline(root, w, args)
            rows.append((f"pipeline worker_count={w}", ips, max(1, min(w, cores)), t_first))

    head = f"{'config':<28}{'img/s':>9}{'cores':>7}{'img/s/core':>12}{'vs decode':>11}{'per core':>10}{'1st batch':>11}"
    print(head)
    print("-" * len(head))
    for name, ips, used, t_first in rows:
        per_core = ips / used
        first = f"{t_first:.2f}s" if t_first is not None else "-"
        print(f"{name:<28}{ips:>9.1f}{used:>7d}{per_core:>12.1f}{ips / floor:>10.2f}x"
              f"{per_core / floor:>9.2f}x{first:>11}")


if __name__ == "__main__":   # required: grain starts workers with `spawn`
    main()
