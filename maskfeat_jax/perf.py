"""Analytic FLOPs, device peak rates and model FLOP utilisation (MFU).

FLOPs count a multiply-add as 2. A training step costs 3x the forward pass (forward,
plus backward for activations and for weights). MFU = achieved / peak, per device.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from maskfeat_jax import storage

# Dense bf16 peak FLOP/s per device (chip for TPU, GPU for NVIDIA), from the vendors' sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "A100": 312e12, "H100": 989e12, "H200": 989e12,
}


def vit_forward_flops(width: int, depth: int, mlp: int, tokens: int, patch_dim: int, out_dim: int) -> float:
    """Forward FLOPs of one image through the ViT encoder and a linear head on the tokens."""
    per_block = (2 * tokens * width * 3 * width          # qkv
                 + 2 * 2 * tokens * tokens * width        # q k^T and attn v
                 + 2 * tokens * width * width             # output projection
                 + 2 * 2 * tokens * width * mlp)          # MLP
    embed = 2 * (tokens - 1) * patch_dim * width
    return float(depth * per_block + embed + 2 * tokens * width * out_dim)


def _shape(x) -> tuple[int, ...]:
    """Shape of a parameter (``nnx.Param`` of an array or of a ShapeDtypeStruct) or array."""
    return tuple(getattr(x, "shape", None) or x[...].shape)


def _prod(xs) -> int:
    return int(np.prod(xs))


def vit_encoder_flops(enc, kept: int | None = None) -> tuple[float, float]:
    """(forward FLOPs of the ViT encoder per image, of which the patch embedding), on every
    patch or, with ``kept`` (MAE), on that many patches: cls + ``kept`` tokens through the blocks."""
    size = enc.size
    n = _prod(enc.grid) if kept is None else kept     # (h, w), or (t, h, w) on video
    patch_dim = _prod(_shape(enc.patch_kernel)[:-1])
    fwd = vit_forward_flops(size.width, size.depth, size.mlp, n + 1, patch_dim, 0)
    return fwd, 2.0 * n * patch_dim * size.width


def blocks_flops(blocks, tokens: int) -> float:
    """Forward FLOPs of pre-norm ViT blocks (a decoder's) on ``tokens`` tokens, each block's
    width and MLP read from its parameters."""
    total = 0.0
    for blk in blocks:
        dim, hidden = _shape(blk.attn.qkv_kernel)[0], _shape(blk.mlp.fc1.kernel)[1]
        total += vit_forward_flops(dim, 1, hidden, tokens, 0, 0)
    return total


def mvit_encoder_flops(enc) -> tuple[float, float]:
    """(forward FLOPs of the MViTv2 encoder per clip, of which the patch embedding).

    Per block, on its input grid ``thw`` (N tokens + cls), pooled q grid (Nq) and kv grid
    (Nkv): the qkv projection on the input grid; the three depthwise pooling convolutions
    (cls not pooled); q k^T and attn v at the pooled sizes; the decomposed relative-position
    terms (q against each axis' table); the output projection and the MLP (width change in
    fc2) on the q grid; and the skip projection where the width changes.
    """
    k_patch = _shape(enc.patch_kernel)                    # (kt, kh, kw, C, D0)
    fwd = embed = 2.0 * _prod(enc.patch_grid) * _prod(k_patch[:-1]) * k_patch[-1]
    for blk in enc.blocks:
        att = blk.attn
        dim = _shape(att.qkv_kernel)[0]
        n_in, nq, nkv = _prod(att.thw) + 1, _prod(att.q_thw) + 1, _prod(att.kv_thw) + 1
        kvol = _prod(_shape(att.pool_q)[:-1])
        hidden, dim_out = _shape(blk.mlp.fc1.kernel)[1], _shape(blk.mlp.fc2.kernel)[1]
        rel_axes = att.kv_thw[1] + att.kv_thw[2] + (att.kv_thw[0] if att.rel_pos_t is not None else 0)
        fwd += (2 * n_in * dim * 3 * dim                              # qkv
                + 2 * kvol * dim * ((nq - 1) + 2 * (nkv - 1))          # depthwise pooling of q, k, v
                + 2 * 2 * nq * nkv * dim                                # q k^T and attn v
                + 2 * (nq - 1) * dim * rel_axes                         # decomposed relative positions
                + 2 * nq * dim * dim                                    # output projection
                + 2 * nq * dim * hidden + 2 * nq * hidden * dim_out     # MLP
                + (2 * nq * dim * dim_out if blk.proj is not None else 0))   # skip projection
    return float(fwd), float(embed)


def encoder_flops(enc) -> tuple[float, float]:
    """(forward FLOPs per example, of which the patch embedding), by encoder type."""
    from maskfeat_jax.models import mvit   # local: perf stays importable without the models
    return mvit_encoder_flops(enc) if isinstance(enc, mvit.MViT) else vit_encoder_flops(enc)


def forward_flops_per_image(model, config=None) -> float:
    """Forward FLOPs of one image (or clip) through encoder and head.

    The MaskFeat head is a linear layer on every patch token (cls dropped; one per block of
    ``head.depths``), after the transformer decoder's blocks on every token where there is one;
    the classifier's is one
    linear layer on the pooled feature. An MAE model (``config`` needed, for
    ``config.mae.mask_ratio``: ``mae.kept_tokens``) runs its encoder on cls + the kept patches only, then the
    decoder's embedding on those, its blocks on cls + every patch and its head on every patch.
    Norms, softmax, activations and the scatter into the decoder's grid are not counted.
    """
    return _forward_flops(model, config)[0]


def _forward_flops(model, config) -> tuple[float, float]:
    """(forward FLOPs per example, of which the patch embedding)."""
    from maskfeat_jax.models import mae   # local: perf stays importable without the models
    enc = model.encoder
    n = _prod(enc.grid)
    if isinstance(model, mae.MAE):
        if config is None:
            raise ValueError("an MAE model's FLOPs depend on config.mae.mask_ratio: pass the config")
        kept = mae.kept_tokens(config)                 # config.mae.mask_ratio (per frame on video)
        fwd, embed = vit_encoder_flops(enc, kept)
        width, dec = _shape(model.decoder_embed.kernel)
        fwd += 2.0 * (kept + 1) * width * dec + blocks_flops(model.decoder.blocks, n + 1)
        return fwd + 2.0 * n * _prod(_shape(model.head.kernel)), embed
    fwd, embed = encoder_flops(enc)
    decoder = getattr(model, "decoder", None)          # MaskFeat's transformer head
    if decoder is not None:
        if getattr(model, "decoder_embed", None) is not None:
            fwd += 2.0 * (n + 1) * _prod(_shape(model.decoder_embed.kernel))
        fwd += blocks_flops(decoder.blocks, n + 1)
    heads = list(getattr(model, "heads", None) or [model.head])   # MaskFeat: one per depth of head.depths
    pooled = hasattr(model, "fc_norm")                # the classifier's head: on the pooled feature
    return fwd + 2.0 * (1 if pooled else n) * sum(_prod(_shape(h.kernel)) for h in heads), embed


def model_flops_per_image(model, config=None) -> float:
    """Training FLOPs per image for a built (or abstract) model: 3x the forward pass (forward,
    backward to activations, backward to weights), except that the patch embedding's input
    (the pixels) needs no gradient, so the embedding costs 2x its forward. ``config`` is needed
    for an MAE model (``forward_flops_per_image``)."""
    fwd, embed = _forward_flops(model, config)
    return 3.0 * fwd - embed


def measured_matmul_flops(n: int = 1024, iters: int = 5, dtype=jnp.float32, min_seconds: float = 0.0) -> float:
    """The device's achieved FLOP/s on an ``n x n`` matmul (the CPU's 'peak'): ``iters``
    matmuls, repeated until ``min_seconds`` have passed."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    done, t = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - t < min_seconds:
        for _ in range(iters):
            out = f(a)
        out.block_until_ready()
        done += iters
    return 2 * n ** 3 * done / (time.perf_counter() - t)


