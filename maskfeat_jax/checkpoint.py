"""Orbax checkpoints of the train state, the data iterator and the config, together.

Saves are atomic: Orbax writes into a temporary directory and renames it when complete,
so an interrupted save is never listed as the latest; leftovers are cleaned at start-up.
Restore order (written once, here): the latest checkpoint in ``WORKDIR/checkpoints``,
then ``config.init_from`` (weights only, see ``init_from``), then scratch.

Each checkpoint also records the input topology (processes, workers per process, global
batch) that wrote its iterator state, the examples the input had read by then and the batch
the iterator started at; grain's state is only meaningful for that topology and counts from
that batch, and the example count places a restart under another topology.

Paths may be local or ``gs://`` URLs (``storage``); on GCS, Orbax marks a finished save with a
commit file instead of renaming it.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from maskfeat_jax import storage


class Checkpointer:
    def __init__(self, workdir: str, every_steps: int, max_to_keep: int):
        self.directory = storage.path(workdir) / "checkpoints"
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, cleanup_tmp_directories=True, create=True,
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(max(int(every_steps), 1)),
                policies.PreemptionCheckpointingPolicy()]))
        self.mngr = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data_iter", "config", "topology"))
        self.workdir, self.failed = workdir, False
        _quiet_disk_full_logs()

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, step: int, state, data_iter, config, topology: dict | None = None, *,
             force: bool = False) -> bool:
        items = dict(state=ocp.args.StandardSave(state), data_iter=grain.checkpoint.CheckpointSave(data_iter),
                     config=ocp.args.JsonSave(config.to_dict()))
        if topology is not None:
            items["topology"] = ocp.args.JsonSave(topology)
        args = ocp.args.Composite(**items)
        with self._disk_full_stops_the_run():
            return self.mngr.save(step, args=args, force=force)

    @contextlib.contextmanager
    def _disk_full_stops_the_run(self):
        """A save that fails on a full disk (now or, saved in the background, at the next save or
        wait) becomes one ``ValueError`` naming the workdir and its free space; the unfinished
        checkpoint's temporary folder is removed, so a rerun resumes from the last complete step."""
        try:
            yield
        except Exception as e:
            if not storage.is_disk_full(e):
                raise
            self.failed = True
            if jax.process_index() == 0:
                for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
                    if tmp.is_dir():
                        tmp.rmtree(missing_ok=True)
                    else:
                        tmp.unlink(missing_ok=True)
            done = ocp.utils.checkpoint_steps(self.directory) if self.directory.exists() else []
            last = f"step {max(done)}" if done else "none"
            raise ValueError(f"--workdir={self.workdir}: disk full while saving a checkpoint "
                             f"({storage.free_space(self.directory)} free after removing the unfinished "
                             f"one); last complete checkpoint: {last}. Free some space, then rerun the "
                             f"same command to resume") from None

    def saved_config(self, step: int) -> dict:
        return self.mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def saved_topology(self, step: int) -> dict | None:
        """The input topology saved at ``step`` (None for a checkpoint written without one)."""
        if not (self.directory / str(step) / "topology").exists():
            return None
        return self.mngr.restore(step, args=ocp.args.Composite(topology=ocp.args.JsonRestore()))["topology"]

    def restore(self, step: int, abstract_state, data_iter=None):
        """Restores ``state`` (onto the shardings in ``abstract_state``) and the iterator in place."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.mngr.restore(step, args=ocp.args.Composite(**items))
        logging.info("restored step %d from %s", step, self.directory)
        return restored["state"]

    def set_aside(self, step: int, wait_s: float = 60.0) -> str | None:
        """Renames the checkpoint at ``step`` (one that could not be restored) to
        ``<step>.unrestorable`` (kept for inspection, no longer a step), so that the run that fell
        back to an older one saves its own steps again. Process 0 renames and tells the others
        whether it could; each then waits until its own listing no longer shows ``step`` (a shared
        filesystem may lag), so that every process agrees on the steps before the next save.
        Returns the new name, or None when the rename failed (the step stays)."""
        src = self.directory / str(step)
        dst, ok = self.directory / f"{step}.unrestorable", True
        if jax.process_index() == 0:
            n = 1
            while dst.exists():
                n += 1
                dst = self.directory / f"{step}.unrestorable-{n}"
            try:
                src.rename(dst)     # on a flat GCS bucket: object by object, not atomic
            except Exception as e:  # noqa: BLE001 - OSError on disks; gcsfs raises HttpError, ValueError
                ok = False
                logging.warning("could not set aside checkpoint %s (%s)", src, e)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            ok = bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
        if not ok:
            return None
        deadline = time.time() + wait_s
        self.mngr.reload()
        while step in self.mngr.all_steps():
            if time.time() > deadline:
                raise RuntimeError(f"checkpoint {src} was renamed but is still listed after {wait_s:.0f} s")
            time.sleep(1.0)
            self.mngr.reload()
        return str(dst)

    def wait(self):
        with self._disk_full_stops_the_run():
            self.mngr.wait_until_finished()

    def close(self):
        if self.failed:             # reported once already; the background save has ended
            return
        with self._disk_full_stops_the_run():
            self.mngr.wait_until_finished()
            self.mngr.close()


class _DropDiskFull(logging.Filter):
    """Orbax's background save threads (and asyncio, for their abandoned writes) log a full disk
    with the same traceback several times; ``Checkpointer`` reports it once, as one line."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        return not (record.levelno >= logging.ERROR and (storage.is_disk_full(exc) or
                                                         "No space left on device" in record.getMessage()))


