"""Official parity of the video ViT (``configs/vit_k400_mae.py``): a small PyTorch
re-implementation of PySlowFast's ``MaskMViT`` with ``MASK.MAE_ON`` (k400_VIT_B_16x4_MAE_PT:
SEP_POS_EMBED, PATCH_KERNEL = PATCH_STRIDE = (2, 16, 16), CLS_EMBED_ON, MAE_RND_MASK, HEAD_TYPE
separate_xformer; DECODER_SEP_POS_EMBED off and on) and of its fine-tuning ``MViT``
(k400_VIT_B_16x4_FT: SEP_POS_EMBED, USE_MEAN_POOLING), with the official module names, written
here from ``slowfast/models/masked.py`` (``_mae_random_masking``, ``_mae_forward_encoder``,
``_mae_forward_decoder``), ``video_model_builder.MViT.forward`` and ``head_helper``; its state
dicts converted (``convert.convert_state_dict``) into our models built from ``tiny.config``
and compared on the same clips and kept tokens; our checkpoints exported back
(``maskfeat_jax.export``) load into it with ``strict=True``.

The official MAE encoder keeps its tokens in the random (shuffled) order of ``ids_keep``; ours
takes the kept indices ascending: with positions travelling with the tokens and attention
equivariant to their order, the predictions of every patch must agree."""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from maskfeat_jax import convert, export, models, saved as saved_lib  # noqa: E402
from conftest import xla_flags  # noqa: E402
from official_torch import REPO, Block, export_loads_strictly, ln, with_params  # noqa: E402
from references import MAE, VIDEO  # noqa: E402

import tiny  # noqa: E402

# ViT-mu/16 on 4 frames of 32x32: a (2, 2, 2) grid of 2x16x16 tubelets, 8 tokens, 4 kept
WIDTH, DEPTH, HEADS, MLP = 32, 2, 2, 64
FRAMES, SIZE, PATCH, TUBELET, CLASSES = 4, 32, 16, 2, 10
GRID = (FRAMES // TUBELET, SIZE // PATCH, SIZE // PATCH)
N = GRID[0] * GRID[1] * GRID[2]
MASK_RATIO, DEC_DIM, DEC_DEPTH, DEC_HEADS = 0.5, 16, 2, 2
PIXELS = PATCH * PATCH * 3                 # TIME_STRIDE_LOSS: one frame's pixels per token
MAE_2 = {**MAE, "mae.mask_ratio": MASK_RATIO, "mae.decoder_dim": DEC_DIM, "mae.decoder_depth": DEC_DEPTH,
         "mae.decoder_heads": DEC_HEADS}


# ---------------------------------------------------------------------------------------
# The official video ViT, with the official module names.

def _sep_pos(spatial, temporal):
    """SEP_POS_EMBED: ``spatial.repeat(1, T, 1) + repeat_interleave(temporal, H*W, dim=1)``."""
    return spatial.repeat(1, GRID[0], 1) + torch.repeat_interleave(temporal, GRID[1] * GRID[2], dim=1)


class BasicHead(nn.Module):                 # TransformerBasicHead (logits, no softmax)
    def __init__(self, dim, classes):
        super().__init__()
        self.projection = nn.Linear(dim, classes)


class XformerHead(nn.Module):               # MSSeparateHead, separate_xformer, one pretrain depth
    def __init__(self, dim, depth, heads, out):
        super().__init__()
        self.transforms = nn.ModuleList([nn.Sequential(*[Block(dim, heads, 4 * dim) for _ in range(depth)],
                                                       ln(dim))])
        self.projections = nn.ModuleList([nn.Linear(dim, out)])

    def forward(self, x):                   # return_all: every patch token's prediction (cls dropped)
        return self.projections[0](self.transforms[0](x)[:, 1:])


class OfficialVideoViT(nn.Module):
    """``MaskMViT`` with MAE_ON (``pretrain``) or ``MViT`` with USE_MEAN_POOLING, as a video ViT."""

    def __init__(self, pretrain: bool, dec_sep_pos: bool = False):
        super().__init__()
        t, h, w = GRID
        self.pretrain, self.dec_sep_pos = pretrain, dec_sep_pos
        self.patch_embed = nn.Module()      # stem_helper.PatchEmbed
        self.patch_embed.proj = nn.Conv3d(3, WIDTH, (TUBELET, PATCH, PATCH), stride=(TUBELET, PATCH, PATCH))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos_embed_spatial = nn.Parameter(torch.zeros(1, h * w, WIDTH))
        self.pos_embed_temporal = nn.Parameter(torch.zeros(1, t, WIDTH))
        self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.blocks = nn.ModuleList([Block(WIDTH, HEADS, MLP) for _ in range(DEPTH)])
        self.norm = ln(WIDTH)               # MAE: after the encoder; fine-tuning: after the mean
        if not pretrain:
            self.head = BasicHead(WIDTH, CLASSES)
            return
        self.pred_head = XformerHead(DEC_DIM, DEC_DEPTH, DEC_HEADS, PIXELS)
        self.decoder_embed = nn.Linear(WIDTH, DEC_DIM)
        if dec_sep_pos:
            self.dec_pos_embed_spatial = nn.Parameter(torch.zeros(1, h * w, DEC_DIM))
            self.dec_pos_embed_temporal = nn.Parameter(torch.zeros(1, t, DEC_DIM))
            self.dec_pos_embed_class = nn.Parameter(torch.zeros(1, 1, DEC_DIM))
        else:
            self.decoder_pos_embed = nn.Parameter(torch.zeros(1, N + 1, DEC_DIM))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, DEC_DIM))

    def _embed(self, x):
        return self.patch_embed.proj(x).flatten(2).transpose(1, 2)     # (B, T*H*W, C), (t, h, w) order

    def forward(self, x, noise=None):
        x = self._embed(x)
        b, n, d = x.shape
        pos = _sep_pos(self.pos_embed_spatial, self.pos_embed_temporal)
        if not self.pretrain:               # MViT.forward: cls, positions, blocks, mean, norm, head
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], 1) + torch.cat([self.pos_embed_class, pos], 1)
            for blk in self.blocks:
                x = blk(x)
            return self.head.projection(self.norm(x[:, 1:].mean(1)))
        # _mae_random_masking
        len_keep = int(n * (1 - MASK_RATIO))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones(b, n)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        # _mae_forward_encoder
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], 1)
        pos = torch.gather(pos.expand(b, -1, -1), 1, ids_keep.unsqueeze(-1).repeat(1, 1, d))
        x = x + torch.cat([self.pos_embed_class.expand(b, -1, -1), pos], 1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        # _mae_forward_decoder
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(b, n + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:], mask_tokens], 1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x_.shape[2]))       # unshuffle
        x = torch.cat([x[:, :1], x_], 1)
        if self.dec_sep_pos:
            dec_pos = _sep_pos(self.dec_pos_embed_spatial, self.dec_pos_embed_temporal)
            x = x + torch.cat([self.dec_pos_embed_class, dec_pos], 1)
        else:
            x = x + self.decoder_pos_embed
        return self.pred_head(x), mask.bool(), ids_keep


