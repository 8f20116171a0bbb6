"""timm RandAugment, ``rand-m9-mstd0.5-inc1`` (images) and ``rand-m7-mstd0.5-inc1`` (video).

Only the "increasing" op set (``inc1``) is implemented. The ops run on Pillow: an
array converts to Pillow and back in under 0.1 ms, 2-3% of a fine-tuning example,
for both image backends. All randomness comes from the caller's
:class:`numpy.random.Generator`; the draws never depend on pixel values, so
``video_transforms.rand_augment_clip`` can give every frame of a clip the same ops.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from maskfeat_jax.data import transforms as T

#: ImageNet mean as uint8, ``round(255 * m)``: the fill timm uses for RandAugment
#: inside ``transforms_imagenet_train`` (its ``img_mean`` hparam).
IMAGENET_FILL = tuple(min(255, round(255 * m)) for m in (0.485, 0.456, 0.406))  # (124, 116, 104)

RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)
_SIGNED_OPS = {"Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
               "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
_MAX_LEVEL = 10.0


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


def _apply_op(img: np.ndarray | Image.Image, name: str, magnitude: float,
              rng: np.random.Generator | None = None, *, negate: bool | None = None,
              fill: Sequence[int] = (128, 128, 128), interpolation: str = "bicubic",
              translate_pct: float = 0.45) -> Image.Image:
    """One RandAugment op (always, no probability gate) at ``magnitude`` in [0, 10], on an
    RGB Pillow image (an array is wrapped); returns a Pillow image.

    Signed ops negate their argument with probability 1/2 drawn from ``rng``
    unless ``negate`` is given. ``interpolation="random"`` picks bilinear or
    bicubic per call, as timm does when no interpolation is configured.
    """
    pil = T.as_pil(img)
    if name not in RAND_INCREASING_OPS:
        raise ValueError(f"name must be one of {RAND_INCREASING_OPS}, got {name!r}")
    if negate is None:
        if name in _SIGNED_OPS and rng is None:
            raise ValueError(f"rng is required for {name} unless negate is given")
        negate = name in _SIGNED_OPS and float(rng.random()) > 0.5
    if interpolation == "random":
        resample = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)[int(rng.integers(2))]
    else:
        resample = T.pil_filter(interpolation)
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
    pil = T.as_pil(img)
    for idx in rng.integers(0, len(RAND_INCREASING_OPS), size=int(num_ops)):
        if prob < 1.0 and float(rng.random()) > prob:
            continue
        mag = float(magnitude)
        if magnitude_std == float("inf"):
            mag = T.uniform(rng, 0.0, mag)
        elif magnitude_std > 0:
            mag = float(rng.normal(mag, magnitude_std))
        mag = min(_MAX_LEVEL, max(0.0, mag))
        pil = _apply_op(pil, RAND_INCREASING_OPS[int(idx)], mag, rng, negate=None, fill=fill,
                        interpolation=interpolation, translate_pct=0.45)
    return np.array(pil)
