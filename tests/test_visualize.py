"""HOG pictures: glyph orientation on ramps and edges, the token layout round trip, the
four-panel figure, TensorBoard output, and ``python -m maskfeat_jax.visualize`` end to end
on a tiny checkpoint written by ``python -m maskfeat_jax.main``."""
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from maskfeat_jax import visualize as V
from maskfeat_jax.targets import hog

ROOT = pathlib.Path(__file__).resolve().parents[1]
CELL_PX = 16


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def _axis(glyph):
    """(principal-axis angle in degrees, CCW from +x with y UP, in [0, 180); elongation)."""
    w = np.asarray(glyph, np.float64)
    assert w.sum() > 0, "empty glyph"
    rows, cols = np.mgrid[0:w.shape[0], 0:w.shape[1]]
    x, y = cols.astype(float), -rows.astype(float)        # y up
    m = w.sum()
    xm, ym = (w * x).sum() / m, (w * y).sum() / m
    mu20 = (w * (x - xm) ** 2).sum() / m
    mu02 = (w * (y - ym) ** 2).sum() / m
    mu11 = (w * (x - xm) * (y - ym)).sum() / m
    angle = math.degrees(0.5 * math.atan2(2 * mu11, mu20 - mu02)) % 180.0
    tr, det = mu20 + mu02, mu20 * mu02 - mu11 ** 2
    disc = math.sqrt(max(tr * tr / 4 - det, 0.0))
    lam1, lam2 = tr / 2 + disc, tr / 2 - disc
    return angle, lam1 / max(lam2, 1e-9)


def _angdiff(a, b):
    """Distance between two undirected line angles, in degrees (0..90)."""
    return abs((a - b + 90.0) % 180.0 - 90.0)


def _cell_glyph(pic, r, c, px=CELL_PX):
    return pic[r * px:(r + 1) * px, c * px:(c + 1) * px]


def _gray_cells(img_hw):
    """(H, W) float image -> HOG cells averaged over 3 identical channels, (H/8, W/8, 9)."""
    x = jnp.asarray(np.repeat(np.asarray(img_hw, np.float32)[None, ..., None], 3, axis=-1))
    return np.asarray(hog.hog_cells(x))[0].mean(axis=-2)


YY, XX = np.mgrid[0:32, 0:32].astype(np.float32)


# ---------------------------------------------------------------------------
# glyph orientation
# ---------------------------------------------------------------------------

# (image, the bin the spec's worked checks give, expected glyph angle with y up).
# The glyph runs along the image's level lines (the edge), perpendicular to the gradient:
#   I = x:     gradient horizontal (bin 4)            -> vertical glyph, 90 deg
#   I = y:     gradient vertical, y down (bin 0)      -> horizontal glyph (bin 0 centre: 10 deg)
#   I = x + y: level lines x + y_down = c rise to the right "/" (bin 2) -> 50 deg
#   I = x - y: level lines x - y_down = c fall to the right "\" (bin 6) -> 130 deg
RAMPS = {
    "x": (XX, 4, 90.0),
    "y": (YY, 0, 10.0),
    "x+y": (XX + YY, 2, 50.0),
    "x-y": (XX - YY, 6, 130.0),
}


@pytest.mark.parametrize("name", list(RAMPS))
def test_ramp_glyphs_run_along_the_edges(name):
    img, expected_bin, expected_angle = RAMPS[name]
    cells = _gray_cells(img * 4.0)
    pic = V.render_hog(cells, CELL_PX)
    assert pic.shape == (4 * CELL_PX, 4 * CELL_PX) and pic.dtype == np.uint8
    for r in (1, 2):            # interior cells (the reflect padding changes the border ones)
        for c in (1, 2):
            assert int(np.argmax(cells[r, c])) == expected_bin       # precondition: spec section 1
            angle, elong = _axis(_cell_glyph(pic, r, c))
            assert elong > 8, f"{name}: cell ({r},{c}) glyph is not a line (elongation {elong:.1f})"
            assert _angdiff(angle, expected_angle) < 4, f"{name}: glyph at {angle:.1f} deg"


def test_ramp_semantics_vertical_horizontal_and_diagonals():
    """The coarse claims, independent of the exact bin centres."""
    angle = {n: _axis(_cell_glyph(V.render_hog(_gray_cells(img), CELL_PX), 1, 1))[0]
             for n, (img, _, _) in RAMPS.items()}
    assert _angdiff(angle["x"], 90) < 15      # horizontal ramp -> vertical line
    assert _angdiff(angle["y"], 0) < 15       # vertical ramp -> horizontal line
    assert _angdiff(angle["x+y"], 45) < 10    # x + y: "/" (rises to the right on screen)
    assert _angdiff(angle["x-y"], 135) < 10   # x - y: "\" (falls to the right on screen)
    assert _angdiff(angle["x+y"], angle["x-y"]) > 60


