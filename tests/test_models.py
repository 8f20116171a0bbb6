"""ViT, MaskFeat and classifier models: exact parameter counts, mask token, init, names; the
whole forward against a float64 numpy reference; drop path, remat and bfloat16 against float32."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskfeat_jax import models, platform
from maskfeat_jax.models import cpu_kernels, heads, vit

import tiny


def _config(task="pretrain", overrides=None):
    """The tiny ViT, with the batch these model-only tests always had (base_config's; no model reads it)."""
    return tiny.config(task, overrides={"input.global_batch_size": 2048, **(overrides or {})})


def _count(model):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))


@pytest.mark.parametrize("task,variant,expected", [
    ("pretrain", "B/16", 85_882_476), ("pretrain", "L/16", 303_413_356),
    ("finetune", "B/16", 86_567_656), ("finetune", "L/16", 304_326_632)])
def test_parameter_counts_match_official_models(task, variant, expected):
    assert _count(models.build_abstract(
        _config(task, {"model.variant": variant, "input.image_size": 224, "model.num_classes": 1000}))) == expected


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
    pos = enc.pos_embed[...]
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
    model = _build(_config(overrides={"model.variant": "B/16"}))
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


def _choice(impl, n, padded=None):
    return platform.Attention(impl, n, padded or n, "test")


@pytest.mark.parametrize("impl,padded", [("xla", 5), ("einsum", 5), ("xla", 6), ("xla", 8)])
def test_attention_implementations_agree(impl, padded):
    """Every form, and XLA's on a token axis padded as the cuDNN path pads it (masked through
    ``key_value_seq_lengths``), gives plain softmax attention, values and gradients."""
    q, k, v, g = (jax.random.normal(jax.random.key(i), (2, 5, 3, 8)) for i in range(4))
    out, vjp = jax.vjp(lambda q, k, v: models.layers.attention(q, k, v, _choice(impl, 5, padded)), q, k, v)
    ref, vjp_ref = jax.vjp(_plain_attention, q, k, v)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for a, b in zip(vjp(g), vjp_ref(g)):
        np.testing.assert_allclose(a, b, atol=1e-5)


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
        q.astype(dtype), k.astype(dtype), v.astype(dtype), _choice("einsum", 7)).astype(jnp.float32)
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
        attn = vit.Attention(16, 2, rngs=nnx.Rngs(0), dtype=dtype, choice=_choice("einsum", 5),
                             kernels=cpu_kernels.CPU)
    gd, st = nnx.split(attn)
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    g = jax.random.normal(jax.random.key(2), (2, 5, 16))
    results = []
    for flat in (True, False):
        monkeypatch.setattr(cpu_kernels, "flat_projections", lambda flat=flat: flat)
        out, vjp = jax.vjp(lambda s, x: nnx.merge(gd, s)(x).astype(jnp.float32), st, x)
        results.append((out, jax.tree.leaves(vjp(g))))
    (out_flat, g_flat), (out_ein, g_ein) = results
    np.testing.assert_allclose(out_flat, out_ein, rtol=tol, atol=tol)
    for a, b in zip(g_flat, g_ein):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(jnp.abs(b).max()))


def test_flat_projections_only_where_the_heads_are_not_split():
    """2-D projections on CPU, but the 4-D einsums under a mesh that splits the heads ('tensor')."""
    from maskfeat_jax import config as config_lib, sharding
    assert cpu_kernels.for_platform("cpu") is cpu_kernels.CPU and cpu_kernels.flat_projections()
    assert cpu_kernels.for_platform("gpu") is cpu_kernels.for_platform("tpu") is cpu_kernels.PLAIN
    c = config_lib.base_config()
    for mesh_cfg, flat in [((8, 1, 1), True), ((1, 4, 2), False)]:
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_cfg
        with jax.set_mesh(sharding.make_mesh(c.mesh)):
            assert cpu_kernels.flat_projections() is flat, mesh_cfg


