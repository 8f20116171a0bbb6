"""Analytic FLOPs, device peak rates and model FLOP utilisation (MFU).

FLOPs count a multiply-add as 2. A training step costs 3x the forward pass (forward,
plus backward for activations and for weights). MFU = achieved / peak, per device.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per device (chip for TPU, GPU for NVIDIA), from the vendors' sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "A100": 312e12, "H100": 989e12, "H200": 989e12,
}


def vit_forward_flops(width: int, depth: int, mlp: int, tokens: int, patch_dim: int, out_dim: int,
                      head_tokens: int | None = None) -> float:
    """Forward FLOPs of one image through the ViT encoder and a linear head applied to
    ``head_tokens`` tokens (default: the patch tokens, as the MaskFeat head; 1 for a classifier)."""
    head_tokens = tokens - 1 if head_tokens is None else head_tokens
    per_block = (2 * tokens * width * 3 * width          # qkv
                 + 2 * 2 * tokens * tokens * width        # q k^T and attn v
                 + 2 * tokens * width * width             # output projection
                 + 2 * 2 * tokens * width * mlp)          # MLP
    embed = 2 * (tokens - 1) * patch_dim * width
    return float(depth * per_block + embed + 2 * head_tokens * width * out_dim)


def mvit_forward_flops(enc, out_dim: int) -> float:
    """Forward FLOPs of one clip through MViTv2 (patch conv, per block: qkv on the input
    grid, depthwise pooling convs, attention at the pooled sizes, projections, MLP) and a
    linear head on the final tokens."""
    prod = lambda t: int(np.prod(t))  # noqa: E731
    n0 = prod(enc.patch_grid)
    total = 2 * n0 * prod(enc.patch_kernel_size) * 3 * enc.size.embed_dim
    for blk in enc.blocks:
        a = blk.attn
        dim = a.qkv_kernel.shape[0]
        dim_out = blk.mlp.fc2.kernel.shape[-1]
        taps = prod(a.pool_q.shape[:-1])
        n_in, nq, nkv = prod(a.thw) + 1, prod(a.q_thw) + 1, prod(a.kv_thw) + 1
        total += 2 * n_in * dim * 3 * dim                       # qkv
        total += 2 * taps * dim * (nq + 2 * nkv)                # depthwise pooling of q, k, v
        total += 2 * 2 * nq * nkv * dim                         # q k^T and attn v
        total += 2 * nq * dim * dim                             # output projection
        total += 2 * nq * dim * 4 * dim + 2 * nq * 4 * dim * dim_out   # MLP
        if blk.proj is not None:
            total += 2 * nq * dim * dim_out                     # width-change residual
    return float(total + 2 * (prod(enc.grid) + 1) * enc.size.width * out_dim)


def model_flops_per_image(model, config) -> float:
    """Training FLOPs (3x forward) per image or clip for a built (or abstract) model."""
    enc = model.encoder
    out_dim = model.head.kernel.shape[-1]
    if hasattr(enc, "patch_grid"):        # MViTv2
        return 3.0 * mvit_forward_flops(enc, out_dim)
    tokens = enc.grid[0] * enc.grid[1] + 1
    head_tokens = 1 if hasattr(model, "fc_norm") else tokens - 1     # classifier: the pooled vector
    return 3.0 * vit_forward_flops(enc.size.width, enc.size.depth, enc.size.mlp, tokens,
                                   enc.patch * enc.patch * 3, out_dim, head_tokens)


def measured_matmul_flops(n: int = 2048, iters: int = 5, dtype=jnp.float32) -> float:
    """The device's achieved FLOP/s on an ``n x n`` matmul (the CPU's 'peak')."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(iters):
        out = f(a)
    out.block_until_ready()
    return 2 * n ** 3 * iters / (time.perf_counter() - t)


def peak_flops_per_device(override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s, where it came from): the config override, the table, or a measurement."""
    if override > 0:
        return override, "config"
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops, f"table ({kind})"
    if jax.default_backend() == "cpu":
        return measured_matmul_flops() / max(len(jax.local_devices()), 1), "measured matmul (cpu)"
    return float("nan"), f"unknown device {kind}"


def numpy_matmul_flops(n: int = 4096, iters: int = 3) -> float:
    a = np.ones((n, n), np.float32)
    a @ a
    t = time.perf_counter()
    for _ in range(iters):
        a @ a
    return 2 * n ** 3 * iters / (time.perf_counter() - t)
