"""The operations whose form depends on the program's platform, and their CPU forms.

Models call ``kernels.<op>`` on the object ``for_platform(platform)`` returns: ``Kernels``
(the plain forms, which GPU and TPU programs use) or, where ``platform.cpu_kernels`` says so,
``CpuKernels``. Both compute the same values; the CPU forms are the ones XLA CPU runs fast
(measurements in benchmarks/README.md):

* ``boundary``: identity on the residual stream; on CPU ``cotangent_boundary``, whose
  backward writes the stream's cotangent once instead of letting every consumer recompute it;
* ``project_in`` / ``project_out``: attention's qkv and output projections; on CPU plain 2-D
  matmuls on reshaped kernels, whose backward reads the kernels in place;
* ``patch_conv``: a patch embedding convolution; on CPU a sum over the temporal taps of 2-D
  convolutions of the strided frames;
* ``depthwise_conv``: MViTv2's pooling convolution; on CPU ``depthwise_pool``, a sum over the
  kernel's taps of strided slices times per-channel weights, with a hand-written backward.
"""
from __future__ import annotations

import itertools
from functools import partial

import jax
import jax.numpy as jnp

from maskfeat_jax import platform as platform_lib
from maskfeat_jax.models import layers


class Kernels:
    """The plain forms (GPU and TPU programs)."""

    def boundary(self, x):
        return x

    def project_in(self, x_BxNxD, kernel_DxTxHxK, dtype):
        """``(B, N, D) x (D, T, H, K) -> (B, N, T, H, K)`` (T: q, k, v), float32."""
        return layers.einsum("bnd,dthk->bnthk", x_BxNxD, kernel_DxTxHxK, dtype)

    def project_out(self, x_BxNxHxK, kernel_HxKxD, dtype):
        """``(B, N, H, K) x (H, K, D) -> (B, N, D)``, float32."""
        return layers.einsum("bnhk,hkd->bnd", x_BxNxHxK, kernel_HxKxD, dtype)

    def patch_conv(self, x_BxTxHxWxC, kernel_TxHxWxCxD, stride):
        return layers.conv(x_BxTxHxWxC, kernel_TxHxWxCxD, stride)

    def depthwise_conv(self, x_BxTxHxWxC, kernel_TxHxWxC, stride):
        return layers.depthwise_conv(x_BxTxHxWxC, kernel_TxHxWxC, stride)


class CpuKernels(Kernels):
    """The CPU forms."""

    def boundary(self, x):
        return cotangent_boundary(x)

    def project_in(self, x_BxNxD, kernel_DxTxHxK, dtype):
        if not flat_projections():
            return super().project_in(x_BxNxD, kernel_DxTxHxK, dtype)
        b, n, d = x_BxNxD.shape
        y = layers.einsum("nd,de->ne", x_BxNxD.reshape(b * n, d), kernel_DxTxHxK.reshape(d, -1), dtype)
        return y.reshape(b, n, *kernel_DxTxHxK.shape[1:])

    def project_out(self, x_BxNxHxK, kernel_HxKxD, dtype):
        if not flat_projections():
            return super().project_out(x_BxNxHxK, kernel_HxKxD, dtype)
        b, n, h, k = x_BxNxHxK.shape
        y = layers.einsum("nd,de->ne", x_BxNxHxK.reshape(b * n, h * k), kernel_HxKxD.reshape(h * k, -1), dtype)
        return y.reshape(b, n, -1)

    def patch_conv(self, x_BxTxHxWxC, kernel_TxHxWxCxD, stride):
        return patch_conv(x_BxTxHxWxC, kernel_TxHxWxCxD, stride)

    def depthwise_conv(self, x_BxTxHxWxC, kernel_TxHxWxC, stride):
        return depthwise_pool(x_BxTxHxWxC, kernel_TxHxWxC, stride)


PLAIN, CPU = Kernels(), CpuKernels()


def for_platform(platform: str) -> Kernels:
    """The kernel set of a program built for ``platform`` ('cpu', 'gpu', 'tpu')."""
    return CPU if platform_lib.cpu_kernels(platform) else PLAIN


