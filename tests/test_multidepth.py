"""Multi-depth prediction heads (``config.head.depths``, official ``MASK.PRETRAIN_DEPTH``): the
default keeps today's model and step, several depths give one head each, their losses summed."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskfeat_jax import config as config_lib, models
from test_steps import MASK, VALID, _config, pt_batch  # noqa: F401 - pt_batch is a fixture
from test_targets import _model, _old_pretrain_step, _run


def _paths(p):
    return sorted(jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(p))


def test_the_last_block_alone_keeps_todays_model_and_step_bit_identical(pt_batch):  # noqa: F811
    """(1,) names the last of ViT-mu's 2 blocks, as the default (-1,) does: the same parameters
    (``norm``, ``head``) and the step of the HOG-only code before depths existed, bit for bit."""
    batch = pt_batch[0]
    c = _config()
    assert tuple(c.head.depths) == (-1,) and models.head_depths(c) == (1,)
    c.head.depths = (1,)
    graphdef, params = _model(c)
    assert _paths(params) == _paths(_model(_config())[1])
    assert "norms" not in params and params["head"]["kernel"].shape == (32, 108)
    new_grads, m = _run(c, graphdef, params, batch)
    old_grads, m_old = _run(c, graphdef, params, batch, step_fn=_old_pretrain_step)
    assert m["train/loss"] == m_old["train/loss"] and "train/loss_block1" not in m
    jax.tree.map(np.testing.assert_array_equal, new_grads, old_grads)


def test_two_depths_give_two_heads_whose_losses_are_summed(pt_batch):  # noqa: F811
    """(0, -1): a LayerNorm + Linear on each block's output, each predicting HOG; the step's loss
    is the sum of the two heads' masked MSEs (float64, from a block-by-block forward)."""
    batch, norm, hog_ref = pt_batch
    c = _config()
    c.head.depths = (0, -1)
    graphdef, params = _model(c)
    assert "head" not in params and "norm" not in params
    assert [h["kernel"].shape for h in params["heads"].values()] == [(32, 108)] * 2
    grads, m = _run(c, graphdef, params, batch)

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
    c = _config()
    c.head.depths = (0, 1)
    abstract = models.build_abstract(c)
    assert abstract.heads[0].kernel.get_metadata()["out_sharding"] == ("embed", "classes")
    assert abstract.norms[1].scale.get_metadata()["out_sharding"] == ("embed",)


@pytest.mark.parametrize("overrides,match", [
    ({"head.depths": (0,)}, r"config\.head\.depths=\(0,\): .*the last block"),
    ({"head.depths": (0, 0, 1)}, r"config\.head\.depths=\(0, 0, 1\): each block at most once"),
    ({"head.depths": (1, -1)}, r"config\.head\.depths=\(1, -1\): each block at most once"),
    ({"head.depths": (2,)}, r"config\.head\.depths=\(2,\): the ViT 'mu/16' has blocks 0\.\.1"),
    ({"head.depths": ()}, r"config\.head\.depths=\(\): expected a non-empty tuple"),
    ({"head.depths": (0, -1), "mae.enabled": True}, r"config\.head\.depths=\(0, -1\): several heads"),
    ({"head.depths": (0, -1), "head.type": "transformer", "head.decoder_dim": 32, "head.decoder_heads": 2},
     r"config\.head\.depths=\(0, -1\): several heads"),
    ({"head.depths": (0, -1), "model.name": "mvit", "model.variant": "mu", "input.dataset": "video_demo",
      "input.image_size": 64, "video.num_frames": 4}, r"config\.head\.depths=\(0, -1\): .*ViT only"),
    ({"head.depths": (0, -1)}, None),
])
def test_bad_depths_are_named_in_validation(overrides, match):
    c = _config()
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
    saved = _config().to_dict()
    del saved["head"]["depths"]                     # a config saved before the key existed
    c = _config()
    c.head.depths = (0, -1)
    diffs = config_lib.shape_differences(saved, c)
    assert len(diffs) == 1 and diffs[0].startswith("head.depths: saved (-1,), now (0, -1)")
    same = _config()
    same.head.depths = (1,)                         # the last block by its index: the same single head
    assert config_lib.shape_differences(saved, same) == []
