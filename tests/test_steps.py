"""The train/eval steps against numpy: MaskFeat loss and its gradient, eval counts, input
normalisation, and the video evaluation's aggregation of views.

Expected values are computed here in numpy (HOG targets with the loop-level reference of
``references``); the model is called only for its predictions. The batch is conftest's
``pt_batch`` fixture (``references.pretrain_batch``).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from maskfeat_jax import models, sharding, steps, train
from maskfeat_jax.evaluators import classification
from references import MASK, MEAN, STD, VALID, ref_hog_cells, ref_tokens, step_config


def _predictions(graphdef, params, norm):
    return np.asarray(nnx.merge(graphdef, params)(jnp.asarray(norm), jnp.asarray(MASK))["pred_BxNxK"], np.float64)


@pytest.mark.parametrize("nbins,cell", [(9, 8), (5, 4)])
def test_pretrain_loss_is_mse_over_masked_valid_tokens_only(pt_batch, nbins, cell):
    """Also with other ``config.hog`` settings: the targets and the head's width follow them.
    (5 bins: like 9, no bin edge at 90 degrees, where gy = 0 pixels would tie; see pt_batch.)"""
    batch, norm, targets = pt_batch
    c = step_config()
    c.hog.nbins, c.hog.cell_size = nbins, cell
    if (nbins, cell) != (9, 8):
        targets = np.stack([ref_tokens(ref_hog_cells(norm[b], nbins=nbins, cell=cell), 16 // cell)
                            for b in range(8)])
    mesh = sharding.make_mesh(c.mesh, jax.devices())           # data parallel over 8, a row per device
    s = train.setup(c, mesh, steps_per_epoch=10, total_steps=100)
    state = s.init()
    params = jax.device_get(state.params)                       # before the step donates the state
    with jax.set_mesh(mesh):
        gb = sharding.global_batch(mesh, batch)
        _, m = train.jit_step(s, mesh, gb)(state, gb)
    pred = _predictions(s.graphdef, params, norm)
    assert pred.shape == targets.shape == (8, 4, 3 * nbins * (16 // cell) ** 2)
    err = ((pred - targets) ** 2).mean(-1)                      # (8, 4): mean over the target dims
    w = MASK & VALID[:, None]
    want = (err * w).sum() / w.sum()
    got = float(m["train/loss"])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # the batch tells the variants apart: every token, or masked ones of every row, differ
    for wrong in (VALID[:, None] & np.ones_like(MASK), MASK):
        assert abs((err * wrong).sum() / wrong.sum() - want) > 1e-3 * want


class _PredProbe(nnx.Module):
    """The MaskFeat model with a zero parameter added to its predictions: the gradient of the
    loss with respect to that parameter is the gradient with respect to the predictions."""

    def __init__(self, inner, shape):
        self.inner = inner
        self.delta = nnx.Param(jnp.zeros(shape, jnp.float32))

    def __call__(self, images, mask_BxN, *, rng=None):
        out = self.inner(images, mask_BxN, rng=rng)
        return dict(out, pred_BxNxK=out["pred_BxNxK"] + self.delta[...])


def test_pretrain_gradient_wrt_predictions_is_zero_off_masked_valid_tokens(pt_batch):
    batch, norm, targets = pt_batch
    c = step_config()
    with nnx.use_eager_sharding(False):
        inner = models.build(c, nnx.Rngs(0))
    graphdef, st = nnx.split(_PredProbe(inner, targets.shape))
    params = nnx.to_pure_dict(st)
    tx = optax.identity()                                       # updates = gradients: p + g
    step = steps.make_pretrain_step(graphdef, tx, lambda _: 0.0, c, patch=16)
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             nonfinite=jnp.zeros((), jnp.int32))
    new, m = jax.jit(step)(state, jax.tree.map(jnp.asarray, batch))
    grad = np.asarray(new.params["delta"])                      # 0 + dL/dpred
    pred = _predictions(graphdef, params, norm)                 # delta is 0: the model's predictions
    w = MASK & VALID[:, None]
    k = targets.shape[-1]
    want = 2.0 * (pred - targets) / (k * w.sum()) * w[..., None]
    assert np.all(grad[~w] == 0.0)                              # visible tokens and the padded row
    np.testing.assert_allclose(grad[w], want[w], rtol=1e-4, atol=1e-9)
    assert np.abs(want[w]).max() > 1e-4
    err = ((pred - targets) ** 2).mean(-1)
    np.testing.assert_allclose(float(m["train/loss"]), (err * w).sum() / w.sum(), rtol=1e-5)


def test_eval_step_counts_top1_top5_over_valid_rows_only():
    c = step_config("finetune")
    with nnx.use_eager_sharding(False):
        model = models.build(c, nnx.Rngs(0))
    graphdef, st = nnx.split(model)
    params = nnx.to_pure_dict(st)
    bias = np.array([0.3, 2.0, -1.0, 1.5, 0.9, 3.0, -2.0, 0.1, 1.2, -0.5], np.float32)
    params["head"]["kernel"] = jnp.zeros_like(params["head"]["kernel"])   # logits = bias, every row
    params["head"]["bias"] = jnp.asarray(bias)
    # rows: top-1 hit, top-5 hits (ranks 2 and 4), misses (ranks 6 and 10), padding that would hit
    label = np.array([5, 1, 8, 0, 6, 5, 3, 4], np.int32)
    valid = np.array([1, 1, 1, 1, 1, 0, 0, 1], bool)
    rng = np.random.default_rng(1)
    batch = {"image": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), "label": label, "valid": valid}
    out = jax.device_get(jax.jit(steps.make_eval_step(graphdef, c))(params, jax.tree.map(jnp.asarray, batch)))
    order = np.argsort(-bias)
    want = {"top1": int((valid & (label == order[0])).sum()),
            "top5": int((valid & np.isin(label, order[:5])).sum()), "count": int(valid.sum())}
    assert want == {"top1": 1, "top5": 4, "count": 6}           # the batch separates the variants
    assert {k: int(out[k]) for k in want} == want


def test_normalize_matches_numpy():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    x[0, 0, 0], x[0, 0, 1] = 0, 255
    got = np.asarray(steps.normalize(jnp.asarray(x), tuple(MEAN), tuple(STD)))
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, (x / 255.0 - MEAN) / STD, rtol=1e-6, atol=1e-6)


def test_video_scores_sum_softmax_over_views():
    """Evaluator.video_scores / run on a stub step (no model): each video's score is the sum of
    its views' rows, padding (video index -1) and invalid rows left out."""
    classes = 7
    rows = []   # (video index, label, valid, probs)

    def p(*pairs):
        v = np.zeros(classes, np.float32)
        for k, val in pairs:
            v[k] = val
        return v

    # video 0 (label 0): the views' sum ranks 0 first, the last view ranks 1 first
    rows += [(0, 0, True, p((0, 0.9), (1, 0.1))), (0, 0, True, p((0, 0.8), (1, 0.2))),
             (1, 3, True, p((3, 0.5), (2, 0.5 - 1e-3), (6, 1e-3))),
             (0, 0, True, p((0, 0.3), (1, 0.7)))]
    # an undecodable view of video 1, which would make class 5 win; padding rows
    rows += [(1, 3, False, p((5, 1.0))), (-1, 0, False, p((0, 1.0))), (-1, 0, False, p((0, 1.0))),
             (2, 6, True, p((6, 0.4), (4, 0.6)))]
    # second batch: video 1's other views (sum ranks 2 first), video 2's other view
    rows += [(1, 3, True, p((2, 0.6), (3, 0.4))), (1, 3, True, p((2, 0.6), (3, 0.4))),
             (2, 6, True, p((6, 0.9), (1, 0.1)))] + [(-1, 0, False, p((0, 1.0)))] * 5
    cols = list(zip(*rows))
    arrays = {"video_index": np.array(cols[0], np.int32), "label": np.array(cols[1], np.int32),
              "valid": np.array(cols[2], bool), "probs": np.stack(cols[3]),
              "view": np.zeros(len(rows), np.int32)}
    batches = [{k: v[i:i + 8] for k, v in arrays.items()} for i in (0, 8)]

    ev = classification.Evaluator.__new__(classification.Evaluator)
    c = step_config("finetune")
    ev.config, ev.video, ev.source = c, True, [None] * 3
    ev.mesh = sharding.make_mesh(c.mesh, jax.devices())
    ev._batches = lambda: iter([dict(b) for b in batches])
    ev.step = lambda params, b: {k: b[k] for k in ("probs", "video_index", "label", "valid")}

    keep = (arrays["video_index"] >= 0) & arrays["valid"]
    want = {v: arrays["probs"][keep & (arrays["video_index"] == v)].sum(0) for v in (0, 1, 2)}
    got = ev.video_scores(None)
    assert sorted(got) == [0, 1, 2]
    for v in (0, 1, 2):
        np.testing.assert_allclose(got[v][0], want[v], rtol=1e-6)
    assert [got[v][1] for v in (0, 1, 2)] == [0, 3, 6]
    # ranked by the sums: video 0 top-1 right, video 1 top-5 only, video 2 top-1 right
    labels = {0: 0, 1: 3, 2: 6}
    top1 = np.mean([np.argmax(want[v]) == labels[v] for v in want])
    top5 = np.mean([labels[v] in np.argsort(-want[v])[:5] for v in want])
    assert (top1, top5) == (2 / 3, 1.0)
    res = ev.run(None)
    assert res["eval/top1"] == pytest.approx(top1) and res["eval/top5"] == pytest.approx(top5)
    assert res["eval/examples"] == 3.0 and res["eval/undecodable"] == 0.0
