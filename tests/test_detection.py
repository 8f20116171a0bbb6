"""AVA detection through the trainer: the RoI head on a tiny MViTv2 (shapes), boxes mapped onto
the feature map (against the loop-level RoIAlign reference), the box BCE and its gradient with
padded boxes, the classifier's head dropout, the evaluator's bookkeeping, the config keys, and
one training run on the embedded AVA demo that lowers the loss and scores every val box once."""
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny
from maskfeat_jax import config as config_lib, config_cli, evaluators, models, steps_detection, train
from maskfeat_jax.data import ava, ava_maps, make_ava_demo
from maskfeat_jax.evaluators import ava as ava_eval
from maskfeat_jax.models import detection, heads
from references import ref_roi_align

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = dict(num_train=8, num_val=4, seconds=10, size=64, seed=0)


def _config(**overrides):
    """The tiny MViTv2 (mu, 4 frames of 64 px, batch 8) as a detector on the demo."""
    return tiny.config("detect", "mvit", {
        "model.num_classes": ava.NUM_CLASSES, "input.dataset": "ava_demo", "input.worker_count": 0,
        "ava.fps": make_ava_demo.FPS, "ava.max_boxes": 6, "video.sampling_rate": 2,
        "video.train_jitter_scales": (73, 91), "evals.batch_size": 8, **overrides})


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return make_ava_demo.ensure_ava_demo(str(tmp_path_factory.mktemp("ava_demo")), **DEMO)


# ---------------------------------------------------------------------------------------------
# The head
# ---------------------------------------------------------------------------------------------

def test_detector_shapes_on_a_tiny_model():
    c = _config(**{"model.head_dropout": 0.5})
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: models.build(c, nnx.Rngs(0)))
    assert isinstance(model, detection.Detector) and model.dropout_rate == 0.5
    assert model.encoder.grid == (2, 2, 2) and model.stride == 32.0       # the strided last stage: 64 / 2
    images = jax.ShapeDtypeStruct((2, 4, 64, 64, 3), jnp.float32)
    boxes = jax.ShapeDtypeStruct((2, 5, 4), jnp.float32)
    out = jax.eval_shape(lambda m, x, b: m(x, b, rng=jax.random.key(0)), model, images, boxes)
    width = model.encoder.size.width
    assert out["map_BxHxWxC"].shape == (2, 2, 2, width)
    assert out["pooled_BxRxC"].shape == (2, 5, width)
    assert out["logits_BxRxK"].shape == (2, 5, ava.NUM_CLASSES) and out["logits_BxRxK"].dtype == jnp.float32
    params = nnx.to_pure_dict(nnx.state(model))
    assert set(params) == {"encoder", "fc_norm", "head"}                    # the classifier's names


def test_every_detector_parameter_has_an_official_name_and_they_are_distinct():
    """export / convert of a detector: each parameter maps to one PySlowFast name (the final
    ``norm`` and ``head.projection`` for the head) and no two share one."""
    from maskfeat_jax import official_names, saved as saved_lib
    c = _config()
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: models.build(c, nnx.Rngs(0)))
    keys = saved_lib.flat_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    rules = official_names.rules_for("mvit", "detect")
    names = {k: official_names.torch_name(rules, k)[0] for k in keys}
    assert None not in names.values() and len(set(names.values())) == len(names)
    assert {names[k] for k in keys if not k.startswith("encoder/")} == {
        "norm.weight", "norm.bias", "head.projection.weight", "head.projection.bias"}


@pytest.mark.parametrize("image_size, grid, stride", [(224, (8, 7, 7), 32.0), (64, (2, 2, 2), 32.0),
                                                      (224, (8, 14, 14), 16.0)])
def test_feature_stride(image_size, grid, stride):
    assert detection.feature_stride(image_size, grid) == stride


