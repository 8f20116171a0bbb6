"""Layers shared by the ViT and MViTv2 models.

Initialisation follows the official backbone (spec 7.4): weights N(0, 0.02) (PyTorch's
``trunc_normal_`` truncates at +-2 absolute, i.e. at 100 sigma, so it is a plain normal),
linear biases 0.02, LayerNorm weight 1 and bias 0.02. Heads override these.
Parameters are float32 and carry logical axis names; compute runs in ``dtype``.

In bfloat16, every dot takes bf16 operands and accumulates in float32 in both passes
(``einsum``). The forms that differ by platform (the CPU kernels) are in ``cpu_kernels``.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from maskfeat_jax import sharding

Initializer = nnx.initializers.Initializer
normal_02 = nnx.initializers.normal(0.02)
const_02 = nnx.initializers.constant(0.02)
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def symmetric_uniform(bound: float) -> Initializer:
    """U(-bound, bound): PyTorch's default bias init with bound 1/sqrt(fan_in)."""
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def param(rngs: nnx.Rngs, init: Initializer, shape, names) -> nnx.Param:
    """A float32 parameter with logical axis ``names`` (one per dimension)."""
    assert len(shape) == len(names), (shape, names)
    return nnx.Param(nnx.with_partitioning(init, tuple(names))(rngs.params(), tuple(shape), jnp.float32))


def einsum(spec: str, x, w, dtype):
    """Two-operand ``jnp.einsum`` computed in ``dtype`` with a float32 result.

    In float32 this is plain ``jnp.einsum``. Otherwise (bfloat16) every dot of the forward and
    the backward pass takes ``dtype`` operands and accumulates in float32 (``_lowp_einsum``):
    XLA CPU runs only that form on the bfloat16 matrix units (a bf16 -> bf16 dot, or the mixed
    f32 x bf16 dots that autodiff of ``preferred_element_type`` produces, run at float32 speed
    or below). The gradients come back in the operands' own dtypes, straight from the float32
    accumulators (a float32 weight's gradient is not rounded to bfloat16 on the way).
    Every index of one operand must appear in the other operand or in the output.
    """
    if dtype == jnp.float32:
        return jnp.einsum(spec, x.astype(dtype), w.astype(dtype))
    return _lowp_einsum(spec, jnp.dtype(dtype), jnp.dtype(x.dtype), jnp.dtype(w.dtype), x, w)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _lowp_einsum(spec, dtype, x_dtype, w_dtype, x, w):
    return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _lowp_einsum_fwd(spec, dtype, x_dtype, w_dtype, x, w):
    xl, wl = x.astype(dtype), w.astype(dtype)
    return jnp.einsum(spec, xl, wl, preferred_element_type=jnp.float32), (xl, wl)


