"""Optimiser and learning-rate schedule (spec 8), built from optax parts.

``clip_by_global_norm -> adamw(schedule, weight-decay mask) -> per-layer lr scale``, or with
``optim.name="sgd"`` (the official SSv2 and AVA recipes) ``clip_by_global_norm -> L2 weight
decay (mask) -> SGD with momentum``, which is PyTorch's ``SGD(momentum, weight_decay)``: the decay
is added to the gradient before the momentum buffer (``optax.trace``, no dampening).
The layer scale is one multiplicative factor per leaf applied after the optimizer, which is
exactly a per-layer learning rate (decay included) while keeping a single optimizer state.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax


def scaled_lrs(config) -> dict:
    """``lr = base * global_batch / reference_batch`` for the peak, start and end values."""
    o = config.optim
    scale = config.input.global_batch_size / o.reference_batch
    return {"peak": o.base_lr * scale, "start": o.warmup_start_lr * scale, "end": o.end_lr * scale,
            "scale": scale}


def schedule(config, steps_per_epoch: int, total_steps: int):
    """Per-step linear warm-up from the start lr to the peak, then cosine to the end lr."""
    lrs = scaled_lrs(config)
    warmup = int(round(config.optim.warmup_epochs * steps_per_epoch))
    warmup = min(warmup, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=lrs["start"], peak_value=lrs["peak"], warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=lrs["end"])


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]


def decay_mask(params):
    """True where weight decay applies: parameters with ndim > 1 whose name is not a bias."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim > 1 and not _path_names(path)[-1].endswith("bias"), params)


def layer_id(names: list[str], depth: int) -> int:
    """0 for embeddings and tokens, i+1 for block i, depth+1 for the rest (head, final norm)."""
    if "blocks" in names:
        return int(names[names.index("blocks") + 1]) + 1
    leaf = names[-1]
    if re.match(r"(cls_token|mask_token|pos_embed|patch_)", leaf):
        return 0
    return depth + 1


def layer_scales(params, depth: int, decay: float):
    """``decay ** (depth + 1 - layer_id)`` per leaf (spec 8, fine-tuning only)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: decay ** (depth + 1 - layer_id(_path_names(path), depth)), params)


def make(config, params, steps_per_epoch: int, total_steps: int, depth: int):
    """The optax transformation and its schedule."""
    o = config.optim
    sched = schedule(config, steps_per_epoch, total_steps)
    parts = []
    if o.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(o.grad_clip))
    if o.get("name", "adamw") == "sgd":
        if o.weight_decay > 0:
            parts.append(optax.add_decayed_weights(o.weight_decay, mask=decay_mask))
        parts.append(optax.sgd(sched, momentum=o.momentum or None, nesterov=o.nesterov))
    else:
        parts.append(optax.adamw(sched, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                                 mask=decay_mask))
    if o.layer_decay < 1.0:
        scales = layer_scales(params, depth, o.layer_decay)
        parts.append(optax.stateless(
            lambda updates, _: jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales)))
    return optax.chain(*parts), sched
