"""The base config every file in ``configs/`` starts from, and its validation.

Each field is commented once here; the config files only change values. Validation
runs before any data is read or anything is compiled, and every message names the key.
"""
from __future__ import annotations

import difflib
import os

import ml_collections

KNOWN_DATASETS = ("digits", "synthetic", "video_csv", "video_demo")  # plus TFDS names, "folder:<root>"


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "pretrain"                 # "pretrain" (MaskFeat) or "finetune" (classification)
    c.seed = 0                          # seeds parameters, data order, masks and drop path
    c.epochs = 300.0                    # training length in epochs of the train split ...
    c.total_steps = -1                  # ... or, when > 0, in optimizer steps (overrides epochs)
    c.log_every_steps = 50              # metrics to metrics.jsonl, TensorBoard and the console
    c.nonfinite = "error"               # non-finite loss/grad norm: "error" stops, "skip" skips the update
    c.init_from = ""                    # fine-tuning: a pre-training workdir or checkpoint step dir (weights only)
    c.profile_start_step = -1          # >= 0: write a jax.profiler trace of a few steps to WORKDIR/profile
    c.profile_num_steps = 5             # steps in the trace
    c.peak_flops = 0.0                  # per-device peak FLOP/s for MFU; 0 = table by device kind (CPU: measured)
    c.platform = "auto"                 # program built for: "auto" (the mesh's devices), "cpu", "gpu", "tpu"

    c.model = ml_collections.ConfigDict()
    c.model.name = "vit"                # model family: "vit" (images) or "mvit" (MViTv2, video)
    c.model.variant = "B/16"            # ViT: size/patch (mu, demo, Ti, S, B, L, H); MViTv2: mu, S, B, L
    c.model.drop_path = 0.0             # stochastic depth at the last block (linear from 0)
    c.model.num_classes = 1000          # classifier outputs (fine-tuning)
    c.model.dtype = "auto"              # compute dtype: "auto" (bfloat16 on GPU/TPU, float32 on CPU),
    #                                     "float32" or "bfloat16"; params, optimizer, LayerNorm, softmax
    #                                     and loss stay float32
    c.model.attention = "auto"          # "auto" (platform.select_attention), "xla", "cudnn" or "einsum"
    c.model.remat = "none"              # rematerialisation per block: "none", "dots_saveable", "full"

    c.mask = ml_collections.ConfigDict()
    c.mask.ratio = 0.4                  # fraction to mask: image blocks (spec 4.1), video cubes (4.2)
    c.mask.min_aspect = 0.3             # block aspect ratio drawn log-uniform in [min, 1/min]
    c.mask.tries = 10                   # attempts per image block (video cubes: 100, spec 4.2)

    c.hog = ml_collections.ConfigDict()
    c.hog.nbins = 9                     # orientation bins over 180 degrees
    c.hog.cell_size = 8                 # pixels per HOG cell side
    c.hog.gaussian_window = 0           # 0 = off, as in the official runs

    c.input = ml_collections.ConfigDict()
    c.input.dataset = "imagenet2012"    # TFDS name, "digits" (embedded), "synthetic", "folder:<root>";
    #                                     video: "video_csv" (video.csv_dir) or "video_demo" (embedded)
    c.input.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data dir (None: TFDS default)
    c.input.train_split = "train"       # split to train on
    c.input.eval_split = "validation"   # held-out split for evaluation
    c.input.image_size = 224            # square input side in pixels
    c.input.global_batch_size = 2048    # images per step over all devices and hosts
    c.input.worker_count = -1           # grain workers per host, training and eval (0: main process; -1: cores - 1)
    c.input.prefetch = 2                # batches buffered per worker
    c.input.jpeg_draft = False          # JPEG DCT-scaled decode when the crop is >= 2x the output (big images only)
    c.input.image_backend = "cv2"  # "cv2": simplejpeg decode + OpenCV resize (fast); "pil": Pillow (the official numbers' exact path)
    c.input.synthetic_size = 4096       # examples in the "synthetic" dataset
    c.input.mean = (0.485, 0.456, 0.406)  # per-channel normalisation, applied on device
    c.input.std = (0.229, 0.224, 0.225)

    c.video = ml_collections.ConfigDict()  # used when config.model.name == "mvit"
    c.video.num_frames = 16             # frames per clip
    c.video.sampling_rate = 4           # take every 4th frame
    c.video.short_side = 256            # decode at this short side, then crop input.image_size
    c.video.target_fps = 0.0            # > 0: a clip spans num_frames * sampling_rate frames at this rate
                                        # (PySlowFast's DATA.TARGET_FPS); 0: the video's own frames
    c.video.csv_dir = ""                # folder with train.csv / val.csv ("path label" per line)
    c.video.root = ml_collections.config_dict.placeholder(str)  # relative paths in the CSVs (default: csv_dir)
    c.video.test_clips = 10             # temporal clips per video at evaluation (views are averaged)
    c.video.test_crops = 1              # spatial crops per clip at evaluation (1 or 3)
    c.video.num_sample = 1              # training clips per decoded video (repeated augmentation)

    c.augment = ml_collections.ConfigDict()  # fine-tuning only (pre-training: crop + flip)
    c.augment.crop_min_scale = 0.08     # fine-tuning random resized crop scale (min, 1)
    c.augment.flip = True               # random horizontal flip (pre-training and fine-tuning)
    c.augment.randaug_ops = 2           # RandAugment ops per image (rand-m9-mstd0.5-inc1)
    c.augment.randaug_magnitude = 9.0   # RandAugment magnitude (std 0.5, increasing op set)
    c.augment.erase_prob = 0.25         # random erasing probability, pixel mode, applied on device
    c.augment.mixup_alpha = 0.8         # on device, in the step; 0 disables
    c.augment.cutmix_alpha = 1.0        # on device, in the step; 0 disables
    c.augment.switch_prob = 0.5         # chance of cutmix instead of mixup when both are on
    c.augment.label_smoothing = 0.1     # folded into the mixed targets

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 2e-4              # peak lr per reference_batch images
    c.optim.reference_batch = 256       # lr = base_lr * global_batch_size / reference_batch
    c.optim.warmup_start_lr = 1e-6      # lr at step 0 (scaled like base_lr)
    c.optim.end_lr = 1e-6               # lr at the end of the cosine (scaled like base_lr)
    c.optim.warmup_epochs = 30.0        # linear warm-up length
    c.optim.weight_decay = 0.05         # decoupled; biases and 1-D parameters exempt
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 0.02            # global L2 norm clip; 0 disables
    c.optim.grad_accum_steps = 1        # micro-batches per step (same update, 1/k of the activations)
    c.optim.layer_decay = 1.0           # layer-wise lr decay (fine-tuning); 1.0 = off

    c.evals = ml_collections.ConfigDict()
    c.evals.every_steps = 1000          # fine-tuning: top-1/top-5 on input.eval_split (and at the end)
    c.evals.batch_size = 1024           # global evaluation batch (the last one is padded, never dropped)
    c.evals.probe = False               # also k-NN + linear probe on frozen features (small datasets)
    c.evals.figures_every_steps = 0     # pre-training (images): HOG prediction figures to TensorBoard

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                    # data-parallel axis (-1: all remaining devices)
    c.mesh.fsdp = 1                     # parameter/optimizer sharding axis
    c.mesh.tensor = 1                   # tensor-parallel axis (heads, MLP)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000     # periodic save interval (a final save always happens)
    c.checkpoint.max_to_keep = 3        # older checkpoints are deleted
    c.checkpoint.allow_config_change = False  # resume even if shape-changing keys differ
    return c


