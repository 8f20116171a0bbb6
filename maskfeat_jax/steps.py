"""The pure step functions: ``step(state, batch) -> (state, metrics)``, one per task.

Each is jitted once by the trainer with explicit shardings and donation of ``state``.
Randomness is a pure function of (seed, step), so a resumed run repeats it exactly.
A non-finite loss or gradient norm never reaches the parameters: the update is
skipped and counted in ``state.nonfinite`` (the trainer stops or goes on, per config).

Gradient accumulation (``optim.grad_accum_steps = k``) splits the global batch into k
micro-batches inside the step and sums their gradients with ``lax.scan``: one optimizer
update per step, activations for only ``global_batch_size / k`` examples alive at once.
Each micro-batch's loss is divided by the denominator of the whole batch (masked tokens,
valid examples), so the summed gradient is exactly the full batch's. The lr scales with
``global_batch_size``, the effective batch.
"""
from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from maskfeat_jax import config_validate, models, sharding
from maskfeat_jax import targets as targets_lib
from maskfeat_jax.augment import erase, mix
from maskfeat_jax.models import mae


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite: jax.Array      # number of skipped non-finite updates


def normalize(images_u8, mean, std):
    """uint8 images to float32 ``(x / 255 - mean) / std`` (on device)."""
    x = images_u8.astype(jnp.float32) / 255.0
    mean, std = (jnp.asarray(v, jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,)) for v in (mean, std))
    return (x - mean) / std


def micro_batches(x, k: int):
    """``(B, ...) -> (k, B / k, ...)``; micro-batch j holds examples j, j + k, j + 2k, ...

    The batch is sharded in contiguous blocks over devices, so with this interleaving every
    device holds an equal share of every micro-batch and no data moves between devices."""
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))


def value_and_grad(loss_fn, params, inputs, k: int, aux_like=None):
    """``jax.value_and_grad(loss_fn)(params, inputs)`` summed over k micro-batches.

    ``loss_fn(params, inputs)`` must be a sum over examples (normalised by a constant), and
    ``inputs`` a pytree of arrays with the batch leading; ``inputs["rng"]``, if present, is a
    key that each micro-batch folds its index into. With ``aux_like`` (zeros shaped like the
    extra output), ``loss_fn`` returns ``(loss, aux)``, aux summed like the loss, and the result
    is ``((loss, aux), grads)``."""
    has_aux = aux_like is not None
    vg = jax.value_and_grad(loss_fn, has_aux=has_aux)
    if k == 1:
        return vg(params, inputs)
    rng = inputs.pop("rng", None)
    micro = jax.tree.map(lambda x: micro_batches(x, k), inputs)
    if rng is not None:
        micro["rng"] = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(k))

    def body(acc, mb):
        return jax.tree.map(jnp.add, acc, vg(params, mb)), None

    loss0 = jnp.zeros((), jnp.float32)
    zeros = ((loss0, aux_like) if has_aux else loss0, jax.tree.map(jnp.zeros_like, params))
    return jax.lax.scan(body, zeros, micro)[0]


def apply_update(tx, state: TrainState, loss, grads, metrics):
    """One optimizer update, or none when the loss or the gradient norm is not finite.

    A skipped update leaves the parameters and Adam's moments and bias-correction count as
    they were, but still advances the lr schedule's count, so the lr stays the schedule's
    value at the step (as a scheduler stepped every iteration does in PyTorch).

    The skip is a ``lax.cond`` around the whole update rather than a ``where`` over its
    result: a ``where`` costs one more pass over every parameter and moment each step
    (plus copies of the moments it forces), the conditional runs just one branch."""
    gnorm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)

    def update(params_and_opt):
        params, opt_state = params_and_opt
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def skip(params_and_opt):
        params, opt_state = params_and_opt
        is_sched = lambda s: isinstance(s, optax.ScaleByScheduleState)  # noqa: E731
        return params, jax.tree.map(lambda s: s._replace(count=optax.safe_increment(s.count)) if is_sched(s) else s,
                                    opt_state, is_leaf=is_sched)

    params, opt_state = jax.lax.cond(ok, update, skip, (state.params, state.opt_state))
    state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                       nonfinite=state.nonfinite + (~ok).astype(jnp.int32))
    metrics = dict(metrics, **{"train/loss": loss, "opt/grad_norm": gnorm,
                               "train/nonfinite_steps": state.nonfinite})
    return state, metrics


