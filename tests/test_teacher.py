"""The ``features`` target: per-token features of a frozen ViT teacher read from a checkpoint.

The teacher is a tiny randomly initialised ViT (a pre-training model, so its mask token is in
the checkpoint and must be left out) saved with the trainer's checkpoint code, once per module."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from maskfeat_jax import checkpoint, config as config_lib, convert, models, saved as saved_lib, sharding, steps, train
from maskfeat_jax import targets as targets_lib
from maskfeat_jax.targets import features
from references import MASK, MEAN, STD, VALID, init_model, run_step, step_config
import tiny


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The workdir of a tiny ViT-mu/16 pre-training model at 32 px (2 x 2 tokens, 2 blocks,
    width 32), seed 7, saved as step 0."""
    return _save_teacher(str(tmp_path_factory.mktemp("teacher") / "run"), tiny.config(overrides={"seed": 7}))


@pytest.fixture(scope="module")
def video_teacher(tmp_path_factory):
    """A tiny video ViT-mu/16 (4 frames of 64 px in 2x16x16 tubelets: a (2, 4, 4) token grid,
    the tiny MViTv2's prediction grid), seed 7, saved as step 0."""
    return _save_teacher(str(tmp_path_factory.mktemp("video_teacher") / "run"), tiny.config(overrides={
        "seed": 7, **VIDEO_64}))


VIDEO_64 = {"input.dataset": "video_demo", "video.num_frames": 4, "input.image_size": 64, "model.sep_pos_embed": True}


def _save_teacher(workdir, c):
    with nnx.use_eager_sharding(False):
        model = models.build(c, nnx.Rngs(7))
    params = nnx.to_pure_dict(nnx.state(model))
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=jnp.zeros(()),
                             nonfinite=jnp.zeros((), jnp.int32))
    ckpt = checkpoint.Checkpointer(workdir, every_steps=1, max_to_keep=1)
    ckpt.save(0, state, convert._initial_iterator(c, model.encoder.grid), c, force=True)
    ckpt.close()
    return workdir


def _student(teacher, **kw):
    """The tiny student (``references.step_config``) with the features target of ``teacher``, then ``kw``."""
    c = step_config()
    c.target.features, c.target.teacher = 1.0, teacher
    for key, value in kw.items():
        group, leaf = key.split(".")
        c[group][leaf] = value
    return c


def _images(seed=0, n=8):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32))


def _separate_forward(teacher, images, block):
    """Block ``block``'s output tokens (cls dropped) of the teacher read by ``saved.load``,
    its blocks called one by one."""
    saved = saved_lib.load(teacher)
    enc = nnx.merge(saved.graphdef, saved.params).encoder
    x = enc.embed(images)
    for blk in list(enc.blocks)[:block + 1]:
        x = blk(x)
    if block == len(enc.blocks) - 1:
        np.testing.assert_array_equal(x, enc(images)["tokens_BxNxD"])
    return np.asarray(x[:, 1:], np.float32)


