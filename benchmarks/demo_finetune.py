"""MaskFeat initialisation vs random initialisation, at demo scale, on the embedded digits.

Pre-trains the demo ViT with MaskFeat (configs/demo.py), then fine-tunes it
(configs/demo_ft.py) from that checkpoint and from scratch with the same budget, for
several seeds, and prints held-out top-1 (mean and spread). Every run goes through
``python -m maskfeat_jax.main``, exactly as a user would run it.

    python benchmarks/demo_finetune.py --workdir=/tmp/maskfeat_demo_cmp [--seeds=0,1,2]

About 20-25 minutes on 2 CPU cores with the defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(args: list[str]) -> float:
    t = time.time()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-m", "maskfeat_jax.main", *args], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.time() - t


def final_eval(workdir: pathlib.Path) -> dict:
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return [r for r in rows if "eval/top1" in r][-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--pretrain_args", default="", help="extra --config overrides for pre-training")
    ap.add_argument("--finetune_args", default="", help="extra --config overrides for fine-tuning")
    a = ap.parse_args()
    wd = pathlib.Path(a.workdir)
    pt = wd / "pretrain"
    secs = run(["--config=configs/demo.py", f"--workdir={pt}", *a.pretrain_args.split()])  # resumes if done
    pt_rows = [json.loads(line) for line in open(pt / "metrics.jsonl")]
    losses = [r["train/loss"] for r in pt_rows if "train/loss" in r]
    probes = [r for r in pt_rows if "eval/knn_top1" in r]
    print(f"pre-training: {secs:.0f} s, train/loss {losses[0]:.4f} (first log) -> {losses[-1]:.4f} (last)"
          + (f", k-NN {probes[-1]['eval/knn_top1']:.3f}, linear probe {probes[-1]['eval/linear_probe_top1']:.3f}"
             if probes else ""), flush=True)
    results = {"maskfeat": [], "scratch": []}
    for seed in [int(s) for s in a.seeds.split(",")]:
        for init in results:
            out = wd / f"ft_{init}_{seed}"
            shutil.rmtree(out, ignore_errors=True)   # fine-tuning always starts fresh
            extra = [f"--config.init_from={pt}"] if init == "maskfeat" else []
            secs = run(["--config=configs/demo_ft.py", f"--workdir={out}", f"--config.seed={seed}", *extra,
                        *a.finetune_args.split()])
            ev = final_eval(out)
            results[init].append(ev["eval/top1"])
            print(f"fine-tune from {init:8s} seed {seed}: top-1 {ev['eval/top1']:.4f} "
                  f"top-5 {ev['eval/top5']:.4f} ({ev['eval/examples']:.0f} held-out images, {secs:.0f} s)",
                  flush=True)
    print("\n| initialisation | held-out top-1, mean +- std over seeds | runs |")
    print("|---|---|---|")
    for init, accs in results.items():
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {init} | {100 * statistics.mean(accs):.2f} +- {100 * std:.2f} % | "
              f"{', '.join(f'{100 * x:.1f}' for x in accs)} |")


if __name__ == "__main__":
    main()
