"""MViTv2 pooling attention (spec 7.1, 7.3): one qkv projection, per-head depthwise conv
pooling of q, k and v (each followed by a LayerNorm over the head dimension, the cls token
split off before pooling and re-attached before the norm), decomposed relative positions
(MViTv2 ``cal_rel_pos_spatial`` / ``cal_rel_pos_temporal``), residual pooling, output
projection.

Token grids are ``(T, H, W)`` tuples; token order is (t, h, w), T-major, cls first.
Images run as ``T = 1`` with a temporal kernel of 1 and no temporal relative positions.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maskfeat_jax import sharding
from maskfeat_jax.models import cpu_kernels, layers
from maskfeat_jax.models.layers import LayerNorm, param, pooled_grid


def skip_kernel(stride) -> tuple[int, ...]:
    """Kernel of the skip-path max pool: ``s + 1`` where ``s > 1``, else ``s``."""
    return tuple(s + 1 if s > 1 else s for s in stride)


def max_pool(x_BxTxHxWxC, stride):
    """The skip path's MaxPool3d (kernel ``skip_kernel(stride)``, padding ``k // 2``)."""
    k = skip_kernel(stride)
    pad = ((0, 0),) + tuple((kk // 2, kk // 2) for kk in k) + ((0, 0),)
    return jax.lax.reduce_window(x_BxTxHxWxC, -jnp.inf, jax.lax.max, (1, *k, 1), (1, *stride, 1), pad)


def interpolate_rel_pos(table, new_len: int):
    """Linearly resizes a rel-pos table ``(L, D)`` to ``(new_len, D)`` along its first axis.

    Matches torch ``F.interpolate(mode='linear', align_corners=False)``, as the official
    checkpoint loader and ``get_rel_pos`` use it (half-pixel centres, clamped at the edges).
    Works on numpy and jax arrays.
    """
    old = table.shape[0]
    if old == new_len:
        return table
    src = np.maximum((np.arange(new_len) + 0.5) * (old / new_len) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), old - 1)
    i1 = np.minimum(i0 + 1, old - 1)
    lam = (src - i0)[:, None].astype(np.float32)
    return table[i0] * (1 - lam).astype(table.dtype) + table[i1] * lam.astype(table.dtype)


def rel_pos_index(q_len: int, k_len: int) -> np.ndarray:
    """``(q_len, k_len)`` table rows: distances stretched by the q/k size ratio.

    Computed in float32 and truncated, as the official code does in torch.
    """
    q_ratio, k_ratio = max(k_len / q_len, 1.0), max(q_len / k_len, 1.0)
    dist = (np.arange(q_len, dtype=np.float32)[:, None] * np.float32(q_ratio)
            - np.arange(k_len, dtype=np.float32)[None, :] * np.float32(k_ratio))
    dist += np.float32((k_len - 1) * k_ratio)
    return dist.astype(np.int64)


def rel_pos_matrix(table_len: int, q_len: int, k_len: int) -> np.ndarray:
    """``(q_len, k_len, table_len)`` float32: row ``(q, k)`` of the table as resized to
    ``2 max(q, k) - 1`` rows (``interpolate_rel_pos``) and gathered at ``rel_pos_index``,
    written as weights on the original rows. Applied with a dot, the lookup has no gather,
    so its gradient has no scatter (TPU); with no resize each row is one-hot: exact."""
    resize = interpolate_rel_pos(np.eye(table_len, dtype=np.float32), 2 * max(q_len, k_len) - 1)
    return resize[rel_pos_index(q_len, k_len)]


def _rel_table(table, q_len, k_len, dtype):
    """``(q_len, k_len, D)`` in ``dtype``: the table resized and gathered (``rel_pos_matrix``)."""
    m = jnp.asarray(rel_pos_matrix(table.shape[0], q_len, k_len))
    return layers.einsum("qkl,ld->qkd", m, table, dtype).astype(dtype)


def decomposed_rel_pos(q_BxNxHxD, q_thw, k_thw, rel_pos_h, rel_pos_w, rel_pos_t=None):
    """The additive logit bias ``(B, heads, Nq, Nk)`` (float32) of the non-cls tokens.

    ``q_BxNxHxD`` is the pooled, normed, *unscaled* q without its cls token; the dots run in
    its dtype with float32 accumulation, in both passes (``layers.einsum``).
    bias[q=(t,h,w), k=(t',h',w')] = q . (Rh[h,h'] + Rw[w,w'] + Rt[t,t']).
    """
    (qt, qh, qw), (kt, kh, kw) = q_thw, k_thw
    b, _, nh, d = q_BxNxHxD.shape
    dt = q_BxNxHxD.dtype
    r_q = q_BxNxHxD.reshape(b, qt, qh, qw, nh, d)
    rh = _rel_table(rel_pos_h, qh, kh, dt)
    rw = _rel_table(rel_pos_w, qw, kw, dt)
    bias = (layers.einsum("bthwnc,hkc->bnthwk", r_q, rh, dt)[..., None, :, None]
            + layers.einsum("bthwnc,wkc->bnthwk", r_q, rw, dt)[..., None, None, :])
    if rel_pos_t is not None:
        rt = _rel_table(rel_pos_t, qt, kt, dt)
        bias = bias + layers.einsum("bthwnc,tkc->bnthwk", r_q, rt, dt)[..., None, None]
    else:
        bias = jnp.broadcast_to(bias, bias.shape[:5] + (kt,) + bias.shape[6:])
    return bias.reshape(b, nh, qt * qh * qw, kt * kh * kw)


class PoolingAttention(nnx.Module):
    """``MultiScaleAttention`` with MODE conv, POOL_FIRST False, REL_POS_SPATIAL/TEMPORAL and
    RESIDUAL_POOLING on. ``thw`` is the input token grid (static).

    Pooling always runs (the MaskFeat configs pool q, k and v with a 3x3x3 kernel in every
    block, even at stride 1). Table lengths follow the official sizing: spatial
    ``2 max(size // q_stride, size // kv_stride) - 1``, temporal ``2 T - 1``; if a forward
    needs another length (non-divisible sizes) the table is linearly interpolated, as
    ``get_rel_pos`` does.
    """

    def __init__(self, dim, heads, thw, q_stride, kv_stride, kernel, *, rel_pos_temporal=True,
                 rngs, dtype=jnp.float32, impl="auto", kernels=cpu_kernels.PLAIN):
        if impl not in ("auto", "einsum"):
            raise ValueError(f"config.model.attention={impl!r}: MViTv2 adds per-example relative-position "
                             "biases to its logits and has one attention form: use 'auto'")
        hd = dim // heads
        self.qkv_kernel = param(rngs, layers.normal_02, (dim, 3, heads, hd), ("embed", None, "heads", "kv"))
        self.qkv_bias = param(rngs, layers.const_02, (3, heads, hd), (None, "heads", "kv"))
        conv_names = ("conv_in", "conv_in", "conv_in", "kv")
        self.pool_q = param(rngs, layers.normal_02, (*kernel, hd), conv_names)
        self.pool_k = param(rngs, layers.normal_02, (*kernel, hd), conv_names)
        self.pool_v = param(rngs, layers.normal_02, (*kernel, hd), conv_names)
        self.norm_q = LayerNorm(hd, rngs=rngs, name="kv", dtype=dtype)
        self.norm_k = LayerNorm(hd, rngs=rngs, name="kv", dtype=dtype)
        self.norm_v = LayerNorm(hd, rngs=rngs, name="kv", dtype=dtype)
        t, h, w = thw
        len_h = 2 * max(h // q_stride[1], h // kv_stride[1]) - 1
        len_w = 2 * max(w // q_stride[2], w // kv_stride[2]) - 1
        self.rel_pos_h = param(rngs, layers.normal_02, (len_h, hd), (None, "kv"))
        self.rel_pos_w = param(rngs, layers.normal_02, (len_w, hd), (None, "kv"))
        self.rel_pos_t = (param(rngs, layers.normal_02, (2 * t - 1, hd), (None, "kv"))
                          if rel_pos_temporal else None)
        self.proj_kernel = param(rngs, layers.normal_02, (heads, hd, dim), ("heads", "kv", "embed"))
        self.proj_bias = param(rngs, layers.const_02, (dim,), ("embed",))
        self.thw, self.q_stride, self.kv_stride = tuple(thw), tuple(q_stride), tuple(kv_stride)
        self.q_thw = pooled_grid(thw, kernel, q_stride)
        self.kv_thw = pooled_grid(thw, kernel, kv_stride)
        self.dtype, self.kernels = dtype, kernels

    def _pool(self, x_BxNxHxD, kernel, norm, stride):
        cls, x = x_BxNxHxD[:, :1], x_BxNxHxD[:, 1:]
        b, _, nh, d = x.shape
        # heads stay folded into channels; the per-head kernel is shared, so tile it
        k = jnp.tile(kernel[...].astype(x.dtype), (1, 1, 1, nh))
        x = self.kernels.depthwise_conv(x.reshape(b, *self.thw, nh * d), k, stride)
        x = x.reshape(b, -1, nh, d)
        return norm(jnp.concatenate([cls, x], axis=1))

    def __call__(self, x_BxNxD):
        dt = self.dtype
        # every dot: operands in dt, float32 accumulation, in both passes (layers.einsum)
        qkv = layers.einsum("bnd,dthk->tbnhk", x_BxNxD, self.qkv_kernel[...], dt)
        qkv = (qkv + self.qkv_bias[...][:, None, None]).astype(dt)
        q = self._pool(qkv[0], self.pool_q, self.norm_q, self.q_stride)
        k = self._pool(qkv[1], self.pool_k, self.norm_k, self.kv_stride)
        v = self._pool(qkv[2], self.pool_v, self.norm_v, self.kv_stride)
        scale = jnp.asarray(1 / math.sqrt(q.shape[-1]), dt)
        logits = layers.einsum("bqhd,bkhd->bhqk", q * scale, k, dt)
        rel_t = None if self.rel_pos_t is None else self.rel_pos_t[...]
        bias = decomposed_rel_pos(q[:, 1:], self.q_thw, self.kv_thw, self.rel_pos_h[...],
                                  self.rel_pos_w[...], rel_t)
        # the cls row and column get no bias; pad-and-add rather than a scatter (TPU)
        logits = logits + jnp.pad(bias, ((0, 0), (0, 0), (1, 0), (1, 0)))
        probs = jax.nn.softmax(logits, axis=-1).astype(dt)
        out_BxNxHxD = layers.einsum("bhqk,bkhd->bqhd", probs, v, dt)
        out_BxNxHxD = (out_BxNxHxD + jnp.pad(q[:, 1:], ((0, 0), (1, 0), (0, 0), (0, 0)))).astype(dt)  # residual pooling
        out_BxNxHxD = sharding.constrain(out_BxNxHxD, ("batch", "length", "act_heads", "kv"))
        y = layers.einsum("bnhk,hkd->bnd", out_BxNxHxD, self.proj_kernel[...], dt)
        return (y + self.proj_bias[...][None, None]).astype(dt)
