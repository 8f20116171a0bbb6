"""AVA frame-mAP@0.5 of a detector on the ``val`` split: every detected box of every keyframe
scored exactly once.

The split's keyframes (``ava_maps.eval_source``: the person detections at or above
``config.ava.detection_score_thresh``, excluded keyframes dropped) go through the evaluation
map (short side to the crop, centre crop) in batches padded to a fixed size, with room for the
split's most boxes so none is left out. Each box's 80 sigmoid scores become one detection per
evaluated class (``ava_map.detections_from_scores``, the boxes in the frame's normalised
coordinates) and ``ava_map.frame_map`` scores them against the ground truth
(``ava_maps.groundtruth``) over the label map's classes, ``config.ava.protocol`` deciding the
order within a frame. A keyframe whose video cannot be decoded has no detections (its ground
truth counts as missed) and is counted in ``eval/undecodable``.

``eval/mAP``, ``eval/keyframes`` and ``eval/boxes`` (what was scored), ``eval/undecodable``.
"""
from __future__ import annotations

import jax
import numpy as np
from absl import logging

from maskfeat_jax import sharding, steps_detection
from maskfeat_jax.data import ava_maps
from maskfeat_jax.evaluators import ava_map


def collect(outputs, videos, into: dict) -> int:
    """Adds one eval step's replicated ``outputs`` (``steps_detection.make_eval_step``) to ``into``
    ``{(video, second): (boxes (n, 4), scores (n, 80))}``: every row of a keyframe (padding rows
    have ``video_index < 0``) with its real boxes, in their order. A keyframe seen twice is an
    error. Returns the rows of undecodable clips."""
    undecodable = 0
    for r in np.flatnonzero(np.asarray(outputs["video_index"]) >= 0):
        key = (videos[int(outputs["video_index"][r])], int(outputs["second"][r]))
        if key in into:
            raise RuntimeError(f"AVA evaluation: keyframe {key} came twice")
        real = np.asarray(outputs["real_BxR"][r], bool)
        into[key] = (np.asarray(outputs["ori_boxes"][r])[real], np.asarray(outputs["scores_BxRxK"][r])[real])
        undecodable += not bool(outputs["valid"][r])
    return undecodable


class Evaluator:
    def __init__(self, config, mesh, graphdef, param_sh):
        self.config, self.mesh = config, mesh
        root = ava_maps.root(config)
        self.source = ava_maps.eval_source(config)
        self.groundtruth, self.class_ids, self.excluded = ava_maps.groundtruth(root, "val")
        self.eval_map = ava_maps.eval_map(config, self.source.max_boxes)
        if config.evals.batch_size % jax.device_count():
            raise ValueError(f"config.evals.batch_size={config.evals.batch_size} is not divisible by the "
                             f"{jax.device_count()} devices")
        self.batch = config.evals.batch_size // jax.process_count()
        step = steps_detection.make_eval_step(graphdef, config)
        self.step = jax.jit(step, in_shardings=(param_sh, None), out_shardings=sharding.replicated(mesh))
        self.scored: dict = {}          # the last run's {(video, second): (boxes, scores)}

    def boxes_scored(self, params) -> tuple[dict, int]:
        """``({(video, second): (boxes, scores)}`` for every keyframe of the split, the same on
        every process, and the number of undecodable ones)."""
        from maskfeat_jax.data import pipeline
        scored, undecodable = {}, 0
        batches = ava_maps.eval_batches(self.source, self.eval_map, self.batch, process_index=jax.process_index(),
                                        process_count=jax.process_count(),
                                        worker_count=pipeline.worker_count(self.config))
        with jax.set_mesh(self.mesh):
            for local in batches:
                out = jax.device_get(self.step(params, sharding.global_batch(self.mesh, local)))
                undecodable += collect(out, self.source.videos, scored)
        if len(scored) != len(self.source):
            raise RuntimeError(f"AVA evaluation scored {len(scored)} of the {len(self.source)} keyframes")
        return scored, undecodable

    def run(self, params) -> dict:
        self.scored, undecodable = self.boxes_scored(params)
        keys = [key for key, (boxes, _) in self.scored.items() for _ in range(len(boxes))]
        detections = {}
        if keys:
            boxes = np.concatenate([b for b, _ in self.scored.values()])
            scores = np.concatenate([s for _, s in self.scored.values()])
            detections = ava_map.detections_from_scores(keys, boxes, scores, self.class_ids)
        result = ava_map.frame_map(self.groundtruth, detections, self.class_ids, self.excluded,
                                   protocol=self.config.ava.protocol)
        if undecodable:
            logging.warning("AVA evaluation: %d of the %d keyframes could not be decoded; their ground truth "
                            "counts as missed (eval/undecodable)", undecodable, len(self.source))
        return {"eval/mAP": result["mAP"], "eval/keyframes": float(len(self.scored)), "eval/boxes": float(len(keys)),
                "eval/undecodable": float(undecodable)}
