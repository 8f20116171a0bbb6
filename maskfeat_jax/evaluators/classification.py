"""Top-1 / top-5 accuracy on the held-out split: every example exactly once.

Images: one centre crop each. Videos: ``video.test_clips x video.test_crops`` views per
video, whose softmax scores are averaged before ranking (spec 9.2). An example that cannot be
decoded is left out and counted (``eval/undecodable``).
"""
from __future__ import annotations

import jax
import numpy as np
from absl import logging

from maskfeat_jax import config_validate, sharding, steps
from maskfeat_jax.data import pipeline, sources


class Evaluator:
    def __init__(self, config, mesh, graphdef, param_sh):
        self.config, self.mesh = config, mesh
        self.video = config_validate.is_video(config)
        self.source = sources.make(config, config.input.eval_split)
        sources.check_labels(self.source, config, config.input.eval_split)
        self.batch = config.evals.batch_size // jax.process_count()
        if config.evals.batch_size % jax.device_count():
            raise ValueError(f"config.evals.batch_size={config.evals.batch_size} is not divisible by the "
                             f"{jax.device_count()} devices")
        step = steps.make_eval_step(graphdef, config)
        self.step = jax.jit(step, in_shardings=(param_sh, None), out_shardings=sharding.replicated(mesh))

    def _batches(self):
        workers = pipeline.worker_count(self.config)          # config.input.worker_count, as in training
        return pipeline.eval_batches(self.config, self.source, self.batch, worker_count=workers, video=self.video)

    def run(self, params) -> dict:
        totals = np.zeros(3, np.int64)   # top1, top5, examples (videos)
        if self.video:
            for score, label in self.video_scores(params).values():
                top = np.argsort(-score)[:5]
                totals += [int(top[0] == label), int(label in top), 1]
        else:                            # the step sums over the global batch
            with jax.set_mesh(self.mesh):
                for local in self._batches():
                    out = jax.device_get(self.step(params, sharding.global_batch(self.mesh, local)))
                    totals += [int(out["top1"]), int(out["top5"]), int(out["count"])]
        n, undecodable = max(int(totals[2]), 1), len(self.source) - int(totals[2])
        if undecodable:
            logging.warning("evaluation: %d of the %d examples of split %r could not be decoded; top-1/top-5 "
                            "leave them out (eval/undecodable)", undecodable, len(self.source),
                            self.config.input.eval_split)
        return {"eval/top1": totals[0] / n, "eval/top5": totals[1] / n, "eval/examples": float(totals[2]),
                "eval/undecodable": float(undecodable)}

    def video_scores(self, params) -> dict:
        """``{video index: (softmax scores summed over its views, label)}`` for every video of
        the split, the same on every process.

        The step returns each row's scores with its video index and label, replicated, so the
        rows are read as the global batch holds them: a process's rows need not be a contiguous
        block of it (on TPU v4/v5p meshes the hosts interleave along the data axis)."""
        scores, labels = {}, {}
        with jax.set_mesh(self.mesh):
            for local in self._batches():
                local.pop("view")
                out = jax.device_get(self.step(params, sharding.global_batch(self.mesh, local)))
                for p, vid, lab, ok in zip(out["probs"], out["video_index"], out["label"], out["valid"]):
                    if vid >= 0 and ok:
                        scores[int(vid)] = scores.get(int(vid), 0.0) + p
                        labels[int(vid)] = int(lab)
        return {v: (scores[v], labels[v]) for v in sorted(scores)}
