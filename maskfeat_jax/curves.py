"""Training curves from ``WORKDIR/metrics.jsonl`` as a PNG (Pillow only, no plotting library).

    python -m maskfeat_jax.curves --workdir=DIR [--key=train/loss] [--out=DIR/train_loss.png]
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


def plot(steps, values, *, title: str = "", ylabel: str = "", size=(640, 360),
         margin=(72, 20, 20, 40)) -> Image.Image:
    """A line chart with labelled axes (``ylabel`` written upwards along the y axis) and a grid
    at the ticks. ``margin`` is (left, top, right, bottom)."""
    w, h = size
    left, top, right, bottom = margin
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, x1 = float(steps.min()), float(max(steps.max(), steps.min() + 1))
    y0, y1 = float(values.min()), float(values.max())
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
    d.text((left + 8, top + 4), title, fill="black", font=font)
    d.text(((w - left) // 2 + left - 12, h - 16), "step", fill="black", font=font)
    if ylabel:
        label = Image.new("RGB", (int(d.textlength(ylabel, font=font)) + 2, 12), "white")
        ImageDraw.Draw(label).text((1, 0), ylabel, fill="black", font=font)
        label = label.rotate(90, expand=True)
        img.paste(label, (2, max(top, (h - bottom + top - label.height) // 2)))
    return img


def _define_flags(flag_values):
    flags.DEFINE_string("workdir", None, "A training workdir (holding metrics.jsonl).", flag_values=flag_values)
    flags.DEFINE_string("key", "train/loss", "Metric key in metrics.jsonl: the metric to plot against the step.", flag_values=flag_values)
    flags.DEFINE_string("out", None, "The image to write (default: WORKDIR/<key with _ for />.png).",
                        flag_values=flag_values)
    flags.mark_flags_as_required(["workdir"], flag_values=flag_values)
    return flag_values


def main(argv: Sequence[str]) -> str:
    """``python -m maskfeat_jax.curves``: the chart of one metric, its path printed and returned.
    Under ``app.run`` ``argv`` is the program name; a list of flags (``main(["--workdir=DIR"])``)
    is parsed into flags of its own, leaving absl's global flags alone."""
    fv = flags.FLAGS
    if argv and argv[0].startswith("--"):
        fv = _define_flags(flags.FlagValues())
        fv(["curves", *argv])
    out = storage.path(fv.out) if fv.out else storage.path(fv.workdir) / (fv.key.replace("/", "_") + ".png")
    try:
        steps, values = read(fv.workdir, fv.key)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    with out.open("wb") as f:
        fmt = Image.registered_extensions().get(out.suffix.lower(), "PNG")
        plot(steps, values, title=f"{fv.key} ({storage.path(fv.workdir).name})", ylabel=fv.key).save(f, format=fmt)
    print(out)
    return str(out)


if __name__ == "__main__":
    from absl import app

    from maskfeat_jax import config as config_lib
    # app.run exits with main's return value: the path is printed, the status is 0
    app.run(lambda argv: main(argv) and None, flags_parser=config_lib.flags_parser(_define_flags(flags.FLAGS)))
