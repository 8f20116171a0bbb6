"""The trainer: pre-training (MaskFeat) and fine-tuning share this one recipe.

Sections, top to bottom: config check, mesh, data, model and optimizer, shard, step
functions, restore, evaluators, loop. The loop dispatches step N before it reads the
metrics of step N-1, so the host never waits on the device except to log.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import signal
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import optax
from flax import nnx

from maskfeat_jax import checkpoint, config as config_lib, metrics as metrics_lib, models, optim, perf
from maskfeat_jax import platform as platform_lib, sharding, steps, storage
from maskfeat_jax.data import pipeline, sources
from maskfeat_jax.evaluators import classification, probe
from maskfeat_jax.targets import hog

PREEMPTED_EXIT_CODE = 75   # documented: the run saved a checkpoint after SIGTERM/SIGINT; rerun to resume
RESTORE_RETRY_S = 2.0     # pause before reading a checkpoint that failed once a second time


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
    with jax.set_mesh(mesh), sharding.rules():
        model = nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0), platform))
        graphdef, abs_params = nnx.split(model)
        param_sh = nnx.to_pure_dict(sharding.state_shardings(abs_params, mesh))
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
        video = config.model.name == "mvit"
        step_fn = steps.make_pretrain_step(graphdef, tx, schedule, config, model.encoder.patch,
                                           model.encoder.patch_stride[0] if video else None,
                                           histogram=hog.histogram_impl(platform))
    else:
        step_fn = steps.make_finetune_step(graphdef, tx, schedule, config)
    dtype = platform_lib.compute_dtype(config.model.dtype, platform)
    step_fn = platform_lib.with_precision(step_fn, platform_lib.matmul_precision(platform, dtype))

    def init():
        with jax.set_mesh(mesh):
            lowered = jax.jit(init_state, out_shardings=state_sh).lower()
            return lowered.compile(compiler_options=INIT_COMPILER_OPTIONS.get(platform_lib.of_devices(mesh.devices), {}))()

    return Setup(model, graphdef, tx, schedule, state_sh, abs_state, init, step_fn, platform)


def jit_step(s: Setup, mesh, batch):
    """The train step jitted with explicit shardings, donating the old state."""
    batch_sh = jax.tree.map(lambda x: x.sharding, batch)
    return jax.jit(s.step_fn, in_shardings=(s.state_sharding, batch_sh),
                   out_shardings=(s.state_sharding, sharding.replicated(mesh)), donate_argnums=(0,))


def train_and_evaluate(config, workdir: str) -> dict:
    # ---- config check (before anything is read or compiled)
    config_lib.validate_workdir(workdir, config.get("init_from", ""))
    config_lib.validate(config, jax.device_count(), jax.process_count())

    # ---- mesh
    mesh = sharding.make_mesh(config.mesh)

    # ---- data
    train_source = sources.make(config, config.input.train_split)
    sources.check_labels(train_source, config, config.input.train_split)
    gb = config.input.global_batch_size
    num_sample, steps_per_epoch = 1, max(len(train_source) // gb, 1)
    if config.model.name == "mvit":    # an epoch is one pass over the videos (repeated augmentation)
        from maskfeat_jax.data import video
        num_sample, steps_per_epoch = video.num_sample(config), video.steps_per_epoch(config, len(train_source))
    total_steps = config.total_steps if config.total_steps > 0 else int(round(config.epochs * steps_per_epoch))

    # ---- model and optimizer, sharded state, step functions
    st = setup(config, mesh, steps_per_epoch, total_steps)
    model = st.model
    if config.model.name == "mvit":
        from maskfeat_jax.data import video
        make_iter = lambda start: iter(video.train_dataset(  # noqa: E731
            config, train_source, model.encoder.mask_grid, start_batch=start))
    else:
        make_iter = lambda start: iter(pipeline.train_dataset(  # noqa: E731
            config, train_source, model.encoder.grid, start_batch=start))
    topology = {"process_count": jax.process_count(), "worker_count": pipeline.worker_count(config),
                "global_batch_size": gb, "num_sample": num_sample}
    # the evaluation's data is opened (and its errors raised) before any checkpoint is read
    evaluator = classification.Evaluator(config, mesh, st.graphdef, st.state_sharding.params) if config.task == "finetune" else None

    # ---- restore: latest checkpoint in the workdir, then init_from (weights), then scratch
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.every_steps, config.checkpoint.max_to_keep)
    latest = ckpt.latest_step()
    # Recorded with each checkpoint beside the topology: the examples (videos) read so far, and
    # the batch the iterator was built to start at (grain's saved position counts from there).
    per_batch = gb // num_sample      # examples (videos) the iterator passes per batch
    read_at_start, iter_start = 0, 0  # at `start_step`
    with jax.set_mesh(mesh):
        if latest is not None:
            state, saved, train_iter = _restore_latest_good(ckpt, st.abstract_state, make_iter, config, topology)
            read_at_start = _examples_read(saved, int(jax.device_get(state.step)), per_batch)
            iter_start = (saved or {}).get("start_batch", 0)
            if train_iter is None:    # written by another input topology: restart the input where it was
                iter_start = read_at_start // per_batch
                read_at_start = iter_start * per_batch
                print(f"input topology changed ({_input_topology(saved)} -> {topology}): the data iterator "
                      f"starts at batch {iter_start} instead of restoring its saved state", flush=True)
                train_iter = make_iter(iter_start)
        else:
            train_iter = make_iter(0)
            state = st.init()
            if config.get("init_from"):
                state = state.replace(params=checkpoint.init_from(config.init_from, state.params, mesh))
    start_step = int(jax.device_get(state.step))
    if start_step >= total_steps:            # a finished run rerun: nothing to compile or train
        ckpt.close()
        if hasattr(train_iter, "close"):
            train_iter.close()
        if jax.process_index() == 0:
            print(f"already done: {workdir} holds the checkpoint of step {start_step} of {total_steps}; "
                  f"--mode=eval evaluates it, a larger config.total_steps (or epochs) trains on", flush=True)
        return {}
    skipped_before = int(jax.device_get(state.nonfinite))   # skips already in a resumed checkpoint

    writer = metrics_lib.Writer(workdir)
    flops_per_image = perf.model_flops_per_image(model, config)
    peak, peak_src = perf.peak_flops_per_device(config.get("peak_flops", 0.0))
    _log_summary(config, mesh, model, st.abstract_state.params, state, total_steps, steps_per_epoch, flops_per_image,
                 peak_src)

    # ---- loop
    # Preemption. One process: SIGTERM/SIGINT set a flag; the step in flight finishes, is saved,
    # and the run exits with PREEMPTED_EXIT_CODE. Several processes: a signal reaches one host
    # at some step, but the save is collective, so JAX's preemption service (started by
    # jax.distributed.initialize, it owns SIGTERM) tells every host the same step to stop at.
    stop = {"signal": None}
    multihost = jax.process_count() > 1
    handlers = {} if multihost else {
        s: signal.signal(s, lambda signum, _: stop.__setitem__("signal", signal.Signals(signum).name))
        for s in (signal.SIGTERM, signal.SIGINT)}
    progress = metrics_lib.Progress(total_steps, steps_per_epoch, start_step,
                                    mfu_estimate=peak_src.startswith("measured"))
    train_step = None
    pending, last = None, {}
    trace_dir = None          # where the profiler writes while it traces
    meter = metrics_lib.Throughput(gb, flops_per_image, jax.device_count(), peak)
    step = start_step
    try:
        while step < total_steps:
            t0 = time.time()
            local = next(train_iter)
            meter.data_wait += time.time() - t0
            batch = sharding.global_batch(mesh, local)
            if train_step is None:   # jit once, with explicit shardings, donating the old state
                train_step = jit_step(st, mesh, batch)
                t_compile = time.time()
                with jax.set_mesh(mesh):
                    train_step = train_step.lower(state, batch).compile()
                writer.write(step, {"perf/compile_seconds": time.time() - t_compile})
                progress.restart(step)   # the ETA counts steps, not the compile
            if step == config.profile_start_step:
                trace_dir = tempfile.mkdtemp(prefix="maskfeat_profile_") if storage.is_url(workdir) \
                    else str(storage.path(workdir) / "profile")
                jax.profiler.start_trace(trace_dir)
            with jax.set_mesh(mesh), jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, step_metrics = train_step(state, batch)
            step += 1
            if multihost and multihost_utils.reached_preemption_sync_point(step):
                stop["signal"] = "SIGTERM (preemption notice, agreed by all hosts)"
            if trace_dir is not None and step == config.profile_start_step + config.profile_num_steps:
                jax.block_until_ready(state)
                _stop_profile(trace_dir, workdir, config.profile_start_step, step, progress.print)
                trace_dir = None
            if pending is not None:   # read step N-1's metrics after dispatching step N
                last = _flush(pending, config, writer, progress, meter, skipped_before)
                pending = None
            is_last = step == total_steps
            if step % config.log_every_steps == 0 or is_last:
                perf_m = {"train/epoch": step / steps_per_epoch}
                pending = (step, step_metrics, perf_m)
                if is_last or stop["signal"] is not None:
                    last = _flush(pending, config, writer, progress, meter, skipped_before)
                    pending = None
            figs_every = config.evals.figures_every_steps
            evaluate_now = (step % config.evals.every_steps == 0 or is_last) and (
                evaluator is not None or (config.evals.probe and jax.process_count() == 1))
            figures_now = figs_every > 0 and config.task == "pretrain" and config.model.name == "vit" and (
                step % figs_every == 0 or is_last) and jax.process_count() == 1
            if (evaluate_now or figures_now) and pending is not None:
                last = _flush(pending, config, writer, progress, meter, skipped_before)   # speed before
                pending = None                                          # the evaluation's time counts
            # saved before any evaluation, which may fail (memory, data) without losing the steps
            ckpt.save(step, state, train_iter, config,
                      dict(topology, examples_read=read_at_start + (step - start_step) * per_batch,
                           start_batch=iter_start),
                      force=is_last or stop["signal"] is not None)
            if stop["signal"] is not None:
                ckpt.wait()
                progress.print(f"{stop['signal']}: saved step {step}, exiting with code {PREEMPTED_EXIT_CODE}; "
                               f"rerun the same command to resume")
                raise Preempted()
            if evaluate_now:
                res = evaluator.run(state.params) if evaluator is not None else {}
                if config.evals.probe and jax.process_count() == 1:
                    res.update(probe.evaluate(config, st.graphdef, jax.device_get(state.params)))
                if res:
                    writer.write(step, res)
                    last.update(res)
                    if jax.process_index() == 0:
                        progress.print(" | ".join(f"{k} {v:.4f}" for k, v in res.items()))
            if figures_now:
                from maskfeat_jax import visualize
                visualize.write_to_tensorboard(writer, step, visualize.make_figures(config, jax.device_get(state.params)))
            if evaluate_now or figures_now:
                meter.restart(step)      # both waited for this step; their time is not training time
        if pending is not None:
            last = _flush(pending, config, writer, progress, meter, skipped_before)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if trace_dir is not None:      # the run ended inside the profiling window
            _stop_profile(trace_dir, workdir, config.profile_start_step, step, progress.print)
        ckpt.close()
        writer.close()
        if hasattr(train_iter, "close"):
            train_iter.close()
    return last


def _stop_profile(trace_dir: str, workdir: str, first: int, step: int, say=print) -> None:
    """Stops the profiler (steps ``first`` to ``step - 1`` traced); for a URL workdir, copies
    its local trace folder there."""
    jax.profiler.stop_trace()
    if storage.is_url(workdir):
        storage.upload_tree(trace_dir, f"{workdir}/profile")
        shutil.rmtree(trace_dir, ignore_errors=True)
    say(f"profiler trace of steps {first}..{step - 1} in {workdir}/profile")


def _flush(pending, config, writer, progress, meter, skipped_before: int = 0) -> dict:
    """Fetches a logged step's metrics (already computed), writes and prints them.

    In ``config.nonfinite='error'`` mode it raises on a skipped (non-finite) update made by this
    run; skips already counted in the checkpoint it resumed from (``skipped_before``) do not
    count again, so a run stopped this way can be resumed."""
    step, device_metrics, extra = pending
    m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    m.update(extra)
    m.update(meter.mark(step))
    writer.write(step, m)
    progress.update(step, m)
    new = int(m.get("train/nonfinite_steps", 0)) - skipped_before
    if new > 0 and config.nonfinite == "error":
        raise FloatingPointError(
            f"non-finite loss or gradient norm in {new} step(s) by step {step} (config.nonfinite='error'); "
            f"those updates were not applied and no non-finite state was saved, so the run can be resumed. "
            f"Set config.nonfinite='skip' to skip such steps and go on.")
    return m


def _restore_latest_good(ckpt, abstract_state, make_iter, config, topology):
    """Restores the newest checkpoint that reads back; a damaged one is reported and skipped.

    Every read is tried twice (a storage error may pass; TensorStore reports those as
    ``ValueError``), and all processes agree on each try: a step counts as restored only where
    every process read it, so they all resume from the same step and set aside the same ones.

    Returns (state, the saved input topology or None, the restored data iterator). The iterator
    (``make_iter(start batch)``) is restored only when the topologies agree, else it is None."""
    steps_desc = sorted(ckpt.mngr.all_steps(), reverse=True)
    for i, step in enumerate(steps_desc):
        for attempt in range(2):
            state, train_iter, err = None, None, None
            try:
                _check_resume_config(ckpt, step, config)
                saved = ckpt.saved_topology(step)
                changed = saved is not None and _input_topology(saved) != topology
                train_iter = None if changed else make_iter((saved or {}).get("start_batch", 0))
                state = ckpt.restore(step, abstract_state, train_iter)
            except ValueError as e:
                if "shape-changing" in str(e):
                    raise
                err = e
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous one
                err = e
            if _all_processes_agree(err is None):
                break
            if hasattr(train_iter, "close"):
                train_iter.close()
            if err is None:
                err = RuntimeError("another process could not read it")
            if attempt == 0:     # perhaps the storage, not the checkpoint: read it once more
                logging.warning("reading checkpoint %d failed (%s: %s); retrying once", step, type(err).__name__, err)
                time.sleep(RESTORE_RETRY_S)
        else:
            nxt = f"falling back to step {steps_desc[i + 1]}" if i + 1 < len(steps_desc) else "no older checkpoint"
            logging.warning("checkpoint at step %d could not be restored (%s: %s); %s", step, type(err).__name__,
                            err, nxt)
            print(f"warning: checkpoint at step {step} could not be restored ({type(err).__name__}); {nxt}",
                  flush=True)
            continue
        for bad in steps_desc[:i]:    # newer, unrestorable: out of the way of this run's saves
            moved = ckpt.set_aside(bad)
            print(f"checkpoint at step {bad} " + (f"set aside as {moved}" if moved else
                  "could not be set aside: this run saves again only after that step"), flush=True)
        print(f"resuming from step {step}", flush=True)
        return state, saved, train_iter
    raise RuntimeError(f"no checkpoint in {ckpt.directory} could be restored (the last error is above). If "
                       f"the config changed since they were written in a way that changes the train state "
                       f"(model, optimizer), resume with the saved config (JSON in "
                       f"{ckpt.directory}/<step>/config/metadata); if the checkpoints are damaged, move the "
                       f"folder away to start from scratch")


def _all_processes_agree(ok: bool) -> bool:
    """True when ``ok`` holds on every process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.process_allgather(np.int32(ok)).min())


