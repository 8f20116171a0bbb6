"""Reading finished checkpoints for inference, ``init_from``, export, probe and visualize: one
path resolver (``resolve``), one loader (``load``).

A path names a workdir, its ``checkpoints`` folder or one step folder; only finished steps are
read (``finished_steps``). ``read_params`` gives a checkpoint's parameters as host numpy arrays
(any mesh, any task). Writing and resuming are ``checkpoint``'s.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import orbax.checkpoint as ocp

from maskfeat_jax import storage


def flat_params(tree) -> dict:
    """A nested tree as one dict keyed by ``/``-joined paths (``"blocks/0/attn/qkv/kernel"``)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): x for path, x in leaves}


def _finished(directory) -> list[int]:
    """The finished steps saved in ``directory`` (a checkpoints folder), in order.

    Finished as Orbax decides: on a disk a step folder appears by rename once complete; on
    ``gs://`` it is written in place and finished by its ``commit_success.txt``, so a save in
    progress (or one a crash cut short) is not a step."""
    return sorted(ocp.utils.checkpoint_steps(directory)) if directory.is_dir() else []


def finished_steps(workdir: str) -> list[int]:
    """The finished steps in ``WORKDIR/checkpoints``, in order (reads only)."""
    return _finished(storage.path(workdir) / "checkpoints")


def resolve(path: str, step: int | None = None, key: str = "--workdir") -> tuple[str, int]:
    """A workdir, its ``checkpoints`` folder or one step folder, and an optional step ->
    (checkpoints dir, step): ``step``, else the named step folder's, else the latest finished
    one. The step must be finished; a ``ValueError`` names ``key`` (the flag or config key that
    gave ``path``) or ``--step``."""
    directory, named = storage.path(path), None
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    if directory.name.isdigit():                       # a step folder
        directory, named = directory.parent, int(directory.name)
    steps = _finished(directory)
    if named is not None and named not in steps and (directory / str(named)).exists():
        raise ValueError(f"{directory / str(named)} is not a finished checkpoint (a save still running, or one "
                         f"that was cut short); finished steps there: {steps}")
    if not steps:
        raise ValueError(f"{key}={path}: no checkpoint found in {directory}")
    step = step if step is not None else named if named is not None else steps[-1]
    if step not in steps:
        raise ValueError(f"--step={step}: {directory} holds steps {steps}")
    return str(directory), step


def read_params(path: str) -> dict:
    """The parameter tree of a checkpoint, as host numpy arrays (any mesh, any task)."""
    directory, step = resolve(path, key="config.init_from")
    item = storage.path(directory) / str(step) / "state"
    from absl import logging as absl_logging
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)   # the item has no step-level metadata file: fine
    try:
        ckptr = ocp.PyTreeCheckpointer()
        meta = ckptr.metadata(item).item_metadata.tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        return ckptr.restore(item, args=ocp.args.PyTreeRestore(restore_args=restore_args))["params"]
    finally:
        absl_logging.set_verbosity(verbosity)


def init_from(path: str, params, mesh=None):
    """Copies the encoder weights of a checkpoint into ``params`` (a fine-tuning model).

    Keys present in both are loaded, each fitted to the model by ``models.load`` (ViT's
    position table and MViTv2's rel-pos tables are resized); a shape mismatch left is an
    error naming the key. Keys only in ``params`` (the new head) keep their fresh init; keys
    only in the checkpoint (mask token, HOG head, optimizer) are ignored. What was loaded,
    resized, kept and ignored is printed."""
    from maskfeat_jax import models
    src, dst = flat_params(read_params(path)), flat_params(params)
    loaded, new, interpolated, out = [], [], [], {}
    for key, x in dst.items():
        if not (key.startswith("encoder/") and key in src):
            out[key] = x
            new.append(key)
            continue
        value = models.load(key, src[key], tuple(x.shape))
        if value is not src[key]:
            interpolated.append(key)
        if tuple(value.shape) != tuple(x.shape):
            raise ValueError(f"config.init_from: parameter {key} has shape {tuple(src[key].shape)} in "
                             f"{path}, but the model expects {tuple(x.shape)}")
        out[key] = jax.device_put(value.astype(x.dtype), x.sharding)
        loaded.append(key)
    ignored = sorted(set(src) - set(loaded))
    if jax.process_index() == 0:     # a start-up line: what fine-tuning starts from
        print(f"init_from {path}: loaded {len(loaded)} tensors (position tables interpolated: {interpolated}); "
              f"new: {new}; ignored: {ignored}", flush=True)
    treedef = jax.tree_util.tree_structure(params)
    return jax.tree_util.tree_unflatten(treedef, [out[k] for k in dst])


def params_like(path: str, like):
    """The checkpoint's parameters arranged as the tree ``like`` (all keys and shapes must match)."""
    src, dst = flat_params(read_params(path)), flat_params(like)
    missing, extra = sorted(set(dst) - set(src)), sorted(set(src) - set(dst))
    if missing or extra:
        raise ValueError(f"checkpoint {path} does not match the model of its config: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for k, x in dst.items():
        if tuple(src[k].shape) != tuple(x.shape):
            raise ValueError(f"checkpoint {path}: parameter {k} has shape {tuple(src[k].shape)}, "
                             f"the model expects {tuple(x.shape)}")
    treedef = jax.tree_util.tree_structure(like)
    return jax.tree_util.tree_unflatten(treedef, [src[k] for k in dst])


@dataclasses.dataclass(frozen=True)
class Saved:
    """A finished checkpoint read for inference (export, probe, figures)."""
    path: str          # its step folder
    step: int
    config: object     # the ml_collections.ConfigDict it was trained with
    graphdef: object   # of that config's model
    params: dict       # host numpy arrays, checked against the model: ``nnx.merge(graphdef, params)``


def load(path: str, step: int | None = None, key: str = "--workdir") -> Saved:
    """Step ``step`` (default: the latest finished) of ``path`` (a workdir, its checkpoints
    folder or a step folder) with its saved config and parameters. The one loader of the
    inference tools; a ``ValueError`` names ``key`` or ``--step`` when nothing matches."""
    from flax import nnx

    from maskfeat_jax import models
    directory, step = resolve(path, step, key)
    step_dir = str(storage.path(directory) / str(step))
    config = saved_config(step_dir)
    graphdef, abstract = nnx.split(models.build_abstract(config))
    return Saved(step_dir, step, config, graphdef, params_like(step_dir, nnx.to_pure_dict(abstract)))


def saved_config(path: str):
    """The ml_collections config saved with a checkpoint (workdir, checkpoints dir or step dir),
    read through Orbax's JSON handler (the item ``Checkpointer.save`` wrote)."""
    import ml_collections
    directory, step = resolve(path, key="config.init_from")
    saved = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(storage.path(directory) / str(step) / "config")
    return ml_collections.ConfigDict(_tuples(saved))


def _tuples(d):
    """JSON turned the config's tuples into lists; turn them back."""
    if isinstance(d, dict):
        return {k: _tuples(v) for k, v in d.items()}
    return tuple(d) if isinstance(d, list) else d
