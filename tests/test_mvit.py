"""MViTv2: exact parameter counts, token grids per stage, pooling attention and relative
positions against loop-level numpy references, the whole tiny model against numpy (patch
embedding conv, blocks, heads), mask-token placement, names, init, remat and bfloat16."""
import functools
import itertools
import math
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskfeat_jax.models import cpu_kernels, heads, layers, mvit, pooling_attention as pa

VIDEO = jax.ShapeDtypeStruct((1, 16, 224, 224, 3), jnp.float32)


@functools.lru_cache(maxsize=None)
def _abstract(variant, pretrain):
    """The official PT model (MaskFeat head, 108 HOG dims) or FT classifier (400 classes)."""
    def build():
        enc = mvit.MViT(variant=variant, pretrain=pretrain, mask_token=pretrain, rngs=nnx.Rngs(0))
        if pretrain:
            return heads.MaskFeat(enc, enc.size.width, 108, rngs=nnx.Rngs(1))
        return heads.Classifier(enc, enc.size.width, 400, rngs=nnx.Rngs(1))
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(build)


def _count(model):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _apply_shapes(model, *args):
    gd, st = nnx.split(model)
    return jax.eval_shape(lambda s, *a: nnx.merge(gd, s)(*a), st, *args)


def test_presets_match_official_configs():
    expect = {"S": (16, 96, 1, (1, 3, 14)), "B": (24, 96, 1, (2, 5, 21)), "L": (48, 144, 2, (2, 8, 44))}
    for name, (depth, width, heads_, starts) in expect.items():
        size = mvit.PRESETS[name]
        assert (size.depth, size.embed_dim, size.heads, size.stage_starts) == (depth, width, heads_, starts)
        assert size.width == 8 * width
    cfg = mvit.block_configs(mvit.PRESETS["S"], pretrain=False)
    assert cfg[0] == (96, 192, 1, (1, 1, 1), (1, 8, 8)) and cfg[2] == (192, 384, 2, (1, 1, 1), (1, 4, 4))
    assert cfg[3] == (384, 384, 4, (1, 2, 2), (1, 2, 2)) and cfg[13][:2] == (384, 768)
    assert cfg[14] == (768, 768, 8, (1, 2, 2), (1, 1, 1))
    assert mvit.block_configs(mvit.PRESETS["S"], pretrain=True)[14] == (768, 768, 8, (1, 1, 1), (1, 2, 2))


@pytest.mark.parametrize("variant,pretrain,expected", [
    ("S", False, 36_475_120), ("L", False, 217_578_064),
    ("S", True, 36_253_356), ("L", True, 217_247_580)])
def test_parameter_counts_match_official_models(variant, pretrain, expected):
    assert _count(_abstract(variant, pretrain)) == expected


