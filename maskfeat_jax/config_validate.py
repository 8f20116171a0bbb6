"""Checks of a config before any data is read or anything is compiled: every message names
the key (``config.<key>=value: ...``), so a wrong value is one line at start-up.

``maskfeat_jax.config`` re-exports ``validate`` and ``validate_workdir``.
"""
from __future__ import annotations

import difflib
import math
import os

# The dataset names, here only (this module imports nothing heavy; the data modules import these).
SSV2_DATASETS = ("ssv2", "ssv2_demo")  # Something-Something v2 (data.ssv2)
CLASSIFICATION_VIDEO_DATASETS = ("video_csv", "video_demo") + SSV2_DATASETS  # one label per video: data.sources
AVA_DATASETS = ("ava", "ava_demo")   # clips with person boxes (config.task = "detect"): data.ava_maps
VIDEO_DATASETS = CLASSIFICATION_VIDEO_DATASETS + AVA_DATASETS   # every clip dataset (MViTv2, the video ViT)
KNOWN_DATASETS = ("digits", "synthetic") + VIDEO_DATASETS  # plus TFDS names, "folder:<root>"


def is_video(config) -> bool:
    """Whether ``config`` trains on clips: an MViTv2, or any model (the video ViT) on a video dataset."""
    return config.model.name == "mvit" or config.input.dataset in VIDEO_DATASETS


def get(config, dotted):
    """``config["a"]["b"]`` for ``"a.b"``."""
    for k in dotted.split("."):
        config = config[k]
    return config


def validate(config, num_devices: int, num_processes: int = 1) -> None:
    """Checks the config before anything is built; raises ValueError naming the key."""
    if config.task not in ("pretrain", "finetune", "detect"):
        raise ValueError(f"config.task={config.task!r}: expected 'pretrain', 'finetune' or 'detect'")
    if config.model.name not in ("vit", "mvit"):
        raise ValueError(f"config.model.name={config.model.name!r}: known models are 'vit' and 'mvit'")
    _validate_program(config)
    if config.task == "pretrain":
        _validate_targets(config)
        _validate_mae_and_head(config, num_devices)
    if config.task == "detect" or config.input.dataset in AVA_DATASETS:
        _validate_ava(config)
    rate = config.model.get("head_dropout", 0.0)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"config.model.head_dropout={rate!r}: a dropout rate in [0, 1)")
    if is_video(config):
        _validate_video(config)
    _validate_shapes(config, num_devices)
    if not 0.0 < config.mask.ratio < 1.0:
        raise ValueError(f"config.mask.ratio={config.mask.ratio} must be in (0, 1)")
    _validate_batch(config, num_devices, num_processes)
    for key in ("log_every_steps", "evals.every_steps", "checkpoint.every_steps"):
        if get(config, key) < 1:
            raise ValueError(f"config.{key}={get(config, key)} must be at least 1 (a value above the run's "
                             f"steps acts only at the last step)")
    if config.optim.name not in ("adamw", "sgd"):
        raise ValueError(f"config.optim.name={config.optim.name!r}: expected 'adamw' or 'sgd'")
    if not 0.0 <= config.augment.mix_prob <= 1.0:
        raise ValueError(f"config.augment.mix_prob={config.augment.mix_prob!r}: a probability in [0, 1]")
    if config.nonfinite not in ("error", "skip"):
        raise ValueError(f"config.nonfinite={config.nonfinite!r}: expected 'error' or 'skip'")
    _validate_input(config)


