"""Prediction targets beyond HOG: pixel targets against a loop-level float64 reference
(``references.ref_pixel_image`` and ``ref_pixel_video``), the target registry, the multi-target
loss of the pre-training step, the HOG-only default (same parameters, bit-identical step) and
the validation of ``config.target``."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from maskfeat_jax import config as config_lib, models, targets
from maskfeat_jax.targets import hog, pixel
from references import (MASK, MEAN, STD, VALID, init_model, old_pretrain_step, ref_pixel_image, ref_pixel_video,
                        run_step, step_config)
import tiny


# ---------------------------------------------------------------------------
# pixel targets against the loop-level reference
# ---------------------------------------------------------------------------

def _low_contrast_image(shape, seed):
    """Random pixels in [-1, 1] with patch (0, 0) of each image scaled by 1e-3: that token's
    variance (~3e-7) is below the 1e-6 epsilon, which then sets its scale."""
    x = np.random.default_rng(seed).uniform(-1.0, 1.0, shape)
    x[..., :4, :4, :] *= 1e-3
    return x.astype(np.float32)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_image_pixel_targets_match_loop_reference(norm_pix):
    x = _low_contrast_image((2, 8, 12, 3), seed=0)
    got = np.asarray(pixel.pixel_targets(jnp.asarray(x), patch_size=4, norm_pix=norm_pix))
    assert got.shape == (2, 6, pixel.pixel_dim(4)) == (2, 6, 48) and got.dtype == np.float32
    for b in range(2):
        want = ref_pixel_image(x[b], 4, norm_pix)
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)
    if norm_pix:   # the data tell the epsilon's place and the variance's divisor apart
        assert np.abs(ref_pixel_image(x[0], 4, True, eps=0.0)[0] - ref_pixel_image(x[0], 4, True)[0]).max() > 0.1
        row = ref_pixel_image(x[0], 4, False)[1]
        biased = (row - row.mean()) / np.sqrt(row.var() + 1e-6)
        assert np.abs(biased - got[0, 1]).max() > 1e-3


@pytest.mark.parametrize("frames,all_frames", [(4, False), (5, False), (4, True)])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_video_pixel_targets_match_loop_reference(frames, all_frames, norm_pix):
    """Tubelets of 2 frames: the first frame of each (official TIME_STRIDE_LOSS, frames beyond
    the last whole tubelet dropped as in hog_targets), or the whole tubelet."""
    x = _low_contrast_image((2, frames, 8, 8, 3), seed=frames)
    got = np.asarray(pixel.pixel_targets(jnp.asarray(x), patch_size=4, norm_pix=norm_pix, temporal_stride=2,
                                         all_frames=all_frames))
    assert got.shape == (2, 2 * 2 * 2, pixel.pixel_dim(4, frames=2 if all_frames else 1))
    for b in range(2):
        np.testing.assert_allclose(got[b], ref_pixel_video(x[b], 4, 2, norm_pix, all_frames), rtol=1e-5, atol=1e-5)


def test_pixel_targets_on_the_mvit_pretraining_grid():
    """16 frames at 224, patch 16, temporal stride 2: the 8x14x14 grid of the MViTv2 model's
    mask and of the HOG targets; 768 pixels per token (first frames) or 1536 (whole tubelets)."""
    video = jax.ShapeDtypeStruct((1, 16, 224, 224, 3), jnp.float32)
    strided = jax.eval_shape(functools.partial(pixel.pixel_targets, temporal_stride=2), video)
    cube = jax.eval_shape(functools.partial(pixel.pixel_targets, temporal_stride=2, all_frames=True), video)
    hog_shape = jax.eval_shape(functools.partial(hog.hog_targets, temporal_stride=2), video)
    assert strided.shape == (1, 8 * 14 * 14, 768) and cube.shape == (1, 8 * 14 * 14, 1536)
    assert hog_shape.shape[1] == strided.shape[1]
    c = _video_config(16, 224, variant="S")
    c.target.pixel, c.target.pixel_all_frames = 1.0, True
    model = models.build_abstract(c)
    assert tuple(model.encoder.mask_grid) == (8, 14, 14)
    assert model.head.kernel.shape == (768, 108 + 1536)


def test_pixel_targets_errors():
    with pytest.raises(ValueError, match="patch_size=16"):
        pixel.pixel_targets(jnp.zeros((1, 24, 32, 3)), patch_size=16)
    with pytest.raises(ValueError, match="temporal_stride"):
        pixel.pixel_targets(jnp.zeros((1, 4, 32, 32, 3)))
    with pytest.raises(ValueError, match="T=5"):
        pixel.pixel_targets(jnp.zeros((1, 5, 32, 32, 3)), temporal_stride=2, all_frames=True)


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------

def test_active_targets_follow_the_weights_in_a_fixed_order():
    c = step_config()
    assert [(t.name, t.weight, t.dim) for t in targets.active(c, 16)] == [("hog", 1.0, 108)]
    c.target.pixel = 0.25
    got = targets.active(c, 16)
    assert [(t.name, t.weight, t.dim) for t in got] == [("hog", 1.0, 108), ("pixel", 0.25, 768)]
    assert targets.total_dim(got) == 876
    c.target.hog, c.hog.nbins = 0.0, 5
    assert [(t.name, t.dim) for t in targets.active(c, 16)] == [("pixel", 768)]
    c.target.pixel_all_frames = True
    assert [t.dim for t in targets.active(c, 16, temporal_stride=2)] == [1536]
    c.target.pixel = 0.0
    with pytest.raises(ValueError, match=r"config\.target"):
        targets.active(c, 16)


def test_target_functions_are_the_configured_ones():
    c = step_config()
    c.target.pixel, c.target.norm_pix, c.hog.normalize = 0.5, False, False
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 32, 32, 3)), jnp.float32)
    fns = {t.name: t.fn for t in targets.active(c, 16)}
    np.testing.assert_array_equal(fns["hog"](x), hog.hog_targets(x, normalize=False))
    np.testing.assert_array_equal(fns["pixel"](x), pixel.pixel_targets(x, norm_pix=False))
    assert not np.allclose(fns["hog"](x), hog.hog_targets(x))


def test_split_cuts_the_head_output_in_order():
    c = step_config()
    c.target.pixel = 1.0
    active = targets.active(c, 16)
    pred = jnp.arange(2 * 876, dtype=jnp.float32).reshape(1, 2, 876)
    parts = targets.split(pred, active)
    np.testing.assert_array_equal(parts["hog"], pred[..., :108])
    np.testing.assert_array_equal(parts["pixel"], pred[..., 108:])
    with pytest.raises(ValueError, match="876"):
        targets.split(pred[..., :800], active)


def test_a_config_saved_before_targets_existed_builds_the_hog_only_model():
    """Older checkpoints' saved configs have no config.target and no config.hog.normalize."""
    d = step_config().to_dict()
    del d["target"], d["hog"]["normalize"]
    old = ml_collections.ConfigDict(d)
    assert [(t.name, t.dim) for t in targets.active(old, 16)] == [("hog", 108)]
    assert models.build_abstract(old).head.kernel.shape == (32, 108)


