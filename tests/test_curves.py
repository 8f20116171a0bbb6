"""The metrics-curve PNG command."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from maskfeat_jax import curves


def test_curve_png_draws_the_series(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in range(1, 21):
            f.write(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n")
        f.write(json.dumps({"step": 21, "perf/mfu": 0.5}) + "\n")
    out = curves.main([f"--workdir={tmp_path}", f"--out={tmp_path / 'c.png'}"])
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (360, 640, 3)
    blue = (img[..., 2] > 150) & (img[..., 0] < 100)
    ys, xs = np.nonzero(blue)
    assert xs.min() < 100 and xs.max() > 550           # spans the x range
    # a falling series: the line is high on the left and low on the right
    assert ys[xs < 100].mean() < ys[xs > 550].mean()


def test_missing_key_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "a": 1.0}) + "\n")
    with pytest.raises(ValueError, match="--key=train/loss: not in .*; its keys: a"):
        curves.read(str(tmp_path), "train/loss")
    with pytest.raises(SystemExit) as exit_:                     # the command: a message, code 2
        curves.main([f"--workdir={tmp_path}/elsewhere"])
    assert exit_.value.code == 2
    with pytest.raises(ValueError, match="no metrics.jsonl there"):
        curves.read(str(tmp_path / "elsewhere"), "train/loss")


@pytest.mark.e2e
def test_command_writes_the_png_and_prints_its_path(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n"
                                                    for s in range(1, 6)))
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "maskfeat_jax.curves", *a], cwd=root, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    p = run(f"--workdir={tmp_path}")
    assert p.returncode == 0 and p.stdout.strip() == str(tmp_path / "train_loss.png"), p.stderr[-2000:]
    assert Image.open(tmp_path / "train_loss.png").size == (640, 360)
    p = run(f"--workdir={tmp_path}", "--key=train/lost")
    assert p.returncode == 2 and p.stderr.startswith("error: --key=train/lost: not in"), p.stderr[-2000:]
    p = run("--key=train/loss")                                  # --workdir is required: one line, code 2
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "workdir" in p.stderr, p.stderr[-2000:]
