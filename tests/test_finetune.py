"""Fine-tuning: mixup/cutmix targets, random erasing, init_from, evaluation, probes, end to end."""
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import tiny
from maskfeat_jax import augment, saved as saved_lib
from maskfeat_jax.evaluators import probe

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _aug(mixup=0.8, cutmix=1.0, switch=0.5, smoothing=0.1):
    return ml_collections.ConfigDict(dict(mixup_alpha=mixup, cutmix_alpha=cutmix, switch_prob=switch,
                                          label_smoothing=smoothing))


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0), (0.0, 0.0)])
def test_mixed_targets_sum_to_one_and_match_the_mixed_images(mixup, cutmix):
    images = jnp.stack([jnp.full((8, 8, 3), float(i)) for i in range(4)])
    labels = jnp.arange(4)
    for seed in range(6):
        mixed, targets = augment.mix(jax.random.key(seed), images, labels, 10, _aug(mixup, cutmix))
        np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
        # example 1 is paired with example 2 (the reversed batch): the share of its own pixels
        # in the mixed image must equal the weight of its own label in the target
        pixel_share = 2.0 - float(mixed[1].mean())
        label_share = (float(targets[1, 1]) - 0.01) / 0.9
        np.testing.assert_allclose(label_share, pixel_share, atol=1e-5)
        np.testing.assert_allclose(float(targets[1, 2]), 0.01 + 0.9 * (1 - pixel_share), atol=1e-5)


def test_label_smoothing_without_mixing():
    _, t = augment.mix(jax.random.key(0), jnp.zeros((2, 4, 4, 3)), jnp.array([1, 3]), 5, _aug(0.0, 0.0, 0.5, 0.1))
    np.testing.assert_allclose(t[0], [0.02, 0.92, 0.02, 0.02, 0.02], rtol=1e-6)


def test_random_erasing_fills_only_the_box():
    x = jnp.zeros((2, 8, 8, 3))
    boxes = jnp.array([[1, 2, 3, 4], [0, 0, 0, 0]], jnp.int32)
    y = augment.erase(jax.random.key(0), x, boxes)
    inside = np.zeros((8, 8), bool)
    inside[1:4, 2:6] = True
    assert np.all(np.asarray(y[0])[inside] != 0) and np.all(np.asarray(y[0])[~inside] == 0)
    assert np.all(np.asarray(y[1]) == 0)


def test_knn_and_linear_probe_on_separable_features():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 5
    y_tr, y_te = rng.integers(0, 3, 300), rng.integers(0, 3, 100)
    f_tr, f_te = centres[y_tr] + rng.normal(size=(300, 16)), centres[y_te] + rng.normal(size=(100, 16))
    assert probe.knn_accuracy(f_tr, y_tr, f_te, y_te, 3) > 0.95
    assert probe.linear_probe_accuracy(f_tr, y_tr, f_te, y_te, 3, steps_=200) > 0.95
    assert probe.knn_accuracy(f_tr, rng.permutation(y_tr), f_te, y_te, 3) < 0.6
    f_near = f_tr + rng.normal(size=f_tr.shape) * 40                  # overlapping classes: some errors
    whole = probe.knn_accuracy(f_near, y_tr, f_te, y_te, 3, chunk=100)
    assert 0.4 < whole < 1.0 and probe.knn_accuracy(f_near, y_tr, f_te, y_te, 3, chunk=7) == whole


def test_probe_and_figures_refuse_video_models():
    from maskfeat_jax import config as config_lib, visualize
    c = config_lib.base_config()
    c.model.name, c.model.variant = "mvit", "mu"
    with pytest.raises(ValueError, match="config.model.name='mvit': the k-NN and linear probe read images"):
        probe.evaluate(c, None, None)
    with pytest.raises(ValueError, match="config.model.name='mvit': HOG figures"):
        visualize.make_figures(c, None)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


