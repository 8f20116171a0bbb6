"""Input-pipeline throughput: Pillow decode floor vs the pre-training grain pipeline.

Writes ImageNet-sized JPEGs (about 500x375) into a temporary ``folder:`` dataset, then
measures images/s for

* ``decode``: single-process ``PIL.Image.open(path).convert('RGB')`` to numpy, nothing else;
* ``TrainMap only``: ``pipeline.TrainMap.random_map`` (decode + random resized crop + flip +
  block mask of one example) called in a plain loop, without grain;
* ``block mask only``: ``masking.block_mask`` alone, as a share of the pipeline's time;
* ``pipeline wN``: ``pipeline.train_dataset`` (decode + pretrain augmentation + block mask +
  batch) with ``input.worker_count = N`` (0 = in the main process, N > 0 = grain
  ``mp_prefetch`` worker processes).

Ratios are against the decode floor, both in total and per core (a pipeline with N
workers is charged min(N, cores) cores, the in-process pipeline one core). The floor is
measured again after every other row and the best measurement is used, so a ratio is
not flattered by one slow floor run. In-process rows also give CPU time per image (less
sensitive to other load on the machine than wall time) and minor page faults per image:
a process whose large (>= 128 KiB) allocations are returned to the OS and faulted in
again on every image pays about 3 us per 4 KiB page on some virtual machines, over 1 ms
per image for the floor's copies, so the fault column tells which regime a run was in.
The summary line gives the per-core ratio of ``worker_count=0`` (target >= 0.67) and
the speed-up of 2 workers over 1 (target >= 1.7).

The pipeline reads the files through a source of ``--source_size`` examples (example i is
file i mod num_images; default 1281167, ImageNet-1k's train split). grain's index shuffle
costs about 5 us per example on a dataset that large but 0.02 to 1.3 ms on one of a few
hundred examples, which would otherwise be charged to the pipeline; ``--source_size 0``
uses the files alone.

    python benchmarks/input_pipeline.py [--num_images 256] [--batch_size 32] [--image_size 224]
        [--workers 0,1,2] [--jpeg_size 500x375] [--jpeg_draft] [--source_size 1281167]
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

try:
    import resource  # noqa: E402  (POSIX: page-fault counts)
except ImportError:  # pragma: no cover
    resource = None


def make_jpegs(root: str, n: int, num_classes: int = 8, seed: int = 0, size=(500, 375)) -> float:
    """``n`` photo-like JPEGs (smooth colour field + texture, ``size`` = (w, h)) under
    ``root/train``; every fourth is portrait.

    Returns the mean file size in KiB."""
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(n):
        w, h = size if i % 4 else size[::-1]               # some portrait images, as in ImageNet
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


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def _clocks() -> tuple[float, float, int]:
    return time.perf_counter(), time.process_time(), _minor_faults()


def _rates(start: tuple[float, float, int], n: int) -> tuple[float, float, float]:
    """(images/s of wall time, images/s of this process's CPU time, this process's minor
    page faults per image) since ``start``."""
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    return n / wall, n / max(cpu, 1e-9), (_minor_faults() - start[2]) / n


def bench_decode(paths: list[str], repeats: int) -> tuple[float, float, float]:
    """Best-of-``repeats`` (wall img/s, CPU img/s, faults/img) for plain Pillow decode to an
    RGB uint8 array."""
    best = (0.0, 0.0, 0.0)
    for _ in range(repeats):
        start = _clocks()
        for p in paths:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"))
            assert arr.ndim == 3
        best = max(best, _rates(start, len(paths)))
    return best


class CycledSource:
    """``size`` examples over the files of ``src``: example ``i`` is ``src[i % len(src)]``."""

    def __init__(self, src, size: int):
        self.src, self.size = src, size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return self.src[i % len(self.src)]


def _config(root: str, workers: int, args):
    from maskfeat_jax import config as config_lib

    c = config_lib.base_config()
    c.task = "pretrain"
    c.input.dataset = f"folder:{root}"
    c.input.image_size = args.image_size
    c.input.global_batch_size = args.batch_size
    c.input.worker_count = workers
    c.input.prefetch = 2
    c.input.jpeg_draft = args.jpeg_draft
    c.model.variant = "B/16"
    return c


def _grid(args):
    return (args.image_size // 16, args.image_size // 16)


def bench_map(root: str, args, repeats: int) -> tuple[float, float, float]:
    """Best-of-``repeats`` (wall img/s, CPU img/s, faults/img) for ``TrainMap.random_map`` over
    every file, no grain."""
    from maskfeat_jax.data import pipeline, sources

    c = _config(root, 0, args)
    src = sources.make(c, "train")
    fn = pipeline.TrainMap(c, _grid(args))
    best = (0.0, 0.0, 0.0)
    for r in range(repeats):
        rng = np.random.default_rng(r)
        start = _clocks()
        for i in range(len(src)):
            out = fn.random_map(src[i], rng)
            assert out["valid"]
        best = max(best, _rates(start, len(src)))
    return best


def bench_mask(args, n: int = 2000) -> tuple[float, float, float]:
    """(wall img/s, CPU img/s, faults/img) for ``masking.block_mask`` alone, with the
    pre-training config's settings."""
    from maskfeat_jax import masking

    c = _config("", 0, args)
    rng = np.random.default_rng(0)
    start = _clocks()
    for _ in range(n):
        masking.block_mask(rng, _grid(args), c.mask.ratio, min_aspect=c.mask.min_aspect, tries=c.mask.tries)
    return _rates(start, n)


