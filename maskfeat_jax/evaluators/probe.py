"""Frozen-feature evaluators: k-NN and a linear probe on the mean-pooled encoder output.

The cheap way to watch pre-training: usable on any checkpoint (pre-training or
fine-tuning) because only the encoder is run. Features are the mean of the last block's
patch tokens, standardised with the training features' statistics (as a non-affine
BatchNorm would). Both splits are read with the evaluation transform.

    python -m maskfeat_jax.evaluators.probe --workdir=DIR [--step=N] [--split=validation]
"""
from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from maskfeat_jax import steps
from maskfeat_jax.data import pipeline, sources


def extract(config, graphdef, params, source, batch_size: int = 128):
    """(features NxD float32, labels N) for every example of ``source`` (one process)."""

    @jax.jit
    def fwd(params, images):
        enc = nnx.merge(graphdef, params).encoder
        x = steps.normalize(images, config.input.mean, config.input.std)
        return enc(x)["tokens_BxNxD"][:, 1:].astype(jnp.float32).mean(axis=1)

    feats, labels, valid = [], [], []
    for b in pipeline.eval_batches(config, source, batch_size, process_index=0, process_count=1):
        feats.append(np.asarray(fwd(params, b["image"])))
        labels.append(b["label"])
        valid.append(b["valid"])
    keep = np.concatenate(valid)          # drops padding and undecodable examples
    return np.concatenate(feats)[keep], np.concatenate(labels)[keep]


def standardise(train, test):
    mean, std = train.mean(0), train.std(0) + 1e-6
    return (train - mean) / std, (test - mean) / std


def knn_accuracy(train_f, train_y, test_f, test_y, num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk: int = 256):
    """Weighted k-NN on cosine similarity (votes ``exp(sim / T)``), ``chunk`` test examples at a
    time (their similarities to every training example: ``chunk x len(train)`` floats)."""
    tr = train_f / np.linalg.norm(train_f, axis=1, keepdims=True).clip(1e-12)
    te = test_f / np.linalg.norm(test_f, axis=1, keepdims=True).clip(1e-12)
    k = min(k, len(tr))
    hits = 0
    for i in range(0, len(te), chunk):
        sims = te[i:i + chunk] @ tr.T
        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        votes = np.zeros((len(sims), num_classes))
        w = np.exp(np.take_along_axis(sims, idx, 1) / temperature)
        np.add.at(votes, (np.repeat(np.arange(len(sims)), k), train_y[idx].ravel()), w.ravel())
        hits += int((votes.argmax(1) == test_y[i:i + chunk]).sum())
    return hits / max(len(te), 1)


def linear_probe_accuracy(train_f, train_y, test_f, test_y, num_classes: int, steps_: int = 500,
                          lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0):
    """Full-batch AdamW logistic regression on standardised features."""
    tr, te = standardise(train_f, test_f)
    params = {"w": jnp.zeros((tr.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps_), weight_decay=weight_decay)

    def loss(p):
        logits = tr @ p["w"] + p["b"][None]
        return optax.softmax_cross_entropy_with_integer_labels(logits, train_y).mean()

    @jax.jit
    def fit(p):
        def body(carry, _):
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None
        return jax.lax.scan(body, (p, tx.init(p)), None, length=steps_)[0][0]

    p = fit(params)
    return float(((te @ p["w"] + p["b"][None]).argmax(1) == test_y).mean())


def evaluate(config, graphdef, params, split: str | None = None) -> dict:
    """k-NN and linear-probe top-1 of an image model's frozen features. Every training example
    passes through the encoder on this one process: meant for small datasets (the demo's
    digits, a folder of images), not for watching an ImageNet run."""
    if config.model.name != "vit":
        raise ValueError(f"config.model.name={config.model.name!r}: the k-NN and linear probe read images "
                         f"(ViT models); a video model is evaluated by fine-tuning (top-1/top-5)")
    train = sources.make(config, config.input.train_split)
    test = sources.make(config, split or config.input.eval_split)
    num_classes = getattr(train, "num_classes", None) or config.model.num_classes
    train_f, train_y = extract(config, graphdef, params, train)
    test_f, test_y = extract(config, graphdef, params, test)
    return {"eval/knn_top1": knn_accuracy(train_f, train_y, test_f, test_y, num_classes),
            "eval/linear_probe_top1": linear_probe_accuracy(train_f, train_y, test_f, test_y, num_classes)}


def _define_flags(flag_values):
    from absl import flags
    flags.DEFINE_string("workdir", None, "A training workdir (or its checkpoints folder, or one step folder); the "
                        "model and data come from the config saved there.", flag_values=flag_values)
    flags.DEFINE_integer("step", None, "Evaluates the checkpoint step given here (default: the latest).", flag_values=flag_values)
    flags.DEFINE_string("split", None, "The held-out split (default: config.input.eval_split).",
                        flag_values=flag_values)
    flags.mark_flags_as_required(["workdir"], flag_values=flag_values)
    return flag_values


def main(argv) -> dict:
    """``python -m maskfeat_jax.evaluators.probe``: prints the probe's accuracies as JSON."""
    from maskfeat_jax import config_cli, saved as saved_lib
    fv = config_cli.command_flags(_define_flags, argv, "probe")
    try:
        saved = saved_lib.load(fv.workdir, fv.step)
        result = evaluate(saved.config, saved.graphdef, saved.params, fv.split)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    from maskfeat_jax import config_cli
    config_cli.run(main, _define_flags, exit_code=False)
