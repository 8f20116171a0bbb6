"""Official MaskFeat checkpoints (PySlowFast ``.pyth``) -> this codebase's Orbax checkpoint.

    python -m maskfeat_jax.convert --src=CHECKPOINT.pyth --config=configs/FILE.py --out=DIR \\
        [--config.x=y ...] [--allow_pickle]

``--src`` may also be a ``.npz`` of the same tensors keyed by the official names (read
without PyTorch). The reverse direction, a checkpoint of ours -> the official names and
layouts, is ``maskfeat_jax.export``; it uses the name tables and transforms below, each
transform carrying its inverse (``Transform.to_torch``).

The config decides the model (family ``config.model.name``, size, ``config.task``); every
tensor of the PyTorch state dict is mapped onto that model's parameter tree, and the result
is written as step 0 of ``DIR/checkpoints`` in the trainer's own format (TrainState with a
fresh optimizer state, data-iterator state, config), so ``--config.init_from=DIR`` (weights
only), ``--workdir=DIR`` (resume at step 0) and evaluation of ``DIR`` all accept it. Use the
config the model will be trained or evaluated with: the saved config is checked on resume.

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
  ``pred_head.projections.0`` (Linear to 108); ``hogs.0.weight_x/weight_y`` are the HOG
  layer's Sobel buffers (``operators.HOGLayerC``);
* fine-tuning (``MViT`` with ``USE_MEAN_POOLING: True``): ``norm`` is the LayerNorm after
  the mean over the patch tokens (our ``fc_norm``), ``head.projection``
  (``head_helper.TransformerBasicHead``) the classifier.

The HOG head's 108 outputs are in the official (channel, bin, cell row, cell column) order,
which ``targets.hog`` also uses, so the projection is copied as is.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
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

_BLOCK = [
    (r"encoder/blocks/(\d+)/norm([12])/scale", r"blocks.\1.norm\2.weight", "copy"),
    (r"encoder/blocks/(\d+)/norm([12])/bias", r"blocks.\1.norm\2.bias", "copy"),
    (r"encoder/blocks/(\d+)/attn/qkv_kernel", r"blocks.\1.attn.qkv.weight", "qkv_kernel"),
    (r"encoder/blocks/(\d+)/attn/qkv_bias", r"blocks.\1.attn.qkv.bias", "qkv_bias"),
    (r"encoder/blocks/(\d+)/attn/proj_kernel", r"blocks.\1.attn.proj.weight", "proj_kernel"),
    (r"encoder/blocks/(\d+)/attn/proj_bias", r"blocks.\1.attn.proj.bias", "copy"),
    (r"encoder/blocks/(\d+)/mlp/fc([12])/kernel", r"blocks.\1.mlp.fc\2.weight", "linear"),
    (r"encoder/blocks/(\d+)/mlp/fc([12])/bias", r"blocks.\1.mlp.fc\2.bias", "copy"),
]

_STEM = [
    (r"encoder/patch_kernel", "patch_embed.proj.weight", "conv"),
    (r"encoder/patch_bias", "patch_embed.proj.bias", "copy"),
    (r"encoder/cls_token", "cls_token", "copy"),
    (r"encoder/mask_token", "mask_token", "copy"),
]

ENCODER_RULES = {
    "vit": _STEM + [(r"encoder/pos_embed", "pos_embed", "copy")] + _BLOCK,
    "mvit": _STEM + _BLOCK + [
        (r"encoder/blocks/(\d+)/attn/pool_([qkv])", r"blocks.\1.attn.pool_\2.weight", "depthwise"),
        (r"encoder/blocks/(\d+)/attn/norm_([qkv])/scale", r"blocks.\1.attn.norm_\2.weight", "copy"),
        (r"encoder/blocks/(\d+)/attn/norm_([qkv])/bias", r"blocks.\1.attn.norm_\2.bias", "copy"),
        (r"encoder/blocks/(\d+)/attn/rel_pos_([hwt])", r"blocks.\1.attn.rel_pos_\2", "copy"),
        (r"encoder/blocks/(\d+)/proj/kernel", r"blocks.\1.proj.weight", "linear"),
        (r"encoder/blocks/(\d+)/proj/bias", r"blocks.\1.proj.bias", "copy"),
    ],
}

HEAD_RULES = {
    "pretrain": [
        (r"norm/scale", "pred_head.transforms.0.0.weight", "copy"),
        (r"norm/bias", "pred_head.transforms.0.0.bias", "copy"),
        (r"head/kernel", "pred_head.projections.0.weight", "linear"),
        (r"head/bias", "pred_head.projections.0.bias", "copy"),
    ],
    "finetune": [
        (r"fc_norm/scale", "norm.weight", "copy"),
        (r"fc_norm/bias", "norm.bias", "copy"),
        (r"head/kernel", "head.projection.weight", "linear"),
        (r"head/bias", "head.projection.bias", "copy"),
    ],
}

# Checkpoint entries that are deliberately not converted (regex -> why).
IGNORED = {
    r"hogs\.\d+\.weight_[xy]": "HOG Sobel filter buffers (targets.hog builds them)",
    r"hogs\.\d+\.gkern": "HOG Gaussian window buffer (config.hog.gaussian_window)",
}

# Hints for unmapped keys that point at a config mismatch rather than a broken file.
_HINTS = [
    (r"pred_head\.", "a pre-training (MaskMViT) checkpoint: use --config.task=pretrain, then "
                     "fine-tune from it with --config.init_from"),
    (r"head\.projection\.|^norm\.", "a fine-tuned checkpoint: use --config.task=finetune and the "
                                    "checkpoint's number of classes (--config.model.num_classes)"),
    (r"pos_embed_(spatial|temporal|class)", "separable space-time position embeddings (video ViT, "
                                            "SEP_POS_EMBED) are not supported"),
    (r"pred_head\.transforms\.0\.[1-9]|decoder_", "an MAE-style decoder (HEAD_TYPE separate_xformer) "
                                                  "is not supported"),
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


def _listing(title: str, lines: list, cap: int = 10) -> str:
    more = [f"... and {len(lines) - cap} more"] if len(lines) > cap else []
    return f"{title}:\n  " + "\n  ".join(lines[:cap] + more)


def _family(name: str) -> str:
    if name not in ENCODER_RULES:
        raise ConversionError(f"config.model.name={name!r}: the converter knows {sorted(ENCODER_RULES)}")
    return name


def rules_for(family: str, task: str):
    if task not in HEAD_RULES:
        raise ConversionError(f"config.task={task!r}: expected one of {sorted(HEAD_RULES)}")
    return [(re.compile(p), t, TRANSFORMS[f]) for p, t, f in ENCODER_RULES[_family(family)] + HEAD_RULES[task]]


def torch_name(rules, ours: str) -> tuple[str, Transform]:
    for pat, template, tf in rules:
        m = pat.fullmatch(ours)
        if m:
            return m.expand(template), tf
    raise ConversionError(f"no official name is known for parameter {ours} (converter table out of date)")


def convert_state_dict(state_dict: dict, target_shapes: dict, family: str, task: str) -> dict:
    """Official tensors -> ``{our flattened path: float32 array}`` for every parameter.

    ``target_shapes`` maps our flattened paths (``encoder/blocks/0/attn/qkv_kernel``) to
    shapes. Every parameter must come from the checkpoint with a fitting shape, and every
    checkpoint tensor must be used or listed in ``IGNORED``; otherwise ``ConversionError``
    names the offending tensors (10 per kind of problem), after a first line that says what
    the checkpoint is and which config keys to change where its kind, family or size differs.
    """
    rules = rules_for(family, task)
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    out, used, missing, bad, expected = {}, set(), [], [], {}
    for ours, shape in target_shapes.items():
        shape = tuple(int(d) for d in shape)
        name, tf = torch_name(rules, ours)
        want = expected[name] = tuple(tf.torch_shape(shape))
        if name not in sd:
            missing.append(f"{name} (for {ours}, expected shape {want})")
            continue
        t = sd[name]
        if tuple(t.shape) != want:
            # 2-D vs 3-D kernels (Conv2d vs Conv3d with a temporal kernel of 1): unit dims only
            if t.size == math.prod(want) and [d for d in t.shape if d != 1] == [d for d in want if d != 1]:
                t = t.reshape(want)
            else:
                bad.append(f"{name}: shape {tuple(t.shape)} in the checkpoint, but parameter {ours} of "
                           f"shape {shape} needs {want}")
                used.add(name)
                continue
        out[ours] = np.ascontiguousarray(tf.apply(t.astype(np.float32), shape))
        assert out[ours].shape == shape, (ours, out[ours].shape, shape)
        used.add(name)
    extra = [k for k in sd if k not in used and not any(re.fullmatch(p, k) for p in IGNORED)]
    if not (bad or missing or extra):
        return out
    first = verdict(kind_of({k: v.shape for k, v in sd.items()}), kind_of(expected))
    problems = []
    if bad:
        problems.append(_listing("wrong shapes", bad))
    if missing:
        problems.append(_listing("missing from the checkpoint", missing))
    if extra:
        lines = []
        for k in sorted(extra):
            hint = None if first else next((h for p, h in _HINTS if re.search(p, k)), None)
            lines.append(f"{k} {tuple(sd[k].shape)}" + (f"  <- {hint}" if hint else ""))
        problems.append(_listing("not mapped to any parameter", lines))
    raise ConversionError((f"{first}\n" if first else "") +
                          f"checkpoint does not fit config.model.name={family!r}, config.task={task!r}, "
                          f"{len(target_shapes)} parameters:\n" + "\n".join(problems))


# --------------------------------------------------------------------------------------
# Reading .pyth files (PyTorch needed here only) and .npz files (no PyTorch).


def load_state_dict(path: str, allow_pickle: bool = False) -> tuple[dict, object]:
    """``(model state as numpy arrays, the saved PySlowFast cfg or None)`` of a checkpoint.

    Accepts ``{"model_state": sd, ...}`` (what PySlowFast saves), ``{"model": sd}``,
    ``{"state_dict": sd}`` or a bare state dict; a ``module.`` prefix (DDP) and
    ``_checkpoint_wrapped_module.`` parts (activation checkpointing wrappers) are stripped.
    A ``.npz`` file (arrays keyed by the official names, as ``maskfeat_jax.export`` writes)
    is read with numpy alone; it has no cfg.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--src={path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise ConversionError(f"--src={path!r} is an empty file")
    if str(path).lower().endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}, None
        except Exception as e:  # noqa: BLE001 - zipfile, pickle and format errors alike
            raise ConversionError(f"--src={path!r} is truncated or not a .npz file ({_reason(e)})") from None
    try:
        import torch
    except ImportError:
        raise ConversionError(f"--src={path}: reading .pyth checkpoints needs PyTorch: pip install "
                              f"'maskfeat_jax[convert]' (or any CPU build of torch), or convert its tensors "
                              f"to .npz where torch is installed") from None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # noqa: BLE001 - torch raises many types for one cause
        refused = re.search(r"Unsupported (?:global|class):? (?:GLOBAL )?(\S+)", str(e))
        if refused and not allow_pickle:     # the weights-only unpickler met a Python object
            raise ConversionError(f"--src={path!r} holds Python objects that torch.load(weights_only=True) "
                                  f"refuses ({refused.group(1)}); if you trust the file, rerun with "
                                  f"--allow_pickle") from None
        if isinstance(e, ImportError):
            raise ConversionError(f"--src={path!r} could not be unpickled: {e}") from None
        raise ConversionError(f"--src={path!r} is truncated or not a PyTorch checkpoint ({_reason(e)})") from None
    sd = ckpt
    if isinstance(ckpt, dict):
        for key in ("model_state", "model", "state_dict"):
            if key in ckpt and isinstance(ckpt[key], dict):
                sd = ckpt[key]
                break
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        keys = list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ConversionError(f"--src={path!r}: no state dict found (expected a 'model_state', 'model' or "
                              f"'state_dict' entry of tensors, or a bare state dict; found {keys})")
    out = {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        k = k.replace("_checkpoint_wrapped_module.", "")
        out[k] = v.detach().to(torch.float32).cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
    return out, (ckpt.get("cfg") if isinstance(ckpt, dict) else None)


def _reason(e: Exception) -> str:
    """The first line of a loader's error, short (torch's can be paragraphs)."""
    m = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
    line = (m.group(1) if m else str(e)).strip().split("\n")[0].split(". ")[0]
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def check_official_cfg(cfg_yaml, config) -> None:
    """Cross-checks the checkpoint's own PySlowFast config (when saved) where our model has
    fixed semantics the tensors cannot reveal."""
    import yaml
    if not isinstance(cfg_yaml, str):
        return
    try:
        cfg = yaml.safe_load(cfg_yaml)
    except yaml.YAMLError:       # unreadable cfg: nothing to check against
        return
    mvit_cfg = (cfg.get("MVIT") if isinstance(cfg, dict) else None) or {}
    if config.task == "finetune" and mvit_cfg.get("USE_MEAN_POOLING") is False:
        raise ConversionError("the checkpoint's MVIT.USE_MEAN_POOLING is False (classification from the cls "
                              "token after the final norm), but our classifier mean-pools the patch tokens "
                              "before its norm: the converted logits would differ")
    if mvit_cfg.get("CLS_EMBED_ON") is False:
        raise ConversionError("the checkpoint's MVIT.CLS_EMBED_ON is False; our models always have a cls token")


# --------------------------------------------------------------------------------------
# Writing the trainer's checkpoint.


def _initial_iterator(config, grid):
    """A not-yet-consumed training iterator of the configured pipeline. Its saved state (the
    position 0 of every stage) does not depend on the data source, so a tiny synthetic
    source stands in for the real one, which need not be available here."""
    from maskfeat_jax.data import pipeline, sources
    size = config.input.image_size
    src = sources.SyntheticSource(1, size if isinstance(size, int) else size[0], max(config.model.num_classes, 1))
    return iter(pipeline.train_dataset(config, src, grid))


def convert(src: str, config, out: str, *, allow_pickle: bool = False) -> dict:
    """Converts ``src`` for ``config`` and saves step 0 under ``out/checkpoints``."""
    import jax
    import ml_collections
    from maskfeat_jax import checkpoint, sharding, storage, train

    try:
        storage.check_url(out, "--out")
    except ValueError as e:
        raise ConversionError(str(e)) from None
    ckpt_dir = storage.path(out) / "checkpoints"
    if ckpt_dir.is_dir() and any(d.name.isdigit() for d in ckpt_dir.iterdir()):
        raise ConversionError(f"--out={out!r} already holds checkpoints in {ckpt_dir}; choose an empty --out")
    state_dict, cfg_yaml = load_state_dict(src, allow_pickle)

    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])
    family = _family(config.model.name)
    try:
        st = train.setup(config, mesh, steps_per_epoch=1, total_steps=1)
    except ValueError as e:
        if family != "vit" and str(e).startswith("config.model.name"):
            raise NotImplementedError(
                f"converting {family!r} checkpoints: the name table (ENCODER_RULES[{family!r}]) is written, "
                f"but models.build cannot build config.model.name={family!r} yet ({e})") from e
        raise
    target = checkpoint.flat_params(st.abstract_state.params)
    converted = convert_state_dict(state_dict, {k: v.shape for k, v in target.items()},
                                   family, config.task)
    check_official_cfg(cfg_yaml, config)       # the checkpoint is of config.task's kind by now

    state = st.init()
    leaves, treedef = jax.tree_util.tree_flatten(state.params)
    flat_keys = list(checkpoint.flat_params(state.params))
    new_leaves = [jax.device_put(converted[k].astype(x.dtype), x.sharding) for k, x in zip(flat_keys, leaves)]
    state = state.replace(params=jax.tree_util.tree_unflatten(treedef, new_leaves))

    data_iter = _initial_iterator(config, st.model.encoder.grid)
    ckpt = checkpoint.Checkpointer(out, every_steps=1, max_to_keep=1)
    ckpt.save(0, state, data_iter, config, force=True)
    ckpt.close()

    # read back through the path fine-tuning uses, and check every tensor
    saved = checkpoint.flat_params(checkpoint.read_params(out))
    if set(saved) != set(converted):
        raise RuntimeError(f"saved parameters differ from the converted ones: {sorted(set(saved) ^ set(converted))}")
    for k, v in converted.items():
        if not np.array_equal(np.asarray(saved[k]), v):
            raise RuntimeError(f"parameter {k} did not round-trip through the checkpoint")
    n = sum(v.size for v in converted.values())
    print(f"converted {len(state_dict)} tensors ({len(converted)} parameters, {n:,} values) from {src} "
          f"to {ckpt_dir}/0", flush=True)
    return {"parameters": n, "directory": str(ckpt_dir / "0")}


# --------------------------------------------------------------------------------------
# Command line.


def _define_flags():
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Config file (see configs/) describing the model.",
                                    lock_config=True)
    flags.DEFINE_string("src", None, "The official checkpoint (.pyth), or its tensors as .npz.")
    flags.DEFINE_string("out", None, "Output directory: the checkpoint goes to OUT/checkpoints/0.")
    flags.DEFINE_bool("allow_pickle", False, "Load with torch.load(weights_only=False) (trusted files only).")
    flags.mark_flags_as_required(["config", "src", "out"])
    return flags.FLAGS


def main(argv):
    del argv
    from absl import logging
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)   # Orbax logs every file at INFO
    try:
        convert(FLAGS.src, FLAGS.config, FLAGS.out, allow_pickle=FLAGS.allow_pickle)
    except (ConversionError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ValueError as e:   # config errors name their key
        if not str(e).startswith("config."):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from absl import app
    from maskfeat_jax import config as config_lib
    FLAGS = _define_flags()
    app.run(main, flags_parser=config_lib.flags_parser(FLAGS))
