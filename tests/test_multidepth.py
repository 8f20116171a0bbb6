"""Multi-depth prediction heads (``config.head.depths``, official ``MASK.PRETRAIN_DEPTH``): the
default keeps today's model and step, several depths give one head each, their losses summed."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskfeat_jax import config as config_lib, convert, export, models, official_names, saved as saved_lib
from maskfeat_jax.models import mvit
import tiny
from references import MASK, VALID, init_model, old_pretrain_step, run_step, step_config


def _paths(p):
    return sorted(jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(p))


def test_the_last_block_alone_keeps_todays_model_and_step_bit_identical(pt_batch):
    """(1,) names the last of ViT-mu's 2 blocks, as the default (-1,) does: the same parameters
    (``norm``, ``head``) and the step of the HOG-only code before depths existed, bit for bit."""
    batch = pt_batch[0]
    c = step_config()
    assert tuple(c.head.depths) == (-1,) and models.head_depths(c) == (1,)
    c.head.depths = (1,)
    graphdef, params = init_model(c)
    assert _paths(params) == _paths(init_model(step_config())[1])
    assert "norms" not in params and params["head"]["kernel"].shape == (32, 108)
    new_grads, m = run_step(c, graphdef, params, batch)
    old_grads, m_old = run_step(c, graphdef, params, batch, step_fn=old_pretrain_step)
    assert m["train/loss"] == m_old["train/loss"] and "train/loss_block1" not in m
    jax.tree.map(np.testing.assert_array_equal, new_grads, old_grads)


def test_two_depths_give_two_heads_whose_losses_are_summed(pt_batch):
    """(0, -1): a LayerNorm + Linear on each block's output, each predicting HOG; the step's loss
    is the sum of the two heads' masked MSEs (float64, from a block-by-block forward)."""
    batch, norm, hog_ref = pt_batch
    c = step_config()
    c.head.depths = (0, -1)
    graphdef, params = init_model(c)
    assert "head" not in params and "norm" not in params
    assert [h["kernel"].shape for h in params["heads"].values()] == [(32, 108)] * 2
    grads, m = run_step(c, graphdef, params, batch)

    model = nnx.merge(graphdef, params)
    enc = model.encoder
    x = enc.embed(jnp.asarray(norm), jnp.asarray(MASK))
    w = MASK & VALID[:, None]
    want = []
    for i, blk in enumerate(enc.blocks):
        x = blk(x)
        pred = np.asarray(model.heads[i](model.norms[i](x)[:, 1:]), np.float64)
        want.append((((pred - hog_ref) ** 2).mean(-1) * w).sum() / w.sum())
        np.testing.assert_allclose(m[f"train/loss_block{i}"], want[i], rtol=1e-5)
    np.testing.assert_allclose(m["train/loss"], want[0] + want[1], rtol=1e-5)
    np.testing.assert_allclose(m["train/loss_hog"], want[0] + want[1], rtol=1e-5)
    assert abs(want[0] - want[1]) > 1e-3 * want[1]              # the heads are told apart
    for i in (0, 1):                                            # each head learns from its own loss
        assert np.abs(grads["heads"][i]["kernel"]).max() > 0
    out = model(jnp.asarray(norm), jnp.asarray(MASK))
    assert len(out["pred_BxNxK_by_depth"]) == 2 and out["pred_BxNxK"] is out["pred_BxNxK_by_depth"][-1]


def test_new_head_parameters_carry_logical_axis_names():
    c = step_config()
    c.head.depths = (0, 1)
    abstract = models.build_abstract(c)
    assert abstract.heads[0].kernel.get_metadata()["out_sharding"] == ("embed", "classes")
    assert abstract.norms[1].scale.get_metadata()["out_sharding"] == ("embed",)


# MViTv2-mu (stages 1, 1, 1, 1): q-pooling in blocks 1 and 2; in pre-training block 3 keeps the
# grid, so blocks 2 and 3 output the prediction grid (stride 16), blocks 0 and 1 finer ones
MVIT_MU = {"model.name": "mvit", "model.variant": "mu", "input.dataset": "video_demo", "input.image_size": 64,
           "video.num_frames": 4}


