"""Deep-feature targets: each token's feature from a frozen ViT teacher (the paper's "deep
features" target, here from any ViT checkpoint this codebase reads, image or video).

* ``config.target.teacher``: a workdir, its ``checkpoints`` folder or one step folder that
  ``saved.load`` reads (a pre-training or fine-tuning run of this codebase, or an official
  checkpoint converted by ``python -m maskfeat_jax.convert``); its latest finished step when a
  workdir is given, resolved once per process. Only the teacher's encoder runs, in inference
  (no mask, no drop path), on the intact normalised images the student sees (re-normalised
  with the teacher's own ``input.mean`` / ``input.std`` when they differ).
* ``config.target.teacher_block``: the block whose output tokens are the targets, 0-based,
  negative from the end (-1: the last). The features are that block's output as it is: the
  ViT here has no norm after its blocks (pre-training drops it, as the official code does, and
  the classifier's LayerNorm acts on the pooled feature, not on the tokens), so -1 is the
  last block's raw output. The cls token is dropped; tokens are row-major over the patch grid,
  which must be the student's (same patch size and image size).
* ``config.target.teacher_l2norm``: each token's feature divided by its L2 norm
  (``max(||f||, 1e-6)``).

Video: a video ViT teacher (2x16x16 tubelets) gives one feature per space-time token of a
video student, the video ViT or MViTv2 (whose prediction grid, ``(T/2, H/16, W/16)``, is
the same), when frames, tubelet, patch and image size agree. MViTv2 teachers are not
supported yet (their tokens are pooled to another grid); a ``ValueError`` names the key.

The teacher's parameters are a frozen input of the step (``load``), never part of the train
state: no gradient reaches them and the optimizer never sees them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["L2_EPS", "check", "load", "target", "teacher_features"]

L2_EPS = 1e-6   # floor of a feature's norm under teacher_l2norm


@functools.lru_cache(maxsize=8)
def _resolved(path: str):
    """``(step folder, saved config)`` of the teacher ``path``, read once per process."""
    from maskfeat_jax import saved as saved_lib, storage
    directory, step = saved_lib.resolve(path, key="config.target.teacher")
    step_dir = str(storage.path(directory) / str(step))
    return step_dir, saved_lib.saved_config(step_dir)


def check(config, patch: int, temporal_stride: int | None = None):
    """The teacher's ``(step folder, saved config, block index >= 0)`` for a student of spatial
    ``patch``; a ``ValueError`` names the key at fault when the teacher cannot give per-token
    targets on the student's token grid."""
    from maskfeat_jax.models import mae, vit
    t = config.target
    path = t.get("teacher", "")
    if not path:
        raise ValueError(f"config.target.features={t.features}: the features target needs a teacher, "
                         f"config.target.teacher (a workdir or checkpoint step folder)")
    try:
        step_dir, tc = _resolved(str(path))
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ValueError(f"config.target.teacher={path!r}: cannot read a checkpoint there ({e})") from None
    if tc.model.name != "vit":
        raise ValueError(f"config.target.teacher={path!r}: a {tc.model.name!r} teacher is not supported yet; "
                         f"the teacher must be a ViT")
    t_video, t_tubelet = mae.video_input(tc), tc.model.get("tubelet", 2)
    if t_video != (temporal_stride is not None):
        raise ValueError(f"config.target.teacher={path!r}: {'a video' if t_video else 'an image'} teacher "
                         f"(input.dataset={tc.input.dataset!r}) for {'a video' if temporal_stride else 'an image'} "
                         f"student; the teacher must read what the student reads")
    if t_video and (t_tubelet != temporal_stride or tc.video.num_frames != config.video.num_frames):
        raise ValueError(f"config.target.teacher={path!r}: its token grid in time ({tc.video.num_frames} frames "
                         f"in tubelets of {t_tubelet}) differs from the student's ({config.video.num_frames} "
                         f"frames, {temporal_stride} per token); the teacher must give one feature per student token")
    size, t_patch = vit.parse_variant(tc.model.variant)
    if t_patch != patch or tc.input.image_size != config.input.image_size:
        raise ValueError(f"config.target.teacher={path!r}: its token grid (patch {t_patch}, image size "
                         f"{tc.input.image_size}) differs from the student's (patch {patch}, image size "
                         f"{config.input.image_size}); the teacher must give one feature per student token")
    block = t.get("teacher_block", -1)
    if isinstance(block, bool) or not isinstance(block, int) or not -size.depth <= block < size.depth:
        raise ValueError(f"config.target.teacher_block={block!r}: expected an integer in "
                         f"[-{size.depth}, {size.depth - 1}] (the teacher has {size.depth} blocks; -1: the last)")
    return step_dir, tc, block % size.depth


