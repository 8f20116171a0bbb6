"""MAE pre-training (``config.mae``, ``models/mae.py``) and the transformer head
(``config.head.type='transformer'``): exact random-mask counts, an encoder on the kept patches
only (shapes, zero gradient to dropped pixels, equal to the dense encoder with nothing dropped),
a loss on masked tokens only, training that lowers the loss, and the default model unchanged."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from maskfeat_jax import config as config_lib, models, steps, targets as targets_lib
from maskfeat_jax.models import mae
from maskfeat_jax.targets import hog

import tiny

MAE = {"mae.enabled": True, "mae.decoder_dim": 24, "mae.decoder_depth": 1, "mae.decoder_heads": 2,
       "input.image_size": 64}                                    # 4 x 4 = 16 patches, 4 kept at 0.75
XFORMER = {"head.type": "transformer", "head.decoder_dim": 48, "head.decoder_depth": 1, "head.decoder_heads": 2}


def _build(c, seed=0):
    with nnx.use_eager_sharding(False):
        return models.build(c, nnx.Rngs(seed), "cpu")


def _images(b=8, size=64, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, size, size, 3), jnp.float32)


def _patch_of_pixel(size=64, p=16):
    """``(size, size)``: the row-major patch index of every pixel."""
    r = np.arange(size) // p
    return r[:, None] * (size // p) + r[None, :]


@pytest.mark.parametrize("n,ratio", [(16, 0.75), (196, 0.75), (196, 0.9), (49, 0.4), (1568, 0.9)])
def test_random_mask_masks_exactly_the_ratio_per_example(n, ratio):
    keep, mask = jax.jit(mae.random_mask, static_argnums=(1, 2, 3))(jax.random.key(1), 16, n, ratio)
    keep, mask = np.asarray(keep), np.asarray(mask)
    v = int(round(n * (1 - ratio)))
    assert keep.shape == (16, v) and mask.shape == (16, n) and mask.dtype == bool
    assert np.all(mask.sum(1) == n - v)                           # exactly, in every example
    assert np.all(np.diff(keep, axis=1) > 0)                      # distinct, ascending
    assert not mask[np.arange(16)[:, None], keep].any()           # the kept ones are the unmasked ones
    assert len({tuple(k) for k in keep}) == 16                    # a fresh draw per example


def test_random_mask_is_uniform_over_positions():
    _, mask = mae.random_mask(jax.random.key(0), 4000, 16, 0.75)
    freq = np.asarray(mask).mean(0)
    np.testing.assert_allclose(freq, 0.75, atol=0.03)             # 4000 draws: sd ~0.007


def test_mae_encoder_sees_only_the_kept_patches_and_dropped_pixels_get_no_gradient():
    c = tiny.config(overrides=MAE)
    model = _build(c)
    images = _images()
    keep, mask = mae.random_mask(jax.random.key(3), 8, 16, c.mae.mask_ratio)
    out = model(images, keep)
    assert out["tokens_BxNxD"].shape == (8, 1 + 4, 32)            # cls + 4 kept patches
    assert out["pred_BxNxK"].shape == (8, 16, 108) and out["pred_BxNxK"].dtype == jnp.float32
    assert model.encoder.mask_token is None                       # no mask token in the MAE encoder
    targets = jax.random.normal(jax.random.key(4), (8, 16, 108))
    active = targets_lib.active(c, 16)

    def loss(x):
        pred = model(x, keep)["pred_BxNxK"]
        return steps.masked_losses(pred, {"hog": targets}, mask.astype(jnp.float32), mask.sum(), active)[0]

    g = np.abs(np.asarray(jax.jit(jax.grad(loss))(images))).sum(-1)       # (8, 64, 64)
    per_patch = np.stack([np.bincount(_patch_of_pixel().ravel(), g[b].ravel(), 16) for b in range(8)])
    mask = np.asarray(mask)
    assert np.all(per_patch[mask] == 0.0)                         # exactly: dropped before the encoder
    assert np.all(per_patch[~mask] > 0.0)                         # every kept patch reaches the loss


def test_mae_encoder_with_nothing_dropped_equals_the_dense_encoder():
    """Kept tokens in any order: the dense encoder's tokens in that order (same parameters)."""
    model = _build(tiny.config(overrides=MAE))
    images = _images(4)
    perm = jnp.stack([jax.random.permutation(jax.random.key(i), 16) for i in range(4)]).astype(jnp.int32)
    graphdef, state = nnx.split(model.encoder)
    visible_fn = jax.jit(lambda st, k: nnx.merge(graphdef, st).encode_visible(images, k)["tokens_BxNxD"])
    visible = np.asarray(visible_fn(state, perm))
    dense = np.asarray(jax.jit(lambda st: nnx.merge(graphdef, st)(images)["tokens_BxNxD"])(state))
    want = np.concatenate([dense[:, :1], np.take_along_axis(dense[:, 1:], np.asarray(perm)[..., None], 1)], 1)
    np.testing.assert_allclose(visible, want, rtol=1e-5, atol=1e-5)
    # a subset is not the dense result (the test can tell the two apart)
    part = np.asarray(visible_fn(state, perm[:, :8]))
    assert np.abs(part - want[:, :9]).max() > 1e-3


