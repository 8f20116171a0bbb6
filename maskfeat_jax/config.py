"""The base config every file in ``configs/`` starts from, and the plumbing around it.

Each field is commented once here; the config files only change values (their command-line
side, ``parse_arg``, ``from_file`` and ``flags_parser``, is ``config_cli``). Validation
(``config_validate``, re-exported here) runs before any data is read or anything is compiled,
and every message names the key.
"""
from __future__ import annotations

import re

import ml_collections

from maskfeat_jax.config_validate import is_video, validate, validate_workdir  # noqa: F401
from maskfeat_jax.config_validate import get as _get


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "pretrain"                 # "pretrain" (MaskFeat), "finetune" (classification) or "detect" (AVA)
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
    c.model.head_dropout = 0.0          # fine-tuning and detection: dropout before the head's Linear
    #                                     (official MODEL.DROPOUT_RATE; SSv2 and AVA: 0.5)
    c.model.tubelet = 2                 # ViT on a video dataset: frames per patch (official PATCH_KERNEL[0])
    c.model.sep_pos_embed = False       # ViT: separate spatial, temporal and class position tables
    #                                     (official SEP_POS_EMBED; its video ViT configs: True)

    c.mask = ml_collections.ConfigDict()
    c.mask.ratio = 0.4                  # fraction to mask: image blocks (spec 4.1), video cubes (4.2)
    c.mask.min_aspect = 0.3             # block aspect ratio drawn log-uniform in [min, 1/min]
    c.mask.tries = 10                   # attempts per image block (video cubes: 100, spec 4.2)

    c.hog = ml_collections.ConfigDict()
    c.hog.nbins = 9                     # orientation bins over 180 degrees
    c.hog.cell_size = 8                 # pixels per HOG cell side
    c.hog.gaussian_window = 0           # 0 = off, as in the official runs
    c.hog.normalize = True              # per-cell L2 normalisation of each histogram; False = the paper's
    #                                     ablation without local contrast normalisation

    _target_groups(c)
    _input_groups(c)
    _training_groups(c)
    return c