def _official(pretrain: bool, dec_sep_pos: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = OfficialVideoViT(pretrain, dec_sep_pos)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_weight = name.endswith("weight") and p.ndim == 1
            p.copy_((1.0 if is_norm_weight else 0.0) + torch.randn_like(p) * (0.1 if is_norm_weight else 0.3))
    return model.eval()


# ---------------------------------------------------------------------------------------
# Ours.

def _config(task, dec_sep_pos=False):
    if task == "finetune":
        return tiny.config("finetune", overrides=VIDEO)
    return tiny.config(overrides={**MAE_2, "mae.decoder_sep_pos_embed": dec_sep_pos})


def _converted(tmodel, c):
    """The torch model's state dict converted onto the model of ``c``, and that model (jitted)."""
    def build():
        return models.build(c, nnx.Rngs(0), "cpu")

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(build)
    targets = {k: v.shape for k, v in saved_lib.flat_params(nnx.to_pure_dict(nnx.state(abstract))).items()}
    sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    converted = convert.convert_state_dict(sd, targets, "vit", c.task)
    return converted, with_params(build, converted)


def _exported_loads_strictly(converted, task, fresh, expected):
    """``export.to_official`` of the converted parameters loads into ``fresh`` with ``strict=True``,
    every tensor equal to the original."""
    sd = export.to_official(converted, "vit", task)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    assert set(fresh.state_dict()) == set(expected)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k]), k


def _clips(seed):
    rng = np.random.default_rng(seed)
    video = rng.normal(size=(3, 3, FRAMES, SIZE, SIZE)).astype(np.float32)    # torch (B, C, T, H, W)
    return video, jnp.asarray(video.transpose(0, 2, 3, 4, 1))                # ours (B, T, H, W, C)


