"""MAE-style pre-training of the ViT (official ``MASK.MAE_ON: True`` with ``MAE_RND_MASK: True``,
``HEAD_TYPE: separate_xformer``; ``config.mae``).

* Masking: per example, a uniformly random subset of exactly ``keep_count(N, ratio)`` patches
  is kept (``random_mask``, drawn on device in the step from the step's key; the data
  pipeline's block mask is not used). Shapes are static. Video: over all ``t*h*w`` space-time
  tokens; with ``config.mae.per_frame`` (official ``MASK.PER_FRAME_MASKING``) every temporal
  slot draws its own ``keep_count(h*w, ratio)`` patches; with ``config.mae.tube`` (official
  ``AUG.MASK_TUBE``) one such spatial draw is repeated in every slot (tubes through time).
* Encoder: the ViT on cls + the kept patches only (``ViT.encode_visible``), then a LayerNorm
  (official ``self.norm``).
* Decoder: a Linear from the encoder's width to ``decoder_dim`` (``decoder_embed``), the
  encoder's tokens scattered back to their places in a grid of the decoder's mask token, its
  own learned position table (cls included; official ``DECODER_SEP_POS_EMBED: False``; with
  ``decoder_sep_pos_embed`` separate spatial, temporal and class tables as the encoder's
  ``sep_pos_embed``),
  ``decoder_depth`` ViT blocks (``heads.Decoder``), LayerNorm and a Linear to the targets.
* The loss (``steps``) is the same masked-token MSE as MaskFeat's on the masked patches.

Official differences: the kept count is ``int(N * (1 - ratio))`` there (a floor), ``round``
here, which is the same for the ratios in use (e.g. 196 * 0.25 = 49); its kept tokens are in
the random order, here in grid order (attention does not see order; positions travel along).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from maskfeat_jax import sharding
from maskfeat_jax.models import heads, layers
from maskfeat_jax.models.layers import Dense, LayerNorm, param


def keep_count(n: int, ratio: float) -> int:
    """Patches an example keeps of ``n`` at mask ``ratio``: ``round(n * (1 - ratio))``."""
    return int(round(n * (1.0 - ratio)))


def random_mask(rng, batch: int, n: int, ratio: float, frames: int = 1, tube: bool = False):
    """``(keep_BxV, mask_BxN)``: per example, ``V = keep_count(n, ratio)`` distinct patch indices
    drawn uniformly without replacement (ascending), and the mask, True on the other ``n - V``.

    ``frames > 1``: the ``n`` tokens are ``frames`` temporal slots of ``n / frames`` patches
    (row-major), each keeping ``keep_count(n / frames, ratio)`` of its own patches,
    ``V = frames * keep_count(n / frames, ratio)``: drawn independently per slot (per-frame
    masking), or with ``tube`` one spatial draw repeated in every slot."""
    s = n // frames
    v = keep_count(s, ratio)
    noise_BxFxS = jax.random.uniform(rng, (batch, 1 if tube else frames, s))
    noise_BxFxS = sharding.constrain(noise_BxFxS, ("batch", None, "length"))
    keep_BxFxV = jnp.sort(jnp.argsort(noise_BxFxS, axis=-1)[..., :v], axis=-1).astype(jnp.int32)
    keep_BxFxV = jnp.broadcast_to(keep_BxFxV, (batch, frames, v))
    keep_BxV = (keep_BxFxV + s * jnp.arange(frames, dtype=jnp.int32)[None, :, None]).reshape(batch, -1)
    mask_BxN = jnp.ones((batch, n), bool).at[jnp.arange(batch)[:, None], keep_BxV].set(False)
    return keep_BxV, mask_BxN


def mask_layout(config) -> tuple[int, int]:
    """``(n, frames)`` of ``config``'s MAE masking: the encoder's tokens (``t*h*w`` for video)
    and the temporal slots that each keep the same count (per-frame or tube masking; 1: one
    draw over all tokens)."""
    from maskfeat_jax.models import vit      # local: vit imports nothing of this module
    _, patch = vit.parse_variant(config.model.variant)
    side = config.input.image_size // patch
    video = video_input(config)
    t = config.video.num_frames // config.model.tubelet if video else 1
    m = config.get("mae") or {}
    per_slot = video and (bool(m.get("per_frame", False)) or bool(m.get("tube", False)))
    return t * side * side, (t if per_slot else 1)


def video_input(config) -> bool:
    """Whether the ViT of ``config`` reads clips: ``config.input.dataset`` is a video dataset."""
    from maskfeat_jax.config_validate import VIDEO_DATASETS
    return config.input.dataset in VIDEO_DATASETS


def kept_tokens(config) -> int:
    """The tokens the MAE encoder sees, cls excluded."""
    n, frames = mask_layout(config)
    return frames * keep_count(n // frames, config.mae.mask_ratio)


def masker(config):
    """``draw(rng, batch) -> (keep_BxV, mask_BxN)``: ``random_mask`` for ``config``'s layout."""
    n, frames = mask_layout(config)
    ratio, tube = config.mae.mask_ratio, frames > 1 and bool(config.mae.get("tube", False))
    return lambda rng, batch: random_mask(rng, batch, n, ratio, frames, tube)


