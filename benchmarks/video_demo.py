"""Benchmark: where the time of the video demo's train step goes (``configs/demo_video.py``).

    python benchmarks/video_demo.py --profile      # parts, train step, input, step profile
    python benchmarks/video_demo.py --skip_step    # parts only

Parts: each piece of the demo's MViTv2 ``mu`` (batch 16 clips of 8x64x64), jitted alone, forward
and forward+backward (gradients of its parameters and its input; the patch embedding's and the
encoder's input is data, so not theirs): the patch embedding, each block's q, k and v pooling,
the skip max pool, each whole block and the whole encoder. Every part runs in three forms,
compiled first, then timed interleaved (fastest of ``--repeats``):

* ``xla conv``: single XLA convolutions, the GPU and TPU programs' forms (the 3-D patch
  convolution; ``layers.depthwise_conv``, a grouped 3-D convolution);
* ``taps, autodiff``: the CPU program's forms with autodiff's gradients;
* ``model``: the CPU program's forms (``cpu_kernels.patch_conv``: 2-D convolutions of the frames, one
  per temporal tap; ``cpu_kernels.depthwise_pool``: a sum of strided slices times
  per-channel weights, with its own backward).

Then the trainer's compiled step (``train.setup``, ``train.jit_step``; HOG targets and the AdamW
update included) on one real batch of the demo in each form (compile seconds, fastest step),
the demo's input pipeline alone in the main process (ms per batch), and with ``--profile`` the
ops that take the model form's step time (``benchmarks/train_step.py``'s ``profile_step``).
The machine may be shared: compare the forms within one run (the load average is printed).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from maskfeat_jax import models, sharding, train  # noqa: E402
from maskfeat_jax.data import sources, video  # noqa: E402
from maskfeat_jax.models import cpu_kernels, layers, pooling_attention  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


FORMS = {"xla conv": (layers.conv, layers.depthwise_conv),
         "taps, autodiff": (cpu_kernels.patch_conv, cpu_kernels.tap_sum),
         "model": (cpu_kernels.patch_conv, cpu_kernels.depthwise_pool)}


@contextlib.contextmanager
def form(name):
    """Traces inside run with the patch embedding and pooling of ``FORMS[name]``."""
    saved = cpu_kernels.patch_conv, cpu_kernels.depthwise_pool   # CpuKernels looks them up at call time
    cpu_kernels.patch_conv, cpu_kernels.depthwise_pool = FORMS[name]
    try:
        yield
    finally:
        cpu_kernels.patch_conv, cpu_kernels.depthwise_pool = saved


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def demo_config():
    spec = importlib.util.spec_from_file_location("demo_video", os.path.join(ROOT, "configs", "demo_video.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def forward_backward(f, argnums):
    """Gradients of a scalar of ``f``'s output wrt the arguments ``argnums``."""
    return jax.grad(lambda *args: jnp.sum(jnp.sin(f(*args))), argnums=argnums)


def time_parts(parts, repeats: int) -> list[dict]:
    """``parts``: (name, fn, args, argnums of the backward). Compiles every (part, form, pass),
    then times them interleaved."""
    runs = []
    for name, fn, args, argnums in parts:
        for kind in ("fwd", "fwd+bwd"):
            for f in FORMS:
                with form(f):   # a new function each time: jit reuses the trace of a function it saw
                    g = (lambda *a, fn=fn: fn(*a)) if kind == "fwd" else forward_backward(fn, argnums)
                    compiled = jax.jit(g).lower(*args).compile()
                jax.block_until_ready(compiled(*args))
                runs.append({"part": name, "pass": kind, "form": f, "run": compiled, "args": args, "ms": []})
    for _ in range(repeats):
        for r in runs:
            t0 = time.perf_counter()
            jax.block_until_ready(r["run"](*r["args"]))
            r["ms"].append(1e3 * (time.perf_counter() - t0))
    return runs


