"""Host-side image augmentations (numpy + Pillow or OpenCV), spec section 9.

Images are ``(H, W, 3)`` ``uint8`` numpy arrays or RGB ``PIL.Image`` images.
The geometric functions (:func:`random_resized_crop`, :func:`resized_crop`,
:func:`random_flip`) return the kind they are given (``backend="cv2"``: an array),
so a pipeline can keep an image in Pillow from decoding to the last augmentation
and convert it to numpy once;
everything else returns a ``uint8`` array unless stated otherwise. A Pillow
image that is opened but not yet loaded (``PIL.Image.open``) is accepted too
and decoded on first use, which lets :func:`resized_crop` decode a JPEG at a
reduced DCT scale (``draft=True``). Every random function takes an explicit
:class:`numpy.random.Generator`, so a pipeline is reproducible from a seed.
The sampling rules follow torchvision (random resized crop, resize, centre
crop) and timm (RandAugment ``rand-m9-mstd0.5-inc1``, random erasing); the
random streams differ from those libraries, the distributions do not.

Two backends (``backend=``, ``config.input.image_backend``) decode and resize:
``"pil"`` (the default here) is Pillow throughout (antialiased bicubic, the path
of the official numbers); ``"cv2"`` decodes JPEGs with simplejpeg (libjpeg-turbo,
the pixels Pillow decodes, see :class:`CvImage`) and crops and resizes with
OpenCV: an area average when both sides shrink, else ``INTER_CUBIC``; on photos
within 2 grey levels (mean absolute difference) of Pillow's resize, in about a
third of its time. Both draw the same crops and flips from a seed. RandAugment
runs on Pillow in both (an array converts to Pillow and back in under 0.1 ms,
2-3% of a fine-tuning example).

Pipelines:

* :func:`pretrain_transform` -- RRC scale (0.5, 1), bicubic, h-flip.
* :func:`finetune_transform` -- RRC scale (0.08, 1), bicubic, h-flip,
  RandAugment; random erasing comes later, on device after normalisation
  (``pipeline.erase_box`` draws the box, ``steps.erase`` fills it).
* :func:`eval_transform` -- short side to ``int(size / 0.875)``, centre crop.
"""

from __future__ import annotations

import io
import math
import os
from typing import Sequence

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageEnhance, ImageOps

cv2.setNumThreads(1)   # one image per worker process: OpenCV's own threads would only contend

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ImageNet mean as uint8, ``round(255 * m)``: the fill timm uses for RandAugment
#: inside ``transforms_imagenet_train`` (its ``img_mean`` hparam).
IMAGENET_FILL = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)  # (124, 116, 104)

RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)
_SIGNED_OPS = {"Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
               "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
_INTERP = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
           "nearest": Image.Resampling.NEAREST}
_CV2_INTERP = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}
_MAX_LEVEL = 10.0
BACKENDS = ("cv2", "pil")


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

