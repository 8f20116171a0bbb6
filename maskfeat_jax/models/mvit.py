"""MViTv2 as MaskFeat uses it for video (spec 7.1, 7.3, 7.4): a conv patch embedding
(3x7x7, stride 2x4x4), cls token, no absolute position embedding, multiscale blocks with
pooling attention (``pooling_attention.py``), no final norm (the heads add theirs).

* ``pretrain=True`` keeps the last stage at stride 16 (its first block has q-stride 1):
  the 8x14x14 grid where HOG is predicted. ``pretrain=False`` strides it to 8x7x7.
* The mask arrives on the stride-16 grid ``mask_grid`` (8x14x14 for 16x224x224, flattened
  t, h, w), is resized (nearest) to the patch grid (8x56x56) and replaces patch embeddings
  before the cls token is prepended (spec 4.3).
* Width doubles in the MLP of a stage's last block (residual ``Linear(LN2(x))``); the
  head count doubles and q is strided in the first block of the next stage.

Inputs are channels-last: video ``(B, T, H, W, C)``; with ``num_frames=None`` images
``(B, H, W, C)``, run as T = 1 with 2-D kernels and no temporal relative positions.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maskfeat_jax import sharding
from maskfeat_jax.models import cpu_kernels, layers
from maskfeat_jax.models.layers import Dense, LayerNorm, Mlp, param, pooled_grid
from maskfeat_jax.models.pooling_attention import PoolingAttention, interpolate_rel_pos, max_pool


@dataclasses.dataclass(frozen=True)
class MViTSize:
    embed_dim: int                 # width of the first stage (patch embedding)
    heads: int                     # heads of the first stage
    stages: tuple[int, ...]        # blocks per stage; width and heads double per stage

    @property
    def depth(self) -> int:
        return sum(self.stages)

    @property
    def width(self) -> int:        # the final width (what the heads see)
        return self.embed_dim * 2 ** (len(self.stages) - 1)

    @property
    def stage_starts(self) -> tuple[int, ...]:   # DIM_MUL / HEAD_MUL / q-stride block indices
        return tuple(int(i) for i in np.cumsum(self.stages)[:-1])


PRESETS = {
    "mu": MViTSize(16, 1, (1, 1, 1, 1)),         # tests and smoke runs
    "S": MViTSize(96, 1, (1, 2, 11, 2)),         # 16x4: DIM_MUL at 1, 3, 14
    "B": MViTSize(96, 1, (2, 3, 16, 3)),         # 16x4: DIM_MUL at 2, 5, 21
    "L": MViTSize(144, 2, (2, 6, 36, 4)),        # 16x4: DIM_MUL at 2, 8, 44
}


def parse_variant(variant: str) -> MViTSize:
    if variant not in PRESETS:
        raise ValueError(f"config.model.variant={variant!r}: MViTv2 presets are {sorted(PRESETS)}")
    return PRESETS[variant]


def block_configs(size: MViTSize, pretrain: bool):
    """Per block ``(dim, dim_out, heads, q_stride, kv_stride)``.

    Width and heads double at each stage start (width already in the previous block's MLP);
    q is strided (1, 2, 2) there, except at the last stage in pre-training. The kv stride
    starts at (1, 8, 8) and becomes ``max(kv // q, 1)`` at every block (POOL_KV_STRIDE_ADAPTIVE).
    """
    starts = size.stage_starts
    stage = [sum(i >= s for s in starts) for i in range(size.depth + 1)]
    kv, configs = (1, 8, 8), []
    for i in range(size.depth):
        q = (1, 2, 2) if i in starts and not (pretrain and i == starts[-1]) else (1, 1, 1)
        kv = tuple(max(a // b, 1) for a, b in zip(kv, q))
        configs.append((size.embed_dim * 2 ** stage[i], size.embed_dim * 2 ** stage[i + 1],
                        size.heads * 2 ** stage[i], q, kv))
    return configs


def upsample_mask(mask_BxN, src_thw, dst_thw):
    """Nearest resize of a flattened (t, h, w) mask over H and W (torch 'nearest')."""
    b = mask_BxN.shape[0]
    if src_thw[0] != dst_thw[0] or mask_BxN.shape[1] != np.prod(src_thw):
        raise ValueError(f"mask of shape {mask_BxN.shape} does not match the mask grid {src_thw} "
                         f"(patch grid {dst_thw})")
    ih = np.arange(dst_thw[1]) * src_thw[1] // dst_thw[1]
    iw = np.arange(dst_thw[2]) * src_thw[2] // dst_thw[2]
    m = mask_BxN.reshape(b, *src_thw)[:, :, ih][:, :, :, iw]
    return m.reshape(b, -1)


def load(key: str, value: np.ndarray, shape: tuple) -> np.ndarray:
    """A checkpoint's array for the encoder parameter ``key`` fitted to the model's ``shape``:
    a relative-position table of another length resized linearly (``interpolate_rel_pos``;
    pre-training and fine-tuning tables differ in the last stage, spec 7.3); anything else as
    it is (a shape mismatch left is the caller's error to report)."""
    if (key.split("/")[-1].startswith("rel_pos_") and value.shape[1:] == shape[1:]
            and value.shape[0] != shape[0]):
        return np.asarray(interpolate_rel_pos(jnp.asarray(value), shape[0]))
    return value


class MultiScaleBlock(nnx.Module):
    """Pre-norm block: pooled skip + DropPath(Attn(LN1 x)), then MLP with the width change."""

    def __init__(self, dim, dim_out, heads, thw, q_stride, kv_stride, kernel, drop_path, *,
                 rel_pos_temporal, rngs, dtype, impl, kernels=cpu_kernels.PLAIN):
        self.norm1 = LayerNorm(dim, rngs=rngs, dtype=dtype)
        self.attn = PoolingAttention(dim, heads, thw, q_stride, kv_stride, kernel,
                                     rel_pos_temporal=rel_pos_temporal, rngs=rngs, dtype=dtype, impl=impl,
                                     kernels=kernels)
        self.norm2 = LayerNorm(dim, rngs=rngs, dtype=dtype)
        self.mlp = Mlp(dim, 4 * dim, dim_out, rngs=rngs, dtype=dtype)
        self.proj = Dense(dim, dim_out, ("embed", None), rngs=rngs, dtype=dtype) if dim != dim_out else None
        self.thw, self.q_stride, self.out_thw = tuple(thw), tuple(q_stride), self.attn.q_thw
        self.drop_path = drop_path

    def _skip(self, x_BxNxD):
        if np.prod(self.q_stride) == 1:
            return x_BxNxD
        cls, x = x_BxNxD[:, :1], x_BxNxD[:, 1:]
        x = max_pool(x.reshape(x.shape[0], *self.thw, x.shape[-1]), self.q_stride)
        return jnp.concatenate([cls, x.reshape(x.shape[0], -1, x.shape[-1])], axis=1)

    def __call__(self, x, rng=None):
        r1, r2 = jax.random.split(rng) if rng is not None else (None, None)
        x = self._skip(x) + layers.drop_path(self.attn(self.norm1(x)), self.drop_path, r1)
        xn = self.norm2(x)
        res = x if self.proj is None else self.proj(xn)
        x = res + layers.drop_path(self.mlp(xn), self.drop_path, r2)
        return sharding.constrain(x, ("batch", "length", "act_embed"))


class MViT(nnx.Module):
    """The encoder. ``__call__`` returns ``tokens_BxNxD`` (cls first, on ``grid``) and each
    stage's output ``stage{1..4}_BxNxD`` (the output of its last block); ``block_widths`` is
    each block's output width.

    ``platform`` ('cpu', 'gpu', 'tpu') is the one the program is built for: it picks the kernel
    set (``cpu_kernels``) of the patch embedding and the pooling convolutions."""

    def __init__(self, *, variant="S", num_frames: int | None = 16, image_size=224, in_chans=3,
                 pretrain=True, drop_path=0.0, mask_token=False, dtype=jnp.float32, attention="auto",
                 remat="none", platform="cpu", rngs: nnx.Rngs):
        size = parse_variant(variant)
        self.kernels = cpu_kernels.for_platform(platform)
        rngs = _KeyStream(rngs.params())
        video = num_frames is not None
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        t = num_frames if video else 1
        if h % 16 or w % 16 or (video and t % 2):
            raise ValueError(f"config.input.image_size={image_size} must be a multiple of 16 and "
                             f"num_frames={num_frames} even for MViTv2")
        kt = 3 if video else 1
        self.patch_kernel_size, self.patch_stride = (kt, 7, 7), ((2 if video else 1), 4, 4)
        self.size, self.patch, self.dtype, self.remat = size, 16, dtype, remat
        self.patch_grid = pooled_grid((t, h, w), self.patch_kernel_size, self.patch_stride)
        self.mask_grid = (self.patch_grid[0], h // self.patch, w // self.patch)
        d0 = size.embed_dim
        fan_in = kt * 7 * 7 * in_chans            # PyTorch's default conv-bias init: U(+-1/sqrt(fan_in))
        self.patch_kernel = param(rngs, layers.normal_02, (*self.patch_kernel_size, in_chans, d0),
                                  ("conv_in",) * 4 + ("embed",))
        self.patch_bias = param(rngs, layers.symmetric_uniform(fan_in ** -0.5), (d0,), ("embed",))
        self.cls_token = param(rngs, layers.normal_02, (1, 1, d0), (None, None, "embed"))
        self.mask_token = (param(rngs, layers.normal_02, (1, 1, d0), (None, None, "embed"))
                           if mask_token else None)

        rates = np.linspace(0.0, drop_path, size.depth)
        thw, blocks = self.patch_grid, []
        for i, (dim, dim_out, heads, q_stride, kv_stride) in enumerate(block_configs(size, pretrain)):
            blocks.append(MultiScaleBlock(dim, dim_out, heads, thw, q_stride, kv_stride, (kt, 3, 3),
                                          float(rates[i]), rel_pos_temporal=video, rngs=rngs, dtype=dtype,
                                          impl=attention, kernels=self.kernels))
            thw = blocks[-1].out_thw
        stage_ends = [s - 1 for s in size.stage_starts] + [size.depth - 1]
        self.blocks = nnx.List(blocks)
        self.stage_ends = tuple(stage_ends)
        self.stage_grids = tuple(self.blocks[i].out_thw for i in stage_ends)
        self.block_widths = tuple(c[1] for c in block_configs(size, pretrain))   # each block's output width
        self.grid = thw

    def embed(self, inputs, mask_BxN=None):
        """Patch embedding, mask-token replacement, cls token: ``(B, 1 + N, C0)``."""
        dt = self.dtype
        x = inputs.astype(dt) if inputs.ndim == 5 else inputs.astype(dt)[:, None]
        x = self.kernels.patch_conv(x, self.patch_kernel[...].astype(dt), self.patch_stride)
        if x.shape[1:4] != self.patch_grid:
            raise ValueError(f"input of shape {inputs.shape} gives a {x.shape[1:4]} token grid; the model "
                             f"was built for {self.patch_grid} (config.input sizes)")
        x_BxNxD = x.reshape(x.shape[0], -1, x.shape[-1]) + self.patch_bias[...].astype(dt)[None, None]
        if mask_BxN is not None:
            if self.mask_token is None:
                raise ValueError("a mask was given to an MViT built with mask_token=False")
            m = upsample_mask(mask_BxN, self.mask_grid, self.patch_grid)[..., None].astype(dt)
            x_BxNxD = x_BxNxD * (1 - m) + self.mask_token[...].astype(dt) * m
        cls = jnp.broadcast_to(self.cls_token[...].astype(dt), (x_BxNxD.shape[0], 1, x_BxNxD.shape[-1]))
        x = jnp.concatenate([cls, x_BxNxD], axis=1)
        return sharding.constrain(x, ("batch", "length", "act_embed"))

    def __call__(self, inputs, mask_BxN=None, *, rng=None, return_blocks: bool = False):
        """``return_blocks``: also ``blocks``, every block's output tokens ``(B, 1 + N_i, D_i)``
        (``block_widths``) in order (the last is ``tokens_BxNxD``): multi-depth heads."""
        x = self.embed(inputs, mask_BxN)
        run, out, outs = layers.block_runner(self.remat), {}, []
        for i, blk in enumerate(self.blocks):
            x = run(blk, x, layers.block_rng(rng, i))
            if return_blocks:
                outs.append(x)
            if i in self.stage_ends:
                out[f"stage{self.stage_ends.index(i) + 1}_BxNxD"] = x
        out["tokens_BxNxD"] = x
        if return_blocks:
            out["blocks"] = tuple(outs)
        return out


class _KeyStream:
    """Stands in for ``nnx.Rngs`` in ``layers.param``: one key from the caller's ``Rngs``,
    then ``params()`` folds in a Python counter. ``nnx.Rngs`` updates a traced counter per
    draw, and under tracing (eval_shape, jit of init) each update costs time proportional
    to the trace so far, which MViTv2-L's ~1200 parameters make long."""

    def __init__(self, key):
        self.key, self.count = key, 0

    def params(self):
        self.count += 1
        return jax.random.fold_in(self.key, self.count)