class _PredProbe(nnx.Module):
    """The MAE model with a zero parameter added to its predictions: the loss's gradient with
    respect to it is the gradient with respect to the predictions."""

    def __init__(self, inner, shape):
        self.inner = inner
        self.delta = nnx.Param(jnp.zeros(shape, jnp.float32))

    def __call__(self, images, keep, *, rng=None):
        out = self.inner(images, keep, rng=rng)
        return dict(out, pred_BxNxK=out["pred_BxNxK"] + self.delta[...])


def _batch(b=8, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (b, size, size, 3)).astype(np.uint8),
            "mask": rng.random((b, (size // 16) ** 2)) < 0.5,       # the block mask: unused by MAE
            "valid": np.array([1] * (b - 1) + [0], bool), "label": np.zeros(b, np.int32)}


def _state(params, tx):
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                            nonfinite=jnp.zeros((), jnp.int32))


@pytest.mark.parametrize("weights", [{"target.hog": 1.0}, {"target.hog": 0.5, "target.pixel": 1.0}])
def test_mae_step_loss_is_on_masked_valid_tokens_only(monkeypatch, weights):
    """The step's own random mask, fixed here: the loss is the numpy MSE over masked tokens of
    valid rows; its gradient is 0 on kept tokens; changing a kept token's target changes nothing."""
    c = tiny.config(overrides={**MAE, **weights})
    keep, mask = mae.random_mask(jax.random.key(7), 8, 16, 0.75)
    monkeypatch.setattr(mae, "random_mask", lambda *a: (keep, mask))
    inner = _build(c)
    dim = 108 + (768 if c.target.pixel > 0 else 0)
    graphdef, st = nnx.split(_PredProbe(inner, (8, 16, dim)))
    params = nnx.to_pure_dict(st)
    tx = optax.identity()                                           # updates = gradients
    step = jax.jit(steps.make_pretrain_step(graphdef, tx, lambda _: 0.0, c, patch=16))
    targets = np.asarray(jax.random.uniform(jax.random.key(5), (8, 16, 108)))
    monkeypatch.setattr(hog, "hog_targets", lambda x, **kw: jnp.asarray(targets))
    batch = _batch()
    new, m = step(_state(params, tx), jax.tree.map(jnp.asarray, batch))

    mask, w = np.asarray(mask), np.asarray(mask) & batch["valid"][:, None]
    grad = np.asarray(new.params["delta"])
    assert np.all(grad[~w] == 0.0) and np.abs(grad[w]).max() > 0
    norm = steps.normalize(batch["image"], c.input.mean, c.input.std)
    pred = np.asarray(nnx.merge(graphdef, params)(norm, keep)["pred_BxNxK"], np.float64)
    err = ((pred[..., :108] - targets) ** 2).mean(-1)
    if c.target.pixel == 0:
        np.testing.assert_allclose(float(m["train/loss"]), (err * w).sum() / w.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(m["train/loss_hog"]), (err * w).sum() / w.sum(), rtol=1e-5)
    assert float(m["train/mask_ratio"]) == 0.75

    def loss_with(t):
        monkeypatch.setattr(hog, "hog_targets", lambda x, **kw: jnp.asarray(t))
        fresh = jax.jit(steps.make_pretrain_step(graphdef, tx, lambda _: 0.0, c, patch=16))
        return float(fresh(_state(params, tx), jax.tree.map(jnp.asarray, batch))[1]["train/loss"])

    if c.target.pixel > 0:
        return                                                      # the target changes below: HOG alone
    base = float(m["train/loss"])
    b, n = np.argwhere(~mask[:7])[0]                                # a kept token of a valid row
    t = targets.copy()
    t[b, n] += 5.0
    assert loss_with(t) == base
    b, n = np.argwhere(w)[0]                                        # a masked token of a valid row
    t = targets.copy()
    t[b, n] += 5.0
    assert loss_with(t) > base + 1e-3


def _train(c, n_steps, lr=3e-3):
    model = _build(c)
    graphdef, st = nnx.split(model)
    params = nnx.to_pure_dict(st)
    tx = optax.adam(lr)
    step = jax.jit(steps.make_pretrain_step(graphdef, tx, lambda _: lr, c, patch=16))
    state, batch, losses = _state(params, tx), jax.tree.map(jnp.asarray, _batch(size=c.input.image_size)), []
    for _ in range(n_steps):
        state, m = step(state, batch)
        losses.append(float(m["train/loss"]))
    return losses, m


def test_a_few_mae_steps_lower_the_loss():
    losses, m = _train(tiny.config(overrides=MAE), 12)
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert float(m["train/mask_ratio"]) == 0.75


def test_default_config_builds_the_same_parameter_tree_as_before():
    """The linear head, a ViT with a mask token: the tree of the model before config.mae/head."""
    model = _build(tiny.config())
    got = {"/".join(map(str, k)): tuple(v[...].shape) for k, v in nnx.to_flat_state(nnx.state(model))}
    block = {"attn/proj_bias": (32,), "attn/proj_kernel": (2, 16, 32), "attn/qkv_bias": (3, 2, 16),
             "attn/qkv_kernel": (32, 3, 2, 16), "mlp/fc1/bias": (64,), "mlp/fc1/kernel": (32, 64),
             "mlp/fc2/bias": (32,), "mlp/fc2/kernel": (64, 32), "norm1/bias": (32,), "norm1/scale": (32,),
             "norm2/bias": (32,), "norm2/scale": (32,)}
    want = {f"encoder/blocks/{i}/{k}": s for i in range(2) for k, s in block.items()}
    want.update({"encoder/cls_token": (1, 1, 32), "encoder/mask_token": (1, 1, 32), "encoder/patch_bias": (32,),
                 "encoder/patch_kernel": (16, 16, 3, 32), "encoder/pos_embed": (1, 5, 32), "head/bias": (108,),
                 "head/kernel": (32, 108), "norm/bias": (32,), "norm/scale": (32,)})
    assert got == want
    assert not hasattr(model, "decoder") and not hasattr(model, "decoder_embed")
    # and the same values as a MaskFeat built the way it was before (no decoder argument)
    from maskfeat_jax.models import heads, vit
    with nnx.use_eager_sharding(False):
        rngs = nnx.Rngs(0)
        old = heads.MaskFeat(vit.ViT(variant="mu/16", image_size=32, mask_token=True, rngs=rngs), 32, 108, rngs=rngs)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), nnx.state(old), nnx.state(model)))


