"""ViT as MaskFeat uses it (spec 7.1, 7.2): conv patch embedding, cls token, one learned
absolute position table (cls included), pre-norm blocks, no final norm in pre-training.

Video (``num_frames`` set; the official ``k400_VIT_*_16x4`` configs): the patch embedding
is a conv over ``tubelet x p x p`` cubes with the same stride (official ``PATCH_KERNEL`` =
``PATCH_STRIDE`` = (2, 16, 16)), inputs ``(B, T, H, W, C)``, tokens row-major over the
``(T / tubelet, H / p, W / p)`` grid; joint space-time attention over all of them.
``sep_pos_embed`` (official ``SEP_POS_EMBED``, set by those configs) replaces the one table
by a spatial ``(1, h*w, D)``, a temporal ``(1, t, D)`` and a class ``(1, 1, D)`` table; a
token's position is its spatial row plus its temporal row (``pos_table``).

The mask token replaces masked patch embeddings after the patch projection and before
the cls token and position embedding are added (spec 4.3): masked tokens still get
their position. All tokens go through the encoder (no MAE-style dropping) in ``__call__``;
``encode_visible`` runs the same parameters on a fixed number of kept tokens only (MAE,
``mae.py``), its attention chosen for that length (``length``).
"""
from __future__ import annotations

import dataclasses
import math

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maskfeat_jax import platform as platform_lib, sharding
from maskfeat_jax.models import cpu_kernels, layers
from maskfeat_jax.models.layers import LayerNorm, Mlp, param


@dataclasses.dataclass(frozen=True)
class ViTSize:
    width: int
    depth: int
    heads: int
    mlp: int


SIZES = {
    "mu": ViTSize(32, 2, 2, 64),        # tests and smoke runs
    "demo": ViTSize(128, 6, 4, 512),     # the embedded-data demo on a laptop CPU
    "Ti": ViTSize(192, 12, 3, 768),
    "S": ViTSize(384, 12, 6, 1536),
    "B": ViTSize(768, 12, 12, 3072),
    "L": ViTSize(1024, 24, 16, 4096),
    "H": ViTSize(1280, 32, 16, 5120),
}


def parse_variant(variant: str) -> tuple[ViTSize, int]:
    """'B/16' -> (size, patch)."""
    try:
        name, patch = variant.split("/")
        return SIZES[name], int(patch)
    except (ValueError, KeyError):
        raise ValueError(f"config.model.variant={variant!r}: expected '<size>/<patch>' with size in "
                         f"{sorted(SIZES)}, e.g. 'B/16'") from None


def _bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """``(n_out, n_in)``: torch's bicubic resize along one axis (``align_corners=False``:
    half-pixel centres; cubic convolution with ``a = -0.75``; taps clamped to the edges)."""
    def cubic(x):
        x = abs(x)
        return (a + 2) * x**3 - (a + 3) * x**2 + 1 if x <= 1 else a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a

    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        i = math.floor(src)
        t = src - i
        for k, w in zip(range(i - 1, i + 3), (cubic(t + 1), cubic(t), cubic(1 - t), cubic(2 - t))):
            m[o, min(max(k, 0), n_in - 1)] += w
    return m


def resize_pos_embed(pos_1xNxD, n_tokens: int) -> np.ndarray:
    """A position table ``(1, 1 + h*h, D)`` (class token first) resized to ``n_tokens`` rows
    (``1 + h'*h'``): the square patch grid bicubically as torch's ``interpolate(mode='bicubic',
    align_corners=False)`` (MAE's and timm's fine-tuning at another resolution), the class
    token's row as it is."""
    pos = np.asarray(pos_1xNxD, np.float32)
    h, h2 = math.isqrt(pos.shape[1] - 1), math.isqrt(n_tokens - 1)
    if h * h != pos.shape[1] - 1 or h2 * h2 != n_tokens - 1:
        raise ValueError(f"position table of {pos.shape[1]} rows -> {n_tokens}: only square patch grids "
                         f"(plus the class token) are resized")
    grid = pos[0, 1:].reshape(h, h, -1)
    m = _bicubic_matrix(h, h2)
    resized = np.einsum("oh,hwd,pw->opd", m, grid, m).reshape(1, h2 * h2, -1)
    return np.concatenate([pos[:, :1], resized.astype(np.float32)], axis=1)


