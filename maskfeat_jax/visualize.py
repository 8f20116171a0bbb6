"""HOG pictures of MaskFeat targets and predictions (numpy + Pillow only).

* :func:`render_hog`: the classic HOG picture of a ``(H, W, nbins)`` cell map: in every
  cell, one line segment per orientation bin through the cell centre, drawn along the
  *edge* direction of that bin (perpendicular to the gradient), brightness proportional
  to the bin value.
* :func:`tokens_to_cells`: per-token targets/predictions ``(B, N, K)`` back to a cell map.
* :func:`figure`: input | input with masked patches greyed | target HOG | prediction
  (visible patches show the target, masked ones the prediction, as in the paper);
  :func:`titled` writes each panel's title above it.
* :func:`make_figures` / :func:`write_to_tensorboard`: figures for a params tree (the
  trainer can call these), and the command below for a saved checkpoint::

      python -m maskfeat_jax.visualize --workdir=DIR [--step=N] [--num_images=4] [--out=DIR/figures]

Orientation convention (spec section 1): ``bin = floor(atan2(gx, gy) / pi * nbins) mod nbins``
with ``gx = -Dx``, ``gy = -Dy`` (ordinary Sobel derivatives, y pointing down). Bin k is
centred on the conventional gradient angle ``phi_k = 90° - (k + 1/2)·180°/nbins``
(``(4 - k)·20°`` for 9 bins); the edge is perpendicular, so with y pointing *up* the glyph
of bin k makes the angle ``(k + 1/2)·180°/nbins`` with the x axis counter-clockwise
(bin 0: 10°, nearly horizontal; bin 4: 90°, vertical). A horizontal ramp ``I = x``
(gradient horizontal, bin 4) therefore draws vertical lines, ``I = y`` (bin 0) nearly
horizontal ones, ``I = x + y`` (bin 2, 50°) rising lines "/" and ``I = x - y`` (bin 6,
130°) falling lines "\\": every glyph runs along the level lines of the image.
"""
from __future__ import annotations

import math
import sys
import warnings
from typing import Sequence

import numpy as np
from absl import flags
from PIL import Image, ImageDraw, ImageFont

__all__ = ["glyph_angles", "glyph_stencils", "render_hog", "tokens_to_cells", "figure", "titled",
           "auto_cell_px", "make_figures", "write_to_tensorboard", "main"]


# ---- drawing

def glyph_angles(nbins: int = 9) -> np.ndarray:
    """Edge angle of each bin's glyph in radians, counter-clockwise from +x with y up."""
    return (np.arange(nbins) + 0.5) * np.pi / nbins


def glyph_stencils(nbins: int = 9, cell_px: int = 16, line_width: float = 1.0,
                   length: float = 0.9) -> np.ndarray:
    """Anti-aliased unit glyphs ``(nbins, cell_px, cell_px)`` in [0, 1].

    Glyph k is a segment of ``length * cell_px`` pixels through the cell centre at
    :func:`glyph_angles` ``[k]``; a pixel's weight is its approximate coverage (a box
    filter on the distance across the line, and on the distance past its ends), scaled so
    that each glyph's brightest pixel is 1."""
    if nbins < 1 or cell_px < 1 or line_width <= 0 or length <= 0:
        raise ValueError(f"bad glyph parameters nbins={nbins}, cell_px={cell_px}, "
                         f"line_width={line_width}, length={length}")
    a = glyph_angles(nbins)
    ex, ey = np.cos(a), -np.sin(a)                     # direction in (x right, y down)
    c = np.arange(cell_px) + 0.5 - cell_px / 2.0       # pixel centres relative to the cell centre
    dy, dx = np.meshgrid(c, c, indexing="ij")
    along = dx[None] * ex[:, None, None] + dy[None] * ey[:, None, None]
    across = -dx[None] * ey[:, None, None] + dy[None] * ex[:, None, None]
    half = length * cell_px / 2.0
    w_across = np.clip(line_width / 2.0 + 0.5 - np.abs(across), 0.0, 1.0)
    w_along = np.clip(half + 0.5 - np.abs(along), 0.0, 1.0)
    g = w_across * w_along
    # Peak 1 for every angle: a thin line between two pixel rows (e.g. the vertical glyph
    # of an even-sized cell) would otherwise never reach full brightness.
    return (g / np.maximum(g.max(axis=(1, 2), keepdims=True), 1e-12)).astype(np.float32)


