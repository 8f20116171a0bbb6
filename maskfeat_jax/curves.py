"""Training curves from ``WORKDIR/metrics.jsonl`` as a PNG (Pillow only, no plotting library).

    python -m maskfeat_jax.curves --workdir=DIR [--key=train/loss] [--out=DIR/train_loss.png]

A pre-training loss (``train/loss``, ``train/loss_<target>``) is drawn with the loss of
predicting the mean target: the masked-token MSE that a model outputting one constant vector,
the per-dimension mean of the targets over the masked tokens, would get on the same batches,
masks and targets as the run's first ``--baseline_batches`` steps (read from the data with
the config saved in WORKDIR's checkpoints), and the same with one mean vector per token
position. The gap between the curve and these lines is what the model predicts beyond the
average target.
"""
from __future__ import annotations

import json
import math
import sys
from typing import Sequence

import numpy as np
from absl import flags
from PIL import Image, ImageDraw, ImageFont

from maskfeat_jax import storage

BASELINE_STYLES = {"mean target": (255, 127, 14), "mean target per position": (44, 160, 44)}


def read(workdir: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of ``key`` in ``WORKDIR/metrics.jsonl``; a missing file or key is a
    ``ValueError`` that names it (and the numeric keys there are)."""
    metrics = storage.path(workdir) / "metrics.jsonl"
    if not metrics.exists():
        raise ValueError(f"--workdir={workdir}: no metrics.jsonl there (is it a training workdir?)")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    pts = sorted({r["step"]: r[key] for r in rows if key in r and math.isfinite(r[key])}.items())
    if not pts:
        keys = sorted({k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
        raise ValueError(f"--key={key}: not in {workdir}/metrics.jsonl; its keys: {', '.join(keys)}")
    steps, values = zip(*pts)
    return np.asarray(steps, float), np.asarray(values, float)


class MeanTarget:
    """Running statistics of target vectors on the tokens of weight 1, per token position, in
    float64: count, mean and sum of squared deviations from it (Chan et al.'s pairwise update,
    one batch at a time). ``loss()`` is the masked-token MSE of predicting the mean vector."""

    def __init__(self):
        self.count_Nx1 = self.mean_NxK = self.m2_NxK = None

    def add(self, targets_BxNxK, weight_BxN) -> None:
        t = np.asarray(targets_BxNxK, np.float64)
        w = np.asarray(weight_BxN, bool)[..., None]
        count = w.sum(0).astype(np.float64)                                   # (N, 1)
        mean = np.where(w, t, 0.0).sum(0) / np.maximum(count, 1.0)
        m2 = np.where(w, (t - mean) ** 2, 0.0).sum(0)
        if self.count_Nx1 is None:
            self.count_Nx1, self.mean_NxK, self.m2_NxK = count, mean, m2
            return
        total = self.count_Nx1 + count
        frac = np.divide(count, total, out=np.zeros_like(total), where=total > 0)
        delta = mean - self.mean_NxK
        self.m2_NxK = self.m2_NxK + m2 + delta ** 2 * self.count_Nx1 * frac
        self.mean_NxK = self.mean_NxK + delta * frac
        self.count_Nx1 = total

    def loss(self, per_position: bool = False) -> float:
        """The mean over masked tokens of ``mean_k (t_k - mu_k) ** 2``, ``mu`` the per-dimension
        mean over all masked tokens or, ``per_position``, over those at the token's position."""
        total = 0.0 if self.count_Nx1 is None else float(self.count_Nx1.sum())
        if total == 0:
            raise ValueError("no masked tokens to average")
        m2 = self.m2_NxK.sum(0)
        if not per_position:      # the positions' deviations from the pooled mean
            pooled = (self.count_Nx1 * self.mean_NxK).sum(0) / total
            m2 = m2 + (self.count_Nx1 * (self.mean_NxK - pooled) ** 2).sum(0)
        return float(m2.sum() / (total * m2.size))


def masked_targets(config, num_batches: int):
    """Yields ``({target name: (B, N, K) float32}, weight_BxN)`` for the first ``num_batches``
    global batches of ``config``'s training stream, as the pre-training step of steps 0, 1, ...
    sees them: the targets of ``config.target`` from the normalised images (a frozen teacher's
    with ``targets.load_frozen``'s input), weight 1 on the masked tokens of valid examples (the
    batch's block mask, or MAE's random mask drawn from the step's key)."""
    import jax

    from maskfeat_jax import steps
    from maskfeat_jax import targets as targets_lib
    from maskfeat_jax.data import pipeline, sources
    from maskfeat_jax.models import mae

    enc, active, mae_on = _targets(config)
    mean, std = config.input.mean, config.input.std
    draw_mask = mae.masker(config) if mae_on else None
    frozen = targets_lib.load_frozen(config) if any(t.frozen for t in active) else None

    @jax.jit
    def compute(images_u8, mask_BxN, valid_B, k, frozen):
        images = steps.normalize(images_u8, mean, std)
        targets = {t.name: t.fn(images, frozen[t.name]) if t.frozen else t.fn(images) for t in active}
        if mae_on:   # steps.make_pretrain_step's draw at step k
            k_mask, _ = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), k))
            mask_BxN = draw_mask(k_mask, images_u8.shape[0])[1]
        return targets, mask_BxN & valid_B[:, None]

    source = sources.make(config, config.input.train_split)
    grid = enc.mask_grid if config.model.name == "mvit" else enc.grid
    it = iter(pipeline.train_dataset(config, source, grid, process_index=0, process_count=1))
    try:
        for k in range(num_batches):
            batch = next(it)
            yield jax.device_get(compute(batch["image"], batch["mask"], batch["valid"], k, frozen))
    finally:
        getattr(it, "close", lambda: None)()