# ---------------------------------------------------------------------------
# the pre-training step (references: init_model, run_step, old_pretrain_step)
# ---------------------------------------------------------------------------

def test_default_config_keeps_the_hog_only_model_and_step_bit_identical(pt_batch):
    batch = pt_batch[0]
    c = step_config()
    graphdef, params = init_model(c)
    assert params["head"]["kernel"].shape == (32, 108) and params["head"]["bias"].shape == (108,)
    c_pix = step_config()
    c_pix.target.pixel = 1.0
    _, params_pix = init_model(c_pix)
    paths = lambda p: sorted(jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(p))  # noqa: E731
    assert paths(params) == paths(params_pix)                   # no new parameter, one wider head
    new_grads, m = run_step(c, graphdef, params, batch)
    old_grads, m_old = run_step(c, graphdef, params, batch, step_fn=old_pretrain_step)
    assert m["train/loss"] == m_old["train/loss"] == m["train/loss_hog"]
    jax.tree.map(np.testing.assert_array_equal, new_grads, old_grads)
    assert np.abs(new_grads["head"]["bias"]).max() > 0         # the step did reach the head


def test_multi_target_loss_is_the_weighted_sum_of_single_target_losses(pt_batch):
    """HOG 0.7 + pixels 0.3: each logged loss equals the single-target step's loss with the
    matching slice of the head, and the loss reference in float64; loss and gradient are the
    weighted sums."""
    batch, norm, hog_ref = pt_batch
    c = step_config()
    c.target.hog, c.target.pixel = 0.7, 0.3
    graphdef, params = init_model(c)
    grads, m = run_step(c, graphdef, params, batch)

    singles = {}
    for name, sl in (("hog", slice(0, 108)), ("pixel", slice(108, None))):
        ci = step_config()
        ci.target.hog, ci.target.pixel = (1.0, 0.0) if name == "hog" else (0.0, 1.0)
        gi, _ = init_model(ci)
        pi = dict(params, head={k: v[..., sl] for k, v in params["head"].items()})
        singles[name] = run_step(ci, gi, pi, batch)
        np.testing.assert_allclose(m[f"train/loss_{name}"], singles[name][1]["train/loss"], rtol=1e-6)
    l_hog, l_pix = (float(singles[n][1]["train/loss"]) for n in ("hog", "pixel"))
    np.testing.assert_allclose(m["train/loss"], 0.7 * l_hog + 0.3 * l_pix, rtol=1e-6)
    assert abs(l_hog - l_pix) > 0.1 * l_pix                     # the weights are told apart

    # float64 reference of both losses from the model's predictions
    pred = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(norm), jnp.asarray(MASK))["pred_BxNxK"], np.float64)
    pix_ref = np.stack([ref_pixel_image(norm[b], 16, True) for b in range(8)])
    w = MASK & VALID[:, None]
    for name, ref, sl in (("hog", hog_ref, slice(0, 108)), ("pixel", pix_ref, slice(108, None))):
        err = ((pred[..., sl] - ref) ** 2).mean(-1)
        np.testing.assert_allclose(m[f"train/loss_{name}"], (err * w).sum() / w.sum(), rtol=1e-5)

    # the gradient: 0.7 x HOG's + 0.3 x the pixels', the head's columns each from its own target
    g_hog, g_pix = singles["hog"][0], singles["pixel"][0]
    want = jax.tree.map(lambda a, b: 0.7 * a + 0.3 * b, {k: v for k, v in g_hog.items() if k != "head"},
                        {k: v for k, v in g_pix.items() if k != "head"})
    want["head"] = {k: np.concatenate([0.7 * g_hog["head"][k], 0.3 * g_pix["head"][k]], -1) for k in ("kernel", "bias")}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, want)