def flat_projections() -> bool:
    """Whether the CPU program's projections are 2-D matmuls: not when the mesh splits the heads
    over 'tensor' (a reshape would merge the sharded heads axis into its neighbour)."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or dict(mesh.shape).get("tensor", 1) == 1


@jax.custom_vjp
def cotangent_boundary(x):
    """Identity; in the backward pass its cotangent is computed once and stored.

    XLA CPU fuses the residual stream's backward additions into every consumer of the
    gradient, and each consumer then recomputes the chain down from the loss (quadratic in
    depth). A conditional is never fused into, so the cotangent passes through one whose
    branches both return it unchanged (taken on a runtime predicate, so it is not folded
    away): the producer writes the cotangent once and every consumer reads it.
    """
    return x


def _boundary_fwd(x):
    return x, None


def _boundary_bwd(_, ct):
    if ct.size == 0:
        return (ct,)
    first = ct.reshape(-1)[:1].reshape(())
    # Both branches are the identity (+ 0.0 keeps the second from being merged with the first).
    return (jax.lax.cond(first == first, lambda c: c, lambda c: c + jnp.zeros((), c.dtype), ct),)


cotangent_boundary.defvjp(_boundary_fwd, _boundary_bwd)


def patch_conv(x_BxTxHxWxC, kernel_TxHxWxCxD, stride):
    """``layers.conv`` (padding ``k // 2``, no bias) as a sum over the temporal taps of 2-D
    convolutions of the strided frames."""
    kt, st = kernel_TxHxWxCxD.shape[0], stride[0]
    x = jnp.pad(x_BxTxHxWxC, ((0, 0), (kt // 2, kt // 2), (0, 0), (0, 0), (0, 0)))
    b, t = x.shape[0], layers.pooled_size(x_BxTxHxWxC.shape[1], kt, st)
    pad = [(k // 2, k // 2) for k in kernel_TxHxWxCxD.shape[1:3]]
    acc = None
    for a in range(kt):
        frames = x[:, a:a + (t - 1) * st + 1:st]
        y = jax.lax.conv_general_dilated(frames.reshape(-1, *frames.shape[2:]), kernel_TxHxWxCxD[a],
                                         stride[1:], pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = y.reshape(b, t, *y.shape[1:])
        acc = y if acc is None else acc + y
    return acc


def _taps(kernel) -> list[tuple[int, ...]]:
    return list(itertools.product(*map(range, kernel)))


def _pad(x_BxTxHxWxC, kernel):
    return jnp.pad(x_BxTxHxWxC, [(0, 0)] + [(k // 2, k // 2) for k in kernel] + [(0, 0)])


def tap_sum(x_BxTxHxWxC, kernel_TxHxWxC, stride):
    """``layers.depthwise_conv`` as a sum over the kernel's taps (float32 accumulation)."""
    kernel = kernel_TxHxWxC.shape[:3]
    x = _pad(x_BxTxHxWxC, kernel)
    b, *_, c = x.shape
    out = layers.pooled_grid(x_BxTxHxWxC.shape[1:4], kernel, stride)
    f32, acc = jnp.float32, 0.0
    for tap in _taps(kernel):
        end = [o + (n - 1) * s + 1 for o, n, s in zip(tap, out, stride)]
        window = jax.lax.slice(x, (0, *tap, 0), (b, *end, c), (1, *stride, 1))
        acc = acc + window.astype(f32) * layers.to_rank(kernel_TxHxWxC[tap].astype(f32), window.ndim)
    return acc.astype(x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_pool(x_BxTxHxWxC, kernel_TxHxWxC, stride):
    """``tap_sum`` (one elementwise fusion, and one for the input's gradient) whose kernel
    gradient is one reduction looped over the taps, where autodiff emits one per tap."""
    return tap_sum(x_BxTxHxWxC, kernel_TxHxWxC, stride)


def _depthwise_pool_fwd(x, kernel, stride):
    return tap_sum(x, kernel, stride), (x, kernel)


def _depthwise_pool_bwd(stride, res, ct):
    x, kernel = res
    dx = jax.vjp(lambda x: tap_sum(x, kernel, stride), x)[1](ct)[0]
    xp = _pad(x, kernel.shape[:3])
    span = [(n - 1) * s + 1 for n, s in zip(ct.shape[1:4], stride)]

    def tap_grad(tap):
        window = jax.lax.dynamic_slice(xp, (0, *tap, 0), (xp.shape[0], *span, xp.shape[-1]))
        window = window[:, ::stride[0], ::stride[1], ::stride[2]].astype(jnp.float32)
        return jnp.sum(window * ct.astype(jnp.float32), (0, 1, 2, 3))

    dk = jax.lax.map(tap_grad, jnp.asarray(_taps(kernel.shape[:3]), jnp.int32))
    return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


depthwise_pool.defvjp(_depthwise_pool_fwd, _depthwise_pool_bwd)
