"""The trainer: pre-training (MaskFeat) and fine-tuning share this one recipe.

Sections, top to bottom: config check, mesh, data, model and optimizer, shard, step
functions, restore, evaluators, loop. The loop dispatches step N before it reads the
metrics of step N-1, so the host never waits on the device except to log.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import optax
from flax import nnx

from maskfeat_jax import checkpoint, config as config_lib, evaluators, metrics as metrics_lib, models, optim, perf
from maskfeat_jax import platform as platform_lib, saved as saved_lib, sharding, steps, steps_detection
from maskfeat_jax.data import ava_maps, pipeline, sources
from maskfeat_jax.targets import hog, load_frozen

PREEMPTED_EXIT_CODE = 75   # documented: the run saved a checkpoint after SIGTERM/SIGINT; rerun to resume


class Preempted(SystemExit):
    def __init__(self):
        super().__init__(PREEMPTED_EXIT_CODE)


@dataclasses.dataclass
class Setup:
    """Everything the loop needs that depends only on the config and the mesh."""
    model: nnx.Module            # abstract (shapes only)
    graphdef: Any
    tx: optax.GradientTransformation
    schedule: Any
    state_sharding: steps.TrainState
    abstract_state: steps.TrainState   # ShapeDtypeStructs carrying their shardings
    init: Any                    # jitted () -> TrainState, created already sharded
    step_fn: Any                 # pure (state, batch) -> (state, metrics), not yet jitted
    platform: str                # what the program is built for: 'cpu', 'gpu' or 'tpu'
    frozen: tuple = ()           # the step's inputs after the batch: the targets' frozen inputs (a teacher)


def describe_program(model, config, platform: str) -> str:
    """One line: the platform the step is built for and the choices that follow from it."""
    enc = model.encoder
    dtype = platform_lib.compute_dtype(config.model.dtype, platform)
    attn = getattr(enc, "attention", None)
    attn = attn.describe() if attn is not None else "pooling attention (XLA dots)"
    precision = platform_lib.matmul_precision(platform, dtype)
    return (f"program: {platform}, compute {jnp.dtype(dtype).name} (params float32), matmul precision "
            f"{precision}, attention {attn}" + (", CPU kernels" if platform_lib.cpu_kernels(platform) else ""))


# XLA CPU spends most of the initialisation's compile in LLVM on the random-number programs (one
# per parameter); its level-1 optimisation halves that (MViTv2 'mu': 17 s -> 8 s) and gives
# bit-identical parameters, which run once.
INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 1}}


def setup(config, mesh, steps_per_epoch: int, total_steps: int) -> Setup:
    """Model and optimizer built abstractly, the sharded state's layout, and the step, as the
    program for the mesh's platform (or ``config.platform``)."""
    repl = sharding.replicated(mesh)
    platform = platform_lib.target(config, mesh.devices)
    with sharding.rules():
        graphdef, abs_params = nnx.get_abstract_model(lambda: models.build(config, nnx.Rngs(0), platform), mesh)
    model = nnx.merge(graphdef, abs_params)    # shapes only: the encoder's grid, patch and depth
    param_sh = jax.tree.map(lambda a: a.sharding, nnx.to_pure_dict(abs_params))
    tx, schedule = optim.make(config, nnx.to_pure_dict(abs_params), steps_per_epoch, total_steps,
                              model.encoder.size.depth)

    def init_state():
        with sharding.rules():
            params = nnx.to_pure_dict(nnx.state(models.build(config, nnx.Rngs(config.seed), platform)))
        return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                nonfinite=jnp.zeros((), jnp.int32))

    with jax.set_mesh(mesh):
        abs_state = jax.eval_shape(init_state)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abs_state.opt_state, param_sh,
                                   transform_non_params=lambda _: repl)
    state_sh = steps.TrainState(step=repl, params=param_sh, opt_state=opt_sh, nonfinite=repl)
    abs_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, state_sh)
    if config.task == "pretrain":
        step_fn = steps.make_pretrain_step(graphdef, tx, schedule, config, model.encoder.patch,
                                           models.temporal_stride(config),
                                           histogram=hog.histogram_impl(platform))
    elif config.task == "detect":
        step_fn = steps_detection.make_train_step(graphdef, tx, schedule, config)
    else:
        step_fn = steps.make_finetune_step(graphdef, tx, schedule, config)
    dtype = platform_lib.compute_dtype(config.model.dtype, platform)
    step_fn = platform_lib.with_precision(step_fn, platform_lib.matmul_precision(platform, dtype))

    def init():
        with jax.set_mesh(mesh):
            lowered = jax.jit(init_state, out_shardings=state_sh).lower()
            return lowered.compile(compiler_options=INIT_COMPILER_OPTIONS.get(platform_lib.of_devices(mesh.devices), {}))()

    frozen = load_frozen(config, mesh, platform) if config.task == "pretrain" else None
    return Setup(model, graphdef, tx, schedule, state_sh, abs_state, init, step_fn, platform,
                 () if frozen is None else (frozen,))