def _validate_shapes(config, num_devices: int) -> None:
    """The mesh's tensor and fsdp axes against the model's heads, MLPs, widths and head outputs;
    the image size and (when HOG is a target) HOG cells against the patch size."""
    from maskfeat_jax import sharding
    from maskfeat_jax.models import vit  # local: keeps config import light
    if config.model.name == "mvit":
        from maskfeat_jax.models import mvit
        blocks = mvit.block_configs(mvit.parse_variant(config.model.variant), config.task == "pretrain")
        patch, widths = 16, sorted({d for b in blocks for d in b[:2]})   # prediction stride 16
        heads, mlps = min(b[2] for b in blocks), sorted({4 * b[0] for b in blocks})
    else:
        vsize, patch = vit.parse_variant(config.model.variant)
        widths, heads, mlps = [vsize.width], vsize.heads, [vsize.mlp]
    variant = f"config.model.variant={config.model.variant!r}"
    hog_on = config.task == "pretrain" and config.target.hog > 0
    if hog_on and (config.hog.cell_size < 1 or patch % config.hog.cell_size):
        raise ValueError(f"config.hog.cell_size={config.hog.cell_size} does not divide the patch size "
                         f"{patch} ({variant})")
    outputs = config.model.num_classes if config.task != "pretrain" else _target_features(config, patch)
    what = "config.model.num_classes" if config.task != "pretrain" else "features per token of config.target"
    _, fsdp, tensor = sharding.mesh_shape(config.mesh, num_devices)
    if heads % tensor or any(m % tensor for m in mlps):
        raise ValueError(f"config.mesh.tensor={tensor} does not divide the {heads} heads (fewest in a block) / "
                         f"{mlps} MLP units of {variant}")
    if outputs % tensor:
        raise ValueError(f"config.mesh.tensor={tensor} does not divide the head's {outputs} outputs ({what})")
    if any(w % fsdp for w in widths):
        raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the width{'s' * (len(widths) > 1)} "
                         f"{', '.join(map(str, widths))} of {variant}")
    size = config.input.image_size
    if size % patch:
        raise ValueError(f"config.input.image_size={size} is not a multiple of the patch size {patch} "
                         f"({variant})")


def _validate_targets(config) -> None:
    """``config.target``: each loss weight a finite number >= 0, at least one above 0; the HOG
    figures need the HOG target."""
    from maskfeat_jax.targets import WEIGHT_KEYS   # local: keeps config import light
    for key in WEIGHT_KEYS:
        w = get(config, key)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"config.{key}={w!r}: a loss weight must be a finite number >= 0 "
                             f"(0 turns the target off)")
    if not any(get(config, key) > 0 for key in WEIGHT_KEYS):
        raise ValueError(f"config.target: every loss weight is 0 "
                         f"({', '.join(f'config.{k}={get(config, k)}' for k in WEIGHT_KEYS)}); set one above 0")
    if config.evals.figures_every_steps > 0 and config.target.hog == 0:
        raise ValueError(f"config.evals.figures_every_steps={config.evals.figures_every_steps}: the figures draw "
                         f"HOG predictions and config.target.hog=0 turns HOG off; set it to 0")


def _validate_mae_and_head(config, num_devices: int) -> None:
    """``config.mae`` (ViT only; a ratio that keeps and masks at least one patch) and
    ``config.head`` (type; decoder widths, heads and MLPs against the mesh's fsdp and tensor axes)."""
    from maskfeat_jax import models, sharding
    models.head_depths(config)        # config.head.depths: blocks of the encoder, several on the linear head
    mae, head = config.get("mae") or {}, config.get("head") or {}
    decoders = []
    if mae.get("enabled", False):
        if config.model.name != "vit":
            raise ValueError(f"config.mae.enabled=True: MAE pre-training is implemented for the ViT only, not "
                             f"config.model.name={config.model.name!r}; set config.mae.enabled=False")
        from maskfeat_jax.models import mae as mae_lib
        n, frames = mae_lib.mask_layout(config)
        if mae.get("per_frame", False) and mae.get("tube", False):
            raise ValueError("config.mae.per_frame=True and config.mae.tube=True: choose one (per_frame draws "
                             "each temporal slot's mask on its own, tube repeats one spatial mask)")
        n, what = n // frames, "patches" if frames == 1 else "patches of each frame (config.mae.per_frame/tube)"
        keep = mae_lib.keep_count(n, mae.mask_ratio)
        if not 0.0 < mae.mask_ratio < 1.0 or not 0 < keep < n:
            raise ValueError(f"config.mae.mask_ratio={mae.mask_ratio}: must be in (0, 1) and keep between 1 and "
                             f"{n - 1} of the {n} {what} (keeps {keep})")
        if config.evals.figures_every_steps > 0:
            raise ValueError(f"config.mae.enabled=True: the HOG figures (config.evals.figures_every_steps="
                             f"{config.evals.figures_every_steps}) draw the dense model's predictions; set it to 0")
        decoders.append(("mae", mae))
    if head.get("type", "linear") not in ("linear", "transformer"):
        raise ValueError(f"config.head.type={head.type!r}: expected 'linear' or 'transformer'")
    if head.get("type", "linear") == "transformer" and not mae.get("enabled", False):
        if config.model.name != "vit":
            raise ValueError("config.head.type='transformer' is implemented for the ViT only; set 'linear'")
        decoders.append(("head", head))
    _, fsdp, tensor = sharding.mesh_shape(config.mesh, num_devices)
    for group, g in decoders:
        for key in ("decoder_dim", "decoder_depth", "decoder_heads"):
            v = g[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "decoder_depth" else 1):
                raise ValueError(f"config.{group}.{key}={v!r}: expected an integer >= "
                                 f"{0 if key == 'decoder_depth' else 1}")
        if g.decoder_dim % g.decoder_heads:
            raise ValueError(f"config.{group}.decoder_heads={g.decoder_heads} does not divide "
                             f"config.{group}.decoder_dim={g.decoder_dim}")
        if g.decoder_heads % tensor or g.decoder_dim % fsdp:
            raise ValueError(f"config.mesh (fsdp={fsdp}, tensor={tensor}) does not divide "
                             f"config.{group}.decoder_dim={g.decoder_dim} / decoder_heads={g.decoder_heads}")


