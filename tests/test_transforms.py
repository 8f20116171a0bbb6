"""Tests for maskfeat_jax.data.transforms and rand_augment (numpy + Pillow augmentations), and the
training map that chains them (``pipeline.TrainMap``)."""

import io

import numpy as np
import pytest
from PIL import Image

from maskfeat_jax import config as config_lib
from maskfeat_jax.data import pipeline
from maskfeat_jax.data import rand_augment as RA
from maskfeat_jax.data import transforms as T

H, W = 32, 48


def _rng(seed=0):
    return np.random.default_rng(seed)


@pytest.fixture
def noise():
    return _rng(1234).integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.fixture
def coords():
    """Coordinate-coded image: R = column, G = row, B = 7."""
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0] = np.arange(W)[None, :]
    img[..., 1] = np.arange(H)[:, None]
    img[..., 2] = 7
    return img


def _op(img, name, magnitude, rng=None, **kw):
    """One RandAugment op as ``rand_augment`` applies it, as an array."""
    return np.array(RA._apply_op(img, name, magnitude, rng, **kw))


def _train_image(img, rng, size, task="pretrain", backend="pil"):
    """The image of ``pipeline.TrainMap`` with the default augmentation of ``task`` (pre-training:
    crop scale (0.5, 1) and flip; fine-tuning: crop (0.08, 1), flip, RandAugment m9-mstd0.5)."""
    c = config_lib.base_config()
    c.task, c.input.image_size, c.input.image_backend = task, size, backend
    return pipeline.TrainMap(c, (4, 4)).random_map({"image": img, "label": 0}, rng)["image"]


def _pretrain(img, rng, size):
    return _train_image(img, rng, size, "pretrain")


def _finetune(img, rng, size):
    return _train_image(img, rng, size, "finetune")


def _gradient(h=H, w=W):
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    return np.broadcast_to((x + y) / 2, (h, w, 3)).astype(np.uint8).copy()


# ----------------------------------------------------------------------------
# random resized crop
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("size,shape", [(16, (16, 16)), ((12, 20), (12, 20)), (64, (64, 64))])
@pytest.mark.parametrize("interp", ["bicubic", "bilinear"])
def test_rrc_shapes(noise, size, shape, interp):
    out = T.random_resized_crop(noise, _rng(0), size, interpolation=interp)
    assert out.shape == shape + (3,) and out.dtype == np.uint8


@pytest.mark.parametrize("shape", [(17, 47), (47, 17), (1, 1), (2, 200)])
def test_rrc_tiny_and_extreme_inputs(shape):
    img = _rng(0).integers(0, 256, shape + (3,), dtype=np.uint8)
    for seed in range(10):
        assert T.random_resized_crop(img, _rng(seed), 8).shape == (8, 8, 3)


def test_rrc_determinism(noise):
    a = T.random_resized_crop(noise, _rng(5), 16)
    np.testing.assert_array_equal(a, T.random_resized_crop(noise, _rng(5), 16))
    assert any(not np.array_equal(a, T.random_resized_crop(noise, _rng(s), 16)) for s in range(6, 10))


