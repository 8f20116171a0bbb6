"""Export to the official layout (``maskfeat_jax.export``), without PyTorch: every transform's
inverse is exact and lays tensors out as the official modules do, every parameter of every
family and task round-trips through the name tables, and the command writes a ``.npz`` that
converts back to the same checkpoint, refusing what it cannot write. (With PyTorch,
tests/test_convert.py loads the exported ``.pyth`` into the PyTorch reference models.)"""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from maskfeat_jax import convert, export, models, official_names, saved as saved_lib

import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [("vit", "pretrain"), ("vit", "finetune"), ("mvit", "pretrain"), ("mvit", "finetune")]
SOBEL_X = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)
PRETRAIN_HEAD = {"mask_token", "pred_head.transforms.0.0.weight", "pred_head.transforms.0.0.bias",
                 "pred_head.projections.0.weight", "pred_head.projections.0.bias",
                 "hogs.0.weight_x", "hogs.0.weight_y"}
CLASSIFIER = {"norm.weight", "norm.bias", "head.projection.weight", "head.projection.bias"}


def _shapes(family, task):
    config = tiny.config(task, family, {"input.global_batch_size": 2048})   # base_config's batch, never read here
    model = models.build_abstract(config)
    return {k: tuple(v.shape) for k, v in saved_lib.flat_params(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


def _random(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


# ---------------------------------------------------------------------------------------
# Transforms and name tables.

TRANSFORM_SHAPES = {                      # ours; every transform needs an entry
    "copy": [(5,), (1, 9, 4)],
    "linear": [(4, 6)],
    "conv": [(2, 3, 3, 5), (3, 2, 3, 3, 5)],          # Conv2d (ViT) and Conv3d (MViTv2) kernels
    "qkv_kernel": [(8, 3, 2, 4)],
    "qkv_bias": [(3, 2, 4)],
    "proj_kernel": [(2, 4, 8)],
    "depthwise": [(3, 3, 3, 4)],
}


def test_every_transform_has_an_exact_inverse():
    assert set(TRANSFORM_SHAPES) == set(official_names.TRANSFORMS)
    rng = np.random.default_rng(0)
    for name, tf in official_names.TRANSFORMS.items():
        for shape in TRANSFORM_SHAPES[name]:
            x = rng.normal(size=shape).astype(np.float32)
            t = tf.to_torch(x)
            assert t.shape == tuple(tf.torch_shape(shape)), name
            np.testing.assert_array_equal(tf.apply(t, shape), x, err_msg=name)


def test_inverse_layouts_are_the_official_ones():
    """Indices written out as the official modules read them, independent of ``apply``."""
    rng = np.random.default_rng(1)
    tf = official_names.TRANSFORMS
    d, heads, hd = 8, 2, 4
    qkv = rng.normal(size=(d, 3, heads, hd))              # Linear rows in (q|k|v, head, channel) order
    w = tf["qkv_kernel"].to_torch(qkv)
    b = tf["qkv_bias"].to_torch(qkv[0])
    for t, h, j in [(0, 0, 0), (1, 1, 2), (2, 1, hd - 1)]:
        np.testing.assert_array_equal(w[t * d + h * hd + j], qkv[:, t, h, j])
        assert b[t * d + h * hd + j] == qkv[0, t, h, j]
    proj = rng.normal(size=(heads, hd, d))                # input columns in (head, channel) order
    np.testing.assert_array_equal(tf["proj_kernel"].to_torch(proj)[:, hd + 3], proj[1, 3])
    conv = rng.normal(size=(3, 5, 7, 2, 6))               # (t, h, w, in, out) -> (out, in, t, h, w)
    assert tf["conv"].to_torch(conv)[4, 1, 2, 3, 5] == conv[2, 3, 5, 1, 4]
    dw = rng.normal(size=(3, 5, 7, 4))                    # depthwise: (channel, 1, t, h, w)
    assert tf["depthwise"].to_torch(dw)[2, 0, 1, 4, 6] == dw[1, 4, 6, 2]
    lin = rng.normal(size=(3, 5))
    assert tf["linear"].to_torch(lin)[4, 1] == lin[1, 4]


@pytest.mark.parametrize("family,task", CASES)
def test_every_parameter_round_trips_exactly(family, task):
    shapes = _shapes(family, task)
    params = _random(shapes)
    sd = export.to_official(params, family, task)
    rules = official_names.rules_for(family, task)
    names = set()
    for k, x in params.items():
        name, tf = official_names.torch_name(rules, k)
        assert sd[name].shape == tuple(tf.torch_shape(x.shape)) and sd[name].dtype == np.float32, k
        names.add(name)
    assert len(names) == len(params)                     # one tensor per parameter
    assert set(sd) - names == ({"hogs.0.weight_x", "hogs.0.weight_y"} if task == "pretrain" else set())
    back = convert.convert_state_dict(sd, shapes, family, task)
    assert set(back) == set(params)
    for k, x in params.items():
        np.testing.assert_array_equal(back[k], x, err_msg=k)
    if family == "mvit":                                 # the MViTv2-only tensors were covered
        assert {"blocks.0.attn.pool_q.weight", "blocks.0.attn.rel_pos_t", "blocks.0.proj.weight"} <= set(sd)
        assert sd["patch_embed.proj.weight"].shape == (16, 3, 3, 7, 7)
    else:
        assert sd["patch_embed.proj.weight"].shape == (32, 3, 16, 16)     # Conv2d, as the official ViT


@pytest.mark.parametrize("family,task", CASES)
def test_encoder_only_drops_exactly_the_head(family, task):
    params = _random(_shapes(family, task))
    full = export.to_official(params, family, task)
    enc = export.to_official(params, family, task, encoder_only=True)
    assert set(full) - set(enc) == (PRETRAIN_HEAD if task == "pretrain" else CLASSIFIER)
    assert set(enc) <= set(full)
    for k in enc:
        np.testing.assert_array_equal(enc[k], full[k])


def _official_vit_shapes(task, width=32, mlp=64, depth=2, patch=16, tokens=5, classes=10):
    """The official ViT state dict's names and shapes, written out from PySlowFast's modules
    (``MViT`` with 2-D patches, ``MaskMViT``'s ``pred_head`` and HOG layer, ``TransformerBasicHead``),
    independently of the name tables the export uses."""
    d = width                          # ViT-mu/16 at 32 px: width 32, MLP 64, 2 blocks, 4 patches
    out = {"patch_embed.proj.weight": (d, 3, patch, patch), "patch_embed.proj.bias": (d,),
           "cls_token": (1, 1, d), "pos_embed": (1, tokens, d)}
    for i in range(depth):
        for name, shape in [("norm1.weight", (d,)), ("norm1.bias", (d,)), ("attn.qkv.weight", (3 * d, d)),
                            ("attn.qkv.bias", (3 * d,)), ("attn.proj.weight", (d, d)), ("attn.proj.bias", (d,)),
                            ("norm2.weight", (d,)), ("norm2.bias", (d,)), ("mlp.fc1.weight", (mlp, d)),
                            ("mlp.fc1.bias", (mlp,)), ("mlp.fc2.weight", (d, mlp)), ("mlp.fc2.bias", (d,))]:
            out[f"blocks.{i}.{name}"] = shape
    if task == "pretrain":
        out.update({"mask_token": (1, 1, d), "pred_head.transforms.0.0.weight": (d,),
                    "pred_head.transforms.0.0.bias": (d,), "pred_head.projections.0.weight": (108, d),
                    "pred_head.projections.0.bias": (108,), "hogs.0.weight_x": (3, 1, 3, 3),
                    "hogs.0.weight_y": (3, 1, 3, 3)})
    else:
        out.update({"norm.weight": (d,), "norm.bias": (d,), "head.projection.weight": (classes, d),
                    "head.projection.bias": (classes,)})
    return out


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_exported_vit_names_and_shapes_are_the_official_ones(task):
    sd = export.to_official(_random(_shapes("vit", task)), "vit", task)
    assert {k: v.shape for k, v in sd.items()} == _official_vit_shapes(task)


def test_hog_buffers_are_the_official_constants():
    params = _random(_shapes("vit", "pretrain"))
    sd = export.to_official(params, "vit", "pretrain")
    assert sd["hogs.0.weight_x"].shape == sd["hogs.0.weight_y"].shape == (3, 1, 3, 3)
    for c in range(3):
        np.testing.assert_array_equal(sd["hogs.0.weight_x"][c, 0], SOBEL_X)
        np.testing.assert_array_equal(sd["hogs.0.weight_y"][c, 0], SOBEL_X.T)
    assert not [k for k in sd if k.startswith("hogs.") and k not in ("hogs.0.weight_x", "hogs.0.weight_y")]


def test_an_unmapped_parameter_is_an_error_naming_it():
    params = _random(_shapes("vit", "pretrain"))
    params["encoder/blocks/0/attn/gate"] = np.zeros(3, np.float32)
    params["adapter/kernel"] = np.zeros((2, 2), np.float32)
    with pytest.raises(export.ExportError) as e:
        export.to_official(params, "vit", "pretrain")
    assert "encoder/blocks/0/attn/gate (3,)" in str(e.value) and "adapter/kernel (2, 2)" in str(e.value)
    assert "qkv" not in str(e.value)
    with pytest.raises(export.ExportError, match="adapter/kernel"):   # with the head dropped too
        export.to_official(params, "vit", "pretrain", encoder_only=True)


# ---------------------------------------------------------------------------------------
# The command.

def _cli(*args, check=True):
    """``python -m maskfeat_jax.export ARGS`` with PyTorch made unimportable."""
    code = ("import runpy, sys; sys.modules['torch'] = None; "
            "runpy.run_module('maskfeat_jax.export', run_name='__main__', alter_sys=True)")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def _demo_config():
    spec = importlib.util.spec_from_file_location("demo_config", os.path.join(REPO, "configs", "demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.model.variant, c.input.image_size, c.input.global_batch_size = "mu/16", 32, 8
    return c


@pytest.fixture(scope="module")
def official_and_workdir(tmp_path_factory):
    """A synthetic official pre-training state dict (with the HOG buffers), and a workdir
    holding it as a checkpoint, written by the import command's ``convert.convert``."""
    tmp = tmp_path_factory.mktemp("export")
    rules = official_names.rules_for("vit", "pretrain")
    rng = np.random.default_rng(5)
    sd = {}
    for k, s in _shapes("vit", "pretrain").items():
        name, tf = official_names.torch_name(rules, k)
        sd[name] = rng.normal(size=tf.torch_shape(s)).astype(np.float32)
    sd["hogs.0.weight_x"] = np.tile(SOBEL_X, (3, 1, 1, 1))
    sd["hogs.0.weight_y"] = np.tile(SOBEL_X.T, (3, 1, 1, 1))
    np.savez(tmp / "official.npz", **sd)
    convert.convert(str(tmp / "official.npz"), _demo_config(), str(tmp / "a"))
    return sd, tmp


def test_command_writes_npz_that_converts_back_to_the_same_checkpoint(official_and_workdir, tmp_path):
    sd, tmp = official_and_workdir
    p = _cli(f"--workdir={tmp / 'a'}", f"--out={tmp_path / 'out' / 'a.npz'}")
    assert "exported 35 tensors" in p.stdout and "config.task='pretrain'" in p.stdout
    with np.load(tmp_path / "out" / "a.npz") as f:
        got = {k: f[k] for k in f.files}
    assert set(got) == set(sd)                           # official -> ours -> official: the identity
    for k, v in sd.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    # back through the import command's path, with the config saved in the workdir
    convert.convert(str(tmp_path / "out" / "a.npz"), saved_lib.saved_config(str(tmp / "a")), str(tmp_path / "b"))
    a = saved_lib.flat_params(saved_lib.read_params(str(tmp / "a")))
    b = saved_lib.flat_params(saved_lib.read_params(str(tmp_path / "b")))
    assert set(a) == set(b) and len(a) == 33
    for k in a:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)

    _cli(f"--workdir={tmp / 'a' / 'checkpoints'}", "--step=0", "--encoder_only", f"--out={tmp_path / 'out' / 'enc.npz'}")
    with np.load(tmp_path / "out" / "enc.npz") as f:
        enc = {k: f[k] for k in f.files}
    assert set(enc) == set(sd) - PRETRAIN_HEAD
    for k, v in enc.items():
        np.testing.assert_array_equal(v, sd[k])
    assert sorted(os.listdir(tmp_path / "out")) == ["a.npz", "enc.npz"]     # no temporary file left


def test_command_refuses_what_it_cannot_write(official_and_workdir, tmp_path, monkeypatch):
    _, tmp = official_and_workdir
    work = str(tmp / "a")
    for out in ("gs://bucket/model.npz", "s3://bucket/model.npz"):
        with pytest.raises(export.ExportError, match=f"--out={out}: export writes a local"):
            export.export(work, out)
    with pytest.raises(export.ExportError, match=r"--out=.*model\.pt: the file name must end in \.npz or \.pyth"):
        export.export(work, str(tmp_path / "model.pt"))
    monkeypatch.setitem(sys.modules, "torch", None)       # as if PyTorch were not installed
    with pytest.raises(export.ExportError, match=r"--out=.*model\.pyth: .*pip install torch"):
        export.export(work, str(tmp_path / "model.pyth"))
    with pytest.raises(export.ExportError, match=r"--step=7: .* holds steps \[0\]"):
        export.export(work, str(tmp_path / "model.npz"), step=7)
    with pytest.raises(export.ExportError, match="no checkpoint found"):
        export.export(str(tmp_path / "empty"), str(tmp_path / "model.npz"))
    p = _cli(f"--workdir={work}", f"--out={tmp_path / 'model.pyth'}", check=False)
    assert p.returncode == 2 and "--out=" in p.stderr and "pip install torch" in p.stderr, p.stderr
    assert os.listdir(tmp_path) == []


def test_exports_from_a_gcs_workdir(official_and_workdir, bucket, tmp_path):
    sd, tmp = official_and_workdir
    from maskfeat_jax import storage
    storage.upload_tree(str(tmp / "a"), f"{bucket}/a")
    export.export(f"{bucket}/a", str(tmp_path / "a.npz"))
    with np.load(tmp_path / "a.npz") as f:
        assert set(f.files) == set(sd)
        for k, v in sd.items():
            np.testing.assert_array_equal(f[k], v, err_msg=k)


def test_a_pyth_without_torch_or_without_the_file_says_which(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.load_state_dict(str(tmp_path / "missing.pyth"))
    (tmp_path / "a.pyth").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)          # torch not installed
    with pytest.raises(convert.ConversionError, match=r"a.pyth: reading .pyth checkpoints needs PyTorch"):
        convert.load_state_dict(str(tmp_path / "a.pyth"))
