"""The metrics-curve PNG command, and the predict-the-mean-target baseline it draws under a
pre-training loss (against a float64 reference and the real train step)."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from maskfeat_jax import curves, steps
from maskfeat_jax.data import pipeline, sources

import tiny


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


# ---- the predict-the-mean-target baseline

def _reference_losses(batches):
    """float64 numpy, token by token: (MSE of the pooled mean vector, of each position's mean)."""
    tokens = [(n, t[b, n]) for t, w in batches for b, n in zip(*np.nonzero(w))]
    vecs = np.array([v for _, v in tokens], np.float64)
    pos = np.array([n for n, _ in tokens])
    pooled = ((vecs - vecs.mean(0)) ** 2).mean()
    per_pos = sum(((vecs[pos == n] - vecs[pos == n].mean(0)) ** 2).sum() for n in set(pos)) / vecs.size
    return pooled, per_pos


def test_mean_target_loss_matches_a_float64_reference():
    rng = np.random.default_rng(0)
    batches = []
    for b in (3, 5, 2):                        # uneven batches; position 0 masked in the middle one only
        t = (rng.normal(size=(b, 4, 6)) * [1, 2, 3, 4, 5, 6] + 10 * rng.normal(size=(4, 1))).astype(np.float32)
        w = rng.random((b, 4)) < 0.6
        w[:, 0] = len(batches) == 1
        batches.append((t, w))
    stats = curves.MeanTarget()
    for t, w in batches:
        stats.add(t, w)
    pooled, per_pos = _reference_losses(batches)
    assert stats.loss() == pytest.approx(pooled, rel=1e-10)
    assert stats.loss(per_position=True) == pytest.approx(per_pos, rel=1e-10)
    assert per_pos < pooled                    # the positions' means differ (the 10 * N(0, 1) offsets)
    shifted = curves.MeanTarget()              # the loss of the mean ignores a constant shift
    for t, w in batches:
        shifted.add(t + 1000.0, w)
    assert shifted.loss() == pytest.approx(pooled, rel=1e-6)
    with pytest.raises(ValueError, match="no masked tokens"):
        curves.MeanTarget().loss()


class _Constant(nnx.Module):
    """Predicts one vector ``mu`` for every token of every image."""

    def __init__(self, mu, n):
        self.mu, self.n = nnx.Param(jnp.asarray(mu, jnp.float32)), n

    def __call__(self, images, seen, *, rng=None):
        return {"pred_BxNxK": jnp.broadcast_to(self.mu[...], (images.shape[0], self.n, self.mu.shape[0]))}


@pytest.mark.parametrize("overrides", [{}, {"mae.enabled": True, "target.hog": 0.5, "target.pixel": 2.0,
                                            "mae.decoder_dim": 16, "mae.decoder_depth": 1, "mae.decoder_heads": 2}])
def test_baseline_is_the_train_step_loss_of_a_model_that_predicts_the_mean(overrides):
    """On one batch, the baseline equals ``train/loss`` of the real pre-training step (its masks:
    the batch's block mask, or MAE's own draw) for a model that outputs the mean target."""
    c = tiny.config(overrides={"input.dataset": "digits", "input.worker_count": 0, **overrides})
    batches = list(curves.masked_targets(c, 1))
    (targets, weight_BxN), = batches
    w = np.asarray(weight_BxN, bool)
    assert w.any() and w.sum() < w.size
    mu = np.concatenate([np.asarray(targets[name], np.float64)[w].mean(0) for name in targets])
    graphdef, state = nnx.split(_Constant(mu, w.shape[1]))
    params, tx = nnx.to_pure_dict(state), optax.identity()
    step = jax.jit(steps.make_pretrain_step(graphdef, tx, lambda _: 0.0, c, patch=16))
    batch = next(iter(pipeline.train_dataset(c, sources.make(c, c.input.train_split), (2, 2),
                                             process_index=0, process_count=1)))
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             nonfinite=jnp.zeros((), jnp.int32))
    _, metrics = step(state, jax.tree.map(jnp.asarray, batch))
    got = curves.mean_target_baselines(c, "train/loss", batches)["mean target"]
    assert got == pytest.approx(float(metrics["train/loss"]), rel=1e-5)
    if c.target.pixel > 0:
        hog_only = curves.mean_target_baselines(c, "train/loss_hog", batches)["mean target"]
        assert hog_only == pytest.approx(float(metrics["train/loss_hog"]), rel=1e-5)


def test_curve_draws_the_baselines_below_the_series():
    steps_ = np.arange(1.0, 21.0)
    img = np.asarray(curves.plot(steps_, 1.0 / steps_ + 0.5, baselines={"mean target": 0.3,
                                                                        "mean target per position": 0.25}))
    orange = (img[..., 0] > 200) & (img[..., 1] > 100) & (img[..., 1] < 160) & (img[..., 2] < 60)
    green = (img[..., 1] > 140) & (img[..., 0] < 80) & (img[..., 2] < 80)
    blue = (img[..., 2] > 150) & (img[..., 0] < 100)
    for colour in (orange, green):
        rows = np.bincount(np.nonzero(colour)[0], minlength=img.shape[0])
        assert rows.max() > 300                                    # a dashed line across the plot
    row = lambda m: np.argmax(np.bincount(np.nonzero(m)[0], minlength=img.shape[0]))   # noqa: E731
    assert np.nonzero(blue)[0].max() < row(orange) < row(green)     # baselines below the series, in order