def render_hog(cells_HxWxB, cell_px: int = 16, *, vmax: float | None = None, line_width: float = 1.0,
               length: float = 0.9) -> np.ndarray:
    """The HOG picture of a cell map ``(H, W, nbins)``: uint8 grayscale ``(H*cell_px, W*cell_px)``.

    Every bin's glyph (see :func:`glyph_stencils`) is weighted by ``value / vmax`` (clipped
    to [0, 1]; ``vmax`` defaults to the map's maximum, so the strongest bin is white), the
    glyphs of a cell are summed and the result clipped to [0, 1]. Negative values (possible
    in predictions) draw nothing; an all-zero map is all black."""
    cells = np.asarray(cells_HxWxB, dtype=np.float32)
    if cells.ndim != 3:
        raise ValueError(f"render_hog expects a (H, W, nbins) cell map, got shape {cells.shape}")
    h, w, nbins = cells.shape
    cells = np.nan_to_num(cells, nan=0.0, posinf=0.0, neginf=0.0)
    if vmax is None:
        vmax = float(cells.max()) if cells.size else 0.0
    if not vmax > 0:  # nothing positive to draw
        return np.zeros((h * cell_px, w * cell_px), np.uint8)
    v = np.clip(cells / vmax, 0.0, 1.0)
    glyphs = glyph_stencils(nbins, cell_px, line_width, length)
    img = np.einsum("hwb,bpq->hpwq", v, glyphs).reshape(h * cell_px, w * cell_px)
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


# ---- token layout

def tokens_to_cells(hog_BxNxK, grid: Sequence[int], nbins: int = 9, cell_per_patch: int = 2,
                    channels: int = 3, reduce: str = "mean") -> np.ndarray:
    """Undo the per-token layout of ``hog_targets``.

    ``(B, N, K)`` with ``N = gh*gw`` tokens (row-major) and ``K = channels*nbins*q*q``
    (index ``c*nbins*q*q + k*q*q + i*q + j``, ``q = cell_per_patch``) ->
    ``(B, gh*q, gw*q, nbins)``, the colour channels reduced by ``reduce`` ("mean", "max"
    or "sum"); ``reduce="none"`` keeps them: ``(B, gh*q, gw*q, channels, nbins)``, the
    layout of ``hog_cells``. A 2-D ``(N, K)`` input gives the same without the batch axis."""
    x = np.asarray(hog_BxNxK, dtype=np.float32)
    squeeze = x.ndim == 2
    if squeeze:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"expected (B, N, K) or (N, K) tokens, got shape {np.shape(hog_BxNxK)}")
    gh, gw = (int(g) for g in grid)
    q = int(cell_per_patch)
    b, n, k = x.shape
    if n != gh * gw:
        raise ValueError(f"{n} tokens do not fill the grid {gh}x{gw}")
    if k != channels * nbins * q * q:
        raise ValueError(f"token size {k} != channels*nbins*q*q = {channels}*{nbins}*{q}*{q}")
    x = x.reshape(b, gh, gw, channels, nbins, q, q)
    x = x.transpose(0, 1, 5, 2, 6, 3, 4).reshape(b, gh * q, gw * q, channels, nbins)
    reducers = {"mean": np.mean, "max": np.max, "sum": np.sum}
    if reduce != "none":
        if reduce not in reducers:
            raise ValueError(f"reduce={reduce!r}: expected one of {sorted(reducers) + ['none']}")
        x = reducers[reduce](x, axis=3)
    return x[0] if squeeze else x


# ---- figure