def load(key: str, value: np.ndarray, shape: tuple) -> np.ndarray:
    """A checkpoint's array for the encoder parameter ``key`` fitted to the model's ``shape``:
    the position table of another image size resized (``resize_pos_embed``); anything else as
    it is (a shape mismatch left is the caller's error to report)."""
    if key.split("/")[-1] == "pos_embed" and value.shape[::2] == shape[::2] and value.shape != shape:
        return resize_pos_embed(value, shape[1])
    return value


class Attention(nnx.Module):
    """Multi-head self-attention; ``choice`` is the ``platform.Attention`` for its length."""

    def __init__(self, dim, heads, *, rngs, dtype, choice, kernels=cpu_kernels.PLAIN):
        hd = dim // heads
        self.qkv_kernel = param(rngs, layers.normal_02, (dim, 3, heads, hd), ("embed", None, "heads", "kv"))
        self.qkv_bias = param(rngs, layers.const_02, (3, heads, hd), (None, "heads", "kv"))
        self.proj_kernel = param(rngs, layers.normal_02, (heads, hd, dim), ("heads", "kv", "embed"))
        self.proj_bias = param(rngs, layers.const_02, (dim,), ("embed",))
        self.dtype, self.choice, self.kernels = dtype, choice, kernels

    def __call__(self, x_BxNxD):
        dt = self.dtype
        # (3, H, K) stay the kernel's minor axes: one (B*N, D) x (D, 3*H*K) matmul (3 = q, k, v)
        qkv = self.kernels.project_in(x_BxNxD, self.qkv_kernel[...], dt)
        qkv = (qkv + layers.to_rank(self.qkv_bias[...], qkv.ndim)).astype(dt)
        out_BxNxHxK = layers.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.choice)
        out_BxNxHxK = sharding.constrain(out_BxNxHxK, ("batch", "length", "act_heads", "kv"))
        y = self.kernels.project_out(out_BxNxHxK, self.proj_kernel[...], dt)
        return (y + layers.to_rank(self.proj_bias[...], y.ndim)).astype(dt)