def bench_pipeline(root: str, workers: int, args) -> tuple[float, float, float, float]:
    """(images/s in steady state, images/s of this process's CPU time, this process's page
    faults per image, seconds to the first batch) for the pre-training pipeline; the CPU
    rate and faults cover the worker processes' work only with ``workers == 0``."""
    from maskfeat_jax.data import pipeline, sources

    c = _config(root, workers, args)
    files = sources.make(c, "train")
    src = CycledSource(files, args.source_size) if args.source_size > 0 else files
    grid = _grid(args)
    n_batches = max(1, args.epochs * len(files) // args.batch_size)

    t0 = time.perf_counter()
    it = iter(pipeline.train_dataset(c, src, grid))
    try:
        first = next(it)                                   # includes worker start-up
        t_first = time.perf_counter() - t0
        assert first["image"].shape == (args.batch_size, args.image_size, args.image_size, 3)
        assert first["mask"].shape == (args.batch_size, grid[0] * grid[1])
        start = _clocks()
        valid = 0
        for _ in range(n_batches):
            b = next(it)
            valid += int(b["valid"].sum())
        ips, cpu_ips, faults = _rates(start, n_batches * args.batch_size)
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    assert valid == n_batches * args.batch_size, "undecodable images in the benchmark set"
    return ips, cpu_ips, faults, t_first


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num_images", type=int, default=256, help="JPEG files to generate")
    ap.add_argument("--batch_size", type=int, default=32, help="per-host batch size")
    ap.add_argument("--image_size", type=int, default=224, help="output side (multiple of 16)")
    ap.add_argument("--epochs", type=int, default=2, help="timed passes over the files per pipeline run")
    ap.add_argument("--workers", type=str, default="0,1,2", help="comma-separated worker counts")
    ap.add_argument("--decode_repeats", type=int, default=2, help="decode passes (best is kept)")
    ap.add_argument("--jpeg_size", type=str, default="500x375", help="generated JPEG size WxH")
    ap.add_argument("--jpeg_draft", action="store_true",
                    help="input.jpeg_draft: decode JPEGs at a reduced DCT scale where the crop allows")
    ap.add_argument("--source_size", type=int, default=1281167,
                    help="examples in the pipeline's source, cycling over the files (0: the files alone)")
    args = ap.parse_args(argv)
    if args.image_size % 16:
        ap.error("--image_size must be a multiple of 16")
    try:
        jpeg_size = tuple(int(v) for v in args.jpeg_size.lower().split("x"))
        assert len(jpeg_size) == 2 and min(jpeg_size) > 0
    except (ValueError, AssertionError):
        ap.error(f"--jpeg_size must be WxH, got {args.jpeg_size!r}")

    from absl import flags
    flags.FLAGS.mark_as_parsed()   # grain's mp_prefetch reads absl flags (google/grain#1355)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    with tempfile.TemporaryDirectory(prefix="maskfeat_bench_") as root:
        t = time.perf_counter()
        kib = make_jpegs(root, args.num_images, size=jpeg_size)
        print(f"{args.num_images} JPEGs of {jpeg_size[0]}x{jpeg_size[1]}, mean {kib:.0f} KiB, written in "
              f"{time.perf_counter() - t:.1f}s; {cores} cores; batch {args.batch_size}; output "
              f"{args.image_size}px; grid {args.image_size // 16}x{args.image_size // 16}; jpeg_draft "
              f"{args.jpeg_draft}; source size {args.source_size or args.num_images}")
        paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
        # the floor is measured again after every other row and its best is kept: a ratio
        # is then never flattered by a slow floor measurement under varying machine load
        floors = [bench_decode(paths, args.decode_repeats)]
        rows = []                        # (name, img/s, CPU img/s, faults/img (None: -), cores, 1st batch)
        ips, cpu, faults = bench_map(root, args, args.decode_repeats)
        rows.append(("TrainMap only (1 proc)", ips, cpu, faults, 1, None))
        floors.append(bench_decode(paths, args.decode_repeats))
        ips, mask_cpu, faults = bench_mask(args)
        rows.append(("block mask only (1 proc)", ips, mask_cpu, faults, 1, None))
        pipe, w0_cpu = {}, None
        for w in workers:
            ips, cpu, faults, t_first = bench_pipeline(root, w, args)
            pipe[w] = ips
            if w == 0:
                w0_cpu = cpu
            rows.append((f"pipeline worker_count={w}", ips, cpu if w == 0 else None,
                         faults if w == 0 else None, max(1, min(w, cores)), t_first))
            floors.append(bench_decode(paths, args.decode_repeats))

    floor, floor_cpu = max(f[0] for f in floors), max(f[1] for f in floors)
    print(f"decode floor measured {len(floors)} times: {min(f[0] for f in floors):.0f} to {floor:.0f} img/s "
          f"(wall), {min(f[1] for f in floors):.0f} to {floor_cpu:.0f} img/s (CPU time), "
          + ", ".join(f"{f[2]:.0f}" for f in floors) + " page faults/img; the best of each rate is used")
    best = max(floors)
    rows.insert(0, ("decode only (PIL, 1 proc)", floor, floor_cpu, best[2], 1, None))

    head = (f"{'config':<28}{'img/s':>9}{'cores':>7}{'img/s/core':>12}{'vs decode':>11}{'per core':>10}"
            f"{'CPU ms/img':>12}{'per core CPU':>14}{'faults/img':>12}{'1st batch':>11}")
    print(head)
    print("-" * len(head))
    for name, ips, cpu, faults, used, t_first in rows:
        per_core = ips / used
        first = f"{t_first:.2f}s" if t_first is not None else "-"
        cpu_ms = f"{1e3 / cpu:.3f}" if cpu else "-"
        cpu_ratio = f"{cpu / floor_cpu:.2f}x" if cpu else "-"
        flt = f"{faults:.0f}" if faults is not None else "-"
        print(f"{name:<28}{ips:>9.1f}{used:>7d}{per_core:>12.1f}{ips / floor:>10.2f}x"
              f"{per_core / floor:>9.2f}x{cpu_ms:>12}{cpu_ratio:>14}{flt:>12}{first:>11}")
    summary = [f"decode {floor:.0f} img/s"]
    summary += [f"w{w} {pipe[w]:.0f} img/s ({pipe[w] / max(1, min(w, cores)) / floor:.2f}x/core)"
                for w in workers]
    if 0 in pipe:
        summary.append(f"w0 per core {pipe[0] / floor:.2f}x (target >= 0.67)")
    if 1 in pipe and 2 in pipe:
        summary.append(f"w2/w1 {pipe[2] / pipe[1]:.2f}x (target >= 1.7)")
    if 0 in pipe:
        summary.append(f"block mask {1e3 / mask_cpu:.3f} CPU ms/img = {w0_cpu / mask_cpu:.0%} of w0's CPU time")
    print("summary: " + "; ".join(summary))


if __name__ == "__main__":   # required: grain starts workers with `spawn`
    main()
