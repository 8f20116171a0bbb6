"""What several test modules share, so that no test module imports another:

- independent slow references, written with explicit loops in float64: HOG (``HOGLayerC``)
  cells and the official per-token layout (``ref_hog_cells``, ``ref_tokens``), the pixel
  targets of images and videos (``ref_pixel_image``, ``ref_pixel_video``) and torchvision's
  RoIAlign (``ref_roi_align``);
- the pre-training step tests' data: the tiny config (``step_config``), input statistics,
  the batch's mask and valid rows, and the batch itself (``pretrain_batch``, which conftest's
  module-scoped ``pt_batch`` fixture returns), with the helpers that run one step
  (``init_model``, ``GRADS``, ``run_step``) and the HOG-only step as it was before
  ``config.target`` (``old_pretrain_step``);
- the SSv2 index clips: a video writer and clips whose frames show their own index
  (``encode_clip``, ``index_clip``, ``frame_ids``);
- the video ViT's tiny config overrides (``VIDEO``, ``MAE``).

    import references                # tests/ is on sys.path under pytest, as for ``tiny``
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from maskfeat_jax import config as config_lib, models, steps
from maskfeat_jax.data import make_video_demo
from maskfeat_jax.targets import hog

# ---------------------------------------------------------------------------------------------
# HOG: loop-level reference of HOGLayerC and of the official token layout
# ---------------------------------------------------------------------------------------------

KX = [[1, 0, -1], [2, 0, -2], [1, 0, -1]]
KY = [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]


def _reflect(i, n):
    """Index into a length-n axis after torch/numpy 'reflect' padding (edge not repeated)."""
    if i < 0:
        return -i
    if i > n - 1:
        return 2 * (n - 1) - i
    return i


def ref_hog_cells(img, nbins=9, cell=8, gaussian_window=0, normalize=True):
    """HOGLayerC, written with explicit pixel loops. img (H, W, C) -> (H//cell, W//cell, C, nbins).
    ``normalize=False``: the histograms before the per-cell L2 normalisation."""
    img = np.asarray(img, np.float64)
    height, width, chans = img.shape
    nh, nw = height // cell, width // cell
    if gaussian_window:
        g = gaussian_window
        sigma = g // 2
        w1 = [math.exp(-0.5 * ((n - (g - 1) / 2.0) / sigma) ** 2) for n in range(g)]
        tot = sum(a * b for a in w1 for b in w1)
        gauss = [[a * b / tot for b in w1] for a in w1]
    hist = np.zeros((nh, nw, chans, nbins))
    for c in range(chans):
        for r in range(nh * cell):
            for col in range(nw * cell):
                gx = gy = 0.0
                for di in range(3):
                    for dj in range(3):
                        v = img[_reflect(r + di - 1, height), _reflect(col + dj - 1, width), c]
                        gx += KX[di][dj] * v
                        gy += KY[di][dj] * v
                mag = math.sqrt(gx * gx + gy * gy)
                if gaussian_window:
                    mag *= gauss[r % g][col % g]
                k = math.floor(math.atan2(gx, gy) / math.pi * nbins) % nbins
                hist[r // cell, col // cell, c, k] += mag
    if not normalize:
        return hist
    for i in range(nh):
        for j in range(nw):
            for c in range(chans):
                n = math.sqrt(sum(v * v for v in hist[i, j, c]))
                hist[i, j, c] /= max(n, 1e-12)
    return hist


def ref_tokens(cells, q):
    """Official per-token layout from reference cells (nh, nw, C, nbins), with explicit loops."""
    nh, nw, chans, nbins = cells.shape
    th, tw = nh // q, nw // q
    out = np.zeros((th * tw, chans * nbins * q * q))
    for ty in range(th):
        for tx in range(tw):
            for c in range(chans):
                for k in range(nbins):
                    for i in range(q):
                        for j in range(q):
                            out[ty * tw + tx, c * nbins * q * q + k * q * q + i * q + j] = \
                                cells[ty * q + i, tx * q + j, c, k]
    return out


# ---------------------------------------------------------------------------------------------
# Pixels: loop-level reference of the official pixel targets
# ---------------------------------------------------------------------------------------------

def _ref_standardise(row, eps=1e-6):
    """(x - mean) / sqrt(unbiased var + eps) of one token's vector, with explicit sums."""
    k = len(row)
    mean = sum(row) / k
    var = sum((v - mean) ** 2 for v in row) / (k - 1)
    return [(v - mean) / (var + eps) ** 0.5 for v in row]


def ref_pixel_image(img, p, norm_pix, eps=1e-6):
    """img (H, W, C) -> (N, C*p*p), token vector index c*p*p + i*p + j, tokens row-major."""
    img = np.asarray(img, np.float64)
    height, width, chans = img.shape
    th, tw = height // p, width // p
    out = []
    for ty in range(th):
        for tx in range(tw):
            row = [0.0] * (chans * p * p)
            for c in range(chans):
                for i in range(p):
                    for j in range(p):
                        row[c * p * p + i * p + j] = img[ty * p + i, tx * p + j, c]
            out.append(_ref_standardise(row, eps) if norm_pix else row)
    return np.array(out)


def ref_pixel_video(vid, p, s, norm_pix, all_frames):
    """vid (T, H, W, C) -> tokens in (t, h, w) order. Strided: frame t*s only, index (i*p + j)*C + c;
    all frames: frames t*s + u of the tubelet, index ((u*p + i)*p + j)*C + c."""
    vid = np.asarray(vid, np.float64)
    frames, height, width, chans = vid.shape
    nt, th, tw, u_n = frames // s, height // p, width // p, (s if all_frames else 1)
    out = []
    for t in range(nt):
        for ty in range(th):
            for tx in range(tw):
                row = [0.0] * (u_n * p * p * chans)
                for u in range(u_n):
                    for i in range(p):
                        for j in range(p):
                            for c in range(chans):
                                row[((u * p + i) * p + j) * chans + c] = vid[t * s + u, ty * p + i, tx * p + j, c]
                out.append(_ref_standardise(row) if norm_pix else row)
    return np.array(out)


# ---------------------------------------------------------------------------------------------
# RoIAlign: loop-level reference written from torchvision's definition
# ---------------------------------------------------------------------------------------------

def _bilinear(fmap, y, x):
    height, width = fmap.shape[:2]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(fmap.shape[2])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * fmap[y0, x0] + (1 - ly) * lx * fmap[y0, x1]
            + ly * (1 - lx) * fmap[y1, x0] + ly * lx * fmap[y1, x1])