@pytest.mark.parametrize("overrides,match", [
    ({"head.depths": (0,)}, r"config\.head\.depths=\(0,\): .*the last block"),
    ({"head.depths": (0, 0, 1)}, r"config\.head\.depths=\(0, 0, 1\): each block at most once"),
    ({"head.depths": (1, -1)}, r"config\.head\.depths=\(1, -1\): each block at most once"),
    ({"head.depths": (2,)}, r"config\.head\.depths=\(2,\): the ViT 'mu/16' has blocks 0\.\.1"),
    ({"head.depths": ()}, r"config\.head\.depths=\(\): expected a non-empty tuple"),
    ({"head.depths": (0, -1), "mae.enabled": True}, r"config\.head\.depths=\(0, -1\): several heads"),
    ({"head.depths": (0, -1), "head.type": "transformer", "head.decoder_dim": 32, "head.decoder_heads": 2},
     r"config\.head\.depths=\(0, -1\): several heads"),
    ({"head.depths": (1, -1), **MVIT_MU}, r"config\.head\.depths=\(1, -1\): block 1 of the MViTv2 'mu' outputs "
                                          r"a finer token grid \(stride 8 px\) than the prediction grid \(stride 16 "
                                          r"px, blocks 2\.\.3\)"),
    ({"head.depths": (0, 2, 3), **MVIT_MU}, r"config\.head\.depths=\(0, 2, 3\): block 0 of .* finer token grid"),
    ({"head.depths": (4,), **MVIT_MU}, r"config\.head\.depths=\(4,\): the MViTv2 'mu' has blocks 0\.\.3"),
    ({"head.depths": (0, -1)}, None),
    ({"head.depths": (2, -1), **MVIT_MU}, None),
])
def test_bad_depths_are_named_in_validation(overrides, match):
    c = step_config()
    c.input.dataset, c.model.num_classes = "digits", 1000
    for key, value in overrides.items():
        group, leaf = key.split(".")
        c[group][leaf] = value
    if match is None:
        config_lib.validate(c, num_devices=8)
        return
    with pytest.raises(ValueError, match=match):
        config_lib.validate(c, num_devices=8)


def test_resuming_with_another_number_of_heads_is_refused_naming_the_key():
    saved = step_config().to_dict()
    del saved["head"]["depths"]                     # a config saved before the key existed
    c = step_config()
    c.head.depths = (0, -1)
    diffs = config_lib.shape_differences(saved, c)
    assert len(diffs) == 1 and diffs[0].startswith("head.depths: saved (-1,), now (0, -1)")
    same = step_config()
    same.head.depths = (1,)                         # the last block by its index: the same single head
    assert config_lib.shape_differences(saved, same) == []


def _mvit_config(depths):
    return tiny.config("pretrain", "mvit", overrides={"head.depths": depths})


def test_mvit_heads_have_their_blocks_widths():
    """MViTv2-S (stages 1, 2, 11, 2): blocks 3..15 are on the prediction grid; stage 3's blocks
    output 384 wide except its last (13, whose MLP doubles the width to 768), like stage 4's."""
    c = _mvit_config((3, 13, -1))
    c.model.variant = "S"
    assert models.head_depths(c) == (3, 13, 15)
    model = models.build_abstract(c, "cpu")
    assert [h.kernel.shape for h in model.heads] == [(384, 108), (768, 108), (768, 108)]
    assert [n.scale.shape for n in model.norms] == [(384,), (768,), (768,)]
    assert model.encoder.block_widths == tuple(cfg[1] for cfg in mvit.block_configs(mvit.PRESETS["S"], True))


def test_mvit_default_head_keeps_its_parameters():
    """(-1,) and the last block by its index (3) build the same single head as before depths."""
    one, last = (init_model(_mvit_config(d))[1] for d in ((-1,), (3,)))
    assert _paths(one) == _paths(last) and "norms" not in one and one["head"]["kernel"].shape == (128, 108)
    jax.tree.map(np.testing.assert_array_equal, one, last)


