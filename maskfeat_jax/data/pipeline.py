"""grain input pipelines, one path for images and video clips.

Training: ``source -> seed/shuffle (reshuffled each epoch) -> repeat -> decode + augment +
mask (random_map, in workers) -> batch of global_batch_size / processes -> this process's
batches (every process_count-th) -> mp_prefetch``. Global batch k is then examples
``k * global_batch_size ...`` of the stream, in the same order for any process count.
Images and clips leave the workers as uint8 and are normalised on device; HOG targets are
computed on device too. Every element carries ``valid``: False for an example that
could not be decoded (it is replaced by a blank image and weighted out of the loss).

Evaluation: every example of the split exactly once (a video: once per view), this
process's slice, in batches padded to the full size with ``valid=False`` rows.

What differs between images and video is the map: ``image_maps.TrainMap`` /
``EvalMap`` for images, ``video_maps.VideoTrainMap`` / ``VideoEvalMap`` for clips
(``config.input.dataset`` says which, :func:`sources.serves_clips`).
"""
from __future__ import annotations

import math
import os

import grain
import jax
import numpy as np
from absl import flags

from maskfeat_jax import host_memory
from maskfeat_jax.data import sources, video_maps
from maskfeat_jax.data.image_maps import EvalMap, TrainMap, decode, erase_box, open_image

__all__ = ["EvalMap", "TrainMap", "decode", "erase_box", "open_image", "init_worker", "in_workers", "worker_count",
           "read_batches", "train_map", "train_stream", "train_dataset", "padded_batches", "eval_batches"]


def _process(process_index, process_count) -> tuple[int, int]:
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    return pi, pc


def init_worker(*_index_and_count) -> bool:
    """A grain worker's start (grain passes the worker's index and count): freed memory stays
    in the process (``host_memory``; on, as the worker runs no JAX, unless
    ``MASKFEAT_KEEP_HOST_MEMORY=off``). A worker allocates and frees
    each example's decode and resize buffers; where glibc hands them back and the kernel faults
    them in again, Pillow's decode alone ran at half its rate on a 2-core VM."""
    off = os.environ.get(host_memory.ENV, "auto").lower() == "off"
    return host_memory.keep_freed_memory("off" if off else "on")


def in_workers(ds: grain.MapDataset, workers: int, **options) -> grain.IterDataset:
    """``ds`` read in order, in ``workers`` grain worker processes (0: in this process), each
    started by :func:`init_worker`; ``options`` go to ``grain.MultiprocessingOptions``."""
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if workers <= 0:
        return it
    if not flags.FLAGS.is_parsed():   # grain 0.2.18's workers read absl flags: outside an absl app, use defaults
        flags.FLAGS.mark_as_parsed()
    return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, **options), worker_init_fn=init_worker)


def worker_count(config) -> int:
    """``input.worker_count``, where -1 means one worker per core but one (at most 32)."""
    n = config.input.worker_count
    return max(1, min(32, (os.cpu_count() or 2) - 1)) if n < 0 else n


def read_batches(ds: grain.MapDataset, workers: int):
    """Yields ``ds[0], ds[1], ...`` in order, read in ``workers`` grain worker processes
    (0: in this process)."""
    it = iter(in_workers(ds, workers if len(ds) else 0))
    try:
        yield from it
    finally:
        if hasattr(it, "close"):
            it.close()


# ----------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------

def _video(config, video: bool | None) -> bool:
    return sources.serves_clips(config) if video is None else bool(video)


def train_map(config, mask_grid=None, *, video: bool | None = None) -> TrainMap | video_maps.VideoTrainMap:
    """The training random map of ``config.input.dataset`` (``video=True`` / ``False``: of clips
    / images, whatever the dataset): images draw a block mask on ``mask_grid = (h, w)``, clips
    a cube mask on ``mask_grid = (t, h, w)`` (default ``video_maps.prediction_grid``);
    fine-tuning ignores it."""
    if _video(config, video):
        return video_maps.VideoTrainMap(config, mask_grid)
    return TrainMap(config, mask_grid)


