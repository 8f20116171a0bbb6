"""The trainer's parts in process: the evaluator list and its schedule, the metrics logger
(one step late, evaluation time left out) and the restore order (``checkpoint.restore_or_init``)."""
import types

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskfeat_jax import checkpoint, config as config_lib, evaluators, metrics, saved as saved_lib, steps
from maskfeat_jax.evaluators import ava, classification


def _config(task="pretrain", model="vit", probe=False, figures=0, every=4):
    c = config_lib.base_config()
    c.task, c.model.name, c.evals.probe, c.evals.figures_every_steps, c.evals.every_steps = \
        task, model, probe, figures, every
    return c


@pytest.fixture
def no_eval_data(monkeypatch):
    """The classification and AVA evaluators without their data or their compiled steps."""
    for module in (classification, ava):
        monkeypatch.setattr(module, "Evaluator", lambda *args: types.SimpleNamespace(run=lambda p: {}))


def _names(c, writer="writer"):
    setup = types.SimpleNamespace(graphdef=None, state_sharding=types.SimpleNamespace(params=None))
    return [ev.name for ev in evaluators.from_config(c, None, setup, writer)]


def test_the_evaluators_a_config_gets(no_eval_data, monkeypatch):
    assert _names(_config()) == []                                    # pre-training: nothing by default
    assert _names(_config(probe=True, figures=5)) == ["probe", "figures"]
    assert _names(_config(probe=True, figures=5), writer=None) == ["probe"]   # --mode=eval: numbers only
    assert _names(_config(model="mvit", figures=5)) == []              # figures: ViT only
    assert _names(_config(task="finetune", figures=5)) == ["classification"]
    assert _names(_config(task="finetune", probe=True)) == ["classification", "probe"]
    assert _names(_config(task="detect", model="mvit", figures=5)) == ["ava"]
    monkeypatch.setattr(jax, "process_count", lambda: 2)               # probe and figures: one process
    assert _names(_config(task="finetune", probe=True, figures=5)) == ["classification"]
    assert _names(_config(probe=True, figures=5)) == []


def test_evaluators_run_on_their_schedule_and_at_the_last_step(no_eval_data):
    c = _config(task="finetune", probe=True, figures=0, every=4)
    evs = evaluators.from_config(c, None, types.SimpleNamespace(graphdef=None, state_sharding=types.SimpleNamespace(
        params=None)), "writer")
    assert [s for s in range(1, 11) if evaluators.due(evs[0], s, 10)] == [4, 8, 10]
    fig = evaluators.from_config(_config(figures=3), None, None, "writer")[0]
    assert [s for s in range(1, 8) if evaluators.due(fig, s, 7)] == [3, 6, 7]


class _Rows:
    """A metrics.Writer that keeps its rows."""

    def __init__(self):
        self.rows = []

    def write(self, step, scalars):
        self.rows.append((step, dict(scalars)))

    def close(self):
        pass


def _logger(every=2, total=5):
    rows = _Rows()
    log = metrics.Logger(rows, metrics.Progress(total, 10, 0), metrics.Throughput(8, 1.0, 1, 1.0),
                         every_steps=every, total_steps=total, steps_per_epoch=10)
    return log, rows


def test_the_logger_writes_a_logged_step_once_the_next_is_dispatched():
    log, rows = _logger(every=2, total=5)
    loss = lambda s: {"train/loss": jnp.float32(s)}     # noqa: E731
    log.dispatched(1, loss(1))
    log.dispatched(2, loss(2))
    assert rows.rows == []                               # step 2 is kept, not yet read
    log.dispatched(3, loss(3))
    assert [s for s, _ in rows.rows] == [2]              # read once step 3 was dispatched
    log.dispatched(4, loss(4))
    log.dispatched(5, loss(5))                           # the last step is always logged
    assert [s for s, _ in rows.rows] == [2, 4]
    assert log.flush()["train/loss"] == 5.0 and [s for s, _ in rows.rows] == [2, 4, 5]
    assert rows.rows[0][1]["train/epoch"] == 0.2 and rows.rows[0][1]["train/loss"] == 2.0
    log.write(5, {"eval/top1": 0.5})
    assert log.last["eval/top1"] == 0.5 and log.last["train/loss"] == 5.0


def test_the_logger_leaves_time_spent_paused_out_of_the_step_time(monkeypatch):
    clock = {"t": 100.0}
    monkeypatch.setattr(metrics.time, "time", lambda: clock["t"])
    log, rows = _logger(every=1, total=5)
    log.dispatched(1, {})
    log.flush()
    with log.paused():                                   # an evaluation
        clock["t"] += 30.0
    clock["t"] += 0.5                                    # one step
    log.dispatched(2, {})
    with log.waiting_for_data():
        clock["t"] += 0.25
    log.flush()
    perf = rows.rows[-1][1]
    assert perf["perf/step_seconds"] == pytest.approx(0.75) and perf["perf/data_wait_fraction"] == pytest.approx(1 / 3)


def _toy(step):
    params = {"w": jnp.full((4,), float(step))}
    return steps.TrainState(step=jnp.int32(step), params=params, opt_state={}, nonfinite=jnp.int32(0))