def _quiet_disk_full_logs():
    """Installs ``_DropDiskFull``, and drops the "Event loop is closed" errors that TensorStore's
    remaining writes raise (and Python ignores) once a failed save has closed its event loop."""
    if any(isinstance(f, _DropDiskFull) for f in logging.getLogger("absl").filters):
        return
    for name in ("absl", "asyncio"):     # Orbax logs through absl; asyncio reports the abandoned writes
        logging.getLogger(name).addFilter(_DropDiskFull())
    previous = sys.unraisablehook

    def hook(u):
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            previous(u)
    sys.unraisablehook = hook


def abstract(tree):
    """ShapeDtypeStructs (with shardings) for a tree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def flat_params(tree) -> dict:
    """A nested tree as one dict keyed by ``/``-joined paths (``"blocks/0/attn/qkv/kernel"``)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): x for path, x in leaves}


def locate(path: str) -> tuple[str, int | None, list[int]]:
    """A workdir, its ``checkpoints`` folder, or one step folder -> (checkpoints dir, the step
    folder's step or None, the finished steps saved there in order).

    Finished as Orbax decides: on a disk a step folder appears by rename once complete; on
    ``gs://`` it is written in place and finished by its ``commit_success.txt``, so a save in
    progress (or one a crash cut short) is not a step. A named step folder must be finished."""
    path, named = storage.path(path), None
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.name.isdigit():                       # a step folder
        path, named = path.parent, int(path.name)
    steps = sorted(ocp.utils.checkpoint_steps(path)) if path.is_dir() else []
    if named is not None and named not in steps and (path / str(named)).exists():
        raise ValueError(f"{path / str(named)} is not a finished checkpoint (a save still running, or one "
                         f"that was cut short); finished steps there: {steps}")
    return str(path), named, steps


def finished_steps(workdir: str) -> list[int]:
    """The finished steps in ``WORKDIR/checkpoints``, in order (reads only)."""
    d = storage.path(workdir) / "checkpoints"
    return sorted(ocp.utils.checkpoint_steps(d)) if d.is_dir() else []


def find_step(workdir: str, step: int | None = None) -> tuple[str, int]:
    """The tools' ``--workdir`` (a workdir, its ``checkpoints`` folder or one step folder) and
    ``--step`` -> (checkpoints dir, step): ``step``, else the named step folder's, else the latest
    finished one. A ``ValueError`` names the flag at fault."""
    directory, named, steps = locate(workdir)
    if not steps:
        raise ValueError(f"--workdir={workdir}: no checkpoint found in {directory}")
    step = step if step is not None else named if named is not None else steps[-1]
    if step not in steps:
        raise ValueError(f"--step={step}: {directory} holds steps {steps}")
    return directory, step


