"""Something-Something v2 through the video trainer: segment sampling in the production clip maps,
the short-side jitter, no flip, the 1 x 3 test views, the config keys, and a fine-tuning smoke run
of ``configs/mvit_ssv2.py:S,runlocal`` through ``python -m maskfeat_jax.main``."""
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from maskfeat_jax import config as config_lib, config_cli
from maskfeat_jax.data import make_ssv2_demo, pipeline, sources, ssv2, video_maps
from maskfeat_jax.data import video_transforms as VT
from references import encode_clip, frame_ids, index_clip

av = pytest.importorskip("av")
ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO = dict(num_train=16, num_val=8, min_frames=10, max_frames=20, size=64, seed=0)


def _recipe(arg="S,runlocal"):
    """The shipped config (``configs/mvit_ssv2.py:ARG``)."""
    return config_cli.from_file(str(ROOT / "configs" / "mvit_ssv2.py"), f"mvit_ssv2.py:{arg}")


def _segments(n, t):
    """PySlowFast's ``get_seq_frames``, written out: segment ``i`` is ``[round(seg i), round(seg (i + 1))]``."""
    seg = (n - 1) / t
    return [(int(np.round(seg * i)), int(np.round(seg * (i + 1)))) for i in range(t)]


def _index_dataset(tmp_path, lengths):
    """An SSv2 folder of index-coded webm videos; video ``k`` has ``lengths[k]`` frames and class ``k``."""
    entries = [{"id": str(k + 1), "label": f"class {k}", "template": f"Class [something] {k}", "placeholders": []}
               for k in range(len(lengths))]
    (tmp_path / ssv2.LABELS_FILE).write_text(json.dumps({f"Class something {k}": str(k) for k in range(len(lengths))}))
    for split in ("train", "validation"):
        (tmp_path / ssv2.ANNOTATION_FILES[split]).write_text(json.dumps(entries))
    (tmp_path / ssv2.VIDEO_DIR).mkdir()
    for k, n in enumerate(lengths):
        encode_clip(tmp_path / ssv2.VIDEO_DIR / f"{k + 1}.webm", index_clip(n))
    return str(tmp_path)


def _index_config(data_dir):
    c = _recipe()
    c.input.dataset, c.video.csv_dir = "ssv2", data_dir
    c.input.image_size, c.video.num_frames, c.video.short_side = 32, 8, 32
    c.video.train_jitter_scales = (32, 40)
    c.augment.randaug_ops = 0           # gray levels carry the frame index
    return c


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return make_ssv2_demo.ensure_ssv2_demo(str(tmp_path_factory.mktemp("ssv2_demo")), **DEMO)


# ----------------------------------------------------------------------------
# 1. segment sampling in the production maps
# ----------------------------------------------------------------------------