def test_per_target_losses_add_up_over_micro_batches(pt_batch):
    c = step_config()
    c.target.pixel = 0.5
    graphdef, params = init_model(c)
    _, m1 = run_step(c, graphdef, params, pt_batch[0])
    c.optim.grad_accum_steps = 2
    _, m2 = run_step(c, graphdef, params, pt_batch[0])
    for key in ("train/loss", "train/loss_hog", "train/loss_pixel"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5)
    assert m1["train/loss_pixel"] > 2 * m1["train/loss_hog"]    # different numbers per key


def _video_config(frames=4, size=32, variant="mu"):
    c = step_config()
    c.model.name, c.model.variant, c.input.dataset = "mvit", variant, "video_demo"
    c.video.num_frames, c.input.image_size = frames, size
    return c


class _ConstantHead(nnx.Module):
    """Predicts one learned vector for every token: the step's video targets without the cost
    of compiling an MViTv2 (whose head width ``models.build`` gives is checked above)."""

    def __init__(self, tokens, dim):
        self.tokens, self.bias = tokens, nnx.Param(jnp.linspace(-1.0, 1.0, dim))

    def __call__(self, images, mask_BxN, *, rng=None):
        return {"pred_BxNxK": jnp.broadcast_to(self.bias[...], (images.shape[0], self.tokens, self.bias.shape[0]))}