def _input_groups(c: ml_collections.ConfigDict) -> None:
    """The data: ``input`` (images, and what every dataset shares), ``video`` and ``ava``."""
    c.input = ml_collections.ConfigDict()
    c.input.dataset = "imagenet2012"    # TFDS name, "digits" (embedded), "synthetic", "folder:<root>";
    #                                     video: "video_csv" (video.csv_dir) or "video_demo" (embedded);
    #                                     detection: "ava" (ava.root) or "ava_demo" (embedded)
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
    c.input.std = (0.229, 0.224, 0.225)   # per-channel divisor after the mean, applied on device

    c.video = ml_collections.ConfigDict()  # used when config.model.name == "mvit"
    c.video.num_frames = 16             # frames per clip
    c.video.sampling_rate = 4           # take every 4th frame
    c.video.short_side = 256            # decode at this short side, then crop input.image_size
    c.video.target_fps = 0.0            # > 0: a clip spans num_frames * sampling_rate frames at this rate
                                        # (PySlowFast's DATA.TARGET_FPS); 0: the video's own frames
    c.video.csv_dir = ""                # folder with train.csv / val.csv ("path label" per line); input.dataset
    #                                     "ssv2" (Something-Something v2; "ssv2_demo": embedded, written here or to
    #                                     a cache folder): the folder of its something-something-v2-*.json files
    c.video.root = ml_collections.config_dict.placeholder(str)  # relative paths in the CSVs (default: csv_dir);
    #                                     ssv2: the videos' folder (default: csv_dir/20bn-something-something-v2)
    c.video.frame_prefix = ml_collections.config_dict.placeholder(str)  # ssv2: None reads the videos; a string
    #                                     reads the frame lists csv_dir/train.csv, val.csv (PySlowFast's), their
    #                                     paths joined to it (DATA.PATH_PREFIX; "" keeps them)
    c.video.sampling = "clip"           # temporal sampling: "clip" (one window of num_frames x sampling_rate)
    #                                     or "segment" (SSv2: one frame per segment of the whole video;
    #                                     sampling_rate and target_fps unused; every test view has the same frames)
    c.video.test_clips = 10             # temporal clips per video at evaluation (views are averaged)
    c.video.test_crops = 1              # spatial crops per clip at evaluation (1 or 3)
    c.video.num_sample = 1              # training clips per decoded video (repeated augmentation)
    c.video.train_jitter_scales = (0, 0)  # fine-tuning crop: (0, 0) = random resized crop (augment.crop_min_scale);
    #                                     (min, max) = frames decoded at full size, short side to an inverse-uniform
    #                                     draw in [min, max], random input.image_size crop (TRAIN_JITTER_SCALES)

    c.ava = ml_collections.ConfigDict()  # AVA v2.2 action detection (config.task = "detect")
    c.ava.root = ""                     # the AVA folder: annotations/ (v2.2 files) and videos_15min/<id>.mp4;
    #                                     "ava_demo": where the demo is written (default a cache folder)
    c.ava.fps = 30                      # keyframe timeline in frames per second (official frames: 30; demo: 6)
    c.ava.detection_score_thresh = 0.8  # person detections kept at or above this score (AVA.DETECTION_SCORE_THRESH)
    c.ava.train_detections = True       # train on the ground truth plus the detected boxes (with their labels;
    #                                     negatives all-zero), as TRAIN_PREDICT_BOX_LISTS; False: ground truth only
    c.ava.max_boxes = 16                # boxes per training clip (more are dropped, counted); evaluation
    #                                     makes room for the val split's most boxes
    c.ava.eval_second_stride = 1        # evaluate keyframes at seconds divisible by this (PySlowFast's
    #                                     in-training val: 4; 1 = every keyframe, FULL_TEST_ON_VAL)
    c.ava.protocol = "pyslowfast"       # frame-mAP order within a frame: "pyslowfast" or "activitynet"