def _encoder_config(tc):
    """The teacher's config as a classifier's: its encoder alone, without a mask token or an
    MAE length (any teacher, dense or MAE pre-training or fine-tuning, runs on every patch)."""
    import ml_collections
    c = ml_collections.ConfigDict(tc.to_dict())
    c.task = "finetune"
    return c


@functools.lru_cache(maxsize=8)
def _encoder_graphdef(path: str, platform: str):
    """The teacher encoder's graphdef, as the program for ``platform``."""
    from maskfeat_jax import models
    return nnx.split(models.build_abstract(_encoder_config(_resolved(path)[1]), platform).encoder)[0]


def teacher_features(graphdef, params, images, *, block: int, l2norm: bool, renorm=None) -> jax.Array:
    """``(B, N, D)`` float32: the output tokens of block ``block`` of the encoder
    ``nnx.merge(graphdef, params)`` on ``images`` (cls dropped), L2-normalised per token with
    ``l2norm``; ``renorm = (scale, shift)``, if given, maps the images to the teacher's
    normalisation first (``x * scale + shift``). No gradient flows out."""
    params = jax.lax.stop_gradient(params)
    if renorm is not None:
        scale, shift = (jnp.asarray(r, jnp.float32).reshape((1,) * (images.ndim - 1) + (-1,)) for r in renorm)
        images = images * scale + shift
    out = nnx.merge(graphdef, params)(images, return_blocks=True)
    x = out["blocks"][block][:, 1:].astype(jnp.float32)
    if l2norm:
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), L2_EPS)
    return jax.lax.stop_gradient(x)


def _renorm(config, tc):
    """``(scale, shift)`` from the student's normalised images to the teacher's, or None."""
    import numpy as np
    ms, ss = np.asarray(config.input.mean, np.float64), np.asarray(config.input.std, np.float64)
    mt, st = np.asarray(tc.input.mean, np.float64), np.asarray(tc.input.std, np.float64)
    if np.array_equal(ms, mt) and np.array_equal(ss, st):
        return None
    # x_raw = x * ss + ms; teacher input = (x_raw - mt) / st
    return (ss / st).astype(np.float32), ((ms - mt) / st).astype(np.float32)


def target(config, patch: int, temporal_stride: int | None = None, platform: str | None = None):
    """``(dim, fn)``: the teacher's width and ``fn(images, params) -> (B, N, dim)`` float32,
    ``params`` the teacher encoder's parameters (``load``)."""
    from maskfeat_jax import platform as platform_lib
    from maskfeat_jax.models import vit
    step_dir, tc, block = check(config, patch, temporal_stride)
    width = vit.parse_variant(tc.model.variant)[0].width
    path, l2norm, renorm = str(config.target.teacher), bool(config.target.get("teacher_l2norm", False)), _renorm(config, tc)
    platform = platform or platform_lib.target(config, jax.devices())

    def fn(images, params):
        return teacher_features(_encoder_graphdef(path, platform), params, images, block=block, l2norm=l2norm,
                                renorm=renorm)

    return width, fn


def load(config, mesh=None, platform: str | None = None):
    """The teacher encoder's parameters, read once from ``config.target.teacher``: on ``mesh``
    sharded as a model's parameters are (the same logical-axis rules), else on the default
    device. The step's frozen input for the features target."""
    from maskfeat_jax import models, platform as platform_lib, saved as saved_lib, sharding
    path = str(config.target.teacher)
    step_dir, tc = _resolved(path)
    ec = _encoder_config(tc)
    platform = platform or platform_lib.target(config, mesh.devices if mesh is not None else jax.devices())
    if mesh is not None:
        with sharding.rules():
            _, abstract = nnx.get_abstract_model(lambda: models.build(ec, nnx.Rngs(0), platform), mesh)
    else:
        abstract = nnx.split(models.build_abstract(ec, platform))[1]
    like = nnx.to_pure_dict(abstract)["encoder"]
    src = saved_lib.flat_params(saved_lib.read_params(step_dir))
    leaves = []
    for key, x in saved_lib.flat_params(like).items():
        value = src.get(f"encoder/{key}")
        if value is None or tuple(value.shape) != tuple(x.shape):
            raise ValueError(f"config.target.teacher={path!r}: {step_dir} has no encoder parameter {key} of shape "
                             f"{tuple(x.shape)} (found {None if value is None else tuple(value.shape)})")
        leaves.append(value)
    host = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)
    if mesh is None:
        return jax.device_put(host)
    return jax.device_put(host, jax.tree.map(lambda a: a.sharding, like))
