"""What a run evaluates, as a list: ``from_config`` picks the evaluators a config gets, each
with its ``name``, its schedule (``every_steps``, and always the last step) and ``run(state)
-> dict`` of ``eval/`` scalars. The trainer runs the due ones after saving the step; ``--mode=eval``
runs those that give numbers once.

* ``classification``: top-1/top-5 on the held-out split, for a fine-tuned classifier.
* ``ava``: frame-mAP@0.5 on AVA's ``val`` split, for a detector (``config.task='detect'``).
* ``probe``: k-NN and linear probe on frozen image features (``config.evals.probe``), on one
  process only: every training example passes through this process's encoder.
* ``figures``: HOG target and prediction figures in TensorBoard, while pre-training a ViT on one
  process (``config.evals.figures_every_steps``); no numbers.
"""
from __future__ import annotations

import jax
from absl import logging

# The evaluator modules are imported where they are used: importing this package must not load
# ``probe``, which ``python -m maskfeat_jax.evaluators.probe`` runs as ``__main__``.


class HeldOut:
    """The scalars of a held-out split: ``classification.Evaluator`` (top-1/top-5, ``name``
    ``"classification"``) or ``ava.Evaluator`` (frame-mAP, ``"ava"``). Built before any checkpoint
    is read, so the split's errors (and AVA's ground truth) come before anything is restored or
    compiled."""

    def __init__(self, name, config, mesh, setup):
        import importlib
        module = importlib.import_module(f"maskfeat_jax.evaluators.{name}")
        self.name, self.every_steps = name, config.evals.every_steps
        self.evaluator = module.Evaluator(config, mesh, setup.graphdef, setup.state_sharding.params)

    def run(self, state) -> dict:
        return self.evaluator.run(state.params)


class Probe:
    """k-NN and linear-probe top-1 (``probe.evaluate``) on this process's copy of the parameters."""
    name = "probe"

    def __init__(self, config, setup):
        self.config, self.graphdef, self.every_steps = config, setup.graphdef, config.evals.every_steps

    def run(self, state) -> dict:
        from maskfeat_jax.evaluators import probe
        with jax.set_mesh(None):       # this process's devices, not the training mesh
            return probe.evaluate(self.config, self.graphdef, jax.device_get(state.params))


class Figures:
    """HOG figures of the current model written to ``writer``'s TensorBoard (no scalars)."""
    name = "figures"

    def __init__(self, config, writer):
        self.config, self.writer, self.every_steps = config, writer, config.evals.figures_every_steps

    def run(self, state) -> dict:
        from maskfeat_jax import visualize
        step = int(jax.device_get(state.step))
        with jax.set_mesh(None):       # this process's devices, not the training mesh
            figures = visualize.make_figures(self.config, jax.device_get(state.params))
        visualize.write_to_tensorboard(self.writer, step, figures)
        return {}


def from_config(config, mesh, setup, writer=None) -> list:
    """The evaluators ``config`` gets on this run's processes. ``writer`` (a ``metrics.Writer``)
    is where figures go; without one (``--mode=eval``) there are only those that give numbers."""
    one_process = jax.process_count() == 1
    evaluators = []
    if config.task in ("finetune", "detect"):
        evaluators.append(HeldOut("classification" if config.task == "finetune" else "ava", config, mesh, setup))
    if config.evals.probe and one_process:
        evaluators.append(Probe(config, setup))
    elif config.evals.probe:
        logging.warning("config.evals.probe: skipped on %d processes; run the probe CLI on one host "
                        "(python -m maskfeat_jax.evaluators.probe --workdir=...)", jax.process_count())
    if (writer is not None and config.evals.figures_every_steps > 0 and config.task == "pretrain"
            and config.model.name == "vit" and one_process):
        evaluators.append(Figures(config, writer))
    return evaluators


def due(evaluator, step: int, total_steps: int) -> bool:
    """Whether ``evaluator`` runs after ``step``: every ``every_steps`` steps, and at the last."""
    return step == total_steps or step % evaluator.every_steps == 0
