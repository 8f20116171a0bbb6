"""MaskFeat initialisation vs random initialisation, at demo scale, on the embedded digits.

Pre-trains the demo ViT with MaskFeat (configs/demo.py), then fine-tunes it
(configs/demo_ft.py) from that checkpoint and from scratch with the same budget, for
several seeds, and prints held-out top-1 (mean and spread). Every run goes through
``python -m maskfeat_jax.main``, exactly as a user would run it. The results are also
written as markdown (command, pre-training loss, per-seed runs, wall time) to ``--table``,
the file the README's comparison table is copied from.

    python benchmarks/demo_finetune.py --workdir=/tmp/maskfeat_demo_cmp [--seeds=0,1,2]

About 20-25 minutes on 2 CPU cores with the defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import shutil
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLE = ROOT / "benchmarks" / "figures" / "demo_finetune.md"
LABELS = {"maskfeat": "MaskFeat pre-training (configs/demo.py)", "scratch": "random"}


def run(args: list[str]) -> float:
    """``python -m maskfeat_jax.main ARGS`` in a subprocess, its console output dropped; seconds."""
    t = time.time()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-m", "maskfeat_jax.main", *args], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.time() - t


def config_of(args: list[str]):
    """The config that ``args`` (``--config=FILE`` and ``--config.KEY=VALUE``, as given to
    ``python -m maskfeat_jax.main``) give the command, parsed as it parses them."""
    from absl import flags
    from ml_collections import config_flags

    from maskfeat_jax import config_cli
    file = next(a.split("=", 1)[1] for a in args if a.startswith("--config="))
    argv = ["run", f"--config={config_cli.resolve_config_file(file)}", *[a for a in args if a.startswith("--config.")]]
    fv = flags.FlagValues()   # the overrides are read from sys_argv when the flag is defined
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def run_in_process(args: list[str], log: pathlib.Path) -> float:
    """The same run as ``run(ARGS)`` (``--config=FILE``, ``--workdir=DIR`` and ``--config.KEY=VALUE``
    overrides) in this process, its console output written to ``log`` (first line: the command);
    seconds. Saves the interpreter's start-up per run, and lets runs share compiled programs
    through JAX's persistent compilation cache where one is set."""
    import contextlib

    from absl import logging

    from maskfeat_jax import train
    t = time.time()
    config = config_of(args)
    workdir = next(a.split("=", 1)[1] for a in args if a.startswith("--workdir="))
    logging.set_verbosity(logging.WARNING)          # as the command: library INFO logs off
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f, contextlib.redirect_stdout(f):
        print(shlex.join(["python", "-m", "maskfeat_jax.main", *args]), flush=True)
        train.train_and_evaluate(config, workdir)
    return time.time() - t


def last_row(workdir: pathlib.Path, key: str) -> dict:
    """The last row of ``WORKDIR/metrics.jsonl`` that holds ``key``."""
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return [r for r in rows if key in r][-1]


def final_eval(workdir: pathlib.Path) -> dict:
    return last_row(workdir, "eval/top1")


def mean_std(xs: list[float], scale: float = 100.0, digits: int = 2) -> str:
    """``"mean +- std"`` of ``xs`` times ``scale`` (sample std; 0 for one value)."""
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{scale * statistics.mean(xs):.{digits}f} +- {scale * std:.{digits}f}"


def pretrain_summary(pt: pathlib.Path, secs: float) -> str:
    """One line on the pre-training run: time, first and last logged loss, last frozen-feature probes."""
    rows = [json.loads(line) for line in open(pt / "metrics.jsonl")]
    losses = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    probes = [r for r in rows if "eval/knn_top1" in r]
    line = (f"pre-training: {secs:.0f} s, train/loss {losses[0][1]:.4f} (step {losses[0][0]}) -> "
            f"{losses[-1][1]:.4f} (step {losses[-1][0]})")
    if probes:
        line += (f", k-NN {100 * probes[-1]['eval/knn_top1']:.1f} %, "
                 f"linear probe {100 * probes[-1]['eval/linear_probe_top1']:.1f} %")
    return line


def table(results: dict[str, list[float]], seeds: list[int]) -> list[str]:
    lines = [f"| initialisation | held-out top-1, mean +- std over {len(seeds)} seeds "
             f"| runs (seeds {', '.join(map(str, seeds))}) |", "|---|---|---|"]
    for init, accs in results.items():
        lines.append(f"| {LABELS[init]} | {mean_std(accs)} % | {', '.join(f'{100 * x:.1f}' for x in accs)} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--pretrain_args", default="", help="extra --config overrides for pre-training")
    ap.add_argument("--finetune_args", default="", help="extra --config overrides for fine-tuning")
    ap.add_argument("--table", default=str(TABLE), help="markdown file the results are written to")
    a = ap.parse_args()
    start = time.time()
    wd = pathlib.Path(a.workdir)
    pt = wd / "pretrain"
    secs = run(["--config=configs/demo.py", f"--workdir={pt}", *a.pretrain_args.split()])  # resumes if done
    summary = pretrain_summary(pt, secs)
    print(summary, flush=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    results = {"maskfeat": [], "scratch": []}
    runs = []
    for seed in seeds:
        for init in results:
            out = wd / f"ft_{init}_{seed}"
            shutil.rmtree(out, ignore_errors=True)   # fine-tuning always starts fresh
            extra = [f"--config.init_from={pt}"] if init == "maskfeat" else []
            secs = run(["--config=configs/demo_ft.py", f"--workdir={out}", f"--config.seed={seed}", *extra,
                        *a.finetune_args.split()])
            ev = final_eval(out)
            results[init].append(ev["eval/top1"])
            runs.append(f"fine-tune from {init:8s} seed {seed}: top-1 {ev['eval/top1']:.4f} "
                        f"top-5 {ev['eval/top5']:.4f} ({ev['eval/examples']:.0f} held-out images, {secs:.0f} s)")
            print(runs[-1], flush=True)
    rows = table(results, seeds)
    print("\n" + "\n".join(rows))
    command = shlex.join(["python", "benchmarks/demo_finetune.py", *sys.argv[1:]])
    text = [f"`{command}`", "", *rows, "", "```", summary, *runs, "```", "",
            f"Wall time {(time.time() - start) / 60:.1f} min on {os.cpu_count()} CPU cores "
            f"({time.strftime('%Y-%m-%d')})."]
    out = pathlib.Path(a.table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + "\n")
    print(f"table written to {out}")


if __name__ == "__main__":
    main()