def test_boxes_map_onto_the_feature_map_as_the_numpy_reference():
    """Crop-pixel boxes of each example pooled on that example's map at scale 1 / stride:
    RoIAlign (aligned, adaptive) then a max over the 7 x 7 bins, against the float64 loop."""
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(2, 7, 7, 3)).astype(np.float32)                 # a 224 crop at stride 32
    corners = rng.uniform(-10, 234, (2, 4, 2, 2))
    boxes = np.concatenate([corners.min(2), corners.max(2)], -1).astype(np.float32)
    boxes[1, 0] = [32, 64, 64, 96]                                          # exactly feature cell (2, 1)
    pool = jax.jit(detection.pool_boxes, static_argnums=(2,))
    got = np.asarray(pool(maps, boxes, 32.0))
    assert got.shape == (2, 4, 3)
    for b in range(2):
        for r in range(4):
            rois = np.concatenate([[0.0], boxes[b, r]])[None]
            want = ref_roi_align(maps[b:b + 1], rois, 7, 7, 1 / 32, 0, True).max(axis=(1, 2))[0]
            np.testing.assert_allclose(got[b, r], want, atol=1e-5, rtol=1e-5)
    # a map that is one only at cell (2, 1) of example 1: the box over that cell's pixels peaks at 1,
    # the same box on example 0 and a box over another cell stay 0
    one = np.zeros_like(maps)
    one[1, 2, 1] = 1.0
    cells = np.zeros_like(boxes)
    cells[:, 0], cells[:, 1] = [32, 64, 64, 96], [128, 128, 160, 160]
    peak = np.asarray(pool(one, cells, 32.0))[..., 0]
    np.testing.assert_allclose(peak[:, :2], [[0.0, 0.0], [1.0, 0.0]], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------

def _bce_reference(logits, labels, weight):
    """Mean over the weighted boxes of the mean over classes of the BCE of sigmoids, float64."""
    x, y = logits.astype(np.float64), labels.astype(np.float64)
    p = 1 / (1 + np.exp(-x))
    per_box = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(-1)
    return (per_box * weight).sum() / weight.sum()


def test_box_bce_matches_numpy_and_ignores_padded_boxes():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, 6)).astype(np.float32)
    labels = (rng.random((2, 4, 6)) < 0.3).astype(np.float32)
    weight = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], np.float32)
    loss = jax.jit(lambda x, y: steps_detection.box_bce(x, y, weight) / weight.sum())
    assert float(loss(logits, labels)) == pytest.approx(_bce_reference(logits, labels, weight), rel=1e-5)
    grad = np.asarray(jax.jit(jax.grad(loss))(logits, labels))
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    want = (p - labels) / 6 / weight.sum() * weight[..., None]              # d BCE / d logit, averaged
    np.testing.assert_allclose(grad, want, atol=1e-7)
    assert not grad[weight == 0].any()
    # padded boxes may hold anything: the loss does not move
    junk_x, junk_y = logits.copy(), labels.copy()
    junk_x[weight == 0], junk_y[weight == 0] = 50.0, 1.0 - labels[weight == 0]
    assert float(loss(junk_x, junk_y)) == float(loss(logits, labels))


