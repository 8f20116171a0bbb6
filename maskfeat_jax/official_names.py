"""The official PySlowFast names and layouts of our parameters, both directions.

Official names (read from facebookresearch/SlowFast, ``slowfast/models/``):

* backbone, class ``MViT`` (``video_model_builder.py``; ViT is this class with 2-D patches
  and no pooling): ``patch_embed.proj`` (``stem_helper.PatchEmbed``, Conv2d for ViT,
  Conv3d for MViTv2), ``cls_token``, ``pos_embed`` (ViT: one table, cls included; MViTv2
  MaskFeat: none), ``blocks.i.{norm1, attn, norm2, mlp.fc1, mlp.fc2}`` and, where the width
  changes, ``blocks.i.proj`` (``attention.MultiScaleBlock``); attention
  (``attention.MultiScaleAttention``): ``attn.qkv`` (one Linear, output laid out as
  (3, heads, head_dim)), ``attn.proj``, and for MViTv2 ``attn.pool_{q,k,v}`` (depthwise
  Conv3d, no bias), ``attn.norm_{q,k,v}``, ``attn.rel_pos_{h,w,t}``;
* pre-training (``masked.MaskMViT``): ``mask_token``; the final ``norm`` and ``head`` are
  deleted and the HOG head is ``pred_head`` (``head_helper.MSSeparateHead``):
  ``pred_head.transforms.0.0`` (its LayerNorm, in an ``nn.Sequential``) and
  ``pred_head.projections.0`` (Linear to 108); with several ``MASK.PRETRAIN_DEPTH`` blocks one
  pair per block in ascending order, ``pred_head.transforms.{i}.0`` and
  ``pred_head.projections.{i}`` (our ``norms/i``, ``heads/i``); ``hogs.0.weight_x/weight_y`` are the HOG
  layer's Sobel buffers (``operators.HOGLayerC``);
* video ViT (``SEP_POS_EMBED``): ``pos_embed_spatial``, ``pos_embed_temporal``,
  ``pos_embed_class`` instead of ``pos_embed``; ``patch_embed.proj`` a Conv3d over tubelets;
* MAE pre-training (``MASK.MAE_ON``): ``_mae_head``;
* fine-tuning (``MViT`` with ``USE_MEAN_POOLING: True``): ``norm`` is the LayerNorm after
  the mean over the patch tokens (our ``fc_norm``), ``head.projection``
  (``head_helper.TransformerBasicHead``) the classifier.

The HOG head's 108 outputs are in the official (channel, bin, cell row, cell column) order,
which ``targets.hog`` also uses, so the projection is copied as is.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import numpy as np

# --------------------------------------------------------------------------------------
# Tensor transforms, both directions side by side. ``torch_shape(ours)`` is the shape the
# checkpoint tensor must have for a parameter of shape ``ours``; ``apply(t, ours)`` converts
# PyTorch layout -> ours, ``to_torch(x)`` ours -> PyTorch layout (its exact inverse: only
# transposes and reshapes, no arithmetic).


@dataclasses.dataclass(frozen=True)
class Transform:
    torch_shape: Callable[[tuple], tuple]
    apply: Callable[[np.ndarray, tuple], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def _conv_torch_shape(s):               # ours (*kernel, C_in, C_out) <-> torch (C_out, C_in, *kernel)
    return (s[-1], s[-2], *s[:-2])


TRANSFORMS = {
    "copy": Transform(lambda s: tuple(s), lambda t, s: t, lambda x: x),
    # Linear weight (out, in) <-> kernel (in, out)
    "linear": Transform(lambda s: (s[1], s[0]), lambda t, s: t.T, lambda x: x.T),
    # Conv weight (out, in, *k) <-> (*k, in, out)
    "conv": Transform(_conv_torch_shape,
                      lambda t, s: np.transpose(t, (*range(2, t.ndim), 1, 0)),
                      lambda x: np.transpose(x, (x.ndim - 1, x.ndim - 2, *range(x.ndim - 2)))),
    # qkv Linear weight (3*heads*hd, D) <-> (D, 3, heads, hd): output rows are (3, heads, hd)
    "qkv_kernel": Transform(lambda s: (math.prod(s[1:]), s[0]), lambda t, s: t.T.reshape(s),
                            lambda x: x.reshape(x.shape[0], -1).T),
    "qkv_bias": Transform(lambda s: (math.prod(s),), lambda t, s: t.reshape(s), lambda x: x.reshape(-1)),
    # output projection weight (D, heads*hd) <-> (heads, hd, D): input columns are (heads, hd)
    "proj_kernel": Transform(lambda s: (s[2], s[0] * s[1]), lambda t, s: t.T.reshape(s),
                             lambda x: x.reshape(-1, x.shape[-1]).T),
    # depthwise pooling conv (hd, 1, *k) <-> (*k, hd)
    "depthwise": Transform(lambda s: (s[-1], 1, *s[:-1]),
                           lambda t, s: np.transpose(t[:, 0], (*range(1, t.ndim - 1), 0)),
                           lambda x: np.transpose(x, (x.ndim - 1, *range(x.ndim - 1)))[:, None]),
}

# --------------------------------------------------------------------------------------
# Name tables: (our flattened path as a regex, the official name with \1.. groups, transform).
# One table per model family for the encoder, one per task for the head.

def _norm(ours: str, theirs: str):
    """A LayerNorm: ``scale`` / ``bias`` <-> ``weight`` / ``bias``."""
    return [(rf"{ours}/scale", rf"{theirs}.weight", "copy"), (rf"{ours}/bias", rf"{theirs}.bias", "copy")]


def _linear(ours: str, theirs: str, kernel: str = "linear"):
    """A Linear: ``kernel`` / ``bias`` <-> ``weight`` / ``bias``."""
    return [(rf"{ours}/kernel", rf"{theirs}.weight", kernel), (rf"{ours}/bias", rf"{theirs}.bias", "copy")]


def _block(ours: str, theirs: str):
    """A ViT block at ``ours/(i)`` <-> ``theirs.(i)``: LayerNorms, qkv, proj, MLP."""
    b, t = ours + r"/(\d+)", theirs + r".\1"
    return _norm(b + r"/norm([12])", t + r".norm\2") + [
        (b + r"/attn/qkv_kernel", t + r".attn.qkv.weight", "qkv_kernel"),
        (b + r"/attn/qkv_bias", t + r".attn.qkv.bias", "qkv_bias"),
        (b + r"/attn/proj_kernel", t + r".attn.proj.weight", "proj_kernel"),
        (b + r"/attn/proj_bias", t + r".attn.proj.bias", "copy"),
    ] + _linear(b + r"/mlp/fc([12])", t + r".mlp.fc\2")


_B = r"encoder/blocks/(\d+)"
_BLOCK = _block("encoder/blocks", "blocks")

_STEM = [
    (r"encoder/patch_kernel", "patch_embed.proj.weight", "conv"),
    (r"encoder/patch_bias", "patch_embed.proj.bias", "copy"),
    (r"encoder/cls_token", "cls_token", "copy"),
    (r"encoder/mask_token", "mask_token", "copy"),
]

ENCODER_RULES = {
    "vit": _STEM + [(r"encoder/pos_embed", "pos_embed", "copy"),      # SEP_POS_EMBED: three tables
                    (r"encoder/pos_embed_(spatial|temporal|class)", r"pos_embed_\1", "copy")] + _BLOCK,
    "mvit": _STEM + _BLOCK + _norm(_B + r"/attn/norm_([qkv])", r"blocks.\1.attn.norm_\2") + [
        (_B + r"/attn/pool_([qkv])", r"blocks.\1.attn.pool_\2.weight", "depthwise"),
        (_B + r"/attn/rel_pos_([hwt])", r"blocks.\1.attn.rel_pos_\2", "copy"),
    ] + _linear(_B + r"/proj", r"blocks.\1.proj"),
}

HEAD_RULES = {
    # one head (the last block); several (config.head.depths, MASK.PRETRAIN_DEPTH): ours i-th of the
    # sorted depths is MSSeparateHead's i-th transform and projection
    "pretrain": _norm("norm", "pred_head.transforms.0.0") + _linear("head", "pred_head.projections.0")
                + _norm(r"norms/(\d+)", r"pred_head.transforms.\1.0")
                + _linear(r"heads/(\d+)", r"pred_head.projections.\1"),
    "finetune": _norm("fc_norm", "norm") + _linear("head", "head.projection"),
}
# the AVA detector (``models/detection.py``): the final norm and the RoI head's Linear carry the
# classifier's names here and in PySlowFast (``norm``, ``ResNetRoIHead.projection``)
HEAD_RULES["detect"] = HEAD_RULES["finetune"]



def _mae_head(depth: int):
    """MAE pre-training (``masked.MaskMViT`` with ``MASK.MAE_ON``): the encoder's final ``norm``,
    ``decoder_embed``, the decoder's ``mask_token`` and position tables (``decoder_pos_embed``, or
    ``dec_pos_embed_{spatial,temporal,class}``), and ``pred_head`` (``MSSeparateHead`` with
    ``separate_xformer``): ``transforms.0.0 .. depth-1`` the decoder blocks, ``transforms.0.depth``
    its LayerNorm, ``projections.0`` the Linear to the targets."""
    return _norm("encoder_norm", "norm") + _linear("decoder_embed", "decoder_embed") + [
        ("mask_token", "mask_token", "copy"),
        ("pos_embed", "decoder_pos_embed", "copy"),
        (r"dec_pos_embed_(spatial|temporal|class)", r"dec_pos_embed_\1", "copy"),
    ] + _block("decoder/blocks", "pred_head.transforms.0") + _norm("norm", f"pred_head.transforms.0.{depth}") \
        + _linear("head", "pred_head.projections.0")


def mae_depth(paths) -> int | None:
    """The decoder depth of an MAE model from its flattened parameter paths (it alone has
    ``encoder_norm``); None for the other models."""
    if not any(p.startswith("encoder_norm/") for p in paths):
        return None
    return len({m.group(1) for p in paths if (m := re.match(r"decoder/blocks/(\d+)/", p))})


# Checkpoint entries that are deliberately not converted (regex -> why).
IGNORED = {
    r"hogs\.\d+\.weight_[xy]": "HOG Sobel filter buffers (targets.hog builds them)",
    r"hogs\.\d+\.gkern": "HOG Gaussian window buffer (config.hog.gaussian_window)",
}

# Hints for unmapped keys that point at a config mismatch rather than a broken file.
HINTS = [
    (r"pred_head\.(transforms\.[1-9]\d*\.0\.|projections\.[1-9])",
     "a multi-depth head (MASK.PRETRAIN_DEPTH with several blocks): list those blocks in "
     "--config.head.depths"),
    (r"pred_head\.", "a pre-training (MaskMViT) checkpoint: use --config.task=pretrain, then "
                     "fine-tune from it with --config.init_from"),
    (r"head\.projection\.|^norm\.", "a fine-tuned checkpoint: use --config.task=finetune and the "
                                    "checkpoint's number of classes (--config.model.num_classes)"),
    (r"pos_embed_(spatial|temporal|class)", "separate space-time position tables (SEP_POS_EMBED): a video "
                                            "ViT, configs/vit_k400_mae.py (config.model.sep_pos_embed=True)"),
    (r"decoder_|dec_pos_embed_", "an MAE pre-training checkpoint (MASK.MAE_ON): configs/vit_k400_mae.py "
                                 "(config.mae.enabled=True, its decoder sizes)"),
    (r"pred_head\.transforms\.0\.[1-9]", "a transformer decoder head (HEAD_TYPE separate_xformer): only "
                                          "MAE's (config.mae.enabled=True) converts"),
    (r"blocks\.\d+\.", "the checkpoint has more blocks or other block parameters than "
                       "config.model.variant builds"),
]


class ConversionError(ValueError):
    """A checkpoint that does not fit the configured model (the message names the tensors)."""


@dataclasses.dataclass(frozen=True)
class Kind:
    """What a state dict holds, read from its official tensor names and shapes."""
    family: str                 # 'vit' or 'mvit'
    variant: str | None         # the config.model.variant of that size; None where no preset fits
    size: str                   # 'ViT-B/16', 'MViTv2-S', or the sizes where no preset fits
    task: str | None            # 'pretrain', 'finetune', or None (backbone only)
    classes: int | None

    def __str__(self):
        task = {"pretrain": "pre-training", "finetune": f"fine-tuning ({self.classes} classes)"}
        return f"{'an' if self.family == 'mvit' else 'a'} {self.size} {task.get(self.task, 'backbone-only')}"


def kind_of(shapes: dict) -> Kind | None:
    """The ``Kind`` of ``{official name: shape}``; None for something that is no ViT or MViTv2."""
    from maskfeat_jax.models import mvit, vit
    patch = shapes.get("patch_embed.proj.weight")
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if patch is None or not blocks:
        return None
    width, depth = int(patch[0]), max(blocks) + 1
    if any(re.search(r"\.attn\.(pool|rel_pos)_", k) for k in shapes):
        starts = [i + 1 for i in sorted(blocks) if f"blocks.{i}.proj.weight" in shapes]   # DIM_MUL
        stages = tuple(int(d) for d in np.diff([0, *starts, depth]))
        variant = next((n for n, s in mvit.PRESETS.items() if (s.embed_dim, s.stages) == (width, stages)), None)
        size = f"MViTv2-{variant}" if variant else f"MViTv2 (embed dim {width}, stage depths {stages})"
    else:
        mlp, p = int(shapes.get("blocks.0.mlp.fc1.weight", (0,))[0]), int(patch[-1])
        name = next((n for n, s in vit.SIZES.items() if (s.width, s.depth, s.mlp) == (width, depth, mlp)), None)
        variant = name and f"{name}/{p}"
        size = f"ViT-{variant}" if name else f"ViT (width {width}, depth {depth}, MLP {mlp}, patch {p})"
    task = ("pretrain" if "mask_token" in shapes or any(k.startswith("pred_head.") for k in shapes) else
            "finetune" if "head.projection.weight" in shapes else None)
    classes = int(shapes["head.projection.weight"][0]) if task == "finetune" else None
    return Kind("mvit" if size.startswith("MViT") else "vit", variant, size, task, classes)


def verdict(found: Kind | None, want: Kind | None) -> str | None:
    """One line: what the checkpoint is, what the config builds, and the config keys to change."""
    if found is None or want is None:
        return None
    fixes = []
    if found.family != want.family:
        fixes.append(f"--config.model.name={found.family}")
    if found.size != want.size or found.family != want.family:
        fixes.append(f"--config.model.variant={found.variant}" if found.variant else
                     f"a config.model.variant of that size (no preset in models/{found.family}.py has it)")
    if found.task and found.task != want.task:
        fixes.append(f"--config.task={found.task}")
    if found.classes and found.classes != want.classes:
        fixes.append(f"--config.model.num_classes={found.classes}")
    if not fixes:
        return None
    then = (" (then fine-tune from the converted checkpoint with --config.init_from)"
            if found.task == "pretrain" != want.task else "")
    return f"this is {found} checkpoint, but the config builds {want} model: use {' '.join(fixes)}{then}"


def family(name: str) -> str:
    """``config.model.name`` checked against the families the tables know."""
    if name not in ENCODER_RULES:
        raise ConversionError(f"config.model.name={name!r}: the converter knows {sorted(ENCODER_RULES)}")
    return name


def rules_for(name: str, task: str, mae_depth: int | None = None):
    """The compiled (pattern, official template, transform) rules of a model family and task;
    ``mae_depth``: pre-training is MAE's with a decoder of that many blocks (``mae_depth``)."""
    if task not in HEAD_RULES:
        raise ConversionError(f"config.task={task!r}: expected one of {sorted(HEAD_RULES)}")
    head = _mae_head(mae_depth) if mae_depth is not None and task == "pretrain" else HEAD_RULES[task]
    return [(re.compile(p), t, TRANSFORMS[f]) for p, t, f in ENCODER_RULES[family(name)] + head]


def torch_name(rules, ours: str) -> tuple[str, Transform]:
    """The official name and transform of our flattened parameter path ``ours``."""
    for pat, template, tf in rules:
        m = pat.fullmatch(ours)
        if m:
            return m.expand(template), tf
    raise ConversionError(f"no official name is known for parameter {ours} (converter table out of date)")
