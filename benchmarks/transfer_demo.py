"""Transfer at demo scale: the video demo's MaskFeat checkpoint fine-tuned on the SSv2-like and
AVA-like demos, against the same fine-tuning from scratch.

Pre-trains MViTv2 ``mu`` once with MaskFeat on the embedded moving-digits clips
(``configs/demo_video.py``), then, for each seed, fine-tunes the SSv2-style recipe on the 4-class
motion-direction demo (``configs/mvit_ssv2.py:S,runlocal``, held-out top-1) and the AVA-style
detector on the boxes-around-moving-digits demo (``configs/mvit_ava.py:S,runlocal``, frame-mAP@0.5,
``eval/mAP``), each from that checkpoint (``--config.init_from``) and from scratch with the same
budget. Every run is the trainer's own (``python -m maskfeat_jax.main`` with the overrides printed
in each run's ``log.txt``), run in this process so that the runs share compiled programs (JAX's
persistent compilation cache in ``WORKDIR/jax_cache``). Prints the table (mean +- std over the
seeds, per-seed values) and writes it, with the commands and the wall time, to ``--table`` after
every seed, so a study cut short keeps the seeds it finished.

    python benchmarks/transfer_demo.py --workdir=/tmp/maskfeat_transfer [--seeds=0,1,2]

The defaults (192 pre-training steps, 16 epochs; 240 SSv2 steps, 8 epochs; 112 AVA steps, 16
epochs; 3 seeds) took 25 minutes on 2 CPU cores shared with other jobs (the first seed, which
compiles, about 9 minutes; the others 5-6). ``--pretrained=DIR`` fine-tunes from an earlier
run's ``WORKDIR/pretrain`` instead of pre-training again.

Compatibility with the checkpoint: the runlocal configs already use the pre-training's model and
clip (MViTv2 ``mu``, 8 frames of 64x64, mean/std 0.45/0.225); ``COMPAT`` states them again on
every fine-tuning command so that a change to either config cannot silently break the transfer
(``init_from`` would refuse a shape mismatch; the relative-position tables fit as they are). The
fine-tuning schedule is shortened with the run (``--finetune_steps``, warm-up 10% of it instead
of the recipes' 3 / 5 epochs, evaluation and checkpoint at the last step only); everything else is
the runlocal recipe (SSv2: SGD, mixup/cutmix, RandAugment, random erasing, drop path 0.4, no flip;
AVA: AdamW with layer decay, flip, box head with dropout).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import demo_finetune  # noqa: E402  (benchmarks/: config_of, run_in_process, last_row, mean_std)

ROOT = demo_finetune.ROOT
TABLE = ROOT / "benchmarks" / "figures" / "transfer_demo.md"
PRETRAIN_CONFIG = "configs/demo_video.py"
# the pre-training's model and clip, restated on every fine-tuning command (module doc)
COMPAT = ["--config.model.variant=mu", "--config.video.num_frames=8", "--config.input.image_size=64"]
# name: (table label, config, metric key, metric label, train steps per epoch at the runlocal batch of 8)
TASKS = {
    "ssv2": ("SSv2-like demo (4 motion directions)", "configs/mvit_ssv2.py:S,runlocal", "eval/top1",
             "top-1 %", 240 // 8),
    "ava": ("AVA-like demo (boxes around moving digits)", "configs/mvit_ava.py:S,runlocal", "eval/mAP",
            "mAP %", 56 // 8),
}
INITS = {"maskfeat": "MaskFeat (configs/demo_video.py)", "scratch": "random (from scratch)"}


def pretrain_args(steps: int, workdir: pathlib.Path, extra: list[str]) -> list[str]:
    """The video demo's pre-training (its own recipe), ``steps`` steps, one checkpoint at the end."""
    return [f"--config={PRETRAIN_CONFIG}", f"--workdir={workdir}", f"--config.total_steps={steps}",
            "--config.checkpoint.every_steps=1000000", "--config.log_every_steps=10", *extra]


def finetune_args(task: str, init_from: pathlib.Path | None, seed: int, steps: int, workdir: pathlib.Path,
                  extra: list[str]) -> list[str]:
    """A fine-tuning run of ``task``'s runlocal recipe: ``steps`` steps, warm-up 10% of them, the
    evaluation and checkpoint at the last step only, ``COMPAT``, and ``init_from`` when given."""
    _, config, _, _, steps_per_epoch = TASKS[task]
    init = [f"--config.init_from={init_from}"] if init_from else []
    return [f"--config={config}", f"--workdir={workdir}", f"--config.seed={seed}", f"--config.total_steps={steps}",
            f"--config.optim.warmup_epochs={0.1 * steps / steps_per_epoch:.4f}",
            "--config.evals.every_steps=1000000", "--config.checkpoint.every_steps=1000000",
            "--config.log_every_steps=10", *COMPAT, *init, *extra]


def command(args: list[str]) -> str:
    return shlex.join(["python", "-m", "maskfeat_jax.main", *args])


