"""Pre-training targets compared at demo scale on the embedded digits.

For each seed, pre-trains the demo ViT (configs/demo.py) once per target setting (HOG; HOG
without local normalisation; pixels; pixels with norm_pix; HOG + pixels; MAE with HOG), reads
the k-NN and linear probe of the frozen encoder that the trainer runs at the last step
(``config.evals.probe``), and fine-tunes each (configs/demo_ft.py, without RandAugment and drop
path for the short schedule: ``SHORT_FINETUNE``); the baseline row is a
randomly initialised encoder: its probes and fine-tuning from scratch. Every run is the trainer's
own (``python -m maskfeat_jax.main`` with the overrides printed in each run's ``log.txt``), run in
this process so that the runs share compiled programs (JAX's persistent compilation cache in
``WORKDIR/jax_cache``). Prints the table (mean +- std over the seeds) and writes it, with the
per-run lines and the wall time, to ``--table``.

    python benchmarks/target_study.py --workdir=/tmp/maskfeat_targets [--seeds=0,1,2]

The defaults (80 pre-training steps, 3.6 epochs; 140 fine-tuning steps, 6.4 epochs; 3 seeds)
took 28 minutes on 2 CPU cores shared with other jobs (8-12 minutes a seed, the first compiling
the most); the demo's own budget (880 and 330 steps) is ``--pretrain_steps=880
--finetune_steps=330``, about an hour and a half. ``end loss / mean`` is the last logged
pre-training loss over the loss of predicting the mean target on the same masked tokens
(``maskfeat_jax.curves``, first seed, 10 batches): each target's loss on its own scale, 1.0
meaning no better than the average target.
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
TABLE = ROOT / "benchmarks" / "figures" / "target_study.md"
MAE_DECODER = ["--config.mae.decoder_dim=128", "--config.mae.decoder_depth=2", "--config.mae.decoder_heads=4"]
# name: (table label, pre-training overrides on configs/demo.py)
VARIANTS = {
    "hog": ("HOG (configs/demo.py)", []),
    "hog_raw": ("HOG, no local normalisation", ["--config.hog.normalize=False"]),
    "pixel": ("pixels", ["--config.target.hog=0.0", "--config.target.pixel=1.0", "--config.target.norm_pix=False"]),
    "pixel_norm": ("pixels, norm_pix", ["--config.target.hog=0.0", "--config.target.pixel=1.0"]),
    "hog_pixel": ("HOG + 0.1 x pixels (norm_pix)", ["--config.target.pixel=0.1"]),
    "mae_hog": ("MAE (75% random mask, 2-block decoder), HOG", ["--config.mae.enabled=True", *MAE_DECODER]),
}
SCRATCH = "none (random initialisation)"
COLUMNS = (("knn", "k-NN top-1 %"), ("linear", "linear probe top-1 %"), ("finetune", "fine-tuned top-1 %"),
           ("loss_ratio", "end loss / mean"))
BASELINE_BATCHES = 10
# fine-tuning a few epochs: without RandAugment and drop path, which slow the first epochs (from
# one HOG checkpoint, 100 steps: 41% top-1 without, 19% at 80 steps with them)
SHORT_FINETUNE = ["--config.augment.randaug_ops=0", "--config.model.drop_path=0.0"]


def pretrain_args(variant: str, seed: int, steps: int, workdir: pathlib.Path, extra: list[str]) -> list[str]:
    """The pre-training run: the probe and the checkpoint at the last step only, warm-up 10% of it."""
    return ["--config=configs/demo.py", f"--workdir={workdir}", f"--config.seed={seed}",
            f"--config.total_steps={steps}", f"--config.optim.warmup_epochs={0.1 * steps / 22:.4f}",
            "--config.evals.every_steps=1000000", "--config.evals.figures_every_steps=0",
            "--config.checkpoint.every_steps=1000000", "--config.log_every_steps=10",
            *VARIANTS[variant][1], *extra]


def finetune_args(init_from: pathlib.Path | None, seed: int, steps: int, workdir: pathlib.Path,
                  extra: list[str]) -> list[str]:
    """The fine-tuning run (configs/demo_ft.py): top-1 at the last step, warm-up 10% of it, and
    ``SHORT_FINETUNE``."""
    init = [f"--config.init_from={init_from}"] if init_from else []
    return ["--config=configs/demo_ft.py", f"--workdir={workdir}", f"--config.seed={seed}",
            f"--config.total_steps={steps}", f"--config.optim.warmup_epochs={0.1 * steps / 22:.4f}",
            "--config.evals.every_steps=1000000", "--config.checkpoint.every_steps=1000000",
            "--config.log_every_steps=10", *SHORT_FINETUNE, *init, *extra]


def random_encoder_probe(args: list[str], seed: int) -> dict:
    """k-NN and linear probe (``probe.evaluate``) of the encoder as ``args``' run initialises it."""
    import jax
    from flax import nnx

    from maskfeat_jax import models
    from maskfeat_jax.evaluators import probe
    config = demo_finetune.config_of(args)
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(models.build(config, nnx.Rngs(seed)))
    with jax.set_mesh(None):
        return probe.evaluate(config, graphdef, nnx.to_pure_dict(state))


