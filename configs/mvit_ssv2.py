"""Fine-tuning MViTv2-S 16x4 and MViTv2-L 40x3 on Something-Something v2 from a Kinetics MaskFeat model.

The argument after ``mvit_ssv2.py:`` is ``VARIANT[,runlocal]``: ``VARIANT`` is ``S`` (the
default; PySlowFast's configs/SSv2/MVITv2_S_16x4.yaml) or ``L`` (configs/SSv2/MVITv2_L_40x3.yaml);
``runlocal`` keeps the recipe but shrinks it to a smoke run on a laptop CPU (the ``mu`` model
on the embedded SSv2-like demo, 4 motion classes written once as webm files, 8 frames of
64x64, batch 8, 3 steps, no download).

    python -m maskfeat_jax.main --config=configs/mvit_ssv2.py:S --workdir=$WORKDIR/mvit_s_ssv2 \\
        --config.init_from=$WORKDIR/mvit_s_pt --config.video.csv_dir=/data/ssv2
    python -m maskfeat_jax.main --config=configs/mvit_ssv2.py:L --workdir=$WORKDIR/mvit_l_ssv2 \\
        --config.init_from=$WORKDIR/mvit_l_pt --config.video.csv_dir=/data/ssv2

``init_from`` is a Kinetics-400 MaskFeat workdir of this codebase (``configs/mvit_k400.py:S``
pre-training, or its ``,ft`` fine-tuning: only the encoder is loaded, the 174-way head is
new) or an official checkpoint converted first::

    python -m maskfeat_jax.convert --src=k400_MVIT_S_MaskFeat_PT_epoch_00300.pyth \\
        --config=configs/mvit_k400.py:S --out=$WORKDIR/mvit_s_pt

``video.csv_dir`` is the SSv2 folder as the dataset ships it (``data/ssv2.py``):
something-something-v2-labels.json, -train.json, -validation.json and the videos in
20bn-something-something-v2/<id>.webm (``--config.video.root`` for another video folder);
``--config.video.frame_prefix=/data/ssv2/frames`` reads PySlowFast's frame lists
(train.csv, val.csv in csv_dir) instead.

Official recipe (both yaml files; facts read from them): 16 (S) / 40 (L) frames spread over
the whole video, one per segment (a random frame of each in training, the middle one at
test), 174 classes, RandAugment rand-m7-n4-mstd0.5-inc1 on the frames at their own size,
short side jittered to an inverse-uniform draw in TRAIN_JITTER_SCALES, a random crop, no
flip (a flip turns "left to right" into "right to left"), random erasing 0.25, label
smoothing 0.1, test 1 temporal x 3 spatial crops (short side to the crop size, then
left/centre/right). S: a global batch of 16 clips (2 on each of 8 GPUs), 100 epochs, 3 warm-up epochs, drop path 0.4,
mixup 0.8 / cutmix 1.0 (prob 1.0, switch 0.5), mean/std 0.45/0.225, jitter [256, 320], crop
224, no gradient clipping. L: a global batch of 8 clips (1 per GPU), 40 epochs, 3 warm-up epochs, drop path 0.75,
MIXUP.PROB 0.0 (no mixing, label smoothing only), ImageNet mean/std, jitter [356, 446], crop
312, clip 2.0, activation checkpointing. Both: SGD, momentum 0.9, weight decay 1e-4 (none on
1-D parameters), base lr 0.0025 (S) / 0.00125 (L) for that global batch, warm-up from 1e-4 (S) /
1e-6 (L), cosine to 1e-6, no layer-wise decay; dropout 0.5 before the classifier's Linear
(MODEL.DROPOUT_RATE). The MaskFeat paper reports 75.0 top-1 on SSv2 with MViT-L (its abstract).

Deviations (this codebase cannot express the rest yet, or chooses otherwise):

* The global batch is 256 clips, as the Kinetics configs, and the lr follows it linearly
  (``optim.reference_batch`` is the official global batch: 16 for S, 8 for L), so the peak lr is
  0.04 for both; set the batch to your hardware, or pass ``--config.input.global_batch_size=16``
  (S) / ``8`` (L) for the official lr.
* L's crop is 320, not 312: MViTv2 here needs sides that are multiples of 32 (312 / 16 is no
  integer token grid); the jitter stays [356, 446].
* ``video.short_side`` (the 1-crop test, not used by the 3-crop test) is the jitter's minimum;
  DATA.SAMPLING_RATE (4 / 3 in the yaml) plays no part in segment sampling.
* COLOR_JITTER 0.4 is in the yaml but unused there too (RandAugment replaces it).

Smoke run on the CPU:

    python -m maskfeat_jax.main --config=configs/mvit_ssv2.py:S,runlocal --workdir=/tmp/mvit_ssv2_smoke
"""
from maskfeat_jax import config as config_lib, config_cli