def make_pretrain_step(graphdef, tx, schedule, config, patch: int, temporal_stride: int | None = None,
                       histogram: str = "scatter"):
    """MaskFeat: the targets of ``config.target`` (``targets.active``: HOG, pixels) from the intact
    input, each a masked-token MSE with explicit denominator on its slice of the head's output;
    ``train/loss`` is their weighted sum, ``train/loss_<name>`` each unweighted loss.
    ``histogram``: HOG's histogram form for the target platform (``hog.histogram_impl``).

    ``step(state, batch, frozen=None)``: ``frozen`` holds the frozen inputs of the targets that
    need one (``targets.load_frozen``: the teacher encoder's parameters of ``features``), an
    input of the step like the batch, never differentiated nor updated.

    With several ``config.head.depths`` (ViT, MViTv2) each head predicts every target and the losses are
    summed over the heads, as the official code does; ``train/loss_<name>`` is then the sum of
    that target's losses over the heads and ``train/loss_block<i>`` the weighted loss of block i's.

    With ``config.mae.enabled`` (ViT) the batch's block ``mask`` is unused: each example keeps
    exactly ``mae.keep_count(N, config.mae.mask_ratio)`` random patches, drawn on device from
    the step's key (``mae.random_mask``); the encoder sees only those, the loss covers the others."""
    mae_on = models.mae_enabled(config)
    base_key = jax.random.key(config.seed)
    mean, std = config.input.mean, config.input.std
    accum = config.optim.grad_accum_steps
    active = targets_lib.active(config, patch, temporal_stride, histogram)
    draw_mask = mae.masker(config) if mae_on else None    # video: over t*h*w tokens, or per frame
    depths = models.head_depths(config)

    def target(t, images, frozen):
        if not t.frozen:
            return t.fn(images)
        if frozen is None or t.name not in frozen:
            raise ValueError(f"config.target.{t.name}={t.weight}: the step needs that target's frozen input "
                             f"(targets.load_frozen) as its third argument")
        return t.fn(images, frozen[t.name])

    def step(state: TrainState, batch, frozen=None):
        images = normalize(batch["image"], mean, std)
        targets = {t.name: jax.lax.stop_gradient(target(t, images, frozen)) for t in active}
        rng = jax.random.fold_in(base_key, state.step)
        if mae_on:     # the model takes the kept patches' indices
            k_mask, rng = jax.random.split(rng)
            seen, mask_BxN = draw_mask(k_mask, images.shape[0])
        else:          # the model takes the mask
            seen = mask_BxN = batch["mask"]
        weight_BxN = (mask_BxN & batch["valid"][:, None]).astype(jnp.float32)
        denom = jnp.maximum(weight_BxN.sum(), 1.0)          # masked tokens of the whole batch
        inputs = {"images": images, "seen": seen, "targets": targets, "weight": weight_BxN, "rng": rng}

        def loss_fn(params, x):
            out = nnx.merge(graphdef, params)(x["images"], x["seen"], rng=x["rng"])
            if len(depths) > 1:
                return summed_over_depths(out["pred_BxNxK_by_depth"], x["targets"], x["weight"], denom, active,
                                          depths)
            return masked_losses(out["pred_BxNxK"], x["targets"], x["weight"], denom, active)

        names = [t.name for t in active] + ([f"block{d}" for d in depths] if len(depths) > 1 else [])
        zeros = {name: jnp.zeros((), jnp.float32) for name in names}
        (loss, losses), grads = value_and_grad(loss_fn, state.params, inputs, accum, aux_like=zeros)
        metrics = {"opt/lr": schedule(state.step), "train/mask_ratio": mask_BxN.mean(),
                   "data/invalid_examples": (~batch["valid"]).sum(),
                   **{f"train/loss_{name}": v for name, v in losses.items()}}
        return apply_update(tx, state, loss, grads, metrics)

    return step