def test_rrc_full_image_when_scale_one(noise):
    out = T.random_resized_crop(noise, _rng(3), (20, 30), scale=(1.0, 1.0), ratio=(W / H, W / H))
    expected = np.asarray(Image.fromarray(noise).resize((30, 20), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out, expected)


def test_rrc_params_bounds_and_fallback():
    for seed in range(200):
        top, left, h, w = T.rrc_params(H, W, _rng(seed), scale=(0.5, 1.0))
        assert 0 <= top <= H - h and 0 <= left <= W - w and h > 0 and w > 0
        assert 0.45 <= h * w / (H * W) <= 1.0
        assert 0.7 <= w / h <= 1.45
    # scale 1 and ratio 1 cannot fit a 32 x 48 image: centre crop clamped to ratio 1
    assert T.rrc_params(H, W, _rng(0), scale=(1.0, 1.0), ratio=(1.0, 1.0)) == (0, 8, 32, 32)
    assert T.rrc_params(W, H, _rng(0), scale=(1.0, 1.0), ratio=(1.0, 1.0)) == (8, 0, 32, 32)
    with pytest.raises(ValueError, match="scale"):
        T.rrc_params(H, W, _rng(0), scale=(0.9, 0.1))
    with pytest.raises(ValueError, match="ratio"):
        T.rrc_params(H, W, _rng(0), ratio=(0.0, 1.0))


def test_rrc_crop_content(coords):
    # nearest-neighbour resize to the crop's own size returns the crop itself
    rng_a, rng_b = _rng(11), _rng(11)
    top, left, h, w = T.rrc_params(H, W, rng_a)
    out = T.random_resized_crop(coords, rng_b, (h, w), interpolation="nearest")
    np.testing.assert_array_equal(out, coords[top:top + h, left:left + w])


def test_bad_inputs(noise):
    with pytest.raises(ValueError, match="img"):
        T.random_resized_crop(noise.astype(np.float32), _rng(), 8)
    with pytest.raises(ValueError, match="img"):
        T.random_flip(noise[..., :2], _rng())
    with pytest.raises(ValueError, match="interpolation"):
        T.random_resized_crop(noise, _rng(), 8, interpolation="cubic")
    with pytest.raises(ValueError, match="size"):
        T.random_resized_crop(noise, _rng(), 0)


def _photo_jpeg(w, h, seed=0, mode="RGB", texture=6.0):
    """JPEG bytes of a smooth random colour field with mild per-pixel texture."""
    rng = _rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.float32)
    img = np.clip(base + rng.normal(0.0, texture, (h, w, 1)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _reference_crop_resize(img, box, size):
    """torchvision's geometry written out: crop the array, then a separate PIL bicubic resize."""
    top, left, h, w = box
    out_h, out_w = size
    crop = np.ascontiguousarray(np.asarray(img)[top:top + h, left:left + w])
    return np.asarray(Image.fromarray(crop).resize((out_w, out_h), Image.Resampling.BICUBIC)).astype(int)


@pytest.mark.parametrize("size", [(16, 16), (24, 24), (20, 28), (64, 64)])
def test_resized_crop_matches_crop_then_resize(size):
    """The Pillow-native path equals the steps written out on arrays (crop the array, then a
    separate PIL bicubic resize) for the same drawn box, from an array or a Pillow image."""
    img = _rng(7).integers(0, 256, (90, 120, 3), dtype=np.uint8)  # white noise: no slack anywhere
    pil = Image.fromarray(img)
    for seed in range(20):
        rng_a, rng_b, rng_c = _rng(seed), _rng(seed), _rng(seed)
        box = T.rrc_params(90, 120, rng_a, scale=(0.08, 1.0))
        ref = _reference_crop_resize(img, box, size)
        np.testing.assert_array_equal(T.random_resized_crop(img, rng_b, size), ref)
        np.testing.assert_array_equal(np.asarray(T.random_resized_crop(pil, rng_c, size)), ref)
        assert rng_a.random() == rng_b.random() == rng_c.random(), "same draws as rrc_params"


def test_resized_crop_pil_and_array_agree(noise):
    box = T.rrc_params(H, W, _rng(4), scale=(0.5, 1.0))
    a = T.resized_crop(noise, box, (12, 20))
    p = T.resized_crop(Image.fromarray(noise), box, (12, 20))
    assert isinstance(a, np.ndarray) and isinstance(p, Image.Image) and p.size == (20, 12)
    np.testing.assert_array_equal(a, np.asarray(p))
    # random_resized_crop: same kind as given, same pixels, same draws
    ra, rp = _rng(8), _rng(8)
    a = T.random_resized_crop(noise, ra, 16)
    p = T.random_resized_crop(Image.fromarray(noise), rp, 16)
    assert isinstance(p, Image.Image)
    np.testing.assert_array_equal(a, np.asarray(p))
    assert ra.random() == rp.random()


def test_random_resized_crop_from_opened_jpeg():
    """An opened (not yet decoded) JPEG gives the same output as its decoded array."""
    data = _photo_jpeg(120, 90, seed=3)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    for seed in range(5):
        a = T.random_resized_crop(decoded, _rng(seed), 32, scale=(0.5, 1.0))
        p = T.random_resized_crop(Image.open(io.BytesIO(data)), _rng(seed), 32, scale=(0.5, 1.0))
        np.testing.assert_array_equal(a, np.asarray(p))
    gray = Image.open(io.BytesIO(_photo_jpeg(60, 40, mode="L")))
    out = T.random_resized_crop(gray, _rng(0), 8)
    assert out.mode == "RGB" and out.size == (8, 8)


def test_draft_scale():
    # a 1600 x 1200 crop at 224 can be decoded at 1/4 (400 x 300 >= 224) but not 1/8
    assert T.draft_scale((1600, 1200), (0, 0, 1200, 1600), 224) == 4
    assert T.draft_scale((1600, 1200), (0, 0, 1200, 1600), (150, 224)) == 4
    assert T.draft_scale((1000, 750), (10, 10, 460, 600), 224) == 2
    assert T.draft_scale((1000, 750), (10, 10, 440, 600), 224) == 1    # 440 / 2 < 224
    assert T.draft_scale((500, 375), (0, 0, 375, 500), 224) == 1       # ImageNet-sized: never
    assert T.draft_scale((4000, 3000), (0, 0, 3000, 4000), 64) == 8


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_draft_decode_close_to_exact(mode):
    w, h, size = 640, 480, (48, 64)
    data = _photo_jpeg(w, h, seed=1, mode=mode)
    for seed in range(3):
        box = T.rrc_params(h, w, _rng(seed), scale=(0.5, 1.0))
        s = T.draft_scale((w, h), box, size)
        assert s in (2, 4, 8)
        im, reduced = T.decode_for_crop(Image.open(io.BytesIO(data)), box, size, draft=True)
        assert reduced == s and im.mode == "RGB" and im.size == (-(-w // s), -(-h // s))
        drafted = np.asarray(T.resized_crop(im, box, size, reduced=reduced)).astype(int)
        one_call = np.asarray(T.resized_crop(Image.open(io.BytesIO(data)), box, size, draft=True))
        np.testing.assert_array_equal(drafted, one_call)
        exact = np.asarray(T.resized_crop(Image.open(io.BytesIO(data)), box, size)).astype(int)
        diff = np.abs(drafted - exact)
        assert 0 < diff.mean() < 2.0, diff.mean()   # a different downsample, same geometry
        assert np.percentile(diff, 99) <= 12
    # draft=False, or a loaded image, or an array: full-resolution decode, reduced == 1
    box = (0, 0, h, w)
    assert T.decode_for_crop(Image.open(io.BytesIO(data)), box, size)[1] == 1.0
    loaded = Image.open(io.BytesIO(data))
    loaded.load()
    assert T.decode_for_crop(loaded, box, size, draft=True)[1] == 1.0
    arr = np.zeros((h, w, 3), np.uint8)
    assert T.decode_for_crop(arr, box, size, draft=True)[1] == 1.0


def test_decode_for_crop_raises_on_truncated_jpeg():
    data = _photo_jpeg(640, 480)
    for draft in (False, True):
        im = Image.open(io.BytesIO(data[: len(data) // 2]))
        with pytest.raises(OSError):
            T.decode_for_crop(im, (0, 0, 480, 640), 32, draft=draft)


# ----------------------------------------------------------------------------
# flip, resize, centre crop
# ----------------------------------------------------------------------------

def test_flip(coords):
    np.testing.assert_array_equal(T.random_flip(coords, _rng(), p=1.0), coords[:, ::-1])
    out = T.random_flip(coords, _rng(), p=0.0)
    np.testing.assert_array_equal(out, coords)
    assert out is not coords
    flips = [T.random_flip(coords, _rng(s))[0, 0, 0] == W - 1 for s in range(400)]
    assert 0.4 < np.mean(flips) < 0.6


def test_resize_short_shapes(noise):
    assert T.resize_short(noise, 20).shape == (20, 30, 3)
    assert T.resize_short(noise.transpose(1, 0, 2), 20).shape == (30, 20, 3)
    odd = np.zeros((33, 50, 3), np.uint8)
    assert T.resize_short(odd, 20).shape == (20, 30, 3)  # int(20 * 50 / 33) = 30
    odd = np.zeros((52, 30, 3), np.uint8)
    assert T.resize_short(odd, 20).shape == (34, 20, 3)  # int(34.67): truncation, as torchvision


def test_center_crop_picks_centre(coords):
    np.testing.assert_array_equal(T.center_crop(coords, 16), coords[8:24, 16:32])
    np.testing.assert_array_equal(T.center_crop(coords, (15, 21)), coords[8:23, 14:35])
    # no-op resize (short side already 32) then centre crop
    out = T.resize_short_and_center_crop(coords, resize=H, crop=16)
    np.testing.assert_array_equal(out, coords[8:24, 16:32])
    # larger than the image: zero padding around the whole image
    big = T.center_crop(coords, (36, 50))
    np.testing.assert_array_equal(big[2:34, 1:49], coords)
    assert big[:2].sum() == 0 and big[:, :1].sum() == 0


def test_eval_transform(noise):
    out = T.eval_transform(noise, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    # 16 / 0.875 -> 18 short side, so 18 x 27 then centre 16 x 16
    resized = np.asarray(Image.fromarray(noise).resize((27, 18), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out, resized[1:17, 6:22])
    np.testing.assert_array_equal(T.eval_transform(noise, 16, resize=H), T.center_crop(noise, 16))


def test_eval_resize_truncates_as_the_official_loader(monkeypatch):
    sides = []
    monkeypatch.setattr(T, "resize_short_and_center_crop", lambda img, short, size, *_: sides.append(short))
    for size in (224, 96, 160, 384):
        T.eval_transform(np.zeros((8, 8, 3), np.uint8), size)
    assert sides == [256, 109, 182, 438]          # int(size / 0.875); rounding gives 110 and 183 for 96 and 160


# ----------------------------------------------------------------------------
# RandAugment ops
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", RA.RAND_INCREASING_OPS)
def test_each_op_shape_dtype_and_determinism(noise, name):
    out = _op(noise, name, 9, _rng(2))
    assert out.shape == noise.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _op(noise, name, 9, _rng(2)))


@pytest.mark.parametrize("name", ["Rotate", "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing",
                                  "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
                                  "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"])
def test_ops_identity_at_magnitude_zero(noise, name):
    for negate in (False, True):
        np.testing.assert_array_equal(_op(noise, name, 0, negate=negate), noise)


@pytest.mark.parametrize("name", [n for n in RA.RAND_INCREASING_OPS if n != "AutoContrast"])
def test_ops_change_image_at_high_magnitude(name):
    img = _rng(0).integers(40, 168, (H, W, 3), dtype=np.uint8)  # no extreme values
    out = _op(img, name, 10, negate=True)
    assert np.abs(out.astype(int) - img).mean() > 1.0


def test_autocontrast_and_equalize():
    img = _gradient() // 4 + 100  # values in [100, 163]
    out = _op(img, "AutoContrast", 5)
    assert out.min() <= 2 and out.max() >= 250
    out = _op(img, "Equalize", 5)
    assert out.max() >= 240 and out.min() < 10


def test_invert_posterize_solarize_exact(noise):
    np.testing.assert_array_equal(_op(noise, "Invert", 3), 255 - noise)
    np.testing.assert_array_equal(_op(noise, "PosterizeIncreasing", 0), noise & 0xF0)
    np.testing.assert_array_equal(_op(noise, "PosterizeIncreasing", 5), noise & 0xC0)
    np.testing.assert_array_equal(_op(noise, "PosterizeIncreasing", 10), 0 * noise)
    np.testing.assert_array_equal(_op(noise, "SolarizeIncreasing", 10), 255 - noise)
    half = np.where(noise >= 128, 255 - noise, noise)
    np.testing.assert_array_equal(_op(noise, "SolarizeIncreasing", 5), half)
    added = np.where(noise < 128, np.minimum(255, noise.astype(int) + 110), noise)
    np.testing.assert_array_equal(_op(noise, "SolarizeAdd", 10), added)
    added = np.where(noise < 128, noise.astype(int) + 55, noise)
    np.testing.assert_array_equal(_op(noise, "SolarizeAdd", 5), added)


def test_enhance_ops_direction(noise):
    dark = _op(noise, "BrightnessIncreasing", 10, negate=True)  # factor 0.1
    bright = _op(noise, "BrightnessIncreasing", 10, negate=False)  # factor 1.9
    assert dark.mean() < 0.15 * noise.mean() and bright.mean() > 1.3 * noise.mean()
    flat = _op(noise, "ContrastIncreasing", 10, negate=True)
    assert flat.std() < 0.2 * noise.std()
    grey = _op(noise, "ColorIncreasing", 10, negate=True).astype(int)
    assert np.abs(grey - grey.mean(-1, keepdims=True)).mean() < 0.2 * np.abs(
        noise - noise.mean(-1, keepdims=True)).mean()
    const = np.full((H, W, 3), 90, np.uint8)
    np.testing.assert_array_equal(_op(const, "SharpnessIncreasing", 10, negate=False), const)


def test_rotate_fill_and_centre():
    img = np.full((41, 41, 3), 200, np.uint8)
    out = _op(img, "Rotate", 10, negate=False, fill=(128, 10, 20))  # 30 degrees
    np.testing.assert_array_equal(out[0, 0], [128, 10, 20])
    np.testing.assert_array_equal(out[20, 20], [200, 200, 200])


def test_rotate_angle_mapping(noise):
    # magnitude 9 -> 27 degrees, counter-clockwise unless negated
    pil = Image.fromarray(noise)
    for negate, angle in [(False, 27.0), (True, -27.0)]:
        out = _op(noise, "Rotate", 9, negate=negate, interpolation="bilinear")
        ref = pil.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(128, 128, 128))
        np.testing.assert_array_equal(out, np.asarray(ref))


def test_translate_exact(coords):
    # nearest resampling, 40 px wide: 0.45 * 40 = 18 px shift at magnitude 10
    img = coords[:, :40]
    fill = (1, 2, 3)
    kw = dict(fill=fill, interpolation="nearest")
    out = _op(img, "TranslateXRel", 10, negate=False, **kw)
    np.testing.assert_array_equal(out[:, :22], img[:, 18:])
    assert (out[:, 22:] == fill).all()
    out = _op(img, "TranslateXRel", 10, negate=True, **kw)
    np.testing.assert_array_equal(out[:, 18:], img[:, :22])
    assert (out[:, :18] == fill).all()
    out = _op(img, "TranslateYRel", 5, negate=False, **kw)  # 0.225 * 32 = 7.2 px
    np.testing.assert_array_equal(out[:24], img[7:31])
    assert (out[-1] == fill).all()


def test_shear_direction(coords):
    kw = dict(fill=(0, 0, 0), interpolation="nearest")
    out = _op(coords, "ShearX", 10, negate=False, **kw)  # x_src = x + 0.3 y
    np.testing.assert_array_equal(out[0], coords[0])
    np.testing.assert_array_equal(out[30, :30, 0], coords[30, 9:39, 0])
    out = _op(coords, "ShearY", 10, negate=False, **kw)  # y_src = y + 0.3 x
    np.testing.assert_array_equal(out[:, 0], coords[:, 0])
    np.testing.assert_array_equal(out[:20, 30, 1], coords[9:29, 30, 1])


def test_apply_op_errors(noise):
    with pytest.raises(ValueError, match="name"):
        _op(noise, "Cutout", 5, _rng())
    with pytest.raises(ValueError, match="rng"):
        _op(noise, "Rotate", 5)


def test_outputs_are_writable_arrays(noise):
    outs = [T.random_resized_crop(noise, _rng(), 8), T.random_flip(noise, _rng()),
            T.eval_transform(noise, 8), RA.rand_augment(noise, _rng(), prob=1.0)]
    for out in outs:
        assert out.flags.writeable and out.dtype == np.uint8
    # the training map's image may be a read-only view of the Pillow image: batching copies it
    for out in (_finetune(noise, _rng(), 8), _pretrain(noise, _rng(), 8)):
        assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (8, 8, 3)


# ----------------------------------------------------------------------------
# RandAugment policy
# ----------------------------------------------------------------------------

def test_rand_augment_shape_determinism(noise):
    outs = [RA.rand_augment(noise, _rng(s)) for s in range(20)]
    for o in outs:
        assert o.shape == noise.shape and o.dtype == np.uint8
    np.testing.assert_array_equal(outs[3], RA.rand_augment(noise, _rng(3)))
    assert len({o.tobytes() for o in outs}) > 5
    # with prob 1/2 per op and two ops, about 1/4 of images are untouched
    untouched = np.mean([np.array_equal(RA.rand_augment(noise, _rng(s)), noise) for s in range(200)])
    assert 0.12 < untouched < 0.45


def test_rand_augment_degenerate_settings(noise):
    np.testing.assert_array_equal(RA.rand_augment(noise, _rng(0), num_ops=0), noise)
    np.testing.assert_array_equal(RA.rand_augment(noise, _rng(0), prob=0.0), noise)
    assert not np.array_equal(RA.rand_augment(noise, _rng(0), num_ops=6, prob=1.0), noise)
    with pytest.raises(NotImplementedError):
        RA.rand_augment(noise, _rng(0), increasing=False)


# ----------------------------------------------------------------------------
# normalisation and random erasing
# ----------------------------------------------------------------------------

def _normalize(img, mean=None, std=None):
    """The trainer's normalisation (``steps.normalize``, on device), default ``config.input`` mean and std."""
    from maskfeat_jax import steps
    c = config_lib.base_config()
    return np.asarray(steps.normalize(img, c.input.mean if mean is None else mean, c.input.std if std is None else std))


def test_normalize(noise):
    out = _normalize(noise)
    assert out.dtype == np.float32 and out.shape == noise.shape
    expected = (noise / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_allclose(_normalize(noise, (0.5,) * 3, (0.5,) * 3), noise / 127.5 - 1, atol=1e-6)


def _erase(x, box, seed=0):
    """The trainer's erasing: ``pipeline.erase_box`` draws the box, ``augment.erase`` fills it."""
    import jax
    import jax.numpy as jnp
    from maskfeat_jax import augment
    return np.asarray(augment.erase(jax.random.key(seed), jnp.asarray(x)[None], jnp.asarray(box)[None])[0])


def test_random_erasing_p0_identity():
    x = _normalize(_rng(0).integers(0, 256, (H, H, 3), dtype=np.uint8))
    box = pipeline.erase_box(_rng(0), H, 0.0)
    np.testing.assert_array_equal(box, 0)
    np.testing.assert_array_equal(_erase(x, box), x)


def test_random_erasing_rectangle():
    x = _normalize(_rng(0).integers(0, 256, (H, H, 3), dtype=np.uint8))
    erased = 0
    for seed in range(50):
        box = pipeline.erase_box(_rng(seed), H, 1.0)
        out = _erase(x, box, seed)
        assert out.dtype == np.float32 and out.shape == x.shape
        diff = (out != x).any(-1)
        if not diff.any():
            assert box[2] == 0
            continue
        erased += 1
        idx = np.argwhere(diff)
        (t, l), (b, r) = idx.min(0), idx.max(0) + 1
        np.testing.assert_array_equal([t, l, b - t, r - l], box)   # exactly the drawn box, filled
        assert diff[t:b, l:r].all() and b - t < H and r - l < H
        area = (b - t) * (r - l) / (H * H)
        assert 0.01 <= area <= 0.42  # (0.02, 1/3) up to rounding of h and w
        patch = out[t:b, l:r]
        assert abs(patch.mean()) < 1.0 and 0.5 < patch.std() < 1.5     # N(0, 1) noise
    assert erased >= 45
    np.testing.assert_array_equal(pipeline.erase_box(_rng(4), H, 1.0), pipeline.erase_box(_rng(4), H, 1.0))
    rate = np.mean([pipeline.erase_box(_rng(s), H, 0.25)[2] > 0 for s in range(400)])
    assert 0.17 < rate < 0.33


def test_random_erasing_requires_strictly_smaller_rectangle():
    for seed in range(5):  # a 10 x 10 rectangle never fits strictly inside 10 x 10
        box = pipeline.erase_box(_rng(seed), 10, 1.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
        np.testing.assert_array_equal(box, 0)
    box = pipeline.erase_box(_rng(0), 10, 1.0, scale=(0.81, 0.81), ratio=(1.0, 1.0))
    assert list(box[2:]) == [9, 9]
    x = _normalize(_rng(0).integers(0, 256, (10, 10, 3), dtype=np.uint8))
    assert (_erase(x, box) != x).any(-1).sum() == 81


# ----------------------------------------------------------------------------
# pipelines
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [_pretrain, _finetune])
def test_train_pipelines(noise, fn):
    out = fn(noise, _rng(0), 24)
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, fn(noise, _rng(0), 24))
    assert not np.array_equal(out, fn(noise, _rng(1), 24))
    small = _rng(0).integers(0, 256, (17, 47, 3), dtype=np.uint8)
    assert fn(small, _rng(0), 16).shape == (16, 16, 3)


def test_pretrain_equals_its_parts(noise):
    a, b = _rng(9), _rng(9)
    expected = T.random_flip(T.random_resized_crop(noise, b, 24, scale=(0.5, 1.0)), b)
    np.testing.assert_array_equal(_pretrain(noise, a, 24), expected)


def test_pretrain_equals_reference_geometry(noise):
    """Draw order crop then flip; pixels as crop-then-resize-then-flip on arrays."""
    flips = 0
    for seed in range(12):
        ref_rng = _rng(seed)
        box = T.rrc_params(H, W, ref_rng, scale=(0.5, 1.0))
        ref = _reference_crop_resize(noise, box, (12, 12))
        if float(ref_rng.random()) < 0.5:
            ref, flips = ref[:, ::-1], flips + 1
        for img in (noise, Image.fromarray(noise)):
            np.testing.assert_array_equal(_pretrain(img, _rng(seed), 12), ref)
    assert 0 < flips < 12


@pytest.mark.parametrize("fn", [_pretrain, _finetune])
def test_train_pipelines_pil_input(noise, fn):
    for seed in range(4):
        a = fn(noise, _rng(seed), 16)
        p = fn(Image.fromarray(noise), _rng(seed), 16)
        assert isinstance(p, np.ndarray) and p.dtype == np.uint8
        np.testing.assert_array_equal(a, p)


def test_random_flip_pil(noise):
    flipped = 0
    for seed in range(10):
        a = T.random_flip(noise, _rng(seed))
        p = T.random_flip(Image.fromarray(noise), _rng(seed))
        assert isinstance(p, Image.Image)
        np.testing.assert_array_equal(a, np.asarray(p))
        flipped += not np.array_equal(a, noise)
    assert 0 < flipped < 10


def test_rand_augment_and_eval_pil_input(noise):
    for seed in range(8):
        a = RA.rand_augment(noise, _rng(seed), prob=1.0)
        p = RA.rand_augment(Image.fromarray(noise), _rng(seed), prob=1.0)
        np.testing.assert_array_equal(a, p)
    np.testing.assert_array_equal(T.eval_transform(noise, 16), T.eval_transform(Image.fromarray(noise), 16))
    np.testing.assert_array_equal(_op(noise, "Rotate", 5, _rng(1)), _op(Image.fromarray(noise), "Rotate", 5, _rng(1)))


def test_imagenet_fill_is_the_rounded_imagenet_mean():
    """timm's RandAugment fill: round(255 * mean) per channel (the TrainMap test checks its use)."""
    assert RA.IMAGENET_FILL == tuple(round(255 * m) for m in (0.485, 0.456, 0.406))
