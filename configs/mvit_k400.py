"""MaskFeat with MViTv2-S and MViTv2-L 16x4 on Kinetics-400: pre-training (spec 9.1) and fine-tuning (spec 9.2).

The argument after ``mvit_k400.py:`` is ``VARIANT[,ft][,runlocal]``: ``VARIANT`` is ``S`` (the
default) or ``L``; ``ft`` gives the fine-tuning recipe instead of pre-training; ``runlocal``
keeps the recipe but shrinks it to a smoke run on a laptop CPU (the ``mu`` model on the
embedded moving-digits clips, 8 frames of 64x64, batch 8, 3 steps, no download).

Pre-training (k400_MVITv2_S_16x4_MaskFeat_PT, k400_MVITv2_L_16x4_MaskFeat_PT):

    python -m maskfeat_jax.main --config=configs/mvit_k400.py:S --workdir=$WORKDIR/mvit_s_pt \\
        --config.video.csv_dir=/data/kinetics400/csv --config.video.root=/data/kinetics400/videos
    python -m maskfeat_jax.main --config=configs/mvit_k400.py:L --workdir=$WORKDIR/mvit_l_pt \\
        --config.video.csv_dir=/data/kinetics400/csv --config.video.root=/data/kinetics400/videos

``csv_dir`` holds train.csv and val.csv, one ``path label`` line per video (space or comma
separated; paths absolute or relative to ``video.root``). Official: 32 clips per 8-GPU node
with lr 1e-4 per node batch (scaled linearly here with reference_batch=32), AdamW wd 0.05,
10 warm-up epochs from 1e-6, cosine to 1e-6, clip 0.02, cube masking 40% on the 8x7x7 grid,
HOG of frames 0, 2, ..., 14 predicted on the 8x14x14 stride-16 grid. The official config
trains 300 epochs (the released MViTv2-S checkpoint: 300, fine-tuned to 82.2 top-1; the
released MViTv2-L one: 800, ``--config.epochs=800``, fine-tuned to 84.3). The global batch
of 256 (8 nodes) is this codebase's choice; set it to your hardware.

Fine-tuning from a pre-training workdir (k400_MVITv2_S_16x4_FT, k400_MVITv2_L_16x4_FT):

    python -m maskfeat_jax.main --config=configs/mvit_k400.py:S,ft --workdir=$WORKDIR/mvit_s_ft \\
        --config.init_from=$WORKDIR/mvit_s_pt \\
        --config.video.csv_dir=/data/kinetics400/csv --config.video.root=/data/kinetics400/videos
    python -m maskfeat_jax.main --config=configs/mvit_k400.py:L,ft --workdir=$WORKDIR/mvit_l_ft \\
        --config.init_from=$WORKDIR/mvit_l_pt \\
        --config.video.csv_dir=/data/kinetics400/csv --config.video.root=/data/kinetics400/videos

Official MViTv2-S: 16 videos x 2 repeated augmentations = 32 clips per node, base lr 6e-4,
layer decay 0.75, 100 epochs, 20 warm-up epochs from 1e-6, cosine to 1e-6, drop path 0.1,
clip 5.0, RandAugment m7-mstd0.5-inc1 (same ops on every frame), random erasing 0.25, mixup
0.8 / cutmix 1.0, label smoothing 0.1; test 1 spatial crop x 10 clips. The batch counts clips:
with ``video.num_sample = 2`` a step of 256 clips takes 128 videos, each decoded once into two
clips (same frames, their own RandAugment, crop, flip and erasing), and an epoch is one pass
over the videos (2 x num_videos / 256 steps). Official result: 82.2 top-1.

Official MViTv2-L: 16 clips per node, base lr 6e-4, layer decay 0.875, 75 epochs, 5 warm-up
epochs from 1e-8, cosine to 1e-5, drop path 0.2, clip 5.0; no repeated augmentation (the
official config leaves ``AUG.NUM_SAMPLE`` at 1). Official result: 84.3 top-1. The global batch
here is MViTv2-S's 256 clips, 16 nodes' worth of the official 16, so the linear rule (base lr
per 16 clips) gives a peak lr of 9.6e-3, with warm-up start and end lr scaled alike. That is
a large AdamW step for 48 blocks; to stay at the official single-node lr, pass
``--config.input.global_batch_size=16``, or a batch of your own (the lr follows it).

Smoke run on the CPU (pre-training; add ``,ft`` for fine-tuning):

    python -m maskfeat_jax.main --config=configs/mvit_k400.py:S,runlocal --workdir=/tmp/mvit_smoke
"""
from maskfeat_jax import config as config_lib, config_cli

