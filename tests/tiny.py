"""The tiny test config: ``base_config()`` set to the smallest sensible model of a family, the
one place that says what "the tiny model" of the tests is.

    import tiny                      # tests/ is on sys.path under pytest, as for ``conftest``

    c = tiny.config()                                   # ViT-mu/16 pre-training at 32 px
    c = tiny.config("finetune", "mvit")                 # MViTv2-mu fine-tuning, 4 frames at 64 px
    c = tiny.config("finetune", overrides={"input.global_batch_size": 16, "augment.randaug_ops": 0})

A test states only what differs from the baseline, as dotted keys (the names of
``--config.KEY`` and ``--print_config``). A key that ``base_config()`` does not have, or
that names a group rather than a value, is a ``KeyError`` naming it (a typo fails instead
of testing the baseline); a value of the wrong type fails as ``ConfigDict`` makes it fail.

``from_flags`` builds the config a command line names, and ``train`` runs the trainer on it in
this process (no interpreter start, no imports again), for tests of what the trainer does
rather than of the command itself::

    out = tiny.train(tiny.from_flags(["--config=configs/demo.py", "--config.total_steps=3"]), workdir)
"""
from __future__ import annotations

import contextlib
import difflib
import io
import logging
from collections.abc import Mapping, Sequence

import ml_collections

from maskfeat_jax import config as config_lib, config_cli

# what each family's tiny model is, on top of base_config(); both: batch 8, 10 classes
BASELINES = {
    "vit": {"model.variant": "mu/16", "input.image_size": 32},        # 2 x 2 patches
    "mvit": {"model.variant": "mu", "input.image_size": 64, "video.num_frames": 4},
}
COMMON = {"input.global_batch_size": 8, "model.num_classes": 10}


def config(task: str = "pretrain", model: str = "vit",
           overrides: Mapping[str, object] | None = None) -> ml_collections.ConfigDict:
    """``base_config()`` for ``task`` with the tiny ``model`` ("vit" or "mvit"), then
    ``overrides`` (``{"dotted.key": value}``, applied in order)."""
    if model not in BASELINES:
        raise ValueError(f"tiny.config: model={model!r}, expected one of {', '.join(BASELINES)}")
    c = config_lib.base_config()
    c.task, c.model.name = task, model
    for key, value in {**BASELINES[model], **COMMON, **(overrides or {})}.items():
        _set(c, key, value)
    return c


def _set(c: ml_collections.ConfigDict, key: str, value) -> None:
    *groups, leaf = key.split(".")
    group = c
    for name in groups:
        group = group.get(name) if isinstance(group, ml_collections.ConfigDict) else None
    if not isinstance(group, ml_collections.ConfigDict) or leaf not in group:
        close = difflib.get_close_matches(key, config_lib.flat_keys(c), n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise KeyError(f"tiny.config: {key!r} is not a key of base_config(){hint}")
    if isinstance(group[leaf], ml_collections.ConfigDict):
        raise KeyError(f"tiny.config: {key!r} is a group of base_config(); name one of its keys")
    group[leaf] = value


def from_flags(args: Sequence[str]) -> ml_collections.ConfigDict:
    """The config of ``python -m maskfeat_jax.main ARGS`` (``--config=FILE[:ARG]`` and
    ``--config.KEY=VALUE``), parsed as that command parses it: ml_collections' config-file flag
    under ``config_cli.flags_parser``."""
    from absl import flags
    from ml_collections import config_flags
    argv = ["main", *args]
    flag_values = flags.FlagValues()       # the override flags are found in the given argv
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
    config_cli.flags_parser(flag_values)(argv)
    return flag_values.config


def train(c: ml_collections.ConfigDict, workdir) -> str:
    """``train.train_and_evaluate(c, workdir)`` in this process; returns what it printed and logged."""
    from maskfeat_jax import train as train_lib
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logging.getLogger().addHandler(handler)
    try:
        with contextlib.redirect_stdout(out):
            train_lib.train_and_evaluate(c, str(workdir))
    finally:
        logging.getLogger().removeHandler(handler)
    return out.getvalue()
