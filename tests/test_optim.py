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
