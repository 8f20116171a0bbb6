"""Accelerator check: what one GPU (or TPU chip) gives the MaskFeat step, in a few minutes.

Run all of it with ``bash benchmarks/accelerator_check.sh`` (each part in its own process under
its own time limit, every table appended to ``$OUT/results.txt``), or one part at a time:

    python benchmarks/accelerator_check.py --part versions      # software, device, peak, flags
    python benchmarks/accelerator_check.py --part matmul        # bf16 / f32 matmul TFLOP/s
    python benchmarks/accelerator_check.py --part attention     # einsum / xla / cudnn at 197, 198, 256 tokens
    python benchmarks/accelerator_check.py --part steps --variant B/16   # step ms, img/s, MFU, memory
    python benchmarks/accelerator_check.py --part correctness   # float32 step: accelerator vs CPU
    python benchmarks/accelerator_check.py --smoke              # every part, CPU-sized (the tests)

Each part prints one table, row by row as they are measured, so a part stopped by its time
limit keeps the rows it finished. A row that fails says so with the error's first line.

It needs jax, flax, optax, einops and numpy only. The step is the trainer's (``train.setup``
and ``train.jit_step``) put together from the model, optimizer and step modules here, because
the trainer imports the data pipeline (grain); ``tests/test_accelerator_check.py`` checks that
both give the same step. Without ml_collections the config is ``stand_in_config()``, the base
config's values for the fields the pre-training step reads.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import platform as host
import shutil
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from maskfeat_jax import models, optim, perf, sharding, steps  # noqa: E402
from maskfeat_jax.data import masking  # noqa: E402
from maskfeat_jax import platform as platform_lib  # noqa: E402
from maskfeat_jax.models import layers  # noqa: E402
from maskfeat_jax.targets import hog  # noqa: E402

GIB = 1024 ** 3
# Pre-training steps timed per ViT size (--batches overrides): bfloat16 at each batch, float32 at
# the first. Few, as every row is a compile, and the part has a time limit.
STEP_BATCHES = {"B/16": (64, 256), "L/16": (32, 128)}
ATTENTION_SHAPE = dict(batch=64, heads=12, head_dim=64)     # ViT-B's
ATTENTION_LENGTHS = (197, 198, 256)                          # 14x14 patches + cls, even, power of two
# Relative difference allowed between the accelerator's float32 step (matmul precision
# 'highest') and the CPU's. Both do float32 arithmetic, in different orders. Measured on the CPU
# for ViT-B/16 (batch 4, first step): the GPU program (config.platform='gpu') run on the CPU
# gives the CPU program's loss and gradient norm bit for bit, and rounding every matmul operand
# to TF32 (10 mantissa bits) moves the loss by 7e-5 (the gradient norm by 9e-6). 1e-5 leaves
# room for the device's own summation order, and the loss still tells a TF32 or bfloat16
# matmul, or any larger change to the program, from float32.
TOLERANCE = 1e-5
SMOKE = dict(variant="mu/16", image_size=112, batches=(2,), matmul=256, attention_batch=2,
             warmup=1, iters=2, repeats=1, correctness_batch=2)


# ---------------------------------------------------------------------------- config and step

class _Group(dict):
    """A stand-in for ``ml_collections.ConfigDict``: a dict whose keys read as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    __setattr__ = dict.__setitem__


