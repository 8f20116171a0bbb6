"""Benchmark: the optimizer update of a ViT, with its non-finite guard, against the alternatives.

Builds the trainer's state and optimizer (``train.setup``: AdamW with clipping, weight-decay
mask and layer-wise lr decay, as configured) for ``--variant``, and times three jitted
updates of the whole state with donated buffers, interleaved round by round:

* ``cond``: ``steps.apply_update``, what the trainer runs: the update inside ``lax.cond`` on a
  finite loss and gradient norm, so a non-finite step leaves parameters and moments as they were
  (only the lr schedule's count advances);
* ``where``: the guard written as a ``where`` over every updated parameter and moment
  (one more pass over them, and the copies of the moments it forces); unlike ``cond`` it also
  holds back the lr schedule's count on a skip, which makes no difference to the timing;
* ``unguarded``: the update alone, the floor.

    python benchmarks/optimizer.py                       # ViT-B/16
    python benchmarks/optimizer.py --variant L/16 --rounds 10

The figure that matters is the difference between rows, per train step; the machine may be
shared, so compare within one run.
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
import optax  # noqa: E402

from maskfeat_jax import config as config_lib, sharding, steps, train  # noqa: E402


def where_guard(tx, state, loss, grads):
    """The guard as a select over the update's result (the baseline)."""
    gnorm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    return steps.TrainState(step=state.step + 1, params=keep(params, state.params),
                            opt_state=keep(opt_state, state.opt_state),
                            nonfinite=state.nonfinite + (~ok).astype(jnp.int32))


def unguarded(tx, state, loss, grads):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return steps.TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state, nonfinite=state.nonfinite)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="B/16")
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds (each times every variant once)")
    args = ap.parse_args(argv)

    c = config_lib.base_config()
    c.task, c.input.dataset, c.model.variant = "pretrain", "synthetic", args.variant
    config_lib.validate(c, jax.device_count(), jax.process_count())
    mesh = sharding.make_mesh(c.mesh)
    st = train.setup(c, mesh, steps_per_epoch=1000, total_steps=100_000)
    variants = {"cond": lambda s, l, g: steps.apply_update(st.tx, s, l, g, {})[0],
                "where": lambda s, l, g: where_guard(st.tx, s, l, g),
                "unguarded": lambda s, l, g: unguarded(st.tx, s, l, g)}
    with jax.set_mesh(mesh):
        state = st.init()
        grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3, p.dtype), state.params)
        loss = jnp.float32(1.0)
        n_params = sum(p.size for p in jax.tree.leaves(state.params))
        print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}; ViT-{args.variant}: "
              f"{n_params / 1e6:.1f}M parameters in {len(jax.tree.leaves(state.params))} arrays, AdamW")
        compiled, states, times = {}, {}, {}
        for name, fn in variants.items():
            compiled[name] = jax.jit(fn, donate_argnums=0).lower(state, loss, grads).compile()
            states[name] = jax.tree.map(jnp.copy, state)
            times[name] = []
        for r in range(args.rounds + 2):            # the first two rounds warm up
            for name, fn in compiled.items():
                t0 = time.perf_counter()
                states[name] = fn(states[name], loss, grads)
                jax.block_until_ready(states[name])
                if r >= 2:
                    times[name].append(time.perf_counter() - t0)
    floor = np.median(times["unguarded"])
    head = f"{'update':<11}{'median ms':>10}{'fastest ms':>11}{'vs unguarded':>14}{'fusions':>9}{'copies':>8}"
    print(head + "\n" + "-" * len(head))
    for name, ts in times.items():
        text = compiled[name].as_text()
        print(f"{name:<11}{np.median(ts) * 1e3:>10.1f}{np.min(ts) * 1e3:>11.1f}"
              f"{np.median(ts) / floor:>13.2f}x{text.count(' fusion('):>9}{text.count(' copy('):>8}")


if __name__ == "__main__":
    main()