def _target_features(config, patch: int) -> int:
    """Features per token of the pre-training head: the active targets side by side (MViTv2:
    temporal stride 2; video ViT: its tubelet)."""
    from maskfeat_jax import models, targets
    return targets.total_dim(targets.active(config, patch, models.temporal_stride(config)))


def _validate_batch(config, num_devices: int, num_processes: int) -> None:
    gb = config.input.global_batch_size
    if gb <= 0 or gb % num_devices:
        raise ValueError(f"config.input.global_batch_size={gb} is not divisible by the {num_devices} devices")
    if gb % num_processes:
        raise ValueError(f"config.input.global_batch_size={gb} is not divisible by the {num_processes} processes")
    k = config.optim.grad_accum_steps
    if k < 1 or gb % (k * num_devices):
        raise ValueError(f"config.optim.grad_accum_steps={k}: config.input.global_batch_size={gb} must split "
                         f"into {k} micro-batches of a multiple of the {num_devices} devices")


def _validate_input(config) -> None:
    """The image backend, the dataset (and its folder's splits, or its TFDS name) and the
    normalisation."""
    if config.input.image_backend not in ("cv2", "pil"):
        raise ValueError(f"config.input.image_backend={config.input.image_backend!r}: expected 'cv2' "
                         f"(simplejpeg + OpenCV) or 'pil' (Pillow)")
    ds = config.input.dataset
    if ds.startswith("folder:"):
        root = ds[len("folder:"):]
        if not os.path.isdir(root):
            raise ValueError(f"config.input.dataset={ds!r}: folder {root!r} does not exist")
        for key in _splits_read(config):    # found now, not at the first evaluation minutes in
            split = os.path.join(root, get(config, key))
            if not os.path.isdir(split):
                there = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
                raise ValueError(f"config.{key}={get(config, key)!r}: {split!r} does not exist (splits in "
                                 f"{root!r}: {there})")
    elif ds not in KNOWN_DATASETS:
        _check_tfds(ds, config.input.data_dir)
    for key in ("input.mean", "input.std"):    # one value would broadcast silently, two would fail late
        v = get(config, key)
        if not isinstance(v, (tuple, list)) or len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
            raise ValueError(f"config.{key}={v!r}: expected 3 numbers, one per RGB channel")
    if not all(x > 0 for x in config.input.std):
        raise ValueError(f"config.input.std={config.input.std!r}: every value must be positive")


def _splits_read(config) -> list[str]:
    """The config keys of the splits a run reads: the train split, and the eval split when the
    run evaluates (fine-tuning, the probe, HOG figures)."""
    evals = (config.task == "finetune" or config.evals.probe
             or (config.evals.figures_every_steps > 0 and config.task == "pretrain"))
    return ["input.train_split"] + (["input.eval_split"] if evals else [])