def stand_in_config() -> _Group:
    """``config.base_config()``'s values for every field the pre-training step reads."""
    g = _Group
    return g(task="pretrain", seed=0, platform="auto",
             model=g(name="vit", variant="B/16", drop_path=0.0, num_classes=1000, dtype="auto",
                     attention="auto", remat="none"),
             mask=g(ratio=0.4, min_aspect=0.3, tries=10),
             hog=g(nbins=9, cell_size=8, gaussian_window=0),
             input=g(dataset="imagenet2012", image_size=224, global_batch_size=2048,
                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
             optim=g(base_lr=2e-4, reference_batch=256, warmup_start_lr=1e-6, end_lr=1e-6, warmup_epochs=30.0,
                     weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8, grad_clip=0.02, grad_accum_steps=1,
                     layer_decay=1.0),
             mesh=g(data=-1, fsdp=1, tensor=1))


def config_source() -> str:
    return ("maskfeat_jax.config.base_config()" if importlib.util.find_spec("ml_collections")
            else "stand_in_config() (ml_collections is not installed)")


def make_config(variant: str, batch: int, dtype: str, image_size: int = 224):
    """A pre-training config on synthetic data: the base config, or its stand-in without ml_collections."""
    if importlib.util.find_spec("ml_collections"):
        from maskfeat_jax import config as config_lib
        c = config_lib.base_config()
    else:
        c = stand_in_config()
    c.input.dataset = "synthetic"
    c.model.variant, c.model.dtype = variant, dtype
    c.input.image_size, c.input.global_batch_size = image_size, batch
    return c


@dataclasses.dataclass
class Built:
    model: Any        # abstract (shapes only)
    mesh: Any
    platform: str     # what the program is built for
    init: Any         # () -> TrainState on the mesh
    step: Any         # jitted (state, batch) -> (state, metrics), donating the state


def build(config, devices) -> Built:
    """The trainer's pre-training state and step for ``config`` on ``devices``: ``train.setup``
    and ``train.jit_step`` for one device (everything replicated), from the same modules."""
    mesh = sharding.make_mesh(config.mesh, devices)
    platform = platform_lib.target(config, devices)
    with jax.set_mesh(mesh), sharding.rules():
        model = nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0), platform))
    graphdef, abs_params = nnx.split(model)
    tx, schedule = optim.make(config, nnx.to_pure_dict(abs_params), 1000, 100_000, model.encoder.size.depth)

    def init_state():
        with sharding.rules():
            params = nnx.to_pure_dict(nnx.state(models.build(config, nnx.Rngs(config.seed), platform)))
        return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                nonfinite=jnp.zeros((), jnp.int32))

    step_fn = steps.make_pretrain_step(graphdef, tx, schedule, config, model.encoder.patch,
                                       histogram=hog.histogram_impl(platform))
    dtype = platform_lib.compute_dtype(config.model.dtype, platform)
    step_fn = platform_lib.with_precision(step_fn, platform_lib.matmul_precision(platform, dtype))
    repl = sharding.replicated(mesh)
    # as the trainer: XLA CPU's level-1 optimisation halves the initialisation's compile
    options = {"xla_backend_optimization_level": 1} if platform_lib.of_devices(devices) == "cpu" else None

    def init():
        with jax.set_mesh(mesh):
            return jax.jit(init_state, out_shardings=repl).lower().compile(compiler_options=options)()

    step = jax.jit(step_fn, out_shardings=(repl, repl), donate_argnums=(0,))
    return Built(model, mesh, platform, init, step)


def synthetic_batch(config, grid, seed: int = 0) -> dict:
    """One pre-training batch as the input pipeline delivers it (``benchmarks/train_step.py``'s)."""
    rng = np.random.default_rng(seed)
    b, s = config.input.global_batch_size, config.input.image_size
    masks = np.stack([masking.block_mask(rng, grid, config.mask.ratio, min_aspect=config.mask.min_aspect,
                                         tries=config.mask.tries).reshape(-1) for _ in range(b)])
    return {"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8), "mask": masks,
            "valid": np.ones((b,), bool)}


# ---------------------------------------------------------------------------- reporting

class Table:
    """Prints a title and a header, then each row as soon as it is measured."""

    def __init__(self, title: str, columns: list[tuple[str, int]]):
        self.widths = [w for _, w in columns]
        head = "".join(f"{n:<{w}}" for n, w in columns)
        print(f"\n== {title} ==\n{head}\n{'-' * len(head)}", flush=True)

    def row(self, *values):
        print("".join(f"{v!s:<{w}}" for v, w in zip(values, self.widths)).rstrip(), flush=True)


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:160]