def test_step_edges_give_glyphs_along_the_edge():
    vertical_edge = 255.0 * (XX >= 16)
    for img, want in ((vertical_edge, 90.0), (vertical_edge.T, 10.0)):
        cells = _gray_cells(img)
        pic = V.render_hog(cells, CELL_PX)
        on_edge = [(r, c) for r in range(4) for c in range(4) if cells[r, c].sum() > 0]
        assert len(on_edge) == 8            # two cells on each side of the edge, 4 rows/cols
        for r, c in on_edge:
            assert _angdiff(_axis(_cell_glyph(pic, r, c))[0], want) < 4
        off = [(r, c) for r in range(4) for c in range(4) if (r, c) not in on_edge]
        assert all(_cell_glyph(pic, r, c).max() == 0 for r, c in off)


@pytest.mark.parametrize("nbins", [9, 6])
def test_one_hot_cells_draw_each_bin_at_its_edge_angle(nbins):
    for k in range(nbins):
        cells = np.zeros((1, 1, nbins), np.float32)
        cells[0, 0, k] = 0.7
        angle, elong = _axis(V.render_hog(cells, 24))
        assert elong > 8
        assert _angdiff(angle, (k + 0.5) * 180.0 / nbins) < 3
    np.testing.assert_allclose(np.degrees(V.glyph_angles(9)), 10 + 20 * np.arange(9))


def test_brightness_follows_values_and_global_max():
    cells = np.zeros((1, 2, 9), np.float32)
    cells[0, 0, 4], cells[0, 1, 4] = 1.0, 0.5
    pic = V.render_hog(cells, CELL_PX)
    assert pic[:, :CELL_PX].max() == 255
    assert abs(int(pic[:, CELL_PX:].max()) - 128) <= 1
    # a shared vmax keeps two pictures comparable; negatives draw nothing
    assert V.render_hog(cells, CELL_PX, vmax=2.0).max() == 128
    assert V.render_hog(-cells, CELL_PX).max() == 0


def test_constant_image_renders_all_black():
    cells = _gray_cells(np.full((32, 32), 77.0))
    assert np.all(cells == 0)
    pic = V.render_hog(cells, CELL_PX)
    assert pic.shape == (64, 64) and pic.dtype == np.uint8 and pic.max() == 0
    assert V.render_hog(np.zeros((3, 5, 9)), 8).shape == (24, 40)


