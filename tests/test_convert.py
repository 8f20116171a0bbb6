"""Official checkpoint conversion: a small PyTorch re-implementation of the official ViT
(PySlowFast names and layouts, written here from the spec; its transformer block in
``official_torch``), saved as a ``.pyth``-like dict, converted with the command, and compared
with our model on the same input and mask; the checkpoints exported back
(``maskfeat_jax.export``) load into it with ``strict=True``."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from maskfeat_jax import checkpoint, convert, export, models, saved as saved_lib  # noqa: E402
from conftest import xla_flags  # noqa: E402
from official_torch import REPO, Block, export_loads_strictly, ln, with_params  # noqa: E402

WIDTH, DEPTH, HEADS, MLP, PATCH, SIZE, CLASSES, HOG_DIM = 32, 2, 2, 64, 16, 32, 10, 108
TINY = ["--config.model.variant=mu/16", f"--config.input.image_size={SIZE}"]
FT = ["--config.task=finetune", f"--config.model.num_classes={CLASSES}"]


# ---------------------------------------------------------------------------------------
# The official ViT forward pass (spec 0, 4.3, 6, 7.1, 7.2), with the official module names
# (its Block and LayerNorm from official_torch).

class PatchEmbed(nn.Module):
    def __init__(self, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class SeparateHead(nn.Module):          # MSSeparateHead with one pretrain depth
    def __init__(self, dim, out):
        super().__init__()
        self.transforms = nn.ModuleList([nn.Sequential(ln(dim))])
        self.projections = nn.ModuleList([nn.Linear(dim, out)])

    def forward(self, x):
        return self.projections[0](self.transforms[0](x)[:, 1:])


class BasicHead(nn.Module):             # TransformerBasicHead (logits, no softmax)
    def __init__(self, dim, classes):
        super().__init__()
        self.projection = nn.Linear(dim, classes)

    def forward(self, x):
        return self.projection(x)


class HOGBuffers(nn.Module):            # HOGLayerC's persistent Sobel buffers
    def __init__(self):
        super().__init__()
        wx = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
        self.register_buffer("weight_x", wx)
        self.register_buffer("weight_y", wx.transpose(2, 3))


class OfficialViT(nn.Module):
    """``MaskMViT`` (pretrain) or ``MViT`` with USE_MEAN_POOLING (finetune) as a ViT."""

    def __init__(self, pretrain: bool):
        super().__init__()
        n = (SIZE // PATCH) ** 2
        self.pretrain = pretrain
        self.patch_embed = PatchEmbed(WIDTH, PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n, WIDTH))
        self.blocks = nn.ModuleList([Block(WIDTH, HEADS, MLP) for _ in range(DEPTH)])
        if pretrain:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
            self.pred_head = SeparateHead(WIDTH, HOG_DIM)
            self.hogs = nn.ModuleList([HOGBuffers()])
        else:
            self.norm = ln(WIDTH)
            self.head = BasicHead(WIDTH, CLASSES)

    def forward(self, x, mask=None):
        x = self.patch_embed(x)
        if self.pretrain:
            m = mask.float().unsqueeze(-1)
            x = x * (1 - m) + self.mask_token.expand_as(x) * m
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        if self.pretrain:
            return self.pred_head(x)                        # HOG predictions of all patch tokens
        return self.head(self.norm(x[:, 1:].mean(1)))


def _official(pretrain: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = OfficialViT(pretrain)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_weight = name.endswith("weight") and p.ndim == 1
            p.copy_((1.0 if is_norm_weight else 0.0) + torch.randn_like(p) * (0.1 if is_norm_weight else 0.3))
    return model.eval()


def _save(model, path, wrap="model_state", prefix=""):
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    obj = sd if wrap is None else {wrap: sd, "epoch": 3, "cfg": "MVIT:\n  USE_MEAN_POOLING: true\n"}
    torch.save(obj, path)
    return sd


# ---------------------------------------------------------------------------------------

def _run(src, out, *extra, check=True):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "maskfeat_jax.convert", f"--src={src}", "--config=configs/demo.py",
           f"--out={out}", *TINY, *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _config(task):
    spec = importlib.util.spec_from_file_location("demo_config", os.path.join(REPO, "configs", "demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.model.variant, c.input.image_size, c.task, c.model.num_classes = "mu/16", SIZE, task, CLASSES
    c.model.attention = "einsum"
    return c


def _jax_model(task, ckpt_dir):
    """Our model with the converted parameters, loaded back as the trainer reads them."""
    saved = saved_lib.flat_params(saved_lib.read_params(ckpt_dir))
    return with_params(lambda: models.build(_config(task), nnx.Rngs(0)), saved)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(3, 3, SIZE, SIZE)).astype(np.float32)
    mask = rng.random((3, (SIZE // PATCH) ** 2)) < 0.5
    mask[0] = [True, False, True, False]          # both kinds of token in every example
    return images, mask


@pytest.fixture(scope="module")
def pretrain_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pt")
    torch_model = _official(pretrain=True)
    _save(torch_model, tmp / "maskfeat_pt.pyth", prefix="module.")   # DDP prefix is stripped
    proc = _run(tmp / "maskfeat_pt.pyth", tmp / "out")
    return torch_model, tmp / "out", proc


def test_pretrain_hog_predictions_match_official(pretrain_ckpt):
    torch_model, out, proc = pretrain_ckpt
    for item in ("state", "data_iter", "config"):                # the trainer's three items
        assert os.path.isdir(out / "checkpoints" / "0" / item), proc.stdout
    images, mask = _inputs()
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(images), torch.from_numpy(mask)).numpy()
    model = _jax_model("pretrain", str(out))
    got = model(jnp.asarray(images.transpose(0, 2, 3, 1)), jnp.asarray(mask))["pred_BxNxK"]
    assert got.shape == expected.shape == (3, 4, HOG_DIM)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=1e-4)
    # the mask matters: the unmasked forward differs
    unmasked = model(jnp.asarray(images.transpose(0, 2, 3, 1)), jnp.zeros_like(jnp.asarray(mask)))["pred_BxNxK"]
    assert np.abs(np.asarray(unmasked) - expected).max() > 1e-2


def test_pretrain_conversion_feeds_init_from_and_resume(pretrain_ckpt):
    torch_model, out, _ = pretrain_ckpt
    from maskfeat_jax import sharding, train
    from maskfeat_jax.data import pipeline, sources
    c = _config("finetune")
    mesh = sharding.make_mesh(c.mesh)
    st = train.setup(c, mesh, 1, 1)
    state = st.init()
    with jax.set_mesh(mesh):
        params = saved_lib.init_from(str(out), state.params, mesh)
    flat = saved_lib.flat_params(params)
    np.testing.assert_array_equal(np.asarray(flat["encoder/blocks/1/mlp/fc2/kernel"]),
                                  torch_model.state_dict()["blocks.1.mlp.fc2.weight"].numpy().T)
    np.testing.assert_array_equal(np.asarray(flat["encoder/pos_embed"]),
                                  torch_model.state_dict()["pos_embed"].numpy())
    # --workdir=OUT resumes at step 0 with the converted weights (state, data iterator, config)
    c = _config("pretrain")
    st = train.setup(c, mesh, 1, 1)
    ckpt = checkpoint.Checkpointer(str(out), 1, 1)
    assert ckpt.latest_step() == 0 and ckpt.saved_config(0)["model"]["variant"] == "mu/16"
    it = iter(pipeline.train_dataset(c, sources.make(c, "train"), st.model.encoder.grid))
    with jax.set_mesh(mesh):
        state = ckpt.restore(0, st.abstract_state, it)
    ckpt.close()
    assert int(state.step) == 0
    np.testing.assert_array_equal(np.asarray(saved_lib.flat_params(state.params)["head/bias"]),
                                  torch_model.state_dict()["pred_head.projections.0.bias"].numpy())
    assert next(it)["image"].shape == (c.input.global_batch_size, SIZE, SIZE, 3)


def test_export_loads_into_the_official_models(pretrain_ckpt, tmp_path):
    torch_model, out, _ = pretrain_ckpt
    export_loads_strictly(out, OfficialViT(pretrain=True), torch_model.state_dict(), tmp_path / "pt.pyth")
    # the backbone alone is what the official fine-tuning model loads: only its head is missing
    export.export(str(out), str(tmp_path / "enc.pyth"), encoder_only=True)
    missing, unexpected = OfficialViT(pretrain=False).load_state_dict(
        torch.load(tmp_path / "enc.pyth", weights_only=True)["model_state"], strict=False)
    assert sorted(missing) == ["head.projection.bias", "head.projection.weight", "norm.bias", "norm.weight"]
    assert unexpected == []


def test_finetune_logits_match_official_and_evaluate(tmp_path):
    torch_model = _official(pretrain=False, seed=1)
    _save(torch_model, tmp_path / "maskfeat_ft.pyth", wrap="model_state")
    _run(tmp_path / "maskfeat_ft.pyth", tmp_path / "out", *FT)
    images, _ = _inputs(1)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(images)).numpy()
    model = _jax_model("finetune", str(tmp_path / "out"))
    got = np.asarray(model(jnp.asarray(images.transpose(0, 2, 3, 1)))["logits_BxC"])
    assert got.shape == expected.shape == (3, CLASSES)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    export_loads_strictly(tmp_path / "out", OfficialViT(pretrain=False), torch_model.state_dict(),
                           tmp_path / "ft.pyth")
    from maskfeat_jax import train
    if not hasattr(train, "evaluate"):
        pytest.skip("train.evaluate (--mode=eval) is not available")
    c = _config("finetune")
    if "probe" in c.evals:
        c.evals.probe = False
    results = train.evaluate(c, str(tmp_path / "out"))     # what `main --mode=eval --workdir=OUT` runs
    assert results["eval/examples"] == 360 and 0.0 <= results["eval/top1"] <= 1.0


def test_unknown_key_is_an_error_naming_it(tmp_path):
    sd = _official(pretrain=True).state_dict()
    sd["blocks.0.attn.extra_gate"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bare.pyth")              # a bare state dict is accepted too
    proc = _run(tmp_path / "bare.pyth", tmp_path / "out", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "blocks.0.attn.extra_gate" in proc.stderr and "not mapped" in proc.stderr
    assert not os.path.exists(tmp_path / "out" / "checkpoints" / "0")


def _targets(task):
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: models.build(_config(task), nnx.Rngs(0)))
    return {k: v.shape for k, v in saved_lib.flat_params(nnx.to_pure_dict(nnx.state(model))).items()}


def _numpy_sd(pretrain):
    return {k: v.numpy() for k, v in _official(pretrain).state_dict().items()}


def test_wrong_shape_is_an_error_naming_the_parameter():
    sd = _numpy_sd(True)
    sd["blocks.1.mlp.fc1.weight"] = np.zeros((MLP + 1, WIDTH), np.float32)
    with pytest.raises(convert.ConversionError) as e:
        convert.convert_state_dict(sd, _targets("pretrain"), "vit", "pretrain")
    msg = str(e.value)
    assert "blocks.1.mlp.fc1.weight" in msg and "encoder/blocks/1/mlp/fc1/kernel" in msg and "(65, 32)" in msg


def test_missing_key_and_task_mismatch_are_errors():
    sd = _numpy_sd(True)
    del sd["blocks.1.attn.qkv.bias"]
    with pytest.raises(convert.ConversionError, match=r"missing[\s\S]*blocks\.1\.attn\.qkv\.bias"):
        convert.convert_state_dict(sd, _targets("pretrain"), "vit", "pretrain")
    # a pre-training checkpoint converted for fine-tuning: told to use task=pretrain, first
    with pytest.raises(convert.ConversionError, match=r"^this is a ViT-mu/16 pre-training checkpoint.* "
                                                      r"use --config\.task=pretrain"):
        convert.convert_state_dict(_numpy_sd(True), _targets("finetune"), "vit", "finetune")


def test_qkv_and_proj_layouts():
    """(3D, D) -> (D, 3, heads, hd) and (D, heads*hd) -> (heads, hd, D) as the official reshape."""
    sd = _numpy_sd(True)
    out = convert.convert_state_dict(sd, _targets("pretrain"), "vit", "pretrain")
    w, hd = sd["blocks.0.attn.qkv.weight"], WIDTH // HEADS
    k = out["encoder/blocks/0/attn/qkv_kernel"]
    for t, h, j in [(0, 0, 0), (1, 1, 3), (2, 1, hd - 1)]:
        np.testing.assert_array_equal(k[:, t, h, j], w[t * WIDTH + h * hd + j])
    p = out["encoder/blocks/0/attn/proj_kernel"]
    np.testing.assert_array_equal(p[1, 2], sd["blocks.0.attn.proj.weight"][:, hd + 2])
    np.testing.assert_array_equal(out["encoder/patch_kernel"][3, 5, 1], sd["patch_embed.proj.weight"][:, 1, 3, 5])


def test_reads_every_checkpoint_wrapping(tmp_path):
    sd = {"module.cls_token": torch.ones(1, 1, 4),
          "module.blocks.0._checkpoint_wrapped_module.norm1.weight": torch.ones(4, dtype=torch.float16)}
    for i, obj in enumerate([{"model_state": sd, "epoch": 1}, {"model": sd}, {"state_dict": sd}, sd]):
        torch.save(obj, tmp_path / f"{i}.pyth")
        got, _ = convert.load_state_dict(str(tmp_path / f"{i}.pyth"))
        assert sorted(got) == ["blocks.0.norm1.weight", "cls_token"]
        assert got["blocks.0.norm1.weight"].dtype == np.float32
    torch.save({"optimizer_state": {}}, tmp_path / "none.pyth")
    with pytest.raises(convert.ConversionError, match="no state dict"):
        convert.load_state_dict(str(tmp_path / "none.pyth"))


def test_official_cfg_semantics_are_checked():
    c = _config("finetune")
    convert.check_official_cfg("MVIT:\n  USE_MEAN_POOLING: true\n  CLS_EMBED_ON: true\n", c)
    with pytest.raises(convert.ConversionError, match="USE_MEAN_POOLING"):
        convert.check_official_cfg("MVIT:\n  USE_MEAN_POOLING: false\n", c)
    with pytest.raises(convert.ConversionError, match="CLS_EMBED_ON"):
        convert.check_official_cfg("MVIT:\n  CLS_EMBED_ON: false\n", _config("pretrain"))


def test_converter_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import maskfeat_jax.convert"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                   env=dict(os.environ, PYTHONPATH=REPO))


# ---------------------------------------------------------------------------------------
# MViTv2 (spec 7.1, 7.3): the official MultiScaleBlock / MultiScaleAttention forward with
# MODE conv, POOL_FIRST False, REL_POS_SPATIAL/TEMPORAL, RESIDUAL_POOLING, USE_ABS_POS False.

MV_FRAMES, MV_SIZE, MV_C0, MV_STAGES = 4, 64, 16, (1, 1, 1, 1)     # the 'mu' preset


def _mvit_blocks(pretrain):
    """Per block (dim, dim_out, heads, q_stride, kv_stride), from the official config rules."""
    starts = list(np.cumsum(MV_STAGES)[:-1])
    depth, out, kv = sum(MV_STAGES), [], [1, 8, 8]
    dim, heads = MV_C0, 1
    for i in range(depth):
        if i in starts:
            heads *= 2                                    # HEAD_MUL at the stage start
        q = [1, 2, 2] if i in starts and not (pretrain and i == starts[-1]) else [1, 1, 1]
        kv = [max(a // b, 1) for a, b in zip(kv, q)]      # POOL_KV_STRIDE_ADAPTIVE
        dim_out = dim * 2 if i + 1 in starts else dim     # DIM_MUL at i + 1: this block's MLP doubles
        out.append((dim, dim_out, heads, q, kv))
        dim = dim_out
    return out


def _pool_tokens(x, op, thw, norm=None):
    """attention_pool: (B, heads, 1 + N, C); cls split off, pooled over (T, H, W), re-attached."""
    cls, x = x[:, :, :1], x[:, :, 1:]
    b, nh, _, c = x.shape
    x = op(x.reshape(b * nh, *thw, c).permute(0, 4, 1, 2, 3))
    new_thw = tuple(x.shape[2:])
    x = torch.cat([cls, x.reshape(b, nh, c, -1).transpose(2, 3)], dim=2)
    return (norm(x) if norm is not None else x), new_thw


def _rel_rows(table, q_len, k_len):
    assert table.shape[0] == 2 * max(q_len, k_len) - 1
    q_ratio, k_ratio = max(k_len / q_len, 1.0), max(q_len / k_len, 1.0)
    dist = (torch.arange(q_len)[:, None] * q_ratio - torch.arange(k_len)[None, :] * k_ratio
            + (k_len - 1) * k_ratio)
    return table[dist.long()]                                   # (q_len, k_len, C)


class MVAttention(nn.Module):
    def __init__(self, dim, heads, thw, q_stride, kv_stride):
        super().__init__()
        hd = dim // heads
        self.heads, self.q_stride, self.kv_stride = heads, q_stride, kv_stride
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        conv = lambda s: nn.Conv3d(hd, hd, 3, stride=s, padding=1, groups=hd, bias=False)  # noqa: E731
        self.pool_q, self.pool_k, self.pool_v = conv(q_stride), conv(kv_stride), conv(kv_stride)
        self.norm_q, self.norm_k, self.norm_v = ln(hd), ln(hd), ln(hd)
        t, h, w = thw
        n_sp = 2 * max(h // q_stride[1], h // kv_stride[1]) - 1
        self.rel_pos_h = nn.Parameter(torch.zeros(n_sp, hd))
        self.rel_pos_w = nn.Parameter(torch.zeros(n_sp, hd))
        self.rel_pos_t = nn.Parameter(torch.zeros(2 * t - 1, hd))

    def forward(self, x, thw):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, q_thw = _pool_tokens(q, self.pool_q, thw, self.norm_q)
        k, k_thw = _pool_tokens(k, self.pool_k, thw, self.norm_k)
        v, _ = _pool_tokens(v, self.pool_v, thw, self.norm_v)
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        rq = q[:, :, 1:].reshape(b, self.heads, *q_thw, -1)
        rt = torch.einsum("bnthwc,tkc->bnthwk", rq, _rel_rows(self.rel_pos_t, q_thw[0], k_thw[0]))
        rh = torch.einsum("bnthwc,hkc->bnthwk", rq, _rel_rows(self.rel_pos_h, q_thw[1], k_thw[1]))
        rw = torch.einsum("bnthwc,wkc->bnthwk", rq, _rel_rows(self.rel_pos_w, q_thw[2], k_thw[2]))
        bias = rt[..., :, None, None] + rh[..., None, :, None] + rw[..., None, None, :]
        attn[:, :, 1:, 1:] += bias.reshape(b, self.heads, int(np.prod(q_thw)), int(np.prod(k_thw)))
        x = attn.softmax(-1) @ v
        x[:, :, 1:] += q[:, :, 1:]                                  # residual pooling
        return self.proj(x.transpose(1, 2).reshape(b, -1, d)), q_thw


class MVBlock(nn.Module):
    def __init__(self, dim, dim_out, heads, thw, q_stride, kv_stride):
        super().__init__()
        self.norm1, self.norm2 = ln(dim), ln(dim)
        self.attn = MVAttention(dim, heads, thw, q_stride, kv_stride)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim_out)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)
        k = [s + 1 if s > 1 else s for s in q_stride]
        self.pool_skip = (nn.MaxPool3d(k, q_stride, [a // 2 for a in k]) if np.prod(q_stride) > 1 else None)

    def forward(self, x, thw):
        y, new_thw = self.attn(self.norm1(x), thw)
        if self.pool_skip is not None:
            x = _pool_tokens(x[:, None], self.pool_skip, thw)[0][:, 0]
        x = x + y
        xn = self.norm2(x)
        mlp = self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(xn)))
        return (self.proj(xn) if hasattr(self, "proj") else x) + mlp, new_thw


class OfficialMViT(nn.Module):
    def __init__(self, pretrain: bool):
        super().__init__()
        self.pretrain = pretrain
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(3, MV_C0, (3, 7, 7), stride=(2, 4, 4), padding=(1, 3, 3))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, MV_C0))
        thw, blocks = (MV_FRAMES // 2, MV_SIZE // 4, MV_SIZE // 4), []
        self.thw = thw
        for dim, dim_out, heads, q, kv in _mvit_blocks(pretrain):
            blocks.append(MVBlock(dim, dim_out, heads, thw, q, kv))
            thw = (thw[0], thw[1] // q[1], thw[2] // q[2])
        self.blocks = nn.ModuleList(blocks)
        width = _mvit_blocks(pretrain)[-1][1]
        if pretrain:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, MV_C0))
            self.pred_head = SeparateHead(width, HOG_DIM)
            self.hogs = nn.ModuleList([HOGBuffers()])
        else:
            self.norm, self.head = ln(width), BasicHead(width, CLASSES)

    def forward(self, x, mask=None):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        if self.pretrain:                 # mask (B, T, h, w), nearest-upsampled to the patch grid
            m = nn.functional.interpolate(mask.float(), size=self.thw[1:]).flatten(1).unsqueeze(-1)
            x = x * (1 - m) + self.mask_token.expand_as(x) * m
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        thw = self.thw
        for blk in self.blocks:
            x, thw = blk(x, thw)
        if self.pretrain:
            return self.pred_head(x)
        return self.head(self.norm(x[:, 1:].mean(1)))


def _mvit_available():
    try:
        from maskfeat_jax.models import mvit
    except ImportError:
        return None
    return mvit if "mu" in getattr(mvit, "PRESETS", {}) else None


@pytest.mark.parametrize("pretrain", [True, False])
def test_mvit_outputs_match_official(pretrain):
    mvit = _mvit_available()
    if mvit is None:
        pytest.skip("maskfeat_jax.models.mvit (with the 'mu' preset) is not available")
    from maskfeat_jax.models import heads
    torch.manual_seed(2)
    tmodel = OfficialMViT(pretrain)
    with torch.no_grad():
        for name, p in tmodel.named_parameters():
            is_norm_weight = name.endswith("weight") and p.ndim == 1
            p.copy_((1.0 if is_norm_weight else 0.0) + torch.randn_like(p) * (0.1 if is_norm_weight else 0.2))
    tmodel.eval()
    sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}

    def build():
        enc = mvit.MViT(variant="mu", num_frames=MV_FRAMES, image_size=MV_SIZE, pretrain=pretrain,
                        mask_token=pretrain, attention="einsum", rngs=nnx.Rngs(0))
        if pretrain:
            return heads.MaskFeat(enc, enc.size.width, HOG_DIM, rngs=nnx.Rngs(1))
        return heads.Classifier(enc, enc.size.width, CLASSES, rngs=nnx.Rngs(1))

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(build)
    targets = {k: v.shape for k, v in saved_lib.flat_params(nnx.to_pure_dict(nnx.state(abstract))).items()}
    converted = convert.convert_state_dict(sd, targets, "mvit", "pretrain" if pretrain else "finetune")
    model = with_params(build, converted)

    rng = np.random.default_rng(3)
    video = rng.normal(size=(2, 3, MV_FRAMES, MV_SIZE, MV_SIZE)).astype(np.float32)
    jvideo = jnp.asarray(video.transpose(0, 2, 3, 4, 1))
    if pretrain:
        mask = rng.random((2, MV_FRAMES // 2, MV_SIZE // 16, MV_SIZE // 16)) < 0.5
        with torch.no_grad():
            expected = tmodel(torch.from_numpy(video), torch.from_numpy(mask)).numpy()
        got = np.asarray(model(jvideo, jnp.asarray(mask.reshape(2, -1)))["pred_BxNxK"])
    else:
        with torch.no_grad():
            expected = tmodel(torch.from_numpy(video)).numpy()
        got = np.asarray(model(jvideo)["logits_BxC"])
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_mvit_pretraining_checkpoint_converts_through_the_command(tmp_path):
    """MViTv2 through ``python -m maskfeat_jax.convert``: the converted weights read back equal,
    and exported back they load into the reference model."""
    if _mvit_available() is None:
        pytest.skip("maskfeat_jax.models.mvit is not available")
    torch.manual_seed(4)
    tmodel = OfficialMViT(True)
    sd = {k: v.detach().clone() for k, v in tmodel.state_dict().items()}
    torch.save({"model_state": sd}, tmp_path / "m.pyth")
    _run(tmp_path / "m.pyth", tmp_path / "out", "--config.model.name=mvit", "--config.model.variant=mu",
         f"--config.video.num_frames={MV_FRAMES}", f"--config.input.image_size={MV_SIZE}",
         "--config.input.dataset=video_demo", f"--config.video.csv_dir={tmp_path / 'videos'}")
    got = saved_lib.read_params(str(tmp_path / "out"))
    np.testing.assert_array_equal(got["encoder"]["cls_token"], sd["cls_token"].numpy())
    np.testing.assert_array_equal(got["head"]["kernel"], sd["pred_head.projections.0.weight"].numpy().T)
    export_loads_strictly(tmp_path / "out", OfficialMViT(True), sd, tmp_path / "mvit.pyth")