def model_parts(config):
    """(name, fn, args, argnums of the backward) for every part of the demo's encoder, on its
    activation shapes (random values, random initialisation)."""
    with nnx.use_eager_sharding(False):
        enc = models.build(config, nnx.Rngs(0)).encoder
    b, t, s = config.input.global_batch_size, config.video.num_frames, config.input.image_size
    rng = np.random.default_rng(0)
    clip = jnp.asarray(rng.normal(size=(b, t, s, s, 3)), jnp.float32)
    parts = [("patch embedding", lambda k, x: cpu_kernels.patch_conv(x, k, enc.patch_stride),
              (enc.patch_kernel[...], clip), 0)]
    x = enc.embed(clip)
    for i, blk in enumerate(enc.blocks):
        a = blk.attn
        nh = a.qkv_kernel.shape[2]
        grid = jnp.asarray(rng.normal(size=(b, *a.thw, a.qkv_kernel.shape[0])), jnp.float32)
        for which, stride in (("q", a.q_stride), ("k", a.kv_stride), ("v", a.kv_stride)):
            kernel = jnp.tile(getattr(a, f"pool_{which}")[...], (1, 1, 1, nh))   # as PoolingAttention._pool
            out = layers.pooled_grid(a.thw, kernel.shape[:3], stride)
            parts.append((f"block{i} pool {which} {a.thw}->{out}",
                          lambda k, x, s=stride: cpu_kernels.depthwise_pool(x, k, s), (kernel, grid), (0, 1)))
        if np.prod(blk.q_stride) > 1:
            parts.append((f"block{i} skip max pool", lambda x, s=blk.q_stride: pooling_attention.max_pool(x, s),
                          (grid,), 0))
        gd, params = nnx.split(blk)
        parts.append((f"block{i} whole (width {a.qkv_kernel.shape[0]})",
                      lambda p, x, gd=gd: nnx.merge(gd, p)(x), (params, x), (0, 1)))
        x = blk(x)
    gd, params = nnx.split(enc)
    parts.append(("encoder", lambda p, x, gd=gd: nnx.merge(gd, p)(x)["tokens_BxNxD"], (params, clip), 0))
    return parts


def print_parts(runs):
    print(f"{'part':44s} {'pass':8s}" + "".join(f"{f + ' ms':>16s}" for f in FORMS) + f"{'xla conv / model':>18s}")
    by = {(r["part"], r["pass"], r["form"]): min(r["ms"]) for r in runs}
    for part, kind in dict.fromkeys((r["part"], r["pass"]) for r in runs):
        ms = [by[(part, kind, f)] for f in FORMS]
        print(f"{part:44s} {kind:8s}" + "".join(f"{m:16.1f}" for m in ms) + f"{ms[0] / ms[-1]:17.1f}x")


def time_step(config, repeats: int, profile: bool):
    """The trainer's step on one real batch, per form: compile seconds and fastest step."""
    mesh = sharding.make_mesh(config.mesh)
    grid = models.build_abstract(config).encoder.mask_grid
    it = iter(video.train_dataset(config, sources.make(config, config.input.train_split), grid))
    batch = sharding.global_batch(mesh, next(it))
    runs = {}
    for f in FORMS:
        with form(f), jax.set_mesh(mesh):
            st = train.setup(config, mesh, 12, 96)
            state = st.init()
            t0 = time.perf_counter()
            compiled = train.jit_step(st, mesh, batch).lower(state, batch).compile()
            runs[f] = {"compile": time.perf_counter() - t0, "compiled": compiled, "state": state, "ms": []}
    for _ in range(repeats):
        for r in runs.values():
            with jax.set_mesh(mesh):
                t0 = time.perf_counter()
                r["state"], metrics = r["compiled"](r["state"], batch)
                jax.block_until_ready(metrics)
                r["ms"].append(1e3 * (time.perf_counter() - t0))
    print(f"\ntrain step, batch {config.input.global_batch_size} (compile: the step alone):")
    for f, r in runs.items():
        print(f"  {f:16s} compile {r['compile']:6.1f} s   step {min(r['ms']):8.1f} ms (fastest of {repeats})")
    t0 = time.perf_counter()
    for _ in range(repeats):
        next(it)
    print(f"input pipeline in the main process: {1e3 * (time.perf_counter() - t0) / repeats:.1f} ms per batch")
    if profile:
        from train_step import profile_step   # benchmarks/train_step.py

        class Traced:                         # what profile_step reads
            compiled = runs["model"]["compiled"]

            def step(self, n):
                with jax.set_mesh(mesh):
                    for _ in range(n):
                        runs["model"]["state"], m = self.compiled(runs["model"]["state"], batch)
                    jax.block_until_ready(m)

        profile_step(Traced(), top=15)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip_step", action="store_true", help="time the parts only")
    ap.add_argument("--profile", action="store_true", help="also trace one step of the model's form "
                    "and list the ops that take its time (benchmarks/train_step.py --profile)")
    args = ap.parse_args(argv)
    config = demo_config()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} cores, load {loadavg()}")
    print_parts(time_parts(model_parts(config), args.repeats))
    if not args.skip_step:
        time_step(config, args.repeats, args.profile)
    print(f"load {loadavg()}")


if __name__ == "__main__":
    main()