def ref_roi_align(features, rois, out_h, out_w, scale, sampling_ratio, aligned):
    """torchvision.ops.roi_align, one sample at a time, in float64."""
    features = features.astype(np.float64)
    out = np.zeros((len(rois), out_h, out_w, features.shape[3]))
    offset = 0.5 if aligned else 0.0
    for r, (b, x1, y1, x2, y2) in enumerate(rois.astype(np.float64)):
        sx, sy = x1 * scale - offset, y1 * scale - offset
        rw, rh = x2 * scale - offset - sx, y2 * scale - offset - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / out_h)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / out_w)
        for ph in range(out_h):
            for pw in range(out_w):
                acc = np.zeros(features.shape[3])
                for iy in range(gh):
                    y = sy + ph * rh / out_h + (iy + 0.5) * rh / out_h / gh
                    for ix in range(gw):
                        x = sx + pw * rw / out_w + (ix + 0.5) * rw / out_w / gw
                        acc += _bilinear(features[int(b)], y, x)
                out[r, ph, pw] = acc / max(gh * gw, 1)
    return out


# ---------------------------------------------------------------------------------------------
# The pre-training step tests: config, batch and one step
# ---------------------------------------------------------------------------------------------

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def step_config(task="pretrain"):
    c = config_lib.base_config()
    c.task, c.model.variant, c.input.image_size = task, "mu/16", 32
    c.input.global_batch_size, c.model.num_classes = 8, 10
    c.augment.mixup_alpha, c.augment.cutmix_alpha = 0.0, 0.0
    c.optim.warmup_epochs, c.optim.base_lr = 0.0, 1e-2
    return c


# 8 images of 32 px: 2x2 tokens each. Every row mixes masked and visible tokens; row 3 is padding
# (valid False) and has masked tokens, so that dropping `valid` from the weight changes the loss.
MASK = np.array([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0],
                 [0, 0, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 1, 0]], bool)
VALID = np.array([1, 1, 1, 0, 1, 1, 1, 1], bool)


def pretrain_batch():
    """The pre-training batch, its normalised images (float32, as the step sees them) and the
    reference HOG targets of those images (float64, loop-level reference, official layout).
    conftest's ``pt_batch`` fixture builds it once per module."""
    # Random uint8 images often have pixels whose horizontal gradient cancels to exactly 0 in
    # integers, where float rounding then picks orientation bin 0 or 8 (a tie of the official
    # formula, not an error). A horizontal ramp of slope 3 (+-24 in gx) over noise in 0..5 (at most
    # +-20) keeps gx away from 0 inside the image; gy, noise only, still spreads the bins.
    rng = np.random.default_rng(0)
    cols = np.arange(32)[None, None, :, None]
    sign = np.where(np.arange(8) % 2, 1, -1)[:, None, None, None]
    image = (120 + sign * 3 * (cols - 16) + rng.integers(0, 6, (8, 32, 32, 3))).astype(np.uint8)
    norm = ((image / 255.0 - MEAN) / STD).astype(np.float32)
    targets = np.stack([ref_tokens(ref_hog_cells(norm[b]), 2) for b in range(8)])     # (8, 4, 108)
    batch = {"image": image, "mask": MASK, "valid": VALID, "label": np.zeros(8, np.int32)}
    return batch, norm, targets