def loss_ratio(pretrain_dir: pathlib.Path, args: list[str]) -> float:
    """The mean of the last three logged ``train/loss`` values over the predict-the-mean loss."""
    import json

    from maskfeat_jax import curves
    rows = [json.loads(line) for line in open(pretrain_dir / "metrics.jsonl")]
    losses = [r["train/loss"] for r in rows if "train/loss" in r][-3:]
    config = demo_finetune.config_of(args)
    base = curves.mean_target_baselines(config, "train/loss", curves.masked_targets(config, BASELINE_BATCHES))
    return sum(losses) / len(losses) / base["mean target"]


def table(results: dict[str, dict[str, list[float]]], seeds: list[int]) -> list[str]:
    """Markdown rows: one per pre-training setting, ``mean +- std`` over the seeds for each of
    ``COLUMNS`` (``-`` where a row has no value, a bare value where it has one run)."""
    head = [f"| pre-training target | {' | '.join(label for _, label in COLUMNS)} |",
            "|---|" + "---|" * len(COLUMNS)]
    lines = []
    for label, cols in results.items():
        cells = []
        for key, _ in COLUMNS:
            xs = cols.get(key, [])
            if key == "loss_ratio":
                cells.append(f"{xs[0]:.3f}" if len(xs) == 1 else demo_finetune.mean_std(xs, 1.0, 3) if xs else "-")
            else:
                cells.append(demo_finetune.mean_std(xs, 100.0, 1) if xs else "-")
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return head + lines + ["", f"mean +- std over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); "
                           f"`end loss / mean`: seed {seeds[0]}."]


def run_variant(v: str, seed: int, a, wd: pathlib.Path, ratio: bool) -> tuple[dict, str]:
    """Pre-trains ``v`` with ``seed``, fine-tunes from it: ``({column: value}, a log line)``."""
    pt, ft = wd / f"seed{seed}" / f"pt_{v}", wd / f"seed{seed}" / f"ft_{v}"
    shutil.rmtree(pt, ignore_errors=True)
    shutil.rmtree(ft, ignore_errors=True)
    pargs = pretrain_args(v, seed, a.pretrain_steps, pt, a.pretrain_args.split())
    pt_secs = demo_finetune.run_in_process(pargs, pt / "log.txt")
    probe = demo_finetune.last_row(pt, "eval/knn_top1")
    ft_secs = demo_finetune.run_in_process(finetune_args(pt, seed, a.finetune_steps, ft, a.finetune_args.split()),
                                           ft / "log.txt")
    out = {"knn": probe["eval/knn_top1"], "linear": probe["eval/linear_probe_top1"],
           "finetune": demo_finetune.final_eval(ft)["eval/top1"]}
    if ratio:
        out["loss_ratio"] = loss_ratio(pt, pargs)
    return out, (f"seed {seed} {v:10s}: pre-training {pt_secs:4.0f} s, k-NN {100 * out['knn']:.1f} %, linear probe "
                 f"{100 * out['linear']:.1f} %; fine-tuning {ft_secs:4.0f} s, top-1 {100 * out['finetune']:.1f} %")


