"""The grain maps of image examples: decoding, training augmentation and masking, evaluation.

``TrainMap`` (a random map) turns ``{"image", "label"}`` into ``{"image": uint8 (S, S, 3),
"mask"|"erase_box", "label", "valid"}``; ``EvalMap`` into ``{"image", "label", "valid"}``.
An example that cannot be decoded becomes a blank image with ``valid=False`` (it is
weighted out of the loss and the metrics), with a warning logged once per file.
"""
from __future__ import annotations

import io
import logging
import math

import grain
import numpy as np
from PIL import Image

from maskfeat_jax.data import masking
from maskfeat_jax.data import rand_augment as RA
from maskfeat_jax.data import transforms as T

_warned: set = set()


def _name(image) -> str:
    if isinstance(image, str):
        return image
    return f"<{type(image).__name__} of {len(image) if hasattr(image, '__len__') else '?'}>"


def _skip(image, e: Exception) -> None:
    name = _name(image)
    if name not in _warned:
        _warned.add(name)
        logging.warning("skipping undecodable image %s: %s", name, e)


def _array_rgb(arr: np.ndarray, copy: bool = True) -> np.ndarray:
    """An HxWx3 uint8 array (a copy unless ``copy=False``) of an HxW, HxWx1 or HxWxC
    (C >= 3: the first three channels) array."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] < 3 or min(arr.shape[:2]) < 1:
        raise ValueError(f"unexpected image shape {arr.shape}")
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8, copy=copy))


def open_image(image) -> Image.Image:
    """A Pillow image of an array, encoded bytes, a path or a Pillow image.

    Bytes and paths are only opened (the header is read): the pixels are
    decoded when the image is loaded, so a JPEG can still be decoded at a
    reduced DCT scale (``transforms.decode_for_crop``). Raises on anything that
    is not an image.
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(_array_rgb(image, copy=False))
    src = io.BytesIO(image) if isinstance(image, (bytes, bytearray, memoryview)) else image
    im = Image.open(src)
    if min(im.size) < 1:
        im.close()
        raise ValueError(f"empty image of size {im.size}")
    return im


def decode(image, *, pil: bool = False) -> tuple[np.ndarray | Image.Image, bool]:
    """An HxWx3 uint8 array (``pil=True``: an RGB Pillow image) from an array, encoded
    bytes or a path; ``(blank 8x8, False)`` on failure."""
    try:
        if isinstance(image, np.ndarray) and not pil:
            return _array_rgb(image), True
        im = open_image(image)
        try:
            im.load()
        except Exception:
            im.close()
            raise
        rgb = im if im.mode == "RGB" else im.convert("RGB")
        return (rgb if pil else np.array(rgb)), True
    except Exception as e:  # noqa: BLE001 - any undecodable input is skipped, never fatal
        _skip(image, e)
        blank = np.zeros((8, 8, 3), np.uint8)
        return (Image.fromarray(blank) if pil else blank), False


