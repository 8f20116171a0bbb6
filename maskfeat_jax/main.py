"""Entry point: ``python -m maskfeat_jax.main --config=configs/<file>.py[:ARG] --workdir=DIR``.

``ARG`` picks a setting of a config file that takes one (``configs/vit_in1k.py:L/16,ft``; see
the file's docstring). Overrides: ``--config.a.b=value``. Multi-host: ``jax.distributed.initialize`` runs
automatically in SLURM srun steps and on GKE/multislice TPU (their environment variables);
on plain TPU VM pods pass ``--distributed=True`` (``launch/tpu_pod.sh`` does), or use the
explicit coordinator flags below.
Exit code 75 means the run was preempted (SIGTERM/SIGINT) after saving: rerun it.
On the CPU, freed host memory stays in the process (``host_memory``; ``MASKFEAT_KEEP_HOST_MEMORY``).
"""
from __future__ import annotations

import os
import sys

from maskfeat_jax import host_memory

if __name__ == "__main__":         # first thing, before numpy or jax start threads
    try:
        host_memory.keep_freed_memory()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:ARG] (found from any folder; ARG picks a "
                                "setting, e.g. configs/vit_in1k.py:L/16,ft).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard go here.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (resumes if possible) or eval the latest checkpoint.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host without auto-detection).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_bool("distributed", None, "Force (True) or skip (False) jax.distributed.initialize; "
                  "default: in SLURM srun steps, on GKE/multislice TPU, or when a coordinator is given "
                  "(plain TPU VM pods: pass --distributed=True).")
flags.DEFINE_bool("print_config", False, "Print every config key as `key = value  # comment` and exit.")
flags.mark_flags_as_required(["config"])
flags.register_validator("workdir", lambda w: w is not None or FLAGS["print_config"].value,
                         "--workdir is required (except with --print_config)")
FLAGS = flags.FLAGS


def wants_distributed(env, distributed_flag, coordinator_address) -> bool:
    """Whether to call ``jax.distributed.initialize``: as ``--distributed`` says, else when a
    coordinator is given or the environment is a multi-process launch (TPU pod, SLURM step)."""
    if distributed_flag is not None:
        return distributed_flag
    # SLURM: only inside an ``srun`` step with several tasks (a batch script's own shell or an
    # ``salloc`` session has SLURM_JOB_ID too, and there is nothing to join).
    slurm = "SLURM_STEP_NODELIST" in env and "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1
    tpu = any(k in env for k in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))
    return slurm or tpu or coordinator_address is not None


def _maybe_initialize_distributed(jax):
    if wants_distributed(os.environ, FLAGS.distributed, FLAGS.coordinator_address):
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)


def main(argv):
    del argv
    from maskfeat_jax import config as config_lib, storage
    if FLAGS.print_config:
        print("\n".join(config_lib.describe(FLAGS.config)))
        return
    try:   # before the start-up: a workdir that cannot be used fails in a second, not in twenty
        storage.check_workdir(FLAGS.workdir, write=FLAGS.mode == "train")
    except ValueError as e:
        _fail(e)
    import jax  # imported after flag parsing so XLA flags from the environment apply

    if not FLAGS["verbosity"].present:   # library INFO logs (checkpointing) only with -v 0
        logging.set_verbosity(logging.WARNING)

    _maybe_initialize_distributed(jax)
    from maskfeat_jax import train

    logging.info("process %d of %d, %d devices", jax.process_index(), jax.process_count(), jax.device_count())
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    if jax.process_index() == 0:
        config_file = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "?")
        print(f"config: {config_file}; changed from the file: {' '.join(overrides) or 'nothing'}", flush=True)
    try:
        if FLAGS.mode == "eval":
            train.evaluate(FLAGS.config, FLAGS.workdir)
        else:
            train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except ValueError as e:  # config/input errors name their key or flag: one clear line, no traceback
        if not str(e).startswith(("config", "--")):
            raise
        _fail(e)


def _fail(e):
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    from maskfeat_jax import config_cli
    app.run(main, flags_parser=config_cli.flags_parser(FLAGS))