def test_segment_sampling_through_the_maps_gives_the_official_indices(tmp_path):
    lengths = [9, 21, 40]
    c = _index_config(_index_dataset(tmp_path, lengths))
    source = sources.make(c, "train")
    t = c.video.num_frames
    for k, n in enumerate(lengths):
        element = source[k]
        assert element["label"] == k
        middles = [(a + b) // 2 for a, b in _segments(n, t)]
        # test: the middle of every segment, the same frames for every temporal and spatial view
        for clip_index in (0, 1):
            for spatial in (0, 1, 2, None):
                out = video_maps.VideoEvalMap(c, clip_index, 2, spatial_index=spatial).map(element)
                assert out["valid"] and out["image"].shape == (t, 32, 32, 3)
                assert frame_ids(out["image"]) == middles, (n, clip_index, spatial)
        # training: one random frame in each segment, both ends included, drawn from the element's rng
        draws = []
        for seed in range(6):
            out = video_maps.VideoTrainMap(c).random_map(element, np.random.default_rng(seed))
            assert out["valid"] and out["image"].shape == (t, 32, 32, 3) and out["label"] == k
            ids = frame_ids(out["image"])
            assert all(a <= i <= b for i, (a, b) in zip(ids, _segments(n, t))), (n, ids)
            assert ids == ssv2.segment_indices(n, t, training=True, rng=np.random.default_rng(seed)).tolist()
            draws.append(tuple(ids))
        assert len(set(draws)) > 1 or n < t


def test_clip_sampling_stays_the_default():
    c = config_lib.base_config()
    assert c.video.sampling == "clip" and tuple(c.video.train_jitter_scales) == (0, 0)
    assert video_maps.sampling(c) == "clip" and video_maps.jitter_scales(c) is None


def test_the_jitter_scales_frames_of_their_own_size(tmp_path, monkeypatch):
    c = _index_config(_index_dataset(tmp_path, [30]))
    element = sources.make(c, "train")[0]
    sides, sizes = [], []
    decode, jitter = ssv2.decode_segments, VT.random_short_side_jitter

    def spy_decode(*a, short_side, **k):
        sides.append(short_side)
        return decode(*a, short_side=short_side, **k)

    def spy_jitter(*a, **k):
        out = jitter(*a, **k)
        sizes.append(min(out.shape[1:3]))
        return out

    monkeypatch.setattr(ssv2, "decode_segments", spy_decode)
    monkeypatch.setattr(VT, "random_short_side_jitter", spy_jitter)
    video_maps.VideoTrainMap(c).random_map(element, np.random.default_rng(0))
    assert sides == [None] and 32 <= sizes[0] <= 40          # full size in, short side in [min, max] out
    c.video.train_jitter_scales = (0, 0)                     # random resized crop: decoded at short_side
    video_maps.VideoTrainMap(c).random_map(element, np.random.default_rng(0))
    assert sides == [None, 32] and len(sizes) == 1


def test_random_short_side_jitter_is_inverse_uniform():
    """PySlowFast's ``int(round(1 / U(1 / max, 1 / min)))`` (``int(round(U(min, max)))`` without
    ``inverse_uniform``), drawn once per clip; the long side follows the aspect."""
    clip = np.zeros((2, 30, 40, 3), np.uint8)
    for s in range(200):
        got = VT.random_short_side_jitter(clip, np.random.default_rng(s), 256, 320)
        want = int(round(1.0 / np.random.default_rng(s).uniform(1 / 320, 1 / 256)))
        assert got.shape == (2, want, math.floor(40 / 30 * want), 3), s
        got = VT.random_short_side_jitter(clip, np.random.default_rng(s), 256, 320, inverse_uniform=False)
        assert got.shape[1] == int(round(np.random.default_rng(s).uniform(256, 320))), s
    with pytest.raises(ValueError, match="min_size"):
        VT.random_short_side_jitter(clip, np.random.default_rng(0), 320, 256)


def test_random_crop_offsets_as_pyslowfast():
    clip = np.broadcast_to((np.arange(10, dtype=np.uint8) * 20)[None, None, :, None], (2, 6, 10, 3)).copy()
    lefts = {int(VT.random_crop(clip, np.random.default_rng(s), 6)[0, 0, 0, 0]) // 20 for s in range(200)}
    assert lefts == {0, 1, 2, 3}                              # randint(0, 10 - 6): the far edge never
    assert VT.random_crop(clip, np.random.default_rng(0), 6).shape == (2, 6, 6, 3)
    assert VT.random_crop(clip[:, :4], np.random.default_rng(0), 6).shape == (2, 6, 6, 3)   # padded, no error


# ----------------------------------------------------------------------------
# 2. training batches of the demo: shapes, labels, no flip
# ----------------------------------------------------------------------------

def _direction(clip):
    """(along, across): the brightness centroid's move from the first to the last frame, in the
    frame of each class's labelled motion, per class 0..3 (right, left, up, down)."""
    mass = clip.astype(np.float64).sum(-1)
    ys, xs = np.mgrid[:clip.shape[1], :clip.shape[2]]
    total = mass.sum(axis=(1, 2))
    y, x = (mass * ys).sum(axis=(1, 2)) / total, (mass * xs).sum(axis=(1, 2)) / total
    dy, dx = y[-1] - y[0], x[-1] - x[0]
    return {0: (dx, dy), 1: (-dx, dy), 2: (-dy, dx), 3: (dy, dx)}


def _batches(c, n):
    source = sources.make(c, c.input.train_split)
    it = iter(pipeline.train_dataset(c, source, process_index=0, process_count=1))
    try:
        return [next(it) for _ in range(n)]
    finally:
        getattr(it, "close", lambda: None)()


def test_demo_training_batches_shapes_labels_and_no_flip(demo_dir):
    c = _recipe()
    c.video.csv_dir = demo_dir
    assert c.input.dataset == "ssv2_demo" and c.augment.flip is False and c.video.sampling == "segment"
    batch = _batches(c, 1)[0]                                    # the full recipe, RandAugment included
    assert batch["image"].shape == (8, 8, 64, 64, 3) and batch["image"].dtype == np.uint8
    assert batch["erase_box"].shape == (8, 4) and batch["valid"].all() and "mask" not in batch
    assert batch["label"].dtype == np.int32 and set(batch["label"].tolist()) <= {0, 1, 2, 3}
    # without RandAugment (whose colour ops move the centroid), every clip moves the way its label says
    c.augment.randaug_ops = 0
    flipped = {}
    for flip in (False, True):
        c.augment.flip = flip
        wrong = 0
        for b in _batches(c, 4):
            for clip, label in zip(b["image"], b["label"]):
                along, across = _direction(clip)[int(label)]
                wrong += not (along > 3 and along > abs(across))
        flipped[flip] = wrong
    assert flipped[False] == 0 and flipped[True] > 0, flipped   # a flip makes left-to-right right-to-left


def test_demo_written_once_under_the_cache_folder(demo_dir, monkeypatch):
    monkeypatch.setattr(sources, "DEFAULT_SSV2_DEMO_DIR", demo_dir)
    c = _recipe()
    assert c.video.csv_dir == ""
    stamp = os.path.getmtime(os.path.join(demo_dir, ssv2.LABELS_FILE))
    train, val = sources.make(c, "train"), sources.make(c, c.input.eval_split)
    assert (len(train), len(val), train.num_classes) == (16, 8, 4)
    assert os.path.getmtime(os.path.join(demo_dir, ssv2.LABELS_FILE)) == stamp
    assert train[0]["video"].startswith(os.path.join(demo_dir, ssv2.VIDEO_DIR))


# ----------------------------------------------------------------------------
# 3. evaluation views
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("pc", [1, 2])
def test_eval_views_cover_every_example_once(tmp_path, monkeypatch, pc):
    lengths, bs = [9, 14, 21, 30, 40], 4
    c = _index_config(_index_dataset(tmp_path, lengths))
    assert (c.video.test_clips, c.video.test_crops) == (1, 3)
    source = sources.make(c, c.input.eval_split)
    decodes, decode = [], ssv2.decode_segments
    monkeypatch.setattr(ssv2, "decode_segments", lambda video, *a, **k: decodes.append(video) or decode(video, *a, **k))
    hosts = [list(pipeline.eval_batches(c, source, bs, process_index=i, process_count=pc)) for i in range(pc)]
    assert {len(h) for h in hosts} == {math.ceil(math.ceil(len(lengths) / pc) * 3 / bs)}
    seen = []
    for i, h in enumerate(hosts):
        for b in h:
            v = b["valid"]
            assert b["image"].shape == (bs, 8, 32, 32, 3) and not (~v[:-1] & v[1:]).any()
            assert (b["video_index"][~v] == -1).all() and not b["image"][~v].any()
            for img, vi, view, label in zip(b["image"][v], b["video_index"][v], b["view"][v], b["label"][v]):
                assert vi % pc == i and label == vi
                assert frame_ids(img) == [(a + e) // 2 for a, e in _segments(lengths[vi], 8)]
                seen.append((int(vi), int(view)))
    assert sorted(seen) == [(k, v) for k in range(len(lengths)) for v in range(3)]
    assert len(decodes) == len(lengths)                       # the 3 crops of a video share one decode
    # more temporal views than the recipe's one: still the same frames, only the crop differs
    ids = {}
    for b in pipeline.eval_batches(c, source, bs, num_clips=2, num_crops=3):
        for img, vi, view in zip(b["image"][b["valid"]], b["video_index"][b["valid"]], b["view"][b["valid"]]):
            ids.setdefault(int(vi), set()).add(tuple(frame_ids(img)))
    assert all(len(s) == 1 for s in ids.values()) and len(ids) == len(lengths)


# ----------------------------------------------------------------------------
# 4. the config keys and files
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    ({"video.sampling": "uniform"}, "config.video.sampling"),
    ({"video.train_jitter_scales": (48, 80)}, "config.video.train_jitter_scales"),     # below the 64 crop
    ({"video.train_jitter_scales": (96, 80)}, "config.video.train_jitter_scales"),
    ({"task": "pretrain"}, "config.video.train_jitter_scales"),                         # fine-tuning only
    ({"video.test_clips": 2}, "config.video.test_clips"),
    ({"input.dataset": "video_csv", "video.frame_prefix": "/frames"}, "config.video.frame_prefix"),
    ({"model.name": "vit", "model.variant": "mu/16"}, None),                           # the video ViT
    ({"model.name": "vit", "model.variant": "mu/16", "model.tubelet": 3}, "config.model.tubelet"),
    ({"input.dataset": "ssv2", "video.sampling": "clip", "video.frame_prefix": ""}, "config.video.frame_prefix"),
    ({"input.dataset": "ssv2"}, None),
    ({"video.sampling": "clip", "video.test_clips": 2}, None),
])
def test_ssv2_keys_are_validated_naming_the_key(overrides, key):
    c = _recipe()
    for k, v in overrides.items():
        head, _, last = k.rpartition(".")
        (c[head] if head else c)[last] = v
    if key is None:
        config_lib.validate(c, 8)
        return
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        config_lib.validate(c, 8)


def test_a_missing_ssv2_folder_names_the_key(tmp_path):
    c = _recipe("S")
    c.video.csv_dir = str(tmp_path)
    with pytest.raises(ValueError, match=r"config\.video\.csv_dir=.*something-something-v2-labels\.json"):
        sources.make(c, "train")


def test_recipe_values():
    s, l_ = _recipe("S"), _recipe("L")
    for c in (s, l_):
        assert (c.task, c.model.num_classes, c.video.sampling, c.video.test_clips, c.video.test_crops) == (
            "finetune", 174, "segment", 1, 3)
        assert (c.augment.flip, c.augment.randaug_ops, c.augment.randaug_magnitude, c.augment.erase_prob) == (
            False, 4, 7.0, 0.25)
        assert (c.augment.label_smoothing, c.optim.warmup_epochs, c.optim.end_lr) == (0.1, 3, 1e-6)
    assert (s.video.num_frames, s.input.image_size, tuple(s.video.train_jitter_scales)) == (16, 224, (256, 320))
    assert (s.model.drop_path, s.epochs, s.augment.mixup_alpha, s.augment.cutmix_alpha) == (0.4, 100, 0.8, 1.0)
    assert tuple(s.input.mean) == (0.45,) * 3 and s.optim.grad_clip == 0
    assert (l_.video.num_frames, tuple(l_.video.train_jitter_scales), l_.model.drop_path, l_.epochs) == (
        40, (356, 446), 0.75, 40)
    assert (s.augment.mix_prob, l_.augment.mix_prob, l_.optim.grad_clip) == (1.0, 0.0, 2.0)
    for c, lr, batch, start in ((s, 0.0025, 16, 1e-4), (l_, 0.00125, 8, 1e-6)):   # SOLVER of each yaml
        assert (c.optim.name, c.optim.momentum, c.optim.weight_decay, c.optim.layer_decay) == ("sgd", 0.9, 1e-4, 1.0)
        assert (c.optim.base_lr, c.optim.reference_batch, c.optim.warmup_start_lr) == (lr, batch, start)
    named = {"mvit_s_ssv2_ft": "S", "mvit_l_ssv2_ft": "L"}
    for name, arg in named.items():
        assert config_cli.from_file(str(ROOT / "configs" / "x"), f"{name}.py").to_dict() == _recipe(arg).to_dict()
    with pytest.raises(ValueError, match="SWITCH one of runlocal"):
        _recipe("S,ft")


# ----------------------------------------------------------------------------
# 5. fine-tuning through the command line
# ----------------------------------------------------------------------------

@pytest.mark.e2e
def test_ssv2_finetuning_end_to_end(tmp_path, demo_dir):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "maskfeat_jax.main", "--config=configs/mvit_ssv2.py:S,runlocal",
                        f"--workdir={tmp_path}", f"--config.video.csv_dir={demo_dir}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses)) and all(0 < x < 3 for x in losses)
    evals = [r for r in rows if "eval/top1" in r]
    assert len(evals) == 1 and evals[0]["eval/examples"] == DEMO["num_val"] and evals[0]["eval/undecodable"] == 0
    assert (tmp_path / "checkpoints" / "3").is_dir()
