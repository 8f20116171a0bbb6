"""Top-1 / top-5 accuracy on the held-out split: every example exactly once.

Images: one centre crop each. Videos: ``video.test_clips x video.test_crops`` views per
video, whose softmax scores are averaged before ranking (spec 9.2).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from maskfeat_jax import sharding, steps
from maskfeat_jax.data import pipeline, sources


class Evaluator:
    def __init__(self, config, mesh, graphdef, param_sh):
        self.config, self.mesh = config, mesh
        self.video = config.model.name == "mvit"
        self.source = sources.make(config, config.input.eval_split)
        sources.check_labels(self.source, config, config.input.eval_split)
        self.batch = config.evals.batch_size // jax.process_count()
        if config.evals.batch_size % jax.device_count():
            raise ValueError(f"config.evals.batch_size={config.evals.batch_size} is not divisible by the "
                             f"{jax.device_count()} devices")
        step = steps.make_eval_step(graphdef, config)
        self.step = jax.jit(step, in_shardings=(param_sh, None), out_shardings=sharding.replicated(mesh))

    def _batches(self):
        if self.video:
            from maskfeat_jax.data import video
            return video.eval_batches(self.config, self.source, self.batch)
        return pipeline.eval_batches(self.config, self.source, self.batch)

    def run(self, params) -> dict:
        scores, labels = {}, {}
        totals = np.zeros(3, np.int64)   # top1, top5, count (images)
        pi = jax.process_index()
        with jax.set_mesh(self.mesh):
            for local in self._batches():
                extra = {k: local.pop(k) for k in ("video_index", "view") if k in local}
                out = jax.device_get(self.step(params, sharding.global_batch(self.mesh, local)))
                if not self.video:
                    totals += [int(out["top1"]), int(out["top5"]), int(out["count"])]
                    continue
                rows = slice(pi * self.batch, (pi + 1) * self.batch)   # this process's rows
                probs = out["probs"][rows]
                for p, vid, lab, ok in zip(probs, extra["video_index"], local["label"], local["valid"]):
                    if vid >= 0 and ok:
                        scores[vid] = scores.get(vid, 0.0) + p
                        labels[vid] = lab
        if self.video:
            for vid, s in scores.items():
                top = np.argsort(-s)[:5]
                totals += [int(top[0] == labels[vid]), int(labels[vid] in top), 1]
        if jax.process_count() > 1 and self.video:
            totals = multihost_utils.process_allgather(totals).sum(0)
        n = max(int(totals[2]), 1)
        return {"eval/top1": totals[0] / n, "eval/top5": totals[1] / n, "eval/examples": float(totals[2])}