def test_padded_boxes_send_no_gradient_to_the_features():
    """Through the pooling and a linear head: the feature map's gradient is the same wherever
    the padded boxes are and whatever they are labelled."""
    rng = np.random.default_rng(2)
    maps = jnp.asarray(rng.normal(size=(2, 7, 7, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
    weight = np.array([[1, 0, 0], [1, 1, 0]], np.float32)
    boxes = np.tile(np.array([20, 30, 150, 200], np.float32), (2, 3, 1))
    labels = (rng.random((2, 3, 5)) < 0.5).astype(np.float32)

    @jax.jit
    def grad(boxes, labels):
        def loss(m):
            logits = detection.pool_boxes(m, boxes, 32.0) @ w
            return steps_detection.box_bce(logits, labels, weight) / weight.sum()
        return jax.grad(loss)(maps)

    g = np.asarray(grad(boxes, labels))
    moved_boxes, moved_labels = boxes.copy(), labels.copy()
    moved_boxes[weight == 0] = [0, 0, 223, 223]
    moved_labels[weight == 0] = 1.0 - moved_labels[weight == 0]
    np.testing.assert_array_equal(np.asarray(grad(moved_boxes, moved_labels)), g)
    assert np.abs(g).sum() > 0
    moved_boxes[0, 0] = [0, 0, 223, 223]                                    # a real box moved: it does change
    assert not np.allclose(np.asarray(grad(moved_boxes, moved_labels)), g)


# ---------------------------------------------------------------------------------------------
# Head dropout (classifier and detector)
# ---------------------------------------------------------------------------------------------

def test_head_dropout_drops_and_rescales_in_training_only():
    x = jnp.ones((64, 128), jnp.float32)
    key = jax.random.key(3)
    assert heads.dropout(x, 0.5, None) is x and heads.dropout(x, 0.0, key) is x
    drop = jax.jit(heads.dropout, static_argnums=(1,))
    y = np.asarray(drop(x, 0.5, key))
    kept = y != 0
    assert set(np.unique(y).tolist()) == {0.0, 2.0}                         # survivors scaled by 1 / (1 - rate)
    assert abs(kept.mean() - 0.5) < 0.03
    assert np.array_equal(y, np.asarray(drop(x, 0.5, key)))                  # keyed by the step's key
    z = np.asarray(drop(x, 0.25, jax.random.key(4)))
    assert abs((z != 0).mean() - 0.75) < 0.03
    # its key is none of the encoder blocks' keys (fold_in of the block index)
    data = jax.jit(lambda i: jax.random.key_data(jax.random.fold_in(key, i)))
    blocks = {tuple(k) for k in np.asarray(jax.vmap(data)(jnp.arange(64))).tolist()}
    assert tuple(np.asarray(data(heads.HEAD_DROPOUT_STREAM)).tolist()) not in blocks


def test_classifier_head_dropout_defaults_to_off_and_ssv2_sets_the_official_rate():
    c = tiny.config("finetune", "mvit")
    assert c.model.head_dropout == 0.0
    with nnx.use_eager_sharding(False):
        assert nnx.eval_shape(lambda: models.build(c, nnx.Rngs(0))).dropout_rate == 0.0
    ssv2 = config_cli.from_file(str(ROOT / "configs" / "x"), "mvit_ssv2.py:S")
    assert ssv2.model.head_dropout == 0.5
    ava_cfg = config_cli.from_file(str(ROOT / "configs" / "x"), "mvit_ava.py:L")
    assert (ava_cfg.model.head_dropout, ava_cfg.task, ava_cfg.model.num_classes) == (0.5, "detect", 80)


# ---------------------------------------------------------------------------------------------
# The evaluator's bookkeeping
# ---------------------------------------------------------------------------------------------

def _outputs(video_index, second, real, valid=None):
    video_index = np.asarray(video_index)
    b, r = np.shape(real)
    return {"video_index": video_index, "second": np.asarray(second),
            "real_BxR": np.asarray(real, bool), "valid": np.ones(b, bool) if valid is None else np.asarray(valid),
            "ori_boxes": np.arange(b * r * 4, dtype=np.float32).reshape(b, r, 4) / 100,
            "scores_BxRxK": np.arange(b * r * 3, dtype=np.float32).reshape(b, r, 3)}


def test_collect_keeps_real_boxes_skips_padding_and_refuses_a_keyframe_twice():
    into = {}
    out = _outputs([0, 1, -1], [902, 903, -1], [[1, 1, 0], [1, 0, 0], [0, 0, 0]], valid=[True, False, False])
    assert ava_eval.collect(out, ["a", "b"], into) == 1                     # one undecodable clip
    assert sorted(into) == [("a", 902), ("b", 903)]
    np.testing.assert_array_equal(into[("a", 902)][0], out["ori_boxes"][0, :2])
    np.testing.assert_array_equal(into[("a", 902)][1], out["scores_BxRxK"][0, :2])
    assert into[("b", 903)][0].shape == (1, 4)
    with pytest.raises(RuntimeError, match="came twice"):
        ava_eval.collect(_outputs([0], [902], [[1, 0, 0]]), ["a", "b"], into)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    ({"task": "finetune"}, "config.task"),
    ({"input.dataset": "video_demo"}, "config.input.dataset"),
    ({"model.num_classes": 60}, "config.model.num_classes"),
    ({"ava.fps": 30}, "config.ava.fps"),
    ({"ava.fps": 0}, "config.ava.fps"),
    ({"ava.detection_score_thresh": 1.5}, "config.ava.detection_score_thresh"),
    ({"ava.max_boxes": 0}, "config.ava.max_boxes"),
    ({"ava.eval_second_stride": 0}, "config.ava.eval_second_stride"),
    ({"ava.protocol": "voc"}, "config.ava.protocol"),
    ({"video.train_jitter_scales": (0, 0)}, "config.video.train_jitter_scales"),
    ({"video.train_jitter_scales": (48, 80)}, "config.video.train_jitter_scales"),
    ({"video.sampling": "segment"}, "config.video.sampling"),
    ({"video.num_sample": 2}, "config.video.num_sample"),
    ({"video.sampling_rate": 0}, "config.video.sampling_rate"),
    ({"model.head_dropout": 1.0}, "config.model.head_dropout"),
    ({"task": "pose"}, "config.task"),
    ({}, None),
])
def test_detection_keys_are_validated_naming_the_key(overrides, key):
    c = _config(**overrides)
    if key is None:
        config_lib.validate(c, 8)
        return
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        config_lib.validate(c, 8)


def test_a_vit_detector_and_a_missing_ava_folder_name_their_keys(tmp_path):
    c = _config(**{"model.name": "vit", "model.variant": "mu/16"})
    with pytest.raises(ValueError, match=r"config\.model\.name"):
        config_lib.validate(c, 8)
    c = _config(**{"input.dataset": "ava", "ava.root": str(tmp_path), "ava.fps": 30})
    config_lib.validate(c, 8)                                               # the folder is read when opened
    with pytest.raises(ValueError, match=r"config\.ava\.root=.*ava_action_list_v2\.2"):
        ava_maps.train_source(c)


def test_shipped_configs_are_the_named_settings():
    for name, arg in (("mvit_s_ava", "S"), ("mvit_l_ava", "L")):
        named = config_cli.from_file(str(ROOT / "configs" / "x"), f"{name}.py")
        assert named.to_dict() == config_cli.from_file(str(ROOT / "configs" / "x"), f"mvit_ava.py:{arg}").to_dict()
    local = config_cli.from_file(str(ROOT / "configs" / "x"), "mvit_ava.py:S,runlocal")
    assert (local.input.dataset, local.model.variant, local.total_steps, local.ava.fps) == ("ava_demo", "mu", 3, 6)
    config_lib.validate(local, 8)


# ---------------------------------------------------------------------------------------------
# Training and evaluation on the demo
# ---------------------------------------------------------------------------------------------

def test_detection_trains_on_the_demo_and_scores_every_val_box_once(demo_dir, tmp_path, monkeypatch):
    # a constant lr, large for the head, small for the encoder (layer decay): a few steps move the loss
    c = _config(**{"ava.root": demo_dir, "total_steps": 4, "log_every_steps": 1, "optim.base_lr": 2e-2,
                   "optim.end_lr": 2e-2, "optim.reference_batch": 8, "optim.warmup_epochs": 0.0,
                   "optim.layer_decay": 0.1, "checkpoint.every_steps": 4, "evals.every_steps": 100})
    built = []
    from_config = evaluators.from_config
    monkeypatch.setattr(evaluators, "from_config", lambda *a, **k: built.extend(from_config(*a, **k)) or built)
    last = train.train_and_evaluate(c, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 4 and all(map(math.isfinite, losses))
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)               # head scaled by 0.001: logits ~ 0
    assert max(losses[1:]) < losses[0] - 0.03, losses                       # every update lowered it
    assert [r["data/boxes"] > 0 for r in rows if "data/boxes" in r] == [True] * 4
    # every val keyframe once, each with exactly its detected boxes (>= 0.8), in order
    (ev,) = [e for e in built if e.name == "ava"]
    source = ava_maps.AvaSource("val", demo_dir)
    want = {(source.videos[it["video_index"]], it["second"]): it["boxes"] for it in (source[i] for i in
                                                                                       range(len(source)))}
    scored = ev.evaluator.scored
    assert sorted(scored) == sorted(want)
    for key, (boxes, scores) in scored.items():
        np.testing.assert_array_equal(boxes, want[key])
        assert scores.shape == (len(want[key]), ava.NUM_CLASSES) and ((scores > 0) & (scores < 1)).all()
    total = sum(len(b) for b in want.values())
    assert (last["eval/keyframes"], last["eval/boxes"], last["eval/undecodable"]) == (len(want), total, 0)
    assert math.isfinite(last["eval/mAP"]) and 0 <= last["eval/mAP"] <= 1
