"""Benchmark: the train step's matmul shapes under each XLA CPU dot library, against numpy.

For ViT-``--variant`` at ``--batch`` it times, interleaved round by round:

* the linear layers' forward matmuls, ``(B*N, D) x (D, 3D / 4D / D)`` and ``(B*N, 4D) x (4D, D)``;
* attention's batched per-head dots one form at a time (``q.k^T``: logits and the probabilities'
  gradient; ``p.v``: output and the queries' gradient; ``p^T.g``: keys' and values' gradients),
  and its fused forward and backward (``layers.softmax_attention``: the six dots plus the softmax);
* numpy's float32 4096x4096 matmul (``--square``), the train-step benchmark's reference;

each compiled with XLA's default libraries and with every ``--options`` set (Eigen only,
oneDNN dots, XNNPACK dots by default), and the same computation in numpy.

    python benchmarks/dots.py
    python benchmarks/dots.py --variant L/16 --rounds 5
    taskset -c 0 python benchmarks/dots.py     # the same on one core: what the second core adds

Figures are GFLOP/s from the median of the rounds; every timed call starts after a short
pause, since OpenBLAS's threads (and XLA's) keep spinning for a while after their work and slow
down whatever runs right after them. The machine may be shared, so compare within one run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from maskfeat_jax import host_memory  # noqa: E402

host_memory.keep_freed_memory()      # as the trainer does, before numpy and jax

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from maskfeat_jax.models import layers, vit  # noqa: E402
from train_step import parse_xla_options  # noqa: E402  (benchmarks/ is on the path: the script's own folder)

# YNNPACK (the default) claims every dot it supports before the other libraries are asked, so
# each alternative turns it off first.
NO_YNN = "xla_cpu_experimental_ynn_fusion_type="
OPTION_SETS = {
    "eigen": NO_YNN,
    "onednn": NO_YNN + ";xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "xnnpack": NO_YNN + ";xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}
SETTLE_S = 0.25   # pause before each timed call: BLAS and XLA pool threads spin for a while after
                  # their work, and would slow down whatever runs next


def numpy_attention(q, k, v, g):
    """The same six dots and softmax as ``softmax_attention``'s forward and backward, in numpy."""
    s = q @ k.swapaxes(-1, -2)
    e = np.exp(s - s.max(-1, keepdims=True))
    r = 1.0 / e.sum(-1, keepdims=True)
    o = (e @ v) * r
    gr = g * r
    ds = e * (gr @ v.swapaxes(-1, -2) - (gr * o).sum(-1, keepdims=True))
    return o, ds @ k, ds.swapaxes(-1, -2) @ q, e.swapaxes(-1, -2) @ gr


def cases(variant: str, batch: int, rng, square: int = 4096):
    """(name, GFLOP, jax function, numpy function, arguments) per timed computation."""
    size, patch = vit.parse_variant(variant)
    n, d, h = (224 // patch) ** 2 + 1, size.width, size.heads
    rows = batch * n
    out = []
    for name, (din, dout) in {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, size.mlp),
                              "fc2": (size.mlp, d)}.items():
        x = rng.standard_normal((rows, din), np.float32)
        w = rng.standard_normal((din, dout), np.float32)
        out.append((f"{name} {rows}x{din}x{dout}", 2 * rows * din * dout, lambda a, b: a @ b,
                    lambda a, b: a @ b, (x, w)))
    q, k, v, g = (rng.standard_normal((batch, h, n, d // h), np.float32) for _ in range(4))
    p = rng.standard_normal((batch, h, n, n), np.float32)
    dot_flops = 2 * batch * h * n * n * (d // h)
    for name, spec, nfn, arrays in [
            ("q.k^T", "bhqd,bhkd->bhqk", lambda a, b: a @ b.swapaxes(-1, -2), (q, k)),
            ("p.v", "bhqk,bhkd->bhqd", lambda a, b: a @ b, (p, v)),
            ("p^T.g", "bhqk,bhqd->bhkd", lambda a, b: a.swapaxes(-1, -2) @ b, (p, g))]:
        out.append((f"attention {name} {batch}x{h}x{n}x{d // h}", dot_flops,
                    lambda a, b, spec=spec: jnp.einsum(spec, a, b), nfn, arrays))

    def attention(q, k, v, g):
        o, vjp = jax.vjp(layers.softmax_attention, q, k, v)
        return o, vjp(g)

    out.append((f"attention {batch}x{h}x{n}x{d // h} fwd+bwd", 6 * dot_flops,
                attention, numpy_attention, (q, k, v, g)))
    a = rng.standard_normal((square, square), np.float32)
    out.append((f"square {square}^3", 2 * square ** 3, lambda a, b: a @ b, lambda a, b: a @ b, (a, a)))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="B/16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds per computation (median reported)")
    ap.add_argument("--square", type=int, default=4096, help="side of the square reference matmul")
    ap.add_argument("--settle", type=float, default=SETTLE_S, help="seconds of pause before each timed call")
    ap.add_argument("--options", default=",".join(OPTION_SETS),
                    help=f"comma-separated XLA option sets to compare with the default: {sorted(OPTION_SETS)}")
    args = ap.parse_args(argv)
    sets = {"default": {}}
    for name in filter(None, args.options.split(",")):
        if name not in OPTION_SETS:
            raise SystemExit(f"--options: unknown set {name!r}; expected some of {sorted(OPTION_SETS)}")
        sets[name] = parse_xla_options(OPTION_SETS[name])
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {len(os.sched_getaffinity(0))} of {os.cpu_count()} CPUs usable; ViT-{args.variant}, "
          f"batch {args.batch}; GFLOP/s (median of {args.rounds} interleaved rounds)")
    for name, value in sets.items():
        if value:
            print(f"  {name}: {OPTION_SETS[name]}")
    head = f"{'computation':<36}" + "".join(f"{s:>10}" for s in sets) + f"{'numpy':>10}"
    print(head + "\n" + "-" * len(head))
    rng = np.random.default_rng(0)
    for label, flops, jfn, nfn, arrays in cases(args.variant, args.batch, rng, args.square):
        dev = [jnp.asarray(a) for a in arrays]
        fns = {s: jax.jit(jfn).lower(*dev).compile(compiler_options=o or None) for s, o in sets.items()}
        fns["numpy"] = lambda *_: nfn(*arrays)
        times = {s: [] for s in fns}
        for r in range(args.rounds + 1):          # the first round warms up
            for s, fn in fns.items():
                time.sleep(args.settle)
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*dev))
                if r:
                    times[s].append(time.perf_counter() - t0)
        print(f"{label:<36}" + "".join(f"{flops / np.median(t) / 1e9:>10.1f}" for t in times.values()), flush=True)


if __name__ == "__main__":
    main()
