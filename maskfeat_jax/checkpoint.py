"""Orbax checkpoints of the train state, the data iterator and the config, together.

Saves are atomic: Orbax writes into a temporary directory and renames it when complete,
so an interrupted save is never listed as the latest; leftovers are cleaned at start-up.
Restore order (written once, here): the latest checkpoint in ``WORKDIR/checkpoints``,
then ``config.init_from`` (weights only, see ``saved.init_from``), then scratch.

Each checkpoint also records the input topology (processes, workers per process, global
batch) that wrote its iterator state, the examples the input had read by then and the batch
the iterator started at; grain's state is only meaningful for that topology and counts from
that batch, and the example count places a restart under another topology.

Paths may be local or ``gs://`` URLs (``storage``); on GCS, Orbax marks a finished save with a
commit file instead of renaming it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from maskfeat_jax import config as config_lib, saved as saved_lib, storage

RESTORE_RETRY_S = 2.0     # pause before reading a checkpoint that failed once a second time


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
        storage.quiet_disk_full_logs()

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


@dataclasses.dataclass(frozen=True)
class Position:
    """Where the input stood at ``step`` (the step the run starts from): the examples (videos)
    read so far, and the batch the iterator was built to start at (grain's saved position
    counts from there). ``per_batch``: the examples (videos) the input passes per batch."""
    step: int
    examples_read: int
    start_batch: int
    per_batch: int

    def at(self, step: int) -> dict:
        """What a checkpoint of ``step`` records beside the input topology."""
        return {"examples_read": self.examples_read + (step - self.step) * self.per_batch,
                "start_batch": self.start_batch}


def restore_or_init(ckpt: Checkpointer, setup, make_iter, config, topology: dict, mesh=None):
    """The run's start, in the order of the module docstring: the newest checkpoint in the
    workdir that reads back (with the data iterator, ``make_iter(start batch)``), else a fresh
    state with ``config.init_from``'s weights, else from scratch. Call it under the mesh.

    A checkpoint written by another input ``topology`` restores the state only; the input
    restarts at the batch that follows the examples already read (for the new batch size).
    Returns (state, data iterator, ``Position``)."""
    per_batch = topology["global_batch_size"] // topology.get("num_sample", 1)
    if ckpt.latest_step() is None:
        data_iter = make_iter(0)
        state = setup.init()
        if config.get("init_from"):
            state = state.replace(params=saved_lib.init_from(config.init_from, state.params, mesh))
        return state, data_iter, Position(int(jax.device_get(state.step)), 0, 0, per_batch)
    state, saved, data_iter = _restore_latest_good(ckpt, setup.abstract_state, make_iter, config, topology)
    step = int(jax.device_get(state.step))
    read, start = _examples_read(saved, step, per_batch), (saved or {}).get("start_batch", 0)
    if data_iter is None:    # written by another input topology: restart the input where it was
        start = read // per_batch
        read = start * per_batch
        logging.warning("input topology changed (%s -> %s): the data iterator starts at batch %d instead "
                        "of restoring its saved state", _input_topology(saved), topology, start)
        data_iter = make_iter(start)
    return state, data_iter, Position(step, read, start, per_batch)


def _restore_latest_good(ckpt, abstract_state, make_iter, config, topology):
    """Restores the newest checkpoint that reads back; a damaged one is reported and skipped.

    Every read is tried twice (a storage error may pass; TensorStore reports those as
    ``ValueError``), and all processes agree on each try: a step counts as restored only where
    every process read it, so they all resume from the same step and set aside the same ones.

    Returns (state, the saved input topology or None, the restored data iterator). The iterator
    (``make_iter(start batch)``) is restored only when the topologies agree, else it is None."""
    steps_desc = sorted(ckpt.mngr.all_steps(), reverse=True)
    for i, step in enumerate(steps_desc):
        state, saved, data_iter, err = _read_agreed(ckpt, step, abstract_state, make_iter, config, topology)
        if err is not None:
            nxt = f"falling back to step {steps_desc[i + 1]}" if i + 1 < len(steps_desc) else "no older checkpoint"
            logging.warning("checkpoint at step %d could not be restored (%s: %s); %s", step,
                            type(err).__name__, str(err)[:300], nxt)
            continue
        for bad in steps_desc[:i]:    # newer, unrestorable: out of the way of this run's saves
            moved = ckpt.set_aside(bad)
            logging.warning("checkpoint at step %d %s", bad, f"set aside as {moved}" if moved else
                            "could not be set aside: this run saves again only after that step")
        print(f"resuming from step {step}", flush=True)
        return state, saved, data_iter
    raise RuntimeError(f"no checkpoint in {ckpt.directory} could be restored (the last error is above). If "
                       f"the config changed since they were written in a way that changes the train state "
                       f"(model, optimizer), resume with the saved config (JSON in "
                       f"{ckpt.directory}/<step>/config/metadata); if the checkpoints are damaged, move the "
                       f"folder away to start from scratch")


def _read_agreed(ckpt, step, abstract_state, make_iter, config, topology):
    """Reads ``step`` at most twice, until every process has read it: (state, saved topology,
    data iterator or None, None), or (None, None, None, the last error)."""
    for attempt in range(2):
        state, saved, data_iter, err = None, None, None, None
        try:
            check_config(ckpt, step, config)
            saved = ckpt.saved_topology(step)
            changed = saved is not None and _input_topology(saved) != topology
            data_iter = None if changed else make_iter((saved or {}).get("start_batch", 0))
            state = ckpt.restore(step, abstract_state, data_iter)
        except ValueError as e:
            if "shape-changing" in str(e):
                raise
            err = e
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous one
            err = e
        if _all_processes_agree(err is None):
            return state, saved, data_iter, None
        if hasattr(data_iter, "close"):
            data_iter.close()
        err = err or RuntimeError("another process could not read it")
        if attempt == 0:     # perhaps the storage, not the checkpoint: read it once more
            logging.warning("reading checkpoint %d failed (%s: %s); retrying once", step, type(err).__name__, err)
            time.sleep(RESTORE_RETRY_S)
    return None, None, None, err


def _all_processes_agree(ok: bool) -> bool:
    """True when ``ok`` holds on every process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(multihost_utils.process_allgather(np.int32(ok)).min())


def _input_topology(saved: dict) -> dict:
    """A checkpoint's saved topology without its position (``examples_read``, ``start_batch``)."""
    return {k: v for k, v in saved.items() if k not in ("examples_read", "start_batch")}


def _examples_read(saved: dict | None, step: int, per_batch: int) -> int:
    """Examples (videos) the input had passed at a checkpoint of ``step``. Checkpoints written
    before the count was recorded give ``step`` batches of their own size."""
    if saved is None:
        return step * per_batch
    if "examples_read" in saved:
        return int(saved["examples_read"])
    return step * saved["global_batch_size"] // saved.get("num_sample", 1)


def check_config(ckpt, step: int, config, evaluating: bool = False) -> None:
    """Refuses a checkpoint whose saved config differs from ``config`` in shape-changing keys
    (training may override with ``config.checkpoint.allow_config_change``; evaluation may not)."""
    diffs = config_lib.shape_differences(ckpt.saved_config(step), config)
    if diffs and (evaluating or not config.checkpoint.allow_config_change):
        hint = (f"Evaluate with the config it was trained with (saved in {ckpt.directory}/{step}/config/metadata)."
                if evaluating else "Use another --workdir, or set --config.checkpoint.allow_config_change=True "
                "to override.")
        raise ValueError("config: the workdir holds a checkpoint whose config differs in shape-changing keys:\n  "
                         + "\n  ".join(diffs) + "\n" + hint)