# ---------------------------------------------------------------------------
# token layout
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("patch", [8, 16, 32])
def test_tokens_to_cells_inverts_hog_targets(patch):
    rng = np.random.default_rng(patch)
    images = jnp.asarray(rng.normal(size=(2, 64, 96, 3)).astype(np.float32))
    q = patch // 8
    grid = (64 // patch, 96 // patch)
    tokens = np.asarray(hog.hog_targets(images, patch_size=patch))
    cells = np.asarray(hog.hog_cells(images))                  # (B, 8, 12, C, 9)
    got = V.tokens_to_cells(tokens, grid, cell_per_patch=q)
    assert got.shape == (2, 8, 12, 9)
    np.testing.assert_allclose(got, cells.mean(axis=-2), atol=1e-6)
    np.testing.assert_array_equal(V.tokens_to_cells(tokens, grid, cell_per_patch=q, reduce="none"), cells)
    np.testing.assert_allclose(V.tokens_to_cells(tokens, grid, cell_per_patch=q, reduce="max"),
                               cells.max(axis=-2), atol=1e-6)
    np.testing.assert_allclose(V.tokens_to_cells(tokens[1], grid, cell_per_patch=q), got[1], atol=1e-6)


def test_tokens_to_cells_rejects_bad_shapes():
    x = np.zeros((1, 6, 108))
    with pytest.raises(ValueError, match="grid"):
        V.tokens_to_cells(x, (2, 2))
    with pytest.raises(ValueError, match="token size"):
        V.tokens_to_cells(x, (2, 3), cell_per_patch=3)
    with pytest.raises(ValueError, match="reduce"):
        V.tokens_to_cells(x, (2, 3), reduce="median")


# ---------------------------------------------------------------------------
# figure
# ---------------------------------------------------------------------------

def _panels(fig, side, gap=4):
    return [fig[:, k * (side + gap): k * (side + gap) + side] for k in range(4)]


def _figure_inputs(seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    target = np.asarray(hog.hog_targets(jnp.asarray(image, jnp.float32)[None]))[0]     # (4, 108)
    pred = rng.uniform(0, 1, target.shape).astype(np.float32)
    mask = np.array([True, False, False, True])
    return image, mask, target, pred


def test_figure_panels():
    image, mask, target, pred = _figure_inputs()
    fig = V.figure(image, mask, target, pred, (2, 2), outline=None)
    side = 2 * 2 * CELL_PX                              # 2 tokens x 2 cells x 16 px
    assert fig.shape == (side, 4 * side + 3 * 4, 3) and fig.dtype == np.uint8
    inp, masked, tgt, prd = _panels(fig, side)
    up = np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)   # nearest, x2
    np.testing.assert_array_equal(inp, up)
    tp = side // 2
    for t in range(4):
        r, c = divmod(t, 2)
        sl = (slice(r * tp, (r + 1) * tp), slice(c * tp, (c + 1) * tp))
        if mask[t]:
            assert np.all(masked[sl] == 128)
            assert np.any(prd[sl] != tgt[sl]), f"masked token {t} shows the target"
        else:
            np.testing.assert_array_equal(masked[sl], up[sl])
            np.testing.assert_array_equal(prd[sl], tgt[sl])
    assert np.all(tgt[..., 0] == tgt[..., 1]) and tgt.max() > 0
    # the target panel is the HOG picture of the target
    np.testing.assert_array_equal(tgt[..., 0], V.render_hog(V.tokens_to_cells(target, (2, 2)), CELL_PX))
    # a perfect prediction gives two identical HOG panels
    same = V.figure(image, mask, target, target, (2, 2), outline=None)
    np.testing.assert_array_equal(_panels(same, side)[2], _panels(same, side)[3])


def test_figure_outlines_masked_patches():
    image, mask, target, pred = _figure_inputs(1)
    fig = V.figure(image, mask.reshape(2, 2), target, pred, (2, 2), outline=(200, 0, 0))
    side = 64
    prd = _panels(fig, side)[3]
    assert tuple(prd[0, 5]) == (200, 0, 0) and tuple(prd[side - 1, side - 5]) == (200, 0, 0)
    assert tuple(prd[0, side - 5]) != (200, 0, 0)      # token 1 is visible: no outline


def test_figure_rejects_mismatched_inputs():
    image, mask, target, pred = _figure_inputs()
    with pytest.raises(ValueError):
        V.figure(image, mask, target, pred[:, :54], (2, 2))
    with pytest.raises(ValueError):
        V.figure(image, mask[:3], target, pred, (2, 2))


# ---------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------

class _Recorder:
    def __init__(self):
        self.calls = []

    def add_image(self, tag, img, step, dataformats):
        self.calls.append((tag, img.shape, img.dtype, step, dataformats))


def test_write_to_tensorboard(tmp_path):
    figs = [np.zeros((8, 20, 3), np.uint8), np.full((8, 20, 3), 255, np.uint8)]
    rec = _Recorder()
    V.write_to_tensorboard(rec, 7, figs)
    assert rec.calls == [("hog/0", (8, 20, 3), np.uint8, 7, "HWC"), ("hog/1", (8, 20, 3), np.uint8, 7, "HWC")]

    class MetricsWriterLike:       # maskfeat_jax.metrics.Writer: its TensorBoard writer is used
        enabled, _tb = True, _Recorder()
    w = MetricsWriterLike()
    V.write_to_tensorboard(w, 3, figs[:1], tag="x")
    assert w._tb.calls[0][0] == "x/0"
    MetricsWriterLike._tb = None
    V.write_to_tensorboard(MetricsWriterLike(), 3, figs)    # no TensorBoard: nothing, no error

    from tensorboardX import SummaryWriter
    with SummaryWriter(str(tmp_path)) as sw:
        V.write_to_tensorboard(sw, 1, figs)
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 200


# ---------------------------------------------------------------------------
# model side (in process) and the command (subprocesses)
# ---------------------------------------------------------------------------

def test_make_figures_draws_the_model_prediction_in_masked_patches():
    """A head that always predicts 'bin 4 everywhere' must draw vertical glyphs exactly
    in the masked patches of the fourth panel."""
    from flax import nnx

    from maskfeat_jax import config as config_lib, models
    c = config_lib.base_config()
    c.model.variant, c.input.image_size, c.input.dataset = "mu/16", 64, "digits"
    with nnx.use_eager_sharding(False):   # shapes only: random weights drawn in numpy are faster
        abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: models.build(c, nnx.Rngs(0)))))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.normal(0, 0.02, a.shape).astype(np.float32), abstract)
    params = {**params, "head": {"kernel": np.zeros_like(params["head"]["kernel"]),
                                 "bias": np.zeros(108, np.float32)}}
    bias = np.zeros((3, 9, 2, 2), np.float32)
    bias[:, 4] = 1.0                                           # every channel, every cell: bin 4
    params["head"]["bias"] = bias.reshape(-1)
    figs = V.make_figures(c, params, num_images=2, seed=3, outline=None, cell_px=CELL_PX, titles=False)
    assert len(figs) == 2
    side = 4 * 2 * CELL_PX
    for fig in figs:
        assert fig.shape == (side, 4 * side + 12, 3)
        _, masked, tgt, prd = _panels(fig, side)
        tp = side // 4
        masked_tokens = [t for t in range(16) if np.all(masked[(t // 4) * tp, (t % 4) * tp] == 128)
                         and np.all(masked[(t // 4 + 1) * tp - 1, (t % 4 + 1) * tp - 1] == 128)]
        assert masked_tokens, "expected at least one masked patch"
        for t in range(16):
            r, c0 = divmod(t, 4)
            tok = prd[r * tp:(r + 1) * tp, c0 * tp:(c0 + 1) * tp, 0]
            if t in masked_tokens:
                for i in range(2):
                    for j in range(2):
                        angle, elong = _axis(_cell_glyph(tok, i, j))
                        assert elong > 8 and _angdiff(angle, 90) < 3
            else:
                np.testing.assert_array_equal(tok, tgt[r * tp:(r + 1) * tp, c0 * tp:(c0 + 1) * tp, 0])


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.e2e
def test_command_end_to_end(tmp_path):
    from maskfeat_jax import config as config_lib
    work = tmp_path / "run"
    # the end-of-run frozen-feature probe (when the config has one) is not under test here
    extra = ["--config.evals.probe=False"] if "probe" in config_lib.base_config().evals else []
    p = _run("maskfeat_jax.main", "--config=configs/demo.py", f"--workdir={work}",
             "--config.model.variant=mu/16", "--config.input.image_size=32",
             "--config.input.global_batch_size=16", "--config.total_steps=2", *extra)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    p = _run("maskfeat_jax.visualize", f"--workdir={work}", "--num_images", "3", "--tensorboard")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    side = 32 // 8 * 32              # 4 cells of 32 px (visualize.auto_cell_px), below the panel titles
    from maskfeat_jax.data import sources, transforms
    c = config_lib.base_config()
    c.input.dataset = "digits"
    held_out = sources.make(c, "validation")
    for i in range(3):
        path = work / "figures" / f"hog_{i}.png"
        assert path.exists(), p.stdout
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.size[0] == 4 * side + 3 * 4 and im.size[1] > side
            fig = np.asarray(im)
        strip, fig = fig[:-side], fig[-side:]
        assert all(strip[:, k * (side + 4):k * (side + 4) + side].min() < 128 for k in range(4))   # titled
        # panel 1 is the i-th held-out example through the eval transform, upscaled
        img = transforms.eval_transform(held_out[i]["image"], 32)
        np.testing.assert_array_equal(fig[:, :side], np.repeat(np.repeat(img, 4, 0), 4, 1))
        assert fig[:, 2 * (side + 4):].max() > 0       # HOG panels are not empty
    assert list((work / "tensorboard").glob("events.out.tfevents.*"))

    # explicit step, output folder and cell size (in process: the same main())
    out = tmp_path / "figs"
    paths = V.main([f"--workdir={work / 'checkpoints'}", "--step", "2", "--num_images", "1",
                    "--out", str(out), "--cell_px", "8"])
    assert paths == [str(out / "hog_0.png")]
    with pytest.raises(SystemExit) as e:
        V.main([f"--workdir={work}", "--step", "5"])
    assert e.value.code == 2
    with Image.open(out / "hog_0.png") as im:
        assert im.size[0] == 4 * 32 + 12 and im.size[1] > 32
    assert not (out / "hog_1.png").exists()


def test_command_reports_missing_checkpoints(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        V.main([f"--workdir={tmp_path}"])
    assert e.value.code == 2
    assert "no checkpoint" in capsys.readouterr().err
