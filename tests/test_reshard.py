"""A checkpoint saved under one mesh restores onto another: the values are bit-equal
and the shardings are the ones the new mesh's setup asks for. This covers restoring in a
test process and resuming a workdir with the trainer (``train_and_evaluate``) on another mesh."""
import json
import pathlib

import grain
import jax
import numpy as np
import pytest

from maskfeat_jax import checkpoint, saved as saved_lib, sharding, train

import tiny


def _batch(mesh, seed):
    rng = np.random.default_rng(seed)
    return sharding.global_batch(mesh, {
        "image": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
        "mask": rng.random((8, 4)) < 0.5, "label": np.zeros((8,), np.int32), "valid": np.ones((8,), bool)})


def _setup(mesh_cfg, devices=None):
    c = tiny.config(overrides={"optim.warmup_epochs": 0.0, "optim.base_lr": 1e-2,
                               "model.num_classes": 1000})          # base_config's: pre-training has no classifier
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_cfg
    mesh = sharding.make_mesh(c.mesh, devices)
    return c, mesh, train.setup(c, mesh, steps_per_epoch=10, total_steps=100)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two data-parallel steps (so the Adam moments are non-trivial), saved at step 2."""
    workdir = tmp_path_factory.mktemp("reshard")
    c, mesh, s = _setup((8, 1, 1))
    state = s.init()
    with jax.set_mesh(mesh):
        for i in range(2):
            batch = _batch(mesh, i)
            state, _ = train.jit_step(s, mesh, batch)(state, batch)
    ckpt = checkpoint.Checkpointer(str(workdir), every_steps=1, max_to_keep=1)
    ckpt.save(2, state, iter(grain.MapDataset.range(4).to_iter_dataset()), c, force=True)
    ckpt.close()
    return workdir, jax.device_get(state)


TARGETS = {
    "fsdp8": ((1, 8, 1), None),
    "fsdp4_tensor2": ((1, 4, 2), None),
    "data2_fsdp2_tensor2": ((2, 2, 2), None),
    "four_devices_fsdp4": ((1, 4, 1), 4),
}


@pytest.mark.xdist_group("reshard_saved")
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_restore_onto_another_mesh(saved, name):
    workdir, ref = saved
    mesh_cfg, n_dev = TARGETS[name]
    devices = jax.devices()[:n_dev] if n_dev else None
    _, mesh, s = _setup(mesh_cfg, devices)
    ckpt = checkpoint.Checkpointer(str(workdir), every_steps=1, max_to_keep=1)
    with jax.set_mesh(mesh):
        state = ckpt.restore(2, s.abstract_state)
    ckpt.close()
    want = set(jax.devices()[:n_dev] if n_dev else jax.devices())
    leaves = jax.tree_util.tree_leaves_with_path(state)
    shardings = jax.tree.leaves(s.state_sharding)
    assert len(leaves) == len(shardings) == len(jax.tree.leaves(ref))
    split = 0
    for (path, x), sh, r in zip(leaves, shardings, jax.tree.leaves(ref)):
        key = jax.tree_util.keystr(path)
        assert x.sharding.is_equivalent_to(sh, x.ndim), (key, x.sharding, sh)
        assert x.sharding.device_set == want, key
        np.testing.assert_array_equal(np.asarray(jax.device_get(x)), np.asarray(r), err_msg=key)
        split += x.sharding.shard_shape(x.shape) != x.shape
    assert split > 0   # the new mesh really splits some of the restored arrays


@pytest.mark.xdist_group("reshard_saved")
def test_restored_state_trains_on_the_new_mesh(saved):
    """One more step on FSDP+TP from the restored state matches one more step on the saving mesh."""
    workdir, _ = saved
    losses = []
    for mesh_cfg in [(8, 1, 1), (1, 4, 2)]:
        _, mesh, s = _setup(mesh_cfg)
        ckpt = checkpoint.Checkpointer(str(workdir), every_steps=1, max_to_keep=1)
        with jax.set_mesh(mesh):
            state = ckpt.restore(2, s.abstract_state)
            batch = _batch(mesh, 2)
            state, m = train.jit_step(s, mesh, batch)(state, batch)
        ckpt.close()
        losses.append((float(m["train/loss"]), jax.device_get(state.params)))
    np.testing.assert_allclose(losses[0][0], losses[1][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(losses[0][1]), jax.tree.leaves(losses[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)


# ---- a workdir's config: the mesh is not a shape-changing key, so a workdir resumes on another mesh

# A constant learning rate, so that a run stopped at step 2 and resumed to step 4 follows the
# same schedule as a straight 4-step run (the cosine otherwise depends on total_steps).
SMALL = ["--config=configs/demo.py", "--config.model.variant=mu/16", "--config.input.image_size=32",
         "--config.input.global_batch_size=16", "--config.log_every_steps=1", "--config.optim.warmup_epochs=0",
         "--config.optim.base_lr=4e-3", "--config.optim.warmup_start_lr=4e-3", "--config.optim.end_lr=4e-3",
         "--config.evals.probe=False", "--config.peak_flops=1e12"]


def _main(workdir, *extra):
    """The trainer in this process, as ``python -m maskfeat_jax.main`` with ``SMALL`` and ``extra``."""
    return tiny.train(tiny.from_flags([*SMALL, *extra]), workdir)


def _losses(workdir):
    rows = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_a_workdir_resumes_on_another_mesh(tmp_path):
    _main(tmp_path / "straight", "--config.total_steps=4")
    _main(tmp_path / "moved", "--config.total_steps=2")
    out = _main(tmp_path / "moved", "--config.total_steps=4", "--config.mesh.data=1", "--config.mesh.fsdp=4",
                "--config.mesh.tensor=2")
    assert "resuming from step 2" in out and "'fsdp': 4, 'tensor': 2" in out
    straight, moved = _losses(tmp_path / "straight"), _losses(tmp_path / "moved")
    assert sorted(moved) == [1, 2, 3, 4]
    np.testing.assert_allclose([moved[s] for s in (1, 2, 3, 4)], [straight[s] for s in (1, 2, 3, 4)], rtol=1e-5)
    a = jax.tree.leaves(saved_lib.read_params(str(tmp_path / "straight")))
    b = jax.tree.leaves(saved_lib.read_params(str(tmp_path / "moved")))
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-6)