# what differs between the variants; everything else is the S recipe below
VARIANTS = {
    "S": {},
    "L": {"model.drop_path": 0.75, "model.remat": "dots_saveable",   # MODEL.ACT_CHECKPOINT: True
          "input.image_size": 320,                                   # official 312 (module doc)
          "input.mean": (0.485, 0.456, 0.406), "input.std": (0.229, 0.224, 0.225),
          "video.num_frames": 40, "video.sampling_rate": 3, "video.short_side": 356,
          "video.train_jitter_scales": (356, 446),
          "augment.mix_prob": 0.0,                                   # MIXUP.PROB 0.0: label smoothing only
          "epochs": 40, "optim.base_lr": 0.00125, "optim.reference_batch": 8, "optim.warmup_start_lr": 1e-6,
          "optim.grad_clip": 2.0},
}


def get_config(arg=None):
    variant, switches = config_cli.parse_arg(arg, tuple(VARIANTS), switches=("runlocal",))
    c = config_lib.base_config()
    c.task = "finetune"
    c.init_from = ""                   # a Kinetics MaskFeat workdir or converted checkpoint (module doc)
    c.model.name = "mvit"
    c.model.variant = variant
    c.model.dtype = "auto"             # bf16 compute on GPU/TPU, f32 on CPU; official runs: float32
    c.model.drop_path = 0.4
    c.model.head_dropout = 0.5         # MODEL.DROPOUT_RATE
    c.model.num_classes = 174
    c.input.dataset = "ssv2"
    c.input.train_split = "train"
    c.input.eval_split = "validation"
    c.input.image_size = 224
    c.input.global_batch_size = 256
    c.input.mean = (0.45, 0.45, 0.45)  # DATA.MEAN / STD defaults (the S yaml sets none)
    c.input.std = (0.225, 0.225, 0.225)
    c.video.num_frames = 16
    c.video.sampling = "segment"       # one frame per segment of the whole video
    c.video.sampling_rate = 4          # the yaml's; unused by segment sampling
    c.video.short_side = 256           # the 1-crop test only (module doc)
    c.video.target_fps = 0.0
    c.video.train_jitter_scales = (256, 320)  # with INV_UNIFORM_SAMPLE, then a random crop
    c.video.test_clips = 1             # TEST.NUM_ENSEMBLE_VIEWS
    c.video.test_crops = 3             # TEST.NUM_SPATIAL_CROPS
    c.video.num_sample = 1             # AUG.NUM_SAMPLE
    c.augment.flip = False             # DATA.RANDOM_FLIP: False
    c.augment.randaug_ops = 4          # rand-m7-n4-mstd0.5-inc1
    c.augment.randaug_magnitude = 7.0
    c.augment.erase_prob = 0.25
    c.augment.mixup_alpha = 0.8
    c.augment.cutmix_alpha = 1.0
    c.augment.switch_prob = 0.5
    c.augment.label_smoothing = 0.1
    c.epochs = 100
    c.augment.mix_prob = 1.0           # MIXUP.PROB
    c.optim.name = "sgd"               # OPTIMIZING_METHOD: PyTorch SGD (L2 decay into the momentum)
    c.optim.momentum = 0.9
    c.optim.base_lr = 0.0025           # per 16 clips, the yaml's global batch
    c.optim.reference_batch = 16
    c.optim.warmup_start_lr = 1e-4
    c.optim.end_lr = 1e-6
    c.optim.warmup_epochs = 3
    c.optim.weight_decay = 1e-4        # ZERO_WD_1D_PARAM: not on biases and 1-D parameters
    c.optim.grad_clip = 0.0            # S: SOLVER.CLIP_GRAD_L2NORM not set
    c.optim.layer_decay = 1.0
    c.evals.every_steps = 1320         # about 2 epochs of the 168,913 training videos (TRAIN.EVAL_PERIOD 2)
    c.evals.batch_size = 64            # TEST.BATCH_SIZE
    c.checkpoint.every_steps = 1320    # TRAIN.CHECKPOINT_PERIOD 2 (epochs)
    c.update_from_flattened_dict(VARIANTS[variant])
    if "runlocal" in switches:
        _runlocal(c)
    return c


def _runlocal(c):
    c.model.variant = "mu"             # 4 one-block stages, width 16 -> 128
    c.model.remat = "none"
    c.model.num_classes = 4            # the demo's motion directions
    c.input.dataset = "ssv2_demo"      # moving digits, written once as webm files in SSv2's layout
    c.input.image_size = 64
    c.input.global_batch_size = 8
    c.input.worker_count = 0
    c.video.num_frames = 8
    c.video.short_side = 73
    c.video.train_jitter_scales = (73, 91)   # S's [256, 320] / 224 ratios at a 64 crop
    c.total_steps = 3
    c.log_every_steps = 1
    c.evals.batch_size = 8
    c.checkpoint.every_steps = 3