@pytest.mark.parametrize("drop_path,with_rng", [(0.0, False), (0.5, True)], ids=["no_rng", "drop_path_rng"])
def test_remat_policies_give_the_same_gradients(drop_path, with_rng):
    """Same loss and gradients under every remat policy; with drop path and an rng too (a
    rematerialised block must see the same per-block key as the plain one)."""
    c = _config()
    c.model.drop_path = drop_path
    x, m = jax.random.normal(jax.random.key(0), (4, 32, 32, 3)), jnp.ones((4, 4), bool)
    rng = jax.random.key(7) if with_rng else None
    results = []
    for remat in ("none", "full", "dots_saveable"):
        c.model.remat = remat
        model = _build(c)
        gd, st = nnx.split(model)
        loss = lambda s, rng: nnx.merge(gd, s)(x, m, rng=rng)["pred_BxNxK"].sum()   # noqa: E731
        value, g = jax.value_and_grad(loss)(st, rng)
        results.append((value, jax.tree.leaves(g)))
        if with_rng and remat == "none":             # drop path is active with this key
            assert not np.allclose(value, loss(st, None), rtol=1e-3)
    for value, grads in results[1:]:
        np.testing.assert_allclose(value, results[0][0], rtol=1e-5)
        for a, b in zip(results[0][1], grads):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_variant_and_image_size_name_the_key():
    with pytest.raises(ValueError, match="config.model.variant"):
        vit.parse_variant("X/16")
    with pytest.raises(ValueError, match="image_size"):
        _build(_config(overrides={"input.image_size": 40}))


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


# ---------------------------------------------------------------- drop path

def test_drop_path_zeroes_or_rescales_whole_examples():
    """Per example, the branch is either exactly 0 or x / (1 - rate) (so its mean is x), with
    about (1 - rate) of the examples kept; identity without an rng or at rate 0."""
    rate = 0.3
    x = jax.random.uniform(jax.random.key(0), (512, 3, 4), minval=0.5, maxval=2.0)   # no zeros in x
    y = np.asarray(models.layers.drop_path(x, rate, jax.random.key(1)))
    dropped = (y == 0).all(axis=(1, 2))
    kept = ~dropped
    assert (y[dropped] == 0).all() and (y[kept] != 0).all()            # whole examples, never parts
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / np.float32(1 - rate), rtol=1e-6)
    assert abs(kept.mean() - (1 - rate)) < 4 * math.sqrt(rate * (1 - rate) / len(kept))
    np.testing.assert_array_equal(models.layers.drop_path(x, rate, None), x)
    np.testing.assert_array_equal(models.layers.drop_path(x, 0.0, jax.random.key(1)), x)


# ---------------------------------------------------------------- whole forward: numpy reference

def _randomised(model, seed, std=0.3):
    """Every parameter plus N(0, std) noise. At init both LayerNorms of a block hold the same
    values (and every bias 0.02), so a block that used the wrong one would go unseen."""
    gd, st = nnx.split(model)
    rng = np.random.default_rng(seed)
    st = jax.tree.map(lambda a: jnp.asarray(a + rng.normal(0, std, a.shape).astype(np.float32)), st)
    return nnx.merge(gd, st)


def _np_params(model):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _np_layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _np_dense(x, p):
    return x @ p["kernel"] + p["bias"]


_np_erf = np.vectorize(math.erf)


def _np_vit_block(x, p, heads):
    """Pre-norm block: x + Attn(LN1 x), then x + Mlp(LN2 x). Attention head by head: q, k, v
    from the (D, 3, heads, hd) projection, softmax(q k^T / sqrt hd) v, output projection summed
    over heads; exact (erf) GELU."""
    a, hd = p["attn"], x.shape[-1] // heads
    h = _np_layer_norm(x, p["norm1"])
    y = np.broadcast_to(a["proj_bias"], x.shape).copy()
    for n in range(heads):
        q, k, v = (h @ a["qkv_kernel"][:, i, n] + a["qkv_bias"][i, n] for i in range(3))
        logits = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        y += (probs / probs.sum(-1, keepdims=True)) @ v @ a["proj_kernel"][n]
    x = x + y
    h = _np_dense(_np_layer_norm(x, p["norm2"]), p["mlp"]["fc1"])
    return x + _np_dense(0.5 * h * (1 + _np_erf(h / math.sqrt(2))), p["mlp"]["fc2"])


