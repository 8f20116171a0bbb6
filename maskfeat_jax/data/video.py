"""Video (Kinetics-style) input: the names the trainer and the evaluators use for clips.

The parts live in their own modules: the CSV source in :mod:`.video_source`, PyAV
decoding and temporal sampling in :mod:`.video_decode`, the grain maps (training
augmentation, cube masks, repeated augmentation, evaluation views) in
:mod:`.video_maps`, and the datasets in :mod:`.pipeline`, the same path as images.

Training: ``VideoCsvSource -> seed/shuffle -> repeat -> decode + augment + mask
(random_map, in workers) -> batch -> this process's batches -> mp_prefetch``. Clips
leave the workers as uint8 (normalised on device); every element carries ``valid``:
False for a video that could not be decoded (a blank clip, weighted out of the loss).
"""
from __future__ import annotations

import grain

from maskfeat_jax.data import pipeline
from maskfeat_jax.data.video_decode import decode_clip, temporal_indices
from maskfeat_jax.data.video_maps import (VideoEvalMap, VideoTrainMap, check_batch, num_sample, prediction_grid,
                                          steps_per_epoch)
from maskfeat_jax.data.video_source import VideoCsvSource, make_source, parse_csv

__all__ = ["parse_csv", "VideoCsvSource", "make_source", "temporal_indices", "decode_clip",
           "VideoTrainMap", "VideoEvalMap", "prediction_grid", "num_sample", "check_batch",
           "steps_per_epoch", "train_dataset", "eval_batches"]


def train_dataset(config, source, grid=None, *, process_index=None, process_count=None,
                  start_batch: int = 0) -> grain.IterDataset:
    """``pipeline.train_dataset`` of clips, cube masks on ``grid`` (default
    :func:`prediction_grid`)."""
    return pipeline.train_dataset(config, source, grid, process_index=process_index, process_count=process_count,
                                  start_batch=start_batch, video=True)


def eval_batches(config, source, batch_size: int, num_clips: int | None = None, num_crops: int | None = None,
                 *, process_index=None, process_count=None, worker_count: int = 0):
    """``pipeline.eval_batches`` of clips: every video of this process's slice once per view."""
    return pipeline.eval_batches(config, source, batch_size, num_clips, num_crops, process_index=process_index,
                                 process_count=process_count, worker_count=worker_count, video=True)
