"""Random-access data sources: each item is ``{"image": ..., "label": int}``.

* ``digits``: the embedded default, scikit-learn's 1,797 handwritten digits (8x8, 10
  classes) upscaled to 32x32 RGB; every fifth example is held out as ``validation``.
* ``synthetic``: random images and labels, deterministic per index (smoke runs, benchmarks).
* any TFDS image-classification dataset, read with ``tfds.data_source`` (no TensorFlow).
* ``folder:<root>``: an ImageNet-style folder ``<root>/<split>/<class>/*.JPEG``.
* video (items ``{"video": path or frame paths, "label": int}``): ``video_csv`` / ``video_demo``
  (Kinetics-style CSVs, ``video_source.py``) and ``ssv2`` / ``ssv2_demo`` (Something-Something
  v2 in its own files, ``ssv2.py``; the demo is written once by ``make_ssv2_demo.py``).

"image" is a decoded uint8 HxWx3 array, or encoded bytes / a path that the pipeline
decodes in its workers (so a corrupt file is skipped there, not here).
"""
from __future__ import annotations

import functools
import os
import zlib

import numpy as np
from PIL import Image

from maskfeat_jax.config_validate import CLASSIFICATION_VIDEO_DATASETS, SSV2_DATASETS

IMAGE_EXTS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


@functools.lru_cache(maxsize=1)
def _digits():
    """scikit-learn's 8x8 digits (``load_digits``), read from the CSV it ships without importing
    scikit-learn (whose import costs seconds in every short run)."""
    import importlib.util
    package = importlib.util.find_spec("sklearn").submodule_search_locations[0]
    data = np.loadtxt(os.path.join(package, "datasets", "data", "digits.csv.gz"), delimiter=",")
    imgs = (data[:, :-1].reshape(-1, 8, 8) / 16.0 * 255.0).round().astype(np.uint8)   # (1797, 8, 8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BICUBIC)) for im in imgs])
    return np.repeat(big[..., None], 3, axis=-1), data[:, -1].astype(np.int32)


class DigitsSource:
    num_classes = 10

    def __init__(self, split: str):
        images, labels = _digits()
        held_out = np.arange(len(labels)) % 5 == 0
        if split not in ("train", "validation"):
            raise ValueError(f"digits has splits 'train' and 'validation', not {split!r}")
        keep = held_out if split == "validation" else ~held_out
        self.images, self.labels = images[keep], labels[keep]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i])}


class SyntheticSource:
    def __init__(self, size: int, image_size: int, num_classes: int, seed: int = 0):
        self.size, self.image_size, self.num_classes, self.seed = size, image_size, num_classes, seed

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        rng = np.random.default_rng((self.seed, int(i)))
        img = rng.integers(0, 256, (self.image_size, self.image_size, 3), dtype=np.uint8)
        return {"image": img, "label": int(rng.integers(self.num_classes))}


class FolderSource:
    """``root/split/<class>/<file>``; classes are the sorted sub-folder names."""

    def __init__(self, root: str, split: str):
        base = os.path.join(root, split)
        if not os.path.isdir(base):
            raise ValueError(f"config.input.dataset='folder:{root}': split folder {base!r} does not exist")
        self.classes = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
        self.items = [(os.path.join(base, c, f), k) for k, c in enumerate(self.classes)
                      for f in sorted(os.listdir(os.path.join(base, c))) if f.lower().endswith(IMAGE_EXTS)]
        if not self.items:
            raise ValueError(f"config.input.dataset='folder:{root}': no images under {base!r}")
        self.num_classes = len(self.classes)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        return {"image": path, "label": label}