def _validate_program(config) -> None:
    """``config.platform``, ``model.dtype`` and ``model.attention`` (``platform.py``)."""
    from maskfeat_jax import platform as platform_lib
    plat = config.get("platform", "auto")
    if plat != "auto" and plat not in platform_lib.PLATFORMS:
        raise ValueError(f"config.platform={plat!r}: expected 'auto' or one of {platform_lib.PLATFORMS}")
    if config.model.dtype != "auto" and config.model.dtype not in platform_lib.DTYPES:
        raise ValueError(f"config.model.dtype={config.model.dtype!r}: expected 'auto' or one of "
                         f"{sorted(platform_lib.DTYPES)}")
    if config.model.attention not in platform_lib.ATTENTION:
        raise ValueError(f"config.model.attention={config.model.attention!r}: expected one of "
                         f"{platform_lib.ATTENTION}")
    if config.model.name == "mvit" and config.model.attention not in ("auto", "einsum"):
        raise ValueError(f"config.model.attention={config.model.attention!r}: MViTv2 adds per-example "
                         "relative-position biases to its logits and has one attention form: use 'auto'")


def validate_workdir(workdir: str, init_from: str = "") -> None:
    """The workdir (and ``config.init_from``): a local or mounted path, or a ``gs://`` URL
    (with gcsfs installed); anything else is refused before the run starts."""
    from maskfeat_jax import storage
    storage.check_url(workdir, "--workdir")
    storage.check_url(init_from or "", "config.init_from")


def _validate_video(config):
    """MViTv2 (always on clips) or the ViT on a video dataset."""
    if config.model.name == "vit":
        u = config.model.tubelet
        if isinstance(u, bool) or not isinstance(u, int) or u < 1 or config.video.num_frames % u:
            raise ValueError(f"config.model.tubelet={u!r}: the video ViT needs a positive integer that divides "
                             f"config.video.num_frames={config.video.num_frames}")
    else:
        from maskfeat_jax.models import mvit
        mvit.parse_variant(config.model.variant)
    if config.input.dataset not in VIDEO_DATASETS:
        raise ValueError(f"config.input.dataset={config.input.dataset!r}: MViTv2 reads "
                         f"{', '.join(repr(d) for d in VIDEO_DATASETS)}")
    if config.input.image_size % 32:
        raise ValueError(f"config.input.image_size={config.input.image_size} must be a multiple of 32 for "
                         f"video (one cube-mask unit is 32x32 pixels)")
    if config.model.name == "mvit" and config.video.num_frames % 2:
        raise ValueError(f"config.video.num_frames={config.video.num_frames} must be even (temporal stride 2)")
    if config.evals.probe:
        raise ValueError("config.evals.probe=True: the k-NN and linear probe read images; for a model on video "
                         "set config.evals.probe=False (fine-tuning's top-1/top-5 evaluates video models)")
    _validate_video_sampling(config)
    if config.input.dataset == "video_csv":
        d = config.video.csv_dir
        split_csv = os.path.join(d, f"{config.input.train_split}.csv")
        if not d or not os.path.isfile(split_csv):
            raise ValueError(f"config.video.csv_dir={d!r}: {split_csv!r} does not exist")


def _validate_video_sampling(config):
    """``video.sampling``, ``video.train_jitter_scales`` and ``video.frame_prefix`` (the SSv2 keys;
    the SSv2 folder itself is checked when the source opens it)."""
    from maskfeat_jax.data import video_maps   # local: keeps config import light
    v = config.video
    segment = video_maps.sampling(config) == "segment"
    if video_maps.jitter_scales(config) is not None and config.task == "pretrain":
        raise ValueError(f"config.video.train_jitter_scales={tuple(v.train_jitter_scales)!r}: the short-side jitter "
                         f"crops fine-tuning clips; pre-training crops with the random resized crop: set (0, 0)")
    if segment and v.test_clips != 1:
        raise ValueError(f"config.video.test_clips={v.test_clips}: with config.video.sampling='segment' every "
                         f"temporal view takes the same frames (the middle of each segment); set 1")
    if v.get("frame_prefix", None) is not None and config.input.dataset == "video_csv":
        raise ValueError(f"config.video.frame_prefix={v.frame_prefix!r}: frame lists are read for "
                         f"config.input.dataset='ssv2', not 'video_csv' (whose CSVs list videos)")
    if v.get("frame_prefix", None) is not None and not segment:
        raise ValueError(f"config.video.frame_prefix={v.frame_prefix!r}: frame lists are read with "
                         f"config.video.sampling='segment' only, got {v.sampling!r}")