@pytest.mark.parametrize("variant,pretrain", [("S", True), ("S", False), ("L", True), ("L", False)])
def test_token_grids_widths_and_strides_per_stage(variant, pretrain):
    model = _abstract(variant, pretrain)
    enc = model.encoder
    last = (8, 14, 14) if pretrain else (8, 7, 7)
    grids = [(8, 56, 56), (8, 28, 28), (8, 14, 14), last]
    assert list(enc.stage_grids) == grids and enc.grid == last and enc.patch_grid == (8, 56, 56)
    assert enc.mask_grid == (8, 14, 14) and enc.patch == 16 and enc.patch_stride == (2, 4, 4)
    c0, h0 = (96, 1) if variant == "S" else (144, 2)
    out = _apply_shapes(enc, VIDEO)
    for s, (g, end) in enumerate(zip(grids, enc.stage_ends)):
        width_out = c0 * 2 ** min(s + 1, 3)              # the stage's last MLP doubles the width
        assert out[f"stage{s + 1}_BxNxD"].shape == (1, 1 + int(np.prod(g)), width_out)
        blk = enc.blocks[end]
        assert blk.attn.qkv_kernel.shape[2] == h0 * 2 ** s   # heads double per stage
    assert out["tokens_BxNxD"].shape == (1, 1 + int(np.prod(last)), enc.size.width)
    kv = [blk.attn.kv_stride for blk in enc.blocks]
    starts = enc.size.stage_starts
    assert kv[0] == (1, 8, 8) and kv[starts[0]] == (1, 4, 4) and kv[starts[1]] == (1, 2, 2)
    assert kv[-1] == ((1, 2, 2) if pretrain else (1, 1, 1))
    q = [blk.q_stride for blk in enc.blocks]
    assert [i for i, s in enumerate(q) if s != (1, 1, 1)] == list(starts if not pretrain else starts[:2])
    b0 = enc.blocks[0].attn                              # 56 // 1 vs 56 // 8, T = 8
    assert b0.rel_pos_h.shape == (111, c0 // h0) and b0.rel_pos_t.shape == (15, c0 // h0)
    assert enc.blocks[-1].attn.rel_pos_w.shape[0] == (27 if pretrain else 13)


def test_pretrain_and_finetune_heads_see_the_right_grid():
    pred = _apply_shapes(_abstract("S", True), VIDEO, jax.ShapeDtypeStruct((1, 1568), jnp.bool_))
    assert pred["pred_BxNxK"].shape == (1, 1568, 108)
    logits = _apply_shapes(_abstract("S", False), VIDEO)
    assert logits["logits_BxC"].shape == (1, 400)


def test_every_parameter_has_logical_axis_names():
    for pretrain in (True, False):
        for path, var in nnx.to_flat_state(nnx.state(_abstract("S", pretrain), nnx.Param)):
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == len(var.shape), (path, names)


# ---------------------------------------------------------------- numpy references

def _np_dist(q_len, k_len):
    q_ratio, k_ratio = max(k_len / q_len, 1.0), max(q_len / k_len, 1.0)
    return lambda i, j: int(i * q_ratio - j * k_ratio + (k_len - 1) * k_ratio)


def _np_interp(table, new_len):
    old, out = table.shape[0], np.zeros((new_len,) + table.shape[1:])
    for i in range(new_len):
        x = max((i + 0.5) * old / new_len - 0.5, 0.0)
        i0 = min(int(np.floor(x)), old - 1)
        i1, lam = min(i0 + 1, old - 1), x - i0
        out[i] = (1 - lam) * table[i0] + lam * table[i1]
    return out


def _np_rel_bias(q, q_thw, k_thw, rh, rw, rt):
    """q: (B, Nq, heads, D) without cls; bias (B, heads, Nq, Nk), one entry at a time."""
    rh, rw = _np_interp(rh, 2 * max(q_thw[1], k_thw[1]) - 1), _np_interp(rw, 2 * max(q_thw[2], k_thw[2]) - 1)
    rt = _np_interp(rt, 2 * max(q_thw[0], k_thw[0]) - 1)
    dists = [_np_dist(a, b) for a, b in zip(q_thw, k_thw)]
    qpos, kpos = list(itertools.product(*map(range, q_thw))), list(itertools.product(*map(range, k_thw)))
    b, _, nh, _ = q.shape
    out = np.zeros((b, nh, len(qpos), len(kpos)))
    for bb, n, (i, (t, h, w)), (j, (t2, h2, w2)) in itertools.product(
            range(b), range(nh), enumerate(qpos), enumerate(kpos)):
        r = rt[dists[0](t, t2)] + rh[dists[1](h, h2)] + rw[dists[2](w, w2)]
        out[bb, n, i, j] = q[bb, i, n] @ r
    return out


@pytest.mark.parametrize("q_thw,k_thw,lens", [
    ((2, 4, 4), (2, 2, 2), (3, 7, 7)),          # k pooled more than q (kv stride 2)
    ((2, 2, 3), (3, 4, 2), (5, 7, 5)),          # mismatch both ways, in t, h and w
    ((2, 4, 4), (2, 1, 1), (4, 5, 9)),          # tables of other lengths: interpolated
])
def test_decomposed_rel_pos_matches_loop_reference(q_thw, k_thw, lens):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, int(np.prod(q_thw)), 2, 5)).astype(np.float32)
    rt, rh, rw = (rng.normal(size=(n, 5)).astype(np.float32) for n in lens)
    got = pa.decomposed_rel_pos(jnp.asarray(q), q_thw, k_thw, *map(jnp.asarray, (rh, rw, rt)))
    np.testing.assert_allclose(got, _np_rel_bias(q, q_thw, k_thw, rh, rw, rt), rtol=1e-5, atol=1e-5)


