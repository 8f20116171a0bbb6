"""Heads on top of an encoder, and the two models built from them.

* ``MaskFeat``: encoder with a mask token, then LayerNorm + Linear on the patch tokens to the
  targets' features side by side (``targets.active``; HOG alone: the HOG size, as official)
  (spec 6; head init: weight N(0, 0.02), bias 0, LN 1/0). ``config.head.type='transformer'``
  (official ``HEAD_TYPE: separate_xformer``) puts a ``Decoder`` (a Linear to its width when it
  differs from the encoder's, then ViT blocks) between the encoder and the LayerNorm.
  ``depths`` (official ``MASK.PRETRAIN_DEPTH``, ``config.head.depths``) with more than one
  block: one LayerNorm + Linear per listed block output (``norms``, ``heads``, of that block's
  width, ``encoder.block_widths``), each predicting every target; one block (the last) keeps the
  single ``norm`` / ``head``. MViTv2: blocks on the prediction grid only (``models.head_depths``).
* ``Decoder``: pre-norm ViT blocks of their own width (also the MAE decoder's, ``mae.py``).
* ``Classifier``: encoder, mean-pool of the patch tokens (cls excluded), LayerNorm, dropout
  (``dropout``, official ``MODEL.DROPOUT_RATE``; 0 by default), Linear to the classes, the Linear
  scaled by 0.001 at init (spec 7.2).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from maskfeat_jax import platform as platform_lib
from maskfeat_jax.models import cpu_kernels, layers, vit
from maskfeat_jax.models.layers import Dense, LayerNorm


class Decoder(nnx.Module):
    """``depth`` pre-norm ViT blocks (``vit.Block``, MLP 4x, no drop path) of width ``dim`` with
    ``heads`` heads over ``length`` tokens (cls included), as the program for ``platform``."""

    def __init__(self, dim: int, depth: int, heads: int, length: int, *, platform: str, attention: str,
                 remat: str, dtype, rngs):
        choice = platform_lib.select_attention(attention, platform, dtype, length, dim // heads)
        self.kernels = cpu_kernels.for_platform(platform)
        self.blocks = nnx.List([vit.Block(dim, heads, 4 * dim, 0.0, rngs=rngs, dtype=dtype, choice=choice,
                                          kernels=self.kernels) for _ in range(depth)])
        self.remat = remat

    def __call__(self, x_BxNxD):
        run = layers.block_runner(self.remat)
        for blk in self.blocks:
            x_BxNxD = run(blk, self.kernels.boundary(x_BxNxD), None)
        return self.kernels.boundary(x_BxNxD)


class MaskFeat(nnx.Module):
    """``decoder``: None (official ``separate``: LayerNorm + Linear on the encoder's tokens) or a
    dict ``dim, depth, heads, platform, attention, remat`` (``separate_xformer``: a ``Decoder``
    first, after a Linear to ``dim`` when ``dim`` differs from ``width``).

    ``depths``: the encoder blocks (0-based, ascending, the last included) that feed a head
    each; None or one block: the single head on the encoder's output. With several, the output
    has ``pred_BxNxK_by_depth`` (one prediction per listed block, in order) and ``pred_BxNxK``
    is the last one's."""

    def __init__(self, encoder: nnx.Module, width: int, target_dim: int, *, rngs, decoder: dict | None = None,
                 depths: tuple[int, ...] | None = None):
        self.encoder = encoder
        dt = encoder.dtype
        if decoder is not None:
            d = decoder["dim"]
            self.decoder_embed = Dense(width, d, ("embed", None), rngs=rngs, dtype=dt) if d != width else None
            length = math.prod(encoder.grid) + 1
            self.decoder = Decoder(d, decoder["depth"], decoder["heads"], length, platform=decoder["platform"],
                                   attention=decoder["attention"], remat=decoder["remat"], dtype=dt, rngs=rngs)
            width = d
        if depths is not None and len(depths) > 1:
            if decoder is not None:
                raise ValueError(f"config.head.depths={tuple(depths)}: several depths need the linear head "
                                 f"(config.head.type='linear')")
            self.depths = tuple(depths)
            widths = [encoder.block_widths[d] for d in depths]     # MViTv2: a block's width is its stage's
            self.norms = nnx.List([LayerNorm(w, rngs=rngs, bias_init=layers.zeros, dtype=dt) for w in widths])
            self.heads = nnx.List([Dense(w, target_dim, ("embed", "classes"), rngs=rngs, bias_init=layers.zeros,
                                         dtype=dt) for w in widths])
            return
        self.norm = LayerNorm(width, rngs=rngs, bias_init=layers.zeros, dtype=dt)
        self.head = Dense(width, target_dim, ("embed", "classes"), rngs=rngs, bias_init=layers.zeros,
                          dtype=dt)

    def __call__(self, images, mask_BxN, *, rng=None):
        if getattr(self, "heads", None) is not None:       # several depths (absent: one head, as before)
            out = self.encoder(images, mask_BxN, rng=rng, return_blocks=True)
            preds = tuple(head(norm(out["blocks"][d])[:, 1:]).astype(jnp.float32)
                          for d, norm, head in zip(self.depths, self.norms, self.heads))
            out["pred_BxNxK_by_depth"], out["pred_BxNxK"] = preds, preds[-1]
            return out
        out = self.encoder(images, mask_BxN, rng=rng)
        x = out["tokens_BxNxD"]
        if getattr(self, "decoder", None) is not None:      # absent: the linear head's tree as before
            x = self.decoder(self.decoder_embed(x) if self.decoder_embed is not None else x)
        x = self.norm(x)[:, 1:]       # drop cls
        out["pred_BxNxK"] = self.head(x).astype(jnp.float32)
        return out


# The head's dropout key is folded from the step's key with this number, which no block of an
# encoder (whose keys fold in the block index) reaches: the encoder's keys stay as without dropout.
HEAD_DROPOUT_STREAM = 1 << 24


def dropout(x, rate: float, rng):
    """Inverted dropout (zeroes with probability ``rate``, the rest scaled by ``1 / (1 - rate)``),
    the key folded from ``rng`` (:data:`HEAD_DROPOUT_STREAM`); identity when ``rng`` is None
    (evaluation) or ``rate`` is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(rng, HEAD_DROPOUT_STREAM), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Classifier(nnx.Module):
    """``dropout``: the rate on the pooled feature before the Linear, in training (a ``rng``) only."""

    def __init__(self, encoder: nnx.Module, width: int, num_classes: int, *, rngs, head_init_scale=0.001,
                 dropout: float = 0.0):
        self.encoder = encoder
        self.fc_norm = LayerNorm(width, rngs=rngs, dtype=encoder.dtype)
        self.head = Dense(width, num_classes, ("embed", "classes"), rngs=rngs, dtype=encoder.dtype)
        self.head.kernel[...] = self.head.kernel[...] * head_init_scale
        self.head.bias[...] = self.head.bias[...] * head_init_scale
        self.dropout_rate = float(dropout)

    def features(self, images, *, rng=None):
        out = self.encoder(images, rng=rng)
        out["pooled_BxD"] = self.fc_norm(out["tokens_BxNxD"][:, 1:].mean(axis=1))
        return out

    def __call__(self, images, *, rng=None):
        out = self.features(images, rng=rng)
        x = dropout(out["pooled_BxD"], self.dropout_rate, rng)
        out["logits_BxC"] = self.head(x).astype(jnp.float32)
        return out