@pytest.mark.parametrize("dim", [48, 32])
def test_transformer_head_builds_and_steps(dim):
    c = tiny.config(overrides={**XFORMER, "head.decoder_dim": dim})
    model = _build(c)
    names = {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(model))}
    assert "decoder/blocks/0/attn/qkv_kernel" in names and "decoder/blocks/1/attn/qkv_kernel" not in names
    assert ("decoder_embed/kernel" in names) == (dim != 32)        # a projection only between widths
    assert model.head.kernel[...].shape == (dim, 108) and model.norm.scale[...].shape == (dim,)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names_ = var.get_metadata().get("out_sharding")
        assert names_ is not None and len(names_) == var[...].ndim, path
    losses, _ = _train(c, 6)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_mae_parameters_carry_logical_axis_names_and_decoder_widths():
    model = _build(tiny.config(overrides=MAE))
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for path, var in flat.items():
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var[...].ndim, (path, names)
    assert flat["decoder_embed/kernel"][...].shape == (32, 24)
    assert flat["pos_embed"][...].shape == (1, 17, 24) and flat["mask_token"][...].shape == (1, 1, 24)
    assert flat["decoder/blocks/0/attn/qkv_kernel"].get_metadata()["out_sharding"] == ("embed", None, "heads", "kv")
    assert flat["head/kernel"][...].shape == (24, 108)


