"""Two processes x 4 CPU devices (gloo collectives) train exactly like one process x 8.

Each process runs ``python -m maskfeat_jax.main`` with ``--coordinator_address`` on
localhost. The pipeline batches the shuffled stream in host-sized batches (augmentation
and masks keyed on the global index) and gives host ``p`` batches ``p, p + 2, ...``, so
over both hosts global batch ``k`` is the single-process batch ``k``, row for row. The
pre-training step has no per-position
randomness (drop path is 0 here), and its loss and gradients are sums over the batch.
So the losses and the final parameters must agree to float tolerance. The checks below
also confirm that the examples are the same, not merely similar.

The CPU collectives need no setting: ``jax_cpu_collectives_implementation`` defaults to
'gloo' in jax 0.10. If a jaxlib lacks them, the test is skipped with a reason.
"""
import functools
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from maskfeat_jax import saved as saved_lib
from conftest import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config=configs/demo.py", "--config.model.variant=mu/16", "--config.input.image_size=32",
        "--config.input.global_batch_size=16", "--config.total_steps=4", "--config.evals.probe=False",
        "--config.log_every_steps=1", "--config.optim.warmup_epochs=0", "--config.optim.base_lr=4e-3",
        "--config.peak_flops=1e12"]   # a fixed peak: no CPU matmul measurement at start-up
TIMEOUT = 300   # seconds per subprocess (a guard against a hung collective)


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_FLAGS"] = xla_flags(devices)   # overrides conftest's 8
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_NUM_CPU_DEVICES", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(workdir, *extra):
    return [sys.executable, "-m", "maskfeat_jax.main", f"--workdir={workdir}", *TINY, *extra]