def _targets(config):
    """(the abstract encoder, ``targets.active`` as the step builds it, MAE on or off)."""
    from maskfeat_jax import models, targets as targets_lib
    enc = models.build_abstract(config).encoder
    return enc, targets_lib.active(config, enc.patch, models.temporal_stride(config)), models.mae_enabled(config)


def mean_target_baselines(config, key: str, batches) -> dict[str, float]:
    """``{"mean target": loss, "mean target per position": loss}`` for the pre-training loss
    ``key`` (``train/loss``: the targets' losses summed with their weights, as the step sums
    them; ``train/loss_<name>``: that target's) over ``batches``, ``masked_targets``' output;
    ``{}`` for any other key or a fine-tuning config."""
    if config.task != "pretrain" or not (key == "train/loss" or key.startswith("train/loss_")):
        return {}
    stats: dict[str, MeanTarget] = {}
    for targets, weight_BxN in batches:
        for name, t in targets.items():
            stats.setdefault(name, MeanTarget()).add(t, weight_BxN)
    from maskfeat_jax import models
    heads = len(models.head_depths(config))     # several heads: each predicts every target, losses summed
    weights = {t.name: t.weight for t in _targets(config)[1]}
    names = list(stats) if key == "train/loss" else [key[len("train/loss_"):]]
    if any(name not in stats for name in names):
        return {}
    scale = {name: heads * (weights[name] if key == "train/loss" else 1.0) for name in names}
    return {label: sum(scale[name] * stats[name].loss(per_position=per) for name in names)
            for label, per in (("mean target", False), ("mean target per position", True))}


