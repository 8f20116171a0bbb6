"""grain input pipelines.

Training: ``source -> seed/shuffle (reshuffled each epoch) -> repeat -> decode + augment +
mask (random_map, in workers) -> batch of global_batch_size / processes -> this process's
batches (every process_count-th) -> mp_prefetch``. Global batch k is then examples
``k * global_batch_size ...`` of the stream, in the same order for any process count.
Images leave the workers as uint8 and are normalised on device; HOG targets are
computed on device too. Every element carries ``valid``: False for an example that
could not be decoded (it is replaced by a blank image and weighted out of the loss).

Evaluation: every example of the split exactly once, this process's slice, in batches
padded to the full size with ``valid=False`` rows.
"""
from __future__ import annotations

import io
import logging
import math
import os

import grain
import jax
import numpy as np
from absl import flags
from PIL import Image

from maskfeat_jax import masking
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
    image with ``valid=False`` (its mask or erasing box is still drawn).

    ``jpeg_draft`` (default ``config.input.jpeg_draft``, off): decode JPEGs at DCT scale 1/2, 1/4 or 1/8 when the crop
    stays at least ``image_size`` after it (see ``transforms.resized_crop``);
    only images at least twice the output size in the crop are affected. ``config.input.image_backend``:
    "cv2" opens JPEGs and arrays as ``transforms.CvImage`` (simplejpeg; Pillow takes the rest) and
    resizes with OpenCV, from where the image is an array; "pil" is Pillow throughout.
    """

    def __init__(self, config, grid: tuple[int, int], *, jpeg_draft: bool | None = None):
        self.task, self.size, self.grid = config.task, config.input.image_size, grid
        self.ratio, self.min_aspect, self.tries = config.mask.ratio, config.mask.min_aspect, config.mask.tries
        self.erase_p, self.flip = config.augment.erase_prob, config.augment.flip
        self.crop_min_scale = config.augment.crop_min_scale
        self.randaug = {"num_ops": config.augment.randaug_ops, "magnitude": config.augment.randaug_magnitude}
        self.draft = bool(config.input.jpeg_draft if jpeg_draft is None else jpeg_draft)
        self.backend = config.input.image_backend

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
                img = T.rand_augment(img, rng, magnitude_std=0.5, increasing=True, fill=T.IMAGENET_FILL,
                                     **self.randaug)
            out["image"] = np.asarray(img)
        else:
            out["image"] = np.zeros((self.size, self.size, 3), np.uint8)
        if pretrain:
            out["mask"] = masking.block_mask(rng, self.grid, self.ratio, min_aspect=self.min_aspect,
                                             tries=self.tries).reshape(-1)
        else:
            out["erase_box"] = erase_box(rng, self.size, self.erase_p)
        return out


def erase_box(rng, size: int, p: float, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3)) -> np.ndarray:
    """timm's ``RandomErasing`` rectangle ``(top, left, h, w)`` (h = 0: none): with probability
    ``p``, up to 10 draws of area ``U(scale) * size**2`` and log-uniform aspect in ``ratio``; the
    first that fits is kept. The box is filled with N(0, 1) noise on device (``steps.erase``)."""
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

    def __init__(self, size: int, backend: str = "pil"):
        self.size, self.backend = size, backend

    def map(self, element):
        img, ok = decode(element["image"], pil=self.backend == "pil")
        return {"image": T.eval_transform(img, self.size, backend=self.backend), "label": np.int32(element["label"]),
                "valid": np.bool_(ok)}


def in_workers(ds: grain.MapDataset, workers: int, **options) -> grain.IterDataset:
    """``ds`` read in order, in ``workers`` grain worker processes (0: in this process);
    ``options`` go to ``grain.MultiprocessingOptions``. grain reads absl flags when it starts
    workers; outside an absl app (a script, a notebook) they are not parsed yet, so their
    defaults are taken."""
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if workers <= 0:
        return it
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, **options))


def worker_count(config) -> int:
    """``input.worker_count``, where -1 means one worker per core but one (at most 32)."""
    n = config.input.worker_count
    return max(1, min(32, (os.cpu_count() or 2) - 1)) if n < 0 else n


def per_host_batch(config) -> int:
    return config.input.global_batch_size // jax.process_count()


def train_dataset(config, source, grid, *, process_index=None, process_count=None,
                  start_batch: int = 0) -> grain.IterDataset:
    """The infinite, shuffled, per-process training stream (see the module docstring).

    ``start_batch`` skips the first batches: global batch k holds the same examples for any
    process count, so a run resumed on another topology starts at batch ``step``."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    ds = grain.MapDataset.source(source).seed(config.seed).shuffle().repeat()
    # Augment/mask, then batch, then slice: random_map keys its RNG on the global index, and
    # host p takes batches p, p + pc, ...: together the hosts' k-th batches are the
    # single-process batch k, rows in the same order.
    ds = ds.random_map(TrainMap(config, grid)).batch(config.input.global_batch_size // pc, drop_remainder=True)
    ds = ds[pi::pc]
    ds = ds[start_batch:] if start_batch else ds
    return in_workers(ds, worker_count(config), per_worker_buffer_size=config.input.prefetch)


def read_batches(ds: grain.MapDataset, workers: int):
    """Yields ``ds[0], ds[1], ...`` in order, read in ``workers`` grain worker processes
    (0: in this process)."""
    it = iter(in_workers(ds, workers if len(ds) else 0))
    try:
        yield from it
    finally:
        if hasattr(it, "close"):
            it.close()


def eval_batches(config, source, batch_size: int, *, process_index=None, process_count=None,
                 worker_count: int = 0):
    """Yields padded batches covering this process's slice of ``source`` exactly once, read
    in ``worker_count`` grain worker processes (0: in this process).

    Every process yields the same number of batches (collectives stay in step)."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    n_batches = math.ceil(math.ceil(len(source) / pc) / batch_size)
    ds = grain.MapDataset.source(source)[pi::pc].map(EvalMap(config.input.image_size, config.input.image_backend))
    ds = ds.batch(batch_size, drop_remainder=False)
    size = config.input.image_size
    empty = {"image": np.zeros((0, size, size, 3), np.uint8), "label": np.zeros((0,), np.int32),
             "valid": np.zeros((0,), bool)}
    read = read_batches(ds, worker_count)
    try:
        for b in range(n_batches):
            batch = next(read) if b < len(ds) else empty
            pad = batch_size - len(batch["label"])
            yield {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) if pad else v
                   for k, v in batch.items()}
    finally:
        read.close()
