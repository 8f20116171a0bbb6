"""Dry run: compile the train step for a mesh with no data and no parameters in memory.

Does ViT-L fit on a pod slice, and how much does it cost per device? This module answers
before you claim the machines. It builds the train state abstractly, as shapes and
shardings only (``train.setup``). It builds abstract batch inputs with the trainer's batch
sharding. Then it lowers and compiles the jitted train step for the configured mesh, with
the same explicit shardings and donation that the trainer uses. It prints:

* the mesh;
* per-device bytes of parameters and optimizer state, counted from the shardings;
* the compiled program's memory analysis per device;
* the compiler's FLOPs per device.

    python -m maskfeat_jax.dry_run --config=configs/vit_in1k.py:L/16 --devices=256 \\
        --config.mesh.data=1 --config.mesh.fsdp=256 --config.input.global_batch_size=4096

Where the devices come from:

* ``--topology=v5e:16x16`` (or ``v5p:4x4x4``, ``v6e:8x8``...) compiles for a TPU slice
  that is not there. It needs libtpu (``pip install 'jax[tpu]'``) but no TPU. The figures
  are the TPU compiler's own, so use this to check that a config fits before claiming a
  pod. The printed device count is what the mesh must multiply to. On v4, for example,
  ``v4:2x2x2`` gives 16 devices.
* ``--devices=N`` simulates N CPU devices. It sets ``jax_num_cpu_devices`` and
  ``jax_platforms=cpu`` before any backend starts. Argument and output sizes are exact,
  because they follow from the shardings alone. Temporary (activation) memory is the CPU
  compiler's figure, and that compiler does not honour ``model.remat``. Read it as a
  pessimistic estimate. For ViT-L with 16 images per device, the CPU gives 9.9 GiB and
  the TPU compiler 5.95 GiB.
* Neither flag: the devices of this host, e.g. one GPU host, with that backend's figures.
* ``--platform=gpu|tpu`` (with ``--devices`` or on any host): build the program for that
  platform (``config.platform``) and lower it for that platform, without compiling:
  the report lists what the program holds (attention kernels, dots by operand type) but no
  memory figures, since that platform's compiler is not here. ``--topology`` compiles for TPU.

The report's ``program:`` line says which platform the step was built for and the choices
that follow from it (compute dtype, attention implementation, CPU kernels).

The config is validated as the trainer does, except for the dataset check. No data is
read, so that check runs against an embedded dataset (``'synthetic'``, or ``'video_demo'``
for MViT). A TFDS name, ``data_dir`` or CSV folder that exists only on the training
machines, e.g. on GCS, therefore does not fail here.
"""
from __future__ import annotations

import contextlib
import json
import re
import sys
import time

import jax
from absl import app, flags
from ml_collections import config_flags

# Importing jax starts no backend; --devices/--topology still take effect in main().
from maskfeat_jax import config as config_lib, config_cli, config_validate, perf, sharding, train

config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:ARG] (see configs/).", lock_config=True)
flags.DEFINE_integer("devices", None, "Simulate this many CPU devices (default: the real devices).")
flags.DEFINE_string("topology", None, "Compile for a TPU slice that is not here, e.g. 'v5e:16x16' or "
                    "'v4:4x4x4' (compile-only devices; needs libtpu: pip install 'jax[tpu]').")
flags.DEFINE_enum("platform", None, ["cpu", "gpu", "tpu"], "Build the program for this platform and "
                  "lower it for it, without compiling (sets config.platform).")