def seconds(fn, *args, iters: int, repeats: int) -> float:
    """Fastest of ``repeats`` timings of ``iters`` calls, per call (after one untimed call)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / iters)
    return best


def device_platform() -> str:
    return platform_lib.of_devices(jax.devices())


# ---------------------------------------------------------------------------- parts

def part_versions(args) -> None:
    t = Table("versions and device", [("item", 22), ("value", 0)])
    import flax
    import jaxlib
    import optax
    for name, v in [("python", host.python_version()), ("jax", jax.__version__), ("jaxlib", jaxlib.__version__),
                    ("flax", flax.__version__), ("optax", optax.__version__), ("numpy", np.__version__)]:
        t.row(name, v)
    d = jax.devices()[0]
    t.row("backend", f"{jax.default_backend()} ({device_platform()}), {jax.device_count()} device(s)")
    t.row("device", d.device_kind)
    stats = d.memory_stats() or {}
    if "bytes_limit" in stats:
        t.row("device memory", f"{stats['bytes_limit'] / GIB:.1f} GiB usable by JAX")
    peak, src = perf.peak_flops_per_device()
    t.row("peak (MFU reference)", f"{peak / 1e12:.3g} TFLOP/s per device, {src}")
    try:
        from jax._src.lib import cuda_versions
        if cuda_versions is not None:
            t.row("cuDNN", cuda_versions.cudnn_get_version())
    except Exception:  # noqa: BLE001 - a private module; only informative
        pass
    if shutil.which("nvidia-smi"):    # the power limit tells an H100 SXM (700 W) from a PCIe card
        query = "name,driver_version,memory.total,power.limit,clocks.max.sm"
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.splitlines()
        t.row("nvidia-smi", f"{query}: {smi[0] if smi else 'n/a'}")
    t.row("config", config_source())
    t.row("missing (not needed)", ", ".join(m for m in ("grain", "ml_collections", "tensorflow_datasets")
                                              if not importlib.util.find_spec(m)) or "none")
    t.row("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    t.row("LIBTPU_INIT_ARGS", os.environ.get("LIBTPU_INIT_ARGS", ""))


def part_matmul(args) -> None:
    n = SMOKE["matmul"] if args.smoke else 8192
    peak, _ = perf.peak_flops_per_device()
    t = Table(f"matmul ceiling ({n}x{n} @ {n}x{n}, best of 3)",
              [("dtype", 10), ("precision", 11), ("ms", 10), ("TFLOP/s", 10), ("of peak", 0)])
    for dtype, precision in [("bfloat16", "default"), ("float32", "default"), ("float32", "highest")]:
        with jax.default_matmul_precision(precision):
            rate = max(perf.measured_matmul_flops(n, iters=3 if args.smoke else 20, dtype=jnp.dtype(dtype))
                       for _ in range(3))
        t.row(dtype, precision, f"{2 * n ** 3 / rate * 1e3:.3f}", f"{rate / 1e12:.3g}", f"{rate / peak:.0%}")


def part_attention(args) -> None:
    b = SMOKE["attention_batch"] if args.smoke else ATTENTION_SHAPE["batch"]
    h, d, dtype = ATTENTION_SHAPE["heads"], ATTENTION_SHAPE["head_dim"], jnp.bfloat16
    t = Table(f"attention, bfloat16, batch {b}, {h} heads, head dim {d} (fastest call, ms)",
              [("impl", 8), ("tokens", 8), ("run at", 8), ("fwd ms", 10), ("fwd+bwd ms", 12), ("note", 0)])
    for impl in ("einsum", "xla", "cudnn"):
        for n in ATTENTION_LENGTHS:
            try:
                choice = platform_lib.select_attention(impl, device_platform(), dtype, n, d)
            except ValueError as e:
                t.row(impl, n, "-", "-", "-", f"not available: {first_line(e)}")
                continue
            q, k, v = (jax.random.normal(jax.random.key(i), (b, n, h, d), dtype) for i in range(3))
            fwd = jax.jit(lambda q, k, v: layers.attention(q, k, v, choice))
            bwd = jax.jit(jax.grad(lambda q, k, v: layers.attention(q, k, v, choice).astype(jnp.float32).sum(),
                                   argnums=(0, 1, 2)))
            timing = dict(iters=2 if args.smoke else 20, repeats=1 if args.smoke else 3)
            try:
                ms = [seconds(f, q, k, v, **timing) * 1e3 for f in (fwd, bwd)]
            except Exception as e:  # noqa: BLE001 - a failing implementation is a result
                t.row(impl, n, choice.padded, "-", "-", f"failed: {first_line(e)}")
                continue
            note = "padded, masked" if choice.padded != n else ""
            t.row(impl, n, choice.padded, f"{ms[0]:.3f}", f"{ms[1]:.3f}", note)


def part_steps(args) -> None:
    variant = SMOKE["variant"] if args.smoke else args.variant
    batches = (SMOKE["batches"] if args.smoke else tuple(int(b) for b in args.batches.split(",")) if args.batches
               else STEP_BATCHES.get(variant, (32,)))
    image = SMOKE["image_size"] if args.smoke else 224
    warmup, iters, repeats = (SMOKE[k] for k in ("warmup", "iters", "repeats")) if args.smoke else (2, 5, 2)
    peak, src = perf.peak_flops_per_device()
    t = Table(f"pre-training step: {variant}, {image}px, one device (MFU against {peak / 1e12:.3g} TFLOP/s, "
              f"{src}; compiler temp memory)",
              [("dtype", 10), ("batch", 7), ("attention", 11), ("compile s", 11), ("step ms", 10), ("img/s", 9),
               ("TFLOP/s", 9), ("MFU", 7), ("temp GiB", 10), ("total GiB", 0)])
    runs = [("bfloat16", b) for b in batches] + [("float32", batches[0])]
    for dtype, batch in runs:
        config = make_config(variant, batch, dtype, image)
        try:
            bt = build(config, jax.devices()[:1])
            state = bt.init()
            data = sharding.global_batch(bt.mesh, synthetic_batch(config, bt.model.encoder.grid))
            t0 = time.perf_counter()
            with jax.set_mesh(bt.mesh):
                compiled = bt.step.lower(state, data).compile()
            compile_s = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            step_s, state = time_steps(compiled, bt.mesh, state, data, warmup, iters, repeats)
        except Exception as e:  # noqa: BLE001 - out of memory, say, is a result
            t.row(dtype, batch, "-", "-", "-", "-", "-", "-", "-", f"failed: {first_line(e)}")
            continue
        flops = perf.model_flops_per_image(bt.model, config) * batch / step_s
        t.row(dtype, batch, bt.model.encoder.attention.impl, f"{compile_s:.1f}", f"{step_s * 1e3:.1f}",
              f"{batch / step_s:.1f}", f"{flops / 1e12:.3g}", f"{flops / peak:.1%}", *memory_gib(mem))
        del state, compiled


def memory_gib(mem) -> tuple[str, str]:
    """(temporaries, total) per device from ``compiled.memory_analysis()``: total = arguments +
    outputs - aliased (the donated state) + temporaries."""
    if mem is None:
        return "n/a", "n/a"
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes)
    return f"{mem.temp_size_in_bytes / GIB:.2f}", f"{total / GIB:.2f}"


def time_steps(compiled, mesh, state, batch, warmup: int, iters: int, repeats: int):
    """(fastest seconds per step over ``repeats`` runs of ``iters`` steps, the final state)."""
    best = float("inf")
    with jax.set_mesh(mesh):
        for _ in range(warmup):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(iters):
                state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            best = min(best, (time.perf_counter() - t) / iters)
    return best, state


def correctness(variant: str, batch: int, image_size: int) -> dict:
    """One float32 step from the same parameters and batch on the first device and on the CPU:
    {'loss' / 'grad_norm': (device value, CPU value, relative difference)}. The device's program
    runs its float32 matmuls at precision 'highest' (no TF32 or bfloat16 passes)."""
    config = make_config(variant, batch, "float32", image_size)
    cpu_devices = jax.devices("cpu")[:1]
    cpu = build(config, cpu_devices)
    acc = cpu if jax.devices()[:1] == cpu_devices else build(config, jax.devices()[:1])
    state = cpu.init()
    local = synthetic_batch(config, cpu.model.encoder.grid, seed=1)
    acc_state = jax.device_put(jax.device_get(state), sharding.replicated(acc.mesh))   # a copy: both donate
    out = []
    for bt, st in ((acc, acc_state), (cpu, state)):
        with jax.set_mesh(bt.mesh), jax.default_matmul_precision("highest"):
            _, metrics = bt.step(st, sharding.global_batch(bt.mesh, local))
        out.append(jax.device_get(metrics))
    res = {}
    for name, key in (("loss", "train/loss"), ("grad_norm", "opt/grad_norm")):
        a, c = float(out[0][key]), float(out[1][key])
        res[name] = (a, c, abs(a - c) / max(abs(c), 1e-30))
    return res


def part_correctness(args) -> None:
    variant = SMOKE["variant"] if args.smoke else "B/16"
    batch = SMOKE["correctness_batch"] if args.smoke else 8
    image = SMOKE["image_size"] if args.smoke else 224
    where = device_platform()
    note = " (the device is the CPU: it is compared with itself)" if where == "cpu" else ""
    t = Table(f"correctness: {variant} float32 step, batch {batch}, same parameters and batch: {where} "
              f"(matmul precision 'highest') vs CPU{note}",
              [("quantity", 11), (where, 16), ("cpu", 16), ("rel diff", 11), ("tolerance", 11), ("result", 0)])
    res = correctness(variant, batch, image)
    for name, (a, c, rel) in res.items():
        t.row(name, f"{a:.8g}", f"{c:.8g}", f"{rel:.2e}", f"{TOLERANCE:.0e}", "ok" if rel <= TOLERANCE else "DIFFERS")
    if any(rel > TOLERANCE for _, _, rel in res.values()):
        sys.exit(f"correctness: the {where} float32 step differs from the CPU's by more than {TOLERANCE:.0e}")


PARTS = {"versions": part_versions, "matmul": part_matmul, "attention": part_attention, "steps": part_steps,
         "correctness": part_correctness}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", choices=["all", *PARTS], help="which table (default: all)")
    ap.add_argument("--variant", default="B/16", help="--part steps: the ViT size, e.g. B/16 or L/16")
    ap.add_argument("--batches", default="", help="--part steps: comma-separated batch sizes (default: "
                    f"{STEP_BATCHES})")
    ap.add_argument("--smoke", action="store_true", help=f"CPU-sized: {SMOKE['variant']}, tiny batches and "
                    "matrices, few steps")
    args = ap.parse_args(argv)
    for name, fn in PARTS.items():
        if args.part in ("all", name):
            fn(args)


if __name__ == "__main__":
    main()