def _check_tfds(name, data_dir):
    import tensorflow_datasets as tfds
    base = name.split(":")[0].split("/")[0]
    builders = tfds.list_builders(with_community_datasets=False)  # no network, no TensorFlow
    if base not in builders:
        close = difflib.get_close_matches(base, list(builders) + list(KNOWN_DATASETS), n=3)
        raise ValueError(f"config.input.dataset={name!r} is not a known dataset; did you mean {close}? "
                         f"(built in: {list(KNOWN_DATASETS)}, 'folder:<root>', or any TFDS name)")
    remote = data_dir is not None and "://" in data_dir     # gs://...: checked when tfds opens it
    if data_dir is not None and not remote and not os.path.isdir(os.path.expanduser(data_dir)):
        raise ValueError(f"config.input.data_dir={data_dir!r} does not exist")


def _validate_ava(config) -> None:
    """The detection keys, before anything is read: the task, model and dataset together, the
    ``config.ava`` group and the clip and crop keys it reads; a ValueError names the key."""
    from maskfeat_jax.data import ava, make_ava_demo     # local: keeps config import light
    from maskfeat_jax.evaluators import ava_map
    ds, a = config.input.dataset, config.ava
    if config.task != "detect":
        raise ValueError(f"config.task={config.task!r}: config.input.dataset={ds!r} (person boxes with action "
                         f"labels) trains with config.task='detect'")
    if ds not in AVA_DATASETS:
        raise ValueError(f"config.input.dataset={ds!r}: config.task='detect' reads {' or '.join(map(repr, AVA_DATASETS))}")
    if config.model.name != "mvit":
        raise ValueError(f"config.model.name={config.model.name!r}: the detection head is built on MViTv2 ('mvit')")
    if config.model.num_classes != ava.NUM_CLASSES:
        raise ValueError(f"config.model.num_classes={config.model.num_classes}: AVA's labels have "
                         f"{ava.NUM_CLASSES} action ids (the label map evaluates a subset); set {ava.NUM_CLASSES}")
    if isinstance(a.fps, bool) or not isinstance(a.fps, (int, float)) or not a.fps > 0:
        raise ValueError(f"config.ava.fps={a.fps!r}: the keyframe timeline's frames per second, a number > 0")
    if ds == "ava_demo" and a.fps != make_ava_demo.FPS:
        raise ValueError(f"config.ava.fps={a.fps}: the demo's videos run at {make_ava_demo.FPS} frames per second")
    if not 0.0 <= a.detection_score_thresh <= 1.0:
        raise ValueError(f"config.ava.detection_score_thresh={a.detection_score_thresh}: a score in [0, 1]")
    for key in ("max_boxes", "eval_second_stride"):
        v = a[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"config.ava.{key}={v!r}: expected an integer >= 1")
    if a.protocol not in ava_map.PROTOCOLS:
        raise ValueError(f"config.ava.protocol={a.protocol!r}: expected one of {ava_map.PROTOCOLS}")
    _validate_ava_clip(config)


def _validate_ava_clip(config) -> None:
    """The clip window, sampling and crop keys the AVA maps read."""
    from maskfeat_jax.data import ava
    v, size = config.video, config.input.image_size
    if v.get("sampling", "clip") != "clip":
        raise ValueError(f"config.video.sampling={v.sampling!r}: AVA clips are one window around the keyframe: "
                         f"set 'clip'")
    if v.get("num_sample", 1) != 1:
        raise ValueError(f"config.video.num_sample={v.num_sample}: repeated augmentation is not implemented for "
                         f"detection; set 1")
    if isinstance(v.sampling_rate, bool) or not isinstance(v.sampling_rate, int) or v.sampling_rate < 1:
        raise ValueError(f"config.video.sampling_rate={v.sampling_rate!r}: frames between clip frames, an integer >= 1")
    try:
        ava.clip_indices(ava.START_SECOND + 2, v.num_frames, v.sampling_rate, 10 ** 6)
    except ValueError as e:
        raise ValueError(f"config.video.num_frames={v.num_frames}, config.video.sampling_rate={v.sampling_rate}: "
                         f"{e}") from None
    scales = tuple(v.train_jitter_scales)
    if len(scales) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in scales) \
            or not size <= scales[0] <= scales[1]:
        raise ValueError(f"config.video.train_jitter_scales={scales!r}: AVA training scales the short side to a "
                         f"draw in (min, max), then crops; two ints with config.input.image_size={size} <= min <= "
                         f"max (officially (256, 320) for 224)")
