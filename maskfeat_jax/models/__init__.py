"""Model construction from a config: ``build(config, rngs)``, ``build_abstract(config)``;
checkpoint arrays fitted to a model's parameters: ``load(key, value, shape)``."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from maskfeat_jax import platform as platform_lib, targets
from maskfeat_jax.models import detection, heads, mae, mvit, vit


def build(config, rngs: nnx.Rngs, platform: str | None = None) -> nnx.Module:
    """The MaskFeat pre-training model (``config.task='pretrain'``), a classifier (``'finetune'``)
    or an AVA detector (``'detect'``), as the program for ``platform`` ('cpu', 'gpu', 'tpu';
    default: ``config.platform``, whose 'auto' is the platform of this process's devices)."""
    m = config.model
    pretrain = config.task == "pretrain"
    platform = platform or platform_lib.target(config, jax.devices())
    if m.dtype != "auto" and m.dtype not in platform_lib.DTYPES:
        raise ValueError(f"config.model.dtype={m.dtype!r}: expected 'auto' or one of {sorted(platform_lib.DTYPES)}")
    mae_on = pretrain and mae_enabled(config)
    common = dict(variant=m.variant, image_size=config.input.image_size, drop_path=m.drop_path,
                  mask_token=pretrain and not mae_on, dtype=platform_lib.compute_dtype(m.dtype, platform),
                  attention=m.attention, remat=m.remat, rngs=rngs)
    if m.name == "vit":
        common.update(vit_video_args(config))
    if m.name == "vit" and mae_on:
        return _mae(config, common, platform)
    if m.name == "vit":
        encoder = vit.ViT(**common, platform=platform)
    elif m.name == "mvit":
        encoder = mvit.MViT(**common, num_frames=config.video.num_frames, pretrain=pretrain, platform=platform)
    else:
        raise ValueError(f"config.model.name={m.name!r}: known models are 'vit' and 'mvit'")
    if pretrain:   # one head for all targets: HOG alone keeps the HOG-only parameters
        active = targets.active(config, encoder.patch, temporal_stride(config))
        return heads.MaskFeat(encoder, encoder.size.width, targets.total_dim(active), rngs=rngs,
                              decoder=_transformer_head(config, platform), depths=head_depths(config))
    dropout = m.get("head_dropout", 0.0)       # absent from configs saved before it existed
    if config.task == "detect":
        return detection.Detector(encoder, encoder.size.width, m.num_classes, image_size=config.input.image_size,
                                  dropout=dropout, rngs=rngs)
    return heads.Classifier(encoder, encoder.size.width, m.num_classes, rngs=rngs, dropout=dropout)


def vit_video_args(config) -> dict:
    """The ViT's video arguments of ``config``: none for images; for a video dataset the frames,
    ``config.model.tubelet`` and ``config.model.sep_pos_embed``."""
    m = config.model
    if not mae.video_input(config):
        return dict(sep_pos_embed=bool(m.get("sep_pos_embed", False)))
    return dict(num_frames=config.video.num_frames, tubelet=m.tubelet, sep_pos_embed=bool(m.sep_pos_embed))


def temporal_stride(config) -> int | None:
    """Frames per token of the model's video input (MViTv2: 2; the video ViT: its tubelet),
    None for images: the targets' ``temporal_stride``."""
    if config.model.name == "mvit":
        return 2
    return config.model.tubelet if mae.video_input(config) else None


def mae_enabled(config) -> bool:
    """``config.mae.enabled`` (False for a config saved before ``config.mae`` existed)."""
    return bool((config.get("mae") or {}).get("enabled", False))


def head_depths(config) -> tuple[int, ...]:
    """``config.head.depths`` as ascending 0-based encoder block indices (default: the last block
    alone); a ``ValueError`` names the key when an entry is not a block, repeats, leaves the last
    block out, asks for several heads where they are not implemented (MAE, the transformer head),
    or names an MViTv2 block whose token grid is finer than the prediction grid (a block before
    the last q-pooling: the official code resizes the targets to its grid, we do not)."""
    raw = (config.get("head") or {}).get("depths", (-1,))     # absent from configs saved before it
    key = f"config.head.depths={raw!r}"
    if isinstance(raw, int) or not all(isinstance(d, int) and not isinstance(d, bool) for d in raw) or not raw:
        raise ValueError(f"{key}: expected a non-empty tuple of block indices, e.g. (-1,) or (5, -1)")
    name, variant = config.model.name, config.model.variant
    if name == "vit":
        n, what = vit.parse_variant(variant)[0].depth, f"the ViT {variant!r}"
    elif name == "mvit":
        n, what = mvit.parse_variant(variant).depth, f"the MViTv2 {variant!r}"
    else:
        if tuple(raw) != (-1,):
            raise ValueError(f"{key}: heads on other blocks are implemented for the ViT and MViTv2 only; set (-1,)")
        return (-1,)
    if any(not -n <= d < n for d in raw):
        raise ValueError(f"{key}: {what} has blocks 0..{n - 1} (or -{n}..-1)")
    depths = tuple(sorted(d % n for d in raw))
    if len(set(depths)) != len(depths) or depths[-1] != n - 1:
        raise ValueError(f"{key}: each block at most once, and the last block ({n - 1} or -1) listed")
    if len(depths) > 1 and (mae_enabled(config) or (config.get("head") or {}).get("type", "linear") != "linear"):
        raise ValueError(f"{key}: several heads are implemented for the dense path's linear head only "
                         f"(config.mae.enabled=False, config.head.type='linear')")
    if name == "mvit":        # pre-training's blocks: the last q-pooling sets the prediction grid
        strides = np.cumprod([4] + [q[1] for *_, q, _ in mvit.block_configs(mvit.parse_variant(variant), True)])[1:]
        first = min(i for i in range(n) if strides[i] == strides[-1])
        for d in depths:
            if strides[d] != strides[-1]:
                raise ValueError(f"{key}: block {d} of {what} outputs a finer token grid (stride {strides[d]} px) "
                                 f"than the prediction grid (stride {strides[-1]} px, blocks {first}..{n - 1}); "
                                 f"heads on finer stages (official: targets resized to their grid) are not "
                                 f"implemented")
    return depths


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
    encoder = vit.ViT(**common, platform=platform, length=mae.kept_tokens(config) + 1)
    active = targets.active(config, encoder.patch, temporal_stride(config))
    return mae.MAE(encoder, targets.total_dim(active), decoder_dim=c.decoder_dim, decoder_depth=c.decoder_depth,
                   decoder_heads=c.decoder_heads, platform=platform, attention=config.model.attention,
                   remat=config.model.remat, decoder_sep_pos_embed=bool(c.get("decoder_sep_pos_embed", False)),
                   rngs=common["rngs"])


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