class Block(nnx.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then the same for the MLP."""

    def __init__(self, dim, heads, mlp, drop_path, *, rngs, dtype, choice, kernels):
        self.norm1 = LayerNorm(dim, rngs=rngs, dtype=dtype)
        self.attn = Attention(dim, heads, rngs=rngs, dtype=dtype, choice=choice, kernels=kernels)
        self.norm2 = LayerNorm(dim, rngs=rngs, dtype=dtype)
        self.mlp = Mlp(dim, mlp, dim, rngs=rngs, dtype=dtype)
        self.drop_path = drop_path

    def __call__(self, x, rng=None):
        r1, r2 = jax.random.split(rng) if rng is not None else (None, None)
        x = x + layers.drop_path(self.attn(self.norm1(x)), self.drop_path, r1)
        x = x + layers.drop_path(self.mlp(self.norm2(x)), self.drop_path, r2)
        return sharding.constrain(x, ("batch", "length", "act_embed"))


class ViT(nnx.Module):
    """The encoder. ``__call__`` returns a dict with ``tokens_BxNxD`` (cls first).

    ``platform`` ('cpu', 'gpu', 'tpu') is the one the program is built for: it picks the
    attention implementation (``self.attention``) and the kernel set (``cpu_kernels``)."""

    def __init__(self, *, variant="B/16", image_size=224, in_chans=3, drop_path=0.0,
                 mask_token=False, dtype=jnp.float32, attention="auto", remat="none",
                 platform="cpu", length: int | None = None, num_frames: int | None = None,
                 tubelet: int = 2, sep_pos_embed: bool = False, rngs: nnx.Rngs):
        """``length``: the tokens the blocks attend over, cls included (default: every patch + 1;
        MAE: the kept patches + 1), which picks the attention implementation's padding.
        ``num_frames``: video input of that many frames, cut into ``tubelet``-frame cubes
        (None: images); ``sep_pos_embed``: separate space and time position tables."""
        size, p = parse_variant(variant)
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if h % p or w % p:
            raise ValueError(f"config.input.image_size={image_size} is not a multiple of the patch size {p}")
        self.video = num_frames is not None
        u = tubelet if self.video else 1
        if self.video and (u < 1 or num_frames % u):
            raise ValueError(f"config.video.num_frames={num_frames} is not a multiple of config.model.tubelet={u}")
        self.size, self.patch, self.tubelet = size, p, u
        self.grid = (num_frames // u, h // p, w // p) if self.video else (h // p, w // p)
        self.patch_stride = (u, p, p)
        n, d = math.prod(self.grid), size.width
        fan_in = u * p * p * in_chans  # PyTorch's default conv-bias init: U(+-1/sqrt(fan_in))
        kernel = (u, p, p, in_chans, d) if self.video else (p, p, in_chans, d)
        self.patch_kernel = param(rngs, layers.normal_02, kernel, ("conv_in",) * (len(kernel) - 1) + ("embed",))
        self.patch_bias = param(rngs, layers.symmetric_uniform(fan_in ** -0.5), (d,), ("embed",))
        self.cls_token = param(rngs, layers.normal_02, (1, 1, d), (None, None, "embed"))
        self.sep_pos_embed = sep_pos_embed
        if sep_pos_embed:    # official pos_embed_spatial / _temporal / _class
            t, hw = (self.grid[0], n // self.grid[0]) if self.video else (1, n)
            self.pos_embed_spatial = param(rngs, layers.normal_02, (1, hw, d), (None, "length", "embed"))
            self.pos_embed_temporal = param(rngs, layers.normal_02, (1, t, d), (None, "length", "embed"))
            self.pos_embed_class = param(rngs, layers.normal_02, (1, 1, d), (None, None, "embed"))
        else:
            self.pos_embed = param(rngs, layers.normal_02, (1, n + 1, d), (None, "length", "embed"))
        self.mask_token = param(rngs, layers.normal_02, (1, 1, d), (None, None, "embed")) if mask_token else None
        self.attention = platform_lib.select_attention(attention, platform, dtype, length or n + 1,
                                                       d // size.heads)
        self.kernels = cpu_kernels.for_platform(platform)
        rates = [drop_path * i / max(size.depth - 1, 1) for i in range(size.depth)]
        self.blocks = nnx.List([Block(d, size.heads, size.mlp, r, rngs=rngs, dtype=dtype,
                                      choice=self.attention, kernels=self.kernels) for r in rates])
        self.block_widths = (d,) * size.depth      # each block's output width (multi-depth heads)
        self.dtype, self.remat = dtype, remat

    def _patches(self, images):
        """Images ``(B, H, W, C)`` or clips ``(B, T, H, W, C)`` -> ``(B, N, P)``, each token's
        pixels in the kernel's (frame, row, column, channel) order."""
        x, p = images.astype(self.dtype), self.patch
        if not self.video:
            return einops.rearrange(x, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)
        if x.ndim != 5 or x.shape[1] != self.grid[0] * self.tubelet:
            raise ValueError(f"input of shape {images.shape}: the video ViT was built for clips of "
                             f"{self.grid[0] * self.tubelet} frames (B, T, H, W, C)")
        return einops.rearrange(x, "b (t u) (h p) (w q) c -> b (t h w) (u p q c)", u=self.tubelet, p=p, q=p)

    def pos_table(self):
        """The position embedding of every token, ``(1, 1 + N, D)`` (cls first): the one table,
        or with ``sep_pos_embed`` the class row, then per token (t, s) of the row-major grid
        ``spatial[s] + temporal[t]`` (official ``repeat`` / ``repeat_interleave``)."""
        if not self.sep_pos_embed:
            return self.pos_embed[...]
        sp, tm = self.pos_embed_spatial[...], self.pos_embed_temporal[...]
        grid_1xTxSxD = sp[:, None] + tm[:, :, None]
        return jnp.concatenate([self.pos_embed_class[...], grid_1xTxSxD.reshape(1, -1, sp.shape[-1])], axis=1)

    def _project(self, patches_BxNxP):
        dt = self.dtype
        kernel = self.patch_kernel[...].reshape(-1, self.size.width)
        return (layers.einsum("bnp,pd->bnd", patches_BxNxP, kernel, dt) + self.patch_bias[...][None, None]).astype(dt)

    def embed(self, images_BxHxWxC, mask_BxN=None):
        dt = self.dtype
        x_BxNxD = self._project(self._patches(images_BxHxWxC))
        if mask_BxN is not None:
            m = mask_BxN[..., None].astype(dt)
            x_BxNxD = x_BxNxD * (1 - m) + self.mask_token[...].astype(dt) * m
        cls = jnp.broadcast_to(self.cls_token[...].astype(dt), (x_BxNxD.shape[0], 1, self.size.width))
        x = jnp.concatenate([cls, x_BxNxD], axis=1) + self.pos_table().astype(dt)
        return sharding.constrain(x, ("batch", "length", "act_embed"))

    def embed_visible(self, images_BxHxWxC, keep_BxV):
        """cls + the patches at indices ``keep_BxV`` (row-major over the grid, (t, h, w) for
        video), each with its position: ``(B, 1 + V, D)``. The patches are gathered before the
        projection, so a dropped patch's pixels reach nothing."""
        dt = self.dtype
        patches_BxVxP = jnp.take_along_axis(self._patches(images_BxHxWxC), keep_BxV[..., None], axis=1)
        x_BxVxD = self._project(patches_BxVxP)
        pos = self.pos_table().astype(dt)
        pos_BxVxD = jnp.take(pos[0, 1:], keep_BxV, axis=0)
        b = x_BxVxD.shape[0]
        cls = jnp.broadcast_to(self.cls_token[...].astype(dt), (b, 1, self.size.width))
        pos = jnp.concatenate([jnp.broadcast_to(pos[:, :1], (b, 1, self.size.width)), pos_BxVxD], axis=1)
        x = jnp.concatenate([cls, x_BxVxD], axis=1) + pos
        return sharding.constrain(x, ("batch", "length", "act_embed"))

    def _blocks(self, x, rng, return_blocks: bool = False):
        run = layers.block_runner(self.remat)
        outs = []
        for i, blk in enumerate(self.blocks):
            x = run(blk, self.kernels.boundary(x), layers.block_rng(rng, i))
            if return_blocks and i < len(self.blocks) - 1:
                outs.append(self.kernels.boundary(x))
        out = {"tokens_BxNxD": self.kernels.boundary(x)}
        if return_blocks:
            out["blocks"] = (*outs, out["tokens_BxNxD"])
        return out

    def __call__(self, images_BxHxWxC, mask_BxN=None, *, rng=None, return_blocks: bool = False):
        """``return_blocks``: also ``blocks``, every block's output tokens ``(B, 1 + N, D)`` in
        order (the last is ``tokens_BxNxD``): multi-depth heads, a teacher's features."""
        return self._blocks(self.embed(images_BxHxWxC, mask_BxN), rng, return_blocks)

    def encode_visible(self, images_BxHxWxC, keep_BxV, *, rng=None):
        """The blocks on cls + the kept patches only (``embed_visible``): ``tokens_BxNxD`` is
        ``(B, 1 + V, D)``, in ``keep_BxV``'s order."""
        return self._blocks(self.embed_visible(images_BxHxWxC, keep_BxV), rng)