@pytest.mark.parametrize("all_frames", [False, True])
def test_video_step_pixel_loss_matches_reference(all_frames):
    """4 frames of 32x32 with temporal stride 2 (2x2x2 tokens), pixels only: the step's loss
    against the loop reference of the tubelets' first frames or of whole tubelets."""
    c = _video_config()
    c.target.hog, c.target.pixel, c.target.pixel_all_frames = 0.0, 1.0, all_frames
    dim = 768 * (2 if all_frames else 1)
    assert models.build_abstract(c).head.kernel.shape[1] == dim
    graphdef, st = nnx.split(_ConstantHead(8, dim))
    params = nnx.to_pure_dict(st)
    rng = np.random.default_rng(4)
    video = rng.integers(0, 256, (8, 4, 32, 32, 3), dtype=np.uint8)
    mask = rng.random((8, 8)) < 0.5
    batch = {"image": video, "mask": mask, "valid": VALID, "label": np.zeros(8, np.int32)}
    _, m = run_step(c, graphdef, params, batch, temporal_stride=2)
    norm = ((video / 255.0 - MEAN) / STD).astype(np.float32)
    ref = np.stack([ref_pixel_video(norm[b], 16, 2, True, all_frames) for b in range(8)])
    assert ref.shape == (8, 8, dim)
    w = mask & VALID[:, None]
    want = (((np.asarray(params["bias"], np.float64) - ref) ** 2).mean(-1) * w).sum() / w.sum()
    np.testing.assert_allclose(m["train/loss"], want, rtol=1e-5)
    np.testing.assert_allclose(m["train/loss_pixel"], want, rtol=1e-5)
    assert "train/loss_hog" not in m


# ---------------------------------------------------------------------------
# validation and the HOG figures
# ---------------------------------------------------------------------------

def _cfg(**kw):
    """The tiny pre-training config on the embedded digits, then ``kw`` (``{"dotted.key": value}``)."""
    return tiny.config(overrides={"input.dataset": "digits", "model.num_classes": 1000, **kw})


@pytest.mark.parametrize("overrides,key", [
    ({"target.pixel": -0.5}, r"config\.target\.pixel=-0\.5"),
    ({"target.hog": float("nan")}, r"config\.target\.hog=nan"),
    ({"target.hog": 0.0}, r"config\.target: every loss weight is 0"),
    ({"target.hog": 0.0, "target.pixel": 1.0, "evals.figures_every_steps": 10}, r"config\.evals\.figures_every_steps"),
    ({"target.pixel": 1.0, "input.image_size": 40}, r"config\.input\.image_size=40"),
    ({"model.variant": "mu/12", "input.image_size": 48}, r"config\.hog\.cell_size=8"),       # HOG on: 8 !| 12
    ({"model.variant": "mu/12", "input.image_size": 48, "target.hog": 0.0, "target.pixel": 1.0}, None),
    ({"target.pixel": 1.0, "mesh.tensor": 8, "mesh.data": 1, "model.variant": "L/16"},
     r"config\.mesh\.tensor=8 does not divide the head's 876 outputs"),                      # 108 + 768
    ({"target.hog": 0.0, "target.pixel": 1.0, "mesh.tensor": 8, "mesh.data": 1, "model.variant": "L/16"}, None),
    ({"target.hog": 0.0, "task": "finetune", "model.num_classes": 8}, None),   # fine-tuning has no targets
])
def test_target_validation_names_the_key(overrides, key):
    c = _cfg(**overrides)
    if key is None:
        config_lib.validate(c, num_devices=8)
        return
    with pytest.raises(ValueError, match=key):
        config_lib.validate(c, num_devices=8)


def test_figures_draw_the_hog_slice_of_a_multi_target_head():
    """With pixels added, the figures equal those of the HOG-only model whose head is the HOG
    columns; the pixel columns, set to large values, would show if they were drawn."""
    from maskfeat_jax import visualize
    c = _cfg(**{"input.image_size": 64})
    c_pix = _cfg(**{"input.image_size": 64, "target.pixel": 1.0})
    _, params = init_model(c)
    bias = np.zeros((3, 9, 2, 2), np.float32)
    bias[:, 4] = 1.0
    params["head"] = {"kernel": np.zeros_like(params["head"]["kernel"]), "bias": bias.reshape(-1)}
    params_pix = dict(params, head={"kernel": np.zeros((32, 876), np.float32),
                                    "bias": np.concatenate([bias.reshape(-1), np.full(768, 50.0, np.float32)])})
    kw = dict(num_images=1, seed=3, outline=None, cell_px=8, titles=False)
    want = visualize.make_figures(c, params, **kw)
    np.testing.assert_array_equal(visualize.make_figures(c_pix, params_pix, **kw)[0], want[0])
    c_pix.target.hog = 0.0
    with pytest.raises(ValueError, match=r"config\.target\.hog=0"):
        visualize.make_figures(c_pix, params_pix, **kw)
