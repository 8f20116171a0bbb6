"""config.input.image_backend: "cv2" (simplejpeg decode + OpenCV resize) against "pil" (Pillow):
the same pixels decoded, the same crops and flips drawn, resized within 2 grey levels on real
photos (scikit-learn's sample images), bad files skipped alike, and reproducible from a seed."""
import io
import os

import numpy as np
import pytest
import sklearn.datasets
from PIL import Image

from maskfeat_jax import config as config_lib
from maskfeat_jax.data import pipeline, sources
from maskfeat_jax.data import transforms as T

import tiny

PHOTOS = ("china.jpg", "flower.jpg")              # 640x427 JPEGs


def _photo(name):
    return os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", name)


def _config(backend, task="pretrain", dataset="synthetic", image_size=224, batch=4):
    return tiny.config(task, overrides={
        "input.image_backend": backend, "input.dataset": dataset, "input.image_size": image_size,
        "input.global_batch_size": batch, "input.worker_count": 0})


def _jpeg(arr, **save):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def _mad(a, b):
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


def _take(ds, n):
    it = iter(ds)
    try:
        return [next(it) for _ in range(n)]
    finally:
        getattr(it, "close", lambda: None)()


@pytest.mark.parametrize("name", PHOTOS)
def test_decode_is_pillows(name):
    """simplejpeg decodes the pixels Pillow decodes, at full and at DCT-reduced scale."""
    path = _photo(name)
    jpeg = T.CvImage.open(path)
    with Image.open(path) as im:
        assert (jpeg.height, jpeg.width) == (im.height, im.width)
        np.testing.assert_array_equal(jpeg.decode(), np.asarray(im.convert("RGB")))
    with open(path, "rb") as f:
        assert T.CvImage.open(f.read()).height == jpeg.height
    for s in (2, 4, 8):
        with Image.open(path) as im:
            im.draft("RGB", (im.width // s, im.height // s))
            drafted = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(jpeg.decode(s), drafted)


def test_what_simplejpeg_rejects_goes_to_pillow(monkeypatch):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    cmyk = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(cmyk, format="JPEG")
    good = _jpeg(np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8))
    stray = good.replace(b"\xff\xdb", b"\x12\x34\xff\xdb", 1)   # libjpeg warns, Pillow decodes
    for other in (buf.getvalue(), cmyk.getvalue(), stray, b"", b"not an image", np.zeros((4, 4), np.uint8)):
        assert T.CvImage.open(other) is None
    arr = np.zeros((4, 5, 3), np.uint8)
    assert T.CvImage.open(arr).decode() is arr and (T.CvImage.open(arr).height, T.CvImage.open(arr).width) == (4, 5)
    with pytest.raises(FileNotFoundError):
        T.CvImage.open("/nonexistent/file.jpg")
    tm = pipeline.TrainMap(_config("cv2", image_size=32), (2, 2))
    for data in (stray, cmyk.getvalue()):
        assert tm.random_map({"image": data, "label": 0}, np.random.default_rng(0))["valid"]

    def refuse(*args, **kwargs):
        raise ValueError("Corrupt JPEG data")

    monkeypatch.setattr(T.simplejpeg, "decode_jpeg", refuse)        # header read, pixels refused
    rgb, reduced = T.decode_for_crop(T.CvImage.open(good), (0, 0, 48, 64), 16)
    assert isinstance(rgb, Image.Image) and reduced == 1.0
    np.testing.assert_array_equal(np.asarray(rgb), np.asarray(Image.open(io.BytesIO(good)).convert("RGB")))


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("scale,size", [((0.5, 1.0), 224), ((0.08, 1.0), 224), ((0.5, 1.0), 96)])
def test_cv2_resize_close_to_pillow_on_photos(name, scale, size):
    """The same box resized by both backends: within 2 grey levels (mean absolute difference);
    OpenCV's plain bilinear, which does not antialias, is not (the test can fail)."""
    img = T.CvImage.open(_photo(name)).decode()
    rng = np.random.default_rng(0)
    mads, aliased = [], []
    for _ in range(12):
        box = T.rrc_params(*img.shape[:2], rng, scale)
        pil = T.resized_crop(img, box, size, backend="pil")
        cv = T.resized_crop(img, box, size, backend="cv2")
        assert cv.shape == pil.shape == (size, size, 3) and cv.dtype == np.uint8
        mads.append(_mad(cv, pil))
        top, left, h, w = box
        aliased.append(_mad(T.cv2.resize(img[top:top + h, left:left + w], (size, size)), pil))
    assert np.mean(mads) < 2.0 and max(mads) < 2.5, mads
    if name == "china.jpg" and size == 96:
        assert np.mean(aliased) > 4.0
    for resize in (256, 140):
        pil, cv = (T.eval_transform(img, size, resize=resize, backend=b) for b in ("pil", "cv2"))
        assert cv.shape == pil.shape and _mad(cv, pil) < 2.0


def test_cv2_resize_paths():
    """Same size: a copy; growing: bicubic; shrinking by up to 2x and beyond: antialiased (1-pixel
    stripes keep no more contrast than under OpenCV's INTER_AREA, far less than under plain bilinear)."""
    img = np.random.default_rng(0).integers(0, 256, (40, 60, 3), np.uint8)
    out = T._cv2_resize(img, 40, 60, "bicubic")
    assert out is not img
    np.testing.assert_array_equal(out, img)
    assert T._cv2_resize(img, 80, 90, "bicubic").shape == (80, 90, 3)
    stripes = np.zeros((90, 90, 3), np.uint8)
    stripes[:, ::2] = 255
    for side in (60, 36):                          # 1.5x and 2.5x smaller
        out = T._cv2_resize(stripes, side, side, "bicubic").astype(float)
        area, linear = (T.cv2.resize(stripes, (side, side), interpolation=i).std()
                        for i in (T.cv2.INTER_AREA, T.cv2.INTER_LINEAR))
        assert abs(out.mean() - 127.5) < 1 and out.std() <= area + 1 and out.std() < 0.6 * linear, side
    nearest = T._cv2_resize(stripes, 45, 45, "nearest")
    assert set(np.unique(nearest)) <= {0, 255}


@pytest.mark.parametrize("task,kind", [("pretrain", "bytes"), ("pretrain", "path"), ("pretrain", "array"),
                                       ("finetune", "bytes")])
def test_same_crop_and_flip_under_a_seed(task, kind):
    """TrainMap under both backends draws the same crop, flip and mask / erase box: the images
    agree within 2 grey levels, and not with the other one mirrored. Examples can be encoded
    bytes, a path (folder:) or a decoded array (TFDS, digits)."""
    path = _photo("china.jpg")
    with open(path, "rb") as f:
        data = {"bytes": f.read(), "path": path, "array": np.asarray(Image.open(path))}[kind]
    maps = {b: pipeline.TrainMap(_config(b, task), (14, 14)) for b in ("cv2", "pil")}
    key = "mask" if task == "pretrain" else "erase_box"
    for seed in range(6):
        a, b = (maps[k].random_map({"image": data, "label": 1}, np.random.default_rng(seed)) for k in maps)
        assert a["valid"] and b["valid"] and a["image"].shape == (224, 224, 3)
        np.testing.assert_array_equal(a[key], b[key])
        assert _mad(a["image"], b["image"]) < 2.0 < _mad(a["image"][:, ::-1], b["image"])


def test_exif_orientation_ignored_by_both():
    """Neither backend applies the EXIF orientation (Pillow's Image.open does not): a portrait
    JPEG tagged to be rotated stays as stored, in the header size and in the pixels."""
    arr = np.zeros((48, 96, 3), np.uint8)
    arr[:, :48] = (220, 30, 30)                    # red left half
    exif = Image.Exif()
    exif[0x0112] = 6                               # "rotate 90 CW to display"
    data = _jpeg(arr, exif=exif.tobytes())
    jpeg = T.CvImage.open(data)
    assert (jpeg.height, jpeg.width) == (48, 96)
    for b in ("cv2", "pil"):
        c = _config(b, image_size=32)
        c.augment.flip = False
        out = pipeline.TrainMap(c, (2, 2)).random_map({"image": data, "label": 0}, np.random.default_rng(0))
        assert out["image"][:, 0, 0].mean() > 150 and out["image"][:, -1, 0].mean() < 80, b
        ev = pipeline.EvalMap(32, b).map({"image": data, "label": 0})["image"]
        assert ev[:, 0, 0].mean() > 150 and ev[:, -1, 0].mean() < 80, b


def test_jpeg_draft_under_cv2():
    """input.jpeg_draft: the same power-of-two DCT scale as Pillow's draft, then the OpenCV resize."""
    rng = np.random.default_rng(5)
    base = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 8, 3), np.uint8)).resize((640, 480)))
    data = _jpeg(np.clip(base + rng.normal(0, 6, (480, 640, 1)), 0, 255).astype(np.uint8))
    box = (40, 60, 400, 520)
    rgb, reduced = T.decode_for_crop(T.CvImage.open(data), box, 32, draft=True)
    assert reduced == 8 and rgb.shape == (60, 80, 3)
    c = _config("cv2", image_size=32)
    exact = pipeline.TrainMap(c, (2, 2), jpeg_draft=False)
    drafted = pipeline.TrainMap(c, (2, 2), jpeg_draft=True)
    for seed in range(4):
        a, b = (m.random_map({"image": data, "label": 0}, np.random.default_rng(seed)) for m in (exact, drafted))
        np.testing.assert_array_equal(a["mask"], b["mask"])
        assert 0 < _mad(a["image"], b["image"]) < 3.0
    out = drafted.random_map({"image": data[: len(data) // 2], "label": 0}, np.random.default_rng(0))
    assert not out["valid"] and not out["image"].any()


_FILES = {   # class folder: (file name, kind); sorted names are the labels
    "a_good": ("a.jpg", "red"), "b_truncated": ("b.jpg", "truncated"), "c_empty": ("c.jpg", "empty"),
    "d_text": ("d.JPEG", "text"), "e_gray_png": ("e.png", "gray_png"), "f_cmyk": ("f.jpg", "cmyk"),
    "g_upper": ("G.JPEG", "green"),
}
_GOOD = {"a_good", "e_gray_png", "f_cmyk", "g_upper"}


def _file(kind):
    buf = io.BytesIO()
    if kind in ("red", "green"):
        Image.new("RGB", (40, 30) if kind == "red" else (50, 70),
                  (200, 30, 30) if kind == "red" else (30, 200, 30)).save(buf, format="JPEG")
    elif kind == "truncated":
        noise = _jpeg(np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8))
        return noise[: len(noise) // 2]
    elif kind == "gray_png":
        Image.new("L", (33, 21), 150).save(buf, format="PNG")
    elif kind == "cmyk":
        Image.new("CMYK", (36, 28), (0, 200, 200, 0)).save(buf, format="JPEG")
    return {"empty": b"", "text": b"this is not an image\n"}.get(kind, buf.getvalue())


@pytest.fixture
def bad_folder(tmp_path):
    for split in ("train", "validation"):
        for cls, (name, kind) in _FILES.items():
            (tmp_path / split / cls).mkdir(parents=True)
            (tmp_path / split / cls / name).write_bytes(_file(kind))
    return tmp_path


def test_bad_files_skipped_and_counted_alike(bad_folder):
    """Truncated, empty and non-image files come back blank with valid=False under both
    backends; PNG and CMYK JPEGs (left to Pillow by the cv2 backend) decode; colours survive."""
    classes = sorted(_FILES)
    results = {}
    for b in ("cv2", "pil"):
        c = _config(b, dataset=f"folder:{bad_folder}", image_size=32, batch=7)
        src = sources.make(c, "train")
        for batch in _take(pipeline.train_dataset(c, src, (2, 2)), 3):
            for img, label, valid in zip(batch["image"], batch["label"], batch["valid"]):
                name = classes[label]
                assert bool(valid) == (name in _GOOD), (b, name)
                assert bool(img.any()) == bool(valid), (b, name)
        ev = list(pipeline.eval_batches(c, sources.make(c, "validation"), 4))
        valid = np.concatenate([e["valid"] for e in ev])
        images = np.concatenate([e["image"] for e in ev])
        assert valid.tolist() == [k in _GOOD for k in classes] + [False]
        results[b] = images[valid]
    red, gray, cmyk, green = results["cv2"]
    assert red[..., 0].mean() > 150 and green[..., 1].mean() > 150 and red[..., 1].mean() < 80
    assert (gray[..., 0] == gray[..., 1]).all() and abs(float(gray.mean()) - 150) < 3
    for x, y in zip(results["cv2"], results["pil"]):
        assert _mad(x, y) < 2.0


def test_cv2_pipeline_is_deterministic():
    with open(_photo("flower.jpg"), "rb") as f:
        data = f.read()

    class Photos:
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"image": data, "label": i}

    c = _config("cv2", image_size=64, batch=4)
    a, b = (_take(pipeline.train_dataset(c, Photos(), (4, 4)), 3) for _ in range(2))
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    c.seed = 1
    other = _take(pipeline.train_dataset(c, Photos(), (4, 4)), 1)[0]
    assert not np.array_equal(other["image"], a[0]["image"])


def test_backend_is_validated():
    c = _config("cv2")
    c.input.image_backend = "opencv"
    with pytest.raises(ValueError, match="config.input.image_backend"):
        config_lib.validate(c, 1)
    with pytest.raises(ValueError, match="backend"):
        T.resized_crop(np.zeros((8, 8, 3), np.uint8), (0, 0, 8, 8), 4, backend="opencv")
