"""What ``python -m maskfeat_jax.convert`` says about the usual mistakes: a checkpoint of another
kind (pre-training vs fine-tuning), family or size than the config builds, and a damaged file.
Its first line names the mistake and the fix; exit code 2, no traceback, no output written.

The official state dicts are built here as numpy arrays with the official names and layouts
(PySlowFast ``MViT`` / ``MaskMViT``, as ``test_convert.py``'s PyTorch models hold them), so
only the tests that write or read ``.pyth`` files need PyTorch."""
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from maskfeat_jax import convert, models, official_names, saved as saved_lib
from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOG_DIM = 108
VIT_MU = dict(width=32, depth=2, mlp=64, patch=16)                     # configs/demo.py at TINY
TINY = ["--config.model.variant=mu/16", "--config.input.image_size=32"]
MV_TINY = ["--config.model.variant=mu", "--config.video.num_frames=4", "--config.input.image_size=64"]


# ---------------------------------------------------------------------------------------
# Official state dicts as {name: shape}.

def _linear(name, n_out, n_in):
    return {f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)}


def _ln(name, d):
    return {f"{name}.weight": (d,), f"{name}.bias": (d,)}


def _head(task, width, embed, classes):
    if task == "pretrain":          # MaskMViT: mask token, MSSeparateHead, HOGLayerC buffers
        return {"mask_token": (1, 1, embed), **_ln("pred_head.transforms.0.0", width),
                **_linear("pred_head.projections.0", HOG_DIM, width),
                "hogs.0.weight_x": (3, 1, 3, 3), "hogs.0.weight_y": (3, 1, 3, 3)}
    return {**_ln("norm", width), **_linear("head.projection", classes, width)}


def vit_shapes(width, depth, mlp, patch, task, classes=10, tokens=4):
    s = {"patch_embed.proj.weight": (width, 3, patch, patch), "patch_embed.proj.bias": (width,),
         "cls_token": (1, 1, width), "pos_embed": (1, 1 + tokens, width)}
    for i in range(depth):
        s.update({**_ln(f"blocks.{i}.norm1", width), **_linear(f"blocks.{i}.attn.qkv", 3 * width, width),
                  **_linear(f"blocks.{i}.attn.proj", width, width), **_ln(f"blocks.{i}.norm2", width),
                  **_linear(f"blocks.{i}.mlp.fc1", mlp, width), **_linear(f"blocks.{i}.mlp.fc2", width, mlp)})
    return {**s, **_head(task, width, width, classes)}


