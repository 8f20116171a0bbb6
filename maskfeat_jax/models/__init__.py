"""Model construction from a config: ``build(config, rngs)``, ``build_abstract(config)``;
checkpoint arrays fitted to a model's parameters: ``load(key, value, shape)``."""
from __future__ import annotations

import jax
from flax import nnx

from maskfeat_jax import platform as platform_lib
from maskfeat_jax.models import heads, mvit, vit
from maskfeat_jax.targets import hog


def build(config, rngs: nnx.Rngs, platform: str | None = None) -> nnx.Module:
    """The MaskFeat pre-training model (``config.task='pretrain'``) or a classifier, as the
    program for ``platform`` ('cpu', 'gpu', 'tpu'; default: ``config.platform``, whose 'auto'
    is the platform of this process's devices)."""
    m = config.model
    pretrain = config.task == "pretrain"
    platform = platform or platform_lib.target(config, jax.devices())
    if m.dtype != "auto" and m.dtype not in platform_lib.DTYPES:
        raise ValueError(f"config.model.dtype={m.dtype!r}: expected 'auto' or one of {sorted(platform_lib.DTYPES)}")
    common = dict(variant=m.variant, image_size=config.input.image_size, drop_path=m.drop_path,
                  mask_token=pretrain, dtype=platform_lib.compute_dtype(m.dtype, platform),
                  attention=m.attention, remat=m.remat, rngs=rngs)
    if m.name == "vit":
        encoder = vit.ViT(**common, platform=platform)
    elif m.name == "mvit":
        encoder = mvit.MViT(**common, num_frames=config.video.num_frames, pretrain=pretrain, platform=platform)
    else:
        raise ValueError(f"config.model.name={m.name!r}: known models are 'vit' and 'mvit'")
    if pretrain:
        target_dim = hog.hog_dim(encoder.patch, config.hog.nbins, config.hog.cell_size)
        return heads.MaskFeat(encoder, encoder.size.width, target_dim, rngs=rngs)
    return heads.Classifier(encoder, encoder.size.width, m.num_classes, rngs=rngs)


def build_abstract(config, platform: str | None = None) -> nnx.Module:
    """The model of ``config`` as shapes and dtypes only (no parameters in memory, no sharding)."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: build(config, nnx.Rngs(0), platform))


def load(key: str, value, shape: tuple):
    """A checkpoint's array for the encoder parameter ``key`` (a ``/``-joined path) fitted to
    the shape the model expects: ``vit.load`` (position table) and ``mvit.load`` (relative-
    position tables); other arrays as they are."""
    for family in (vit, mvit):
        value = family.load(key, value, tuple(shape))
    return value
