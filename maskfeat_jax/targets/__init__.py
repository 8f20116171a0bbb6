"""The prediction targets of a pre-training run, from ``config.target``.

``active(config, patch, temporal_stride)`` lists the targets whose loss weight is above 0,
in a fixed order (HOG first, then pixels, then a frozen teacher's features). The model has
one head whose output is the concatenation of their vectors (``total_dim``); the step cuts it
back with ``split``. With HOG alone the head and its parameters are exactly the HOG-only
model's, so checkpoints and converted official weights keep loading.

A target with ``frozen=True`` (the teacher's features) also needs a frozen input of the step,
read once at setup by ``load_frozen`` and passed as ``fn(images, frozen[name])``; it is no
part of the train state.
"""
from __future__ import annotations

import dataclasses
import types
from typing import Callable

import jax

from maskfeat_jax.targets import features, hog, pixel

__all__ = ["Target", "WEIGHT_KEYS", "active", "load_frozen", "total_dim", "split"]

WEIGHT_KEYS = ("target.hog", "target.pixel", "target.features")   # the config keys holding a target's loss weight


@dataclasses.dataclass(frozen=True)
class Target:
    name: str          # metric suffix: train/loss_<name>
    weight: float      # loss weight, > 0
    dim: int           # features per token
    fn: Callable[..., jax.Array]   # normalised images (, frozen input) -> (B, N, dim) float32
    frozen: bool = False           # fn takes a frozen input of the step too (load_frozen)


def active(config, patch: int, temporal_stride: int | None = None, histogram: str = "scatter",
           platform: str | None = None) -> list[Target]:
    """The targets of ``config.target`` with weight > 0, for a model of spatial ``patch`` and, on
    video, ``temporal_stride`` frames per token. ``histogram``: HOG's form (``hog.histogram_impl``);
    ``platform``: the teacher's program (default: ``config.platform`` on this process's devices).

    The functions look ``hog.hog_targets`` / ``pixel.pixel_targets`` up when called, so code
    that swaps them (benchmarks/train_step.py) reaches the step. A config saved before
    ``config.target`` and ``config.hog.normalize`` existed gets their defaults (HOG alone),
    so older checkpoints load with the model they were trained with."""
    t, h = _with_defaults(config, "target"), _with_defaults(config, "hog")
    out = []
    if t.hog > 0:
        kw = dict(patch_size=patch, nbins=h.nbins, cell_size=h.cell_size, gaussian_window=h.gaussian_window,
                  temporal_stride=temporal_stride, histogram=histogram, normalize=h.normalize)
        out.append(Target("hog", float(t.hog), hog.hog_dim(patch, h.nbins, h.cell_size),
                          lambda x: hog.hog_targets(x, **kw)))
    if t.pixel > 0:
        frames = temporal_stride if (t.pixel_all_frames and temporal_stride) else 1
        pkw = dict(patch_size=patch, norm_pix=t.norm_pix, temporal_stride=temporal_stride,
                   all_frames=t.pixel_all_frames)
        out.append(Target("pixel", float(t.pixel), pixel.pixel_dim(patch, frames=frames),
                          lambda x: pixel.pixel_targets(x, **pkw)))
    if t.features > 0:
        dim, fn = features.target(config, patch, temporal_stride, platform)
        out.append(Target("features", float(t.features), dim, fn, frozen=True))
    if not out:
        raise ValueError(f"config.target: no target has a weight above 0 (config.target.hog={t.hog}, "
                         f"config.target.pixel={t.pixel}, config.target.features={t.features})")
    return out


def load_frozen(config, mesh=None, platform: str | None = None) -> dict | None:
    """The frozen inputs of the step, by target name (the teacher encoder's parameters for
    ``features``, sharded on ``mesh`` as a model's), or None when no active target needs one."""
    t = _with_defaults(config, "target")
    return {"features": features.load(config, mesh, platform)} if t.features > 0 else None


# the keys added after the first checkpoints were written, with the values those runs had (HOG
# alone, normalised): a config saved without them, or a stand-in config without ml_collections
# (benchmarks/accelerator_check.py), gets these
_ADDED = {"target": {"hog": 1.0, "pixel": 0.0, "norm_pix": True, "pixel_all_frames": False, "features": 0.0,
                     "teacher": "", "teacher_block": -1, "teacher_l2norm": False},
          "hog": {"normalize": True}}


def _with_defaults(config, group: str):
    """``config.<group>`` as a namespace, with ``_ADDED``'s value for each key it lacks."""
    given = config.get(group) or {}
    return types.SimpleNamespace(**{**_ADDED[group], **{k: given[k] for k in given.keys()}})


def total_dim(targets: list[Target]) -> int:
    """The head's width: the targets' vectors side by side."""
    return sum(t.dim for t in targets)


def split(pred_BxNxK: jax.Array, targets: list[Target]) -> dict[str, jax.Array]:
    """The head's output cut into each target's prediction, by name (``active``'s order)."""
    if pred_BxNxK.shape[-1] != total_dim(targets):
        raise ValueError(f"predictions have {pred_BxNxK.shape[-1]} features per token, the targets "
                         f"{[(t.name, t.dim) for t in targets]} need {total_dim(targets)}")
    out, start = {}, 0
    for t in targets:
        out[t.name] = pred_BxNxK[..., start:start + t.dim]
        start += t.dim
    return out
