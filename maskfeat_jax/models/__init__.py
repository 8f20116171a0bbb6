"""Model construction from a config: ``build(config, rngs)``, ``build_abstract(config)``."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from maskfeat_jax.models import heads, mvit, vit
from maskfeat_jax.targets import hog

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build(config, rngs: nnx.Rngs) -> nnx.Module:
    """The MaskFeat pre-training model (``config.task='pretrain'``) or a classifier."""
    m = config.model
    pretrain = config.task == "pretrain"
    if m.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={m.dtype!r}: expected one of {sorted(DTYPES)}")
    common = dict(variant=m.variant, image_size=config.input.image_size, drop_path=m.drop_path,
                  mask_token=pretrain, dtype=DTYPES[m.dtype], attention=m.attention, remat=m.remat, rngs=rngs)
    if m.name == "vit":
        encoder = vit.ViT(**common)
    elif m.name == "mvit":
        attention = m.attention if m.attention in ("auto", "einsum") else "auto"
        encoder = mvit.MViT(**dict(common, attention=attention), num_frames=config.video.num_frames,
                            pretrain=pretrain)
    else:
        raise ValueError(f"config.model.name={m.name!r}: known models are 'vit' and 'mvit'")
    if pretrain:
        target_dim = hog.hog_dim(encoder.patch, config.hog.nbins, config.hog.cell_size)
        return heads.MaskFeat(encoder, encoder.size.width, target_dim, rngs=rngs)
    return heads.Classifier(encoder, encoder.size.width, m.num_classes, rngs=rngs)


def build_abstract(config) -> nnx.Module:
    """The model of ``config`` as shapes and dtypes only (no parameters in memory, no sharding)."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: build(config, nnx.Rngs(0)))