def masked_losses(pred_BxNxK, targets, weight_BxN, denom, active):
    """``(loss, {name: loss})``: each target's MSE over its features, summed over the tokens with
    ``weight_BxN`` and divided by ``denom``; ``loss`` the sum weighted by the targets' weights."""
    pred = targets_lib.split(pred_BxNxK, active)
    losses = {}
    for t in active:
        err_BxN = jnp.square(pred[t.name] - targets[t.name]).mean(-1)
        losses[t.name] = (err_BxN * weight_BxN).sum() / denom
    return functools.reduce(jnp.add, [t.weight * losses[t.name] for t in active]), losses


def summed_over_depths(preds_BxNxK, targets, weight_BxN, denom, active, depths):
    """``masked_losses`` of each head's predictions (``preds_BxNxK``, one per block of ``depths``),
    summed over the heads: ``(loss, {name: loss summed over heads, 'block<i>': head i's loss})``."""
    per = [masked_losses(p, targets, weight_BxN, denom, active) for p in preds_BxNxK]
    losses = {t.name: functools.reduce(jnp.add, [ls[t.name] for _, ls in per]) for t in active}
    losses.update({f"block{d}": loss for d, (loss, _) in zip(depths, per)})
    return functools.reduce(jnp.add, [loss for loss, _ in per]), losses


def make_finetune_step(graphdef, tx, schedule, config):
    base_key = jax.random.key(config.seed)
    num_classes = config.model.num_classes
    accum = config.optim.grad_accum_steps

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(base_key, state.step)
        k_erase, k_mix, k_drop = jax.random.split(rng, 3)
        images = erase(k_erase, normalize(batch["image"], config.input.mean, config.input.std),
                       batch["erase_box"])
        images, targets = mix(k_mix, images, batch["label"], num_classes, config.augment, batch["valid"])
        valid = batch["valid"].astype(jnp.float32)
        denom = jnp.maximum(valid.sum(), 1.0)               # valid examples of the whole batch
        inputs = {"images": images, "targets": targets, "valid": valid, "rng": k_drop}

        def loss_fn(params, x):
            out = nnx.merge(graphdef, params)(x["images"], rng=x["rng"])
            ce = -(x["targets"] * jax.nn.log_softmax(out["logits_BxC"])).sum(-1)
            return (ce * x["valid"]).sum() / denom

        loss, grads = value_and_grad(loss_fn, state.params, inputs, accum)
        metrics = {"opt/lr": schedule(state.step), "data/invalid_examples": (~batch["valid"]).sum()}
        return apply_update(tx, state, loss, grads, metrics)

    return step


def make_eval_step(graphdef, config):
    """Sums of top-1 / top-5 hits and of valid examples over a padded batch."""
    video = config_validate.is_video(config)

    def step(params, batch):
        images = normalize(batch["image"], config.input.mean, config.input.std)
        logits = nnx.merge(graphdef, params)(images)["logits_BxC"]
        valid = batch["valid"]
        k = min(5, logits.shape[-1])
        topk = jax.lax.top_k(logits, k)[1]
        hit = topk == batch["label"][:, None]
        out = {"top1": (hit[:, 0] & valid).sum(), "top5": (hit.any(-1) & valid).sum(), "count": valid.sum()}
        if video:   # views of one video are averaged on the host, from the replicated rows
            out.update(probs=jax.nn.softmax(logits), video_index=batch["video_index"], label=batch["label"],
                       valid=valid)
        return out

    return step
