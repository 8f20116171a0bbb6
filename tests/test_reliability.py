"""Faults: damaged or half-written checkpoints, non-finite losses and gradients."""
import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tiny
from maskfeat_jax import checkpoint, saved as saved_lib, steps, train

ARGS = ["--config=configs/demo.py", "--config.model.variant=mu/16", "--config.input.image_size=32",
        "--config.input.global_batch_size=16", "--config.log_every_steps=1", "--config.evals.probe=False",
        "--config.checkpoint.every_steps=3", "--config.checkpoint.max_to_keep=5"]


def _run(workdir, steps_, *extra):
    """The trainer in this process, as ``python -m maskfeat_jax.main`` with ``ARGS``,
    ``--config.total_steps=steps_`` and ``extra`` would run it; returns what it printed and logged."""
    return tiny.train(tiny.from_flags([*ARGS, f"--config.total_steps={steps_}", *extra]), workdir)


def _steps(workdir):
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def test_damaged_and_half_written_checkpoints_fall_back_to_the_last_good_one(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "RESTORE_RETRY_S", 0.0)
    _run(tmp_path, 6)
    assert _steps(tmp_path) == [3, 6]
    ck = tmp_path / "checkpoints"
    # a save killed part-way leaves a temporary folder: it is never taken as the latest
    shutil.copytree(ck / "6", ck / "9.orbax-checkpoint-tmp-1234")
    # the newest complete checkpoint is damaged on disk (its array files truncated)
    for f in (ck / "6" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 64 and "metadata" not in f.name:
            f.write_bytes(f.read_bytes()[:16])
    # the rerun ends at the damaged step: the damaged checkpoint is set aside, so step 6 saves anew
    out = _run(tmp_path, 6)
    assert "checkpoint at step 6 could not be restored" in out and "resuming from step 3" in out
    assert "set aside" in out and (ck / "6.unrestorable" / "state").is_dir()
    assert not (ck / "9.orbax-checkpoint-tmp-1234").exists()       # cleaned up at start-up
    assert _steps(tmp_path) == [3, 6]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "train/loss" in r][-3:] == [4, 5, 6]
    assert "resuming from step 6" in _run(tmp_path, 8)             # the new step 6 reads back


def test_an_evaluation_that_fails_loses_no_steps(tmp_path, monkeypatch):
    """The step's checkpoint is written before its evaluation runs."""
    from maskfeat_jax import config as config_lib
    from maskfeat_jax.evaluators import probe

    def failing_probe(*_):
        raise MemoryError("the probe ran out of memory")

    monkeypatch.setattr(probe, "evaluate", failing_probe)
    c = config_lib.base_config()
    c.model.variant, c.input.image_size, c.input.dataset, c.input.global_batch_size = "mu/16", 32, "digits", 16
    c.total_steps, c.log_every_steps, c.checkpoint.every_steps = 2, 1, 2
    c.evals.probe, c.evals.every_steps, c.evals.figures_every_steps = True, 2, 0
    with pytest.raises(MemoryError, match="the probe"):
        train.train_and_evaluate(c, str(tmp_path))
    assert _steps(tmp_path) == [2]


def _toy_state():
    params = {"w": jnp.ones((3,))}
    tx = optax.adamw(0.1)
    return tx, steps.TrainState(step=jnp.array(0), params=params, opt_state=tx.init(params),
                                nonfinite=jnp.array(0))


@pytest.mark.parametrize("loss,grad", [(np.nan, 1.0), (1.0, np.inf), (np.inf, np.nan)])
def test_nonfinite_update_is_skipped_and_counted(loss, grad):
    tx, state = _toy_state()
    new, m = steps.apply_update(tx, state, jnp.float32(loss), {"w": jnp.full((3,), grad)}, {})
    for a, b in zip(jax.tree.leaves((new.params, new.opt_state)), jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, b)          # parameters and moments untouched
    jitted, _ = jax.jit(steps.apply_update, static_argnums=0)(tx, state, jnp.float32(loss), {"w": jnp.full((3,), grad)}, {})
    np.testing.assert_array_equal(jitted.params["w"], state.params["w"])
    assert int(new.nonfinite) == 1 and int(m["train/nonfinite_steps"]) == 1 and int(new.step) == 1
    ok, _ = steps.apply_update(tx, new, jnp.float32(1.0), {"w": jnp.ones((3,))}, {})
    assert int(ok.nonfinite) == 1 and not np.array_equal(ok.params["w"], state.params["w"])


