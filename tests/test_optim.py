"""Optimiser: lr scaling, warm-up + cosine, weight-decay mask, layer-wise decay."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maskfeat_jax import config as config_lib, optim


def _config(**optim_overrides):
    c = config_lib.base_config()
    c.input.global_batch_size = 512
    for k, v in optim_overrides.items():
        c.optim[k] = v
    return c


def test_lr_is_scaled_linearly_by_global_batch():
    lrs = optim.scaled_lrs(_config(base_lr=2e-4, reference_batch=256))
    assert lrs["peak"] == pytest.approx(4e-4) and lrs["start"] == pytest.approx(2e-6)


def test_schedule_matches_the_official_formula():
    c = _config(base_lr=1e-3, reference_batch=512, warmup_start_lr=1e-6, end_lr=1e-5, warmup_epochs=2)
    spe, total = 10, 100
    sched = optim.schedule(c, spe, total)
    w = 20
    for t in (0, 5, 19, 20, 50, 99):
        if t < w:
            ref = 1e-6 + (1e-3 - 1e-6) * t / w
        else:
            ref = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * (t - w) / (total - w)))
        assert float(sched(t)) == pytest.approx(ref, rel=1e-4), t


def _params():
    return {"encoder": {"pos_embed": jnp.ones((1, 5, 4)), "cls_token": jnp.ones((1, 1, 4)),
                        "patch_kernel": jnp.ones((2, 2, 3, 4)), "patch_bias": jnp.ones((4,)),
                        "blocks": {0: {"attn": {"qkv_kernel": jnp.ones((4, 3, 2, 2)), "qkv_bias": jnp.ones((3, 2, 2))},
                                       "norm1": {"scale": jnp.ones((4,)), "bias": jnp.ones((4,))}},
                                   1: {"mlp": {"fc1": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones((8,))}}}}},
            "fc_norm": {"scale": jnp.ones((4,))},
            "head": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))}}


def test_weight_decay_mask_exempts_biases_and_1d_but_not_embeddings():
    m = optim.decay_mask(_params())
    assert m["encoder"]["pos_embed"] and m["encoder"]["cls_token"] and m["encoder"]["patch_kernel"]
    assert m["encoder"]["blocks"][0]["attn"]["qkv_kernel"] and m["head"]["kernel"]
    assert not m["encoder"]["blocks"][0]["attn"]["qkv_bias"]       # 3-D, but a bias
    assert not m["encoder"]["patch_bias"] and not m["head"]["bias"] and not m["fc_norm"]["scale"]
    assert not m["encoder"]["blocks"][0]["norm1"]["scale"]


def test_layer_decay_factors_per_group():
    depth, d = 2, 0.5
    s = optim.layer_scales(_params(), depth, d)
    assert s["encoder"]["pos_embed"] == d ** 3 and s["encoder"]["patch_kernel"] == d ** 3
    assert s["encoder"]["blocks"][0]["attn"]["qkv_kernel"] == d ** 2
    assert s["encoder"]["blocks"][1]["mlp"]["fc1"]["kernel"] == d ** 1
    assert s["head"]["kernel"] == 1.0 and s["fc_norm"]["scale"] == 1.0


def test_layer_decay_scales_each_update_like_a_per_layer_lr():
    params = _params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    c = _config(grad_clip=0.0, weight_decay=0.0, warmup_epochs=0, base_lr=1e-2, reference_batch=512)
    updates = {}
    for decay in (1.0, 0.5):
        c.optim.layer_decay = decay
        tx, _ = optim.make(c, params, 10, 100, depth=2)
        updates[decay], _ = tx.update(grads, tx.init(params), params)
    ratio = jax.tree.map(lambda a, b: float((b / a).mean()), updates[1.0], updates[0.5])
    scales = optim.layer_scales(params, 2, 0.5)
    for r, s in zip(jax.tree.leaves(ratio), jax.tree.leaves(scales)):
        assert r == pytest.approx(s, rel=1e-5)


def test_gradient_clipping_uses_global_norm():
    params = {"w": jnp.zeros((3, 3))}
    grads = {"w": jnp.full((3, 3), 10.0)}
    c = _config(grad_clip=0.02, weight_decay=0.0)
    tx, _ = optim.make(c, params, 10, 100, depth=1)
    clip = optax.clip_by_global_norm(0.02)
    clipped, _ = clip.update(grads, clip.init(params))
    assert float(optax.tree.norm(clipped)) == pytest.approx(0.02, rel=1e-5)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert np.all(np.isfinite(updates["w"]))


# ---- one AdamW step of the chain against numpy (clip -> Adam moments -> decoupled decay -> lr)

# the weight-decay rule per leaf of _params(), written out by name: decayed iff ndim > 1 and the
# name is not a bias (pos_embed and cls_token are decayed, spec 8)
_DECAYED = {"pos_embed", "cls_token", "patch_kernel", "qkv_kernel", "kernel"}


def _random_tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * scale, jnp.float32), _params())


def _named_leaves(tree):
    return [(str(getattr(path[-1], "key", path[-1])), np.asarray(x, np.float64))
            for path, x in jax.tree_util.tree_leaves_with_path(tree)]


def _adam_state(opt_state):
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1
    return found[0]


def _one_step_config(**kw):
    # lr at step 0 is the warm-up start, scaled: 1e-3 * 512 / 256
    return _config(base_lr=1e-2, warmup_start_lr=1e-3, reference_batch=256, warmup_epochs=1.0, **kw)


LR0 = 2e-3


def test_adamw_first_step_moments_and_update_match_numpy():
    b1, b2, eps, wd, clip = 0.8, 0.95, 1e-3, 0.1, 0.5
    c = _one_step_config(b1=b1, b2=b2, eps=eps, weight_decay=wd, grad_clip=clip)
    params, grads = _random_tree(0), _random_tree(1, scale=0.3)
    tx, _ = optim.make(c, params, 10, 100, depth=2)
    updates, state = tx.update(grads, tx.init(params), params)
    g = _named_leaves(grads)
    gnorm = math.sqrt(sum(float((x ** 2).sum()) for _, x in g))
    assert gnorm > 4 * clip                                    # clipping matters here
    f = min(1.0, clip / gnorm)
    adam = _adam_state(state)
    assert int(adam.count) == 1
    for (name, gi), (_, p), mu, nu, u in zip(g, _named_leaves(params), jax.tree.leaves(adam.mu),
                                             jax.tree.leaves(adam.nu), jax.tree.leaves(updates)):
        gc = gi * f
        np.testing.assert_allclose(mu, (1 - b1) * gc, rtol=1e-5, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(nu, (1 - b2) * gc ** 2, rtol=1e-5, atol=1e-12, err_msg=name)
        # bias-corrected moments after one step: m = gc, v = gc^2
        decay = wd * p if name in _DECAYED else 0.0
        np.testing.assert_allclose(u, -LR0 * (gc / (np.abs(gc) + eps) + decay), rtol=1e-4, atol=1e-9,
                                   err_msg=name)


def test_zero_gradient_update_is_decoupled_weight_decay_on_decayed_leaves_only():
    wd = 0.05
    c = _one_step_config(weight_decay=wd, grad_clip=0.02)
    params = _random_tree(2)
    tx, _ = optim.make(c, params, 10, 100, depth=2)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    names = []
    for (name, p), u in zip(_named_leaves(params), jax.tree.leaves(updates)):
        names.append(name)
        if name in _DECAYED:
            np.testing.assert_allclose(u, -LR0 * wd * p, rtol=1e-5, err_msg=name)
        else:
            assert np.all(np.asarray(u) == 0.0), name
    assert {"bias", "patch_bias", "qkv_bias", "scale"} <= set(names) and _DECAYED <= set(names)


def test_layer_decay_in_the_setup_chain_matches_the_spec_per_leaf():
    """train.setup's optimizer on the tiny classifier's own parameter names: with zero gradients
    each leaf moves by -lr * decay**(depth + 1 - layer_id) * wd * p, or not at all when exempt."""
    from maskfeat_jax import sharding, train
    c = _one_step_config(weight_decay=0.05, grad_clip=0.0, layer_decay=0.5)
    c.task, c.model.variant, c.input.image_size, c.model.num_classes = "finetune", "mu/16", 32, 10
    c.input.global_batch_size = 512
    s = train.setup(c, sharding.make_mesh(c.mesh, jax.devices()[:1]), 10, 100)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), s.abstract_state.params)
    updates, _ = s.tx.update(jax.tree.map(jnp.zeros_like, params), s.tx.init(params), params)
    depth = 2                                                   # mu/16: 2 blocks
    seen = set()
    for (path, p), u in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(updates)):
        names = [str(getattr(k, "key", k)) for k in path]
        if "blocks" in names:
            lid = int(names[names.index("blocks") + 1]) + 1
        elif names[-1] in ("cls_token", "pos_embed", "patch_kernel", "patch_bias"):
            lid = 0
        else:
            lid = depth + 1
        seen.add(lid)
        decayed = p.ndim > 1 and not names[-1].endswith("bias")
        want = -LR0 * 0.5 ** (depth + 1 - lid) * 0.05 * np.asarray(p, np.float64) if decayed else 0.0
        np.testing.assert_allclose(u, np.broadcast_to(want, p.shape), rtol=1e-5, atol=0, err_msg="/".join(names))
    assert seen == {0, 1, 2, 3}


def test_sgd_matches_pytorch_sgd_with_momentum_and_l2_decay_over_three_steps():
    """optim.name='sgd' is PyTorch's SGD(lr, momentum, weight_decay), written out in numpy:
    d = clip(g) + wd * p (decayed leaves only); buf = d at the first step, then m * buf + d;
    p -= lr_t * buf, with lr_t the warm-up schedule."""
    m, wd, clip = 0.9, 1e-2, 0.5
    c = _one_step_config(name="sgd", momentum=m, weight_decay=wd, grad_clip=clip)
    params = _random_tree(0)
    tx, sched = optim.make(c, params, 10, 100, depth=2)
    state, update = tx.init(params), jax.jit(tx.update)
    names = [n for n, _ in _named_leaves(params)]
    ref = [p.copy() for _, p in _named_leaves(params)]
    buf = [None] * len(ref)
    for t in range(3):
        grads = _random_tree(10 + t, scale=0.3)
        g = [x for _, x in _named_leaves(grads)]
        f = min(1.0, clip / math.sqrt(sum(float((x ** 2).sum()) for x in g)))
        for i, name in enumerate(names):
            d = g[i] * f + (wd * ref[i] if name in _DECAYED else 0.0)
            buf[i] = d if t == 0 else m * buf[i] + d
            ref[i] = ref[i] - float(sched(t)) * buf[i]
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert len(set(names) & _DECAYED) > 0 and len(set(names) - _DECAYED) > 0
    for i, (name, p) in enumerate(_named_leaves(params)):
        np.testing.assert_allclose(p, ref[i], rtol=1e-5, atol=1e-7, err_msg=name)


def test_unknown_optimizer_and_mix_probability_are_named_errors():
    from maskfeat_jax import config_validate
    for key, value in (("optim.name", "lamb"), ("augment.mix_prob", 1.5)):
        c = config_lib.base_config()
        c.update_from_flattened_dict({key: value})
        with pytest.raises(ValueError, match=f"config.{key}"):
            config_validate.validate(c, 1)