def _input_topology(saved: dict) -> dict:
    """A checkpoint's saved topology without its position (``examples_read``, ``start_batch``)."""
    return {k: v for k, v in saved.items() if k not in ("examples_read", "start_batch")}


def _examples_read(saved: dict | None, step: int, per_batch: int) -> int:
    """Examples (videos) the input had passed at a checkpoint of ``step``. Checkpoints written
    before the count was recorded give ``step`` batches of their own size."""
    if saved is None:
        return step * per_batch
    if "examples_read" in saved:
        return int(saved["examples_read"])
    return step * saved["global_batch_size"] // saved.get("num_sample", 1)


def _check_resume_config(ckpt, step, config, evaluating: bool = False):
    diffs = config_lib.shape_differences(ckpt.saved_config(step), config)
    if diffs and (evaluating or not config.checkpoint.allow_config_change):
        hint = (f"Evaluate with the config it was trained with (saved in {ckpt.directory}/{step}/config/metadata)."
                if evaluating else "Use another --workdir, or set --config.checkpoint.allow_config_change=True "
                "to override.")
        raise ValueError("config: the workdir holds a checkpoint whose config differs in shape-changing keys:\n  "
                         + "\n  ".join(diffs) + "\n" + hint)


def _log_summary(config, mesh, model, abs_params, state, total_steps, steps_per_epoch, flops_per_image,
                 peak_src):
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
    for line in lines:
        logging.info(line)
        print(line, flush=True)


