"""gs:// workdirs: the trainer, its checkpoints, metrics, TensorBoard and profile on a bucket.

GCS is played by a local emulator (the ``bucket`` fixture in conftest.py); nothing leaves this
machine. Two processes writing one gs:// workdir: ``test_multihost.py``.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from maskfeat_jax import checkpoint, config as config_lib, curves, saved as saved_lib, storage

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--config=configs/demo.py", "--config.model.variant=mu/16", "--config.input.image_size=32",
        "--config.input.global_batch_size=16", "--config.log_every_steps=1", "--config.evals.probe=False",
        "--config.checkpoint.every_steps=2", "--config.checkpoint.max_to_keep=2"]


def _main(workdir, steps, *extra):
    p = subprocess.run([sys.executable, "-m", "maskfeat_jax.main", f"--workdir={workdir}", *ARGS,
                        f"--config.total_steps={steps}", *extra], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=600)
    crash = p.stderr.find("Fatal Python error")      # absl's faulthandler: every thread's stack
    assert p.returncode == 0, p.stdout[-3000:] + (p.stderr[crash:crash + 8000] if crash >= 0 else p.stderr[-3000:])
    return p.stdout + p.stderr


def _names(url):
    return sorted(p.name for p in storage.path(url).iterdir())


def test_line_log_appends_on_a_filesystem_and_on_gcs(tmp_path, bucket):
    for where in (str(tmp_path / "run" / "m.jsonl"), f"{bucket}/run/m.jsonl"):
        log = storage.LineLog(where)
        log.write("a")
        log.write("b")
        log.close()
        log = storage.LineLog(where)           # a resumed run adds to what is there
        log.write("c")
        log.close()
        assert storage.path(where).read_text() == "a\nb\nc\n", where


def test_line_log_on_gcs_sends_each_line_once(bucket, monkeypatch):
    """On a bucket the lines are buffered and composed onto the object in chunks: the bytes
    uploaded are those of the lines, not of the whole log again at every write."""
    import gcsfs
    sent = []
    upload = gcsfs.GCSFileSystem._pipe_file

    async def counting(self, path, data, *args, **kwargs):
        sent.append(len(data))
        return await upload(self, path, data, *args, **kwargs)

    monkeypatch.setattr(gcsfs.GCSFileSystem, "_pipe_file", counting)
    where = f"{bucket}/run/metrics.jsonl"
    log = storage.LineLog(where)
    lines = [f"{i:09d}" for i in range(40)]             # 10 bytes each with the newline
    for i, line in enumerate(lines):
        log.write(line)
        assert len(sent) == i // 10, "written before the chunk is due"
        if i % 10 == 9:
            log.flush()                                  # 4 chunks of 10 lines
    log.write("last")
    log.close()                                          # the rest goes at close
    assert sent == [100, 100, 100, 100, 5]
    assert storage.path(where).read_text() == "".join(x + "\n" for x in lines + ["last"])
    assert _names(f"{bucket}/run") == ["metrics.jsonl"]    # no chunk left behind
    monkeypatch.setattr(storage.LineLog, "GCS_FLUSH_S", 0.0)   # due at every write: one line per upload
    log = storage.LineLog(where)
    log.write("x")
    log.close()
    assert sent[-1] == 2 and storage.path(where).read_text().endswith("last\nx\n")


def test_unsupported_urls_are_refused_naming_the_key(monkeypatch):
    with pytest.raises(ValueError, match=r"--workdir=s3://b/run: only gs://"):
        config_lib.validate_workdir("s3://b/run")
    with pytest.raises(ValueError, match=r"config.init_from=hf://x"):
        config_lib.validate_workdir("/tmp/run", "hf://x")
    config_lib.validate_workdir("gs://b/run", "gs://b/pt")
    config_lib.validate_workdir("/gcs/b/run")
    monkeypatch.setitem(sys.modules, "gcsfs", None)          # not installed
    with pytest.raises(ValueError, match=r"--workdir=gs://b/run: gs:// paths need gcsfs: pip install"):
        config_lib.validate_workdir("gs://b/run")


def test_pretraining_on_a_gcs_workdir_saves_resumes_and_logs(bucket):
    run = f"{bucket}/run"
    # the profiling window outlasts the run: the trace is stopped and copied at the end
    out = _main(run, 4, "--config.profile_start_step=3", "--config.profile_num_steps=5")
    assert f"profiler trace of steps 3..3 in {run}/profile" in out
    assert _names(f"{run}/checkpoints") == ["2", "4"]
    out = _main(run, 6)
    assert "step 5/6" in out and "step 1/6" not in out        # resumed at step 4, not from scratch
    assert _names(f"{run}/checkpoints") == ["4", "6"]          # max_to_keep=2 deleted step 2
    rows = [json.loads(x) for x in storage.path(f"{run}/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert "perf/mfu" in rows[-1]
    assert any(n.startswith("events.out.tfevents") for n in _names(f"{run}/tensorboard"))
    import fsspec
    assert any(f.endswith(".xplane.pb") for f in fsspec.filesystem("gs").find(f"{run}/profile"))

    # on a bucket a step folder is written in place: one without its commit file is a save in
    # progress (or cut short), never taken as the latest by the tools
    gcs = fsspec.filesystem("gs")
    gcs.copy(f"{run}/checkpoints/6", f"{run}/checkpoints/8", recursive=True)
    commit = [f for f in gcs.find(f"{run}/checkpoints/8") if f.endswith("commit_success.txt")]
    assert commit
    gcs.rm(commit)
    assert saved_lib.finished_steps(run) == [4, 6]
    with pytest.raises(ValueError, match="checkpoints/8 is not a finished checkpoint"):
        saved_lib.read_params(f"{run}/checkpoints/8")
    gcs.rm(f"{run}/checkpoints/8", recursive=True)

    # the tools read a gs:// run too
    params = saved_lib.read_params(run)
    assert params["head"]["kernel"].shape == (32, 108)
    assert saved_lib.saved_config(run).total_steps == 6
    png = curves.main([f"--workdir={run}"])
    assert png == f"{run}/train_loss.png"
    with storage.path(png).open("rb") as f:
        assert np.asarray(Image.open(f)).shape[:2] == (360, 640)

    from maskfeat_jax import visualize
    assert visualize.main([f"--workdir={run}", "--num_images", "1", "--cell_px", "16"]) == [f"{run}/figures/hog_0.png"]
    with storage.path(f"{run}/figures/hog_0.png").open("rb") as f:
        shape = np.asarray(Image.open(f)).shape
        assert shape[0] > 64 and shape[1:] == (4 * 64 + 3 * 4, 3)    # 4 panels of 4x4 cells below their titles

    # a checkpoint that cannot be restored is set aside on a bucket as on a disk
    ckpt = checkpoint.Checkpointer(run, every_steps=2, max_to_keep=2)
    assert ckpt.set_aside(6) == f"{run}/checkpoints/6.unrestorable"
    assert ckpt.mngr.all_steps() == [4]
    assert "6.unrestorable" in _names(f"{run}/checkpoints")
    ckpt.close()


def test_conversion_refuses_unsupported_out_urls():
    from maskfeat_jax import convert
    with pytest.raises(convert.ConversionError, match=r"--out=s3://b/x: only gs://"):
        convert.convert("unused.pth", config_lib.base_config(), "s3://b/x")


def test_profile_window_on_a_local_workdir(tmp_path):
    out = _main(tmp_path, 3, "--config.profile_start_step=1", "--config.profile_num_steps=1")
    assert f"profiler trace of steps 1..1 in {tmp_path}/profile" in out
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with storage.atomic_write(str(target)) as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["out.csv"]
    with storage.atomic_write(str(target), "wb") as f:
        f.write(b"new\n")
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["out.csv"]