def _resolve(path: str) -> tuple[str, int]:
    """A workdir, its ``checkpoints`` folder, or one step folder -> (checkpoints dir, step):
    the step folder's, else the latest."""
    directory, named, steps = locate(path)
    if named is not None:
        return directory, named
    if not steps:
        raise ValueError(f"config.init_from={directory!r}: no checkpoint found there")
    return directory, steps[-1]


def read_params(path: str) -> dict:
    """The parameter tree of a checkpoint, as host numpy arrays (any mesh, any task)."""
    directory, step = _resolve(path)
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

    Keys present in both are loaded; a shape mismatch is an error naming the key, except for
    MViTv2's rel-pos tables (resized linearly, spec 7.3) and ViT's position table (resized
    bicubically, for fine-tuning at another image size). Keys only in ``params`` (the new
    head) keep their fresh init; keys only in the checkpoint (mask token, HOG head,
    optimizer) are ignored. The report is logged and returned."""
    src = flat_params(read_params(path))
    dst = flat_params(params)
    import jax.numpy as jnp
    loaded, new, interpolated = [], [], []
    out = {}
    for key, x in dst.items():
        if key.startswith("encoder/") and key in src:
            if key.split("/")[-1].startswith("rel_pos_") and src[key].shape[1:] == x.shape[1:] \
                    and src[key].shape[0] != x.shape[0]:
                from maskfeat_jax.models.mvit import interpolate_rel_pos   # PT -> FT tables (spec 7.3)
                src[key] = np.asarray(interpolate_rel_pos(jnp.asarray(src[key]), x.shape[0]))
                interpolated.append(key)
            if key == "encoder/pos_embed" and src[key].shape[::2] == x.shape[::2] and src[key].shape != x.shape:
                from maskfeat_jax.models.vit import resize_pos_embed      # another image size
                src[key] = resize_pos_embed(src[key], x.shape[1])
                interpolated.append(key)
            if tuple(src[key].shape) != tuple(x.shape):
                raise ValueError(f"config.init_from: parameter {key} has shape {tuple(src[key].shape)} in "
                                 f"{path}, but the model expects {tuple(x.shape)}")
            out[key] = jax.device_put(src[key].astype(x.dtype), x.sharding)
            loaded.append(key)
        else:
            out[key] = x
            new.append(key)
    ignored = sorted(set(src) - set(loaded))
    logging.info("init_from %s: loaded %d tensors (interpolated %s); new: %s; ignored: %s", path, len(loaded),
                 interpolated, new, ignored)
    print(f"init_from {path}: loaded {len(loaded)} tensors (position tables interpolated: {interpolated}), "
          f"new {new}, ignored {ignored}", flush=True)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return jax.tree_util.tree_unflatten(treedef, [out[k] for k in dst])


def params_like(path: str, like):
    """The checkpoint's parameters arranged as the tree ``like`` (all keys must match)."""
    src, dst = flat_params(read_params(path)), flat_params(like)
    missing, extra = sorted(set(dst) - set(src)), sorted(set(src) - set(dst))
    if missing or extra:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {extra}")
    for k, x in dst.items():
        if tuple(src[k].shape) != tuple(x.shape):
            raise ValueError(f"checkpoint {path}: parameter {k} has shape {tuple(src[k].shape)}, "
                             f"the model expects {tuple(x.shape)}")
    treedef = jax.tree_util.tree_structure(like)
    return jax.tree_util.tree_unflatten(treedef, [src[k] for k in dst])


def saved_config(path: str):
    """The ml_collections config saved with a checkpoint (workdir, checkpoints dir or step dir)."""
    import json

    import ml_collections
    directory, step = _resolve(path)
    text = (storage.path(directory) / str(step) / "config" / "metadata").read_text()
    return ml_collections.ConfigDict(_tuples(json.loads(text)))


def _tuples(d):
    """JSON turned the config's tuples into lists; turn them back."""
    if isinstance(d, dict):
        return {k: _tuples(v) for k, v in d.items()}
    return tuple(d) if isinstance(d, list) else d
