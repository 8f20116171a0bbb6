"""Video MaskFeat through the trainer: MViTv2 pre-training on the embedded mp4 clips via
``python -m maskfeat_jax.main``, video HOG targets in the step, fine-tuning steps on clips."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from maskfeat_jax import config as config_lib, sharding, train
from maskfeat_jax.data import make_video_demo

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    make_video_demo.ensure_video_demo(str(d), num_train=16, num_val=6, frames=16, size=64)
    return d


def test_video_pretraining_end_to_end(tmp_path, video_dir):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "maskfeat_jax.main", "--config=configs/demo_video.py",
                        f"--workdir={tmp_path}", f"--config.video.csv_dir={video_dir}",
                        "--config.input.global_batch_size=8", "--config.total_steps=3",
                        "--config.log_every_steps=1"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "input: video_demo, clips decoded by PyAV, 0 grain worker process(es) per host" in p.stdout
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert (tmp_path / "checkpoints" / "3").is_dir()


def test_video_finetune_steps_and_multiview_eval(video_dir, monkeypatch, tmp_path):
    c = config_lib.base_config()
    c.task, c.model.name, c.model.variant = "finetune", "mvit", "mu"
    c.input.dataset, c.input.image_size, c.input.global_batch_size = "video_csv", 64, 8
    c.input.eval_split = "validation"
    c.video.csv_dir, c.video.num_frames, c.video.sampling_rate, c.video.short_side = str(video_dir), 8, 2, 64
    c.video.test_clips, c.evals.batch_size, c.model.num_classes = 2, 8, 10
    config_lib.validate(c, jax.device_count())
    mesh = sharding.make_mesh(c.mesh)
    s = train.setup(c, mesh, 10, 10)
    state = s.init()
    rng = np.random.default_rng(0)
    local = {"image": rng.integers(0, 256, (8, 8, 64, 64, 3), dtype=np.uint8),
             "label": rng.integers(0, 10, 8).astype(np.int32), "valid": np.ones(8, bool),
             "erase_box": np.tile(np.array([[4, 4, 8, 8]], np.int32), (8, 1))}
    with jax.set_mesh(mesh):
        batch = sharding.global_batch(mesh, local)
        state, m = train.jit_step(s, mesh, batch)(state, batch)
    assert np.isfinite(float(m["train/loss"]))
    from maskfeat_jax.data import pipeline
    from maskfeat_jax.evaluators import classification
    workers, read = [], pipeline.read_batches
    monkeypatch.setattr(pipeline, "read_batches", lambda ds, n: workers.append(n) or read(ds, n))
    ev, results = classification.Evaluator(c, mesh, s.graphdef, s.state_sharding.params), []
    for c.input.worker_count in (1, 0):          # clips decoded in a grain worker, then in this process
        results.append(ev.run(state.params))
    assert workers == [1, 0]
    res = results[0]
    assert res["eval/examples"] == 6 and res["eval/undecodable"] == 0
    assert 0 <= res["eval/top1"] <= res["eval/top5"] <= 1
    assert results[0] == results[1]
    # a video that cannot be decoded is left out of top-1/top-5 and counted
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    (csv_dir / "corrupt.mp4").write_bytes(b"not a video")
    lines = (video_dir / "val.csv").read_text().splitlines()
    (csv_dir / "val.csv").write_text("\n".join(lines + [f"{csv_dir / 'corrupt.mp4'} 3"]) + "\n")
    c.video.csv_dir, c.video.root = str(csv_dir), str(video_dir)
    bad = classification.Evaluator(c, mesh, s.graphdef, s.state_sharding.params).run(state.params)
    assert bad == dict(res, **{"eval/undecodable": 1.0})


def test_init_from_interpolates_relative_position_tables(monkeypatch):
    from maskfeat_jax import saved as saved_lib
    from maskfeat_jax.models.mvit import interpolate_rel_pos
    c = config_lib.base_config()
    c.task, c.model.name, c.model.variant, c.input.image_size = "finetune", "mvit", "mu", 64
    c.input.global_batch_size, c.video.num_frames, c.model.num_classes = 8, 4, 10
    mesh = sharding.make_mesh(c.mesh)
    ft = train.setup(c, mesh, 10, 10).init().params
    # a pre-training checkpoint whose last block has longer tables (as MViTv2 PT vs FT, spec 7.3)
    src = jax.tree.map(lambda x: np.asarray(x) + 1.0, ft)
    last = len(src["encoder"]["blocks"]) - 1
    table = src["encoder"]["blocks"][last]["attn"]["rel_pos_h"]
    longer = np.random.default_rng(0).normal(size=(table.shape[0] + 6,) + table.shape[1:]).astype(np.float32)
    src["encoder"]["blocks"][last]["attn"]["rel_pos_h"] = longer
    src["encoder"]["mask_token"] = np.zeros((1, 1, 16), np.float32)
    monkeypatch.setattr(saved_lib, "read_params", lambda path: src)
    loaded = saved_lib.init_from("unused", ft)
    got = np.asarray(loaded["encoder"]["blocks"][last]["attn"]["rel_pos_h"])
    np.testing.assert_allclose(got, np.asarray(interpolate_rel_pos(longer, table.shape[0])), rtol=1e-6)
    np.testing.assert_array_equal(loaded["encoder"]["patch_kernel"], src["encoder"]["patch_kernel"])
    np.testing.assert_array_equal(loaded["head"]["kernel"], ft["head"]["kernel"])


@pytest.mark.parametrize("variant,gmacs", [("S", 71.0), ("L", 377.0)])
def test_mvit_analytic_flops_match_the_official_figures(variant, gmacs):
    """The official README quotes fvcore multiply-adds per 16x224 clip: 71 G (S) and 377 G (L)."""
    from flax import nnx

    from maskfeat_jax import models, perf
    c = config_lib.base_config()
    c.task, c.model.name, c.model.variant, c.model.num_classes = "finetune", "mvit", variant, 400
    with nnx.use_eager_sharding(False):
        m = nnx.eval_shape(lambda: models.build(c, nnx.Rngs(0)))
    macs = perf.model_flops_per_image(m, c) / 3 / 2 / 1e9
    assert macs == pytest.approx(gmacs, rel=0.03)
