"""Tests for maskfeat_jax.data (sources and grain pipelines): sharding, determinism,
exact resume, bad files, batch contents and the TFDS path without TensorFlow."""
import contextlib
import io
import json
import math
import os
import sys

import numpy as np
import pytest
from PIL import Image

from maskfeat_jax import config as config_lib
from maskfeat_jax.data import masking
from maskfeat_jax.data import pipeline, sources
from maskfeat_jax.data import rand_augment as RA
from maskfeat_jax.data import transforms as T

import tiny


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

def _config(dataset="synthetic", task="pretrain", **input_overrides):
    """The tiny config reading ``dataset`` in the main process; ``input_overrides`` are ``input.*`` keys."""
    return tiny.config(task, overrides={
        "input.dataset": dataset, "input.synthetic_size": 64, "input.worker_count": 0,
        "augment.randaug_ops": 0,       # keep fine-tuning batches cheap
        **{f"input.{k}": v for k, v in input_overrides.items()}})


def _grid(config):
    return (config.input.image_size // 16, config.input.image_size // 16)


class IndexSource:
    """Example ``i`` is a constant image of value ``i % 256`` with ``label = i``."""

    def __init__(self, size, side=16):
        self.size, self.side = size, side

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return {"image": np.full((self.side, self.side, 3), i % 256, np.uint8), "label": int(i)}


@contextlib.contextmanager
def _iterate(ds):
    it = iter(ds)
    try:
        yield it
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def _take(ds, n):
    with _iterate(ds) as it:
        return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _labels(batches):
    return np.concatenate([b["label"] for b in batches])


def _jpeg_bytes(color, size=(40, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _noise_jpeg_bytes(seed, size=(64, 48)):
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ----------------------------------------------------------------------------
# 1. digits source
# ----------------------------------------------------------------------------

def test_digits_source_splits():
    c = _config("digits")
    train, val = sources.make(c, "train"), sources.make(c, "validation")
    assert (len(train), len(val)) == (1437, 360)
    assert train.num_classes == val.num_classes == 10
    for src in (train, val):
        ex = src[len(src) - 1]
        assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
        assert isinstance(ex["label"], int) and 0 <= ex["label"] <= 9
        assert src.images.shape == (len(src), 32, 32, 3) and src.images.dtype == np.uint8
    labels = np.concatenate([train.labels, val.labels])
    assert set(labels.tolist()) == set(range(10))
    # disjoint and complete: validation is every fifth original example, train the rest
    from sklearn.datasets import load_digits
    target = load_digits().target
    held_out = np.arange(1797) % 5 == 0
    np.testing.assert_array_equal(val.labels, target[held_out])
    np.testing.assert_array_equal(train.labels, target[~held_out])
    full = np.empty((1797, 32, 32, 3), np.uint8)
    full[held_out], full[~held_out] = val.images, train.images
    # the 32x32 images are the 8x8 originals upscaled: downsampling recovers their layout
    orig = load_digits().images
    small = full[:, 2::4, 2::4, 0].astype(float)
    corr = [np.corrcoef(small[i].ravel(), orig[i].ravel())[0, 1] for i in range(0, 1797, 97)]
    assert min(corr) > 0.9
    assert (full[..., 0] == full[..., 1]).all() and (full[..., 1] == full[..., 2]).all()
    with pytest.raises(ValueError, match="test"):
        sources.make(c, "test")


# ----------------------------------------------------------------------------
# 2. host sharding
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("pc", [2, 4])
def test_train_shards_disjoint_and_complete(pc):
    n, gb, epochs = 48, 8, 2
    c = _config(global_batch_size=gb)
    src = IndexSource(n)
    per_host = gb // pc
    steps_per_epoch = n // gb
    hosts = [_take(pipeline.train_dataset(c, src, _grid(c), process_index=i, process_count=pc),
                   steps_per_epoch * epochs) for i in range(pc)]
    for batches in hosts:
        for b in batches:
            assert b["label"].shape == (per_host,) and b["image"].shape[0] == per_host
            # image and label stay paired through shuffle, slice and augmentation
            np.testing.assert_array_equal(b["image"][:, 0, 0, 0], b["label"] % 256)
            assert b["valid"].all()
    for step in range(steps_per_epoch * epochs):   # hosts disjoint within every step
        step_labels = np.concatenate([hosts[i][step]["label"] for i in range(pc)])
        assert len(set(step_labels.tolist())) == gb
    for e in range(epochs):                         # each epoch: every index exactly once
        sl = slice(e * steps_per_epoch, (e + 1) * steps_per_epoch)
        union = np.concatenate([_labels(hosts[i][sl]) for i in range(pc)])
        assert sorted(union.tolist()) == list(range(n)), f"epoch {e}"


def test_hosts_draw_independent_masks():
    """Host k's j-th example must not get the same crop/mask as host 0's j-th example."""
    c = _config(image_size=64, global_batch_size=8)
    src = sources.make(c, "train")
    hosts = [_take(pipeline.train_dataset(c, src, _grid(c), process_index=i, process_count=2), 8)
             for i in range(2)]
    m0 = np.concatenate([b["mask"] for b in hosts[0]])
    m1 = np.concatenate([b["mask"] for b in hosts[1]])
    assert (m0 == m1).all(axis=1).mean() < 0.5


@pytest.mark.parametrize("pc,workers", [(1, 0), (2, 0), (4, 0), (2, 1)])
def test_eval_batches_exactly_once(pc, workers):
    n, bs = 45, 4
    c = _config()
    src = IndexSource(n)
    hosts = [list(pipeline.eval_batches(c, src, bs, process_index=i, process_count=pc, worker_count=workers))
             for i in range(pc)]
    n_batches = {len(h) for h in hosts}
    assert n_batches == {math.ceil(math.ceil(n / pc) / bs)}, "every host must yield the same count"
    seen, pad = [], 0
    for h in hosts:
        for b in h:
            assert b["image"].shape == (bs, 32, 32, 3) and b["image"].dtype == np.uint8
            assert b["label"].shape == (bs,) and b["label"].dtype == np.int32
            assert b["valid"].shape == (bs,) and b["valid"].dtype == bool
            v = b["valid"]
            seen += b["label"][v].tolist()
            pad += int((~v).sum())
            np.testing.assert_array_equal(b["image"][v][:, 16, 16, 0], b["label"][v] % 256)
            assert not b["image"][~v].any() and not b["label"][~v].any()
            # padding only at the end of a batch
            assert not (~v[:-1] & v[1:]).any()
    assert sorted(seen) == list(range(n))
    assert pad == len(hosts) * next(iter(n_batches)) * bs - n


# ----------------------------------------------------------------------------
# 3. determinism
# ----------------------------------------------------------------------------

def test_same_seed_same_batches_and_reshuffle_between_epochs():
    n = 48
    c = _config(image_size=64)
    src = IndexSource(n)
    a = _take(pipeline.train_dataset(c, src, _grid(c)), 12)
    b = _take(pipeline.train_dataset(c, src, _grid(c)), 12)
    _assert_batches_equal(a, b)

    e0, e1 = _labels(a[:6]), _labels(a[6:12])
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(n))
    assert not np.array_equal(e0, e1), "not reshuffled between epochs"
    assert not np.array_equal(e0, np.arange(n)), "not shuffled"

    c2 = _config(image_size=64)
    c2.seed = 1
    d = _take(pipeline.train_dataset(c2, src, _grid(c2)), 6)
    assert not np.array_equal(_labels(d), e0), "different seed, same order"


def test_same_seed_same_augmentation():
    c = _config(image_size=64)
    src = sources.make(c, "train")
    a = _take(pipeline.train_dataset(c, src, _grid(c)), 2)
    b = _take(pipeline.train_dataset(c, src, _grid(c)), 2)
    _assert_batches_equal(a, b)
    c.seed = 3
    d = _take(pipeline.train_dataset(c, src, _grid(c)), 2)
    assert not np.array_equal(a[0]["mask"], d[0]["mask"]) or not np.array_equal(a[0]["image"], d[0]["image"])


# ----------------------------------------------------------------------------
# 4. exact resume
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(workers):
    n_before, m_after = 3, 4
    c = _config(image_size=32, worker_count=workers, synthetic_size=48)
    src = sources.make(c, "train")
    ds = pipeline.train_dataset(c, src, _grid(c))
    with _iterate(ds) as it:
        for _ in range(n_before):
            next(it)
        state = it.get_state()
        expected = [next(it) for _ in range(m_after)]
    json.dumps(state)  # small and serialisable (stored by orbax as JSON)
    with _iterate(pipeline.train_dataset(c, src, _grid(c))) as it2:
        it2.set_state(state)
        got = [next(it2) for _ in range(m_after)]
    _assert_batches_equal(expected, got)
    # sanity: the resumed batches are not simply the first ones
    first = _take(pipeline.train_dataset(c, src, _grid(c)), 1)[0] if workers == 0 else None
    if first is not None:
        assert not np.array_equal(first["label"], got[0]["label"]) or \
            not np.array_equal(first["image"], got[0]["image"])


# ----------------------------------------------------------------------------
# 5. bad data
# ----------------------------------------------------------------------------

# one file per class, so the label identifies the file
_FILES = {
    "a_good_jpg": ("img.jpg", "good_red"),
    "b_truncated": ("img.jpg", "truncated"),
    "c_empty": ("img.jpg", "empty"),
    "d_text": ("notes.JPEG", "text"),
    "e_good_upper": ("IMG.JPEG", "good_green"),
    "f_gray_png": ("img.png", "gray_png"),
}
_GOOD = {"a_good_jpg", "e_good_upper", "f_gray_png"}


def _write(path, kind):
    if kind == "good_red":
        data = _jpeg_bytes((200, 30, 30))
    elif kind == "good_green":
        data = _jpeg_bytes((30, 200, 30), size=(50, 70))
    elif kind == "truncated":
        full = _noise_jpeg_bytes(0)
        data = full[: len(full) // 2]
    elif kind == "empty":
        data = b""
    elif kind == "text":
        data = b"this is not an image\n"
    elif kind == "gray_png":
        buf = io.BytesIO()
        Image.new("L", (33, 21), 150).save(buf, format="PNG")
        data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def bad_folder(tmp_path):
    for split in ("train", "validation"):
        for cls, (fname, kind) in _FILES.items():
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            _write(d / fname, kind)
        (tmp_path / split / "a_good_jpg" / "README.txt").write_text("ignored: not an image extension")
    return tmp_path


def test_folder_source_lists_images(bad_folder):
    c = _config(f"folder:{bad_folder}")
    src = sources.make(c, "train")
    classes = sorted(_FILES)
    assert src.num_classes == len(classes) and len(src) == len(classes)
    for i in range(len(src)):
        ex = src[i]
        assert os.path.basename(os.path.dirname(ex["image"])) == classes[ex["label"]]


def test_bad_files_are_skipped_not_fatal(bad_folder):
    classes = sorted(_FILES)
    c = _config(f"folder:{bad_folder}", global_batch_size=6)
    src = sources.make(c, "train")
    batches = _take(pipeline.train_dataset(c, src, _grid(c)), 4)  # 4 epochs of 6
    for b in batches:
        assert b["image"].shape == (6, 32, 32, 3) and b["image"].dtype == np.uint8
        for img, label, valid in zip(b["image"], b["label"], b["valid"]):
            name = classes[label]
            assert bool(valid) == (name in _GOOD), name
            if valid:
                assert img.any(), name
            else:
                assert not img.any(), f"{name}: bad example must come back blank"
    # evaluation: every file once (in source order), same validity, then padding
    ev = list(pipeline.eval_batches(_config(f"folder:{bad_folder}"), sources.make(c, "validation"), 4))
    labels = np.concatenate([b["label"] for b in ev])
    valid = np.concatenate([b["valid"] for b in ev])
    assert len(labels) == 8 and labels[:6].tolist() == list(range(6)) and not valid[6:].any()
    assert valid[:6].tolist() == [k in _GOOD for k in classes]
    # images really decoded: red stays red, grayscale is broadcast to 3 equal channels
    red = next(img for b in ev for img, lbl, v in zip(b["image"], b["label"], b["valid"])
               if v and classes[lbl] == "a_good_jpg")
    assert red[..., 0].mean() > 150 and red[..., 1].mean() < 80
    gray = next(img for b in ev for img, lbl, v in zip(b["image"], b["label"], b["valid"])
                if v and classes[lbl] == "f_gray_png")
    assert (gray[..., 0] == gray[..., 1]).all() and abs(float(gray.mean()) - 150) < 3


def test_decode_inputs():
    img, ok = pipeline.decode(_jpeg_bytes((10, 20, 250)))
    assert ok and img.dtype == np.uint8 and img.shape == (30, 40, 3) and img[..., 2].mean() > 200
    img, ok = pipeline.decode(np.full((5, 7), 9, np.uint8))
    assert ok and img.shape == (5, 7, 3)
    img, ok = pipeline.decode(np.zeros((5, 7, 4), np.uint8))
    assert ok and img.shape == (5, 7, 3)
    for bad in (b"", b"garbage", _noise_jpeg_bytes(1)[:200], np.zeros((0, 4, 3), np.uint8),
                "/nonexistent/file.jpg"):
        img, ok = pipeline.decode(bad)
        assert not ok and img.dtype == np.uint8 and img.ndim == 3 and not img.any()


def test_decode_pil():
    img, ok = pipeline.decode(_jpeg_bytes((10, 20, 250)), pil=True)
    assert ok and isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (40, 30)
    np.testing.assert_array_equal(np.asarray(img), pipeline.decode(_jpeg_bytes((10, 20, 250)))[0])
    buf = io.BytesIO()
    Image.new("L", (9, 5), 77).save(buf, format="PNG")
    img, ok = pipeline.decode(buf.getvalue(), pil=True)
    assert ok and img.mode == "RGB" and (np.asarray(img) == 77).all()
    img, ok = pipeline.decode(np.full((5, 7), 9, np.uint8), pil=True)
    assert ok and img.mode == "RGB" and img.size == (7, 5)
    for bad in (b"", _noise_jpeg_bytes(1)[:200], "/nonexistent/file.jpg"):
        img, ok = pipeline.decode(bad, pil=True)
        assert not ok and isinstance(img, Image.Image) and not np.asarray(img).any()


def _photo_jpeg_bytes(w, h, seed=0):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
    img = np.clip(base + rng.normal(0.0, 6.0, (h, w, 1)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_train_map_matches_reference():
    """TrainMap (Pillow from decode to flip) against the steps written out separately:
    decode to an array, draw the crop, crop the array, resize it, draw the flip, draw the mask."""
    c = _config(image_size=32, image_backend="pil")
    grid = _grid(c)
    tm = pipeline.TrainMap(c, grid)
    data = _photo_jpeg_bytes(120, 90, seed=2)
    decoded, ok = pipeline.decode(data)
    assert ok
    flips = 0
    for seed in range(10):
        out = tm.random_map({"image": data, "label": 3}, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        top, left, h, w = T.rrc_params(90, 120, rng, scale=(0.5, 1.0))
        crop = np.ascontiguousarray(decoded[top:top + h, left:left + w])
        ref = np.asarray(Image.fromarray(crop).resize((32, 32), Image.BICUBIC)).astype(int)
        if float(rng.random()) < 0.5:
            ref, flips = ref[:, ::-1], flips + 1
        mask = masking.block_mask(rng, grid, c.mask.ratio, min_aspect=c.mask.min_aspect, tries=c.mask.tries)
        assert out["valid"] and out["label"] == 3
        assert out["image"].dtype == np.uint8 and out["image"].shape == (32, 32, 3)
        np.testing.assert_array_equal(out["image"], ref)
        np.testing.assert_array_equal(out["mask"], mask.reshape(-1))
    assert 0 < flips < 10


def test_finetune_train_map_matches_reference():
    """Fine-tuning's TrainMap against its steps written out separately, with non-default
    settings: crop scale (config.augment.crop_min_scale), flip, RandAugment with the configured
    ops and magnitude and ImageNet's mean as fill, then the erase box."""
    c = _config(image_size=32, image_backend="pil")
    c.task, c.augment.crop_min_scale, c.augment.erase_prob = "finetune", 0.6, 0.5
    c.augment.randaug_ops, c.augment.randaug_magnitude = 3, 4
    tm = pipeline.TrainMap(c, _grid(c))
    data = _photo_jpeg_bytes(120, 90, seed=3)
    decoded, _ = pipeline.decode(data)
    boxes = 0
    for seed in range(8):
        out = tm.random_map({"image": data, "label": 5}, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        top, left, h, w = T.rrc_params(90, 120, rng, scale=(0.6, 1.0))
        crop = np.ascontiguousarray(decoded[top:top + h, left:left + w])
        ref = Image.fromarray(crop).resize((32, 32), Image.BICUBIC)
        if float(rng.random()) < 0.5:
            ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        ref = RA.rand_augment(ref, rng, num_ops=3, magnitude=4, magnitude_std=0.5, increasing=True,
                              fill=(124, 116, 104))
        box = pipeline.erase_box(rng, 32, 0.5)
        boxes += int(box[2] > 0)
        assert out["valid"] and out["label"] == 5 and "mask" not in out
        np.testing.assert_array_equal(out["image"], np.asarray(ref))
        np.testing.assert_array_equal(out["erase_box"], box)
    assert 0 < boxes < 8


def test_train_map_jpeg_draft():
    c = _config(image_size=32, image_backend="pil")
    data = _photo_jpeg_bytes(640, 480, seed=5)
    assert pipeline.TrainMap(c, _grid(c)).draft is False
    c.input.jpeg_draft = True
    assert pipeline.TrainMap(c, _grid(c)).draft is True
    exact = pipeline.TrainMap(c, _grid(c), jpeg_draft=False)
    drafted = pipeline.TrainMap(c, _grid(c))
    for seed in range(4):
        a = exact.random_map({"image": data, "label": 0}, np.random.default_rng(seed))
        b = drafted.random_map({"image": data, "label": 0}, np.random.default_rng(seed))
        assert a["valid"] and b["valid"]
        np.testing.assert_array_equal(a["mask"], b["mask"])          # same draws
        diff = np.abs(a["image"].astype(int) - b["image"].astype(int))
        assert 0 < diff.mean() < 2.0                                  # a different downsample
    truncated = data[: len(data) // 2]
    for tm in (exact, drafted):
        out = tm.random_map({"image": truncated, "label": 1}, np.random.default_rng(0))
        assert not out["valid"] and not out["image"].any() and out["image"].shape == (32, 32, 3)
        assert out["mask"].shape == (_grid(c)[0] * _grid(c)[1],)


def test_folder_errors_name_the_path(tmp_path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(ValueError, match=str(missing)):
        sources.make(_config(f"folder:{missing}"), "train")

    root = tmp_path / "root"
    (root / "train" / "cls").mkdir(parents=True)
    (root / "train" / "cls" / "x.jpg").write_bytes(_jpeg_bytes((1, 2, 3)))
    with pytest.raises(ValueError, match=os.path.join(str(root), "validation")):
        sources.make(_config(f"folder:{root}"), "validation")

    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "train" / "b").mkdir(parents=True)
    (empty / "train" / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=os.path.join(str(empty), "train")):
        sources.make(_config(f"folder:{empty}"), "train")


# ----------------------------------------------------------------------------
# 6. batch contents
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("image_size", [32, 64])
def test_pretrain_batch_contents(image_size):
    c = _config("digits", image_size=image_size)
    src = sources.make(c, "train")
    gh, gw = _grid(c)
    n_tokens, cap = gh * gw, int(round(gh * gw * c.mask.ratio))
    batches = _take(pipeline.train_dataset(c, src, (gh, gw)), 4)
    for b in batches:
        assert set(b) == {"image", "mask", "label", "valid"}
        assert b["image"].dtype == np.uint8 and b["image"].shape == (8, image_size, image_size, 3)
        assert b["mask"].dtype == bool and b["mask"].shape == (8, n_tokens)
        assert b["label"].dtype == np.int32 and b["label"].shape == (8,)
        assert b["valid"].dtype == bool and b["valid"].all()
        assert ((b["label"] >= 0) & (b["label"] < 10)).all()
        counts = b["mask"].sum(1)
        assert (counts <= cap).all()
    assert np.concatenate([b["mask"].sum(1) for b in batches]).max() > 0


def test_finetune_batch_contents():
    size = 32
    c = _config("digits", image_size=size, task="finetune")
    c.augment.erase_prob = 1.0
    c.augment.randaug_ops = 2
    src = sources.make(c, "train")
    batches = _take(pipeline.train_dataset(c, src, _grid(c)), 3)
    boxes = np.concatenate([b["erase_box"] for b in batches])
    for b in batches:
        assert "mask" not in b
        assert b["image"].dtype == np.uint8 and b["image"].shape == (8, size, size, 3)
        assert b["erase_box"].dtype == np.int32 and b["erase_box"].shape == (8, 4)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 0).all() and (w >= 0).all()
    assert (top + h <= size).all() and (left + w <= size).all()
    assert (h > 0).mean() > 0.5          # p = 1: (almost) always a box

    c.augment.erase_prob = 0.0
    c.augment.randaug_ops = 0
    b = _take(pipeline.train_dataset(c, src, _grid(c)), 1)[0]
    assert not b["erase_box"].any()


# ----------------------------------------------------------------------------
# 7. TFDS without TensorFlow
# ----------------------------------------------------------------------------

def test_tfds_mock_imagenet_without_tensorflow():
    tfds = pytest.importorskip("tensorflow_datasets")
    c = _config("imagenet2012", image_size=32)
    c.model.num_classes = 1000
    with tfds.testing.mock_data(num_examples=12):
        src = sources.make(c, "train")
        assert len(src) == 12 and src.num_classes == 1000
        shapes = set()
        for i in range(len(src)):
            ex = src[i]
            assert ex["image"].dtype == np.uint8 and ex["image"].ndim == 3
            assert 0 <= ex["label"] < 1000
            shapes.add(ex["image"].shape)
        batches = _take(pipeline.train_dataset(c, src, _grid(c)), 2)
        for b in batches:
            assert b["image"].shape == (8, 32, 32, 3) and b["valid"].all()
        val = sources.make(c, "validation")
        ev = list(pipeline.eval_batches(c, val, 5))
        assert sum(int(b["valid"].sum()) for b in ev) == len(val)
        assert all(b["image"].shape == (5, 32, 32, 3) for b in ev)
    assert "tensorflow" not in sys.modules


def test_tfds_missing_data_dir_errors(tmp_path):
    c = _config("imagenet2012", image_size=32)
    c.input.data_dir = str(tmp_path / "no_such_dir")
    with pytest.raises(ValueError, match="config.input.data_dir"):
        sources.make(c, "train")


def test_validate_rejects_bad_tfds_data_dir(tmp_path):
    c = _config("imagenet2012", image_size=32)
    c.input.data_dir = str(tmp_path / "no_such_dir")
    with pytest.raises(ValueError, match="config.input.data_dir"):
        config_lib.validate(c, num_devices=8)
    c.input.data_dir = str(tmp_path)          # existing dir: passes
    config_lib.validate(c, num_devices=8)