def run_scratch(seed: int, a, wd: pathlib.Path) -> tuple[dict, str]:
    """Probes of the encoder as pre-training initialises it, fine-tuning from scratch."""
    t = time.time()
    probe = random_encoder_probe(pretrain_args("hog", seed, a.pretrain_steps, wd, a.pretrain_args.split()), seed)
    probe_secs = time.time() - t
    ft = wd / f"seed{seed}" / "ft_scratch"
    shutil.rmtree(ft, ignore_errors=True)
    secs = demo_finetune.run_in_process(finetune_args(None, seed, a.finetune_steps, ft, a.finetune_args.split()),
                                        ft / "log.txt")
    out = {"knn": probe["eval/knn_top1"], "linear": probe["eval/linear_probe_top1"],
           "finetune": demo_finetune.final_eval(ft)["eval/top1"]}
    return out, (f"seed {seed} {'scratch':10s}: probes of the initial encoder {probe_secs:4.0f} s, k-NN "
                 f"{100 * out['knn']:.1f} %, linear probe {100 * out['linear']:.1f} %; fine-tuning {secs:4.0f} s, "
                 f"top-1 {100 * out['finetune']:.1f} %")


def write(path: str, rows: list[str], log: list[str], command: str, minutes: float, note: str, load: float) -> None:
    text = [f"`{command}`", "", *rows, "", "```", *log, "```", "",
            f"Wall time {minutes:.1f} min{note} on {os.cpu_count()} CPU cores ({time.strftime('%Y-%m-%d')}); "
            f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other jobs included)."]
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + "\n")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    ap.add_argument("--pretrain_steps", type=int, default=80)
    ap.add_argument("--finetune_steps", type=int, default=140)
    ap.add_argument("--scratch", default=True, action=argparse.BooleanOptionalAction,
                    help="the random-initialisation row (probes of the initial encoder, fine-tuning from scratch)")
    ap.add_argument("--pretrain_args", default="", help="extra --config overrides for every pre-training run")
    ap.add_argument("--finetune_args", default="", help="extra --config overrides for every fine-tuning run")
    ap.add_argument("--table", default=str(TABLE), help="markdown file the results are written to")
    ap.add_argument("--compilation_cache", default=True, action=argparse.BooleanOptionalAction,
                    help="share compiled programs between the runs through WORKDIR/jax_cache")
    a = ap.parse_args(argv)
    unknown = [v for v in a.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    return a


def main(argv: list[str] | None = None) -> list[str]:
    a = parse(argv)
    variants, seeds = a.variants.split(","), [int(s) for s in a.seeds.split(",")]
    start, load, wd = time.time(), os.getloadavg()[0], pathlib.Path(a.workdir)
    command = shlex.join(["python", "benchmarks/target_study.py", *(sys.argv[1:] if argv is None else argv)])
    if a.compilation_cache:   # one cache for all runs: the same programs compile once
        import jax
        jax.config.update("jax_compilation_cache_dir", str(wd / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    results = {VARIANTS[v][0]: {} for v in variants} | ({SCRATCH: {}} if a.scratch else {})
    log, rows = [], []
    for i, seed in enumerate(seeds):
        runs = [(VARIANTS[v][0], lambda v=v: run_variant(v, seed, a, wd, ratio=i == 0)) for v in variants]
        runs += [(SCRATCH, lambda: run_scratch(seed, a, wd))] if a.scratch else []
        for label, fn in runs:
            out, line = fn()
            for key, value in out.items():
                results[label].setdefault(key, []).append(value)
            log.append(line)
            print(line, flush=True)
        rows = table(results, seeds[:i + 1])     # written after every seed: a study cut short keeps its seeds
        note = "" if i + 1 == len(seeds) else f" (seeds {', '.join(map(str, seeds[:i + 1]))} of {a.seeds} done)"
        write(a.table, rows, log, command, (time.time() - start) / 60, note, load)
    print("\n" + "\n".join(rows) + f"\ntable written to {a.table}")
    return rows


if __name__ == "__main__":
    main()
