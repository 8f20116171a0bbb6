"""Official MaskFeat checkpoints (PySlowFast ``.pyth``) -> this codebase's Orbax checkpoint.

    python -m maskfeat_jax.convert --src=CHECKPOINT.pyth --config=configs/FILE.py --out=DIR \\
        [--config.x=y ...] [--allow_pickle]

``--src`` may also be a ``.npz`` of the same tensors keyed by the official names (read
without PyTorch). The reverse direction, a checkpoint of ours -> the official names and
layouts, is ``maskfeat_jax.export``; both use the name tables and transforms of
``official_names``, each transform carrying its inverse (``Transform.to_torch``).

The config decides the model (family ``config.model.name``, size, ``config.task``); every
tensor of the PyTorch state dict is mapped onto that model's parameter tree, and the result
is written as step 0 of ``DIR/checkpoints`` in the trainer's own format (TrainState with a
fresh optimizer state, data-iterator state, config), so ``--config.init_from=DIR`` (weights
only), ``--workdir=DIR`` (resume at step 0) and evaluation of ``DIR`` all accept it. Use the
config the model will be trained or evaluated with: the saved config is checked on resume.
"""
from __future__ import annotations

import math
import os
import re
import sys

import numpy as np

from maskfeat_jax import official_names
from maskfeat_jax.official_names import HINTS, IGNORED, ConversionError, kind_of, rules_for, torch_name, verdict


def _listing(title: str, lines: list, cap: int = 10) -> str:
    more = [f"... and {len(lines) - cap} more"] if len(lines) > cap else []
    return f"{title}:\n  " + "\n  ".join(lines[:cap] + more)


def convert_state_dict(state_dict: dict, target_shapes: dict, family: str, task: str) -> dict:
    """Official tensors -> ``{our flattened path: float32 array}`` for every parameter.

    ``target_shapes`` maps our flattened paths (``encoder/blocks/0/attn/qkv_kernel``) to
    shapes. Every parameter must come from the checkpoint with a fitting shape, and every
    checkpoint tensor must be used or listed in ``IGNORED``; otherwise ``ConversionError``
    names the offending tensors (10 per kind of problem), after a first line that says what
    the checkpoint is and which config keys to change where its kind, family or size differs.
    """
    rules = rules_for(family, task, official_names.mae_depth(target_shapes))
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
            hint = None if first else next((h for p, h in HINTS if re.search(p, k)), None)
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
    from maskfeat_jax import checkpoint, saved as saved_lib, sharding, storage, train

    try:
        storage.check_url(out, "--out")
    except ValueError as e:
        raise ConversionError(str(e)) from None
    ckpt_dir = storage.path(out) / "checkpoints"
    if ckpt_dir.is_dir() and any(d.name.isdigit() for d in ckpt_dir.iterdir()):
        raise ConversionError(f"--out={out!r} already holds checkpoints in {ckpt_dir}; choose an empty --out")
    state_dict, cfg_yaml = load_state_dict(src, allow_pickle)

    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), jax.devices()[:1])
    st = train.setup(config, mesh, steps_per_epoch=1, total_steps=1)
    target = saved_lib.flat_params(st.abstract_state.params)
    converted = convert_state_dict(state_dict, {k: v.shape for k, v in target.items()},
                                   official_names.family(config.model.name), config.task)
    check_official_cfg(cfg_yaml, config)       # the checkpoint is of config.task's kind by now

    state = st.init()
    leaves, treedef = jax.tree_util.tree_flatten(state.params)
    flat_keys = list(saved_lib.flat_params(state.params))
    new_leaves = [jax.device_put(converted[k].astype(x.dtype), x.sharding) for k, x in zip(flat_keys, leaves)]
    state = state.replace(params=jax.tree_util.tree_unflatten(treedef, new_leaves))

    data_iter = _initial_iterator(config, st.model.encoder.grid)
    ckpt = checkpoint.Checkpointer(out, every_steps=1, max_to_keep=1)
    ckpt.save(0, state, data_iter, config, force=True)
    ckpt.close()

    # read back through the path fine-tuning uses, and check every tensor
    saved = saved_lib.flat_params(saved_lib.read_params(out))
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


def run_cli(fn, *errors) -> None:
    """Runs a command line tool's ``fn()``: Orbax's per-file INFO logs only with ``--verbosity``;
    a ``ConversionError``, a missing file, one of ``errors`` or a ``ValueError`` naming a
    ``config.`` key is one line on stderr and exit code 2, with no traceback."""
    from absl import flags, logging
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        fn()
    except (ConversionError, FileNotFoundError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ValueError as e:   # config errors name their key
        if not str(e).startswith("config."):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    del argv
    run_cli(lambda: convert(FLAGS.src, FLAGS.config, FLAGS.out, allow_pickle=FLAGS.allow_pickle))


if __name__ == "__main__":
    from absl import app
    from maskfeat_jax import config_cli
    FLAGS = _define_flags()
    app.run(main, flags_parser=config_cli.flags_parser(FLAGS))