flags.DEFINE_float("device_memory_gib", 0.0, "If > 0: say whether the per-device total fits in this.")
flags.DEFINE_string("json", None, "Also write the report as JSON to this path.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS

GIB = 1024 ** 3


def use_cpu_devices(n: int) -> None:
    """Makes JAX start ``n`` fake CPU devices. Call before anything touches a backend."""
    try:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", int(n))
    except RuntimeError as e:
        raise RuntimeError(f"--devices={n}: a JAX backend was already started: {e}") from e


def tpu_devices(topology: str) -> list:
    """Compile-only devices of a TPU slice (``'v5e:16x16'``...), from libtpu on any host."""
    from jax.experimental import topologies
    jax.config.update("jax_platforms", "cpu")   # the host itself has no TPU: don't try to start one
    try:
        return list(topologies.get_topology_desc(topology, "tpu").devices)
    except Exception as e:  # noqa: BLE001 - missing libtpu and unknown names raise several types
        raise RuntimeError(f"--topology={topology!r}: could not describe this TPU slice (is libtpu "
                           f"installed? pip install 'jax[tpu]'): {e}") from e


CUDNN_CALLS = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward", "__cudnn$fmhaScaleBiasSoftmax",
               "__cudnn$fmhaScaleBiasSoftmaxBackward")
ASSUMED_CUDNN = 91000   # the cuDNN version assumed when lowering for GPU on a host without one


@contextlib.contextmanager
def _assume_cudnn():
    """``jax.nn.dot_product_attention(implementation='cudnn')`` reads the local cuDNN version
    while tracing; a host without one (CPU) lowers as if cuDNN 9.10 were there."""
    from jax._src.cudnn import fused_attention_stablehlo as fa
    if fa.cuda_versions is not None:
        yield
        return
    original = fa.check_cudnn_version
    fa.check_cudnn_version = lambda: ASSUMED_CUDNN
    try:
        yield
    finally:
        fa.check_cudnn_version = original


def lower_step(config, mesh, platform: str, export: bool = False):
    """The jitted train step of ``config`` built for ``platform`` and lowered for it, not
    compiled: returns ``(setup, StableHLO text)``. ``export=True`` goes through ``jax.export``
    (serialisable; on one device only where the program holds cuDNN attention, whose custom
    partitioning jax.export cannot serialise), otherwise ``Traced.lower(lowering_platforms=)``."""
    from maskfeat_jax import platform as platform_lib
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.platform = platform
    st = train.setup(config, mesh, steps_per_epoch=1, total_steps=max(config.total_steps, 1000))
    batch = train.abstract_batch(config, mesh, st.model)
    step = train.jit_step(st, mesh, batch)
    name = platform_lib.EXPORT_NAMES[platform]
    with jax.set_mesh(mesh), _assume_cudnn():
        if export:
            checks = [jax.export.DisabledSafetyCheck.custom_call(n) for n in CUDNN_CALLS]
            text = jax.export.export(step, platforms=[name], disabled_checks=checks)(
                st.abstract_state, batch, *st.frozen).mlir_module()
        else:
            text = step.trace(st.abstract_state, batch, *st.frozen).lower(lowering_platforms=(name,)).as_text()
    return st, text


def program_summary(mlir: str) -> dict:
    """What a lowered program holds: cuDNN attention calls, conditionals, scatters, and its
    dots by operand element types (e.g. ``{'bf16 x bf16': 120, 'f32 x f32': 4}``)."""
    dots = {}
    for a, b in re.findall(r"stablehlo\.dot_general.*?\(tensor<(?:[0-9?]+x)*(\w+)>, tensor<(?:[0-9?]+x)*(\w+)>\)", mlir):
        dots[f"{a} x {b}"] = dots.get(f"{a} x {b}", 0) + 1
    return {"cudnn_attention_calls": sum(mlir.count(f"@{n}") + mlir.count(f'"{n}"') for n in CUDNN_CALLS),
            # custom partitioning (cuDNN attention over a mesh of several devices), resolved at compile
            "partitioned_calls": mlir.count("@CustomSPMDPartitioning"),
            "conditionals": mlir.count("stablehlo.case"), "scatters": mlir.count("stablehlo.scatter"),
            "dots": dots}


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):   # older JAX: one dict per program
        cost = cost[0] if cost else {}
    return cost or {}