def _lowp_einsum_bwd(spec, dtype, x_dtype, w_dtype, res, ct):
    xl, wl = res
    (a, b), out = spec.split("->")[0].split(","), spec.split("->")[1]
    ct = ct.astype(dtype)
    dx = jnp.einsum(f"{out},{b}->{a}", ct, wl, preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{a},{out}->{b}", xl, ct, preferred_element_type=jnp.float32)
    return dx.astype(x_dtype), dw.astype(w_dtype)


_lowp_einsum.defvjp(_lowp_einsum_fwd, _lowp_einsum_bwd)


def to_rank(a, ndim: int):
    """``a`` with unit axes prepended up to rank ``ndim``: NumPy's rank promotion, written out
    (jax.numpy may run with ``jax_numpy_rank_promotion="raise"``), e.g. a ``(C,)`` bias for a
    ``(B, N, C)`` activation."""
    return jnp.reshape(a, (1,) * (ndim - jnp.ndim(a)) + jnp.shape(a))


def gelu(x):
    """Exact GELU, ``x * Phi(x)`` with ``Phi(x) = (1 + erf(x / sqrt 2)) / 2`` (PyTorch's formula;
    ``jax.nn.gelu(x, approximate=False)`` to float32 rounding)."""
    return x * (0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(2 ** -0.5, x.dtype)))


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` with logical names ``(in_name, out_name)``."""

    def __init__(self, din, dout, names, *, rngs, kernel_init=normal_02, bias_init=const_02,
                 dtype=jnp.float32):
        self.kernel = param(rngs, kernel_init, (din, dout), names)
        self.bias = param(rngs, bias_init, (dout,), names[1:])
        self.dtype = dtype

    def __call__(self, x, out_dtype=None):
        """``out_dtype`` (default: the compute dtype) lets a float32 consumer skip a rounding."""
        y = einsum("nd,de->ne", x.reshape(-1, x.shape[-1]), self.kernel[...], self.dtype) + self.bias[...][None]
        return y.astype(out_dtype or self.dtype).reshape(*x.shape[:-1], -1)


class LayerNorm(nnx.Module):
    """LayerNorm with eps 1e-6 over the last axis, statistics in float32."""

    def __init__(self, dim, *, rngs, bias_init=const_02, name="embed", dtype=jnp.float32):
        self.scale = param(rngs, ones, (dim,), (name,))
        self.bias = param(rngs, bias_init, (dim,), (name,))
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        scale, bias = (to_rank(p[...], x.ndim) for p in (self.scale, self.bias))
        y = (x32 - mean) * jax.lax.rsqrt(var + 1e-6) * scale + bias
        return y.astype(self.dtype)


class Mlp(nnx.Module):
    """Linear -> exact-erf GELU -> Linear."""

    def __init__(self, dim, hidden, dout, *, rngs, dtype=jnp.float32):
        self.fc1 = Dense(dim, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = Dense(hidden, dout, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x):
        h = gelu(self.fc1(x, jnp.float32)).astype(self.fc2.dtype)     # GELU on the float32 accumulator
        h = sharding.constrain(h, ("batch", "length", "act_mlp")) if h.ndim == 3 else h
        return self.fc2(h)


def drop_path(x, rate: float, rng):
    """Stochastic depth per example; identity when ``rng`` is None or rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def attention(q, k, v, choice):
    """Softmax attention on ``(B, N, H, D)`` inputs with scale ``D**-0.5``, run as ``choice``
    (a ``platform.Attention``, chosen for the target platform): 'einsum' (XLA einsums in
    head-major layout with a hand-written backward, ``softmax_attention``), or 'xla' / 'cudnn'
    through ``jax.nn.dot_product_attention``; for cuDNN the token axis is padded to
    ``choice.padded`` and the padding masked through ``key_value_seq_lengths``.
    """
    if choice.impl == "einsum":
        scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
        q_BxHxNxD, k_BxHxNxD, v_BxHxNxD = (a.transpose(0, 2, 1, 3) for a in (q * scale, k, v))
        out_BxHxNxD = softmax_attention(q_BxHxNxD, k_BxHxNxD, v_BxHxNxD)
        return out_BxHxNxD.transpose(0, 2, 1, 3)
    b, n = q.shape[:2]
    if choice.padded == n:
        return jax.nn.dot_product_attention(q, k, v, implementation=choice.impl)
    pad = ((0, 0), (0, choice.padded - n), (0, 0), (0, 0))
    q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.full((b,), n, jnp.int32),
                                       implementation=choice.impl)
    return out[:, :n]


def _dot(spec, a, b):
    """``einsum`` of two operands of the compute dtype, accumulated and returned in float32."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def softmax_attention(q, k, v):
    """``softmax(q k^T) v`` per (batch, head) on head-major ``(B, H, N, D)`` inputs (``q``
    already scaled); logits, softmax and accumulation in float32, result in ``q.dtype``.

    The normalisation is applied to the ``(N, D)`` output rather than to the ``(N, N)``
    probabilities, and the backward pass uses ``rowsum(p * dp) = rowsum(do * o)``: every
    ``(N, N)`` tensor is produced by a dot and consumed by one fused elementwise step
    (exp; the softmax gradient), with no separate normalisation or reduction pass over it.
    The saved residual is the unnormalised ``exp(logits - max)`` in the compute dtype.
    """
    return _attention_fwd(q, k, v)[0]


def _attention_fwd(q, k, v):
    dt = q.dtype
    logits = _dot("bhqd,bhkd->bhqk", q, k)
    e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True))).astype(dt)
    r = 1.0 / e.astype(jnp.float32).sum(-1, keepdims=True)        # (B, H, N, 1)
    out = (_dot("bhqk,bhkd->bhqd", e, v) * r).astype(dt)
    return out, (q, k, v, e, r, out)


def _attention_bwd(res, d_out):
    q, k, v, e, r, out = res
    dt = q.dtype
    dor = d_out.astype(jnp.float32) * r                              # dO / rowsum(e)
    delta = (dor * out.astype(jnp.float32)).sum(-1, keepdims=True)   # rowsum(p * dp) / rowsum(e)
    dor_l = dor.astype(dt)
    # dlogits = p * (dp - rowsum(p * dp)) with p = e / rowsum(e), dp = dO v^T
    d_logits = (e.astype(jnp.float32) * (_dot("bhqd,bhkd->bhqk", dor_l, v) - delta)).astype(dt)
    dq = _dot("bhqk,bhkd->bhqd", d_logits, k)
    dk = _dot("bhqk,bhqd->bhkd", d_logits, q)
    dv = _dot("bhqk,bhqd->bhkd", e, dor_l)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


softmax_attention.defvjp(_attention_fwd, _attention_bwd)


def pooled_size(size: int, kernel: int, stride: int) -> int:
    """Output length of a conv / pool with padding ``kernel // 2``."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def pooled_grid(thw, kernel, stride) -> tuple[int, ...]:
    return tuple(pooled_size(s, k, st) for s, k, st in zip(thw, kernel, stride))


def conv(x_BxTxHxWxC, kernel_TxHxWxCxD, stride):
    """3-D convolution (cross-correlation, padding ``k // 2``, no bias), channels last."""
    pad = [(k // 2, k // 2) for k in kernel_TxHxWxCxD.shape[:3]]
    return jax.lax.conv_general_dilated(x_BxTxHxWxC, kernel_TxHxWxCxD, tuple(stride), pad,
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def depthwise_conv(x_BxTxHxWxC, kernel_TxHxWxC, stride):
    """Depthwise 3-D convolution (one ``(T, H, W)`` filter per channel, padding ``k // 2``, no bias)."""
    pad = [(k // 2, k // 2) for k in kernel_TxHxWxC.shape[:3]]
    return jax.lax.conv_general_dilated(
        x_BxTxHxWxC, kernel_TxHxWxC[:, :, :, None, :], tuple(stride), pad,
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), feature_group_count=x_BxTxHxWxC.shape[-1])


REMAT_POLICIES = {
    "none": None,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def block_runner(remat: str):
    """``run(block, x, rng) -> block(x, rng)``, rematerialised under ``REMAT_POLICIES[remat]``."""
    call = lambda blk, x, r: blk(x, r)  # noqa: E731
    return call if remat == "none" else nnx.remat(call, policy=REMAT_POLICIES[remat])


def block_rng(rng, i: int):
    """Block ``i``'s key (drop path), or None."""
    return None if rng is None else jax.random.fold_in(rng, i)