def _target_groups(c: ml_collections.ConfigDict) -> None:
    """The groups of ``base_config`` that set what pre-training predicts and with which head:
    targets, the dense path's head, MAE mode."""
    c.target = ml_collections.ConfigDict()  # pre-training targets: one head, a masked-token MSE each
    c.target.hog = 1.0                  # loss weight of the HOG target (0 = off); MaskFeat's target
    c.target.pixel = 0.0                # loss weight of the RGB pixel target (0 = off), the paper's pixel-colour target
    c.target.norm_pix = True            # pixel target: each token's pixels standardised by their own mean
    #                                     and unbiased variance (official MASK.NORM_PRED_PIXEL)
    c.target.pixel_all_frames = False   # video pixel target: False = first frame of each 2-frame tubelet
    #                                     (official MASK.TIME_STRIDE_LOSS=True); True = the whole tubelet
    c.target.features = 0.0             # loss weight of a frozen teacher's per-token features (0 = off), the
    #                                     paper's deep-feature target (ViT students and teachers, images)
    c.target.teacher = ""               # features target: the teacher, a workdir or checkpoint step folder that
    #                                     saved.load reads (a ViT of the same patch and image size)
    c.target.teacher_block = -1         # features target: the teacher block whose output tokens are the targets
    #                                     (0-based, -1: the last; its raw output, the ViT has no final norm)
    c.target.teacher_l2norm = False     # features target: each token's teacher feature divided by its L2 norm

    c.head = ml_collections.ConfigDict()  # MaskFeat's prediction head (dense path, mae.enabled=False)
    c.head.type = "linear"              # "linear": LayerNorm + Linear (official MASK.HEAD_TYPE "separate", the
    #                                     default); "transformer": decoder blocks first ("separate_xformer")
    c.head.decoder_dim = 512            # transformer head: block width, a Linear to it when it differs from the
    #                                     encoder's (official MASK.DECODER_EMBED_DIM, default 512)
    c.head.decoder_depth = 2            # transformer head: blocks (official MASK.DECODER_DEPTH, default 0)
    c.head.decoder_heads = 16           # transformer head: attention heads per block
    c.head.depths = (-1,)               # encoder blocks (0-based, -1: the last) each feeding its own linear
    #                                     head, all predicting every target, losses summed (official
    #                                     MASK.PRETRAIN_DEPTH); the last block must be listed; MViTv2: blocks
    #                                     on the prediction grid only (after the last q-pooling)

    c.mae = ml_collections.ConfigDict()  # MAE-style pre-training (ViT only; official MASK.MAE_ON, default False)
    c.mae.enabled = False               # True: the encoder sees only the kept patches, a decoder predicts the
    #                                     targets of config.target on the masked ones; config.mask is unused
    c.mae.mask_ratio = 0.75             # random masking, exactly round(N * ratio) patches per example, drawn on
    #                                     device (official MASK.MAE_RND_MASK; its video MAE configs use 0.9)
    c.mae.decoder_dim = 512             # decoder width (official MASK.DECODER_EMBED_DIM, default 512)
    c.mae.decoder_depth = 8             # decoder blocks (official MASK.DECODER_DEPTH, default 0; MAE's 8)
    c.mae.decoder_heads = 16            # decoder attention heads (MAE's 16)
    c.mae.decoder_sep_pos_embed = False  # decoder: separate spatial, temporal and class position tables
    #                                     (official MASK.DECODER_SEP_POS_EMBED, default False)
    c.mae.per_frame = False             # video: each temporal slot masks the same count, drawn on its own
    #                                     (official MASK.PER_FRAME_MASKING, default False)
    c.mae.tube = False                  # video: one spatial mask repeated in every temporal slot
    #                                     (official AUG.MASK_TUBE, default False)


def _training_groups(c: ml_collections.ConfigDict) -> None:
    """The groups of ``base_config`` that set how it trains: augmentation, optimizer,
    evaluation, mesh and checkpoints."""
    c.augment = ml_collections.ConfigDict()  # fine-tuning only (pre-training: crop + flip)
    c.augment.crop_min_scale = 0.08     # fine-tuning random resized crop scale (min, 1)
    c.augment.flip = True               # random horizontal flip (pre-training and fine-tuning)
    c.augment.randaug_ops = 2           # RandAugment ops per image (rand-m9-mstd0.5-inc1)
    c.augment.randaug_magnitude = 9.0   # RandAugment magnitude (std 0.5, increasing op set)
    c.augment.erase_prob = 0.25         # random erasing probability, pixel mode, applied on device
    c.augment.mixup_alpha = 0.8         # on device, in the step; 0 disables
    c.augment.cutmix_alpha = 1.0        # on device, in the step; 0 disables
    c.augment.switch_prob = 0.5         # chance of cutmix instead of mixup when both are on
    c.augment.mix_prob = 1.0            # chance a batch is mixed at all (official MIXUP.PROB)
    c.augment.label_smoothing = 0.1     # folded into the mixed targets

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"              # "adamw" or "sgd" (PyTorch-style: L2 decay into the momentum)
    c.optim.base_lr = 2e-4              # peak lr per reference_batch images
    c.optim.reference_batch = 256       # lr = base_lr * global_batch_size / reference_batch
    c.optim.warmup_start_lr = 1e-6      # lr at step 0 (scaled like base_lr)
    c.optim.end_lr = 1e-6               # lr at the end of the cosine (scaled like base_lr)
    c.optim.warmup_epochs = 30.0        # linear warm-up length
    c.optim.weight_decay = 0.05         # decoupled; biases and 1-D parameters exempt
    c.optim.b1 = 0.9                    # AdamW first-moment decay
    c.optim.b2 = 0.999                  # AdamW second-moment decay
    c.optim.eps = 1e-8                  # AdamW denominator epsilon
    c.optim.momentum = 0.9              # SGD momentum (optim.name="sgd"); 0 = plain SGD
    c.optim.nesterov = False            # SGD: Nesterov momentum
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