def jit_step(s: Setup, mesh, batch):
    """The train step jitted with explicit shardings, donating the old state."""
    batch_sh = jax.tree.map(lambda x: x.sharding, batch)
    frozen_sh = tuple(jax.tree.map(lambda x: x.sharding, f) for f in s.frozen)
    return jax.jit(s.step_fn, in_shardings=(s.state_sharding, batch_sh, *frozen_sh),
                   out_shardings=(s.state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains ``config`` in ``workdir`` (resuming there if it can); returns the last logged
    scalars (training, plus evaluations of that step)."""
    # ---- config check (before anything is read or compiled)
    config_lib.validate_workdir(workdir, config.get("init_from", ""))
    config_lib.validate(config, jax.device_count(), jax.process_count())

    # ---- mesh
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
        return _train(config, workdir, mesh)


def _train(config, workdir: str, mesh) -> dict:
    # ---- data
    source, num_sample, steps_per_epoch = _train_input(config)
    total_steps = config.total_steps if config.total_steps > 0 else int(round(config.epochs * steps_per_epoch))
    topology = {"process_count": jax.process_count(), "worker_count": pipeline.worker_count(config),
                "global_batch_size": config.input.global_batch_size, "num_sample": num_sample}

    # ---- model and optimizer, sharded state, step functions
    st = setup(config, mesh, steps_per_epoch, total_steps)
    make_iter = _train_iterator(config, source, st.model)
    with contextlib.ExitStack() as cleanup:        # closed in reverse: saves, input, profile, metrics
        writer = cleanup.enter_context(contextlib.closing(metrics_lib.Writer(workdir)))
        # ---- evaluators: their data is opened (and its errors raised) before any checkpoint is read
        evals = evaluators.from_config(config, mesh, st, writer)

        # ---- restore: latest checkpoint in the workdir, then init_from (weights), then scratch
        ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.every_steps, config.checkpoint.max_to_keep)
        state, train_iter, position = checkpoint.restore_or_init(ckpt, st, make_iter, config, topology, mesh)
        profile = perf.ProfileWindow(workdir, config.profile_start_step, config.profile_num_steps)
        cleanup.callback(profile.close)            # the run ended inside the profiling window
        cleanup.callback(getattr(train_iter, "close", lambda: None))
        cleanup.callback(ckpt.close)               # first: waits for the saves in flight
        if position.step >= total_steps:           # a finished run rerun: nothing to compile or train
            if jax.process_index() == 0:
                print(f"already done: {workdir} holds the checkpoint of step {position.step} of {total_steps}; "
                      f"--mode=eval evaluates it, a larger config.total_steps (or epochs) trains on", flush=True)
            return {}
        logger = _start_logging(config, mesh, st, state, writer, position.step, total_steps, steps_per_epoch)
        profile.say = logger.progress.print

        # ---- the step, compiled once from the batch's shapes and shardings
        t_compile = time.time()
        batch = abstract_batch(config, mesh, st.model)
        train_step = jit_step(st, mesh, batch).lower(state, batch, *st.frozen).compile()
        writer.write(position.step, {"perf/compile_seconds": time.time() - t_compile})
        logger.progress.restart(position.step)     # the ETA counts steps, not the compile

        # ---- loop: dispatch step N, then read step N-1's metrics
        preemption = cleanup.enter_context(_Preemption())
        step = position.step
        while step < total_steps:
            with logger.waiting_for_data():
                local = next(train_iter)
            profile.before(step)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, step_metrics = train_step(state, sharding.global_batch(mesh, local), *st.frozen)
            step += 1
            stop = preemption.requested(step)
            profile.after(step, state)
            logger.dispatched(step, step_metrics)
            due = [ev for ev in evals if evaluators.due(ev, step, total_steps)]
            if step == total_steps or stop or due:
                logger.flush()       # the last step, the one saved at exit, the speed before evaluating
            # saved before any evaluation, which may fail (memory, data) without losing the steps
            ckpt.save(step, state, train_iter, config, dict(topology, **position.at(step)),
                      force=step == total_steps or stop is not None)
            if stop:
                ckpt.wait()
                logger.progress.print(f"{stop}: saved step {step}, exiting with code {PREEMPTED_EXIT_CODE}; "
                                      f"rerun the same command to resume")
                raise Preempted()
            if due:
                with logger.paused():      # evaluation time is not training time
                    _run_evaluators(due, state, step, logger)
        return logger.last


def _start_logging(config, mesh, st, state, writer, start_step, total_steps, steps_per_epoch):
    """Prints the start-up summary; the metrics logger (console progress, throughput and MFU)."""
    gb = config.input.global_batch_size
    flops_per_image = perf.model_flops_per_image(st.model, config)
    peak, peak_src = perf.peak_flops_per_device(config.get("peak_flops", 0.0))
    _log_summary(config, mesh, st.model, st.abstract_state.params, state, total_steps, steps_per_epoch,
                 flops_per_image, peak_src)
    progress = metrics_lib.Progress(total_steps, steps_per_epoch, start_step, mfu_estimate=peak_src.startswith("measured"))
    meter = metrics_lib.Throughput(gb, flops_per_image, jax.device_count(), peak)
    return metrics_lib.Logger(writer, progress, meter, every_steps=config.log_every_steps, total_steps=total_steps,
                              steps_per_epoch=steps_per_epoch, nonfinite=config.nonfinite,
                              skipped_before=int(jax.device_get(state.nonfinite)))   # skips already saved


def _train_input(config):
    """The training source (its labels checked), the clips per video (1 for images) and the
    steps per epoch: an epoch is one pass over the images, or over the videos (AVA: keyframes)."""
    if config.task == "detect":
        source = ava_maps.train_source(config)
        return source, 1, max(len(source) // config.input.global_batch_size, 1)
    source = sources.make(config, config.input.train_split)
    sources.check_labels(source, config, config.input.train_split)
    if sources.serves_clips(config):    # repeated augmentation: several clips per video
        from maskfeat_jax.data import video
        return source, video.num_sample(config), video.steps_per_epoch(config, len(source))
    return source, 1, max(len(source) // config.input.global_batch_size, 1)


def _train_iterator(config, source, model):
    """``make_iter(start_batch)``: the training stream from that global batch on (images or clips)."""
    if config.task == "detect":
        return lambda start: iter(pipeline.train_stream(config, source, ava_maps.train_map(config), start_batch=start))
    return lambda start: iter(pipeline.train_dataset(config, source, _mask_grid(config, model), start_batch=start))


def abstract_batch(config, mesh, model):
    """The train step's batch as shapes and shardings, read from no data."""
    if config.task == "detect":
        return steps_detection.abstract_batch(config, mesh)
    return sharding.abstract_batch(config, mesh, _mask_grid(config, model))


def _mask_grid(config, model):
    """The token grid masks are drawn on: ViT's patches ((t, h, w) on video), MViTv2's mask cubes."""
    return model.encoder.mask_grid if config.model.name == "mvit" else model.encoder.grid


class _Preemption:
    """Whether to stop after a step, asked once per step (``requested``).

    One process: SIGTERM/SIGINT set a flag; the step in flight finishes, is saved, and the run
    exits with PREEMPTED_EXIT_CODE. Several processes: a signal reaches one host at some step,
    but the save is collective, so JAX's preemption service (started by
    jax.distributed.initialize, it owns SIGTERM) tells every host the same step to stop at."""

    def __init__(self):
        self.reason = None
        self.multihost = jax.process_count() > 1
        self._handlers = {}

    def __enter__(self):
        if not self.multihost:
            self._handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, h in self._handlers.items():
            signal.signal(s, h)

    def _on_signal(self, signum, _frame):
        self.reason = signal.Signals(signum).name

    def requested(self, step: int) -> str | None:
        """The reason to stop after ``step`` (a collective on several processes), or None."""
        if self.multihost and multihost_utils.reached_preemption_sync_point(step):
            self.reason = "SIGTERM (preemption notice, agreed by all hosts)"
        return self.reason


def _run_evaluators(due, state, step: int, logger) -> None:
    """Runs the ``due`` evaluators on ``state``; their numbers go out as one row for ``step``."""
    results = {}
    for ev in due:
        results.update(ev.run(state))
    if results:
        logger.write(step, results)
        if jax.process_index() == 0:
            logger.progress.print(" | ".join(f"{k} {v:.4f}" for k, v in results.items()))


def _log_summary(config, mesh, model, abs_params, state, total_steps, steps_per_epoch, flops_per_image,
                 peak_src):
    """The start-up summary on stdout (process 0): devices, mesh, program, batch, input, lr, steps, sizes."""
    if jax.process_index() != 0:
        return
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abs_params))
    per_module = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v)) for k, v in abs_params.items()}
    lrs = optim.scaled_lrs(config)
    gb = config.input.global_batch_size
    lines = [
        f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} on {jax.process_count()} process(es)",
        f"mesh: {dict(mesh.shape)}",
        describe_program(model, config, platform_lib.target(config, mesh.devices)),
        f"batch: global {gb}, per device {gb // jax.device_count()}, per host {gb // jax.process_count()}",
        f"input: {config.input.dataset}, "
        + ("clips decoded by PyAV" if config_lib.is_video(config) else f"image backend {config.input.image_backend}")
        + f", {pipeline.worker_count(config)} grain worker process(es) per host",
        f"lr: peak {lrs['peak']:.3e} = base {config.optim.base_lr:g} x {gb}/{config.optim.reference_batch}"
        f" (start {lrs['start']:.2e}, end {lrs['end']:.2e}), layer decay {config.optim.layer_decay}",
        f"steps: {total_steps} ({steps_per_epoch} per epoch), starting at {int(jax.device_get(state.step))}",
        f"parameters: {n_params:,} ({', '.join(f'{k} {v:,}' for k, v in per_module.items())})",
        f"FLOPs per step: {flops_per_image * gb:.3e} (analytic, training); peak from {peak_src}"
        + (" (an estimate: shown as mfu~, which other jobs on the CPU can push past 100%)"
           if peak_src.startswith("measured") else ""),
        f"per-device bytes: params {sharding.bytes_per_device(state.params):,}, "
        f"optimizer {sharding.bytes_per_device(state.opt_state):,}",
    ]
    print("\n".join(lines), flush=True)


