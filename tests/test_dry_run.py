"""The dry run compiles the train step from abstract state and batch on the test process's
8 fake devices and reports per-device memory; FSDP over 8 holds ~1/8 of the parameters."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from maskfeat_jax import dry_run, sharding

import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(mesh, task="pretrain"):
    c = tiny.config(task, overrides={
        "model.variant": "demo/16",                            # every 2-D weight splits 8 ways
        "input.global_batch_size": 16,
        "input.dataset": "imagenet2012", "input.data_dir": "/nonexistent/tfds"})   # never read by the dry run
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return c


@pytest.fixture(scope="module")
def reports():
    return {name: dry_run.run(_config(mesh)) for name, mesh in [("dp", (8, 1, 1)), ("fsdp", (1, 8, 1))]}


@pytest.mark.xdist_group("dry_run_reports")
def test_reports_memory_and_flops_per_device(reports):
    r = reports["dp"]
    assert r["devices"] == 8 and r["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1} and r["batch_per_device"] == 2
    # demo/16 at 32 px with the HOG head: 1.3M parameters, float32, replicated under DP
    assert r["params_bytes_per_device"] == r["params_bytes_total"] > 4.5e6
    assert r["opt_state_bytes_per_device"] >= 2 * r["params_bytes_per_device"]   # Adam mu and nu
    mem = r["memory"]
    assert mem["argument_bytes"] >= r["params_bytes_per_device"] + r["opt_state_bytes_per_device"]
    assert mem["alias_bytes"] > 0.9 * mem["output_bytes"]          # the donated state is updated in place
    assert mem["temp_bytes"] > 0 and mem["total_bytes"] > mem["argument_bytes"]
    # the analytic count is matmuls only; at 32 px HOG and the Adam update add a fair share
    assert 0.9 < r["flops_per_device"] / r["analytic_flops_per_device"] < 2.5
    text = dry_run.format_report(r, device_memory_gib=1e-3)
    assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in text and "per device: params" in text
    assert "DOES NOT FIT in 0.001 GiB" in text


@pytest.mark.xdist_group("dry_run_reports")
def test_fsdp_over_8_holds_an_eighth_of_the_parameters(reports):
    dp, fsdp = reports["dp"], reports["fsdp"]
    for key in ("params_bytes_per_device", "opt_state_bytes_per_device"):
        ratio = fsdp[key] / dp[key]
        assert 1 / 8 <= ratio < 1 / 8 * 1.1, (key, ratio)
    assert fsdp["memory"]["argument_bytes"] < dp["memory"]["argument_bytes"] / 4
    # the model's FLOPs per device stay; only the optimizer update is split 8 ways under FSDP
    assert 0.9 * dp["analytic_flops_per_device"] < fsdp["flops_per_device"] < dp["flops_per_device"]


def test_finetune_batch_has_erase_boxes_instead_of_masks():
    c = _config((8, 1, 1), task="finetune")
    mesh = sharding.make_mesh(c.mesh)
    b = sharding.abstract_batch(c, mesh, (2, 2))
    assert set(b) == {"image", "label", "valid", "erase_box"}
    assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == "uint8"
    assert b["erase_box"].shape == (16, 4) and b["image"].sharding.shard_shape(b["image"].shape)[0] == 2
    assert "mask" in sharding.abstract_batch(_config((8, 1, 1)), mesh, (2, 2))
    video = _config((8, 1, 1))
    video.model.name, video.video.num_frames = "mvit", 4
    vb = sharding.abstract_batch(video, mesh, (2, 2, 2))   # MViT: clips, and masks on its (t, h, w) grid
    assert vb["image"].shape == (16, 4, 32, 32, 3) and vb["mask"].shape == (16, 8)


def test_config_errors_name_the_key():
    c = _config((1, 8, 1))
    c.model.variant = "mu/16"
    c.mesh.fsdp = 3
    with pytest.raises(ValueError, match="config.mesh"):
        dry_run.run(c)


@pytest.mark.e2e
def test_command_line_simulates_the_requested_device_count(tmp_path):
    """``--devices=N`` must take effect before JAX starts, whatever XLA_FLAGS says."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "report.json"
    p = subprocess.run([sys.executable, "-m", "maskfeat_jax.dry_run", "--config=configs/demo.py", "--devices=4",
                        "--config.model.variant=mu/16", "--config.input.image_size=32",
                        "--config.input.global_batch_size=8", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                        f"--json={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "devices: 4 x cpu, mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in p.stdout
    assert "compiled memory per device" in p.stdout and "FLOPs per device" in p.stdout
    assert json.loads(out.read_text())["batch_per_device"] == 2


def test_gradient_accumulation_shrinks_the_temporaries():
    c = _config((8, 1, 1))
    c.input.image_size, c.input.global_batch_size, c.optim.grad_accum_steps = 64, 512, 4
    accum = dry_run.run(c)
    c.optim.grad_accum_steps = 1
    full = dry_run.run(c)
    # activations of 16 examples per device alive at a time instead of 64 (the gradient
    # accumulator, one more copy of the parameters, is small beside them here)
    assert accum["memory"]["temp_bytes"] < 0.5 * full["memory"]["temp_bytes"]
    assert accum["params_bytes_per_device"] == full["params_bytes_per_device"]
    assert "in 4 micro-batches" in dry_run.format_report(accum)