def _np_vit(p, images, mask, patch, heads):
    """Encoder tokens (cls first). Patch embedding as the conv it is (kernel = stride = patch,
    cross-correlation, kernel (kh, kw, c_in, D)), one patch at a time in row-major order; masked
    patches replaced by the mask token; cls prepended; the position table added to all."""
    b, hh, ww, _ = images.shape
    gh, gw, width = hh // patch, ww // patch, p["patch_kernel"].shape[-1]
    tokens = np.zeros((b, gh * gw, width))
    for i, j in itertools.product(range(gh), range(gw)):
        window = images[:, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch]
        tokens[:, i * gw + j] = np.einsum("bhwc,hwcd->bd", window, p["patch_kernel"]) + p["patch_bias"]
    if mask is not None:
        tokens = np.where(mask[..., None], p["mask_token"][0], tokens)
    x = np.concatenate([np.broadcast_to(p["cls_token"][0], (b, 1, width)), tokens], 1) + p["pos_embed"]
    for i in range(len(p["blocks"])):
        x = _np_vit_block(x, p["blocks"][i], heads)
    return x


def _assert_close(got, want, tol=1e-4):
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=tol * float(np.abs(want).max()))


@pytest.mark.parametrize("attention", ["auto", "xla"])
def test_vit_pretrain_forward_matches_numpy_reference(attention):
    """MaskFeat ViT (mu/16 on 32x32: 2x2 patches, 2 blocks, 2 heads; random parameters) against
    float64 numpy: encoder tokens, then the head on the patch tokens (LayerNorm + Linear to the
    108 HOG dims; no other final norm, spec 7.2), with a mask."""
    c = _config()
    c.model.attention = attention
    model = _randomised(_build(c), seed=1)
    images = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
    mask = np.array([[True, False, False, True], [False, True, True, True]])
    out = nnx.jit(lambda m, x, k: m(x, k))(model, jnp.asarray(images), jnp.asarray(mask))
    p = _np_params(model)
    tokens = _np_vit(p["encoder"], images.astype(np.float64), mask, 16, 2)
    _assert_close(out["tokens_BxNxD"], tokens)
    _assert_close(out["pred_BxNxK"], _np_dense(_np_layer_norm(tokens, p["norm"])[:, 1:], p["head"]))


def test_vit_classifier_forward_matches_numpy_reference():
    """Fine-tuning ViT (mu/16, random parameters) against float64 numpy: encoder, mean of the
    patch tokens (cls excluded), fc_norm LayerNorm, Linear."""
    model = _randomised(_build(_config("finetune")), seed=3)
    images = np.random.default_rng(4).normal(size=(3, 32, 32, 3)).astype(np.float32)
    out = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images))
    p = _np_params(model)
    tokens = _np_vit(p["encoder"], images.astype(np.float64), None, 16, 2)
    _assert_close(out["tokens_BxNxD"], tokens)
    _assert_close(out["logits_BxC"], _np_dense(_np_layer_norm(tokens[:, 1:].mean(1), p["fc_norm"]), p["head"]))


# ---------------------------------------------------------------- bfloat16 against float32

def _relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_bfloat16_forward_is_close_to_float32(task):
    """The bfloat16-compute model, with the same (float32, randomised) parameters as the float32
    one, gives its outputs to bfloat16 accuracy (measured below 1e-2 relative; bound 5e-2)."""
    c = _config(task)
    f32 = _randomised(_build(c), seed=4)
    c.model.dtype = "bfloat16"
    gd, _ = nnx.split(_build(c))
    bf16 = nnx.merge(gd, nnx.state(f32))
    x = jax.random.normal(jax.random.key(5), (2, 32, 32, 3))
    args = (x, jnp.array([[True, False, False, True], [False, True, True, False]])) if task == "pretrain" else (x,)
    key = "pred_BxNxK" if task == "pretrain" else "logits_BxC"
    forward = nnx.jit(lambda m, *a: m(*a))
    want, got = forward(f32, *args), forward(bf16, *args)
    assert got[key].dtype == jnp.float32 and got["tokens_BxNxD"].dtype == jnp.bfloat16
    for name in (key, "tokens_BxNxD"):
        err = _relative_error(got[name], want[name])
        assert err < 5e-2, (name, err)
