"""Heads on top of an encoder, and the two models built from them.

* ``MaskFeat``: encoder with a mask token, then LayerNorm + Linear to the HOG target size
  on the patch tokens (spec 6; head init: weight N(0, 0.02), bias 0, LN 1/0).
* ``Classifier``: encoder, mean-pool of the patch tokens (cls excluded), LayerNorm,
  Linear to the classes, the Linear scaled by 0.001 at init (spec 7.2).
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from maskfeat_jax.models import layers
from maskfeat_jax.models.layers import Dense, LayerNorm


class MaskFeat(nnx.Module):
    def __init__(self, encoder: nnx.Module, width: int, target_dim: int, *, rngs):
        self.encoder = encoder
        self.norm = LayerNorm(width, rngs=rngs, bias_init=layers.zeros, dtype=encoder.dtype)
        self.head = Dense(width, target_dim, ("embed", "classes"), rngs=rngs, bias_init=layers.zeros,
                          dtype=encoder.dtype)

    def __call__(self, images, mask_BxN, *, rng=None):
        out = self.encoder(images, mask_BxN, rng=rng)
        x = self.norm(out["tokens_BxNxD"])[:, 1:]       # drop cls
        out["pred_BxNxK"] = self.head(x).astype(jnp.float32)
        return out


class Classifier(nnx.Module):
    def __init__(self, encoder: nnx.Module, width: int, num_classes: int, *, rngs, head_init_scale=0.001):
        self.encoder = encoder
        self.fc_norm = LayerNorm(width, rngs=rngs, dtype=encoder.dtype)
        self.head = Dense(width, num_classes, ("embed", "classes"), rngs=rngs, dtype=encoder.dtype)
        self.head.kernel[...] = self.head.kernel[...] * head_init_scale
        self.head.bias[...] = self.head.bias[...] * head_init_scale

    def features(self, images, *, rng=None):
        out = self.encoder(images, rng=rng)
        out["pooled_BxD"] = self.fc_norm(out["tokens_BxNxD"][:, 1:].mean(axis=1))
        return out

    def __call__(self, images, *, rng=None):
        out = self.features(images, rng=rng)
        out["logits_BxC"] = self.head(out["pooled_BxD"]).astype(jnp.float32)
        return out
