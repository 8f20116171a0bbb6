"""MAE-style pre-training of the ViT (official ``MASK.MAE_ON: True`` with ``MAE_RND_MASK: True``,
``HEAD_TYPE: separate_xformer``; ``config.mae``).

* Masking: per example, a uniformly random subset of exactly ``keep_count(N, ratio)`` patches
  is kept (``random_mask``, drawn on device in the step from the step's key; the data
  pipeline's block mask is not used). Shapes are static.
* Encoder: the ViT on cls + the kept patches only (``ViT.encode_visible``), then a LayerNorm
  (official ``self.norm``).
* Decoder: a Linear from the encoder's width to ``decoder_dim`` (``decoder_embed``), the
  encoder's tokens scattered back to their places in a grid of the decoder's mask token, its
  own learned position table (cls included; official ``DECODER_SEP_POS_EMBED: False``),
  ``decoder_depth`` ViT blocks (``heads.Decoder``), LayerNorm and a Linear to the targets.
* The loss (``steps``) is the same masked-token MSE as MaskFeat's on the masked patches.

Official differences: the kept count is ``int(N * (1 - ratio))`` there (a floor), ``round``
here, which is the same for the ratios in use (e.g. 196 * 0.25 = 49); its kept tokens are in
the random order, here in grid order (attention does not see order; positions travel along).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from maskfeat_jax import sharding
from maskfeat_jax.models import heads, layers
from maskfeat_jax.models.layers import Dense, LayerNorm, param


def keep_count(n: int, ratio: float) -> int:
    """Patches an example keeps of ``n`` at mask ``ratio``: ``round(n * (1 - ratio))``."""
    return int(round(n * (1.0 - ratio)))


def random_mask(rng, batch: int, n: int, ratio: float):
    """``(keep_BxV, mask_BxN)``: per example, ``V = keep_count(n, ratio)`` distinct patch indices
    drawn uniformly without replacement (ascending), and the mask, True on the other ``n - V``."""
    v = keep_count(n, ratio)
    noise_BxN = sharding.constrain(jax.random.uniform(rng, (batch, n)), ("batch", "length"))
    keep_BxV = jnp.sort(jnp.argsort(noise_BxN, axis=1)[:, :v], axis=1).astype(jnp.int32)
    mask_BxN = jnp.ones((batch, n), bool).at[jnp.arange(batch)[:, None], keep_BxV].set(False)
    return keep_BxV, mask_BxN


class MAE(nnx.Module):
    """``__call__(images, keep_BxV)`` -> ``tokens_BxNxD`` (the encoder's, ``(B, 1 + V, D)``) and
    ``pred_BxNxK`` (every patch's prediction, ``(B, N, target_dim)``, float32)."""

    def __init__(self, encoder: nnx.Module, target_dim: int, *, decoder_dim: int, decoder_depth: int,
                 decoder_heads: int, platform: str, attention: str = "auto", remat: str = "none", rngs):
        width, dt = encoder.size.width, encoder.dtype
        n = encoder.grid[0] * encoder.grid[1]
        self.encoder = encoder
        self.encoder_norm = LayerNorm(width, rngs=rngs, dtype=dt)
        self.decoder_embed = Dense(width, decoder_dim, ("embed", None), rngs=rngs, dtype=dt)
        self.mask_token = param(rngs, layers.normal_02, (1, 1, decoder_dim), (None, None, "embed"))
        self.pos_embed = param(rngs, layers.normal_02, (1, n + 1, decoder_dim), (None, "length", "embed"))
        self.decoder = heads.Decoder(decoder_dim, decoder_depth, decoder_heads, n + 1, platform=platform,
                                     attention=attention, remat=remat, dtype=dt, rngs=rngs)
        self.norm = LayerNorm(decoder_dim, rngs=rngs, bias_init=layers.zeros, dtype=dt)
        self.head = Dense(decoder_dim, target_dim, ("embed", "classes"), rngs=rngs, bias_init=layers.zeros,
                          dtype=dt)
        self.dtype, self.num_patches = dt, n

    def __call__(self, images, keep_BxV, *, rng=None):
        dt = self.dtype
        out = self.encoder.encode_visible(images, keep_BxV, rng=rng)
        x_BxVxE = self.decoder_embed(self.encoder_norm(out["tokens_BxNxD"]))     # (B, 1 + V, E)
        b, e = x_BxVxE.shape[0], x_BxVxE.shape[-1]
        grid_BxNxE = jnp.broadcast_to(self.mask_token[...].astype(dt), (b, self.num_patches, e))
        grid_BxNxE = jax.vmap(lambda g, k, v: g.at[k].set(v))(grid_BxNxE, keep_BxV, x_BxVxE[:, 1:])
        x = jnp.concatenate([x_BxVxE[:, :1], grid_BxNxE], axis=1) + self.pos_embed[...].astype(dt)
        x = self.decoder(sharding.constrain(x, ("batch", "length", "act_embed")))
        out["pred_BxNxK"] = self.head(self.norm(x)[:, 1:]).astype(jnp.float32)
        return out