def _single(workdir):
    p = subprocess.run(_cmd(workdir), cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def _start_two(workdir, *extra):
    port = _free_port()
    return [subprocess.Popen(_cmd(workdir, *extra, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                  f"--process_id={i}"),
                             cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]


_PROBE = """
import sys
import jax
import numpy as np
from jax.experimental import multihost_utils
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
print(multihost_utils.process_allgather(np.int32(jax.process_index())).tolist())
"""


@functools.cache
def _gloo_available() -> str:
    """'' where two CPU processes can run a collective in this jaxlib, else the reason."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _PROBE, f"127.0.0.1:{port}", str(i)], env=_env(1),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return "a two-process all-gather did not finish in 120 s"
    ok = all(p.returncode == 0 and "[0, 1]" in out for p, out in zip(procs, outs))
    return "" if ok else outs[0].strip().splitlines()[-1] if outs[0].strip() else "no output"


def _finish(procs, expected_rc):
    """Wait for both processes; check exit codes. A failure is skipped only where the jaxlib
    cannot run CPU collectives at all (checked once, apart from the code under test)."""
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        pytest.fail("the 2-process run did not finish in time (a collective may be waiting for a peer)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode != expected_rc for p in procs):
        reason = _gloo_available()
        if reason:
            pytest.skip(f"CPU collectives (gloo) unavailable in this jaxlib: {reason}")
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == expected_rc, f"process {i}:\n{out[-4000:]}\nprocess {1 - i}:\n{outs[1 - i][-2000:]}"
    return outs


def _two_processes(workdir):
    return _finish(_start_two(workdir), 0)


def _losses(workdir) -> dict:
    rows = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("multihost")
    one = _single(d / "one")
    two = _two_processes(d / "two")
    return d, one, two


@pytest.mark.xdist_group("multihost_runs")
def test_two_processes_see_eight_devices(runs):
    _, one, (out0, out1) = runs
    assert "devices: 8 x cpu on 1 process(es)" in one
    assert "input: digits, image backend cv2, 0 grain worker process(es) per host" in one
    assert "devices: 8 x cpu on 2 process(es)" in out0
    assert "devices:" not in out1    # the summary is printed by process 0 only


@pytest.mark.xdist_group("multihost_runs")
def test_losses_match_one_process(runs):
    d, _, _ = runs
    one, two = _losses(d / "one"), _losses(d / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]   # written once: no duplicate rows from process 1
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5)
    rows = [json.loads(line) for line in open(d / "two" / "metrics.jsonl")]
    assert len([r for r in rows if "train/loss" in r]) == 4


@pytest.mark.xdist_group("multihost_runs")
def test_final_parameters_match_one_process(runs):
    d, _, _ = runs
    import jax
    a, b = saved_lib.read_params(str(d / "one")), saved_lib.read_params(str(d / "two"))
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) > 4
    for x, y in zip(la, lb):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    # each host saved its own data-iterator state next to the shared arrays
    step_dir = d / "two" / "checkpoints" / "4" / "data_iter"
    assert sorted(p.name for p in step_dir.iterdir() if p.suffix == ".json") == \
        ["process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.xdist_group("multihost_runs")
def test_eval_mode_on_two_processes_skips_the_one_host_probe(runs, tmp_path):
    """The k-NN / linear probe reads all parameters on one host: on several processes
    ``--mode=eval`` says so and evaluates the rest, rather than fetching arrays it cannot."""
    import shutil
    d, _, _ = runs
    shutil.copytree(d / "two", tmp_path / "two")
    outs = _finish(_start_two(tmp_path / "two", "--mode=eval", "--config.evals.probe=True"), 0)
    assert all("config.evals.probe: skipped on 2 processes" in out for out in outs), outs[0][-3000:]
    assert json.loads(outs[0].strip().splitlines()[-1]) == {"step": 4}


def test_global_batch_holds_the_single_process_examples():
    """The hosts' batches, concatenated in process order, are the single-process batch."""
    from maskfeat_jax import config as config_lib
    from maskfeat_jax.data import pipeline, sources
    c = config_lib.base_config()
    c.input.dataset, c.input.worker_count = "digits", 0
    c.model.variant, c.input.image_size, c.input.global_batch_size = "mu/16", 32, 16
    src = sources.make(c, c.input.train_split)
    grid = (2, 2)
    single = iter(pipeline.train_dataset(c, src, grid, process_index=0, process_count=1))
    hosts = [iter(pipeline.train_dataset(c, src, grid, process_index=i, process_count=2)) for i in range(2)]
    for _ in range(3):
        one = next(single)
        parts = [next(h) for h in hosts]
        glob = {k: np.concatenate([p[k] for p in parts]) for k in one}
        for k in one:
            np.testing.assert_array_equal(glob[k], one[k], err_msg=k)


def test_sigterm_on_one_host_stops_both_at_the_same_saved_step(tmp_path):
    """A preemption notice that reaches only host 1: JAX's preemption service makes both hosts
    stop after the same step, save it collectively and exit with the preemption code; the run
    then resumes from that step."""
    import signal
    import time
    procs = _start_two(tmp_path, "--config.total_steps=100000", "--config.checkpoint.every_steps=1000")
    try:
        deadline = time.time() + TIMEOUT
        metrics = tmp_path / "metrics.jsonl"
        while not (metrics.exists() and sum("train/loss" in line for line in open(metrics)) >= 3):
            assert time.time() < deadline and all(p.poll() is None for p in procs), \
                "the 2-process run did not start training: " + (procs[0].communicate()[0] or "")[-3000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    outs = _finish(procs, 75)
    saved = [int(line.split("saved step ")[1].split(",")[0]) for out in outs for line in out.splitlines()
             if "saved step " in line]
    assert len(saved) == 2 and saved[0] == saved[1] >= 3, saved
    step_dir = tmp_path / "checkpoints" / str(saved[0])
    assert sorted(p.name for p in (step_dir / "data_iter").iterdir() if p.suffix == ".json") == \
        ["process_0-of-2.json", "process_1-of-2.json"]
    # the same command, on one process with 8 devices this time, resumes from that step
    p = subprocess.run(_cmd(tmp_path, f"--config.total_steps={saved[0] + 2}"), cwd=ROOT, env=_env(8),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0 and f"resuming from step {saved[0]}" in p.stdout + p.stderr, p.stderr[-3000:]


def test_two_processes_on_a_gcs_workdir_save_resume_and_set_aside_together(bucket):
    """Both hosts write one gs:// workdir (a local GCS emulator): Orbax's shared arrays and each
    host's iterator state; a damaged newest checkpoint is set aside by process 0 while process
    1 waits for the listing to agree, and both resume from the one before."""
    import fsspec
    from maskfeat_jax import storage
    run = f"{bucket}/two"
    _finish(_start_two(run, "--config.checkpoint.every_steps=2"), 0)
    gcs = fsspec.filesystem("gs")
    ck = f"{run}/checkpoints"
    assert sorted(p.name for p in storage.path(ck).iterdir()) == ["2", "4"]
    assert sorted(p.name for p in storage.path(f"{ck}/4/data_iter").iterdir() if p.suffix == ".json") == \
        ["process_0-of-2.json", "process_1-of-2.json"]
    for f in gcs.find(f"{ck}/4/state"):           # damage the newest checkpoint's array data
        if gcs.size(f) > 64 and "metadata" not in f.rsplit("/", 1)[-1]:
            gcs.pipe(f, gcs.cat(f)[:16])
    out0, out1 = _finish(_start_two(run, "--config.checkpoint.every_steps=2", "--config.total_steps=6"), 0)
    assert "checkpoint at step 4 could not be restored" in out0 and "set aside" in out0, out0[-3000:]
    assert "resuming from step 2" in out0 and "Traceback" not in out1
    assert sorted(p.name for p in storage.path(ck).iterdir()) == ["2", "4", "4.unrestorable", "6"]
    rows = [json.loads(line) for line in storage.path(f"{run}/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 3, 4, 5, 6]


VIDEO_EVAL = """
import json, sys
import jax
port, pid, keys, out = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from maskfeat_jax import config as config_lib, sharding, train
from maskfeat_jax.evaluators import classification
c = config_lib.base_config()
c.update_from_flattened_dict(keys)
d = jax.devices()                                      # process 0 holds d[0], d[1]; process 1 d[2], d[3]
mesh = sharding.make_mesh(c.mesh, [d[0], d[2], d[1], d[3]])    # the hosts interleaved along 'data'
st = train.setup(c, mesh, 10, 10)
scores = classification.Evaluator(c, mesh, st.graphdef, st.state_sharding.params).video_scores(st.init().params)
json.dump({str(v): [s.tolist(), lab] for v, (s, lab) in scores.items()}, open(f"{out}.{pid}.json", "w"))
"""


def test_video_evaluation_reads_each_hosts_rows_where_the_mesh_puts_them(tmp_path):
    """Two processes whose devices alternate along the data axis (as TPU v4/v5p hosts do)
    give every video the summed scores of one process's evaluation."""
    from maskfeat_jax import config as config_lib, sharding, train
    from maskfeat_jax.data import make_video_demo
    from maskfeat_jax.evaluators import classification
    make_video_demo.ensure_video_demo(str(tmp_path), num_train=2, num_val=6, frames=8, size=32)
    # the video ViT (its program compiles in a fraction of MViTv2's): the rows' placement is the model's
    keys = {"task": "finetune", "model.name": "vit", "model.variant": "mu/16", "model.num_classes": 10,
            "input.dataset": "video_csv", "input.image_size": 32, "input.global_batch_size": 8,
            "input.eval_split": "validation", "evals.batch_size": 4, "video.csv_dir": str(tmp_path),
            "video.num_frames": 4, "video.sampling_rate": 2, "video.short_side": 32, "video.test_clips": 2}
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", VIDEO_EVAL, str(port), str(i), json.dumps(keys), str(tmp_path / "s")],
                              cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    _finish(procs, 0)
    c = config_lib.base_config()
    c.update_from_flattened_dict(dict(keys, **{"evals.batch_size": 8}))     # one process, 8 devices
    mesh = sharding.make_mesh(c.mesh)
    st = train.setup(c, mesh, 10, 10)
    ref = classification.Evaluator(c, mesh, st.graphdef, st.state_sharding.params).video_scores(st.init().params)
    assert sorted(ref) == list(range(6))
    for pid in range(2):
        got = json.load(open(tmp_path / f"s.{pid}.json"))
        assert sorted(int(v) for v in got) == list(range(6))
        for v, (score, label) in ref.items():
            assert got[str(v)][1] == label
            np.testing.assert_allclose(got[str(v)][0], score, rtol=1e-4, atol=1e-6, err_msg=f"video {v}")