SHAPE_KEYS = ("task", "model.name", "model.variant", "model.num_classes", "input.image_size",
              "hog.nbins", "hog.cell_size", "video.num_frames")
# keys that change the optimizer state's structure only through a threshold: clipping on or off,
# layer-wise decay on or off
STRUCTURE_KEYS = {"optim.grad_clip": ("clipping", lambda v: v > 0),
                  "optim.layer_decay": ("layer-wise decay", lambda v: v < 1.0)}


def _get(config, dotted):
    for k in dotted.split("."):
        config = config[k]
    return config


def validate(config, num_devices: int, num_processes: int = 1) -> None:
    """Checks the config before anything is built; raises ValueError naming the key."""
    from maskfeat_jax.models import vit  # local: keeps config import light

    if config.task not in ("pretrain", "finetune"):
        raise ValueError(f"config.task={config.task!r}: expected 'pretrain' or 'finetune'")
    from maskfeat_jax import sharding
    if config.model.name not in ("vit", "mvit"):
        raise ValueError(f"config.model.name={config.model.name!r}: known models are 'vit' and 'mvit'")
    _validate_program(config)
    if config.model.name == "mvit":
        _validate_video(config)
        from maskfeat_jax.models import mvit
        blocks = mvit.block_configs(mvit.parse_variant(config.model.variant), config.task == "pretrain")
        patch, widths = 16, sorted({d for b in blocks for d in b[:2]})   # prediction stride 16
        heads, mlps = min(b[2] for b in blocks), sorted({4 * b[0] for b in blocks})
    else:
        vsize, patch = vit.parse_variant(config.model.variant)
        widths, heads, mlps = [vsize.width], vsize.heads, [vsize.mlp]
    outputs = (config.model.num_classes if config.task == "finetune"
               else 3 * config.hog.nbins * (patch // max(config.hog.cell_size, 1)) ** 2)
    _, fsdp, tensor = sharding.mesh_shape(config.mesh, num_devices)
    variant = f"config.model.variant={config.model.variant!r}"
    if heads % tensor or any(m % tensor for m in mlps):
        raise ValueError(f"config.mesh.tensor={tensor} does not divide the {heads} heads (fewest in a block) / "
                         f"{mlps} MLP units of {variant}")
    if outputs % tensor:
        raise ValueError(f"config.mesh.tensor={tensor} does not divide the head's {outputs} outputs "
                         f"({'config.model.num_classes' if config.task == 'finetune' else 'HOG features per token'})")
    if any(w % fsdp for w in widths):
        raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the width{'s' * (len(widths) > 1)} "
                         f"{', '.join(map(str, widths))} of {variant}")
    size = config.input.image_size
    if size % patch:
        raise ValueError(f"config.input.image_size={size} is not a multiple of the patch size {patch} "
                         f"(config.model.variant={config.model.variant!r})")
    if patch % config.hog.cell_size:
        raise ValueError(f"config.hog.cell_size={config.hog.cell_size} does not divide the patch size "
                         f"{patch} (config.model.variant={config.model.variant!r})")
    if not 0.0 < config.mask.ratio < 1.0:
        raise ValueError(f"config.mask.ratio={config.mask.ratio} must be in (0, 1)")
    gb = config.input.global_batch_size
    if gb <= 0 or gb % num_devices:
        raise ValueError(f"config.input.global_batch_size={gb} is not divisible by the {num_devices} devices")
    if gb % num_processes:
        raise ValueError(f"config.input.global_batch_size={gb} is not divisible by the {num_processes} processes")
    k = config.optim.grad_accum_steps
    if k < 1 or gb % (k * num_devices):
        raise ValueError(f"config.optim.grad_accum_steps={k}: config.input.global_batch_size={gb} must split "
                         f"into {k} micro-batches of a multiple of the {num_devices} devices")
    for key in ("log_every_steps", "evals.every_steps", "checkpoint.every_steps"):
        if _get(config, key) < 1:
            raise ValueError(f"config.{key}={_get(config, key)} must be at least 1 (a value above the run's "
                             f"steps acts only at the last step)")
    if config.nonfinite not in ("error", "skip"):
        raise ValueError(f"config.nonfinite={config.nonfinite!r}: expected 'error' or 'skip'")
    if config.input.image_backend not in ("cv2", "pil"):
        raise ValueError(f"config.input.image_backend={config.input.image_backend!r}: expected 'cv2' "
                         f"(simplejpeg + OpenCV) or 'pil' (Pillow)")
    ds = config.input.dataset
    if ds in ("video_csv", "video_demo") and config.model.name != "mvit":
        raise ValueError(f"config.input.dataset={ds!r} is a video dataset: set config.model.name='mvit'")
    if ds.startswith("folder:"):
        root = ds[len("folder:"):]
        if not os.path.isdir(root):
            raise ValueError(f"config.input.dataset={ds!r}: folder {root!r} does not exist")
        for key in _splits_read(config):    # found now, not at the first evaluation minutes in
            split = os.path.join(root, _get(config, key))
            if not os.path.isdir(split):
                there = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
                raise ValueError(f"config.{key}={_get(config, key)!r}: {split!r} does not exist (splits in "
                                 f"{root!r}: {there})")
    elif ds not in KNOWN_DATASETS:
        _check_tfds(ds, config.input.data_dir)
    for key in ("input.mean", "input.std"):    # one value would broadcast silently, two would fail late
        v = _get(config, key)
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
    from maskfeat_jax.models import mvit
    mvit.parse_variant(config.model.variant)
    if config.input.dataset not in ("video_csv", "video_demo"):
        raise ValueError(f"config.input.dataset={config.input.dataset!r}: MViTv2 reads 'video_csv' or "
                         f"'video_demo'")
    if config.input.image_size % 32:
        raise ValueError(f"config.input.image_size={config.input.image_size} must be a multiple of 32 for "
                         f"MViTv2 (one cube-mask unit is 32x32 pixels)")
    if config.video.num_frames % 2:
        raise ValueError(f"config.video.num_frames={config.video.num_frames} must be even (temporal stride 2)")
    if config.evals.probe:
        raise ValueError("config.evals.probe=True: the k-NN and linear probe read images; for MViTv2 on video "
                         "set config.evals.probe=False (fine-tuning's top-1/top-5 evaluates video models)")
    if config.input.dataset == "video_csv":
        d = config.video.csv_dir
        split_csv = os.path.join(d, f"{config.input.train_split}.csv")
        if not d or not os.path.isfile(split_csv):
            raise ValueError(f"config.video.csv_dir={d!r}: {split_csv!r} does not exist")


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


def shape_differences(saved: dict, config) -> list[str]:
    """Keys that change the shapes or the structure of the train state and differ between a
    saved and a new config (a checkpoint of one cannot be restored into the other)."""
    out = []
    saved = ml_collections.ConfigDict(saved)
    for key in SHAPE_KEYS + tuple(STRUCTURE_KEYS):
        if key.startswith("video.") and config.model.name != "mvit":
            continue                      # the video keys shape only MViTv2
        try:
            old, new = _get(saved, key), _get(config, key)
        except (KeyError, AttributeError):
            continue
        if key in STRUCTURE_KEYS:
            what, on = STRUCTURE_KEYS[key]
            if on(old) != on(new):
                out.append(f"{key}: saved {old!r}, now {new!r} ({what} {'on' if on(new) else 'off'} now, "
                           f"which changes the optimizer state)")
        elif old != new:
            out.append(f"{key}: saved {old!r}, now {new!r}")
    return out


def flat_keys(config, prefix="") -> list[str]:
    out = []
    for k, v in config.items():
        key = f"{prefix}{k}"
        out.extend(flat_keys(v, key + ".") if isinstance(v, ml_collections.ConfigDict) else [key])
    return out


def comments() -> dict[str, str]:
    """Each base config key's comment, read from ``base_config``'s source (a comment-only line
    continues the key above it)."""
    import inspect
    import re
    out, key = {}, None
    for line in inspect.getsource(base_config).splitlines():
        m = re.match(r"\s*c\.([\w.]+)\s*=.*?(?:#\s*(.*))?$", line)
        if m and "ConfigDict()" not in line:
            key = m.group(1)
            out[key] = m.group(2) or ""
        elif key and line.strip().startswith("#"):
            out[key] = f"{out[key]} {line.strip().lstrip('#').strip()}".strip()
    return out


def describe(config) -> list[str]:
    """``key = value  # comment`` for every key of ``config`` (``--print_config``), in the base
    config's order."""
    notes = comments()
    order = {k: i for i, k in enumerate(notes)}
    lines = []
    for key in sorted(flat_keys(config), key=lambda k: order.get(k, len(order))):
        note = notes.get(key, "")
        lines.append(f"{key} = {_get(config, key)!r}" + (f"  # {note}" if note else ""))
    return lines


def unknown_override_keys(config_file: str, argv) -> list[str]:
    """Messages for ``--config.<key>=...`` arguments naming keys the config does not have,
    each with the closest valid keys."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_config_file", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    keys = flat_keys(module.get_config())
    messages = []
    for arg in argv:
        if arg.startswith("--config.") and "=" in arg:
            key = arg[len("--config."):].split("=", 1)[0]
            if key not in keys:
                close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
                hint = f"; did you mean {' or '.join(close)}?" if close else ""
                messages.append(f"unknown config key config.{key}{hint}")
    return messages


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # holds configs/ in a clone


def resolve_config_file(spec: str) -> str:
    """``--config=FILE[:arg]`` as given when FILE exists, else FILE relative to the repository
    this package was installed from (``configs/demo.py`` works from any folder). A missing file
    is a ``ValueError`` naming it and the closest files in ``configs/``."""
    path, sep, arg = spec.partition(":")
    if os.path.isfile(path):
        return spec
    in_repo = os.path.join(REPO, path)
    if not os.path.isabs(path) and os.path.isfile(in_repo):
        return in_repo + sep + arg
    known = sorted(f"configs/{f}" for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py")) \
        if os.path.isdir(os.path.join(REPO, "configs")) else []
    close = difflib.get_close_matches(path.replace(os.sep, "/").split("/")[-1], [k[8:] for k in known], n=3)
    hint = f"; did you mean {' or '.join('configs/' + c for c in close)}?" if close else \
        (f"; the configs are {', '.join(known)}" if known else "")
    where = "" if os.path.isabs(path) else f" (looked in {os.getcwd()} and {REPO})"
    raise ValueError(f"--config={path}: no such file{where}{hint}")


HELP_FLAGS = ("--help", "-?", "--helpshort", "--helpfull", "--helpxml")


def flags_parser(flag_values):
    """An ``absl.app.run(..., flags_parser=)`` for a command with a ``--config`` file flag:
    ``--config`` is found from any folder (``resolve_config_file``); a missing config file, an
    unknown ``--config.<key>`` override (named, with the closest keys) or any other flag error
    is one line on stderr and exit code 2 instead of a traceback; ``--help`` (or ``-h``) exits 0."""
    import sys

    def parse(argv):
        argv = ["--help" if a == "-h" else a for a in argv]
        try:
            argv = [f"--config={resolve_config_file(a[len('--config='):])}" if a.startswith("--config=") else a
                    for a in argv]
            try:
                rest = flag_values(argv)
            except SystemExit as e:      # absl's --help prints the usage and exits 1
                if e.code == 1 and any(a.split("=")[0] in HELP_FLAGS for a in argv):
                    sys.exit(0)
                raise
            if "config" in flag_values and flag_values["config"].value is not None:
                getattr(flag_values["config"].value, "keys")   # a file that failed to load raises here
            return rest
        except Exception as e:  # noqa: BLE001 - ml_collections raises several types here
            config_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
            messages = []
            if config_file is not None:
                try:
                    messages = unknown_override_keys(config_file, argv)
                except Exception:  # noqa: BLE001 - the config file itself is broken: the original error
                    messages = []
            print("error: " + ("\n       ".join(messages) if messages else str(e)), file=sys.stderr)
            sys.exit(2)

    return parse