def train_stream(config, source, random_map, *, process_index=None, process_count=None,
                 start_batch: int = 0) -> grain.IterDataset:
    """The infinite, shuffled, per-process training stream of ``random_map`` over ``source``
    (module docstring).

    ``random_map.elements_per_batch(process_count)`` elements make one process's batch;
    an element holding ``random_map.num_sample > 1`` views (repeated augmentation) puts
    them in adjacent rows. ``start_batch`` skips the first batches: global batch k holds
    the same examples for any process count, so a run resumed on another topology starts
    at batch ``step``.
    """
    pi, pc = _process(process_index, process_count)
    per_batch = random_map.elements_per_batch(pc)
    ds = grain.MapDataset.source(source).seed(config.seed).shuffle().repeat()
    # Augment/mask, then batch, then slice: random_map keys its RNG on the global index, and
    # host p takes batches p, p + pc, ...: together the hosts' k-th batches are the
    # single-process batch k, rows in the same order.
    ds = ds.random_map(random_map).batch(per_batch, drop_remainder=True)[pi::pc]
    if random_map.num_sample > 1:
        ds = ds.map(video_maps.flatten_views)
    ds = ds[start_batch:] if start_batch else ds
    return in_workers(ds, worker_count(config), per_worker_buffer_size=config.input.prefetch)


def train_dataset(config, source, mask_grid=None, *, process_index=None, process_count=None,
                  start_batch: int = 0, video: bool | None = None) -> grain.IterDataset:
    """The training stream of images or clips, as ``config.input.dataset`` (or ``video``)
    says (:func:`train_map`, :func:`train_stream`).

    For clips, batches hold ``global_batch_size / process_count`` clips: that many videos,
    or with ``config.video.num_sample = k`` a ``1 / k`` of that many videos with their
    ``k`` clips in adjacent rows; ``video_maps.check_batch`` raises here, before anything
    is read or compiled, when the batch does not split into whole videos.
    """
    return train_stream(config, source, train_map(config, mask_grid, video=video), process_index=process_index,
                        process_count=process_count, start_batch=start_batch)


# ----------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------

def padded_batches(items: grain.MapDataset, eval_map, batch_size: int, num_batches: int,
                   worker_count: int = 0):
    """Yields ``num_batches`` batches of ``batch_size`` rows: ``items`` mapped by ``eval_map``
    in order (read in ``worker_count`` grain worker processes, 0: in this process), then
    padding rows (zeros, ``valid=False``, ``eval_map.pad_values`` where given). Batches
    past the end of ``items`` pad ``eval_map.empty()``."""
    ds = items.map(eval_map).batch(batch_size, drop_remainder=False)
    read = read_batches(ds, worker_count)
    try:
        for b in range(num_batches):
            batch = next(read) if b < len(ds) else eval_map.empty()
            pad = batch_size - len(batch["label"])
            if pad:
                fill = eval_map.pad_values
                batch = {k: np.concatenate([v, np.full((pad,) + v.shape[1:], fill.get(k, 0), v.dtype)])
                         for k, v in batch.items()}
            yield batch
    finally:
        read.close()


def eval_batches(config, source, batch_size: int, num_clips: int | None = None, num_crops: int | None = None,
                 *, process_index=None, process_count=None, worker_count: int = 0, video: bool | None = None):
    """Yields padded batches covering this process's slice of ``source`` exactly once,
    read in ``worker_count`` grain worker processes (0: in this process). Every process
    yields the same number of batches (collectives stay in step). Images or clips as
    ``config.input.dataset`` (or ``video``) says.

    Images: ``source[pi::pc]``, one centre crop each (``EvalMap``); keys ``image`` uint8
    ``(B, S, S, 3)``, ``label``, ``valid``. Clips: every video of
    ``source[pi::pc]`` once per view, ``num_clips`` temporal clips x ``num_crops``
    spatial crops (defaults ``config.video.test_clips`` / ``test_crops``; ``num_crops``
    is 1 or 3), in order ``view = clip * num_crops + crop``; keys ``image`` uint8
    ``(B, T, S, S, 3)``, ``label``, ``valid`` (False on padding and undecodable videos),
    ``video_index`` (-1 on padding) and ``view``. ``ceil(ceil(len(source) / pc) * views
    / batch_size)`` batches, views = 1 for images.
    """
    pi, pc = _process(process_index, process_count)
    if _video(config, video):
        views = video_maps.eval_views(config, source, pi, pc, num_clips, num_crops)
        items, per_example = grain.MapDataset.source(views), views.num_views
        eval_map = video_maps.VideoEvalMap(config, 0, views.num_clips)
    else:
        items = grain.MapDataset.source(source)[pi::pc]
        eval_map, per_example = EvalMap(config.input.image_size, config.input.image_backend), 1
    num_batches = math.ceil(math.ceil(len(source) / pc) * per_example / batch_size)
    return padded_batches(items, eval_map, batch_size, num_batches, worker_count)
