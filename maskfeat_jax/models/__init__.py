"""Model construction from a config: ``build(config, rngs)``, ``build_abstract(config)``;
checkpoint arrays fitted to a model's parameters: ``load(key, value, shape)``."""
from __future__ import annotations

import jax
from flax import nnx

from maskfeat_jax import platform as platform_lib, targets
from maskfeat_jax.models import heads, mae, mvit, vit


def build(config, rngs: nnx.Rngs, platform: str | None = None) -> nnx.Module:
    """The MaskFeat pre-training model (``config.task='pretrain'``) or a classifier, as the
    program for ``platform`` ('cpu', 'gpu', 'tpu'; default: ``config.platform``, whose 'auto'
    is the platform of this process's devices)."""
    m = config.model
    pretrain = config.task == "pretrain"
    platform = platform or platform_lib.target(config, jax.devices())
    if m.dtype != "auto" and m.dtype not in platform_lib.DTYPES:
        raise ValueError(f"config.model.dtype={m.dtype!r}: expected 'auto' or one of {sorted(platform_lib.DTYPES)}")
    mae_on = pretrain and mae_enabled(config)
    common = dict(variant=m.variant, image_size=config.input.image_size, drop_path=m.drop_path,
                  mask_token=pretrain and not mae_on, dtype=platform_lib.compute_dtype(m.dtype, platform),
                  attention=m.attention, remat=m.remat, rngs=rngs)
    if m.name == "vit" and mae_on:
        return _mae(config, common, platform)
    if m.name == "vit":
        encoder = vit.ViT(**common, platform=platform)
    elif m.name == "mvit":
        encoder = mvit.MViT(**common, num_frames=config.video.num_frames, pretrain=pretrain, platform=platform)
    else:
        raise ValueError(f"config.model.name={m.name!r}: known models are 'vit' and 'mvit'")
    if pretrain:   # one head for all targets: HOG alone keeps the HOG-only parameters
        active = targets.active(config, encoder.patch, encoder.patch_stride[0] if m.name == "mvit" else None)
        return heads.MaskFeat(encoder, encoder.size.width, targets.total_dim(active), rngs=rngs,
                              decoder=_transformer_head(config, platform))
    return heads.Classifier(encoder, encoder.size.width, m.num_classes, rngs=rngs)


def mae_enabled(config) -> bool:
    """``config.mae.enabled`` (False for a config saved before ``config.mae`` existed)."""
    return bool((config.get("mae") or {}).get("enabled", False))


def _transformer_head(config, platform: str) -> dict | None:
    """``heads.MaskFeat``'s ``decoder`` for ``config.head.type='transformer'``, else None."""
    h = config.get("head") or {}
    if h.get("type", "linear") == "linear":
        return None
    if h.type != "transformer":
        raise ValueError(f"config.head.type={h.type!r}: expected 'linear' or 'transformer'")
    return dict(dim=h.decoder_dim, depth=h.decoder_depth, heads=h.decoder_heads, platform=platform,
                attention=config.model.attention, remat=config.model.remat)


def _mae(config, common: dict, platform: str) -> mae.MAE:
    """The MAE model of ``config.mae``: the ViT's attention chosen for the kept tokens + cls."""
    c = config.mae
    _, patch = vit.parse_variant(config.model.variant)
    n = (config.input.image_size // patch) ** 2
    encoder = vit.ViT(**common, platform=platform, length=mae.keep_count(n, c.mask_ratio) + 1)
    active = targets.active(config, encoder.patch)
    return mae.MAE(encoder, targets.total_dim(active), decoder_dim=c.decoder_dim, decoder_depth=c.decoder_depth,
                   decoder_heads=c.decoder_heads, platform=platform, attention=config.model.attention,
                   remat=config.model.remat, rngs=common["rngs"])


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