class MAE(nnx.Module):
    """``__call__(images, keep_BxV)`` -> ``tokens_BxNxD`` (the encoder's, ``(B, 1 + V, D)``) and
    ``pred_BxNxK`` (every patch's prediction, ``(B, N, target_dim)``, float32)."""

    def __init__(self, encoder: nnx.Module, target_dim: int, *, decoder_dim: int, decoder_depth: int,
                 decoder_heads: int, platform: str, attention: str = "auto", remat: str = "none",
                 decoder_sep_pos_embed: bool = False, rngs):
        width, dt = encoder.size.width, encoder.dtype
        n = math.prod(encoder.grid)
        self.encoder = encoder
        self.encoder_norm = LayerNorm(width, rngs=rngs, dtype=dt)
        self.decoder_embed = Dense(width, decoder_dim, ("embed", None), rngs=rngs, dtype=dt)
        self.mask_token = param(rngs, layers.normal_02, (1, 1, decoder_dim), (None, None, "embed"))
        self.sep_pos_embed = decoder_sep_pos_embed
        if decoder_sep_pos_embed:   # official dec_pos_embed_spatial / _temporal / _class
            t = encoder.grid[0] if encoder.video else 1
            self.dec_pos_embed_spatial = param(rngs, layers.normal_02, (1, n // t, decoder_dim),
                                               (None, "length", "embed"))
            self.dec_pos_embed_temporal = param(rngs, layers.normal_02, (1, t, decoder_dim), (None, "length", "embed"))
            self.dec_pos_embed_class = param(rngs, layers.normal_02, (1, 1, decoder_dim), (None, None, "embed"))
        else:                       # official decoder_pos_embed
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
        x = jnp.concatenate([x_BxVxE[:, :1], grid_BxNxE], axis=1) + self._pos_table().astype(dt)
        x = self.decoder(sharding.constrain(x, ("batch", "length", "act_embed")))
        out["pred_BxNxK"] = self.head(self.norm(x)[:, 1:]).astype(jnp.float32)
        return out

    def _pos_table(self):
        """The decoder's position embedding ``(1, 1 + N, E)``, as ``ViT.pos_table``."""
        if not self.sep_pos_embed:
            return self.pos_embed[...]
        sp, tm = self.dec_pos_embed_spatial[...], self.dec_pos_embed_temporal[...]
        grid_1xTxSxE = sp[:, None] + tm[:, :, None]
        return jnp.concatenate([self.dec_pos_embed_class[...], grid_1xTxSxE.reshape(1, -1, sp.shape[-1])], axis=1)