@pytest.mark.parametrize("dec_sep_pos", [False, True], ids=["decoder_pos_embed", "dec_pos_embed_sep"])
def test_mae_predictions_match_official(dec_sep_pos):
    tmodel = _official(True, dec_sep_pos, seed=1 + dec_sep_pos)
    converted, model = _converted(tmodel, _config("pretrain", dec_sep_pos))
    assert ("dec_pos_embed_spatial" in converted) == dec_sep_pos
    assert ("pos_embed" in converted) != dec_sep_pos
    assert "decoder/blocks/1/attn/qkv_kernel" in converted and "norm/scale" in converted   # depth 2

    video, jvideo = _clips(3)
    noise = torch.from_numpy(np.random.default_rng(4).random((3, N)).astype(np.float32))
    with torch.no_grad():
        expected, mask, ids_keep = tmodel(torch.from_numpy(video), noise)
    expected, mask, ids_keep = expected.numpy(), mask.numpy(), ids_keep.numpy()
    assert ids_keep.shape == (3, N // 2)
    # the official kept order is the shuffled one: not ascending, here, for every example
    assert all(np.any(np.diff(row) < 0) for row in ids_keep), ids_keep
    keep = np.sort(ids_keep, axis=1).astype(np.int32)
    ours_mask = np.ones((3, N), bool)
    np.put_along_axis(ours_mask, keep, False, axis=1)
    np.testing.assert_array_equal(ours_mask, mask)

    out = model(jvideo, jnp.asarray(keep))
    got = np.asarray(out["pred_BxNxK"])
    assert out["tokens_BxNxD"].shape == (3, 1 + N // 2, WIDTH)
    assert got.shape == expected.shape == (3, N, PIXELS)
    np.testing.assert_allclose(got[mask], expected[mask], atol=1e-4, rtol=1e-4)    # the loss's tokens
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)                # and the kept ones
    # the kept set matters: another one gives other predictions
    other = np.asarray(model(jvideo, jnp.asarray(np.sort((keep + 1) % N, axis=1)))["pred_BxNxK"])
    assert np.abs(other - expected).max() > 1e-2

    _exported_loads_strictly(converted, "pretrain", OfficialVideoViT(True, dec_sep_pos), tmodel.state_dict())


def test_finetune_logits_match_official():
    tmodel = _official(False, seed=5)
    converted, model = _converted(tmodel, _config("finetune"))
    video, jvideo = _clips(6)
    with torch.no_grad():
        expected = tmodel(torch.from_numpy(video)).numpy()
    got = np.asarray(model(jvideo)["logits_BxC"])
    assert got.shape == expected.shape == (3, CLASSES)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    _exported_loads_strictly(converted, "finetune", OfficialVideoViT(False), tmodel.state_dict())


def test_mae_checkpoint_converts_through_the_command_and_exports_back(tmp_path):
    """``python -m maskfeat_jax.convert`` with ``configs/vit_k400_mae.py`` (sized as the tiny MAE):
    the saved parameters are the in-process conversion's (whose predictions match above), and
    ``maskfeat_jax.export`` of the workdir loads into the official model with ``strict=True``."""
    tmodel = _official(True, seed=7)
    sd = {k: v.detach().clone() for k, v in tmodel.state_dict().items()}
    torch.save({"model_state": {"module." + k: v for k, v in sd.items()}, "epoch": 200,
                "cfg": "MVIT:\n  CLS_EMBED_ON: true\n  SEP_POS_EMBED: true\nMASK:\n  MAE_ON: true\n"},
               tmp_path / "mae_pt.pyth")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "maskfeat_jax.convert", f"--src={tmp_path / 'mae_pt.pyth'}",
           "--config=configs/vit_k400_mae.py:B,runlocal", f"--out={tmp_path / 'out'}",
           f"--config.input.image_size={SIZE}", f"--config.video.num_frames={FRAMES}",
           f"--config.mae.mask_ratio={MASK_RATIO}", f"--config.mae.decoder_dim={DEC_DIM}",
           f"--config.mae.decoder_depth={DEC_DEPTH}", f"--config.mae.decoder_heads={DEC_HEADS}",
           f"--config.video.csv_dir={tmp_path / 'videos'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    saved = saved_lib.flat_params(saved_lib.read_params(str(tmp_path / "out")))
    converted, _ = _converted(tmodel, _config("pretrain"))
    assert set(saved) == set(converted)
    for k, v in converted.items():
        np.testing.assert_array_equal(np.asarray(saved[k]), v, err_msg=k)
    export_loads_strictly(tmp_path / "out", OfficialVideoViT(True), sd, tmp_path / "back.pyth")