SHAPE_KEYS = ("task", "model.name", "model.variant", "model.num_classes", "input.image_size",
              "hog.nbins", "hog.cell_size", "video.num_frames", "target.pixel_all_frames",
              "head.type", "head.decoder_dim", "head.decoder_depth", "head.decoder_heads",
              "mae.enabled", "mae.decoder_dim", "mae.decoder_depth", "mae.decoder_heads",
              "model.tubelet", "model.sep_pos_embed", "mae.decoder_sep_pos_embed", "target.teacher")
# keys that change the train state's structure only through a threshold: clipping or layer-wise
# decay on or off (the optimizer state), a pre-training target on or off (the head's width)
STRUCTURE_KEYS = {"optim.name": ("the optimizer", lambda v: v, "the optimizer state"),
                  "optim.grad_clip": ("clipping", lambda v: v > 0, "the optimizer state"),
                  "optim.layer_decay": ("layer-wise decay", lambda v: v < 1.0, "the optimizer state"),
                  "target.hog": ("the HOG target", lambda v: v > 0, "the prediction head"),
                  "target.pixel": ("the pixel target", lambda v: v > 0, "the prediction head"),
                  "target.features": ("the features target", lambda v: v > 0, "the prediction head"),
                  "head.depths": ("prediction heads:", lambda v: len(tuple(v)), "the prediction heads")}
# the values a config saved before these keys existed had
_SAVED_DEFAULTS = {"optim.name": "adamw", "target.hog": 1.0, "target.pixel": 0.0, "target.features": 0.0,
                   "head.depths": (-1,), "target.pixel_all_frames": False,
                   "head.type": "linear", "mae.enabled": False, "model.tubelet": 2, "model.sep_pos_embed": False,
                   "mae.decoder_sep_pos_embed": False, "target.teacher": ""}


def shape_differences(saved: dict, config) -> list[str]:
    """Keys that change the shapes or the structure of the train state and differ between a
    saved and a new config (a checkpoint of one cannot be restored into the other)."""
    out = []
    saved = ml_collections.ConfigDict(saved)
    video = is_video(config)
    for key in SHAPE_KEYS + tuple(STRUCTURE_KEYS):
        if (key.startswith("video.") or key == "model.tubelet") and not video:
            continue                      # the video keys shape only video models
        if key.startswith(("target.", "head.", "mae.")) and config.task != "pretrain":
            continue                      # these shape only the pre-training model
        if (key.startswith("head.decoder") and config.head.type != "transformer"
                or key.startswith("mae.decoder") and not config.mae.enabled):
            continue                      # a decoder's size matters only when there is one
        if key == "target.teacher" and (config.target.features <= 0
                                        or saved.get("target", {}).get("features", 0.0) <= 0):
            continue                      # with the features target on in both, the head is the teacher's width
        try:
            old = _get(saved, key) if key not in _SAVED_DEFAULTS else saved.get(key.split(".")[0], {}).get(
                key.split(".")[1], _SAVED_DEFAULTS[key])
            new = _get(config, key)
        except (KeyError, AttributeError):
            continue
        if key in STRUCTURE_KEYS:
            what, on, part = STRUCTURE_KEYS[key]
            if on(old) != on(new):
                now = ("on" if on(new) else "off") if isinstance(on(new), bool) else repr(on(new))
                out.append(f"{key}: saved {old!r}, now {new!r} ({what} {now} now, which changes {part})")
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
    out, key = {}, None
    source = "".join(inspect.getsource(f) for f in (base_config, _target_groups, _input_groups, _training_groups))
    for line in source.splitlines():
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