def evaluate(config, workdir: str) -> dict:
    """Evaluates the latest checkpoint in ``workdir`` without training: the evaluators that give
    numbers (top-1/top-5 for a classifier, k-NN and linear probe on frozen features for an image
    model). The results go to ``metrics.jsonl`` unless that step's row already holds them (a
    second run adds nothing)."""
    config_lib.validate_workdir(workdir, config.get("init_from", ""))
    config_lib.validate(config, jax.device_count(), jax.process_count())
    finished = saved_lib.finished_steps(workdir)            # reads only: an empty workdir stays empty
    if not finished:
        raise ValueError(f"--mode=eval: --workdir={workdir} holds no finished checkpoint (train first: the "
                         f"same command without --mode=eval)")
    step = finished[-1]
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.every_steps, config.checkpoint.max_to_keep)
    try:
        checkpoint.check_config(ckpt, step, config, evaluating=True)
        if config.task == "pretrain" and not config.evals.probe:
            _say_nothing_to_evaluate(config, workdir, step)
            return {}
        mesh = sharding.make_mesh(config.mesh)
        st = setup(config, mesh, steps_per_epoch=1, total_steps=1)
        results = {}
        with jax.set_mesh(mesh):
            evals = evaluators.from_config(config, mesh, st)
            state = ckpt.restore(step, st.abstract_state)
            for ev in evals:
                results.update(ev.run(state))
    finally:
        ckpt.close()
    if results and not metrics_lib.logged(workdir, step, results):
        writer = metrics_lib.Writer(workdir)
        writer.write(step, results)
        writer.close()
    if jax.process_index() == 0:
        print(json.dumps({"step": step, **results}), flush=True)
    return results


def _say_nothing_to_evaluate(config, workdir: str, step: int) -> None:
    """``--mode=eval`` on a pre-training checkpoint without the probe: what there is instead."""
    if jax.process_index() != 0:
        return
    last = metrics_lib.last_value(workdir, "train/loss")
    loss = f"; its last logged train/loss is {last[1]:.4f} (step {last[0]})" if last else ""
    how = "fine-tune it (config.init_from=WORKDIR with a *_ft config) for top-1/top-5"
    if config.model.name == "vit":
        how += ", or add --config.evals.probe=True for a k-NN and linear probe on its frozen features"
    print(f"step {step}: a MaskFeat pre-training checkpoint has no evaluation of its own{loss}; {how}", flush=True)