def table(results: dict[str, dict[str, list[float]]], seeds: list[int]) -> list[str]:
    """Markdown rows, one per task and initialisation: ``mean +- std`` over the seeds (in %) and
    each seed's value; ``results[task][init]`` holds the metric per seed, as fractions."""
    lines = [f"| task | initialisation | metric | mean +- std over {len(seeds)} seed(s) "
             f"| runs (seeds {', '.join(map(str, seeds))}) |", "|---|---|---|---|---|"]
    for task, by_init in results.items():
        label, _, _, metric, _ = TASKS[task]
        for init, xs in by_init.items():
            if xs:
                lines.append(f"| {label} | {INITS[init]} | {metric} | {demo_finetune.mean_std(xs, 100.0, 1)} "
                             f"| {', '.join(f'{100 * x:.1f}' for x in xs)} |")
    return lines


def write(path: str, text: list[str]) -> None:
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + "\n")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"some of {', '.join(TASKS)}")
    ap.add_argument("--pretrain_steps", type=int, default=192, help="16 epochs of the video demo (its own run: 96)")
    ap.add_argument("--ssv2_steps", type=int, default=240)
    ap.add_argument("--ava_steps", type=int, default=112)
    ap.add_argument("--pretrained", default="", help="an existing pre-training workdir to fine-tune from "
                    "instead of pre-training (WORKDIR/pretrain of an earlier run)")
    ap.add_argument("--pretrain_args", default="", help="extra --config overrides for pre-training")
    ap.add_argument("--finetune_args", default="", help="extra --config overrides for every fine-tuning run")
    ap.add_argument("--table", default=str(TABLE), help="markdown file the results are written to")
    ap.add_argument("--compilation_cache", default=True, action=argparse.BooleanOptionalAction,
                    help="share compiled programs between the runs through WORKDIR/jax_cache")
    a = ap.parse_args(argv)
    unknown = [t for t in a.tasks.split(",") if t not in TASKS]
    if unknown:
        ap.error(f"--tasks: unknown {', '.join(unknown)}; known: {', '.join(TASKS)}")
    return a


def main(argv: list[str] | None = None) -> list[str]:
    a = parse(argv)
    tasks, seeds = a.tasks.split(","), [int(s) for s in a.seeds.split(",")]
    steps = {"ssv2": a.ssv2_steps, "ava": a.ava_steps}
    start, load, wd = time.time(), os.getloadavg()[0], pathlib.Path(a.workdir)
    bench = shlex.join(["python", "benchmarks/transfer_demo.py", *(sys.argv[1:] if argv is None else argv)])
    if a.compilation_cache:   # one cache for all runs: the same programs compile once
        import jax
        jax.config.update("jax_compilation_cache_dir", str(wd / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if a.pretrained:
        pt = pathlib.Path(a.pretrained)
        summary, commands = f"pre-training: {pt} (not rerun)", []
    else:
        pt = wd / "pretrain"
        shutil.rmtree(pt, ignore_errors=True)
        pargs = pretrain_args(a.pretrain_steps, pt, a.pretrain_args.split())
        secs = demo_finetune.run_in_process(pargs, pt / "log.txt")
        summary, commands = demo_finetune.pretrain_summary(pt, secs), [command(pargs)]
    print(summary, flush=True)
    results = {t: {init: [] for init in INITS} for t in tasks}
    log, rows = [summary], []
    for i, seed in enumerate(seeds):
        for t in tasks:
            for init in INITS:
                out = wd / f"seed{seed}" / f"{t}_{init}"
                shutil.rmtree(out, ignore_errors=True)     # fine-tuning always starts fresh
                args = finetune_args(t, pt if init == "maskfeat" else None, seed, steps[t], out,
                                     a.finetune_args.split())
                if i == 0:
                    commands.append(command(args))
                secs = demo_finetune.run_in_process(args, out / "log.txt")
                ev = demo_finetune.last_row(out, TASKS[t][2])
                results[t][init].append(ev[TASKS[t][2]])
                loss = demo_finetune.last_row(out, "train/loss")["train/loss"]
                log.append(f"seed {seed} {t:4s} from {init:8s}: {TASKS[t][3]} {100 * ev[TASKS[t][2]]:5.1f} "
                           f"after {steps[t]} steps (last train/loss {loss:.4f}), {secs:4.0f} s")
                print(log[-1], flush=True)
        rows = table(results, seeds[:i + 1])     # written after every seed: a study cut short keeps its seeds
        note = "" if i + 1 == len(seeds) else f" (seeds {', '.join(map(str, seeds[:i + 1]))} of {a.seeds} done)"
        write(a.table, [f"`{bench}`", "", *rows, "", "Commands (first seed; the others change `--config.seed` "
                        "and the workdir):", "", "```", *commands, "```", "", "```", *log, "```", "",
                        f"Wall time {(time.time() - start) / 60:.1f} min{note} on {os.cpu_count()} CPU cores "
                        f"({time.strftime('%Y-%m-%d')}); load average {load:.1f} at the start, "
                        f"{os.getloadavg()[0]:.1f} at the end (other jobs included)."])
    print("\n" + "\n".join(rows) + f"\ntable written to {a.table}")
    return rows


if __name__ == "__main__":
    main()
