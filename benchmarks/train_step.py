"""Benchmark: speed, FLOP/s and MFU of the real MaskFeat train step, per model size and option.

For every combination of ``--variant`` x ``--dtype`` x ``--attention`` x ``--remat`` it builds
the trainer's state (``train.setup``), a synthetic global batch (uint8 images, block masks
from ``masking.block_mask``, ``sharding.global_batch``), jits the trainer's step
(``train.jit_step``: explicit shardings, donated state), compiles it once (the compiler's
FLOP count comes from this executable), warms up, and times ``--iters`` steps ``--repeats``
times (the fastest repeat is reported; ``jax.block_until_ready`` after the last step).

The ceiling is the machine's measured large-matmul rate: numpy float32 4096x4096
(``perf.numpy_matmul_flops``) and the jitted JAX matmul, measured in the same run (on an
accelerator, the vendor's dense bf16 peak from ``perf.PEAK_FLOPS`` is the MFU reference).

    python benchmarks/train_step.py                                  # CPU defaults: mu/16,S/16, batch 8
    python benchmarks/train_step.py --variant B/16 --batch 16 --hog_share
    python benchmarks/train_step.py --variant B/16,L/16 --batch 256 --dtype float32,bfloat16 \\
        --attention xla,einsum,cudnn --remat none,dots_saveable,full      # accelerators

See benchmarks/README.md for the columns. Timing on a shared machine is noisy: compare
ratios within one run (the ceiling is re-measured next to every row).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from maskfeat_jax import config as config_lib, masking, perf, sharding, train  # noqa: E402
from maskfeat_jax.targets import hog as hog_lib  # noqa: E402

# XLA CPU flags worth setting in the environment for this benchmark (see README.md).
RECOMMENDED_CPU_FLAGS = ""


def make_config(variant: str, batch: int, image_size: int, dtype: str, attention: str, remat: str):
    c = config_lib.base_config()
    c.task = "pretrain"
    c.input.dataset = "synthetic"
    c.model.variant, c.model.dtype, c.model.attention, c.model.remat = variant, dtype, attention, remat
    c.input.image_size, c.input.global_batch_size = image_size, batch
    config_lib.validate(c, jax.device_count(), jax.process_count())
    return c


def synthetic_batch(config, grid, seed: int = 0) -> dict:
    """One host-local pre-training batch as the input pipeline delivers it."""
    rng = np.random.default_rng(seed)
    b, s = config.input.global_batch_size // jax.process_count(), config.input.image_size
    masks = np.stack([masking.block_mask(rng, grid, config.mask.ratio, min_aspect=config.mask.min_aspect,
                                         tries=config.mask.tries).reshape(-1) for _ in range(b)])
    return {"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8), "mask": masks,
            "valid": np.ones((b,), bool)}


def compiler_flops(compiled) -> float:
    """The compiler's FLOP count of one call, summed over devices (cost_analysis is per device)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):   # older JAX: one dict per program
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan"))) * jax.device_count()


def time_steps(fn, state, batch, iters: int, repeats: int, warmup: int):
    """(fastest, median) seconds per step over ``repeats`` runs of ``iters`` steps; returns the state."""
    for _ in range(warmup):
        state, m = fn(state, batch)
    jax.block_until_ready((state, m))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iters):
            state, m = fn(state, batch)
        jax.block_until_ready((state, m))
        times.append((time.perf_counter() - t) / iters)
    return min(times), float(np.median(times)), state


def compile_step(config, step_fn=None):
    """(setup, mesh, global batch, compiled step, initial state) for ``config``."""
    mesh = sharding.make_mesh(config.mesh)
    st = train.setup(config, mesh, steps_per_epoch=1000, total_steps=100_000)
    if step_fn is not None:
        st.step_fn = step_fn(st)
    batch = sharding.global_batch(mesh, synthetic_batch(config, st.model.encoder.grid))
    with jax.set_mesh(mesh):
        state = st.init()
        compiled = train.jit_step(st, mesh, batch).lower(state, batch).compile()
    return st, mesh, batch, compiled, state


def bench_config(config, args, peak: float, step_fn=None) -> dict:
    t0 = time.perf_counter()
    st, mesh, batch, compiled, state = compile_step(config, step_fn)
    t_compile = time.perf_counter() - t0
    n = jax.device_count()
    analytic = perf.model_flops_per_image(st.model, config) * config.input.global_batch_size
    with jax.set_mesh(mesh):
        best, median, state = time_steps(compiled, state, batch, args.iters, args.repeats, args.warmup)
    ceiling = perf.numpy_matmul_flops() if jax.default_backend() == "cpu" else float("nan")
    del state
    achieved = analytic / best / n    # model FLOP/s per device
    return {"step": best, "median": median, "analytic": analytic, "compiler": compiler_flops(compiled),
            "achieved": achieved, "mfu": achieved / (ceiling if jax.default_backend() == "cpu" else peak),
            "vs_numpy": achieved / ceiling, "compile": t_compile, "ceiling": ceiling, "st": st}