@pytest.mark.parametrize("block", [0, -1])
def test_teacher_targets_equal_a_separate_forward_at_the_block(teacher, block):
    c = _student(teacher, **{"target.teacher_block": block})
    dim, fn = features.target(c, 16)
    params = features.load(c)
    assert dim == 32 and "mask_token" not in params             # the encoder alone, as a classifier's
    images = _images()
    got = np.asarray(jax.jit(fn)(images, params))
    want = _separate_forward(teacher, images, block % 2)
    assert got.shape == (8, 4, 32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    other = _separate_forward(teacher, images, (block + 1) % 2)
    assert np.abs(got - other).max() > 1e-3                     # the blocks are told apart


def test_l2norm_matches_numpy_and_renormalisation_follows_the_teacher(teacher):
    images = _images(1)
    want = _separate_forward(teacher, images, 1)
    c = _student(teacher, **{"target.teacher_l2norm": True})
    got = np.asarray(features.target(c, 16)[1](images, features.load(c)))
    norm = np.linalg.norm(want.astype(np.float64), axis=-1, keepdims=True)
    np.testing.assert_allclose(got, want / np.maximum(norm, features.L2_EPS), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-5)
    # a student normalising with other statistics: the teacher still sees its own normalisation
    c2 = _student(teacher)
    c2.input.mean, c2.input.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    raw = np.asarray(images) * np.asarray(STD, np.float32) + np.asarray(MEAN, np.float32)
    student_view = jnp.asarray((raw - 0.5) / 0.25, jnp.float32)
    got2 = np.asarray(features.target(c2, 16)[1](student_view, features.load(c2)))
    np.testing.assert_allclose(got2, want, rtol=1e-4, atol=1e-5)


def test_no_gradient_reaches_the_teacher(teacher):
    c = _student(teacher)
    fn, params = features.target(c, 16)[1], features.load(c)
    grads = jax.grad(lambda p: fn(_images(), p).sum())(params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_teacher_is_a_frozen_step_input_unchanged_over_two_steps(teacher, pt_batch):
    """``train.setup`` loads the teacher once, sharded on the mesh, as the step's frozen input,
    outside the train state; two SGD steps (state donated) change every student parameter and
    leave the teacher's arrays as they were."""
    c = _student(teacher, **{"target.hog": 0.0})
    mesh = sharding.make_mesh(c.mesh, jax.devices())
    s = train.setup(c, mesh, steps_per_epoch=10, total_steps=100)
    assert len(s.frozen) == 1 and set(s.frozen[0]) == {"features"}
    assert all(x.sharding.mesh.shape == mesh.shape for x in jax.tree.leaves(s.frozen[0]))
    assert "features" not in jax.tree_util.keystr(jax.tree_util.tree_leaves_with_path(s.abstract_state)[0][0])
    assert len(jax.tree.leaves(s.abstract_state.params)) == len(jax.tree.leaves(init_model(c)[1]))
    frozen = jax.device_put(s.frozen[0], jax.devices()[0])
    before = jax.device_get(frozen)
    graphdef, params = init_model(c)
    start = jax.device_get(params)
    tx = optax.sgd(0.1)
    step = jax.jit(steps.make_pretrain_step(graphdef, tx, lambda _: 1e-2, c, patch=16), donate_argnums=(0,))
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             nonfinite=jnp.zeros((), jnp.int32))
    batch = jax.tree.map(jnp.asarray, pt_batch[0])
    for _ in range(2):
        state, m = step(state, batch, frozen)
    m = jax.device_get(m)
    assert int(state.step) == 2 and m["train/loss_features"] > 0
    assert m["train/loss"] == m["train/loss_features"] and "train/loss_hog" not in m
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen), before)
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), jax.device_get(state.params), start)
    assert min(jax.tree.leaves(moved)) > 0                      # every student parameter moved


def test_multi_target_loss_with_features_is_the_weighted_sum(teacher, pt_batch):
    """HOG 0.7 + features 0.3: each logged loss is its target's single-target loss (a float64
    MSE of the model's slice against the loop HOG reference and the separate teacher forward),
    the total their weighted sum."""
    batch, norm, hog_ref = pt_batch
    c = _student(teacher, **{"target.hog": 0.7, "target.features": 0.3})
    graphdef, params = init_model(c)
    assert params["head"]["kernel"].shape == (32, 108 + 32)
    _, m = run_step(c, graphdef, params, batch, frozen={"features": features.load(c)})
    pred = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(norm), jnp.asarray(MASK))["pred_BxNxK"], np.float64)
    feat_ref = _separate_forward(teacher, jnp.asarray(norm), 1).astype(np.float64)
    w = MASK & VALID[:, None]
    single = {}
    for name, ref, sl in (("hog", hog_ref, slice(0, 108)), ("features", feat_ref, slice(108, None))):
        single[name] = (((pred[..., sl] - ref) ** 2).mean(-1) * w).sum() / w.sum()
        np.testing.assert_allclose(m[f"train/loss_{name}"], single[name], rtol=1e-5)
    np.testing.assert_allclose(m["train/loss"], 0.7 * single["hog"] + 0.3 * single["features"], rtol=1e-5)
    assert abs(single["hog"] - single["features"]) > 0.1 * single["features"]   # the weights are told apart