# what differs between the variants; everything else is shared by the recipe functions below
PRETRAIN = {
    "S": {},
    "L": {"model.remat": "dots_saveable"},   # 48 blocks at 8x56x56 tokens: trade compute for memory
}
FINETUNE = {
    "S": {},
    "L": {"model.drop_path": 0.2, "model.remat": "dots_saveable", "epochs": 75,
          "video.num_sample": 1,               # AUG.NUM_SAMPLE not set: one clip per video
          "optim.reference_batch": 16, "optim.warmup_start_lr": 1e-8, "optim.end_lr": 1e-5,
          "optim.warmup_epochs": 5, "optim.layer_decay": 0.875},
}


def get_config(arg=None):
    variant, switches = config_cli.parse_arg(arg, tuple(PRETRAIN))
    c = config_lib.base_config()
    c.model.name = "mvit"
    c.model.variant = variant
    c.model.dtype = "auto"             # bf16 compute on GPU/TPU, f32 on CPU; official runs: float32 (deviation, see README)
    c.input.dataset = "video_csv"
    c.input.train_split = "train"
    c.input.eval_split = "validation"
    c.input.image_size = 224
    c.input.global_batch_size = 256
    c.input.mean = (0.45, 0.45, 0.45)  # the Kinetics normalisation
    c.input.std = (0.225, 0.225, 0.225)
    c.video.num_frames = 16
    c.video.sampling_rate = 4
    c.video.short_side = 256
    c.video.target_fps = 30.0          # DATA.TARGET_FPS default: spans in 30 fps time
    c.checkpoint.every_steps = 1000
    if "ft" in switches:
        _finetune(c)
        c.update_from_flattened_dict(FINETUNE[variant])
    else:
        _pretrain(c)
        c.update_from_flattened_dict(PRETRAIN[variant])
    if "runlocal" in switches:
        _runlocal(c)
    return c


def _pretrain(c):
    c.task = "pretrain"
    c.model.drop_path = 0.0
    c.mask.ratio = 0.4                 # cube masking
    c.epochs = 300
    c.optim.base_lr = 1e-4             # per 32 clips (one node)
    c.optim.reference_batch = 32
    c.optim.warmup_start_lr = 1e-6
    c.optim.end_lr = 1e-6
    c.optim.warmup_epochs = 10
    c.optim.weight_decay = 0.05
    c.optim.grad_clip = 0.02


def _finetune(c):
    c.task = "finetune"
    c.model.drop_path = 0.1
    c.model.num_classes = 400
    c.video.test_clips = 10
    c.video.test_crops = 1
    c.video.num_sample = 2             # AUG.NUM_SAMPLE: 2 (repeated augmentation)
    c.augment.randaug_magnitude = 7.0
    c.epochs = 100
    c.optim.base_lr = 6e-4             # per 32 clips (one node: 16 videos x 2 clips)
    c.optim.reference_batch = 32
    c.optim.warmup_start_lr = 1e-6
    c.optim.end_lr = 1e-6
    c.optim.warmup_epochs = 20
    c.optim.grad_clip = 5.0
    c.optim.layer_decay = 0.75
    c.evals.every_steps = 5000
    c.evals.batch_size = 64


def _runlocal(c):
    c.model.variant = "mu"             # 4 one-block stages, width 16 -> 128
    c.model.remat = "none"
    c.model.num_classes = 10           # the embedded clips' digits
    c.input.dataset = "video_demo"     # moving digits, written once as mp4 files
    c.input.image_size = 64
    c.input.global_batch_size = 8
    c.input.worker_count = 0
    c.video.num_frames = 8
    c.video.sampling_rate = 2
    c.video.short_side = 64
    c.video.target_fps = 0.0
    c.video.test_clips = 2
    c.total_steps = 3
    c.log_every_steps = 1
    c.evals.batch_size = 8
    c.checkpoint.every_steps = 3