def test_bfloat16_mae_forward_is_close_to_float32():
    c = tiny.config(overrides=MAE)
    f32 = _build(c)
    c.model.dtype = "bfloat16"
    bf16 = _build(c)
    gd, _ = nnx.split(bf16)
    bf16 = nnx.merge(gd, nnx.state(f32))                            # same float32 parameters
    keep, _ = mae.random_mask(jax.random.key(0), 4, 16, 0.75)
    a, b = (np.asarray(nnx.jit(lambda m: m(_images(4), keep)["pred_BxNxK"])(m)) for m in (f32, bf16))
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, a, atol=0.1 * np.abs(a).max())
    assert np.abs(b - a).max() > 0                                    # it did run in bfloat16


def test_validation_names_the_mae_and_head_keys():
    c = tiny.config("pretrain", "mvit", overrides={"mae.enabled": True, "input.dataset": "video_demo"})
    with pytest.raises(ValueError, match=r"config\.mae\.enabled"):
        config_lib.validate(c, 8)
    for key, value, match in [("mae.mask_ratio", 1.0, r"config\.mae\.mask_ratio"),
                              ("mae.mask_ratio", 0.99, r"config\.mae\.mask_ratio"),   # keeps 0 of 16
                              ("mae.decoder_heads", 5, r"config\.mae\.decoder_heads")]:
        c = tiny.config(overrides={**MAE, "input.dataset": "synthetic", key: value})
        with pytest.raises(ValueError, match=match):
            config_lib.validate(c, 8)
    c = tiny.config(overrides={**MAE, "input.dataset": "synthetic", "evals.figures_every_steps": 10})
    with pytest.raises(ValueError, match=r"config\.mae\.enabled"):
        config_lib.validate(c, 8)
    c = tiny.config(overrides={"head.type": "mlp", "input.dataset": "synthetic"})
    with pytest.raises(ValueError, match=r"config\.head\.type"):
        config_lib.validate(c, 8)
    for ok in (MAE, XFORMER):
        config_lib.validate(tiny.config(overrides={**ok, "input.dataset": "synthetic"}), 8)


@pytest.mark.parametrize("mesh_fsdp", [1, 2])
def test_mae_trains_through_the_trainer_on_a_sharded_mesh(mesh_fsdp):
    """``train.setup``'s sharded state and jitted step (8 devices; FSDP over 2: the decoder's
    parameters are split along their logical names) run the MAE step."""
    from maskfeat_jax import sharding, train
    c = tiny.config(overrides={**MAE, "mesh.fsdp": mesh_fsdp, "mae.decoder_heads": 2})
    mesh = sharding.make_mesh(c.mesh, jax.devices())
    s = train.setup(c, mesh, steps_per_epoch=10, total_steps=100)
    assert isinstance(s.model, mae.MAE)
    state = s.init()
    if mesh_fsdp == 2:
        assert "fsdp" in str(state.params["decoder_embed"]["kernel"].sharding.spec)
    with jax.set_mesh(mesh):
        gb = sharding.global_batch(mesh, _batch())
        step = train.jit_step(s, mesh, gb)
        state, m = step(state, gb)
    assert np.isfinite(float(m["train/loss"])) and float(m["train/mask_ratio"]) == 0.75