def test_mvit_two_depths_on_the_prediction_grid_give_two_heads_on_their_blocks():
    """MViTv2-mu, (2, -1): a head on each of the two blocks that output the prediction grid, each
    equal to LayerNorm + Linear on that block's output in a block-by-block forward. (The step's
    sum over the heads' losses is the model-independent code the ViT test above checks; an MViT
    train step's compile would add ~40 s here.)"""
    c = _mvit_config((2, -1))
    graphdef, params = init_model(c)
    assert "head" not in params and "norm" not in params
    assert [h["kernel"].shape for h in params["heads"].values()] == [(128, 108)] * 2
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.normal(size=(4, 4, 64, 64, 3)).astype(np.float32))
    mask = jnp.asarray(rng.random((4, 2 * 4 * 4)) < 0.5)

    @jax.jit      # one program each (MViT's ops one by one would each compile on their own)
    def reference(params, images, mask):
        model = nnx.merge(graphdef, params)
        x, preds = model.encoder.embed(images, mask), []
        for i, blk in enumerate(model.encoder.blocks):             # block by block, a head after 2 and 3
            x = blk(x)
            if i in (2, 3):
                k = (2, 3).index(i)
                preds.append(model.heads[k](model.norms[k](x)[:, 1:]))
        return preds

    got = jax.jit(lambda p, x, m: nnx.merge(graphdef, p)(x, m)["pred_BxNxK_by_depth"])(params, images, mask)
    want = reference(params, images, mask)
    assert len(got) == 2 and got[0].shape == (4, 32, 108)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(want[0]) - np.asarray(want[1])).max() > 1e-2      # the heads are told apart


@pytest.mark.parametrize("family,depths", [("vit", (0, -1)), ("mvit", (2, -1))])
def test_multi_depth_heads_round_trip_through_the_official_names(family, depths):
    """Our ``norms/i`` and ``heads/i`` are ``MSSeparateHead``'s ``transforms.i.0`` and
    ``projections.i`` (i over the sorted depths); converting the export back gives the arrays."""
    c = _mvit_config(depths) if family == "mvit" else tiny.config(overrides={"head.depths": depths})
    model = models.build_abstract(c, "cpu")
    shapes = {k: v.shape for k, v in saved_lib.flat_params(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}
    assert {"norms/1/scale", "heads/1/kernel"} <= set(shapes) and "head/kernel" not in shapes
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    sd = export.to_official(params, family, "pretrain")
    width = 128 if family == "mvit" else 32
    for i in (0, 1):
        assert sd[f"pred_head.transforms.{i}.0.weight"].shape == (width,)
        assert sd[f"pred_head.transforms.{i}.0.bias"].shape == (width,)
        assert sd[f"pred_head.projections.{i}.weight"].shape == (108, width)
        assert sd[f"pred_head.projections.{i}.bias"].shape == (108,)
    np.testing.assert_array_equal(sd["pred_head.projections.1.weight"], params["heads/1/kernel"].T)
    np.testing.assert_array_equal(sd["pred_head.transforms.0.0.weight"], params["norms/0/scale"])
    assert not any(k.startswith(("pred_head.transforms.2", "pred_head.projections.2")) for k in sd)
    back = convert.convert_state_dict(sd, shapes, family, "pretrain")
    assert set(back) == set(params)
    for k, x in params.items():
        np.testing.assert_array_equal(back[k], x)


def test_a_multi_depth_checkpoint_for_a_single_head_config_is_named_with_a_hint():
    """An official checkpoint with two heads against the single-head config: the extra head is
    listed with the key to set."""
    two = models.build_abstract(tiny.config(overrides={"head.depths": (0, -1)}), "cpu")
    one = models.build_abstract(tiny.config(), "cpu")
    flat = [saved_lib.flat_params(nnx.to_pure_dict(nnx.state(m, nnx.Param))) for m in (two, one)]
    sd = export.to_official({k: np.zeros(v.shape, np.float32) for k, v in flat[0].items()}, "vit", "pretrain")
    with pytest.raises(official_names.ConversionError,
                       match=r"pred_head\.projections\.1\.bias \(108,\)  <- a multi-depth head .*config\.head\.depths"):
        convert.convert_state_dict(sd, {k: v.shape for k, v in flat[1].items()}, "vit", "pretrain")
