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
crop); the random streams differ from torchvision's, the distributions do not. RandAugment is in
:mod:`maskfeat_jax.data.rand_augment`; the training maps that chain these
functions are ``pipeline.TrainMap`` and ``pipeline.EvalMap``.

Two backends (``backend=``, ``config.input.image_backend``) decode and resize:
``"pil"`` (the default here) is Pillow throughout (antialiased bicubic, the path
of the official numbers); ``"cv2"`` decodes JPEGs with simplejpeg (libjpeg-turbo,
the pixels Pillow decodes, see :class:`CvImage`) and crops and resizes with
OpenCV: an area average when both sides shrink, else ``INTER_CUBIC``; on photos
within 2 grey levels (mean absolute difference) of Pillow's resize, in about a
third of its time. Both draw the same crops and flips from a seed.

Evaluation geometry: :func:`eval_transform`, short side to ``int(size / 0.875)``,
then the centre crop.
"""

from __future__ import annotations

import io
import math
import os
from typing import Sequence

import cv2
import numpy as np
import simplejpeg
from PIL import Image

cv2.setNumThreads(1)   # one image per worker process: OpenCV's own threads would only contend

_INTERP = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
           "nearest": Image.Resampling.NEAREST}
_CV2_INTERP = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}
BACKENDS = ("cv2", "pil")


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

def _check_img(img: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(img, Image.Image):
        return np.array(as_pil(img))
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
        raise ValueError(f"img must be a non-empty (H, W, 3) uint8 array, got {img.dtype} {img.shape}")
    return img


def as_pil(img: np.ndarray | Image.Image) -> Image.Image:
    """An RGB Pillow image: a Pillow image as it is (converted if not RGB), an array wrapped."""
    if isinstance(img, Image.Image):
        if min(img.size) < 1:
            raise ValueError(f"img must be a non-empty image, got size {img.size}")
        return img if img.mode == "RGB" else img.convert("RGB")
    return Image.fromarray(np.ascontiguousarray(_check_img(img)))


def _like(out: Image.Image, img) -> np.ndarray | Image.Image:
    """``out`` as the kind of ``img``: a Pillow image stays one, anything else becomes an array."""
    return out if isinstance(img, Image.Image) else np.array(out)


def pil_filter(interpolation: str) -> int:
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


def uniform(rng: np.random.Generator, a: float, b: float) -> float:
    """``a + (b - a) * U[0, 1)``, Python's ``random.uniform`` on a Generator (works for b < a)."""
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
        target_area = area * uniform(rng, *scale)
        aspect = math.exp(uniform(rng, *log_ratio))
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
    return as_pil(img), reduced


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
    resample = pil_filter(interpolation)
    _check_backend(backend)
    top, left, h, w = box
    if draft or isinstance(img, CvImage):
        img, reduced = decode_for_crop(img, box, (out_h, out_w), draft=draft)
    if backend == "cv2":   # the drafted crop's fractional edges are rounded (under half an output pixel)
        arr = _check_img(img)
        y0, x0 = round(top / reduced), round(left / reduced)
        y1, x1 = max(y0 + 1, round((top + h) / reduced)), max(x0 + 1, round((left + w) / reduced))
        return _cv2_resize(arr[y0:y1, x0:x1], out_h, out_w, interpolation)
    pil = as_pil(img)
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
    pil_filter(interpolation)
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
        pil = as_pil(img)
        return pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else pil.copy()
    img = _check_img(img)
    return cv2.flip(img, 1) if flip else img.copy()   # 40x faster than numpy's strided copy


def resize_short(img: np.ndarray | Image.Image, size: int, interpolation: str = "bicubic",
                 backend: str = "pil") -> np.ndarray:
    """torchvision ``Resize(int)``: short side to ``size``, long side ``int(size * long / short)``."""
    resample = pil_filter(interpolation)
    _check_backend(backend)
    img = as_pil(img) if backend == "pil" else _check_img(img)
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
# evaluation
# ----------------------------------------------------------------------------

def eval_transform(img: np.ndarray | Image.Image, size: int = 224, resize: int | None = None,
                   backend: str = "pil") -> np.ndarray:
    """Evaluation: short side to ``resize`` (default ``int(size / 0.875)``, truncated as the
    official loader does: 256 for 224, 109 for 96) with bicubic, then centre crop ``size``. uint8."""
    if resize is None:
        resize = int(size / 0.875)
    return resize_short_and_center_crop(img, resize, size, "bicubic", backend)
