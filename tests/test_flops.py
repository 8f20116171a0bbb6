"""Analytic FLOPs against a hand count and the compiler, the start-up summary's model figures, and
MAE runs' bookkeeping: FLOPs of the encoder on the kept patches plus the decoder, and no block
masks drawn by the input pipeline (the step draws MAE's mask on device)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from maskfeat_jax import config as config_lib, models, perf, steps
from maskfeat_jax.data import image_maps, masking, pipeline

import tiny


def _abstract(task, variant, classes=1000):
    c = config_lib.base_config()
    c.task, c.model.variant, c.model.num_classes = task, variant, classes
    return c, models.build_abstract(c)


def test_vit_b16_forward_flops_match_a_hand_count():
    # multiply-adds of one 224x224 image through ViT-B/16, layer by layer
    n, d, mlp, depth = 197, 768, 3072, 12
    patch_embed = 196 * (16 * 16 * 3) * d
    per_block = n * d * 3 * d + n * n * d + n * n * d + n * d * d + n * d * mlp + n * mlp * d
    head = d * 1000                          # the classifier on the pooled vector
    hand_macs = patch_embed + depth * per_block + head
    assert hand_macs / 1e9 == pytest.approx(17.58, abs=0.02)     # the usual "17.6 GMACs" of ViT-B/16
    c, model = _abstract("finetune", "B/16")
    assert perf.model_flops_per_image(model, c) / 3 / 2 == pytest.approx(hand_macs, rel=0.05)


def test_vit_b16_classifier_has_86_6_million_parameters():
    _, model = _abstract("finetune", "B/16")
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))
    assert n == pytest.approx(86.6e6, rel=0.01)


# ---- MAE: the encoder on the kept patches, the decoder on every token

# demo/16 (width 128, depth 6) at 64 px: 16 patches, 4 kept at 0.75; wide enough that matmuls
# dominate XLA's count
MAE = {"model.variant": "demo/16", "input.image_size": 64, "mae.enabled": True, "mae.decoder_dim": 64,
       "mae.decoder_depth": 2, "mae.decoder_heads": 2}


def _model(c):
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: models.build(c, nnx.Rngs(0), "cpu"))


def _xla_forward_flops(model, *args) -> float:
    """XLA's count for the jitted forward of ``model(*args)`` on a batch of 2, per image."""
    graphdef, state = nnx.split(model)
    cost = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a)["pred_BxNxK"]).lower(state, *args).cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]) / 2


def test_mae_flops_count_the_kept_patches_and_the_decoder_as_the_compiler_does():
    c = tiny.config(overrides=MAE)
    model = _model(c)
    kept = 4
    xla = _xla_forward_flops(model, jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32),
                             jax.ShapeDtypeStruct((2, kept), jnp.int32))
    analytic = perf.forward_flops_per_image(model, c)
    assert analytic == pytest.approx(xla, rel=0.05), (analytic, xla)
    dense, _ = perf.encoder_flops(model.encoder)           # what was counted before: every patch
    assert dense > 2 * xla
    # training: 3 forwards less the pixel gradient of the kept patches' embedding
    embed = 2.0 * kept * 16 * 16 * 3 * 128
    assert perf.model_flops_per_image(model, c) == pytest.approx(3 * analytic - embed)
    with pytest.raises(ValueError, match="config.mae.mask_ratio"):
        perf.model_flops_per_image(model)


def test_transformer_head_flops_match_the_compiler():
    c = tiny.config(overrides={"model.variant": "demo/16", "input.image_size": 64, "head.type": "transformer",
                               "head.decoder_dim": 256, "head.decoder_depth": 2, "head.decoder_heads": 2})
    model = _model(c)
    xla = _xla_forward_flops(model, jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32),
                             jax.ShapeDtypeStruct((2, 16), jnp.bool_))
    analytic = perf.forward_flops_per_image(model, c)
    assert analytic == pytest.approx(xla, rel=0.05), (analytic, xla)
    assert perf.forward_flops_per_image(_model(tiny.config(overrides={"model.variant": "demo/16",
                                                                      "input.image_size": 64}))) < 0.8 * xla


# ---- MAE: no block masks from the input pipeline

def test_image_pipeline_draws_no_block_mask_under_mae(monkeypatch):
    element = {"image": np.full((40, 40, 3), 128, np.uint8), "label": 3}
    c = tiny.config(overrides={"input.image_size": 64})
    dense = pipeline.TrainMap(c, (4, 4)).random_map(element, np.random.default_rng(0))
    assert dense["mask"].any()                                      # the block mask of the dense path

    def no_draw(*a, **k):
        raise AssertionError("a block mask was drawn for an MAE run")

    monkeypatch.setattr(masking, "block_mask", no_draw)
    monkeypatch.setattr(image_maps.masking, "block_mask", no_draw)
    c.mae.enabled = True
    out = pipeline.TrainMap(c, (4, 4)).random_map(element, np.random.default_rng(0))
    assert out.keys() == dense.keys()                               # the batch keeps its structure
    assert out["mask"].shape == dense["mask"].shape and out["mask"].dtype == np.bool_ and not out["mask"].any()
    np.testing.assert_array_equal(out["image"], dense["image"])    # the same crop and flip draws


def _step_reads(c, key: str) -> bool:
    """Whether the pre-training step's traced program uses the batch entry ``key``."""
    graphdef, st = nnx.split(_model(c))                             # shapes only: the step is traced
    params, tx = nnx.to_pure_dict(st), optax.identity()
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             nonfinite=jnp.zeros((), jnp.int32))
    b, n = 2, (c.input.image_size // 16) ** 2
    s = c.input.image_size
    batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8), "mask": jax.ShapeDtypeStruct((b, n), bool),
             "valid": jax.ShapeDtypeStruct((b,), bool), "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
    step = steps.make_pretrain_step(graphdef, tx, lambda _: 0.0, c, patch=16)
    closed = jax.make_jaxpr(step)(state, batch)
    leaves = jax.tree_util.tree_flatten_with_path((state, batch))[0]
    index = [i for i, (path, _) in enumerate(leaves) if jax.tree_util.keystr(path) == f"[1]['{key}']"]
    var = closed.jaxpr.invars[index[0]]
    return any(var in eqn.invars for eqn in closed.jaxpr.eqns) or var in closed.jaxpr.outvars


def test_mae_step_never_reads_the_batch_mask():
    c = tiny.config(overrides={"input.image_size": 64})
    assert _step_reads(c, "mask")                                   # the dense path does
    c.mae.enabled, c.mae.decoder_dim, c.mae.decoder_depth, c.mae.decoder_heads = True, 16, 1, 2
    assert not _step_reads(c, "mask")
    assert _step_reads(c, "valid")


def test_each_head_of_several_depths_is_counted():
    one, two = (_model(tiny.config(overrides={"head.depths": d})) for d in ((-1,), (0, -1)))
    n, width = 4, one.encoder.size.width                          # mu/16 at 32 px: 2 x 2 patches
    extra = 2.0 * n * width * 108                                 # one more LayerNorm + Linear to 108 HOG features
    assert perf.forward_flops_per_image(two) == pytest.approx(perf.forward_flops_per_image(one) + extra)