def test_a_skipped_update_advances_the_lr_schedule_but_not_adams_count():
    sched = lambda count: jnp.where(count >= 1, 0.5, 0.0)   # noqa: E731 - lr 0 at the first step only
    tx = optax.adamw(sched, weight_decay=0.0)
    params = {"w": jnp.ones((3,))}
    state = steps.TrainState(step=jnp.array(0), params=params, opt_state=tx.init(params), nonfinite=jnp.array(0))
    skipped, _ = steps.apply_update(tx, state, jnp.float32(np.nan), {"w": jnp.ones((3,))}, {})
    np.testing.assert_array_equal(skipped.params["w"], params["w"])
    kinds = (optax.ScaleByAdamState, optax.ScaleByScheduleState)
    counts = {type(s).__name__: int(s.count) for s in jax.tree.leaves(
        skipped.opt_state, is_leaf=lambda s: isinstance(s, kinds)) if isinstance(s, kinds)}
    assert counts == {"ScaleByAdamState": 0, "ScaleByScheduleState": 1}
    # step 1 applies the schedule's lr at step 1 (0.5), not its lr at step 0 (0.0); Adam's first
    # bias-corrected step moves each weight by lr
    good, _ = steps.apply_update(tx, skipped, jnp.float32(1.0), {"w": jnp.ones((3,))}, {})
    np.testing.assert_allclose(good.params["w"], 0.5, rtol=1e-5)


def _logger(workdir, nonfinite="error", skipped_before=0):
    from maskfeat_jax import metrics
    return metrics.Logger(metrics.Writer(str(workdir)), metrics.Progress(10, 5, 0), metrics.Throughput(8, 1.0, 1, 1.0),
                          every_steps=1, total_steps=10, steps_per_epoch=5, nonfinite=nonfinite,
                          skipped_before=skipped_before)


def test_nonfinite_stops_the_run_in_error_mode_naming_the_step(tmp_path):
    bad = {"train/loss": jnp.float32(np.nan), "train/nonfinite_steps": jnp.int32(1)}
    log = _logger(tmp_path)
    log.dispatched(7, bad)
    with pytest.raises(FloatingPointError, match="step 7"):
        log.flush()
    log.close()
    log = _logger(tmp_path, nonfinite="skip")
    log.dispatched(7, bad)
    assert log.flush()["train/nonfinite_steps"] == 1
    log.close()


def test_error_mode_counts_only_this_runs_skips_so_a_stopped_run_resumes(tmp_path):
    """A checkpoint saved with one skipped update resumes; a new skip after the resume still stops it."""
    log = _logger(tmp_path, skipped_before=1)
    log.dispatched(8, {"train/loss": jnp.float32(1.0), "train/nonfinite_steps": jnp.int32(1)})
    assert log.flush()["train/nonfinite_steps"] == 1
    log.dispatched(9, {"train/loss": jnp.float32(np.nan), "train/nonfinite_steps": jnp.int32(2)})
    with pytest.raises(FloatingPointError, match="1 step.*by step 9"):
        log.flush()
    log.close()


def test_throughput_restart_leaves_evaluation_time_out_of_the_step_time(monkeypatch):
    from maskfeat_jax import metrics
    clock = {"t": 50.0}
    monkeypatch.setattr(metrics.time, "time", lambda: clock["t"])
    meter = metrics.Throughput(8, 1.0, 1, 1.0)
    meter.mark(0)
    clock["t"] += 30.0              # "evaluation"
    meter.restart(0)
    clock["t"] += 0.5               # one step
    out = meter.mark(1)
    assert out["perf/step_seconds"] == pytest.approx(0.5), out


def _final_params(workdir, step):
    return jax.tree.leaves(saved_lib.read_params(str(pathlib.Path(workdir) / "checkpoints" / str(step))))


def test_resume_on_another_input_topology_restarts_the_input_at_the_step(tmp_path):
    """grain's iterator state belongs to the topology that wrote it. Resumed with another worker
    count, the run restores the train state, restarts the input at batch ``step`` and ends
    bit-identical to the uninterrupted run."""
    run = tmp_path / "run"
    _run(run, 6, "--config.input.worker_count=0")
    ref = _final_params(run, 6)                                # the uninterrupted run's result
    shutil.rmtree(run / "checkpoints" / "6")                  # as if the run had stopped after step 3
    out = _run(run, 6, "--config.input.worker_count=1")
    assert "resuming from step 3" in out and "input topology changed" in out and "starts at batch 3" in out
    for a, b in zip(ref, _final_params(run, 6)):
        np.testing.assert_array_equal(a, b)


def test_the_input_position_survives_global_batch_changes_and_plain_resumes(tmp_path):
    """Each checkpoint records the examples read so far and the batch its iterator started at.
    3 steps of 16 are 48 examples: resumed at batch 8 the input restarts at batch 6; a plain
    resume of that run (same topology) restores grain's position, which counts from batch 6, and
    ends bit-identical to the run that was not stopped; 3 + 6 steps later, 96 examples, a resume
    at batch 24 restarts at batch 4 (the step times the last batch size would give batch 3)."""
    run, w0 = tmp_path / "run", "--config.input.worker_count=0"
    _run(run, 3, w0)
    out = _run(run, 9, w0, "--config.input.global_batch_size=8")
    assert "resuming from step 3" in out and "starts at batch 6 " in out
    ref = _final_params(run, 9)
    shutil.rmtree(run / "checkpoints" / "9")                   # as if the run had stopped after step 6
    out = _run(run, 9, w0, "--config.input.global_batch_size=8")
    assert "resuming from step 6" in out and "input topology changed" not in out
    for a, b in zip(ref, _final_params(run, 9)):
        np.testing.assert_array_equal(a, b)
    ckpt = checkpoint.Checkpointer(str(run), 3, 5)
    saved = [ckpt.saved_topology(s) for s in (3, 6, 9)]
    assert [t["examples_read"] for t in saved] == [48, 72, 96] and [t["start_batch"] for t in saved] == [0, 6, 6]
    out = _run(run, 10, w0, "--config.input.global_batch_size=24")
    assert "resuming from step 9" in out and "starts at batch 4 " in out


