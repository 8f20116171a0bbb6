"""Layers shared by the ViT and MViTv2 models.

Initialisation follows the official backbone (spec 7.4): weights N(0, 0.02) (PyTorch's
``trunc_normal_`` truncates at +-2 absolute, i.e. at 100 sigma, so it is a plain normal),
linear biases 0.02, LayerNorm weight 1 and bias 0.02. Heads override these.
Parameters are float32 and carry logical axis names; compute runs in ``dtype``.
"""
from __future__ import annotations

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


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` with logical names ``(in_name, out_name)``."""

    def __init__(self, din, dout, names, *, rngs, kernel_init=normal_02, bias_init=const_02,
                 dtype=jnp.float32):
        self.kernel = param(rngs, kernel_init, (din, dout), names)
        self.bias = param(rngs, bias_init, (dout,), names[1:])
        self.dtype = dtype

    def __call__(self, x):
        x = x.astype(self.dtype)
        return x @ self.kernel[...].astype(self.dtype) + self.bias[...].astype(self.dtype)


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
        y = (x32 - mean) * jax.lax.rsqrt(var + 1e-6) * self.scale[...] + self.bias[...]
        return y.astype(self.dtype)


class Mlp(nnx.Module):
    """Linear -> exact-erf GELU -> Linear."""

    def __init__(self, dim, hidden, dout, *, rngs, dtype=jnp.float32):
        self.fc1 = Dense(dim, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = Dense(hidden, dout, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x):
        h = jax.nn.gelu(self.fc1(x), approximate=False)
        h = sharding.constrain(h, ("batch", "length", "act_mlp")) if h.ndim == 3 else h
        return self.fc2(h)


def drop_path(x, rate: float, rng):
    """Stochastic depth per example; identity when ``rng`` is None or rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def attention(q, k, v, impl: str):
    """Softmax attention on ``(B, N, H, D)`` inputs with scale ``D**-0.5``.

    ``impl``: 'einsum' (plain XLA einsums, float32 softmax), or 'xla' / 'cudnn' / 'auto'
    through ``jax.nn.dot_product_attention`` ('auto' picks cuDNN flash attention on GPU
    where it applies, XLA elsewhere).
    """
    if impl == "einsum":
        scale = q.shape[-1] ** -0.5
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k,
                            preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    if impl == "auto":
        impl = "cudnn" if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) else "xla"
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


REMAT_POLICIES = {
    "none": None,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}