TINY = ["--config.model.variant=mu/16", "--config.input.image_size=32", "--config.input.global_batch_size=16",
        "--config.log_every_steps=2"]


def _main(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "maskfeat_jax.main", *args], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    if check and p.returncode:
        raise AssertionError(p.stdout[-3000:] + p.stderr[-3000:])
    return p


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 4-step tiny pre-training workdir, shared by the tests that start from one."""
    pt = tmp_path_factory.mktemp("pt")
    tiny.train(tiny.from_flags(["--config=configs/demo.py", "--config.total_steps=4", "--config.evals.probe=False",
                                *TINY]), pt)
    return pt


@pytest.mark.xdist_group("finetune_pretrained")
def test_pretrain_then_finetune_from_it_then_eval(tmp_path, pretrained):
    pt, ft = pretrained, tmp_path / "ft"
    frozen = ["--config.optim.base_lr=0", "--config.optim.warmup_start_lr=0", "--config.optim.end_lr=0"]
    out = tiny.train(tiny.from_flags(["--config=configs/demo_ft.py", f"--config.init_from={pt}",
                                      "--config.total_steps=4", "--config.evals.every_steps=4",
                                      "--config.evals.batch_size=40", *TINY, *frozen]), ft)
    assert "loaded" in out and "mask_token" in out and "head/kernel" in out   # ignored / new reported
    rows = [json.loads(line) for line in open(ft / "metrics.jsonl")]
    ev = [r for r in rows if "eval/top1" in r]
    assert ev and ev[-1]["eval/examples"] == 360 and 0.0 <= ev[-1]["eval/top1"] <= ev[-1]["eval/top5"] <= 1.0
    # with every lr 0 the encoder is still the pre-trained one after 4 steps; the head is new
    pt_params = saved_lib.read_params(str(pt))
    ft0 = saved_lib.read_params(str(ft))
    assert set(pt_params["encoder"]) == set(ft0["encoder"]) | {"mask_token"}
    for key in ft0["encoder"]:
        jax.tree.map(np.testing.assert_array_equal, ft0["encoder"][key], pt_params["encoder"][key])
    assert "head" in ft0 and ft0["head"]["kernel"].shape == (32, 10)
    e = _main("--config=configs/demo_ft.py", f"--workdir={ft}", "--mode=eval", "--config.evals.batch_size=40",
              "--config.evals.probe=True", *TINY)
    res = json.loads(e.stdout.strip().splitlines()[-1])
    assert res["step"] == 4 and res["eval/examples"] == 360 and "eval/knn_top1" in res


@pytest.mark.xdist_group("finetune_pretrained")
def test_init_from_copies_the_encoder_and_reinitialises_the_head(pretrained):
    pt = pretrained
    from maskfeat_jax import config as config_lib, sharding, train
    c = config_lib.base_config()
    c.task, c.model.variant, c.input.image_size, c.model.num_classes = "finetune", "mu/16", 32, 10
    c.input.global_batch_size = 8
    mesh = sharding.make_mesh(c.mesh)
    fresh = train.setup(c, mesh, 10, 10).init().params
    loaded = saved_lib.init_from(str(pt), fresh)
    src = saved_lib.read_params(str(pt))
    np.testing.assert_array_equal(loaded["encoder"]["pos_embed"], src["encoder"]["pos_embed"])
    np.testing.assert_array_equal(loaded["encoder"]["blocks"][1]["mlp"]["fc2"]["kernel"],
                                  src["encoder"]["blocks"]["1"]["mlp"]["fc2"]["kernel"])
    np.testing.assert_array_equal(loaded["head"]["kernel"], fresh["head"]["kernel"])
    assert float(jnp.abs(loaded["head"]["kernel"]).max()) < 1e-3
    c.model.variant = "demo/16"     # another width: every encoder shape differs
    other = train.setup(c, sharding.make_mesh(c.mesh), 10, 10).init().params
    with pytest.raises(ValueError, match="encoder/"):
        saved_lib.init_from(str(pt), other)


def test_erase_box_draws_timm_random_erasing_rectangles():
    """Probability ``p``; area in (0.02, 1/3) of the image, aspect log-uniform in (0.3, 1/0.3), inside."""
    from maskfeat_jax.data import pipeline
    rng = np.random.default_rng(0)
    boxes = np.stack([pipeline.erase_box(rng, 224, 0.25) for _ in range(4000)])
    drawn = boxes[boxes[:, 2] > 0]
    assert 0.22 < len(drawn) / len(boxes) < 0.28
    top, left, h, w = drawn.T
    assert np.all((top >= 0) & (left >= 0) & (top + h <= 224) & (left + w <= 224))
    frac, aspect = h * w / 224 ** 2, h / w
    assert frac.min() > 0.02 * 0.9 and frac.max() < (1 / 3) * 1.1
    assert aspect.min() > 0.3 * 0.9 and aspect.max() < (1 / 0.3) * 1.1
    assert aspect.min() < 0.35 and aspect.max() > 2.9          # both ends of the range are reached

    class Ends:   # p passes; the smallest area and the largest log-aspect; top-left corner
        def random(self):
            return 0.0

        def uniform(self, a, b):
            return a if a > 0 else b

        def integers(self, lo, hi):
            return lo

    area = 1000 ** 2 * 0.02
    np.testing.assert_array_equal(pipeline.erase_box(Ends(), 1000, 1.0),
                                  [0, 0, round(math.sqrt(area / 0.3)), round(math.sqrt(area * 0.3))])
    assert np.all(pipeline.erase_box(rng, 224, 0.0) == 0)


def test_labels_beyond_the_heads_classes_are_refused_before_compiling(tmp_path):
    from maskfeat_jax import config as config_lib, train
    c = config_lib.base_config()
    c.task, c.model.variant, c.input.image_size, c.model.num_classes = "finetune", "mu/16", 32, 5
    c.input.dataset, c.input.global_batch_size, c.total_steps = "digits", 8, 1
    with pytest.raises(ValueError, match=r"config.model.num_classes=5.*set config.model.num_classes=10"):
        train.train_and_evaluate(c, str(tmp_path))


def test_eval_mode_on_an_empty_workdir_fails_naming_it_and_writes_nothing(tmp_path):
    from maskfeat_jax import config as config_lib, train
    c = config_lib.base_config()
    c.model.variant, c.input.image_size, c.input.dataset = "mu/16", 32, "digits"
    with pytest.raises(ValueError, match=r"--mode=eval: --workdir=.* holds no finished checkpoint"):
        train.evaluate(c, str(tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0)])
def test_an_example_whose_partner_failed_to_decode_is_left_unmixed(mixup, cutmix):
    images = jnp.stack([jnp.full((8, 8, 3), float(i)) for i in range(4)])
    labels, valid = jnp.arange(4), jnp.array([True, True, True, False])    # example 3: a blank row
    for seed in range(4):
        mixed, targets = augment.mix(jax.random.key(seed), images, labels, 4, _aug(mixup, cutmix, 0.5, 0.0), valid)
        # example 0's partner (3) is invalid: example 0 keeps its pixels and its own label
        np.testing.assert_array_equal(mixed[0], images[0])
        np.testing.assert_array_equal(targets[0], jax.nn.one_hot(0, 4))
        # examples 1 and 2 pair with each other as usual
        np.testing.assert_allclose(float(targets[1, 1]) + float(targets[1, 2]), 1.0, atol=1e-6)
        np.testing.assert_allclose(float(targets[1, 1]), 2.0 - float(mixed[1].mean()), atol=1e-5)


def _torch_bicubic_reference(grid_HxWxD, out: int, a=-0.75):
    """Loop-level 2-D bicubic resize as torch's interpolate(mode='bicubic', align_corners=False):
    16 taps per output pixel, source coordinates at half-pixel centres, taps clamped to the edge."""
    def w(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a if x < 2 else 0.0
    h = grid_HxWxD.shape[0]
    res = np.zeros((out, out, grid_HxWxD.shape[2]))
    for oy in range(out):
        for ox in range(out):
            sy, sx = (oy + 0.5) * h / out - 0.5, (ox + 0.5) * h / out - 0.5
            for ky in range(math.floor(sy) - 1, math.floor(sy) + 3):
                for kx in range(math.floor(sx) - 1, math.floor(sx) + 3):
                    yy, xx = min(max(ky, 0), h - 1), min(max(kx, 0), h - 1)
                    res[oy, ox] += w(sy - ky) * w(sx - kx) * grid_HxWxD[yy, xx]
    return res


@pytest.mark.parametrize("src,dst", [(4, 6), (6, 4), (3, 7), (5, 5)])
def test_position_table_resize_matches_a_loop_level_bicubic(src, dst):
    from maskfeat_jax.models.vit import resize_pos_embed
    rng = np.random.default_rng(src * 10 + dst)
    pos = rng.normal(size=(1, 1 + src * src, 3)).astype(np.float32)
    out = resize_pos_embed(pos, 1 + dst * dst)
    assert out.shape == (1, 1 + dst * dst, 3)
    np.testing.assert_array_equal(out[0, 0], pos[0, 0])                     # the class token's row
    ref = _torch_bicubic_reference(pos[0, 1:].reshape(src, src, 3), dst)
    np.testing.assert_allclose(out[0, 1:].reshape(dst, dst, 3), ref, atol=1e-5)
    if src == dst:
        np.testing.assert_array_equal(out, pos)
    const = np.full((1, 1 + src * src, 2), 0.7, np.float32)             # weights sum to one
    np.testing.assert_allclose(resize_pos_embed(const, 1 + dst * dst), 0.7, rtol=1e-6)
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(pos, 1 + 12)


@pytest.mark.xdist_group("finetune_pretrained")
def test_init_from_resizes_the_position_table_for_another_image_size(pretrained):
    from maskfeat_jax import config as config_lib, sharding, train
    from maskfeat_jax.models.vit import resize_pos_embed
    c = config_lib.base_config()
    c.task, c.model.variant, c.input.image_size, c.model.num_classes = "finetune", "mu/16", 48, 10  # 2x2 -> 3x3
    c.input.global_batch_size = 8
    fresh = train.setup(c, sharding.make_mesh(c.mesh), 10, 10).init().params
    loaded = saved_lib.init_from(str(pretrained), fresh)
    src = saved_lib.read_params(str(pretrained))["encoder"]["pos_embed"]
    assert src.shape[1] == 5 and loaded["encoder"]["pos_embed"].shape[1] == 10
    np.testing.assert_allclose(loaded["encoder"]["pos_embed"], resize_pos_embed(src, 10), rtol=1e-6)


def test_mix_prob_mixes_whole_batches_with_that_probability():
    """augment.mix_prob (official MIXUP.PROB): a batch is mixed or left to label smoothing alone,
    as a whole; 0 never mixes, and a middle value mixes about that share of batches."""
    images = jnp.stack([jnp.full((8, 8, 3), float(i)) for i in range(4)])
    labels = jnp.arange(4)

    def mixed_share(p, seeds=200):
        a = _aug(0.8, 1.0)
        a.mix_prob = p
        f = jax.jit(lambda k: augment.mix(k, images, labels, 10, a))
        n = 0
        for seed in range(seeds):
            out, targets = f(jax.random.key(seed))
            unmixed = bool(jnp.all(out == images)) and bool(jnp.allclose(targets.max(-1), 0.91))
            n += not unmixed
        return n / seeds

    assert mixed_share(0.0, 20) == 0.0
    assert 0.2 < mixed_share(0.4) < 0.6
    assert mixed_share(1.0, 20) == 1.0