def test_global_batch_k_holds_the_same_examples_for_any_process_count():
    from maskfeat_jax import config as config_lib
    from maskfeat_jax.data import pipeline, sources
    c = config_lib.base_config()
    c.input.dataset, c.input.image_size, c.input.global_batch_size, c.input.worker_count = "digits", 32, 8, 0
    src = sources.make(c, "train")
    one = iter(pipeline.train_dataset(c, src, (2, 2), process_index=0, process_count=1, start_batch=5))
    two = [iter(pipeline.train_dataset(c, src, (2, 2), process_index=p, process_count=2, start_batch=5))
           for p in range(2)]
    stream = iter(pipeline.train_dataset(c, src, (2, 2), process_index=0, process_count=1))
    for _ in range(5):
        next(stream)
    for _ in range(2):
        a, h0, h1, ref = next(one), next(two[0]), next(two[1]), next(stream)
        np.testing.assert_array_equal(a["image"], ref["image"])          # start_batch = skipping batches
        np.testing.assert_array_equal(np.concatenate([h0["image"], h1["image"]]), a["image"])   # 1 or 2 hosts


def test_set_aside_on_several_processes_shares_the_rename_and_relists(tmp_path, monkeypatch):
    """The multi-process branch: process 0's outcome is broadcast; every process relists the steps."""
    import grain
    from jax.experimental import multihost_utils
    from maskfeat_jax import checkpoint, config as config_lib
    ck = checkpoint.Checkpointer(str(tmp_path), every_steps=1, max_to_keep=5)
    state = {"w": jnp.ones((3,))}
    it = iter(grain.MapDataset.range(4).to_iter_dataset())
    for s in (1, 2):
        ck.save(s, state, it, config_lib.base_config(), force=True)
    ck.wait()
    shared = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: shared.append(int(x)) or x)
    moved = ck.set_aside(2)
    assert shared == [1] and moved.endswith("2.unrestorable") and os.path.isdir(moved)
    assert ck.mngr.all_steps() == [1] and ck.latest_step() == 1
    ck.close()


class _FakeCheckpoints:
    """Steps 3 and 6 on record; ``failures[step]`` reads of a step fail before it reads back."""

    def __init__(self, config, failures):
        self.config, self.failures, self.reads, self.set_aside_steps = config, dict(failures), [], []
        self.mngr = type("Manager", (), {"all_steps": lambda _: [3, 6]})()
        self.directory = "ckpt"

    def saved_config(self, step):
        return self.config

    def saved_topology(self, step):
        return None

    def restore(self, step, abstract_state, data_iter=None):
        self.reads.append(step)
        if self.failures.get(step, 0) > 0:
            self.failures[step] -= 1
            raise ValueError("UNAVAILABLE: the storage did not answer")    # how TensorStore reports it
        return f"state at {step}"

    def set_aside(self, step):
        self.set_aside_steps.append(step)
        return f"{step}.unrestorable"


def test_a_read_error_is_retried_whatever_its_type(monkeypatch):
    from maskfeat_jax import config as config_lib
    monkeypatch.setattr(checkpoint, "RESTORE_RETRY_S", 0.0)
    c = config_lib.base_config()
    ck = _FakeCheckpoints(c, {6: 1})                     # one transient failure of the newest step
    state, _, _ = checkpoint._restore_latest_good(ck, None, lambda start: None, c, {})
    assert state == "state at 6" and ck.reads == [6, 6] and ck.set_aside_steps == []
    ck = _FakeCheckpoints(c, {6: 2})                     # fails twice: damaged, fall back and set it aside
    state, _, _ = checkpoint._restore_latest_good(ck, None, lambda start: None, c, {})
    assert state == "state at 3" and ck.reads == [6, 6, 3] and ck.set_aside_steps == [6]


def test_processes_fall_back_together_when_one_cannot_read_a_step(monkeypatch):
    """This process reads step 6, another does not: all resume from step 3 and set 6 aside."""
    from maskfeat_jax import config as config_lib
    monkeypatch.setattr(checkpoint, "RESTORE_RETRY_S", 0.0)
    votes = []

    def agree(ok):                  # the other process fails both reads of step 6, then reads step 3
        votes.append(ok)
        return ok and len(votes) > 2

    monkeypatch.setattr(checkpoint, "_all_processes_agree", agree)
    c = config_lib.base_config()
    ck = _FakeCheckpoints(c, {})
    state, _, _ = checkpoint._restore_latest_good(ck, None, lambda start: None, c, {})
    assert votes == [True, True, True] and ck.reads == [6, 6, 3]
    assert state == "state at 3" and ck.set_aside_steps == [6]