def peak_flops_per_device(override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s, where it came from): the config override, the table, or a measurement."""
    if override > 0:
        return override, "config"
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops, f"table ({kind})"
    if jax.default_backend() == "cpu":
        # a 1024-matmul reaches the same rate as bigger ones on CPU, in a fraction of a second
        return measured_matmul_flops(iters=1, min_seconds=0.2) / max(len(jax.local_devices()), 1), \
            "measured matmul (cpu)"
    return float("nan"), f"unknown device {kind}"


def numpy_matmul_flops(n: int = 4096, iters: int = 3) -> float:
    """numpy's float32 ``n x n`` matmul rate on this host (all cores its BLAS uses)."""
    a = np.ones((n, n), np.float32)
    a @ a
    t = time.perf_counter()
    for _ in range(iters):
        a @ a
    return 2 * n ** 3 * iters / (time.perf_counter() - t)


class ProfileWindow:
    """The profiler over steps ``start`` to ``start + num_steps - 1``: ``before(step)`` starts the
    trace as step ``start`` is dispatched, ``after(step, state)`` stops it once that many steps
    are done, ``close()`` stops it if the run ends inside the window. On a URL workdir the
    trace is written to a local folder and copied to ``WORKDIR/profile`` when it stops."""

    def __init__(self, workdir: str, start: int, num_steps: int, say=print):
        self.workdir, self.start, self.end, self.say = workdir, start, start + num_steps, say
        self.trace_dir = None          # where the profiler writes while it traces
        self.step = start              # the last step done

    def before(self, step: int) -> None:
        if step != self.start:
            return
        self.trace_dir = tempfile.mkdtemp(prefix="maskfeat_profile_") if storage.is_url(self.workdir) \
            else os.path.join(str(storage.path(self.workdir)), "profile")
        jax.profiler.start_trace(self.trace_dir)

    def after(self, step: int, state) -> None:
        self.step = step
        if self.trace_dir is not None and step == self.end:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        """Stops the trace (steps ``start`` to the last step done traced), if one is running."""
        if self.trace_dir is None:
            return
        step = self.step
        jax.profiler.stop_trace()
        if storage.is_url(self.workdir):
            storage.upload_tree(self.trace_dir, f"{self.workdir}/profile")
            shutil.rmtree(self.trace_dir, ignore_errors=True)
        self.trace_dir = None
        self.say(f"profiler trace of steps {self.start}..{step - 1} in {self.workdir}/profile")
