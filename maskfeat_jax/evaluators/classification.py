"""Top-1 / top-5 accuracy on the held-out split: every example exactly once."""
from __future__ import annotations

import jax
import numpy as np

from maskfeat_jax import sharding, steps
from maskfeat_jax.data import pipeline, sources


class Evaluator:
    def __init__(self, config, mesh, graphdef, param_sh):
        self.config, self.mesh = config, mesh
        self.source = sources.make(config, config.input.eval_split)
        self.batch = config.evals.batch_size // jax.process_count()
        if config.evals.batch_size % jax.device_count():
            raise ValueError(f"config.evals.batch_size={config.evals.batch_size} is not divisible by the "
                             f"{jax.device_count()} devices")
        self.step = jax.jit(steps.make_eval_step(graphdef, config), in_shardings=(param_sh, None),
                            out_shardings=sharding.replicated(mesh))

    def run(self, params) -> dict:
        totals = {"top1": 0, "top5": 0, "count": 0}
        with jax.set_mesh(self.mesh):
            for local in pipeline.eval_batches(self.config, self.source, self.batch):
                out = jax.device_get(self.step(params, sharding.global_batch(self.mesh, local)))
                for k in totals:
                    totals[k] += int(out[k])
        n = max(totals["count"], 1)
        return {"eval/top1": totals["top1"] / n, "eval/top5": totals["top5"] / n,
                "eval/examples": float(totals["count"])}
