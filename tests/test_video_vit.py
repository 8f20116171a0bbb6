"""The video ViT (2x16x16 tubelets, separate space-time position tables) and its MAE pre-training
(``configs/vit_k400_mae.py``): forward shapes, the tubelet embedding against a float64 loop
reference, MAE on space-time tokens (only the kept tokens reach the encoder, dropped pixels get
no gradient, nothing dropped = the dense encoder), per-frame masking, parameter counts equal to
the official models' (counted from PySlowFast's module structure), the official names both ways,
validation, and one pre-training run through ``python -m maskfeat_jax.main`` on the demo clips."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskfeat_jax import config as config_lib, config_cli, convert, export, models, official_names, saved as saved_lib, steps
from maskfeat_jax import targets as targets_lib
from maskfeat_jax.models import mae

import tiny
from references import MAE, VIDEO   # ViT-mu/16 on 4 frames of 32x32: 8 tokens of 2x16x16 pixels

ROOT = pathlib.Path(__file__).resolve().parents[1]


_BUILT = {}


def _build(c, seed=0):
    """The model of ``c``, built once per module for a config (building compiles every initialiser)."""
    key = (c.to_json(), seed)
    if key not in _BUILT:
        with nnx.use_eager_sharding(False):
            _BUILT[key] = models.build(c, nnx.Rngs(seed), "cpu")
    return _BUILT[key]


def _jit(module, method="__call__"):
    """``module.method`` jitted (split once, merged inside)."""
    graphdef, state = nnx.split(module)
    fn = jax.jit(lambda st, *a: getattr(nnx.merge(graphdef, st), method)(*a))
    return lambda *a: fn(state, *a)


def _clips(b=2, t=4, size=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, t, size, size, 3), jnp.float32)


def _flat(model):
    return {k: v for k, v in saved_lib.flat_params(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


def test_video_vit_forward_shapes():
    pre = _build(tiny.config(overrides=VIDEO))                       # dense MaskFeat on video
    assert pre.encoder.grid == (2, 2, 2) and pre.encoder.patch_kernel.shape == (2, 16, 16, 3, 32)
    mask = jnp.array([[True, False] * 4, [False] * 8])
    out = _jit(pre)(_clips(), mask)
    assert out["tokens_BxNxD"].shape == (2, 9, 32) and out["pred_BxNxK"].shape == (2, 8, 108)
    ft = _build(tiny.config("finetune", overrides=VIDEO))
    assert _jit(ft)(_clips())["logits_BxC"].shape == (2, 10)
    with pytest.raises(ValueError, match="clips of 4 frames"):
        ft(_clips(t=6))


def test_tubelet_embedding_and_separate_positions_match_a_float64_loop_reference():
    enc = _build(tiny.config(overrides=VIDEO)).encoder
    x = np.asarray(_clips(seed=1), np.float64)
    kern, bias = np.asarray(enc.patch_kernel[...], np.float64), np.asarray(enc.patch_bias[...], np.float64)
    sp, tm = np.asarray(enc.pos_embed_spatial[...])[0], np.asarray(enc.pos_embed_temporal[...])[0]
    want = np.zeros((2, 9, 32))
    want[:, 0] = np.asarray(enc.cls_token[...])[0, 0] + np.asarray(enc.pos_embed_class[...])[0, 0]
    for b in range(2):
        for t in range(2):
            for h in range(2):
                for w in range(2):
                    cube = x[b, 2 * t:2 * t + 2, 16 * h:16 * h + 16, 16 * w:16 * w + 16]   # (u, i, j, c)
                    token = 1 + (t * 2 + h) * 2 + w
                    want[b, token] = np.einsum("uijc,uijcd->d", cube, kern) + bias + sp[h * 2 + w] + tm[t]
    got = np.asarray(enc.embed(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_mae_encoder_sees_only_the_kept_tokens_and_dropped_tubelets_get_no_gradient():
    c = tiny.config(overrides=MAE)
    model = _build(c)
    keep, mask = mae.masker(c)(jax.random.key(3), 2)
    assert keep.shape == (2, 4) and int(mask.sum()) == 8              # 4 of 8 space-time tokens kept
    out = _jit(model)(_clips(), keep)
    assert out["tokens_BxNxD"].shape == (2, 1 + 4, 32) and out["pred_BxNxK"].shape == (2, 8, 768)
    active = targets_lib.active(c, 16, 2)
    target = jax.random.normal(jax.random.key(4), (2, 8, 768))

    def loss(x):
        return steps.masked_losses(model(x, keep)["pred_BxNxK"], {"pixel": target}, mask.astype(jnp.float32),
                                   mask.sum(), active)[0]

    g = np.abs(np.asarray(jax.jit(jax.grad(loss))(_clips())))          # (2, 4, 32, 32, 3)
    per_token = g.reshape(2, 2, 2, 2, 16, 2, 16, 3).sum((2, 4, 6, 7)).reshape(2, 8)   # (b, t, h, w) tubelets
    mask = np.asarray(mask)
    assert np.all(per_token[mask] == 0.0) and np.all(per_token[~mask] > 0.0)


def test_mae_encoder_with_nothing_dropped_equals_the_dense_video_encoder():
    enc = _build(tiny.config(overrides=MAE)).encoder
    clips = _clips(seed=2)
    perm = jnp.stack([jax.random.permutation(jax.random.key(i), 8) for i in range(2)]).astype(jnp.int32)
    visible_fn = _jit(enc, "encode_visible")
    visible = np.asarray(visible_fn(clips, perm)["tokens_BxNxD"])
    dense = np.asarray(_jit(enc)(clips)["tokens_BxNxD"])
    want = np.concatenate([dense[:, :1], np.take_along_axis(dense[:, 1:], np.asarray(perm)[..., None], 1)], 1)
    np.testing.assert_allclose(visible, want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(visible_fn(clips, perm[:, :4])["tokens_BxNxD"]) - want[:, :5]).max() > 1e-3


def test_per_frame_masking_draws_each_slot_and_tube_masking_repeats_one_spatial_mask():
    c = tiny.config(overrides={**MAE, "input.image_size": 64, "video.num_frames": 8, "mae.mask_ratio": 0.75})
    spatial = 16                                                       # 4 x 4 patches, 4 temporal slots
    _, mask = mae.masker(c)(jax.random.key(0), 64)
    slots = np.asarray(mask).reshape(64, 4, spatial)
    assert np.all(slots.sum((1, 2)) == 48)                             # exact ratio over all tokens...
    assert not np.all(slots.sum(-1) == 12)                             # ...not the same count per slot
    c.mae.per_frame = True                                             # official PER_FRAME_MASKING
    keep, mask = mae.masker(c)(jax.random.key(0), 64)
    slots = np.asarray(mask).reshape(64, 4, spatial)
    assert keep.shape == (64, 16) and mae.kept_tokens(c) == 16
    assert np.all(slots.sum(-1) == 12)                                 # 12 of 16 masked in every slot...
    assert np.mean(np.all(slots == slots[:, :1], axis=(1, 2))) < 0.05  # ...each slot its own draw
    assert np.all(np.asarray(keep).reshape(64, 4, 4) // spatial == np.arange(4)[None, :, None])
    assert models.build_abstract(c, "cpu").encoder.attention.length == 17   # sized for 16 kept + cls
    c.mae.per_frame, c.mae.tube = False, True                          # official AUG.MASK_TUBE
    keep, mask = mae.masker(c)(jax.random.key(0), 64)
    slots = np.asarray(mask).reshape(64, 4, spatial)
    assert keep.shape == (64, 16) and mae.kept_tokens(c) == 16
    assert np.all(slots == slots[:, :1]) and np.all(slots.sum(-1) == 12)
    assert len({tuple(s) for s in slots[:, 0]}) > 1                    # the spatial draw differs per example
    counts = slots[:, 0].sum(0)                                        # every position masked about 3/4 of the time
    assert counts.min() > 30 and counts.max() < 64


def _official_count(width, depth, mlp, task, *, frames=16, size=224, patch=16, tubelet=2, decoder_dim=512,
                    decoder_depth=4, classes=400):
    """Parameters of PySlowFast's video ViT, counted from its modules (``video_model_builder.MViT``
    with SEP_POS_EMBED, no pooling; ``masked.MaskMViT`` with MAE_ON; ``head_helper``)."""
    d, t, s = width, frames // tubelet, (size // patch) ** 2

    def block(d, m):          # MultiScaleBlock: norm1, attn.qkv (bias), attn.proj, norm2, mlp.fc1, mlp.fc2
        return 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * m + m) + (m * d + d)

    n = (d * 3 * tubelet * patch * patch + d) + d + (s * d + t * d + d) + depth * block(d, mlp)
    if task == "finetune":    # norm (after mean pooling), head.projection
        return n + 2 * d + (d * classes + classes)
    e, out = decoder_dim, patch * patch * 3     # TIME_STRIDE_LOSS: one frame's pixels per token
    n += 2 * d + (d * e + e) + (t * s + 1) * e + e        # norm, decoder_embed, decoder_pos_embed, mask_token
    return n + decoder_depth * block(e, 4 * e) + 2 * e + (e * out + out)   # pred_head transforms, projections


@pytest.mark.parametrize("variant,task", [("B", "pretrain"), ("B", "finetune"), ("L", "pretrain"),
                                          ("L", "finetune")])
def test_parameter_counts_equal_the_official_models(variant, task):
    c = config_cli.from_file(str(ROOT / "configs" / "x.py"), f"vit_k400_mae.py:{variant}{',ft' * (task == 'finetune')}")
    shapes = jax.tree.leaves(nnx.state(models.build_abstract(c, "cpu"), nnx.Param))
    ours = sum(int(np.prod(x.shape)) for x in shapes)
    width, depth, mlp = {"B": (768, 12, 3072), "L": (1024, 24, 4096)}[variant]
    assert ours == _official_count(width, depth, mlp, task)


def test_new_parameters_carry_logical_axis_names():
    model = _build(tiny.config(overrides={**MAE, "mae.decoder_sep_pos_embed": True}))
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for path, var in flat.items():
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var[...].ndim, (path, names)
    for key in ("encoder/pos_embed_spatial", "encoder/pos_embed_temporal", "dec_pos_embed_spatial",
                "dec_pos_embed_temporal"):
        assert flat[key].get_metadata()["out_sharding"] == (None, "length", "embed"), key
    assert flat["encoder/patch_kernel"].get_metadata()["out_sharding"] == ("conv_in",) * 4 + ("embed",)
    assert flat["dec_pos_embed_spatial"][...].shape == (1, 4, 16) and flat["dec_pos_embed_temporal"][...].shape == (1, 2, 16)


@pytest.mark.parametrize("overrides,task", [(MAE, "pretrain"), ({**MAE, "mae.decoder_sep_pos_embed": True}, "pretrain"),
                                            (VIDEO, "finetune")])
def test_official_names_round_trip(overrides, task):
    model = _build(tiny.config(task, overrides=overrides))
    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in _flat(model).items()}
    sd = export.to_official(params, "vit", task)
    expect = {"patch_embed.proj.weight": (32, 3, 2, 16, 16), "pos_embed_spatial": (1, 4, 32),
              "pos_embed_temporal": (1, 2, 32), "pos_embed_class": (1, 1, 32)}
    if task == "pretrain":    # MaskMViT with MAE_ON: names written out from its modules
        expect.update({"norm.weight": (32,), "decoder_embed.weight": (16, 32), "mask_token": (1, 1, 16),
                       "pred_head.transforms.0.0.attn.qkv.weight": (48, 16), "pred_head.transforms.0.1.weight": (16,),
                       "pred_head.projections.0.weight": (768, 16)})
        expect.update({"dec_pos_embed_spatial": (1, 4, 16), "dec_pos_embed_temporal": (1, 2, 16),
                       "dec_pos_embed_class": (1, 1, 16)} if "dec_pos_embed_spatial" in sd else
                      {"decoder_pos_embed": (1, 9, 16)})
        assert not any(k.startswith("hogs.") for k in sd)              # the pixel model has no HOG layer
    else:
        expect.update({"norm.weight": (32,), "head.projection.weight": (10, 32)})
    for name, shape in expect.items():
        assert sd[name].shape == shape, name
    assert len(sd) == len(params)
    back = convert.convert_state_dict(sd, {k: v.shape for k, v in params.items()}, "vit", task)
    assert set(back) == set(params)
    for k, x in params.items():
        np.testing.assert_array_equal(back[k], x, err_msg=k)


def test_an_mae_checkpoint_into_a_dense_config_names_the_decoder():
    sd = export.to_official({k: np.zeros(v.shape, np.float32) for k, v in _flat(_build(tiny.config(overrides=MAE))).items()},
                            "vit", "pretrain")
    dense = _flat(_build(tiny.config(overrides={**VIDEO, "target.hog": 0.0, "target.pixel": 1.0})))
    with pytest.raises(official_names.ConversionError, match="decoder_embed"):
        convert.convert_state_dict(sd, {k: v.shape for k, v in dense.items()}, "vit", "pretrain")


def test_validation_names_the_video_keys():
    with pytest.raises(ValueError, match="config.model.tubelet=3"):
        config_lib.validate(tiny.config(overrides={**VIDEO, "model.tubelet": 3}), 1)
    with pytest.raises(ValueError, match=r"config.mae.mask_ratio=0.9.*of each frame"):      # keeps 0 of 4
        config_lib.validate(tiny.config(overrides={**MAE, "mae.per_frame": True, "mae.mask_ratio": 0.9}), 1)
    with pytest.raises(ValueError, match="config.mae.per_frame=True and config.mae.tube=True"):
        config_lib.validate(tiny.config(overrides={**MAE, "mae.per_frame": True, "mae.tube": True}), 1)
    config_lib.validate(tiny.config(overrides=MAE), 1)


def test_video_mae_pretraining_end_to_end_lowers_the_loss(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "maskfeat_jax.main", "--config=configs/vit_k400_mae.py:B,runlocal",
                        f"--workdir={tmp_path}", "--config.total_steps=10", "--config.optim.base_lr=0.04",
                        "--config.optim.warmup_epochs=0", "--config.target.norm_pix=False"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 10 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert abs([r["train/mask_ratio"] for r in rows if "train/mask_ratio" in r][0] - 58 / 64) < 1e-6