def _setup():
    state = _toy(0)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    return types.SimpleNamespace(init=lambda: _toy(0), abstract_state=abstract)


def _make_iter(start):
    return iter(grain.MapDataset.range(1000)[start:].to_iter_dataset())


TOPOLOGY = {"process_count": 1, "worker_count": 0, "global_batch_size": 16, "num_sample": 1}


def _save(workdir, steps_):
    """Checkpoints of ``steps_`` with 16 examples a batch, the iterator ``step`` batches on."""
    ck = checkpoint.Checkpointer(str(workdir), every_steps=1, max_to_keep=5)
    it = _make_iter(0)
    done = 0
    for s in steps_:
        for _ in range(s - done):
            next(it)
        done = s
        ck.save(s, _toy(s), it, config_lib.base_config(),
                dict(TOPOLOGY, examples_read=16 * s, start_batch=0), force=True)
    ck.close()


def test_restore_or_init_starts_fresh_without_a_checkpoint(tmp_path):
    ck = checkpoint.Checkpointer(str(tmp_path), 1, 5)
    state, it, pos = checkpoint.restore_or_init(ck, _setup(), _make_iter, config_lib.base_config(), TOPOLOGY)
    assert int(state.step) == 0 and next(it) == 0 and pos == checkpoint.Position(0, 0, 0, 16)
    ck.close()


def test_restore_or_init_falls_back_to_an_older_checkpoint(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setattr(checkpoint, "RESTORE_RETRY_S", 0.0)
    _save(tmp_path, [3, 6])
    for f in (tmp_path / "checkpoints" / "6" / "state").rglob("*"):     # damaged array files
        if f.is_file() and f.stat().st_size > 16 and "metadata" not in f.name:
            f.write_bytes(f.read_bytes()[:8])
    ck = checkpoint.Checkpointer(str(tmp_path), 1, 5)
    state, it, pos = checkpoint.restore_or_init(ck, _setup(), _make_iter, config_lib.base_config(), TOPOLOGY)
    assert "resuming from step 3" in capsys.readouterr().out
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("checkpoint at step 6 could not be restored" in m for m in warned), warned
    assert any("checkpoint at step 6 set aside as" in m for m in warned), warned
    assert int(state.step) == 3 and float(state.params["w"][0]) == 3.0
    assert next(it) == 3                                   # grain's saved position
    assert pos == checkpoint.Position(3, 48, 0, 16) and pos.at(5) == {"examples_read": 80, "start_batch": 0}
    assert ck.mngr.all_steps() == [3] and (tmp_path / "checkpoints" / "6.unrestorable").is_dir()
    ck.close()


def test_restore_or_init_on_another_topology_restarts_the_input_at_the_examples_read(tmp_path, caplog):
    _save(tmp_path, [3])
    ck = checkpoint.Checkpointer(str(tmp_path), 1, 5)
    halved = dict(TOPOLOGY, global_batch_size=8)          # 48 examples read: batch 6 of 8
    state, it, pos = checkpoint.restore_or_init(ck, _setup(), _make_iter, config_lib.base_config(), halved)
    assert any("input topology changed" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert int(state.step) == 3 and next(it) == 6
    assert pos == checkpoint.Position(3, 48, 6, 8) and pos.at(4) == {"examples_read": 56, "start_batch": 6}
    ck.close()


def test_one_resolver_for_workdirs_checkpoint_folders_and_steps(tmp_path):
    _save(tmp_path, [3, 6])
    d = str(tmp_path / "checkpoints")
    assert saved_lib.resolve(str(tmp_path)) == (d, 6)
    assert saved_lib.resolve(d, 3) == (d, 3)
    assert saved_lib.resolve(f"{d}/3") == (d, 3)
    with pytest.raises(ValueError, match=r"--step=4: .* holds steps \[3, 6\]"):
        saved_lib.resolve(str(tmp_path), 4)
    with pytest.raises(ValueError, match="config.init_from=.*: no checkpoint found"):
        saved_lib.resolve(str(tmp_path / "empty"), key="config.init_from")
    np.testing.assert_array_equal(saved_lib.read_params(f"{d}/3")["w"], np.full((4,), 3.0))


def test_the_tensorboard_writer_starts_without_importing_torch(tmp_path):
    """tensorboardX imports torch where installed; the writer hides it (seconds of every start-up).
    A stand-in ``torch`` on the path fails any import of it; a real torch imports afterwards."""
    import os
    import subprocess
    import sys
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('torch was imported')\n")
    code = ("import sys\nfrom maskfeat_jax import metrics\n"
            "w = metrics.Writer(sys.argv[1])\nw.write(1, {'train/loss': 0.5})\nw.close()\n"
            "assert w._tb is not None and 'torch' not in sys.modules\n"
            "try:\n    import torch\nexcept RuntimeError as e:\n    print(e)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), root]))
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "w")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "torch was imported"          # hidden for tensorboardX's import only
    assert list((tmp_path / "w" / "tensorboard").glob("events.out.tfevents.*"))
