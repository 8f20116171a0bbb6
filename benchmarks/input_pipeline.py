"""Input-pipeline throughput: the JPEG decode floors vs the image training maps and pipelines.

Writes ImageNet-sized JPEGs (about 500x375) into a temporary ``folder:`` dataset, then
measures images/s for

* ``decode PIL``: single-process ``PIL.Image.open(path).convert('RGB')`` to numpy, nothing
  else: the floor every ratio is taken against;
* ``decode simplejpeg``: the file read and ``simplejpeg.decode_jpeg(data, 'RGB')``, the
  decode of ``input.image_backend='cv2'``;
* ``torchvision-style``: the peer, torchvision's ``RandomResizedCrop(scale=(0.5, 1),
  bicubic)`` + ``RandomHorizontalFlip`` on a Pillow image written out (Pillow decode, crop,
  antialiased bicubic resize, flip, to numpy), no mask;
* ``map <task> <backend>``: ``pipeline.TrainMap.random_map`` (decode + random resized crop +
  flip + block mask for pre-training, + RandAugment + erase box for fine-tuning) called in a
  plain loop, without grain, under ``input.image_backend`` ``cv2`` and ``pil``;
* ``RandAugment array<->PIL``: the conversion a ``cv2`` fine-tuning example pays to run
  RandAugment on Pillow; ``block mask only``: ``masking.block_mask`` alone;
* ``pipe <task> <backend> wN``: ``pipeline.train_dataset`` (map + batch) with
  ``input.worker_count = N`` (0 = in the main process, N > 0 = grain ``mp_prefetch``
  worker processes).

Ratios are against the Pillow decode floor, both in total and per core (a pipeline with N
workers is charged min(N, cores) cores, the in-process rows one core). Both floors are
measured again after every pipeline row and the best of each is used, so a ratio is not
flattered by one slow floor run. In-process rows also give CPU time per image (less
sensitive to other load on the machine than wall time) and minor page faults per image:
a process whose large (>= 128 KiB) allocations are returned to the OS and faulted in
again on every image pays about 3 us per 4 KiB page on some virtual machines, over 1 ms
per image for the floor's copies, so the fault column tells which regime a run was in.
Every process keeps its freed memory (``host_memory``, as ``maskfeat_jax.main`` and grain's
workers do): without it Pillow's decode alone ran at half its rate on a 2-core VM.
``decode PIL x N procs`` runs the Pillow decode floor in N processes at once: the machine's
own ceiling for N CPU-bound processes (N times the floor only where N cores are free and
nothing else is shared). Rows with workers give the main process's CPU time per image (it
only receives batches). The summary gives, per backend, the per-core ratio of the
pre-training pipeline with ``worker_count=0`` in wall and in CPU time (goal >= 0.8, 0.9
hoped for) and the speed-up of 2 workers over 1 (goal >= 1.7; only an otherwise idle
machine can show it) beside the machine's own 2-process ceiling.

The pipeline reads the files through a source of ``--source_size`` examples (example i is
file i mod num_images; default 1281167, ImageNet-1k's train split). grain's index shuffle
costs about 5 us per example on a dataset that large but 0.02 to 1.3 ms on one of a few
hundred examples, which would otherwise be charged to the pipeline; ``--source_size 0``
uses the files alone.

    python benchmarks/input_pipeline.py [--num_images 256] [--batch_size 32] [--image_size 224]
        [--workers 0,1,2] [--backends cv2,pil] [--tasks pretrain,finetune] [--jpeg_size 500x375]
        [--jpeg_draft] [--source_size 1281167]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # an input benchmark: keep jax off accelerators
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from maskfeat_jax import host_memory  # noqa: E402

host_memory.keep_freed_memory()   # as maskfeat_jax.main does, before numpy; grain's workers as well

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


def _decode_pil(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _decode_simplejpeg(path: str) -> np.ndarray:
    import simplejpeg

    with open(path, "rb") as f:
        return simplejpeg.decode_jpeg(f.read(), "RGB")


def bench_decode(paths: list[str], repeats: int, decode=_decode_pil) -> tuple[float, float, float]:
    """Best-of-``repeats`` (wall img/s, CPU img/s, faults/img) for ``decode`` (a path to an RGB
    uint8 array) over ``paths``."""
    best = (0.0, 0.0, 0.0)
    for _ in range(repeats):
        start = _clocks()
        for p in paths:
            assert decode(p).ndim == 3
        best = max(best, _rates(start, len(paths)))
    return best


def _decode_loop(paths: list[str], repeats: int, start, out) -> None:
    """A child of :func:`bench_parallel_decode`: once all children are up (``start``, a
    barrier), the Pillow decode floor over ``paths``; its best (wall img/s) put on ``out``."""
    host_memory.keep_freed_memory("on")    # as this process and grain's workers
    start.wait()
    out.put(bench_decode(paths, repeats)[0])


def bench_parallel_decode(paths: list[str], repeats: int, processes: int) -> float:
    """Images/s of ``processes`` Pillow decode loops run at once, each over all of ``paths``
    (the sum of their best rates): what this machine gives ``processes`` independent
    CPU-bound processes, the ceiling for as many grain workers."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out, start = ctx.Queue(), ctx.Barrier(processes)
    procs = [ctx.Process(target=_decode_loop, args=(paths, repeats, start, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    rates = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return float(sum(rates))


def bench_peer(paths: list[str], args, repeats: int) -> tuple[float, float, float]:
    """torchvision's ``RandomResizedCrop(size, (0.5, 1), BICUBIC)`` then ``RandomHorizontalFlip``
    on ``Image.open(path).convert('RGB')`` (``F.resized_crop`` is Pillow crop + resize), to numpy."""
    from maskfeat_jax.data import transforms as T

    size = (args.image_size, args.image_size)
    best = (0.0, 0.0, 0.0)
    for r in range(repeats):
        rng = np.random.default_rng(r)
        start = _clocks()
        for p in paths:
            with Image.open(p) as im:
                img = im.convert("RGB")
            top, left, h, w = T.rrc_params(img.height, img.width, rng, (0.5, 1.0))
            img = img.crop((left, top, left + w, top + h)).resize(size, Image.Resampling.BICUBIC)
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            assert np.asarray(img).shape == size + (3,)
        best = max(best, _rates(start, len(paths)))
    return best


def bench_convert(args, n: int = 2000) -> tuple[float, float, float]:
    """(wall img/s, CPU img/s, faults/img) for an output-sized array to Pillow and back, as
    ``rand_augment.rand_augment`` converts a ``cv2`` fine-tuning example."""
    img = np.random.default_rng(0).integers(0, 256, (args.image_size, args.image_size, 3), np.uint8)
    start = _clocks()
    for _ in range(n):
        np.array(Image.fromarray(img))
    return _rates(start, n)


class CycledSource:
    """``size`` examples over the files of ``src``: example ``i`` is ``src[i % len(src)]``."""

    def __init__(self, src, size: int):
        self.src, self.size = src, size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return self.src[i % len(self.src)]


def _config(root: str, workers: int, args, task: str = "pretrain", backend: str = "cv2"):
    from maskfeat_jax import config as config_lib

    c = config_lib.base_config()
    c.task = task
    c.input.dataset = f"folder:{root}"
    c.input.image_size = args.image_size
    c.input.global_batch_size = args.batch_size
    c.input.worker_count = workers
    c.input.prefetch = 2
    c.input.jpeg_draft = args.jpeg_draft
    c.input.image_backend = backend
    c.model.variant = "B/16"
    return c


def _grid(args):
    return (args.image_size // 16, args.image_size // 16)


def bench_map(root: str, args, repeats: int, task: str, backend: str) -> tuple[float, float, float]:
    """Best-of-``repeats`` (wall img/s, CPU img/s, faults/img) for ``TrainMap.random_map`` over
    every file, no grain."""
    from maskfeat_jax.data import pipeline, sources

    c = _config(root, 0, args, task, backend)
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
    from maskfeat_jax.data import masking

    c = _config("", 0, args)
    rng = np.random.default_rng(0)
    start = _clocks()
    for _ in range(n):
        masking.block_mask(rng, _grid(args), c.mask.ratio, min_aspect=c.mask.min_aspect, tries=c.mask.tries)
    return _rates(start, n)


def bench_pipeline(root: str, workers: int, args, task: str,
                   backend: str) -> tuple[float, float, float, float]:
    """(images/s in steady state, images/s of this process's CPU time, this process's page
    faults per image, seconds to the first batch) for the ``task`` pipeline; the CPU rate
    and faults cover the worker processes' work only with ``workers == 0``."""
    from maskfeat_jax.data import pipeline, sources

    c = _config(root, workers, args, task, backend)
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
        if task == "pretrain":
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
    ap.add_argument("--backends", type=str, default="cv2,pil", help="input.image_backend values to run")
    ap.add_argument("--tasks", type=str, default="pretrain,finetune", help="tasks whose maps to run")
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
    backends = [b for b in args.backends.split(",") if b.strip()]
    tasks = [t for t in args.tasks.split(",") if t.strip()]
    with tempfile.TemporaryDirectory(prefix="maskfeat_bench_") as root:
        t = time.perf_counter()
        kib = make_jpegs(root, args.num_images, size=jpeg_size)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"{args.num_images} JPEGs of {jpeg_size[0]}x{jpeg_size[1]}, mean {kib:.0f} KiB, written in "
              f"{time.perf_counter() - t:.1f}s; {cores} cores, load average {load:.1f}; batch {args.batch_size}; "
              f"output {args.image_size}px; grid {args.image_size // 16}x{args.image_size // 16}; jpeg_draft "
              f"{args.jpeg_draft}; source size {args.source_size or args.num_images}")
        paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
        # both floors are measured again after every pipeline row and their best is kept: a
        # ratio is then never flattered by a slow floor measurement under varying machine load
        floors, sj_floors = [], []

        def measure_floors():
            floors.append(bench_decode(paths, args.decode_repeats))
            sj_floors.append(bench_decode(paths, args.decode_repeats, _decode_simplejpeg))

        measure_floors()
        parallel = {n: bench_parallel_decode(paths, args.decode_repeats, n)
                    for n in sorted({w for w in workers if w > 1})}
        rows = []                        # (name, img/s, CPU img/s, faults/img (None: -), cores, 1st batch)
        for n, ips in parallel.items():
            rows.append((f"decode PIL x {n} procs", ips, None, None, min(n, cores), None))
        ips, cpu, faults = bench_peer(paths, args, args.decode_repeats)
        rows.append(("torchvision-style (PIL)", ips, cpu, faults, 1, None))
        for task in tasks:
            for backend in backends:
                ips, cpu, faults = bench_map(root, args, args.decode_repeats, task, backend)
                rows.append((f"map {task} {backend}", ips, cpu, faults, 1, None))
        if "finetune" in tasks:
            rows.append(("RandAugment array<->PIL", *bench_convert(args), 1, None))
        ips, mask_cpu, faults = bench_mask(args)
        rows.append(("block mask only", ips, mask_cpu, faults, 1, None))
        pipe, w0_cpu = {}, {}
        for task in tasks:
            for backend in backends:
                for w in workers:
                    ips, cpu, faults, t_first = bench_pipeline(root, w, args, task, backend)
                    pipe[task, backend, w] = ips
                    if w == 0:
                        w0_cpu[task, backend] = cpu
                    rows.append((f"pipe {task} {backend} w{w}", ips, cpu, faults if w == 0 else None,
                                 max(1, min(w, cores)), t_first))
                    measure_floors()

    floor, floor_cpu = max(f[0] for f in floors), max(f[1] for f in floors)
    print(f"PIL decode floor measured {len(floors)} times: {min(f[0] for f in floors):.0f} to {floor:.0f} "
          f"img/s (wall), {min(f[1] for f in floors):.0f} to {floor_cpu:.0f} img/s (CPU time), "
          + ", ".join(f"{f[2]:.0f}" for f in floors) + " page faults/img; the best of each rate is used")
    rows.insert(0, ("decode PIL (floor)", floor, floor_cpu, max(floors)[2], 1, None))
    rows.insert(1, ("decode simplejpeg", max(f[0] for f in sj_floors), max(f[1] for f in sj_floors),
                    max(sj_floors)[2], 1, None))

    # CPU columns: the whole work for in-process rows; with workers, the main process's share
    head = (f"{'config':<28}{'img/s':>9}{'cores':>7}{'img/s/core':>12}{'vs decode':>11}{'per core':>10}"
            f"{'CPU ms/img':>12}{'per core CPU':>14}{'faults/img':>12}{'1st batch':>11}")
    print(head)
    print("-" * len(head))
    for name, ips, cpu, faults, used, t_first in rows:
        per_core = ips / used
        first = f"{t_first:.2f}s" if t_first is not None else "-"
        main_only = name.startswith("pipe ") and not name.endswith(" w0")
        cpu_ms = (f"{1e3 / cpu:.3f}" + ("m" if main_only else "")) if cpu else "-"
        cpu_ratio = f"{cpu / floor_cpu:.2f}x" if cpu and not main_only else "-"
        flt = f"{faults:.0f}" if faults is not None else "-"
        print(f"{name:<28}{ips:>9.1f}{used:>7d}{per_core:>12.1f}{ips / floor:>10.2f}x"
              f"{per_core / floor:>9.2f}x{cpu_ms:>12}{cpu_ratio:>14}{flt:>12}{first:>11}")
    summary = [f"PIL decode {floor:.0f} img/s"]
    for backend in backends:
        if ("pretrain", backend, 0) in pipe:
            summary.append(f"{backend} pretrain w0 per core {pipe['pretrain', backend, 0] / floor:.2f}x, "
                           f"{w0_cpu['pretrain', backend] / floor_cpu:.2f}x in CPU time (goal >= 0.8)")
        if ("pretrain", backend, 1) in pipe and ("pretrain", backend, 2) in pipe:
            summary.append(f"{backend} pretrain w2/w1 "
                           f"{pipe['pretrain', backend, 2] / pipe['pretrain', backend, 1]:.2f}x (goal >= 1.7)")
    if 2 in parallel:
        summary.append(f"machine: 2 decode processes at once {parallel[2] / floor:.2f}x one")
    if ("pretrain", backends[0], 0) in w0_cpu:
        summary.append(f"block mask {1e3 / mask_cpu:.3f} CPU ms/img = "
                       f"{w0_cpu['pretrain', backends[0]] / mask_cpu:.0%} of {backends[0]} pretrain w0's CPU time")
    print("CPU ms/img marked m: the main process's own CPU time per image (the workers' is not counted)")
    print("summary: " + "; ".join(summary))


if __name__ == "__main__":   # required: grain starts workers with `spawn`
    main()
