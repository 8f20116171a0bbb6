"""A checkpoint of ours -> the official PySlowFast names and layouts (``.npz`` or ``.pyth``).

    python -m maskfeat_jax.export --workdir=DIR [--step=N] --out=FILE.npz|FILE.pyth [--encoder_only]
"""
# The reverse of ``maskfeat_jax.convert``, with the same name tables (``official_names.rules_for``)
# and each transform's inverse (``official_names.Transform.to_torch``). The model family and task come from
# the config saved with the checkpoint (the latest step in ``DIR/checkpoints``, or ``--step``).
#
# What is written, every tensor float32 in the official layout:
#
# * every parameter of the checkpoint under its official name (a parameter the tables do not
#   name is an error naming it, never dropped): the backbone, and the pre-training head
#   (``mask_token``, ``pred_head.*``) or the classifier (``norm``, ``head.projection``);
# * for a pre-training checkpoint, also the HOG layer's buffers that the official ``MaskMViT``
#   registers (``operators.HOGLayerC``): the Sobel filters ``hogs.0.weight_x`` (3, 1, 3, 3) and
#   ``hogs.0.weight_y`` (its transpose; not for MAE, whose official pixel-target model has no
#   HOG layer). They are constants, not trained, but part of that
#   model's state dict, so the file loads into it with ``load_state_dict(..., strict=True)``.
#   That model builds its HOG layer without a Gaussian window, so no ``hogs.0.gkern`` is
#   written whatever ``config.hog.gaussian_window`` was;
# * with ``--encoder_only``, only the backbone, as fine-tuning loads it (``config.init_from``):
#   no ``mask_token``, ``pred_head.*``, ``hogs.*``, nor a classifier's ``norm`` and
#   ``head.projection``.
#
# ``.npz`` needs no PyTorch: ``{k: torch.from_numpy(v) for k, v in np.load(f).items()}`` is the
# state dict (``convert --src=FILE.npz`` reads it back). ``.pyth`` is ``torch.save`` of
# ``{"model_state": state_dict}``, the entry PySlowFast checkpoints keep their weights in (no
# optimizer state, no epoch). The file is written to a temporary name in the same folder and
# renamed, so an interrupted export leaves no partial ``--out``. ``--workdir`` may be a
# ``gs://`` URL; ``--out`` is a local (or mounted) path.

from __future__ import annotations

import os

import numpy as np

from maskfeat_jax import convert, official_names

FORMATS = (".npz", ".pyth")


class ExportError(official_names.ConversionError):
    """A checkpoint or an ``--out`` that cannot be exported (the message names which)."""


def _hog_buffers() -> dict:
    """The official HOG layer's buffers, in its layout: Sobel filters per RGB channel."""
    weight_x = np.tile(np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32), (3, 1, 1, 1))
    return {"hogs.0.weight_x": weight_x, "hogs.0.weight_y": np.ascontiguousarray(weight_x.transpose(0, 1, 3, 2))}


def _is_head(ours: str) -> bool:
    """Parameters a fine-tuning run does not load: everything outside the encoder, and the mask token."""
    return not ours.startswith("encoder/") or ours == "encoder/mask_token"