def hog_share(config, args, base: dict) -> dict:
    """The step with HOG targets replaced by zeros of the same shape, and HOG alone in jit."""
    real = hog_lib.hog_targets

    def zeros_like_hog(images, **kw):
        shape = jax.eval_shape(lambda x: real(x, **kw), images)
        return jnp.zeros(shape.shape, shape.dtype)

    hog_lib.hog_targets = zeros_like_hog      # steps.py looks it up at trace time
    try:
        no_hog = bench_config(config, args, float("nan"))
    finally:
        hog_lib.hog_targets = real

    h, patch = config.hog, base["st"].model.encoder.patch
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (config.input.global_batch_size,) +
                                                          (config.input.image_size,) * 2 + (3,), np.uint8))
    mean, std = jnp.asarray(config.input.mean), jnp.asarray(config.input.std)
    fn = jax.jit(lambda x: real((x.astype(jnp.float32) / 255.0 - mean) / std, patch_size=patch, nbins=h.nbins,
                                cell_size=h.cell_size, gaussian_window=h.gaussian_window))
    jax.block_until_ready(fn(images))
    t_hog = min(_timed(lambda: jax.block_until_ready(fn(images))) for _ in range(args.iters * args.repeats))

    from benchmarks.hog import numpy_hog_targets   # the vectorised numpy reference
    x = np.asarray(images, np.float32)
    numpy_hog_targets(x)
    t_np = min(_timed(lambda: numpy_hog_targets(x)) for _ in range(max(3, args.repeats)))
    return {"step": base["step"], "no_hog": no_hog["step"], "hog": t_hog, "numpy": t_np}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="mu/16,S/16", help="comma-separated ViT variants, e.g. B/16,L/16")
    ap.add_argument("--batch", type=int, default=8, help="global batch size")
    ap.add_argument("--image_size", type=int, default=224)
    ap.add_argument("--dtype", default="float32", help="comma-separated: float32,bfloat16")
    ap.add_argument("--attention", default="xla", help="comma-separated: xla,einsum,cudnn (GPU),auto")
    ap.add_argument("--remat", default="none", help="comma-separated: none,dots_saveable,full")
    ap.add_argument("--iters", type=int, default=3, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (fastest is reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    ap.add_argument("--hog_share", action="store_true",
                    help="also time each variant's step without HOG, and HOG alone (first dtype/option)")
    args = ap.parse_args(argv)

    backend, n = jax.default_backend(), jax.device_count()
    kind = jax.devices()[0].device_kind
    print(f"jax {jax.__version__} on {n} x {kind} ({backend}), {jax.process_count()} process(es); "
          f"{os.cpu_count()} CPUs visible")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if backend == "cpu":
        print(f"recommended on CPU: XLA_FLAGS='{RECOMMENDED_CPU_FLAGS}' (see benchmarks/README.md)")
    np_rate = perf.numpy_matmul_flops()
    jax_rate = perf.measured_matmul_flops(4096, iters=3)
    peak, peak_src = perf.peak_flops_per_device()
    print(f"ceiling: numpy float32 4096^2 matmul {np_rate / 1e9:.1f} GFLOP/s, jitted JAX float32 4096^2 "
          f"matmul {jax_rate / 1e9:.1f} GFLOP/s per device; MFU reference: "
          + ("the numpy rate next to each row" if backend == "cpu" else f"{peak / 1e12:.0f} TFLOP/s ({peak_src})"))
    print(f"batch {args.batch} (global), {args.image_size}px; step time = fastest of {args.repeats} x "
          f"{args.iters} steps after {args.warmup} warm-up steps")

    head = (f"{'variant':<8}{'dtype':<9}{'attn':<7}{'remat':<14}{'step ms':>9}{'median':>9}{'img/s':>8}"
            f"{'GF/step':>9}{'XLA GF':>9}{'GFLOP/s':>9}{'MFU':>7}{'ceiling':>9}{'compile':>9}")
    print(head)
    print("-" * len(head))
    results = {}
    for variant, dtype, attention, remat in itertools.product(*(s.split(",") for s in (
            args.variant, args.dtype, args.attention, args.remat))):
        config = make_config(variant, args.batch, args.image_size, dtype, attention, remat)
        r = bench_config(config, args, peak)
        results.setdefault(variant, (config, r))
        print(f"{variant:<8}{dtype:<9}{attention:<7}{remat:<14}{r['step'] * 1e3:>9.1f}{r['median'] * 1e3:>9.1f}"
              f"{args.batch / r['step']:>8.1f}{r['analytic'] / 1e9:>9.1f}{r['compiler'] / 1e9:>9.1f}"
              f"{r['achieved'] / 1e9:>9.1f}{r['mfu']:>7.1%}{r['ceiling'] / 1e9:>9.1f}{r['compile']:>8.1f}s",
              flush=True)

    if args.hog_share:
        print(f"\nHOG share of the step ({args.dtype.split(',')[0]}, batch {args.batch}): 'no HOG' = the same step "
              f"with targets replaced by zeros; 'HOG jit' = normalise + hog_targets alone, jitted")
        head = (f"{'variant':<8}{'step ms':>9}{'no HOG':>9}{'HOG jit':>9}{'numpy HOG':>11}{'share (diff)':>14}"
                f"{'share (jit)':>13}{'vs numpy':>10}")
        print(head)
        print("-" * len(head))
        for variant, (config, r) in results.items():
            s = hog_share(config, args, r)
            print(f"{variant:<8}{s['step'] * 1e3:>9.1f}{s['no_hog'] * 1e3:>9.1f}{s['hog'] * 1e3:>9.2f}"
                  f"{s['numpy'] * 1e3:>11.2f}{(s['step'] - s['no_hog']) / s['step']:>14.1%}"
                  f"{s['hog'] / s['step']:>13.2%}{s['numpy'] / s['hog']:>9.1f}x", flush=True)


if __name__ == "__main__":
    main()