def mvit_shapes(embed, heads, stages, task, classes=10, frames=4, size=64):
    """MViTv2 (MODE conv, 3x3x3 pooling kernels, rel. positions, POOL_KV_STRIDE_ADAPTIVE from
    (1, 8, 8)): width and heads double at each stage start, the width already in the MLP of
    the block before it; q is strided there, except at the last stage in pre-training."""
    starts = list(np.cumsum(stages)[:-1])
    s = {"patch_embed.proj.weight": (embed, 3, 3, 7, 7), "patch_embed.proj.bias": (embed,),
         "cls_token": (1, 1, embed)}
    t, h, kv, dim = frames // 2, size // 4, 8, embed
    for i in range(sum(stages)):
        heads *= 2 if i in starts else 1
        q = 2 if i in starts and not (task == "pretrain" and i == starts[-1]) else 1
        kv = max(kv // q, 1)
        dim_out, hd, b = dim * 2 if i + 1 in starts else dim, dim // heads, f"blocks.{i}"
        s.update({**_ln(f"{b}.norm1", dim), **_linear(f"{b}.attn.qkv", 3 * dim, dim),
                  **_linear(f"{b}.attn.proj", dim, dim), **_ln(f"{b}.norm2", dim),
                  **_linear(f"{b}.mlp.fc1", 4 * dim, dim), **_linear(f"{b}.mlp.fc2", dim_out, 4 * dim),
                  f"{b}.attn.rel_pos_h": (2 * max(h // q, h // kv) - 1, hd),
                  f"{b}.attn.rel_pos_w": (2 * max(h // q, h // kv) - 1, hd), f"{b}.attn.rel_pos_t": (2 * t - 1, hd)})
        for x in "qkv":
            s.update({f"{b}.attn.pool_{x}.weight": (hd, 1, 3, 3, 3), **_ln(f"{b}.attn.norm_{x}", hd)})
        if dim_out != dim:
            s.update(_linear(f"{b}.proj", dim_out, dim))
        h, dim = h // q, dim_out
    return {**s, **_head(task, dim, embed, classes)}


def _arrays(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items()}


def _zeros(shapes):           # full-size checkpoints without the memory: read-only zero views
    return {k: np.broadcast_to(np.float32(0), v) for k, v in shapes.items()}


def _config(name, *overrides):
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs", name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    for o in overrides:
        key, value = o[len("--config."):].split("=")
        *path, leaf = key.split(".")
        group = c
        for p in path:
            group = group[p]
        group[leaf] = type(group[leaf])(value)
    return c


def _targets(config):
    from flax import nnx
    model = models.build_abstract(config)
    return {k: v.shape for k, v in saved_lib.flat_params(nnx.to_pure_dict(nnx.state(model))).items()}


def _error(sd, config):
    with pytest.raises(convert.ConversionError) as e:
        convert.convert_state_dict(sd, _targets(config), config.model.name, config.task)
    return str(e.value)


def _run(src, out, config, *extra):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "maskfeat_jax.convert", f"--src={src}", f"--config=configs/{config}",
           f"--out={out}", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not os.path.exists(out), os.listdir(out)
    return proc.stderr.splitlines()[0]


# ---------------------------------------------------------------------------------------

def test_kind_is_read_from_the_tensors():
    kinds = {
        "a ViT-B/16 pre-training": vit_shapes(768, 12, 3072, 16, "pretrain"),
        "a ViT-L/14 fine-tuning (1000 classes)": vit_shapes(1024, 24, 4096, 14, "finetune", 1000),
        "a ViT (width 640, depth 12, MLP 2560, patch 16) pre-training": vit_shapes(640, 12, 2560, 16, "pretrain"),
        "an MViTv2-S pre-training": mvit_shapes(96, 1, (1, 2, 11, 2), "pretrain", size=224),
        "an MViTv2-B fine-tuning (400 classes)": mvit_shapes(96, 1, (2, 3, 16, 3), "finetune", 400, size=224),
        "an MViTv2-L pre-training": mvit_shapes(144, 2, (2, 6, 36, 4), "pretrain", size=224),
        "an MViTv2 (embed dim 96, stage depths (1, 2, 5, 2)) fine-tuning (400 classes)":
            mvit_shapes(96, 1, (1, 2, 5, 2), "finetune", 400, size=224),
    }
    for want, shapes in kinds.items():
        assert str(official_names.kind_of(shapes)) == want
    backbone = {k: v for k, v in vit_shapes(**VIT_MU, task="finetune").items() if not k.startswith(("head", "norm"))}
    assert str(official_names.kind_of(backbone)) == "a ViT-mu/16 backbone-only"
    assert official_names.kind_of({"cls_token": (1, 1, 8)}) is None


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_built_state_dicts_convert(task):
    """The builders above hold what the converter expects (otherwise the tests below could
    pass on a malformed checkpoint)."""
    c = _config("demo.py", *TINY, f"--config.task={task}", "--config.model.num_classes=10")
    convert.convert_state_dict(_arrays(vit_shapes(**VIT_MU, task=task)), _targets(c), "vit", task)
    c = _config("mvit_s_k400.py", *MV_TINY, f"--config.task={task}", "--config.model.num_classes=10")
    convert.convert_state_dict(_arrays(mvit_shapes(16, 1, (1, 1, 1, 1), task)), _targets(c), "mvit", task)


def test_pretraining_checkpoint_with_a_finetuning_config(tmp_path, monkeypatch):
    """PySlowFast saves pre-training checkpoints with MVIT.USE_MEAN_POOLING at its default
    (False); the kind of checkpoint is what the message is about, not that cfg key."""
    cfg = "MVIT:\n  USE_MEAN_POOLING: false\n  CLS_EMBED_ON: true\n"
    for name, overrides, sd in [
            ("vit_b_in1k_ft.py", TINY, _arrays(vit_shapes(**VIT_MU, task="pretrain"))),
            ("mvit_s_k400_ft.py", MV_TINY, _arrays(mvit_shapes(16, 1, (1, 1, 1, 1), "pretrain")))]:
        monkeypatch.setattr(convert, "load_state_dict", lambda *_: (sd, cfg))
        with pytest.raises(convert.ConversionError) as e:
            convert.convert("pt.pyth", _config(name, *overrides), str(tmp_path / "out"))
        first = str(e.value).splitlines()[0]
        assert "pre-training checkpoint" in first and "fine-tuning" in first, first
        assert first.endswith("use --config.task=pretrain (then fine-tune from the converted checkpoint with "
                              "--config.init_from)"), first
        assert "USE_MEAN_POOLING" not in str(e.value)
        assert not os.path.exists(tmp_path / "out")
    # a fine-tuning checkpoint still has its cfg checked
    monkeypatch.setattr(convert, "load_state_dict", lambda *_: (
        _arrays(vit_shapes(**VIT_MU, task="finetune", classes=1000)), cfg))
    with pytest.raises(convert.ConversionError, match="USE_MEAN_POOLING"):
        convert.convert("ft.pyth", _config("vit_b_in1k_ft.py", *TINY), str(tmp_path / "out"))


def test_wrong_architecture_verdict_comes_first_and_the_list_is_capped():
    msg = _error(_zeros(mvit_shapes(96, 1, (1, 2, 11, 2), "pretrain", size=224)), _config("vit_b_in1k_ft.py"))
    lines = msg.splitlines()
    assert lines[0] == ("this is an MViTv2-S pre-training checkpoint, but the config builds a ViT-B/16 fine-tuning "
                        "(1000 classes) model: use --config.model.name=mvit --config.model.variant=S "
                        "--config.task=pretrain (then fine-tune from the converted checkpoint with "
                        "--config.init_from)")
    assert len(lines) < 40 and any(re.fullmatch(r"  \.\.\. and \d+ more", x) for x in lines), msg
    assert "<-" not in msg                  # the verdict says it once, no hint on every tensor
    msg = _error(_zeros(vit_shapes(1024, 24, 4096, 16, "finetune", 1000, tokens=196)), _config("vit_b_in1k_ft.py"))
    assert msg.splitlines()[0] == ("this is a ViT-L/16 fine-tuning (1000 classes) checkpoint, but the config builds "
                                   "a ViT-B/16 fine-tuning (1000 classes) model: use --config.model.variant=L/16")
    c = _config("demo.py", *TINY, "--config.task=finetune", "--config.model.num_classes=1000")
    msg = _error(_arrays(vit_shapes(**VIT_MU, task="finetune", classes=400)), c)
    assert msg.splitlines()[0].endswith("model: use --config.model.num_classes=400"), msg
    # what does fit the config gets no verdict, only the tensors
    sd = _arrays(vit_shapes(**VIT_MU, task="pretrain"))
    sd["blocks.0.attn.extra_gate"] = np.zeros(3, np.float32)
    msg = _error(sd, _config("demo.py", *TINY))
    assert msg.startswith("checkpoint does not fit") and "blocks.0.attn.extra_gate (3,)" in msg


def test_command_names_the_architecture(tmp_path):
    np.savez(tmp_path / "mvit.npz", **_arrays(mvit_shapes(16, 1, (1, 1, 1, 1), "pretrain")))
    first = _run(tmp_path / "mvit.npz", tmp_path / "out", "demo.py", *TINY)
    assert first == ("error: this is an MViTv2-mu pre-training checkpoint, but the config builds a ViT-mu/16 "
                     "pre-training model: use --config.model.name=mvit --config.model.variant=mu")


def test_command_names_an_empty_or_damaged_file(tmp_path):
    np.savez(tmp_path / "good.npz", **_arrays(vit_shapes(**VIT_MU, task="pretrain")))
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    (tmp_path / "empty.pyth").write_bytes(b"")
    for src, said in [("empty.pyth", "is an empty file"), ("cut.npz", "is truncated or not a .npz file")]:
        first = _run(tmp_path / src, tmp_path / "out", "demo.py", *TINY)
        assert first.startswith(f"error: --src='{tmp_path / src}' {said}"), first
        assert "allow_pickle" not in first


# ---------------------------------------------------------------------------------------
# .pyth files (PyTorch).

def test_command_names_a_damaged_pyth_file(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"model_state": {k: torch.from_numpy(v) for k, v in
                                _arrays(vit_shapes(**VIT_MU, task="pretrain")).items()}}, tmp_path / "good.pyth")
    data = (tmp_path / "good.pyth").read_bytes()
    (tmp_path / "cut.pyth").write_bytes(data[:len(data) // 2])
    (tmp_path / "noise.pyth").write_bytes(np.random.default_rng(0).bytes(5000))
    for src, extra in [("cut.pyth", []), ("noise.pyth", []), ("noise.pyth", ["--allow_pickle"])]:
        first = _run(tmp_path / src, tmp_path / "out", "demo.py", *TINY, *extra)
        assert first.startswith(f"error: --src='{tmp_path / src}' is truncated or not a PyTorch checkpoint ("), first
        assert "allow_pickle" not in first


def test_python_objects_are_refused_unless_allowed(tmp_path):
    torch = pytest.importorskip("torch")
    sd = {k: torch.from_numpy(v) for k, v in _arrays(vit_shapes(**VIT_MU, task="pretrain")).items()}
    torch.save({"model_state": sd, "epoch": np.float64(3.0)}, tmp_path / "obj.pyth")
    with pytest.raises(convert.ConversionError, match=r"refuses \(numpy\.\S*scalar\); if you trust the file, "
                                                      r"rerun with --allow_pickle$"):
        convert.load_state_dict(str(tmp_path / "obj.pyth"))
    got, _ = convert.load_state_dict(str(tmp_path / "obj.pyth"), allow_pickle=True)
    assert set(got) == set(sd)


def test_command_pretraining_pyth_with_a_finetuning_config(tmp_path):
    torch = pytest.importorskip("torch")
    sd = {k: torch.from_numpy(v) for k, v in _arrays(vit_shapes(**VIT_MU, task="pretrain")).items()}
    torch.save({"model_state": sd, "cfg": "MVIT:\n  USE_MEAN_POOLING: false\n"}, tmp_path / "pt.pyth")
    first = _run(tmp_path / "pt.pyth", tmp_path / "out", "vit_b_in1k_ft.py", *TINY)
    assert first.startswith("error: this is a ViT-mu/16 pre-training checkpoint, but the config builds a ViT-mu/16 "
                            "fine-tuning (1000 classes) model: use --config.task=pretrain"), first