def _memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    if mem is None:
        return {"total_bytes": None}
    m = {f"{k}_bytes": int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "alias", "temp", "generated_code")}
    # The donated state is aliased to the output, so those bytes are counted once.
    m["total_bytes"] = (m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"] + m["temp_bytes"]
                        + m["generated_code_bytes"])
    return m


def _embedded_dataset(config) -> str:
    """The embedded dataset a dry run validates ``config`` against, of the same kind (clips with
    boxes, clips, or images) as its own."""
    if config.input.dataset in config_validate.AVA_DATASETS:
        return "ava_demo"
    return "video_demo" if config_validate.is_video(config) else "synthetic"


def run(config, devices=None) -> dict:
    """Compiles the train step of ``config`` on ``devices`` (default: all) and reports it.

    A compiler that refuses the program for lack of device memory (the TPU compiler
    does) gives a report with ``does_not_fit`` set to its message instead of raising."""
    devices = jax.devices() if devices is None else list(devices)
    checked = config.copy_and_resolve_references()
    # No data is read: check everything but the dataset's location, against an embedded dataset.
    checked.input.dataset = _embedded_dataset(config)
    config_lib.validate(checked, len(devices), 1)

    t0 = time.perf_counter()
    mesh = sharding.make_mesh(config.mesh, devices)
    gb, n = config.input.global_batch_size, len(devices)
    total_steps = config.total_steps if config.total_steps > 0 else 1000   # only shapes the lr schedule
    st = train.setup(config, mesh, steps_per_epoch=max(total_steps // 100, 1), total_steps=total_steps)
    batch = train.abstract_batch(config, mesh, st.model)
    report = {
        "devices": n, "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape),
        "program": train.describe_program(st.model, config, st.platform),
        "global_batch": gb, "batch_per_device": gb // n, "grad_accum_steps": config.optim.grad_accum_steps,
        "params_bytes_per_device": sharding.bytes_per_device(st.abstract_state.params),
        "opt_state_bytes_per_device": sharding.bytes_per_device(st.abstract_state.opt_state),
        "params_bytes_total": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(st.abstract_state.params)),
        "analytic_flops_per_device": perf.model_flops_per_image(st.model, config) * gb / n,
        "memory": {"total_bytes": None}, "flops_per_device": float("nan"), "does_not_fit": None,
        "seconds": {"setup": time.perf_counter() - t0},
    }

    step = train.jit_step(st, mesh, batch)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        lowered = step.lower(st.abstract_state, batch, *st.frozen)
        report["seconds"]["lower"] = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            compiled, report["does_not_fit"] = None, str(e).strip().splitlines()[0]
        report["seconds"].update(compile=time.perf_counter() - t0, compile_cpu=time.process_time() - c0)
    if compiled is not None:
        report["memory"] = _memory(compiled)
        report["flops_per_device"] = float(_cost(compiled).get("flops", float("nan")))
    return report


def format_report(r: dict, device_memory_gib: float = 0.0) -> str:
    mem, sec = r["memory"], r["seconds"]
    mib = lambda b: f"{b / 2 ** 20:,.1f} MiB"   # noqa: E731
    lines = [
        f"devices: {r['devices']} x {r['device_kind']}, mesh {r['mesh']}",
        f"{r['program']}; compiled for {r['device_kind']}",
        f"batch: global {r['global_batch']}, per device {r['batch_per_device']}"
        + (f", in {r['grad_accum_steps']} micro-batches" if r.get("grad_accum_steps", 1) > 1 else ""),
        f"parameters: {mib(r['params_bytes_total'])} in all; per device: params "
        f"{mib(r['params_bytes_per_device'])}, optimizer state {mib(r['opt_state_bytes_per_device'])}",
    ]
    if mem["total_bytes"] is not None:
        lines.append(
            f"compiled memory per device: arguments {mib(mem['argument_bytes'])}, outputs {mib(mem['output_bytes'])}"
            f" (aliased {mib(mem['alias_bytes'])}), temp {mib(mem['temp_bytes'])}, generated code "
            f"{mib(mem['generated_code_bytes'])}; total {mem['total_bytes'] / GIB:.2f} GiB")
    if r["does_not_fit"]:
        lines.append(f"DOES NOT FIT: the compiler refused the step: {r['does_not_fit']}")
    flops, k = r["flops_per_device"], r.get("grad_accum_steps", 1)
    loop = f" (the {k}-micro-batch loop body counted once)" if k > 1 else ""
    lines.append(f"FLOPs per device and step: compiler {'n/a' if flops != flops else f'{flops:.3e}'}{loop}, "
                 f"analytic {r['analytic_flops_per_device']:.3e}")
    lines.append(f"time: setup {sec['setup']:.1f}s, lower {sec['lower']:.1f}s, compile {sec['compile']:.1f}s "
                 f"({sec['compile_cpu']:.1f} CPU-s)")
    if device_memory_gib > 0 and mem["total_bytes"] is not None:
        fits = mem["total_bytes"] <= device_memory_gib * GIB
        lines.append(f"{'fits' if fits else 'DOES NOT FIT'} in {device_memory_gib:g} GiB per device")
    return "\n".join(lines)


def run_lowered(config, platform: str, devices=None) -> dict:
    """The step built for ``platform`` and lowered for it (``lower_step``), summarised."""
    devices = jax.devices() if devices is None else list(devices)
    checked = config.copy_and_resolve_references()
    checked.input.dataset = _embedded_dataset(config)
    config_lib.validate(checked, len(devices), 1)
    mesh = sharding.make_mesh(config.mesh, devices)
    t0 = time.perf_counter()
    st, text = lower_step(config, mesh, platform)
    return {"platform": platform, "devices": len(devices), "mesh": dict(mesh.shape),
            "program": train.describe_program(st.model, config, platform),
            "seconds": time.perf_counter() - t0, **program_summary(text)}


def format_export(r: dict) -> str:
    dots = ", ".join(f"{v} {k}" for k, v in sorted(r["dots"].items(), key=lambda kv: -kv[1]))
    return "\n".join([
        f"lowered for {r['platform']} over {r['devices']} devices, mesh {r['mesh']} "
        f"(not compiled: no {r['platform']} compiler here, so no memory figures)",
        r["program"],
        f"holds: {r['cudnn_attention_calls']} cuDNN attention calls, {r['partitioned_calls']} custom-partitioned "
        f"calls (cuDNN attention over the mesh), {r['conditionals']} conditionals, "
        f"{r['scatters']} scatters; dots by operand types: {dots}",
        f"time: {r['seconds']:.1f}s"])


def main(argv):
    del argv
    if FLAGS.devices and FLAGS.topology:
        raise app.UsageError("--devices and --topology exclude each other")
    if FLAGS.platform and FLAGS.topology:
        raise app.UsageError("--topology compiles for TPU already; --platform is for --devices or this host")
    if FLAGS.devices:
        use_cpu_devices(FLAGS.devices)
    devices = tpu_devices(FLAGS.topology) if FLAGS.topology else None
    if FLAGS.platform:
        try:
            report = run_lowered(FLAGS.config, FLAGS.platform)
        except ValueError as e:
            if not str(e).startswith("config."):
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(format_export(report), flush=True)
        if FLAGS.json:
            with open(FLAGS.json, "w") as f:
                json.dump(report, f, indent=1)
        return
    try:
        report = run(FLAGS.config, devices)
    except ValueError as e:   # config errors name their key
        if not str(e).startswith("config."):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_report(report, FLAGS.device_memory_gib), flush=True)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(report, f, indent=1)
    if report["does_not_fit"]:
        sys.exit(3)


if __name__ == "__main__":
    app.run(main, flags_parser=config_cli.flags_parser(FLAGS))
