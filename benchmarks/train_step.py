"""Benchmark: speed, FLOP/s and MFU of the real MaskFeat train step, per model size and option.

For every combination of ``--variant`` x ``--dtype`` x ``--attention`` x ``--remat`` it builds
the trainer's state (``train.setup``) and a synthetic global batch as the input pipeline
delivers it (uint8 images, block masks from ``masking.block_mask``, ``sharding.global_batch``),
jits the trainer's own step (``train.jit_step``: explicit shardings, donated state), compiles
it once (the compiler's FLOP count comes from that executable), runs ``--warmup`` steps, then
times ``--repeats`` runs of ``--iters`` steps (``jax.block_until_ready`` after the last one).

The ceiling is the machine's measured large-matmul rate: numpy float32 4096x4096
(``perf.numpy_matmul_flops``) and the jitted JAX float32 matmul. On the CPU the numpy rate is
re-measured right before and right after every timed repeat, and their mean is that repeat's
MFU reference; on an accelerator the MFU reference is the vendor's dense bf16 peak per device
(``perf.PEAK_FLOPS``).

    python benchmarks/train_step.py                                  # CPU: mu/16,S/16 at batch 8
    python benchmarks/train_step.py --variant B/16 --batch 8 --hog_share
    python benchmarks/train_step.py --variant B/16 --profile          # where the step's time goes
    python benchmarks/train_step.py --variant B/16 --xla_options 'xla_cpu_enable_fast_math=true'
    python benchmarks/train_step.py --variant B/16,L/16 --batch 256 --sweep   # accelerators

Like the trainer, it first keeps freed host memory in the process on the CPU
(``maskfeat_jax/host_memory.py``; ``MASKFEAT_KEEP_HOST_MEMORY=off`` for glibc's default, which
page-faults XLA CPU's temporaries anew every step: compare the 'faults' column).

Columns are explained in benchmarks/README.md. The machine may be shared: compare ratios
within one run, not absolute times across runs (the load average is printed at both ends).
"""
from __future__ import annotations

import argparse
import itertools
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from maskfeat_jax import host_memory  # noqa: E402

HOST_MEMORY_KEPT = host_memory.keep_freed_memory()    # as the trainer does, before numpy and jax

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from maskfeat_jax import config as config_lib, perf, sharding, train  # noqa: E402
from maskfeat_jax.data import masking  # noqa: E402
from maskfeat_jax.targets import hog as hog_lib  # noqa: E402

# No XLA CPU flag measured faster for this step on the 2-core development CPU (see README.md:
# thunk runtime and Eigen threading are already the defaults; YNNPACK off, YNNPACK for dots
# only and fast math were within noise of the default or slower; the oneDNN and XNNPACK dot
# options change nothing while YNNPACK is on, see benchmarks/README.md).
RECOMMENDED_CPU_XLA_FLAGS = ""


def loadavg() -> str:
    """The host's 1/5/15-minute load averages (other processes' share of a shared machine)."""
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def make_config(variant: str, batch: int, image_size: int, dtype: str, attention: str, remat: str):
    c = config_lib.base_config()
    c.task = "pretrain"
    c.input.dataset = "synthetic"
    c.model.variant, c.model.dtype, c.model.attention, c.model.remat = variant, dtype, attention, remat
    c.input.image_size, c.input.global_batch_size = image_size, batch
    config_lib.validate(c, jax.device_count(), jax.process_count())
    return c


def synthetic_batch(config, grid, seed: int = 0) -> dict:
    """One host-local pre-training batch, as ``pipeline.train_dataset`` delivers it."""
    rng = np.random.default_rng(seed)
    b, s = config.input.global_batch_size // jax.process_count(), config.input.image_size
    masks = np.stack([masking.block_mask(rng, grid, config.mask.ratio, min_aspect=config.mask.min_aspect,
                                         tries=config.mask.tries).reshape(-1) for _ in range(b)])
    return {"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8), "mask": masks,
            "valid": np.ones((b,), bool)}


