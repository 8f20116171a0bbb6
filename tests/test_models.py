"""ViT, MaskFeat and classifier models: exact parameter counts, mask token, init, names."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskfeat_jax import config as config_lib, models
from maskfeat_jax.models import heads, vit


def _config(task="pretrain", variant="mu/16", size=32, classes=10):
    c = config_lib.base_config()
    c.task, c.model.variant, c.input.image_size, c.model.num_classes = task, variant, size, classes
    return c




def _count(model):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))


@pytest.mark.parametrize("task,variant,expected", [
    ("pretrain", "B/16", 85_882_476), ("pretrain", "L/16", 303_413_356),
    ("finetune", "B/16", 86_567_656), ("finetune", "L/16", 304_326_632)])
def test_parameter_counts_match_official_models(task, variant, expected):
    assert _count(models.build_abstract(_config(task, variant, 224, 1000))) == expected


def _build(c, seed=0):
    with nnx.use_eager_sharding(False):
        return models.build(c, nnx.Rngs(seed))


def test_every_parameter_has_logical_axis_names():
    model = _build(_config())
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var[...].ndim, (path, names)


def test_mask_token_replaces_masked_patches_before_position_embedding():
    model = _build(_config())
    enc = model.encoder
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    mask = jnp.array([[True, False, False, True], [False, False, False, False]])
    x = enc.embed(images, mask)
    pos = enc.pos_embed[...][0]
    tokens = x - pos                                   # undo the position embedding
    np.testing.assert_allclose(tokens[0, 1], enc.mask_token[...][0, 0], atol=1e-6)
    np.testing.assert_allclose(tokens[0, 4], enc.mask_token[...][0, 0], atol=1e-6)
    np.testing.assert_allclose(tokens[:, 0], jnp.broadcast_to(enc.cls_token[...][0, 0], (2, 32)), atol=1e-6)
    unmasked = enc.embed(images, jnp.zeros_like(mask))
    np.testing.assert_allclose(x[0, 2], unmasked[0, 2], atol=1e-6)   # visible patch unchanged
    assert not np.allclose(x[0, 1], unmasked[0, 1])


def test_pretrain_forward_shapes_and_head_sees_only_patches():
    model = _build(_config())
    out = model(jnp.zeros((3, 32, 32, 3)), jnp.zeros((3, 4), bool))
    assert out["pred_BxNxK"].shape == (3, 4, 108)
    assert out["tokens_BxNxD"].shape == (3, 5, 32)


def test_classifier_head_is_scaled_and_pools_patch_tokens():
    model = _build(_config("finetune"))
    assert float(jnp.abs(model.head.kernel[...]).max()) < 0.02 * 0.001 * 6
    np.testing.assert_allclose(model.head.bias[...], 0.02 * 0.001, rtol=1e-6)
    out = model(jnp.ones((2, 32, 32, 3)))
    assert out["logits_BxC"].shape == (2, 10)
    pooled = model.fc_norm(out["tokens_BxNxD"][:, 1:].mean(1))
    np.testing.assert_allclose(out["pooled_BxD"], pooled, atol=1e-5)


def test_initialisation_follows_official_backbone():
    model = _build(_config(variant="B/16", size=32))
    blk = model.encoder.blocks[0]
    np.testing.assert_allclose(blk.norm1.bias[...], 0.02)
    np.testing.assert_allclose(blk.attn.qkv_bias[...], 0.02)
    np.testing.assert_allclose(model.head.bias[...], 0.0)       # MaskFeat head: bias 0, LN 1/0
    np.testing.assert_allclose(model.norm.bias[...], 0.0)
    std = float(jnp.std(blk.mlp.fc1.kernel[...]))
    assert 0.019 < std < 0.021


def test_drop_path_is_deterministic_without_rng_and_active_with_it():
    c = _config()
    c.model.drop_path = 0.5
    model = _build(c)
    x, m = jnp.ones((4, 32, 32, 3)), jnp.zeros((4, 4), bool)
    a, b = model(x, m)["pred_BxNxK"], model(x, m)["pred_BxNxK"]
    np.testing.assert_array_equal(a, b)
    d = model(x, m, rng=jax.random.key(0))["pred_BxNxK"]
    assert not np.allclose(a, d)


@pytest.mark.parametrize("impl", ["xla", "einsum"])
def test_attention_implementations_agree(impl):
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 5, 3, 8)) for i in range(3))
    ref = jnp.einsum("bhqk,bkhd->bqhd",
                     jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8), -1), v)
    np.testing.assert_allclose(models.layers.attention(q, k, v, impl), ref, atol=1e-5)


def _plain_attention(q, k, v):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)


@pytest.mark.parametrize("dtype,tol,logit_scale", [
    (jnp.float32, 2e-5, 1.0), (jnp.float32, 2e-5, 30.0), (jnp.bfloat16, 0.05, 1.0)])
def test_einsum_attention_matches_plain_softmax_attention_in_value_and_gradient(dtype, tol, logit_scale):
    """The 'einsum' path's own backward (``layers.softmax_attention``) against autodiff of the
    textbook formula in float32 on the same (rounded) inputs, including logits large enough to
    overflow exp without the max shift."""
    q, k, v, g = (jax.random.normal(jax.random.key(i), (2, 7, 3, 8)) for i in range(4))
    q, k, v = (x.astype(dtype).astype(jnp.float32) for x in (q * logit_scale, k, v))
    run = lambda q, k, v: models.layers.attention(   # noqa: E731
        q.astype(dtype), k.astype(dtype), v.astype(dtype), "einsum").astype(jnp.float32)
    out, vjp = jax.vjp(run, q, k, v)
    ref, vjp_ref = jax.vjp(_plain_attention, q, k, v)
    np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)
    for a, b in zip(vjp(g), vjp_ref(g)):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, atol=tol * float(jnp.abs(b).max()), rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 0.03)])
def test_flat_attention_projections_match_the_einsum_projections(monkeypatch, dtype, tol):
    """The CPU layout of the qkv / output projections (2-D matmuls on reshaped kernels) against
    the 4-D einsums used elsewhere: same values and gradients, parameters unchanged."""
    with nnx.use_eager_sharding(False):
        attn = vit.Attention(16, 2, rngs=nnx.Rngs(0), dtype=dtype, impl="einsum")
    gd, st = nnx.split(attn)
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    g = jax.random.normal(jax.random.key(2), (2, 5, 16))
    results = []
    for flat in (True, False):
        monkeypatch.setattr(vit, "flat_projections", lambda flat=flat: flat)
        out, vjp = jax.vjp(lambda s, x: nnx.merge(gd, s)(x).astype(jnp.float32), st, x)
        results.append((out, jax.tree.leaves(vjp(g))))
    (out_flat, g_flat), (out_ein, g_ein) = results
    np.testing.assert_allclose(out_flat, out_ein, rtol=tol, atol=tol)
    for a, b in zip(g_flat, g_ein):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(jnp.abs(b).max()))


def test_flat_projections_only_where_the_heads_are_not_split():
    """2-D projections on CPU, but the 4-D einsums under a mesh that splits the heads ('tensor')."""
    from maskfeat_jax import config as config_lib, sharding
    assert vit.flat_projections()
    c = config_lib.base_config()
    for mesh_cfg, flat in [((8, 1, 1), True), ((1, 4, 2), False)]:
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_cfg
        with jax.set_mesh(sharding.make_mesh(c.mesh)):
            assert vit.flat_projections() is flat, mesh_cfg


def test_remat_policies_give_the_same_gradients():
    c = _config()
    x, m = jax.random.normal(jax.random.key(0), (2, 32, 32, 3)), jnp.ones((2, 4), bool)
    grads = []
    for remat in ("none", "full", "dots_saveable"):
        c.model.remat = remat
        model = _build(c)
        gd, st = nnx.split(model)
        g = jax.grad(lambda s: nnx.merge(gd, s)(x, m)["pred_BxNxK"].sum())(st)
        grads.append(jax.tree.leaves(g))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_variant_and_image_size_name_the_key():
    with pytest.raises(ValueError, match="config.model.variant"):
        vit.parse_variant("X/16")
    with pytest.raises(ValueError, match="image_size"):
        _build(_config(size=40))


def test_bfloat16_compute_keeps_float32_parameters():
    c = _config()
    c.model.dtype = "bfloat16"
    model = _build(c)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model)))
    out = model(jnp.ones((2, 32, 32, 3)), jnp.zeros((2, 4), bool))
    assert out["pred_BxNxK"].dtype == jnp.float32
    assert isinstance(model, heads.MaskFeat)


def test_trainer_init_gives_the_parameters_of_a_default_compile():
    """``train.setup``'s init compiles with ``train.INIT_COMPILER_OPTIONS`` (a lower XLA CPU
    optimisation level); the parameters must be bit-identical to the model built with the
    config's seed and compiled at XLA's default level, 3 (level 0 would change them)."""
    from maskfeat_jax import sharding, train
    c = _config()
    c.seed, c.input.global_batch_size = 3, 8
    mesh = sharding.make_mesh(c.mesh)
    got = train.setup(c, mesh, 10, 10).init().params
    with jax.set_mesh(mesh), sharding.rules():
        lowered = jax.jit(lambda: nnx.to_pure_dict(nnx.state(models.build(c, nnx.Rngs(3))))).lower()
        want = lowered.compile(compiler_options={"xla_backend_optimization_level": 3})()   # XLA's default
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