def test_the_step_without_the_teacher_says_what_it_needs(teacher, pt_batch):
    c = _student(teacher)
    graphdef, params = init_model(c)
    with pytest.raises(ValueError, match=r"config\.target\.features=1\.0: the step needs"):
        run_step(c, graphdef, params, pt_batch[0])


@pytest.mark.parametrize("kw,match", [
    ({"target.teacher": ""}, r"config\.target\.features=1\.0: the features target needs a teacher, config\.target\.teacher"),
    ({"target.teacher": "/nonexistent/run"}, r"config\.target\.teacher='/nonexistent/run'"),
    ({"input.image_size": 64}, r"config\.target\.teacher=.*token grid"),
    ({"model.variant": "mu/8"}, r"config\.target\.teacher=.*patch 16.*patch 8"),
    ({"target.teacher_block": 2}, r"config\.target\.teacher_block=2"),
    ({"target.teacher_block": -3}, r"config\.target\.teacher_block=-3"),
    ({"target.features": -1.0}, r"config\.target\.features=-1\.0"),
    ({"target.teacher_block": 0}, None),
])
def test_bad_teacher_keys_are_named_in_validation(teacher, kw, match):
    c = _student(teacher, **kw)
    c.input.dataset, c.model.num_classes = "digits", 1000
    if match is None:
        config_lib.validate(c, num_devices=8)
        return
    with pytest.raises(ValueError, match=match):
        config_lib.validate(c, num_devices=8)


def test_an_mvit_teacher_and_an_image_teacher_for_a_video_student_are_refused(teacher, monkeypatch):
    step_dir, tc = features._resolved(teacher)
    mvit_cfg = ml_collections.ConfigDict(tc.to_dict())
    mvit_cfg.model.name = "mvit"
    monkeypatch.setattr(features, "_resolved", lambda path: (step_dir, mvit_cfg))
    with pytest.raises(ValueError, match=r"config\.target\.teacher=.*'mvit' teacher is not supported yet"):
        features.check(_student(teacher), 16)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"config\.target\.teacher=.*an image teacher .* for a video student"):
        features.check(_student(teacher), 16, temporal_stride=2)


def _mvit_student(video_teacher, **kw):
    return tiny.config("pretrain", "mvit", overrides={"target.hog": 0.0, "target.features": 1.0,
                                                      "target.teacher": video_teacher, **kw})


def test_a_video_vit_teacher_gives_each_space_time_token_of_a_video_student_its_feature(video_teacher):
    (target,) = targets_lib.active(_mvit_student(video_teacher), 16, temporal_stride=2)
    params = features.load(_mvit_student(video_teacher))
    clips = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 64, 64, 3)).astype(np.float32))
    got = np.asarray(jax.jit(target.fn)(clips, params))
    saved = saved_lib.load(video_teacher)
    want = np.asarray(nnx.merge(saved.graphdef, saved.params).encoder(clips)["tokens_BxNxD"][:, 1:])
    assert target.dim == 32 and got.shape == (2, 2 * 4 * 4, 32)          # one feature per (t, h, w) token
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the MViTv2 student's head predicts them, one per token of its prediction grid
    model = models.build_abstract(_mvit_student(video_teacher), "cpu")
    assert model.head.kernel.shape[-1] == 32
    with pytest.raises(ValueError, match=r"config\.target\.teacher=.*a video teacher .* for an image student"):
        features.check(_student(video_teacher), 16)
    with pytest.raises(ValueError, match=r"config\.target\.teacher=.*token grid in time \(4 frames"):
        features.check(_mvit_student(video_teacher, **{"video.num_frames": 8}), 16, temporal_stride=2)


def test_resuming_with_the_features_target_switched_is_refused_naming_it(teacher):
    saved = step_config().to_dict()
    del saved["target"]["features"]                 # a config saved before the key existed
    diffs = config_lib.shape_differences(saved, _student(teacher))
    assert len(diffs) == 1 and diffs[0].startswith("target.features: saved 0.0, now 1.0")
    assert config_lib.shape_differences(_student(teacher).to_dict(), _student(teacher, **{"target.features": 2.0})) == []