def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def figure(image_uint8, mask_N, target_NxK, pred_NxK, grid: Sequence[int], *, nbins: int = 9,
           channels: int = 3, cell_px: int = 16, gap: int = 4, grey: int = 128,
           outline: tuple[int, int, int] | None = (160, 40, 40), vmax: float | None = None,
           line_width: float = 1.0) -> np.ndarray:
    """Four panels side by side, uint8 RGB ``(P_h, 4*P_w + 3*gap, 3)``.

    1. the input, upscaled (nearest) to the HOG panels' size;
    2. the input with the masked patches filled with ``grey``;
    3. the target HOG picture;
    4. the prediction: visible patches show the target, masked patches the prediction;
       masked patches get a 1-px ``outline`` (None: no outline).

    ``image_uint8`` is ``(H, W, 3)`` or ``(H, W)``; ``mask_N`` is ``(N,)`` or ``(gh, gw)``,
    True = masked; ``target_NxK`` / ``pred_NxK`` follow the ``hog_targets`` layout (q is
    inferred from K). Panels 3 and 4 share one brightness scale (``vmax``, default the
    target's maximum). ``P_h = gh*q*cell_px`` and ``P_w = gw*q*cell_px``."""
    gh, gw = (int(g) for g in grid)
    target = np.asarray(target_NxK, np.float32)
    pred = np.asarray(pred_NxK, np.float32)
    if target.shape != pred.shape or target.ndim != 2:
        raise ValueError(f"target {target.shape} and prediction {pred.shape} must both be (N, K)")
    q = math.isqrt(max(target.shape[1] // (channels * nbins), 0))
    if q < 1 or channels * nbins * q * q != target.shape[1]:
        raise ValueError(f"token size {target.shape[1]} is not {channels}*{nbins}*q*q")
    mask = np.asarray(mask_N, bool).reshape(-1)
    if mask.size != gh * gw or target.shape[0] != gh * gw:
        raise ValueError(f"mask ({mask.size}) and tokens ({target.shape[0]}) must fill the grid {gh}x{gw}")
    img = np.asarray(image_uint8)
    if img.ndim == 2:
        img = _rgb(img)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3) or (H, W), got shape {np.shape(image_uint8)}")
    img = img.astype(np.uint8)

    tp = q * cell_px                                  # token side in output pixels
    ph, pw = gh * tp, gw * tp
    big = np.asarray(Image.fromarray(img).resize((pw, ph), Image.Resampling.NEAREST))
    mask_px = np.repeat(np.repeat(mask.reshape(gh, gw), tp, 0), tp, 1)
    masked_img = big.copy()
    masked_img[mask_px] = grey

    tgt_cells = tokens_to_cells(target, (gh, gw), nbins, q, channels)
    mix = np.where(mask[:, None], pred, target)
    mix_cells = tokens_to_cells(mix, (gh, gw), nbins, q, channels)
    if vmax is None:
        vmax = float(tgt_cells.max()) if tgt_cells.size else 0.0
    kw = dict(vmax=vmax, line_width=line_width)
    tgt_pic = _rgb(render_hog(tgt_cells, cell_px, **kw))
    pred_pic = _rgb(render_hog(mix_cells, cell_px, **kw))
    if outline is not None:
        for t in np.flatnonzero(mask):                # a 1-px frame inside each masked token
            y0, x0 = (tp * v for v in divmod(int(t), gw))
            pred_pic[[y0, y0 + tp - 1], x0:x0 + tp] = outline
            pred_pic[y0:y0 + tp, [x0, x0 + tp - 1]] = outline

    sep = np.full((ph, gap, 3), 255, np.uint8)
    parts = [big, sep, masked_img, sep, tgt_pic, sep, pred_pic]
    return np.concatenate(parts, axis=1)


PANEL_TITLES = ("input", "mask", "target HOG", "prediction on masked patches")


def titled(fig, panel_w: int, gap: int = 4, titles: Sequence[str] = PANEL_TITLES, size: int = 16) -> np.ndarray:
    """``fig`` (panels of ``panel_w`` pixels, ``gap`` apart) below a white strip with each panel's
    title centred over it; the font shrinks (to 8 px) until every title fits its panel."""
    def font(px):
        try:
            return ImageFont.load_default(size=px)     # scalable (Pillow >= 10.1 with FreeType)
        except (TypeError, ImportError, OSError):
            return ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while size > 8 and max(probe.textlength(t, font=font(size)) for t in titles) > panel_w - 4:
        size -= 1
    f = font(size)
    strip = Image.new("RGB", (fig.shape[1], size + 10), "white")
    d = ImageDraw.Draw(strip)
    for k, t in enumerate(titles):
        x = k * (panel_w + gap) + (panel_w - d.textlength(t, font=f)) / 2
        d.text((max(x, 0), 4), t, fill="black", font=f)
    return np.concatenate([np.asarray(strip), np.asarray(fig, np.uint8)], axis=0)


def auto_cell_px(cells_across: int) -> int:
    """Output pixels per HOG cell: panels about 256 px wide, glyphs 16 to 32 px long."""
    return int(np.clip(256 // max(cells_across, 1), 16, 32))


# ---- model side

def make_figures(config, params, *, num_images: int = 4, seed: int = 0, split: str | None = None,
                 start: int = 0, cell_px: int | None = None, titles: bool = True, source=None,
                 **figure_kwargs) -> list[np.ndarray]:
    """HOG figures (see :func:`figure`) for ``num_images`` held-out examples.

    Examples ``start, start+1, ...`` of ``split`` (default ``config.input.eval_split``) go
    through the eval transform (resize + centre crop); masks are ``masking.block_mask``
    drawn from ``numpy.random.default_rng(seed)``; targets are ``hog_targets`` of the
    normalised images and predictions the MaskFeat model's ``pred_BxNxK`` with ``params``
    (a pure dict of host or device arrays, e.g. ``TrainState.params``). ``cell_px`` defaults
    to :func:`auto_cell_px` (lines ``cell_px / 16`` wide); ``titles`` names the panels
    (:func:`titled`). ``source`` overrides the dataset (anything indexable giving
    ``{"image": ...}``); ``figure_kwargs`` go to :func:`figure`."""
    import jax
    from flax import nnx

    from maskfeat_jax import models, steps, targets as targets_lib
    from maskfeat_jax.data import masking
    from maskfeat_jax.data import pipeline, sources
    from maskfeat_jax.targets import hog

    if config.task != "pretrain":
        raise ValueError(f"config.task={config.task!r}: HOG figures need a MaskFeat pre-training model")
    if config.model.name != "vit":
        raise ValueError(f"config.model.name={config.model.name!r}: HOG figures are drawn for image (ViT) "
                         f"models only")
    abstract = models.build_abstract(config)
    graphdef = nnx.graphdef(abstract)
    grid = tuple(int(g) for g in abstract.encoder.grid)
    size = int(config.input.image_size)
    patch = size // grid[0]
    if source is None:
        source = sources.make(config, split or config.input.eval_split)
    if len(source) == 0 or num_images < 1:
        return []
    idx = [(start + i) % len(source) for i in range(num_images)]
    emap = pipeline.EvalMap(size)
    images = np.stack([emap.map(source[i])["image"] for i in idx])
    rng = np.random.default_rng(seed)
    m = config.mask
    masks = np.stack([masking.block_mask(rng, grid, m.ratio, min_aspect=m.min_aspect, tries=m.tries)
                      .reshape(-1) for _ in idx])

    h = config.hog
    active = targets_lib.active(config, patch)      # the head's output: HOG's slice is drawn
    if "hog" not in [t.name for t in active]:
        raise ValueError("config.target.hog=0: HOG figures need a model that predicts HOG")

    @jax.jit
    def run(params, images_u8, mask_BxN):
        x = steps.normalize(images_u8, config.input.mean, config.input.std)
        targets = hog.hog_targets(x, patch_size=patch, nbins=h.nbins, cell_size=h.cell_size,
                                  gaussian_window=h.gaussian_window, normalize=h.get("normalize", True))
        pred = targets_lib.split(nnx.merge(graphdef, params)(x, mask_BxN)["pred_BxNxK"], active)["hog"]
        return targets, pred

    targets, pred = jax.device_get(run(params, images, masks))
    q = patch // h.cell_size
    if cell_px is None:
        cell_px = auto_cell_px(grid[1] * q)
        figure_kwargs.setdefault("line_width", cell_px / 16)
    figs = [figure(images[i], masks[i], targets[i], pred[i], grid, nbins=h.nbins, cell_px=cell_px,
                   **figure_kwargs)
            for i in range(len(idx))]
    gap = figure_kwargs.get("gap", 4)
    return [titled(f, grid[1] * q * cell_px, gap) for f in figs] if titles else figs


def write_to_tensorboard(writer, step: int, figures: Sequence[np.ndarray], tag: str = "hog") -> None:
    """``writer.add_image(f"{tag}/{i}", fig, step, dataformats="HWC")`` for each figure.

    ``writer`` is a tensorboardX ``SummaryWriter`` (or anything with ``add_image``), or a
    ``maskfeat_jax.metrics.Writer`` (its TensorBoard writer is used; nothing happens when
    it has none or is disabled on this process)."""
    if not hasattr(writer, "add_image"):
        if not getattr(writer, "enabled", True):
            return
        writer = getattr(writer, "_tb", None)
        if writer is None:
            return
    for i, fig in enumerate(figures):
        writer.add_image(f"{tag}/{i}", np.asarray(fig, np.uint8), int(step), dataformats="HWC")


# ---- command

def _define_flags(flag_values):
    flags.DEFINE_string("workdir", None, "Training workdir (or its checkpoints folder).", flag_values=flag_values)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=flag_values)
    flags.DEFINE_integer("num_images", 4, "Held-out examples, one figure each.", flag_values=flag_values)
    flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/figures).", flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "Seed of the block masks.", flag_values=flag_values)
    flags.DEFINE_string("split", None, "Dataset split (default: config.input.eval_split).", flag_values=flag_values)
    flags.DEFINE_integer("start", 0, "Index of the first example.", flag_values=flag_values)
    flags.DEFINE_integer("cell_px", None, "Output pixels per HOG cell side (default: 16 to 32, panels about "
                         "256 px).", flag_values=flag_values)
    flags.DEFINE_bool("tensorboard", False, "Also write the figures to WORKDIR/tensorboard at the checkpoint's "
                      "step.", flag_values=flag_values)
    flags.mark_flags_as_required(["workdir"], flag_values=flag_values)
    return flag_values


def main(argv: Sequence[str]) -> list[str]:
    """``python -m maskfeat_jax.visualize``: HOG figures (input | masked | target | prediction) of a
    pre-training checkpoint as PNGs, their paths printed and returned. Under ``app.run`` ``argv``
    is the program name; a list of flags (``main(["--workdir=DIR"])``) is parsed into flags of
    its own, leaving absl's global flags alone."""
    from maskfeat_jax import config_cli
    fv = config_cli.command_flags(_define_flags, argv, "visualize")
    from maskfeat_jax import saved as saved_lib, storage

    try:
        with warnings.catch_warnings():  # orbax: "Sharding info not provided" (we want host arrays)
            warnings.simplefilter("ignore", UserWarning)
            saved = saved_lib.load(fv.workdir, fv.step)
        figs = make_figures(saved.config, saved.params, num_images=fv.num_images, seed=fv.seed, split=fv.split,
                            start=fv.start, cell_px=fv.cell_px)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    workdir = storage.path(fv.workdir)
    if workdir.name == "checkpoints" or workdir.name.isdigit():
        workdir = storage.path(saved.path).parent.parent
    out = storage.path(fv.out) if fv.out else workdir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, fig in enumerate(figs):
        p = out / f"hog_{i}.png"
        with p.open("wb") as f:
            Image.fromarray(fig).save(f, format="PNG")
        paths.append(str(p))
        print(p, flush=True)
    if fv.tensorboard:
        from maskfeat_jax import metrics
        with metrics.summary_writer(str(workdir / "tensorboard")) as w:
            write_to_tensorboard(w, saved.step, figs)
    return paths


if __name__ == "__main__":
    from absl import logging

    from maskfeat_jax import config_cli
    logging.set_verbosity(logging.ERROR)  # orbax's read-only notices
    config_cli.run(main, _define_flags, exit_code=False)