def evaluate(config, workdir: str) -> dict:
    """Evaluates the latest checkpoint in ``workdir`` without training: top-1/top-5 for a
    classifier, k-NN and linear probe on frozen features for any image model. The results go to
    ``metrics.jsonl`` unless that step's row already holds them (a second run adds nothing)."""
    config_lib.validate_workdir(workdir, config.get("init_from", ""))
    config_lib.validate(config, jax.device_count(), jax.process_count())
    steps = checkpoint.finished_steps(workdir)            # reads only: an empty workdir stays empty
    if not steps:
        raise ValueError(f"--mode=eval: --workdir={workdir} holds no finished checkpoint (train first: the "
                         f"same command without --mode=eval)")
    step = steps[-1]
    ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.every_steps, config.checkpoint.max_to_keep)
    try:
        _check_resume_config(ckpt, step, config, evaluating=True)
        if config.task == "pretrain" and not config.evals.probe:
            _say_nothing_to_evaluate(config, workdir, step)
            return {}
        mesh = sharding.make_mesh(config.mesh)
        st = setup(config, mesh, steps_per_epoch=1, total_steps=1)
        with jax.set_mesh(mesh):
            state = ckpt.restore(step, st.abstract_state)
        results = {}
        if config.task == "finetune":
            results.update(classification.Evaluator(config, mesh, st.graphdef, st.state_sharding.params).run(state.params))
        if config.evals.probe and jax.process_count() == 1:      # as in training: the probe runs on one host
            results.update(probe.evaluate(config, st.graphdef, jax.device_get(state.params)))
        elif config.evals.probe:
            logging.warning("config.evals.probe: skipped on %d processes; run the probe CLI on one host "
                            "(python -m maskfeat_jax.evaluators.probe --workdir=...)", jax.process_count())
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