def _check_img(img: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(img, Image.Image):
        return np.array(_pil(img))
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
        raise ValueError(f"img must be a non-empty (H, W, 3) uint8 array, got {img.dtype} {img.shape}")
    return img


def _pil(img: np.ndarray | Image.Image) -> Image.Image:
    """An RGB Pillow image: a Pillow image as it is (converted if not RGB), an array wrapped."""
    if isinstance(img, Image.Image):
        if min(img.size) < 1:
            raise ValueError(f"img must be a non-empty image, got size {img.size}")
        return img if img.mode == "RGB" else img.convert("RGB")
    return Image.fromarray(np.ascontiguousarray(_check_img(img)))


def _like(out: Image.Image, img) -> np.ndarray | Image.Image:
    """``out`` as the kind of ``img``: a Pillow image stays one, anything else becomes an array."""
    return out if isinstance(img, Image.Image) else np.array(out)


def _resample(interpolation: str) -> int:
    try:
        return _INTERP[interpolation]
    except KeyError:
        raise ValueError(f"interpolation must be one of {sorted(_INTERP)}, got {interpolation!r}") from None


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _cv2_resize(img: np.ndarray, out_h: int, out_w: int, interpolation: str) -> np.ndarray:
    """OpenCV resize: when neither side grows, the ``INTER_AREA`` box average; else (and for
    ``nearest``) the interpolation asked for.

    A shrink by at most 2x (93% of a 500x375 image's pre-training crops at 224) is INTER_LINEAR onto
    twice the output grid, then INTER_AREA's exact 2x2 average (its vectorised integer path):
    as close to Pillow as OpenCV's general INTER_AREA on photos, in a third to a half of its
    time, but softer where the crop is within 1.3x of the output (the linear step blurs).
    """
    h, w = img.shape[:2]
    if (h, w) == (out_h, out_w):
        return img.copy()
    if h < out_h or w < out_w or interpolation == "nearest":
        return cv2.resize(img, (out_w, out_h), interpolation=_CV2_INTERP[interpolation])
    if h <= 2 * out_h and w <= 2 * out_w:
        img = cv2.resize(img, (2 * out_w, 2 * out_h), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_AREA)


def _hw(size: int | Sequence[int], name: str = "size") -> tuple[int, int]:
    h, w = (size, size) if np.isscalar(size) else tuple(size)
    if int(h) != h or int(w) != w or h < 1 or w < 1:
        raise ValueError(f"{name} must be a positive int or (h, w), got {size!r}")
    return int(h), int(w)


def _uniform(rng: np.random.Generator, a: float, b: float) -> float:
    return a + (b - a) * float(rng.random())


# ----------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------

def rrc_params(height: int, width: int, rng: np.random.Generator, scale=(0.08, 1.0),
               ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: returns ``(top, left, h, w)``.

    10 attempts of area fraction ``~U(scale)`` and log-uniform aspect
    ``w / h ~ ratio``; fallback is the centre crop with the aspect clamped
    to ``ratio``.
    """
    if not (0 < scale[0] <= scale[1]):
        raise ValueError(f"scale must satisfy 0 < scale[0] <= scale[1], got {scale!r}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < ratio[0] <= ratio[1], got {ratio!r}")
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(rng, *scale)
        aspect = math.exp(_uniform(rng, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h, endpoint=True))
            left = int(rng.integers(0, width - w, endpoint=True))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def draft_scale(img_size: tuple[int, int], box: tuple[int, int, int, int],
                size: int | Sequence[int]) -> int:
    """JPEG DCT scale for :func:`resized_crop` with ``draft=True``: the largest of
    8, 4, 2 (else 1) that keeps the crop ``box = (top, left, h, w)`` at least
    ``size`` in both sides, so that the resize after it still only shrinks.

    ``img_size`` is Pillow's ``(width, height)`` of the full image; a scale
    ``s`` also needs a short side of at least ``s * s`` pixels, where Pillow's
    ``draft`` is sure to pick exactly ``s``.
    """
    out_h, out_w = _hw(size)
    _, _, h, w = box
    for s in (8, 4, 2):
        if h >= s * out_h and w >= s * out_w and min(img_size) >= s * s:
            return s
    return 1


class CvImage:
    """An image for the ``cv2`` backend whose size is known before it is decoded: a JPEG's
    bytes, decoded on demand by simplejpeg (libjpeg-turbo, as in Pillow: the same pixels), or
    an ``(H, W, 3)`` uint8 array, as it is.

    :meth:`open` returns ``None`` for what it leaves to Pillow: other arrays and formats (PNG,
    ...), JPEGs in CMYK, an unreadable header. Like Pillow's ``Image.open``, it ignores the
    EXIF orientation. ``height``, ``width`` and ``close`` match an opened Pillow image's.
    """

    def __init__(self, data: bytes | None, height: int, width: int, pixels: np.ndarray | None = None):
        self.data, self.height, self.width, self.pixels = data, height, width, pixels

    @classmethod
    def open(cls, image) -> CvImage | None:
        """``image``: an array, encoded bytes or a path (read here); anything else gives ``None``."""
        if isinstance(image, np.ndarray):
            ok = image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) > 0
            return cls(None, *image.shape[:2], pixels=image) if ok else None
        if isinstance(image, (str, os.PathLike)):
            with open(image, "rb") as f:
                image = f.read()
        if not isinstance(image, (bytes, bytearray, memoryview)):
            return None
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(image)
        except ValueError:
            return None
        ok = colorspace in ("YCbCr", "RGB", "Gray") and min(height, width) > 0
        return cls(image, height, width) if ok else None

    def decode(self, scale: int = 1) -> np.ndarray:
        """RGB pixels at DCT scale ``1 / scale`` (1, 2, 4 or 8), ``ceil(height / scale)`` by
        ``ceil(width / scale)`` (an array: as it is); raises ``ValueError`` on corrupt data."""
        if self.pixels is not None:
            return self.pixels
        return simplejpeg.decode_jpeg(self.data, "RGB", min_height=-(-self.height // scale),
                                      min_width=-(-self.width // scale))

    def close(self) -> None:
        """Nothing to release (a Pillow image's ``close``)."""


def decode_for_crop(img: np.ndarray | Image.Image | CvImage, box: tuple[int, int, int, int],
                    size: int | Sequence[int], *, draft: bool = False) -> tuple[np.ndarray | Image.Image, float]:
    """Decode an image for :func:`resized_crop` of ``box = (top, left, h, w)``.

    Returns ``(rgb, reduced)``: the RGB pixels (an array for a :class:`CvImage`, else a
    loaded Pillow image) and the factor by which they are smaller
    than the image ``box`` refers to. ``reduced`` is 1 unless ``draft`` is set
    and ``img`` is a JPEG's :class:`CvImage` or a JPEG opened with Pillow but not yet loaded;
    it is then decoded at the DCT scale ``1 / draft_scale(...)``. A :class:`CvImage`
    that simplejpeg rejects is decoded by Pillow. Decoding errors (corrupt or
    truncated files) are raised here, not in the resize.
    """
    if isinstance(img, CvImage):
        try:
            rgb = img.decode(draft_scale((img.width, img.height), box, size) if draft else 1)
            return rgb, img.width / rgb.shape[1]
        except ValueError:   # strict about what Pillow tolerates (stray bytes): let Pillow try
            img = Image.open(io.BytesIO(img.data))
    reduced = 1.0
    if (draft and isinstance(img, Image.Image) and img.format == "JPEG" and getattr(img, "tile", None)):
        s = draft_scale(img.size, box, size)
        if s > 1:
            width = img.width
            res = img.draft(img.mode, (width // s, img.height // s))
            if res is not None:
                reduced = width / res[1][2]
    if isinstance(img, Image.Image):
        img.load()
    return _pil(img), reduced


def resized_crop(img: np.ndarray | Image.Image | CvImage, box: tuple[int, int, int, int], size: int | Sequence[int],
                 interpolation: str = "bicubic", *, draft: bool = False, reduced: float = 1.0,
                 backend: str = "pil") -> np.ndarray | Image.Image:
    """The crop ``box = (top, left, h, w)`` (full-image pixels) resized to ``size``.

    ``backend="pil"``: Pillow crop then resize, as torchvision's ``resized_crop`` on
    a Pillow image (the filter clamps at the crop's edges, so the result is that of
    the crop alone, as in :mod:`maskfeat_jax.data.video_transforms`). A single
    ``resize(..., box=...)`` call would save only the crop's copy, which
    measures the same per image as long as the allocations do not page-fault,
    and would read pixels outside the crop along its border. ``backend="cv2"``:
    the crop (a view) resized by OpenCV, an area average when neither side grows
    (see ``_cv2_resize``); the result is an array.

    ``draft=True`` applies to a JPEG's :class:`CvImage` or a JPEG opened but not yet
    loaded: it is decoded at the DCT scale 1/2, 1/4 or 1/8 of :func:`draft_scale`
    (libjpeg's block-wise low-pass downsample, done while decoding), and the
    resize then shrinks the crop by the remaining factor, at least 1. This is a
    different antialiased downsample from bicubic on the full-resolution crop:
    on photo-like 1000x750 to 3000x2000 JPEGs at 224 the mean absolute
    difference is 0.3 to 2 grey levels, for 1.5 to 6 times less time per
    image. ImageNet-sized images (about 500x375) at 224 are never drafted
    (their crops are under twice the output size). Other images and
    ``draft=False`` use the full-resolution decode. ``reduced`` says that
    ``img`` was already decoded ``reduced`` times smaller than the image
    ``box`` refers to (from :func:`decode_for_crop`).
    """
    out_h, out_w = _hw(size)
    resample = _resample(interpolation)
    _check_backend(backend)
    top, left, h, w = box
    if draft or isinstance(img, CvImage):
        img, reduced = decode_for_crop(img, box, (out_h, out_w), draft=draft)
    if backend == "cv2":   # the drafted crop's fractional edges are rounded (under half an output pixel)
        arr = _check_img(img)
        y0, x0 = round(top / reduced), round(left / reduced)
        y1, x1 = max(y0 + 1, round((top + h) / reduced)), max(x0 + 1, round((left + w) / reduced))
        return _cv2_resize(arr[y0:y1, x0:x1], out_h, out_w, interpolation)
    pil = _pil(img)
    if reduced == 1.0:
        out = pil.crop((left, top, left + w, top + h)).resize((out_w, out_h), resample)
    else:   # the crop in drafted pixels has fractional edges: resize that box of the image
        crop_box = (left / reduced, top / reduced, min((left + w) / reduced, pil.width),
                    min((top + h) / reduced, pil.height))
        out = pil.resize((out_w, out_h), resample, box=crop_box)
    return _like(out, img)


def random_resized_crop(img: np.ndarray | Image.Image | CvImage, rng: np.random.Generator, size: int | Sequence[int],
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation: str = "bicubic", *,
                        draft: bool = False, backend: str = "pil") -> np.ndarray | Image.Image:
    """Random crop (:func:`rrc_params`) resized to ``size`` (int or ``(h, w)``) with
    :func:`resized_crop`. The crop is drawn from the image size alone, so an
    opened JPEG is not decoded before it (see ``draft`` there)."""
    out_h, out_w = _hw(size)
    _resample(interpolation)
    if isinstance(img, (Image.Image, CvImage)):
        height, width = img.height, img.width
    else:
        height, width = _check_img(img).shape[:2]
    box = rrc_params(height, width, rng, scale, ratio)
    return resized_crop(img, box, (out_h, out_w), interpolation, draft=draft, backend=backend)


def random_flip(img: np.ndarray | Image.Image, rng: np.random.Generator,
                p: float = 0.5) -> np.ndarray | Image.Image:
    """Horizontal flip with probability ``p`` (one draw); always returns a new image
    of the kind given (array or Pillow image)."""
    flip = float(rng.random()) < p
    if isinstance(img, Image.Image):
        pil = _pil(img)
        return pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else pil.copy()
    img = _check_img(img)
    return cv2.flip(img, 1) if flip else img.copy()   # 40x faster than numpy's strided copy


def resize_short(img: np.ndarray | Image.Image, size: int, interpolation: str = "bicubic",
                 backend: str = "pil") -> np.ndarray:
    """torchvision ``Resize(int)``: short side to ``size``, long side ``int(size * long / short)``."""
    resample = _resample(interpolation)
    _check_backend(backend)
    img = _pil(img) if backend == "pil" else _check_img(img)
    h, w = (img.height, img.width) if backend == "pil" else img.shape[:2]
    short, long_ = min(w, h), max(w, h)
    new_long = int(size * long_ / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if backend == "cv2":
        return _cv2_resize(img, new_h, new_w, interpolation)
    return np.array(img.resize((new_w, new_h), resample))


def center_crop(img: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """torchvision ``CenterCrop``: offsets ``round((H - h) / 2)``; zero-pads when too small."""
    img = _check_img(img)
    ch, cw = _hw(size)
    h, w = img.shape[:2]
    if ch > h or cw > w:
        pt, pl = max(ch - h, 0) // 2, max(cw - w, 0) // 2
        pb, pr = (max(ch - h, 0) + 1) // 2, (max(cw - w, 0) + 1) // 2
        img = np.pad(img, ((pt, pb), (pl, pr), (0, 0)))
        h, w = img.shape[:2]
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return img[top:top + ch, left:left + cw].copy()


def resize_short_and_center_crop(img: np.ndarray | Image.Image, resize: int = 256, crop: int | Sequence[int] = 224,
                                 interpolation: str = "bicubic", backend: str = "pil") -> np.ndarray:
    """Evaluation geometry: :func:`resize_short` to ``resize`` then :func:`center_crop`."""
    return center_crop(resize_short(img, resize, interpolation, backend), crop)


# ----------------------------------------------------------------------------
# RandAugment (timm "rand-m9-mstd0.5-inc1")
# ----------------------------------------------------------------------------

def _op_arg(name: str, level: float, negate: bool, translate_pct: float):
    """timm's level -> argument mapping of the "increasing" op set (level in [0, 10])."""
    frac = level / _MAX_LEVEL
    sign = -1.0 if negate else 1.0
    if name == "Rotate":
        return sign * frac * 30.0
    if name == "PosterizeIncreasing":
        return 4 - int(frac * 4)
    if name == "SolarizeIncreasing":
        return 256 - int(frac * 256)
    if name == "SolarizeAdd":
        return int(frac * 110)
    if name.endswith("Increasing"):  # Color / Contrast / Brightness / Sharpness
        return max(0.1, 1.0 + sign * frac * 0.9)
    if name in ("ShearX", "ShearY"):
        return sign * frac * 0.3
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * frac * translate_pct
    return None


def apply_op(img: np.ndarray | Image.Image, name: str, magnitude: float,
             rng: np.random.Generator | None = None, *, negate: bool | None = None,
             fill: Sequence[int] = (128, 128, 128), interpolation: str = "bicubic",
             translate_pct: float = 0.45) -> np.ndarray:
    """Apply one RandAugment op (always, no probability gate) at ``magnitude`` in [0, 10].

    Signed ops negate their argument with probability 1/2 drawn from ``rng``
    unless ``negate`` is given. ``interpolation="random"`` picks bilinear or
    bicubic per call, as timm does when no interpolation is configured.
    """
    return np.array(_apply_op(_pil(img), name, magnitude, rng, negate=negate, fill=fill,
                              interpolation=interpolation, translate_pct=translate_pct))


def _apply_op(pil: Image.Image, name: str, magnitude: float, rng: np.random.Generator | None, *,
              negate: bool | None, fill: Sequence[int], interpolation: str,
              translate_pct: float) -> Image.Image:
    """:func:`apply_op` on an RGB Pillow image, returning a Pillow image."""
    if name not in RAND_INCREASING_OPS:
        raise ValueError(f"name must be one of {RAND_INCREASING_OPS}, got {name!r}")
    if negate is None:
        if name in _SIGNED_OPS and rng is None:
            raise ValueError(f"rng is required for {name} unless negate is given")
        negate = name in _SIGNED_OPS and float(rng.random()) > 0.5
    if interpolation == "random":
        resample = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)[int(rng.integers(2))]
    else:
        resample = _resample(interpolation)
    fill = tuple(int(c) for c in fill)
    arg = _op_arg(name, float(np.clip(magnitude, 0.0, _MAX_LEVEL)), negate, translate_pct)
    if name == "AutoContrast":
        out = ImageOps.autocontrast(pil)
    elif name == "Equalize":
        out = ImageOps.equalize(pil)
    elif name == "Invert":
        out = ImageOps.invert(pil)
    elif name == "Rotate":
        out = pil.rotate(arg, resample=resample, fillcolor=fill)
    elif name == "PosterizeIncreasing":  # LUT: recent ImageOps.posterize rejects bits=0
        keep = 0xFF & ~(2 ** (8 - arg) - 1)
        out = pil.point([i & keep for i in range(256)] * 3)
    elif name == "SolarizeIncreasing":
        out = ImageOps.solarize(pil, arg)
    elif name == "SolarizeAdd":
        out = pil.point([min(255, i + arg) if i < 128 else i for i in range(256)] * 3)
    elif name in ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        matrix = {"ShearX": (1, arg, 0, 0, 1, 0), "ShearY": (1, 0, 0, arg, 1, 0),
                  "TranslateXRel": (1, 0, arg * pil.width, 0, 1, 0),
                  "TranslateYRel": (1, 0, 0, 0, 1, arg * pil.height)}[name]
        out = pil.transform(pil.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)
    else:
        enhancer = {"ColorIncreasing": ImageEnhance.Color, "ContrastIncreasing": ImageEnhance.Contrast,
                    "BrightnessIncreasing": ImageEnhance.Brightness,
                    "SharpnessIncreasing": ImageEnhance.Sharpness}[name]
        out = enhancer(pil).enhance(arg)
    return out


def rand_augment(img: np.ndarray | Image.Image, rng: np.random.Generator, num_ops: int = 2, magnitude: float = 9,
                 magnitude_std: float = 0.5, increasing: bool = True, *, prob: float = 0.5,
                 fill: Sequence[int] = (128, 128, 128), interpolation: str = "bicubic") -> np.ndarray:
    """timm RandAugment: ``num_ops`` ops drawn uniformly *with replacement*
    from :data:`RAND_INCREASING_OPS`; each is applied with probability
    ``prob``, with magnitude ``~N(magnitude, magnitude_std)`` clipped to
    [0, 10] (``magnitude_std=inf`` means ``U(0, magnitude)``).

    Only the "increasing" op set (``inc1``) is implemented. The ops run on a
    Pillow image throughout; the result is a new ``uint8`` array.
    """
    if not increasing:
        raise NotImplementedError("only the 'increasing' (inc1) op set is implemented")
    pil = _pil(img)
    for idx in rng.integers(0, len(RAND_INCREASING_OPS), size=int(num_ops)):
        if prob < 1.0 and float(rng.random()) > prob:
            continue
        mag = float(magnitude)
        if magnitude_std == float("inf"):
            mag = _uniform(rng, 0.0, mag)
        elif magnitude_std > 0:
            mag = float(rng.normal(mag, magnitude_std))
        mag = min(_MAX_LEVEL, max(0.0, mag))
        pil = _apply_op(pil, RAND_INCREASING_OPS[int(idx)], mag, rng, negate=None, fill=fill,
                        interpolation=interpolation, translate_pct=0.45)
    return np.array(pil)


# ----------------------------------------------------------------------------
# normalisation (float images)
# ----------------------------------------------------------------------------

def normalize(img: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """``(img / 255 - mean) / std`` as float32, channels last."""
    img = _check_img(img)
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return ((img.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


# ----------------------------------------------------------------------------
# pipelines
# ----------------------------------------------------------------------------

def pretrain_transform(img: np.ndarray | Image.Image, rng: np.random.Generator, size: int = 224, *,
                       draft: bool = False, backend: str = "pil") -> np.ndarray:
    """MaskFeat pre-training: RRC scale (0.5, 1), ratio (3/4, 4/3), bicubic; h-flip 0.5. uint8.

    Random draws, in order: the crop (:func:`rrc_params`), then the flip. With
    ``backend="pil"`` the image stays in Pillow from the (optionally drafted, see
    :func:`resized_crop`) decode to the flip and becomes an array once.
    """
    img = random_resized_crop(_as_input(img), rng, size, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                              interpolation="bicubic", draft=draft, backend=backend)
    return _array(random_flip(img, rng, 0.5))


def finetune_transform(img: np.ndarray | Image.Image, rng: np.random.Generator, size: int = 224, *,
                       fill: Sequence[int] = IMAGENET_FILL, draft: bool = False, backend: str = "pil") -> np.ndarray:
    """Fine-tuning: RRC (0.08, 1) bicubic, h-flip 0.5, RandAugment m9-mstd0.5-inc1. uint8.

    The RandAugment fill defaults to :data:`IMAGENET_FILL`, as timm's
    ``transforms_imagenet_train`` passes ``img_mean``; random erasing is
    applied separately after normalisation. Random draws, in order: crop,
    flip, RandAugment.
    """
    img = random_resized_crop(_as_input(img), rng, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                              interpolation="bicubic", draft=draft, backend=backend)
    img = random_flip(img, rng, 0.5)
    return rand_augment(img, rng, num_ops=2, magnitude=9, magnitude_std=0.5, increasing=True,
                        fill=fill, interpolation="bicubic")


def eval_transform(img: np.ndarray | Image.Image, size: int = 224, resize: int | None = None,
                   backend: str = "pil") -> np.ndarray:
    """Evaluation: short side to ``resize`` (default ``int(size / 0.875)``, truncated as the
    official loader does: 256 for 224, 109 for 96) with bicubic, then centre crop ``size``. uint8."""
    if resize is None:
        resize = int(size / 0.875)
    return resize_short_and_center_crop(img, resize, size, "bicubic", backend)


def _array(img) -> np.ndarray:
    return img if isinstance(img, np.ndarray) else np.array(img)


def _as_input(img):
    """An array is checked, a Pillow image (possibly not yet loaded) passed on as it is."""
    return img if isinstance(img, Image.Image) else _check_img(img)