class TrainMap(grain.transforms.RandomMap):
    """Decode, augment, and (pre-training) draw the block mask of one example.

    The image stays in Pillow from decoding to the last augmentation and is
    converted to an array once: the file is opened, the random resized crop
    is drawn from its header size, the pixels are decoded, and the crop is
    resized in one call (``transforms.resized_crop``), then flipped (and, for
    fine-tuning, RandAugmented). Random draws per example, in order: crop,
    flip, then the block mask (pre-training) or RandAugment and the erasing
    box (fine-tuning). An example that cannot be decoded comes back as a blank
    image with ``valid=False`` (its mask or erasing box is still drawn). With
    ``config.mae.enabled`` no block mask is drawn (the step draws MAE's random
    mask on device): ``mask`` is all False, there only to keep the batch's shapes.

    ``jpeg_draft`` (default ``config.input.jpeg_draft``, off): decode JPEGs at DCT scale 1/2, 1/4 or 1/8 when the crop
    stays at least ``image_size`` after it (see ``transforms.resized_crop``);
    only images at least twice the output size in the crop are affected. ``config.input.image_backend``:
    "cv2" opens JPEGs and arrays as ``transforms.CvImage`` (simplejpeg; Pillow takes the rest) and
    resizes with OpenCV, from where the image is an array; "pil" is Pillow throughout.
    """

    num_sample = 1   # examples per element (a video map may give several views of one video)

    def __init__(self, config, grid: tuple[int, int], *, jpeg_draft: bool | None = None):
        self.task, self.size, self.grid = config.task, config.input.image_size, grid
        self.ratio, self.min_aspect, self.tries = config.mask.ratio, config.mask.min_aspect, config.mask.tries
        self.erase_p, self.flip = config.augment.erase_prob, config.augment.flip
        self.crop_min_scale = config.augment.crop_min_scale
        self.randaug = {"num_ops": config.augment.randaug_ops, "magnitude": config.augment.randaug_magnitude}
        self.draft = bool(config.input.jpeg_draft if jpeg_draft is None else jpeg_draft)
        self.backend = config.input.image_backend
        self.global_batch_size = config.input.global_batch_size
        self.mae = bool((config.get("mae") or {}).get("enabled", False))   # no block mask to draw

    def elements_per_batch(self, process_count: int) -> int:
        """Images in one process's batch: ``global_batch_size / process_count``."""
        return self.global_batch_size // process_count

    def _decode_crop(self, image, rng, scale) -> tuple[Image.Image | np.ndarray | None, bool]:
        """The random resized crop of ``image`` (a Pillow image or an array), or ``(None, False)``."""
        try:
            im = T.CvImage.open(image) if self.backend == "cv2" else None
            im = im or open_image(image)
        except Exception as e:  # noqa: BLE001 - any undecodable input is skipped, never fatal
            _skip(image, e)
            return None, False
        box = T.rrc_params(im.height, im.width, rng, scale)
        try:
            rgb, reduced = T.decode_for_crop(im, box, self.size, draft=self.draft)
        except Exception as e:  # noqa: BLE001
            im.close()
            _skip(image, e)
            return None, False
        return T.resized_crop(rgb, box, self.size, "bicubic", reduced=reduced, backend=self.backend), True

    def random_map(self, element, rng: np.random.Generator):
        pretrain = self.task == "pretrain"
        img, ok = self._decode_crop(element["image"], rng, (0.5 if pretrain else self.crop_min_scale, 1.0))
        out = {"label": np.int32(element["label"]), "valid": np.bool_(ok)}
        if ok:
            img = T.random_flip(img, rng, 0.5 if self.flip else 0.0)
            if not pretrain and self.randaug["num_ops"] > 0:
                img = RA.rand_augment(img, rng, magnitude_std=0.5, increasing=True, fill=RA.IMAGENET_FILL,
                                      **self.randaug)
            out["image"] = np.asarray(img)
        else:
            out["image"] = np.zeros((self.size, self.size, 3), np.uint8)
        if pretrain and self.mae:    # MAE draws its mask on device: a placeholder keeps the batch's shapes
            out["mask"] = np.zeros(self.grid[0] * self.grid[1], bool)
        elif pretrain:
            out["mask"] = masking.block_mask(rng, self.grid, self.ratio, min_aspect=self.min_aspect,
                                             tries=self.tries).reshape(-1)
        else:
            out["erase_box"] = erase_box(rng, self.size, self.erase_p)
        return out


def erase_box(rng, size: int, p: float, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3)) -> np.ndarray:
    """timm's ``RandomErasing`` rectangle ``(top, left, h, w)`` (h = 0: none): with probability
    ``p``, up to 10 draws of area ``U(scale) * size**2`` and log-uniform aspect in ``ratio``; the
    first that fits is kept. The box is filled with N(0, 1) noise on device (``augment.erase``)."""
    if p <= 0 or rng.random() >= p:
        return np.zeros(4, np.int32)
    for _ in range(10):
        area = size * size * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        h, w = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
        if 0 < h < size and 0 < w < size:
            return np.array([rng.integers(0, size - h + 1), rng.integers(0, size - w + 1), h, w], np.int32)
    return np.zeros(4, np.int32)


class EvalMap(grain.transforms.Map):
    """Decode (Pillow) and resize (``backend``, see ``transforms.resize_short``) for evaluation."""

    pad_values: dict = {}   # padding rows are zeros (``valid=False``)

    def __init__(self, size: int, backend: str = "pil"):
        self.size, self.backend = size, backend

    def empty(self) -> dict:
        """A batch of no rows, padded to a full batch by a process past the end of its slice."""
        return {"image": np.zeros((0, self.size, self.size, 3), np.uint8), "label": np.zeros((0,), np.int32),
                "valid": np.zeros((0,), bool)}

    def map(self, element):
        img, ok = decode(element["image"], pil=self.backend == "pil")
        return {"image": T.eval_transform(img, self.size, backend=self.backend), "label": np.int32(element["label"]),
                "valid": np.bool_(ok)}