class TfdsSource:
    def __init__(self, name: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds
        try:
            self.ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # noqa: BLE001 - tfds raises several types for a missing dataset
            raise ValueError(f"config.input.dataset={name!r} split {split!r} could not be opened from "
                             f"config.input.data_dir={data_dir!r}: {e}") from e
        if len(self.ds) == 0:
            raise ValueError(f"config.input.dataset={name!r}: split {split!r} is empty")
        info = getattr(self.ds, "dataset_info", None)
        self.num_classes = info.features["label"].num_classes if info is not None else None

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        ex = self.ds[i]
        return {"image": ex["image"], "label": int(ex["label"])}


DEFAULT_VIDEO_DEMO_DIR = os.path.join(os.path.expanduser("~"), ".cache", "maskfeat_jax", "video_demo")
DEFAULT_SSV2_DEMO_DIR = os.path.join(os.path.expanduser("~"), ".cache", "maskfeat_jax", "ssv2_demo")


def video_csv_dir(config) -> str:
    """The folder of the video CSVs; the embedded demo videos are written there on first use."""
    if config.input.dataset == "video_demo":
        from maskfeat_jax.data import make_video_demo
        return make_video_demo.ensure_video_demo(config.video.csv_dir or DEFAULT_VIDEO_DEMO_DIR)
    return config.video.csv_dir


def ssv2_dir(config) -> str:
    """The SSv2 folder (``config.video.csv_dir``: the labels, train and validation JSON files);
    for ``ssv2_demo`` the embedded demo, written there (default a cache folder) on first use."""
    if config.input.dataset == "ssv2_demo":
        from maskfeat_jax.data import make_ssv2_demo
        return make_ssv2_demo.ensure_ssv2_demo(config.video.csv_dir or DEFAULT_SSV2_DEMO_DIR)
    return config.video.csv_dir


def ssv2_source(config, split: str):
    """``split`` of Something-Something v2 (``ssv2`` or ``ssv2_demo``): the videos under
    ``config.video.root`` (default the dataset's own folder), or with ``config.video.frame_prefix``
    set, PySlowFast's frame lists. A folder without the labels file is a ValueError naming the key."""
    from maskfeat_jax.data import ssv2
    d = ssv2_dir(config)
    labels = os.path.join(d, ssv2.LABELS_FILE)
    if not os.path.isfile(labels):
        raise ValueError(f"config.video.csv_dir={d!r}: {labels!r} does not exist (the SSv2 folder holds "
                         f"{ssv2.LABELS_FILE} and the train/validation JSON files)")
    return ssv2.Ssv2Source(d, split, video_root=config.video.get("root", None),
                           frame_prefix=config.video.get("frame_prefix", None))


def serves_clips(config) -> bool:
    """Whether ``make`` serves videos (clips ``(T, H, W, 3)``) for ``config.input.dataset``: a video
    dataset with one label per video. The dataset alone decides (``config_validate.is_video``, whether
    a run trains on clips, also counts MViTv2 and AVA, whose keyframes ``ava_maps`` reads)."""
    return config.input.dataset in CLASSIFICATION_VIDEO_DATASETS


def check_labels(source, config, split: str) -> None:
    """A classifier with fewer outputs than the dataset's labels would train and score silently
    wrong (``one_hot`` of an out-of-range label is all zeros): refuse it, naming the key."""
    n = getattr(source, "num_classes", None)
    if config.task == "finetune" and n is not None and n > config.model.num_classes:
        raise ValueError(f"config.model.num_classes={config.model.num_classes}, but the labels of "
                         f"config.input.dataset={config.input.dataset!r} ({split}) run to {n - 1}: set "
                         f"config.model.num_classes={n}")


def make(config, split: str):
    """The source for ``split`` of ``config.input.dataset``."""
    inp = config.input
    if inp.dataset in SSV2_DATASETS:
        return ssv2_source(config, split)
    if serves_clips(config):
        import ml_collections

        from maskfeat_jax.data import video_source
        resolved = ml_collections.ConfigDict(config.to_dict())
        resolved.video.csv_dir = video_csv_dir(config)
        return video_source.make_source(resolved, split)
    if inp.dataset == "digits":
        return DigitsSource(split)
    if inp.dataset == "synthetic":
        n = inp.synthetic_size if split == inp.train_split else max(inp.synthetic_size // 8, 1)
        return SyntheticSource(n, inp.image_size, config.model.num_classes, seed=zlib.crc32(split.encode()))
    if inp.dataset.startswith("folder:"):
        return FolderSource(inp.dataset[len("folder:"):], split)
    return TfdsSource(inp.dataset, split, inp.data_dir)
