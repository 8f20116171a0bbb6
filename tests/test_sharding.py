"""Data parallel, FSDP and FSDP + tensor parallel on 8 fake CPU devices agree with one device."""
import jax
import numpy as np
import pytest

from maskfeat_jax import augment, sharding, train

import tiny


def _config(task="pretrain"):
    # mixup pairs examples within each device's slice of the batch (as the official per-GPU mixup),
    # so its pairs depend on the mesh: off here, tested in test_mixup_pairs_stay_on_their_device
    return tiny.config(task, overrides={"augment.mixup_alpha": 0.0, "augment.cutmix_alpha": 0.0,
                                        "optim.warmup_epochs": 0.0, "optim.base_lr": 1e-2})


def _batch(task, n=8, size=32, seed=0):
    rng = np.random.default_rng(seed)
    b = {"image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
         "label": rng.integers(0, 10, (n,)).astype(np.int32), "valid": np.ones((n,), bool)}
    if task == "pretrain":
        b["mask"] = rng.random((n, (size // 16) ** 2)) < 0.5
    else:
        b["erase_box"] = np.zeros((n, 4), np.int32)
    return b


def _run(config, mesh_cfg, devices, steps=3):
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_cfg
    mesh = sharding.make_mesh(config.mesh, devices)
    s = train.setup(config, mesh, steps_per_epoch=10, total_steps=100)
    state = s.init()
    fn = None
    losses = []
    with jax.set_mesh(mesh):
        for i in range(steps):
            batch = sharding.global_batch(mesh, _batch(config.task, seed=i))
            fn = fn or train.jit_step(s, mesh, batch)
            state, m = fn(state, batch)
            losses.append(float(m["train/loss"]))
    return state, losses


# Pre-training on each strategy; fine-tuning (the same sharding code, another step) on the mesh
# that uses all three axes at once.
@pytest.mark.parametrize("task,meshes", [("pretrain", [(8, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2)]),
                                         ("finetune", [(2, 2, 2)])])
def test_strategies_match_single_device(task, meshes):
    ref_state, ref_losses = _run(_config(task), (1, 1, 1), jax.devices()[:1])
    ref = jax.tree.leaves(jax.device_get(ref_state.params))
    for mesh_cfg in meshes:
        state, losses = _run(_config(task), mesh_cfg, jax.devices())
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, atol=1e-6, err_msg=str(mesh_cfg))
        for a, b in zip(ref, jax.tree.leaves(jax.device_get(state.params))):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6, err_msg=str(mesh_cfg))


def test_fsdp_holds_an_eighth_of_parameters_and_optimizer_state_per_device():
    c = _config()
    c.model.variant = "demo/16"   # wide enough that every 2-D weight splits 8 ways
    c.mesh.data, c.mesh.fsdp = 1, 8
    fsdp = train.setup(c, sharding.make_mesh(c.mesh), 10, 100).init()
    c.mesh.data, c.mesh.fsdp = 8, 1
    dp = train.setup(c, sharding.make_mesh(c.mesh), 10, 100).init()
    for part in ("params", "opt_state"):
        ratio = sharding.bytes_per_device(getattr(fsdp, part)) / sharding.bytes_per_device(getattr(dp, part))
        assert 1 / 8 <= ratio < 1 / 8 * 1.1, (part, ratio)


def test_parameters_are_created_sharded():
    c = _config()
    c.model.variant = "demo/16"     # width 128, MLP 512
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    state = train.setup(c, sharding.make_mesh(c.mesh), 10, 100).init()
    qkv = state.params["encoder"]["blocks"][0]["attn"]["qkv_kernel"]
    assert qkv.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor", None)
    assert len(qkv.addressable_shards) == 8
    fc1 = state.params["encoder"]["blocks"][0]["mlp"]["fc1"]["kernel"]
    assert fc1.sharding.shard_shape(fc1.shape) == (64, 256)


def test_gradient_accumulation_matches_the_full_batch(task="pretrain"):
    """k micro-batches per step give the full batch's loss and update, on one device and
    data-parallel over 8 (each device holding an equal share of every micro-batch)."""
    ref_state, ref_losses = _run(_config(task), (1, 1, 1), jax.devices()[:1])
    ref = jax.tree.leaves(jax.device_get(ref_state.params))
    # 8 examples: 4 micro-batches of 2 on one device; 2 micro-batches of 4 over 4 devices (DP x FSDP)
    for k, mesh_cfg, devices in [(4, (1, 1, 1), jax.devices()[:1]), (2, (2, 2, 1), jax.devices()[:4])]:
        c = _config(task)
        c.optim.grad_accum_steps = k
        state, losses = _run(c, mesh_cfg, devices)
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, atol=1e-6, err_msg=f"k={k}")
        for a, b in zip(ref, jax.tree.leaves(jax.device_get(state.params))):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6, err_msg=f"k={k}")


def test_micro_batches_interleave_so_no_data_moves():
    mesh = sharding.make_mesh(_config().mesh, jax.devices())
    x = jax.device_put(np.arange(32.0).reshape(16, 2), sharding.batch_sharding(mesh, 2))
    with jax.set_mesh(mesh):
        mb = jax.jit(lambda x: train.steps.micro_batches(x, 2))(x)
    np.testing.assert_array_equal(mb[0, :, 0], np.arange(0, 32, 4))       # examples 0, 2, 4, ...
    np.testing.assert_array_equal(mb[1, :, 0], np.arange(2, 32, 4))       # examples 1, 3, 5, ...
    # device d holds examples 2d and 2d + 1: one of each micro-batch
    assert mb.sharding.shard_shape(mb.shape) == (2, 1, 2)


def test_mixup_pairs_stay_on_their_device():
    """Each example is mixed with the reversed order of its own device's slice of the batch:
    no example moves between devices (no collective in the compiled mix)."""
    import ml_collections
    a = ml_collections.ConfigDict(dict(mixup_alpha=0.8, cutmix_alpha=0.0, switch_prob=0.5, label_smoothing=0.0))
    mesh = sharding.make_mesh(_config().mesh, jax.devices())          # data parallel over 8
    n = 16
    images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 4, 4, 3))
    x = jax.device_put(images, sharding.batch_sharding(mesh, 4))
    y = jax.device_put(np.arange(n, dtype=np.int32), sharding.batch_sharding(mesh, 1))
    with jax.set_mesh(mesh):
        f = jax.jit(lambda k, x, y: augment.mix(k, x, y, n, a))
        hlo = f.lower(jax.random.key(0), x, y).compile().as_text()
        mixed, targets = f(jax.random.key(0), x, y)
    for op in ("collective-permute", "all-to-all", "all-gather", "all-reduce"):
        assert op not in hlo, op
    partner = np.arange(n) ^ 1                 # 2 examples a device: each pairs with the other one
    targets, mixed = np.asarray(targets), np.asarray(mixed)
    lam = targets[np.arange(n), np.arange(n)]
    assert 0.0 < lam[0] < 1.0
    np.testing.assert_allclose(targets[np.arange(n), partner], 1.0 - lam, atol=1e-6)
    np.testing.assert_allclose(mixed[:, 0, 0, 0], lam * np.arange(n) + (1 - lam) * partner, atol=1e-4)
