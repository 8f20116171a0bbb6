"""Model construction from a config: ``build(config, rngs)``."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from maskfeat_jax.models import heads, vit
from maskfeat_jax.targets import hog

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build(config, rngs: nnx.Rngs) -> nnx.Module:
    """The MaskFeat pre-training model (``config.task='pretrain'``) or a classifier."""
    m = config.model
    pretrain = config.task == "pretrain"
    if m.name != "vit":
        raise ValueError(f"config.model.name={m.name!r}: known models are ['vit']")
    if m.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={m.dtype!r}: expected one of {sorted(DTYPES)}")
    encoder = vit.ViT(variant=m.variant, image_size=config.input.image_size, drop_path=m.drop_path,
                      mask_token=pretrain, dtype=DTYPES[m.dtype], attention=m.attention, remat=m.remat,
                      rngs=rngs)
    if pretrain:
        target_dim = hog.hog_dim(encoder.patch, config.hog.nbins, config.hog.cell_size)
        return heads.MaskFeat(encoder, encoder.size.width, target_dim, rngs=rngs)
    return heads.Classifier(encoder, encoder.size.width, m.num_classes, rngs=rngs)
