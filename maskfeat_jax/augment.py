"""Fine-tuning's batch augmentations, run on device inside the step: Mixup / CutMix with
label smoothing (``mix``) and random erasing (``erase``).

Both are pure functions of a key, so the step's randomness stays a function of (seed, step).
The host draws what needs no pixels (the erase box, with the crop); the pixels change here, on
the normalised float images.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def partners(x):
    """Each example's mixing partner: the batch reversed within each device's slice of it (as
    the official per-GPU mixup reverses its own batch), so that no example crosses devices.
    Without a mesh, or on one device, the whole batch reversed."""
    mesh = jax.sharding.get_abstract_mesh()
    shards = 1 if mesh.empty else math.prod(mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape)
    b = x.shape[0]
    return x.reshape(shards, b // shards, *x.shape[1:])[:, ::-1].reshape(x.shape)


def mix(rng, images, labels, num_classes, a, valid=None):
    """Mixup / CutMix (timm batch mode, pairing each example with ``partners``) with label
    smoothing folded into the targets. An example whose partner is not valid (an input that
    failed to decode) is left unmixed; with ``a.mix_prob < 1`` a batch is mixed with that
    probability, else left unmixed (label smoothing only). Returns (images, soft targets)."""
    k_lam, k_switch, k_box = jax.random.split(rng, 3)
    off = a.label_smoothing / num_classes
    onehot = jax.nn.one_hot(labels, num_classes) * (1.0 - a.label_smoothing) + off
    use_cutmix = (a.cutmix_alpha > 0) & ((a.mixup_alpha <= 0) | (jax.random.uniform(k_switch) < a.switch_prob))
    alpha = jnp.where(use_cutmix, max(a.cutmix_alpha, 1e-6), max(a.mixup_alpha, 1e-6))
    lam = jax.random.beta(k_lam, alpha, alpha)
    hh, ww = images.shape[-3:-1]          # images (B, H, W, C) or clips (B, T, H, W, C)
    cut = jnp.sqrt(1.0 - lam)
    ch, cw = (hh * cut).astype(jnp.int32), (ww * cut).astype(jnp.int32)
    cy, cx = jax.random.randint(k_box, (2,), 0, jnp.array([hh, ww]))
    y0, y1 = jnp.clip(cy - ch // 2, 0, hh), jnp.clip(cy + ch // 2, 0, hh)
    x0, x1 = jnp.clip(cx - cw // 2, 0, ww), jnp.clip(cx + cw // 2, 0, ww)
    rows, cols = jnp.arange(hh)[:, None], jnp.arange(ww)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    lam_cut = 1.0 - ((y1 - y0) * (x1 - x0)) / (hh * ww)
    enabled = (a.mixup_alpha > 0) | (a.cutmix_alpha > 0)
    if not enabled:
        return images, onehot
    partner_ok = jnp.ones(images.shape[:1], bool) if valid is None else partners(valid)
    if a.get("mix_prob", 1.0) < 1.0:      # official MIXUP.PROB: the whole batch mixed or not
        partner_ok = partner_ok & (jax.random.uniform(jax.random.fold_in(rng, 3)) < a.mix_prob)
    lam = jnp.where(partner_ok, jnp.where(use_cutmix, lam_cut, lam), 1.0)        # (B,)
    per_example = (-1,) + (1,) * (images.ndim - 1)
    flipped, lam_x, ok_x = partners(images), lam.reshape(per_example), partner_ok.reshape(per_example)
    box_x = box.reshape((1,) * (images.ndim - 3) + box.shape + (1,))        # (1, [1,] H, W, 1)
    mixed = jnp.where(use_cutmix, jnp.where(box_x & ok_x, flipped, images),
                      lam_x * images + (1 - lam_x) * flipped)
    return mixed, lam[:, None] * onehot + (1 - lam[:, None]) * partners(onehot)


def erase(rng, images, boxes_Bx4):
    """Random erasing, pixel mode: the (top, left, h, w) box of each example gets N(0, 1) noise
    (for clips, the same box on every frame)."""
    hh, ww = images.shape[-3:-1]
    rows, cols = jnp.arange(hh)[None, :, None], jnp.arange(ww)[None, None, :]
    t, l, h, w = (boxes_Bx4[:, i, None, None] for i in range(4))
    inside = (rows >= t) & (rows < t + h) & (cols >= l) & (cols < l + w)          # (B, H, W)
    inside = inside.reshape(inside.shape[:1] + (1,) * (images.ndim - 4) + inside.shape[1:] + (1,))
    return jnp.where(inside, jax.random.normal(rng, images.shape, images.dtype), images)