def init_model(c):
    """The model of ``c`` (seed 0) as its graphdef and pure-dict parameters."""
    with nnx.use_eager_sharding(False):
        graphdef, st = nnx.split(models.build(c, nnx.Rngs(0)))
    return graphdef, nnx.to_pure_dict(st)


# updates = gradients - params, so the step's new parameters are the gradients
GRADS = optax.GradientTransformation(lambda p: optax.EmptyState(),
                                     lambda g, s, p: (jax.tree.map(lambda gi, pi: gi - pi, g, p), s))


def run_step(c, graphdef, params, batch, tx=GRADS, step_fn=None, frozen=None, **kw):
    """One jitted pre-training step (``step_fn``, by default ``steps.make_pretrain_step``, made
    with ``kw``) from step 0: the new parameters (the gradients, with ``GRADS``) and the metrics.
    ``frozen``: the step's frozen input (a teacher's parameters), when given."""
    step = (step_fn or steps.make_pretrain_step)(graphdef, tx, lambda _: 0.0, c, patch=16, **kw)
    state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             nonfinite=jnp.zeros((), jnp.int32))
    new, m = jax.jit(step)(state, jax.tree.map(jnp.asarray, batch), *([frozen] if frozen else []))
    return jax.device_get(new.params), jax.device_get(m)


def old_pretrain_step(graphdef, tx, schedule, config, patch, temporal_stride=None, histogram="scatter"):
    """The HOG-only step as it was before config.target: one HOG target over the whole head."""
    base_key, h = jax.random.key(config.seed), config.hog

    def step(state, batch):
        images = steps.normalize(batch["image"], config.input.mean, config.input.std)
        t = jax.lax.stop_gradient(hog.hog_targets(images, patch_size=patch, nbins=h.nbins, cell_size=h.cell_size,
                                                  gaussian_window=h.gaussian_window, histogram=histogram))
        weight = (batch["mask"] & batch["valid"][:, None]).astype(jnp.float32)
        denom = jnp.maximum(weight.sum(), 1.0)
        inputs = {"images": images, "mask": batch["mask"], "targets": t, "weight": weight,
                  "rng": jax.random.fold_in(base_key, state.step)}

        def loss_fn(params, x):
            out = nnx.merge(graphdef, params)(x["images"], x["mask"], rng=x["rng"])
            return (jnp.square(out["pred_BxNxK"] - x["targets"]).mean(-1) * x["weight"]).sum() / denom

        loss, grads = steps.value_and_grad(loss_fn, state.params, inputs, config.optim.grad_accum_steps)
        return steps.apply_update(tx, state, loss, grads, {})

    return step


# ---------------------------------------------------------------------------------------------
# SSv2: clips whose frames show their own index, written as videos and read back
# ---------------------------------------------------------------------------------------------

def encode_clip(path, clip, codec="libvpx-vp9", rate=12):
    make_video_demo.encode(str(path), clip, codec, {"crf": "4", "b": "0"}, fps=rate)
    return str(path)


def index_clip(n, h=32, w=48):
    """Frame ``i`` shows ``i`` in gray levels (top half ``i % 16``, bottom ``i // 16``, each ``16 k + 8``)."""
    clip = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        clip[i, : h // 2], clip[i, h // 2:] = (i % 16) * 16 + 8, (i // 16) * 16 + 8
    return clip


def frame_ids(clip):
    """The index each frame of an ``index_clip`` (decoded, any size) shows."""
    h = clip.shape[1]
    lo, hi = clip[:, h // 4].mean(axis=(1, 2)), clip[:, 3 * h // 4].mean(axis=(1, 2))
    return (np.floor(lo / 16) + 16 * np.floor(hi / 16)).astype(int).tolist()


# ---------------------------------------------------------------------------------------------
# The video ViT: tiny.config overrides
# ---------------------------------------------------------------------------------------------

# ViT-mu/16 on 4 frames of 32x32: 2 x 2 x 2 = 8 tokens of 2x16x16 pixels
VIDEO = {"input.dataset": "video_demo", "video.num_frames": 4, "model.sep_pos_embed": True}
MAE = {**VIDEO, "mae.enabled": True, "mae.mask_ratio": 0.5, "mae.decoder_dim": 16, "mae.decoder_depth": 1,
       "mae.decoder_heads": 2, "target.hog": 0.0, "target.pixel": 1.0}