def compiler_flops(compiled) -> float:
    """The compiler's FLOPs for one call summed over devices (``cost_analysis`` is per device)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):   # older JAX: one dict per program
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan"))) * jax.device_count()


def parse_xla_options(text: str) -> dict:
    """'name=value;name=value' -> XLA compiler options (``true`` / ``false`` become booleans;
    repeated enum options take comma-separated proto names, e.g.
    ``xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT``; an empty value clears them)."""
    options = {}
    for item in filter(None, text.split(";")):
        name, value = item.split("=", 1)
        options[name.strip()] = {"true": True, "false": False}.get(value.strip(), value.strip())
    return options


def compile_step(config, xla_options: dict | None = None):
    """(setup, mesh, global batch, compiled train step, initial state) for ``config``."""
    mesh = sharding.make_mesh(config.mesh)
    st = train.setup(config, mesh, steps_per_epoch=1000, total_steps=100_000)
    batch = sharding.global_batch(mesh, synthetic_batch(config, st.model.encoder.grid))
    with jax.set_mesh(mesh):
        state = st.init()
        compiled = train.jit_step(st, mesh, batch).lower(state, batch).compile(
            compiler_options=xla_options or None)
    return st, mesh, batch, compiled, state


class Run:
    """One compiled configuration, ready to time."""

    def __init__(self, config, xla_options: dict | None = None):
        t0 = time.perf_counter()
        self.config = config
        self.st, self.mesh, self.batch, self.compiled, self.state = compile_step(config, xla_options)
        self.compile_seconds = time.perf_counter() - t0
        self.times: list[float] = []
        self.ceilings: list[float] = []
        self.faults: list[float] = []       # minor page faults per step (the whole process)

    def step(self, n: int):
        with jax.set_mesh(self.mesh):
            for _ in range(n):
                self.state, self.metrics = self.compiled(self.state, self.batch)
            jax.block_until_ready((self.state, self.metrics))


def time_interleaved(runs: list[Run], args) -> None:
    """Warm-up, then ``--repeats`` rounds; each round times every run once (``--iters`` steps).
    On the CPU the numpy ceiling is measured just before and just after each timing and their
    mean is that timing's reference (a shared machine's load changes within a round)."""
    cpu = jax.default_backend() == "cpu"
    for r in runs:
        r.step(args.warmup)
    for _ in range(args.repeats):
        for r in runs:
            before = perf.numpy_matmul_flops(iters=1) if cpu else 0.0
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter()
            r.step(args.iters)
            r.times.append((time.perf_counter() - t) / args.iters)
            r.faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.iters)
            if cpu:
                r.ceilings.append(0.5 * (before + perf.numpy_matmul_flops(iters=1)))


def summarize(r: Run, args) -> dict:
    analytic = perf.model_flops_per_image(r.st.model, r.config) * r.config.input.global_batch_size
    per_repeat = [analytic / jax.device_count() / t for t in r.times]      # model FLOP/s per device
    refs = r.ceilings or [args.peak] * len(per_repeat)
    return {"step": min(r.times), "median": float(np.median(r.times)), "analytic": analytic,
            "compiler": compiler_flops(r.compiled), "achieved": max(per_repeat),
            "mfu": float(np.median([a / c for a, c in zip(per_repeat, refs)])), "ceiling": float(np.median(refs)),
            "compile": r.compile_seconds, "faults": float(np.median(r.faults))}


def profile_step(run: Run, top: int = 10) -> None:
    """Trace one step (``jax.profiler``) and print where its wall time goes on the XLA CPU
    threads: while a matmul runs (a dot thunk or a library fusion containing a dot), while only
    other ops run (largest first, by the op that produced them), and while no op event is open
    (thunk dispatch, and Eigen dots, whose work runs on the pool after their event closes)."""
    import collections
    import glob
    import re
    import tempfile

    hlo = run.compiled.as_text()
    callee = dict(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?calls=%([\w.\-]+)", hlo, re.M))
    bodies = dict(re.findall(r"^%([\w.\-]+) .*?\{\n(.*?)\n\}", hlo, re.M | re.S))
    op_names = dict(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo, re.M))

    def is_dot(name):
        return name.startswith("dot") or " dot(" in bodies.get(callee.get(name, ""), "")

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            run.step(1)
        files = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(files[0]) if files else None
    skip = ("ThunkExecutor", "end:", "Slinky", "Threadpool")
    events = [(e.start_ns, e.start_ns + e.duration_ns, e.name) for p in (data.planes if data else [])
              for line in p.lines if line.name.startswith("tf_XLA") for e in line.events
              if not e.name.startswith(skip)]
    if not events:
        print("profile: no XLA CPU op events in the trace")
        return
    points = sorted([(s, 1, n) for s, _, n in events] + [(e, -1, n) for _, e, n in events])
    dots = others = 0
    open_other: collections.Counter = collections.Counter()
    spent = collections.Counter()
    t_dot = t_other = t_none = 0
    last = points[0][0]
    for t, step, name in points:
        dt = t - last
        if dots:
            t_dot += dt
        elif others:
            t_other += dt
            for k in open_other:
                spent[k] += dt / len(open_other)
        else:
            t_none += dt
        if is_dot(name):
            dots += step
        else:
            others += step
            key = re.sub(r"^jit\([^)]*\)/", "", op_names.get(name, name))
            open_other[key] += step
            if not open_other[key]:
                del open_other[key]
        last = t
    span = points[-1][0] - points[0][0]
    print(f"\nprofile of one step ({span / 1e6:.0f} ms traced): a matmul running {t_dot / span:.1%}, "
          f"only other ops {t_other / span:.1%}, no op event {t_none / span:.1%} (dispatch, Eigen dots' pool work)")
    for k, v in spent.most_common(top):
        print(f"  {v / span:6.1%}  {k[:100]}")


def hog_share(config, args) -> dict:
    """The step against the same step with the HOG targets replaced by zeros of their shape
    (timed interleaved), HOG alone in jit (``benchmarks/hog.py``'s ``time_hog``), and the
    vectorised numpy HOG, all at ``--batch``."""
    real = hog_lib.hog_targets

    def zeros_like_hog(images, **kw):
        out = jax.eval_shape(lambda x: real(x, **kw), images)
        return jnp.zeros(out.shape, out.dtype)

    full = Run(config)
    hog_lib.hog_targets = zeros_like_hog      # steps.py looks it up when the step is traced
    try:
        no_hog = Run(config)
    finally:
        hog_lib.hog_targets = real
    time_interleaved([full, no_hog], args)
    del full.state, no_hog.state
    from benchmarks import hog as hog_bench   # the jitted-vs-numpy HOG benchmark
    b, s = config.input.global_batch_size, config.input.image_size
    return {"step": min(full.times), "no_hog": min(no_hog.times),
            "hog_flops": compiler_flops(full.compiled) - compiler_flops(no_hog.compiled),
            "hog": hog_bench.time_hog(b, s, max(5, args.iters * args.repeats)),
            "numpy": hog_bench.time_numpy(b, s, max(3, args.repeats))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="mu/16,S/16", help="comma-separated ViT variants, e.g. B/16,L/16")
    ap.add_argument("--batch", type=int, default=8, help="global batch size")
    ap.add_argument("--image_size", type=int, default=224)
    ap.add_argument("--dtype", default="float32", help="comma-separated: float32,bfloat16")
    ap.add_argument("--attention", default="auto", help="comma-separated: auto,xla,einsum,cudnn (GPU)")
    ap.add_argument("--remat", default="none", help="comma-separated: none,dots_saveable,full")
    ap.add_argument("--sweep", action="store_true", help="all dtypes, attention implementations and remat "
                    "policies (cudnn on GPU only); overrides --dtype/--attention/--remat")
    ap.add_argument("--iters", type=int, default=2, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (fastest and median are reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    ap.add_argument("--peak", type=float, default=0.0, help="per-device peak FLOP/s for MFU off the CPU "
                    "(default: perf.PEAK_FLOPS by device kind)")
    ap.add_argument("--hog_share", action="store_true",
                    help="also time each variant's step without HOG, and HOG alone (first dtype/option)")
    ap.add_argument("--xla_options", action="append", default=[], metavar="NAME=VALUE;...",
                    help="also compile each configuration with these XLA compiler options and time it "
                    "interleaved with the default (repeatable), e.g. 'xla_cpu_enable_fast_math=true'")
    ap.add_argument("--profile", action="store_true",
                    help="trace one step of each configuration and print where its time goes")
    args = ap.parse_args(argv)
    if args.sweep:
        args.dtype, args.remat = "float32,bfloat16", "none,dots_saveable,full"
        args.attention = "xla,einsum" + (",cudnn" if jax.default_backend() == "gpu" else "")

    backend, n = jax.default_backend(), jax.device_count()
    print(f"jax {jax.__version__}, {n} x {jax.devices()[0].device_kind} ({backend}), "
          f"{jax.process_count()} process(es), {os.cpu_count()} CPUs visible; load average {loadavg()}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
          + (f"; recommended on CPU: XLA_FLAGS={RECOMMENDED_CPU_XLA_FLAGS!r} (none helped; see "
             "benchmarks/README.md)" if backend == "cpu" else ""))
    print(f"host memory: {'kept' if HOST_MEMORY_KEPT else 'returned to the OS'} "
          f"({host_memory.ENV}={os.environ.get(host_memory.ENV, 'auto')}; 'faults' = page faults per step)")
    np_rate = perf.numpy_matmul_flops()
    jax_rate = perf.measured_matmul_flops(4096, iters=3)
    args.peak, peak_src = perf.peak_flops_per_device(args.peak)
    print(f"ceiling: numpy float32 4096^2 matmul {np_rate / 1e9:.1f} GFLOP/s, jitted JAX float32 4096^2 "
          f"matmul {jax_rate / 1e9:.1f} GFLOP/s per device ({jax_rate / np_rate:.0%} of numpy)")
    print("MFU reference: " + ("numpy's rate, re-measured around every timed repeat ('ceiling')"
                               if backend == "cpu" else f"{args.peak / 1e12:.0f} TFLOP/s per device ({peak_src})"))
    print(f"global batch {args.batch}, {args.image_size}px; {args.warmup} warm-up step(s), then "
          f"{args.repeats} repeats of {args.iters} steps")

    option_sets = [("", {})] + [(o, parse_xla_options(o)) for o in args.xla_options]
    if args.xla_options:
        print("XLA options: " + "; ".join(f"[{i}] {o}" for i, (o, _) in enumerate(option_sets) if i)
              + " (each timed interleaved with [0], the default)")
    head = (f"{'variant':<8}{'dtype':<10}{'attn':<8}{'remat':<15}" + (f"{'xla':<5}" if args.xla_options else "")
            + f"{'step ms':>9}{'median':>9}{'img/s':>8}"
            f"{'GF/step':>9}{'XLA GF':>9}{'GFLOP/s':>9}{'MFU':>7}{'ceiling':>9}{'compile':>9}{'faults':>9}")
    print(head + "\n" + "-" * len(head))
    configs = {}
    for variant, dtype, attention, remat in itertools.product(*(s.split(",") for s in (
            args.variant, args.dtype, args.attention, args.remat))):
        config = make_config(variant, args.batch, args.image_size, dtype, attention, remat)
        configs.setdefault(variant, config)
        runs = [Run(config, options) for _, options in option_sets]
        time_interleaved(runs, args)
        for i, run in enumerate(runs):
            r = summarize(run, args)
            print(f"{variant:<8}{dtype:<10}{attention:<8}{remat:<15}" + (f"[{i}]  " if args.xla_options else "")
                  + f"{r['step'] * 1e3:>9.1f}{r['median'] * 1e3:>9.1f}"
                  f"{args.batch / r['step']:>8.1f}{r['analytic'] / 1e9:>9.1f}{r['compiler'] / 1e9:>9.1f}"
                  f"{r['achieved'] / 1e9:>9.1f}{r['mfu']:>7.1%}{r['ceiling'] / 1e9:>9.1f}{r['compile']:>8.1f}s"
                  f"{r['faults']:>9.0f}",
                  flush=True)
        if args.profile:
            profile_step(runs[0])
        for run in runs:
            del run.state

    print(f"load average at the end: {loadavg()}")
    if args.hog_share:
        print(f"\nHOG share of the step ({args.dtype.split(',')[0]}, batch {args.batch}; fastest of {args.repeats}, "
              f"interleaved): 'no HOG' = the same step with targets replaced by zeros; 'HOG jit' = hog_targets "
              f"alone, jitted (median)")
        head = (f"{'variant':<8}{'step ms':>9}{'no HOG':>9}{'HOG GF':>8}{'HOG jit':>9}{'numpy HOG':>11}"
                f"{'share (diff)':>14}{'share (jit)':>13}{'jit vs numpy':>14}")
        print(head + "\n" + "-" * len(head))
        for variant, config in configs.items():
            s = hog_share(config, args)
            print(f"{variant:<8}{s['step'] * 1e3:>9.1f}{s['no_hog'] * 1e3:>9.1f}{s['hog_flops'] / 1e9:>8.2f}"
                  f"{s['hog'] * 1e3:>9.2f}{s['numpy'] * 1e3:>11.2f}{(s['step'] - s['no_hog']) / s['step']:>14.1%}"
                  f"{s['hog'] / s['step']:>13.2%}{s['numpy'] / s['hog']:>13.1f}x", flush=True)


if __name__ == "__main__":
    main()