def test_rel_pos_index_stretches_by_size_ratio():
    np.testing.assert_array_equal(pa.rel_pos_index(2, 4), [[3, 2, 1, 0], [5, 4, 3, 2]])
    np.testing.assert_array_equal(pa.rel_pos_index(4, 2), [[2, 0], [3, 1], [4, 2], [5, 3]])
    np.testing.assert_array_equal(pa.rel_pos_index(3, 3), [[2, 1, 0], [3, 2, 1], [4, 3, 2]])


def test_interpolate_rel_pos_is_torch_linear():
    ramp = np.arange(3, dtype=np.float32)[:, None] * np.array([[1.0, -2.0]], np.float32)
    np.testing.assert_allclose(mvit.interpolate_rel_pos(ramp, 5)[:, 0], [0.0, 0.4, 1.0, 1.6, 2.0], atol=1e-6)
    np.testing.assert_allclose(mvit.interpolate_rel_pos(ramp, 5)[:, 1], [0, -0.8, -2, -3.2, -4], atol=1e-6)
    ramp5 = np.arange(5, dtype=np.float32)[:, None]
    np.testing.assert_allclose(mvit.interpolate_rel_pos(ramp5, 3)[:, 0], [1 / 3, 2.0, 11 / 3], atol=1e-5)
    table = np.random.default_rng(1).normal(size=(13, 4)).astype(np.float32)
    assert mvit.interpolate_rel_pos(table, 13) is table
    got = mvit.interpolate_rel_pos(jnp.asarray(table), 27)
    assert got.shape == (27, 4)
    np.testing.assert_allclose(got, _np_interp(table, 27), atol=1e-6)


def _np_ln(x, scale, bias):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * scale + bias


