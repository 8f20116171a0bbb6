"""End to end through ``python -m maskfeat_jax.main`` in subprocesses: logging, checkpoints,
resume after SIGKILL (bit-exact), SIGTERM preemption, bad overrides."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from maskfeat_jax import saved as saved_lib
from conftest import xla_flags

pytestmark = pytest.mark.e2e      # every test here runs python -m maskfeat_jax.main

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--config=configs/demo.py", "--config.model.variant=mu/16", "--config.input.image_size=32",
         "--config.input.global_batch_size=16", "--config.log_every_steps=2", "--config.optim.warmup_epochs=0.1",
         "--config.evals.probe=False"]


def _cmd(workdir, *extra):
    return [sys.executable, "-m", "maskfeat_jax.main", f"--workdir={workdir}", *SMALL, *extra]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(workdir, *extra, check=True):
    p = subprocess.run(_cmd(workdir, *extra), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(p.stdout[-3000:] + p.stderr[-3000:])
    return p


def _metrics(workdir):
    return [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]


def _params(workdir):
    import jax
    return jax.tree.leaves(saved_lib.read_params(str(workdir)))


def test_pretraining_logs_learns_and_checkpoints(tmp_path):
    # the length in epochs: 1437 digits in batches of 16 are 89 steps an epoch; 0.45 epochs, 40 steps
    _run(tmp_path, "--config.epochs=0.45", "--config.total_steps=-1", "--config.checkpoint.every_steps=20",
         "--config.optim.base_lr=4e-3", "--config.evals.figures_every_steps=20")
    rows = [r for r in _metrics(tmp_path) if "train/loss" in r]
    assert rows[-1]["step"] == 40 and all("opt/lr" in r for r in rows)
    assert rows[-1]["train/epoch"] == 40 / 89
    assert all("perf/mfu" in r and "perf/data_wait_fraction" in r for r in rows[1:])   # rates need two reads
    first, last = rows[0]["train/loss"], rows[-1]["train/loss"]
    assert last < 0.8 * first, (first, last)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [20, 40]
    images = [(e.step, v.tag, v.image.height) for e in _events(tmp_path / "tensorboard") for v in e.summary.value
              if v.HasField("image")]
    assert sorted({(step, tag) for step, tag, _ in images}) == [(s, f"hog/{i}") for s in (20, 40) for i in range(4)]
    assert all(h > 0 for _, _, h in images)


def _events(folder):
    """The Event protos of the TensorBoard files in ``folder`` (TFRecord framing: length,
    its CRC, the record, its CRC)."""
    import struct

    from tensorboardX.proto import event_pb2
    for path in sorted(pathlib.Path(folder).glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            yield event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4


def _wait_for_checkpoint(workdir, proc, timeout=300):
    t = time.time()
    while time.time() - t < timeout:
        d = pathlib.Path(workdir) / "checkpoints"
        if d.is_dir() and any(p.name.isdigit() for p in d.iterdir()):
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read()[-3000:])
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def test_sigkill_then_rerun_resumes_bit_exact(tmp_path):
    args = ("--config.total_steps=16", "--config.checkpoint.every_steps=3")
    _run(tmp_path / "straight", *args)
    proc = subprocess.Popen(_cmd(tmp_path / "killed", *args), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_checkpoint(tmp_path / "killed", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    p = _run(tmp_path / "killed", *args)
    assert "resuming from step" in p.stdout + p.stderr
    for a, b in zip(_params(tmp_path / "straight"), _params(tmp_path / "killed")):
        np.testing.assert_array_equal(a, b)


def test_sigterm_saves_and_exits_with_the_preemption_code(tmp_path):
    proc = subprocess.Popen(_cmd(tmp_path, "--config.total_steps=100000", "--config.checkpoint.every_steps=2"),
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_checkpoint(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(steps) > 0 and "saved step" in out


def test_unknown_override_key_fails_naming_it_with_a_suggestion(tmp_path):
    p = _run(tmp_path, "--config.optim.base_rl=3", check=False)
    assert p.returncode == 2 and "config.optim.base_rl" in p.stderr and "did you mean optim.base_lr" in p.stderr
    for tool, extra in (("maskfeat_jax.dry_run", []), ("maskfeat_jax.convert", ["--src=x.npz", f"--out={tmp_path}/c"])):
        q = subprocess.run([sys.executable, "-m", tool, "--config=configs/demo.py", "--config.optim.base_rl=3", *extra],
                           cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
        assert q.returncode == 2 and "did you mean optim.base_lr" in q.stderr, (tool, q.stderr[-2000:])


def test_bad_value_fails_before_compile_naming_the_key(tmp_path):
    p = _run(tmp_path, "--config.input.image_size=40", check=False)
    assert p.returncode == 2 and "config.input.image_size" in p.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_resume_refuses_a_shape_changing_config(tmp_path):
    _run(tmp_path, "--config.total_steps=2")
    p = _run(tmp_path, "--config.total_steps=4", "--config.model.variant=demo/16", check=False)
    assert p.returncode == 2 and "model.variant" in p.stderr and "allow_config_change" in p.stderr


def test_vit_b16_runs_on_cpu_with_synthetic_data(tmp_path):
    p = subprocess.run([sys.executable, "-m", "maskfeat_jax.main", f"--workdir={tmp_path}",
                        "--config=configs/vit_b_in1k.py", "--config.input.dataset=synthetic",
                        "--config.input.global_batch_size=2", "--config.total_steps=2",
                        "--config.input.worker_count=0", "--config.log_every_steps=1"],
                       cwd=ROOT, env=dict(_env(), XLA_FLAGS=xla_flags(1, fusion_emitters=True, level=1)),
                       capture_output=True, text=True, timeout=900)   # 1 device: 8 replicas of ViT-B = 11 GB
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "85,882,476" in p.stdout
    assert [r["step"] for r in _metrics(tmp_path) if "train/loss" in r] == [1, 2]


def test_runlocal_is_a_smoke_run_of_a_paper_config(tmp_path):
    """``configs/vit_in1k.py:B/16,runlocal``: the pre-training recipe shrunk to 3 steps of a tiny
    model on random images, with no other flag."""
    p = subprocess.run([sys.executable, "-m", "maskfeat_jax.main", f"--workdir={tmp_path}",
                        "--config=configs/vit_in1k.py:B/16,runlocal"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "config: " in p.stdout and "vit_in1k.py:B/16,runlocal" in p.stdout
    assert [r["step"] for r in _metrics(tmp_path) if "train/loss" in r] == [1, 2, 3]
    assert sorted(int(d.name) for d in (tmp_path / "checkpoints").iterdir() if d.name.isdigit()) == [3]
