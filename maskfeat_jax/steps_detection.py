"""The detection steps (``config.task = "detect"``, AVA): ``train_step(state, batch) -> (state,
metrics)`` and ``eval_step(params, batch) -> scores``, pure and jitted by their callers with
explicit shardings, as the steps of ``steps.py``; and the batch they take.

A batch holds clips with up to ``R`` person boxes each (``data/ava_maps.py``): ``image (B, T, S,
S, 3)`` uint8, ``boxes (B, R, 4)`` in crop pixels, ``labels (B, R, 80)`` multi-hot,
``box_valid (B, R)`` (False on padding), ``valid (B,)`` (False for an undecodable clip) and
per-clip box counts. The loss is the official one (``MODEL.LOSS_FUNC: bce``): the binary
cross-entropy of every (box, class) sigmoid, averaged over the classes and the valid boxes of the
whole batch (PySlowFast's ``BCELoss`` mean over its real boxes times classes: the same number).
Padding boxes and undecodable clips weigh 0. With gradient accumulation every micro-batch
divides by the whole batch's box count, so the summed gradient is the full batch's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from maskfeat_jax import sharding
from maskfeat_jax.steps import TrainState, apply_update, normalize, value_and_grad


def box_bce(logits_BxRxK, labels_BxRxK, weight_BxR):
    """Sum over boxes of ``weight`` times the box's sigmoid binary cross-entropy averaged over the
    ``K`` classes (divide by the weight's sum for the mean over valid boxes)."""
    per_box = optax.sigmoid_binary_cross_entropy(logits_BxRxK, labels_BxRxK).mean(-1)
    return (per_box * weight_BxR).sum()


def box_weight(batch):
    """``(B, R)`` float32: 1 for a real box of a decoded clip, 0 for padding and undecodable clips."""
    return (batch["box_valid"] & batch["valid"][:, None]).astype(jnp.float32)


def make_train_step(graphdef, tx, schedule, config):
    """The detector's training step: drop path and head dropout keyed by (seed, step)."""
    base_key = jax.random.key(config.seed)
    mean, std = config.input.mean, config.input.std
    accum = config.optim.grad_accum_steps

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(base_key, state.step)
        weight_BxR = box_weight(batch)
        denom = jnp.maximum(weight_BxR.sum(), 1.0)          # valid boxes of the whole batch
        inputs = {"images": normalize(batch["image"], mean, std), "boxes": batch["boxes"],
                  "labels": batch["labels"], "weight": weight_BxR, "rng": rng}

        def loss_fn(params, x):
            out = nnx.merge(graphdef, params)(x["images"], x["boxes"], rng=x["rng"])
            return box_bce(out["logits_BxRxK"], x["labels"], x["weight"]) / denom

        loss, grads = value_and_grad(loss_fn, state.params, inputs, accum)
        metrics = {"opt/lr": schedule(state.step), "data/invalid_examples": (~batch["valid"]).sum(),
                   "data/boxes": weight_BxR.sum(), "data/boxes_truncated": batch["boxes_truncated"].sum()}
        return apply_update(tx, state, loss, grads, metrics)

    return step


def make_eval_step(graphdef, config):
    """Each box's 80 sigmoid scores, with what the evaluator needs to place them: the boxes in
    the frame's normalised coordinates, which of them are real, and each row's keyframe."""
    mean, std = config.input.mean, config.input.std

    def step(params, batch):
        out = nnx.merge(graphdef, params)(normalize(batch["image"], mean, std), batch["boxes"])
        return {"scores_BxRxK": jax.nn.sigmoid(out["logits_BxRxK"]), "real_BxR": box_weight(batch) > 0,
                "ori_boxes": batch["ori_boxes"], "video_index": batch["video_index"], "second": batch["second"],
                "valid": batch["valid"]}

    return step


def abstract_batch(config, mesh) -> dict:
    """ShapeDtypeStructs of one global training batch, sharded as ``sharding.global_batch``: the
    rows of ``ava_maps.train_map(config)``, ``config.input.global_batch_size`` of them."""
    from maskfeat_jax.data import ava_maps      # local: the step functions need no data code
    row = ava_maps.train_map(config).blank()
    b = config.input.global_batch_size
    return {k: jax.ShapeDtypeStruct((b, *np.shape(v)), np.asarray(v).dtype,
                                    sharding=sharding.batch_sharding(mesh, 1 + np.ndim(v)))
            for k, v in row.items()}