def _np_pool(x, kernel, thw, stride, op="conv"):
    """Loop conv (per-channel kernel) or max pool over non-cls tokens; x (B, N, ...)."""
    cls, x = x[:, :1], x[:, 1:]
    x = x.reshape(x.shape[0], *thw, *x.shape[2:])
    k = kernel.shape[:3] if op == "conv" else tuple(s + 1 if s > 1 else s for s in stride)
    pads = [kk // 2 for kk in k]
    out_thw = [(s + 2 * p - kk) // st + 1 for s, p, kk, st in zip(thw, pads, k, stride)]
    fill = 0.0 if op == "conv" else -np.inf
    xp = np.pad(x, [(0, 0)] + [(p, p) for p in pads] + [(0, 0)] * (x.ndim - 4), constant_values=fill)
    out = np.full((x.shape[0], *out_thw, *x.shape[4:]), 0.0 if op == "conv" else -np.inf)
    for t, h, w in itertools.product(*map(range, out_thw)):
        for a, b, c in itertools.product(*map(range, k)):
            v = xp[:, t * stride[0] + a, h * stride[1] + b, w * stride[2] + c]
            acc = out[:, t, h, w]
            out[:, t, h, w] = acc + v * kernel[a, b, c] if op == "conv" else np.maximum(acc, v)
    return np.concatenate([cls, out.reshape(x.shape[0], -1, *x.shape[4:])], 1), tuple(out_thw)


def _np_attention(attn, x):
    names = ("qkv_kernel", "qkv_bias", "pool_q", "pool_k", "pool_v", "rel_pos_h", "rel_pos_w", "rel_pos_t",
             "proj_kernel", "proj_bias")
    p = {n: np.asarray(getattr(attn, n)[...], np.float64) for n in names}
    norms = {n: getattr(attn, n) for n in ("norm_q", "norm_k", "norm_v")}
    qkv = np.einsum("bnd,dthk->tbnhk", x, p["qkv_kernel"]) + p["qkv_bias"][:, None, None]
    pooled = []
    for t, (kernel, norm, stride) in enumerate([(p["pool_q"], "norm_q", attn.q_stride),
                                                (p["pool_k"], "norm_k", attn.kv_stride),
                                                (p["pool_v"], "norm_v", attn.kv_stride)]):
        y, thw = _np_pool(qkv[t], kernel, attn.thw, stride)
        pooled.append((_np_ln(y, np.asarray(norms[norm].scale[...]), np.asarray(norms[norm].bias[...])), thw))
    (q, q_thw), (k, k_thw), (v, _) = pooled
    logits = np.einsum("bqhd,bkhd->bhqk", q / np.sqrt(q.shape[-1]), k)
    logits[:, :, 1:, 1:] += _np_rel_bias(q[:, 1:], q_thw, k_thw, p["rel_pos_h"], p["rel_pos_w"],
                                         p["rel_pos_t"])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    out = np.einsum("bhqk,bkhd->bqhd", probs / probs.sum(-1, keepdims=True), v)
    out[:, 1:] += q[:, 1:]
    return np.einsum("bnhk,hkd->bnd", out, p["proj_kernel"]) + p["proj_bias"]


def _block(dim, dim_out, heads, thw, q_stride, kv_stride, seed=0):
    with nnx.use_eager_sharding(False):
        return mvit.MultiScaleBlock(dim, dim_out, heads, thw, q_stride, kv_stride, (3, 3, 3), 0.0,
                                    rel_pos_temporal=True, rngs=nnx.Rngs(seed), dtype=jnp.float32,
                                    impl="auto", kernels=cpu_kernels.CPU)


def _randomise(module, seed):
    gd, st = nnx.split(module)
    rng = np.random.default_rng(seed)
    st = jax.tree.map(lambda a: jnp.asarray(a + rng.normal(0, 0.3, a.shape).astype(np.float32)), st)
    return nnx.merge(gd, st)


def _np_ln_of(module, x):
    return _np_ln(x, np.asarray(module.scale[...], np.float64), np.asarray(module.bias[...], np.float64))


def _np_dense(module, x):
    return x @ np.asarray(module.kernel[...], np.float64) + np.asarray(module.bias[...], np.float64)


def _np_block(blk, x):
    """MultiScaleBlock: max-pooled skip (kernel s + 1 where the q stride s > 1) + Attn(LN1 x);
    then Linear(LN2 x) as the residual where the width changes (else x) + Mlp(LN2 x)."""
    y = _np_pool(x, None, blk.thw, blk.q_stride, op="max")[0] + _np_attention(blk.attn, _np_ln_of(blk.norm1, x))
    yn = _np_ln_of(blk.norm2, y)
    h = _np_dense(blk.mlp.fc1, yn)
    h = 0.5 * h * (1 + np.vectorize(math.erf)(h / np.sqrt(2)))     # exact GELU
    return (y if blk.proj is None else _np_dense(blk.proj, yn)) + _np_dense(blk.mlp.fc2, h)


def test_block_matches_loop_reference_at_a_stage_transition():
    """q stride (1,2,2) (skip max-pool), kv stride 2, width 8 -> 16 (proj of LN2 x), 2 heads."""
    blk = _randomise(_block(8, 16, 2, (2, 4, 4), (1, 2, 2), (1, 2, 2)), seed=1)
    x = np.random.default_rng(2).normal(size=(2, 1 + 32, 8)).astype(np.float32)
    got = nnx.jit(lambda b, x: b(x))(blk, jnp.asarray(x))
    assert blk.proj is not None
    ref = _np_block(blk, x.astype(np.float64))
    assert got.shape == (2, 1 + 8, 16) and blk.out_thw == (2, 2, 2)
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4)


def test_attention_matches_loop_reference_without_q_stride():
    """Stage-1-like block: q stride 1, kv stride (1,4,4), so q and k sizes differ (4 vs 1)."""
    blk = _randomise(_block(8, 8, 1, (2, 4, 4), (1, 1, 1), (1, 4, 4)), seed=3)
    x = np.random.default_rng(4).normal(size=(1, 1 + 32, 8)).astype(np.float32)
    got = nnx.jit(lambda a, x: a(x))(blk.attn, jnp.asarray(x))
    np.testing.assert_allclose(got, _np_attention(blk.attn, x.astype(np.float64)), rtol=2e-4, atol=2e-4)


def test_initialisation_follows_official_backbone():
    blk = _block(16, 32, 1, (2, 4, 4), (1, 1, 1), (1, 2, 2))
    for ln in (blk.norm1, blk.norm2, blk.attn.norm_q, blk.attn.norm_k, blk.attn.norm_v):
        np.testing.assert_allclose(ln.scale[...], 1.0)
        np.testing.assert_allclose(ln.bias[...], 0.02)
    for bias in (blk.attn.qkv_bias, blk.attn.proj_bias, blk.proj.bias, blk.mlp.fc1.bias):
        np.testing.assert_allclose(bias[...], 0.02)
    for w in (blk.attn.qkv_kernel, blk.mlp.fc1.kernel, blk.attn.rel_pos_h, blk.attn.pool_q):
        assert 0.012 < float(jnp.std(w[...])) < 0.028 and abs(float(jnp.mean(w[...]))) < 0.01
    bias = layers.symmetric_uniform(441 ** -0.5)(jax.random.key(0), (4096,))
    assert -(441 ** -0.5) <= float(bias.min()) < -0.04 and 0.04 < float(bias.max()) < 441 ** -0.5


def test_max_pool_matches_loop_reference():
    x = np.random.default_rng(5).normal(size=(2, 3, 5, 6, 4)).astype(np.float32)
    got = pa.max_pool(jnp.asarray(x), (1, 2, 2))
    ref, thw = _np_pool(np.concatenate([np.zeros((2, 1, 4)), x.reshape(2, -1, 4)], 1), None, (3, 5, 6),
                        (1, 2, 2), op="max")
    assert got.shape[1:4] == thw == (3, 3, 3)
    np.testing.assert_allclose(got.reshape(2, -1, 4), ref[:, 1:], rtol=1e-6)


def test_mask_upsampling_is_nearest_over_space():
    m = np.random.default_rng(6).random((3, 2 * 2 * 3)) < 0.5
    got = mvit.upsample_mask(jnp.asarray(m), (2, 2, 3), (2, 8, 12))
    ref = m.reshape(3, 2, 2, 3).repeat(4, 2).repeat(4, 3).reshape(3, -1)
    np.testing.assert_array_equal(got, ref)
    with pytest.raises(ValueError, match="mask grid"):
        mvit.upsample_mask(jnp.asarray(m), (2, 3, 3), (2, 8, 12))


# ---------------------------------------------------------------- tiny model end to end

@functools.lru_cache(maxsize=None)
def _mu(num_frames=4, drop_path=0.5, remat="none"):
    """A tiny model with random parameters (abstract build, then numpy values: no init compiles)."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: mvit.MViT(variant="mu", num_frames=num_frames, image_size=32,
                                                 mask_token=True, drop_path=drop_path, remat=remat,
                                                 rngs=nnx.Rngs(0)))
    gd, st = nnx.split(model)
    rng = np.random.default_rng(0)
    st = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape).astype(np.float32)), st)
    return nnx.merge(gd, st)


_forward = nnx.jit(lambda m, x, mask, rng: m(x, mask, rng=rng)["tokens_BxNxD"])


def test_mu_forward_with_and_without_mask_and_mask_token_placement():
    model = _mu()
    assert model.grid == (2, 2, 2) and model.mask_grid == (2, 2, 2) and model.patch_grid == (2, 8, 8)
    x = jax.random.normal(jax.random.key(0), (2, 4, 32, 32, 3))
    mask = np.zeros((2, 8), bool)
    mask[0, [1, 6]] = True
    plain = _forward(model, x, None, None)
    masked = _forward(model, x, jnp.asarray(mask), None)
    assert plain.shape == masked.shape == (2, 1 + 8, 128) and np.isfinite(masked).all()
    np.testing.assert_allclose(masked[1], plain[1], atol=1e-5)      # nothing masked in sample 1
    assert not np.allclose(masked[0], plain[0], atol=1e-3)
    np.testing.assert_allclose(_forward(model, x, jnp.zeros((2, 8), bool), None), plain, atol=1e-5)

    emb, emb_plain = model.embed(x, jnp.asarray(mask)), model.embed(x)
    up = np.asarray(mvit.upsample_mask(jnp.asarray(mask), (2, 2, 2), (2, 8, 8)))
    assert up.sum() == 2 * 16
    tok = np.asarray(model.mask_token[...][0, 0])
    np.testing.assert_allclose(emb[:, 1:][up], np.broadcast_to(tok, (32, 16)), atol=1e-6)
    np.testing.assert_allclose(emb[:, 1:][~up], emb_plain[:, 1:][~up], atol=1e-6)
    np.testing.assert_allclose(emb[:, 0], np.broadcast_to(model.cls_token[...][0, 0], (2, 16)), atol=1e-6)
    assert not np.allclose(emb[:, 1:][up], emb_plain[:, 1:][up])


def test_drop_path_is_deterministic_without_rng_and_active_with_it():
    model = _mu()
    x = jax.random.normal(jax.random.key(1), (2, 4, 32, 32, 3))
    a, b = _forward(model, x, None, None), _forward(model, x, None, None)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, _forward(model, x, None, jax.random.key(3)), atol=1e-4)
    assert model.blocks[0].drop_path == 0.0 and model.blocks[-1].drop_path == 0.5


def test_images_run_as_one_frame_with_2d_kernels():
    model = _mu(num_frames=None)
    assert model.patch_kernel.shape[:3] == (1, 7, 7) and model.blocks[0].attn.rel_pos_t is None
    assert model.grid == (1, 2, 2) and model.patch_stride == (1, 4, 4)
    out = _apply_shapes(model, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32),
                        jax.ShapeDtypeStruct((2, 4), jnp.bool_))
    assert out["tokens_BxNxD"].shape == (2, 5, 128)


def test_remat_and_bad_inputs():
    out = _apply_shapes(_mu(remat="full"), jax.ShapeDtypeStruct((2, 4, 32, 32, 3), jnp.float32))
    assert out["tokens_BxNxD"].shape == (2, 9, 128)
    with pytest.raises(ValueError, match="token grid"):
        _apply_shapes(_mu(), jax.ShapeDtypeStruct((2, 8, 32, 32, 3), jnp.float32))
    with pytest.raises(ValueError, match="config.model.variant"):
        mvit.parse_variant("XL")
    with pytest.raises(ValueError, match="mask_token=False"):
        with nnx.use_eager_sharding(False):
            enc = nnx.eval_shape(lambda: mvit.MViT(variant="mu", num_frames=4, image_size=32,
                                                   rngs=nnx.Rngs(0)))
        _apply_shapes(enc, jax.ShapeDtypeStruct((2, 4, 32, 32, 3), jnp.float32),
                      jax.ShapeDtypeStruct((2, 8), jnp.bool_))


# ---------------------------------------------------------------- tiny model against numpy, remat, bfloat16

@functools.lru_cache(maxsize=None)
def _mu_model(pretrain=True, dtype="float32"):
    """The tiny MaskFeat model (108 HOG dims) or classifier (10 classes) on 4x32x32 clips, with
    random parameters: N(0, 0.3), LayerNorm scales 1 + N(0, 0.3) (so attention is far from
    uniform); the same values for either compute dtype."""
    def build():
        enc = mvit.MViT(variant="mu", num_frames=4, image_size=32, pretrain=pretrain, mask_token=pretrain,
                        dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))
        if pretrain:
            return heads.MaskFeat(enc, enc.size.width, 108, rngs=nnx.Rngs(1))
        return heads.Classifier(enc, enc.size.width, 10, rngs=nnx.Rngs(1))
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(build)
    gd, st = nnx.split(model)
    rng = np.random.default_rng(8)
    is_scale = lambda path: any(getattr(k, "key", None) == "scale" for k in path)   # noqa: E731
    st = jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(is_scale(path) + rng.normal(0, 0.3, s.shape), jnp.float32), st)
    return nnx.merge(gd, st)


def _np_conv3d(x, kernel, stride, pad):
    """PyTorch Conv3d (cross-correlation, zero padding ``pad``), one output position at a time:
    x (B, T, H, W, C_in), kernel (kt, kh, kw, C_in, C_out)."""
    k = kernel.shape[:3]
    xp = np.pad(x, [(0, 0)] + [(p, p) for p in pad] + [(0, 0)])
    out_thw = [(s + 2 * p - kk) // st + 1 for s, p, kk, st in zip(x.shape[1:4], pad, k, stride)]
    out = np.zeros((x.shape[0], *out_thw, kernel.shape[-1]))
    for t, h, w in itertools.product(*map(range, out_thw)):
        window = xp[:, t * stride[0]:t * stride[0] + k[0], h * stride[1]:h * stride[1] + k[1],
                    w * stride[2]:w * stride[2] + k[2]]
        out[:, t, h, w] = np.einsum("bthwc,thwcd->bd", window, kernel)
    return out


def _np_mvit_tokens(enc, videos, mask):
    """Encoder tokens: Conv3d patch embedding (kernel 3x7x7, stride 2x4x4, padding 1x3x3, spec
    section 3) + bias; each mask cell (one 16x16 patch of the 2x2x2 mask grid) replaces its 4x4
    patch tokens by the mask token; cls prepended, no position table; the blocks."""
    kernel = np.asarray(enc.patch_kernel[...], np.float64)
    assert kernel.shape == (3, 7, 7, 3, 16)
    x = _np_conv3d(videos, kernel, (2, 4, 4), (1, 3, 3)) + np.asarray(enc.patch_bias[...], np.float64)
    b, d = x.shape[0], x.shape[-1]
    assert x.shape[1:4] == (2, 8, 8)
    x = x.reshape(b, -1, d)
    if mask is not None:
        up = mask.reshape(b, 2, 2, 2).repeat(4, axis=2).repeat(4, axis=3).reshape(b, -1)
        x = np.where(up[..., None], np.asarray(enc.mask_token[...], np.float64)[0], x)
    x = np.concatenate([np.broadcast_to(np.asarray(enc.cls_token[...], np.float64)[0], (b, 1, d)), x], 1)
    for blk in enc.blocks:
        x = _np_block(blk, x)
    return x


def test_mu_pretrain_forward_matches_numpy_reference():
    """Tiny MaskFeat MViTv2 (4 one-block stages: q strides 1, 2, 2, 1; widths 16 -> 128) with a
    mask against float64 numpy: patch embedding conv, mask token, the four blocks, then the head
    on the patch tokens (LayerNorm + Linear to 108)."""
    model = _mu_model(pretrain=True)
    videos = np.random.default_rng(9).normal(size=(2, 4, 32, 32, 3)).astype(np.float32)
    mask = np.zeros((2, 8), bool)
    mask[0, [0, 3, 5]] = mask[1, [6]] = True
    out = nnx.jit(lambda m, x, k: m(x, k))(model, jnp.asarray(videos), jnp.asarray(mask))
    tokens = _np_mvit_tokens(model.encoder, videos.astype(np.float64), mask)
    pred = _np_dense(model.head, _np_ln_of(model.norm, tokens)[:, 1:])
    assert tokens.shape == (2, 1 + 8, 128) and pred.shape == out["pred_BxNxK"].shape == (2, 8, 108)
    for got, want in ((out["tokens_BxNxD"], tokens), (out["pred_BxNxK"], pred)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_mu_classifier_forward_matches_numpy_reference():
    """Tiny fine-tuning MViTv2 (last stage strided to 2x1x1) against float64 numpy: encoder,
    mean of the patch tokens, fc_norm LayerNorm, Linear."""
    model = _mu_model(pretrain=False)
    videos = np.random.default_rng(10).normal(size=(2, 4, 32, 32, 3)).astype(np.float32)
    out = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(videos))
    tokens = _np_mvit_tokens(model.encoder, videos.astype(np.float64), None)
    logits = _np_dense(model.head, _np_ln_of(model.fc_norm, tokens[:, 1:].mean(1)))
    assert tokens.shape == (2, 1 + 2, 128) and out["logits_BxC"].shape == (2, 10)
    for got, want in ((out["tokens_BxNxD"], tokens), (out["logits_BxC"], logits)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


@functools.lru_cache(maxsize=None)
def _two_block_loss_and_grads(remat):
    """(loss with one key, loss with another, gradient leaves) of a two-block MViTv2 (stages of one block
    each: width 16 -> 32 in the first block's MLP, 2 heads in the second; drop path 0.5) on 2x32x32
    clips. Two blocks rather than ``mu``'s four: XLA CPU compiles ``mu``'s gradient in ~15 s."""
    with mock.patch.dict(mvit.PRESETS, {"two": mvit.MViTSize(16, 1, (1, 1))}), nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: mvit.MViT(variant="two", num_frames=2, image_size=32, drop_path=0.5,
                                                 remat=remat, rngs=nnx.Rngs(0)))
    assert len(model.blocks) == 2 and model.blocks[-1].drop_path == 0.5
    gd, st = nnx.split(model)
    rng = np.random.default_rng(0)
    st = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape).astype(np.float32)), st)
    x = jax.random.normal(jax.random.key(4), (4, 2, 32, 32, 3))
    w = jax.random.normal(jax.random.key(5), (4, 1 + 64, 32))
    loss = jax.jit(jax.value_and_grad(lambda s, rng: (nnx.merge(gd, s)(x, rng=rng)["tokens_BxNxD"] * w).sum()))
    value, grads = loss(st, jax.random.key(6))
    named = {jax.tree_util.keystr(k): g for k, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    return value, loss(st, jax.random.key(7))[0], named


@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_policies_give_the_same_gradients_with_drop_path(remat):
    """Loss and gradients with drop path and an rng equal those without remat: the
    rematerialised blocks compute the same values and see the same keys. The key norm's bias
    adds one vector to every key of a query, which the softmax ignores: its gradient is zero,
    and with remat or without it is rounding noise far below the other gradients."""
    want_value, other_key_value, want = _two_block_loss_and_grads("none")
    assert not np.allclose(want_value, other_key_value, rtol=1e-3)   # drop path is active
    value, _, grads = _two_block_loss_and_grads(remat)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    assert grads.keys() == want.keys()
    scale = max(float(jnp.abs(g).max()) for g in want.values())
    for name, b in want.items():
        if "['norm_k']['bias']" in name:
            assert float(jnp.abs(grads[name]).max()) < 1e-6 * scale and float(jnp.abs(b).max()) < 1e-6 * scale, name
        else:
            np.testing.assert_allclose(grads[name], b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()), err_msg=name)


def test_bfloat16_forward_is_close_to_float32():
    """bfloat16 compute, float32 parameters (the same values): outputs within 5e-2 relative of the
    float32 model's (bfloat16 rounding gives about 1e-2), predictions still float32."""
    f32, bf16 = _mu_model(True, "float32"), _mu_model(True, "bfloat16")
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nnx.state(bf16)))
    for a, b in zip(jax.tree.leaves(nnx.state(f32)), jax.tree.leaves(nnx.state(bf16))):
        np.testing.assert_array_equal(a, b)
    videos = jax.random.normal(jax.random.key(11), (2, 4, 32, 32, 3))
    mask = jnp.asarray(np.arange(16).reshape(2, 8) % 3 == 0)
    forward = nnx.jit(lambda m, x, k: m(x, k))
    want, got = forward(f32, videos, mask), forward(bf16, videos, mask)
    assert got["pred_BxNxK"].dtype == jnp.float32 and got["tokens_BxNxD"].dtype == jnp.bfloat16
    for name in ("pred_BxNxK", "tokens_BxNxD"):
        a, b = np.asarray(got[name], np.float64), np.asarray(want[name], np.float64)
        err = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert err < 5e-2, (name, err)