def _natural(name: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def to_official(params: dict, family: str, task: str, *, encoder_only: bool = False) -> dict:
    """``{our flattened path: array}`` -> ``{official name: float32 array}`` (see the module
    docstring for what is included). Raises ``ExportError`` naming every parameter the tables
    do not name."""
    mae_depth = official_names.mae_depth(params)
    rules = official_names.rules_for(family, task, mae_depth)
    out, unmapped, sources = {}, [], {}
    for ours, x in params.items():              # every parameter is named, the dropped ones too
        try:
            name, tf = official_names.torch_name(rules, ours)
        except official_names.ConversionError:
            unmapped.append(f"{ours} {tuple(np.shape(x))}")
            continue
        if name in sources:
            raise ExportError(f"parameters {sources[name]} and {ours} both map to {name}")
        sources[name] = ours
        if encoder_only and _is_head(ours):
            continue
        t = np.ascontiguousarray(tf.to_torch(np.asarray(x, np.float32)))
        assert t.shape == tuple(tf.torch_shape(np.shape(x))), (ours, t.shape)
        out[name] = t
    if unmapped:
        raise ExportError(f"no official name is known for these parameters of config.model.name={family!r}, "
                          f"config.task={task!r} (official_names.ENCODER_RULES / HEAD_RULES):\n  " + "\n  ".join(unmapped))
    if task == "pretrain" and not encoder_only and mae_depth is None:   # MAE: the official pixel model has none
        out.update(_hog_buffers())
    return {k: out[k] for k in sorted(out, key=_natural)}


def _torch(out: str):
    try:
        import torch
    except ImportError:
        raise ExportError(f"--out={out}: writing .pyth needs PyTorch: pip install torch (or write "
                          "--out=FILE.npz, which needs only numpy)") from None
    return torch


def _check_out(out: str) -> str:
    """The format of ``--out`` (its extension); URLs and other extensions are refused."""
    from maskfeat_jax import storage
    if storage.is_url(out):
        raise ExportError(f"--out={out}: export writes a local (or mounted) file only; write it locally "
                          "and copy it to the bucket")
    ext = os.path.splitext(out)[1].lower()
    if ext not in FORMATS:
        raise ExportError(f"--out={out}: the file name must end in {' or '.join(FORMATS)}")
    if os.path.isdir(out):
        raise ExportError(f"--out={out} is a folder; name the file to write")
    return ext


def _write(state_dict: dict, out: str, ext: str) -> None:
    """Writes a temporary file beside ``out`` and renames it to ``out``."""
    out = os.path.abspath(os.path.expanduser(out))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    from maskfeat_jax import storage
    with storage.atomic_write(out, "wb") as f:
        if ext == ".npz":
            np.savez(f, **state_dict)
        else:
            torch = _torch(out)
            torch.save({"model_state": {k: torch.from_numpy(v) for k, v in state_dict.items()}}, f)


def export(workdir: str, out: str, *, step: int | None = None, encoder_only: bool = False) -> dict:
    """Exports step ``step`` (default: the latest) of ``workdir`` to the file ``out``."""
    from maskfeat_jax import saved as saved_lib
    ext = _check_out(out)
    if ext == ".pyth":
        _torch(out)                               # before reading a large checkpoint
    try:
        saved = saved_lib.load(workdir, step)
    except ValueError as e:
        raise ExportError(str(e)) from None
    step_dir, step, config = saved.path, saved.step, saved.config
    family, task = config.model.name, config.task
    params = saved_lib.flat_params(saved.params)
    state_dict = to_official(params, family, task, encoder_only=encoder_only)
    _write(state_dict, out, ext)
    n = sum(v.size for v in state_dict.values())
    print(f"exported {len(state_dict)} tensors ({n:,} values; config.model.name={family!r}, "
          f"config.task={task!r}{', encoder only' if encoder_only else ''}) from {step_dir} to {out}", flush=True)
    return {"tensors": len(state_dict), "values": n, "step": step}


# --------------------------------------------------------------------------------------
# Command line.


def _define_flags():
    from absl import flags
    flags.DEFINE_string("workdir", None, "A run's workdir (or its checkpoints folder, or one step folder).")
    flags.DEFINE_integer("step", None, "The step to export (default: the latest).")
    flags.DEFINE_string("out", None, "The file to write: FILE.npz (numpy only) or FILE.pyth (needs PyTorch).")
    flags.DEFINE_bool("encoder_only", False, "Only the backbone (no pre-training or classifier head).")
    flags.mark_flags_as_required(["workdir", "out"])
    return flags.FLAGS


def main(argv):
    del argv
    convert.run_cli(lambda: export(FLAGS.workdir, FLAGS.out, step=FLAGS.step, encoder_only=FLAGS.encoder_only))


if __name__ == "__main__":
    from absl import app

    from maskfeat_jax import config_cli
    FLAGS = _define_flags()
    app.run(main, flags_parser=config_cli.flags_parser(FLAGS))   # --help exits 0; a flag error is one line