def plot(steps, values, *, title: str = "", ylabel: str = "", size=(640, 360),
         margin=(72, 20, 20, 40), baselines: dict[str, float] | None = None) -> Image.Image:
    """A line chart with labelled axes (``ylabel`` written upwards along the y axis) and a grid
    at the ticks. ``margin`` is (left, top, right, bottom). ``baselines``: ``{label: value}``
    drawn as dashed horizontal lines (colours ``BASELINE_STYLES``) with a legend."""
    baselines = baselines or {}
    w, h = size
    left, top, right, bottom = margin
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, x1 = float(steps.min()), float(max(steps.max(), steps.min() + 1))
    y0, y1 = float(min([values.min(), *baselines.values()])), float(max([values.max(), *baselines.values()]))
    pad = (y1 - y0) * 0.05 or abs(y1) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    px = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)      # noqa: E731
    py = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        d.line([left, py(yv), w - right, py(yv)], fill=(225, 225, 225))
        d.line([left - 4, py(yv), left, py(yv)], fill="black")
        d.text((18, py(yv) - 6), f"{yv:.4g}", fill="black", font=font)
        xv = x0 + (x1 - x0) * i / 4
        d.line([px(xv), top, px(xv), h - bottom], fill=(225, 225, 225))
        d.line([px(xv), h - bottom, px(xv), h - bottom + 4], fill="black")
        d.text((px(xv) - 10, h - bottom + 8), f"{xv:.0f}", fill="black", font=font)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    d.line([(px(x), py(y)) for x, y in zip(steps, values)], fill=(31, 119, 180), width=2)
    for i, (label, yv) in enumerate(baselines.items()):
        colour = BASELINE_STYLES.get(label, (127, 127, 127))
        for xa in range(left, w - right, 10):                             # dashes of 6 px
            d.line([xa, py(yv), min(xa + 6, w - right), py(yv)], fill=colour, width=2)
        text = f"predict the {label}: {yv:.4g}"
        tx, ty = w - right - 28 - d.textlength(text, font=font), top + 4 + 14 * i
        d.line([tx - 24, ty + 6, tx - 6, ty + 6], fill=colour, width=2)
        d.text((tx, ty), text, fill="black", font=font)
    d.text((left + 8, top + 4), title, fill="black", font=font)
    d.text(((w - left) // 2 + left - 12, h - 16), "step", fill="black", font=font)
    if ylabel:
        label = Image.new("RGB", (int(d.textlength(ylabel, font=font)) + 2, 12), "white")
        ImageDraw.Draw(label).text((1, 0), ylabel, fill="black", font=font)
        label = label.rotate(90, expand=True)
        img.paste(label, (2, max(top, (h - bottom + top - label.height) // 2)))
    return img


def _baselines(workdir: str, key: str, num_batches: int) -> dict[str, float]:
    """``mean_target_baselines`` with the config saved in ``workdir``; ``{}``, with a note on
    stderr, where a pre-training loss has no saved config to read the data with."""
    if num_batches <= 0 or not (key == "train/loss" or key.startswith("train/loss_")):
        return {}
    if not (storage.path(workdir) / "checkpoints").is_dir():
        print(f"note: the mean-target baseline is not drawn: no checkpoints in {workdir} to read the config from",
              file=sys.stderr)
        return {}
    from absl import logging

    from maskfeat_jax import saved as saved_lib
    logging.set_verbosity(logging.WARNING)      # Orbax's per-item INFO logs off, as in the other tools
    try:
        directory, step = saved_lib.resolve(workdir)
        config = saved_lib.saved_config(f"{directory}/{step}")
    except ValueError as e:
        print(f"note: the mean-target baseline is not drawn: {e}", file=sys.stderr)
        return {}
    return mean_target_baselines(config, key, masked_targets(config, num_batches))


def _define_flags(flag_values):
    flags.DEFINE_string("workdir", None, "A training workdir (holding metrics.jsonl).", flag_values=flag_values)
    flags.DEFINE_string("key", "train/loss", "Metric key in metrics.jsonl: the metric to plot against the step.", flag_values=flag_values)
    flags.DEFINE_string("out", None, "The image to write (default: WORKDIR/<key with _ for />.png).",
                        flag_values=flag_values)
    flags.DEFINE_integer("baseline_batches", 20, "A pre-training loss is drawn with the loss of predicting the "
                         "mean target, over the training stream's first this many batches (0: not drawn).",
                         flag_values=flag_values)
    flags.mark_flags_as_required(["workdir"], flag_values=flag_values)
    return flag_values


def main(argv: Sequence[str]) -> str:
    """``python -m maskfeat_jax.curves``: the chart of one metric, its path printed and returned.
    Under ``app.run`` ``argv`` is the program name; a list of flags (``main(["--workdir=DIR"])``)
    is parsed into flags of its own, leaving absl's global flags alone."""
    from maskfeat_jax import config_cli
    fv = config_cli.command_flags(_define_flags, argv, "curves")
    out = storage.path(fv.out) if fv.out else storage.path(fv.workdir) / (fv.key.replace("/", "_") + ".png")
    try:
        steps, values = read(fv.workdir, fv.key)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    baselines = _baselines(fv.workdir, fv.key, fv.baseline_batches)
    with out.open("wb") as f:
        fmt = Image.registered_extensions().get(out.suffix.lower(), "PNG")
        plot(steps, values, title=f"{fv.key} ({storage.path(fv.workdir).name})", ylabel=fv.key,
             baselines=baselines).save(f, format=fmt)
    print(out)
    return str(out)


if __name__ == "__main__":
    from maskfeat_jax import config_cli
    config_cli.run(main, _define_flags, exit_code=False)
