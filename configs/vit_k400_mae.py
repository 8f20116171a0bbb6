"""MAE-style pre-training of a video ViT (joint space-time attention over 2x16x16 tubelets) on
Kinetics-400, and fine-tuning from it: PySlowFast's k400_VIT_{B,L,H}_16x4_MAE_PT and _FT.

The argument after ``vit_k400_mae.py:`` is ``VARIANT[,pt|ft][,runlocal]``: ``VARIANT`` is ``B``
(the default), ``L`` or ``H``; ``pt`` (the default) pre-trains, ``ft`` fine-tunes; ``runlocal``
keeps the recipe but shrinks it to a smoke run on a laptop CPU (ViT-mu on the embedded
moving-digits clips, 8 frames of 64x64, batch 8, 3 steps, no download).

Pre-training (k400_VIT_B_16x4_MAE_PT, k400_VIT_L_16x4_MAE_PT, k400_VIT_H_16x4_MAE_PT):

    python -m maskfeat_jax.main --config=configs/vit_k400_mae.py:B --workdir=$WORKDIR/vit_b_mae \\
        --config.video.csv_dir=/data/kinetics400/csv --config.video.root=/data/kinetics400/videos
    python -m maskfeat_jax.main --config=configs/vit_k400_mae.py:L --workdir=$WORKDIR/vit_l_mae \\
        --config.video.csv_dir=/data/kinetics400/csv --config.video.root=/data/kinetics400/videos

The model (official MVIT/MASK keys): 16 frames of 224x224 cut into 2x16x16 tubelets
(PATCH_KERNEL = PATCH_STRIDE = (2, 16, 16)), an 8x14x14 token grid, a cls token, separate
spatial / temporal / class position tables (SEP_POS_EMBED: True), ViT blocks (MLP 4x, qkv
bias), a LayerNorm after the encoder; random masking of 90% of the 1568 space-time tokens
per clip (MAE_ON, MAE_RND_MASK, MASK_RATIO 0.9; PER_FRAME_MASKING off, ``config.mae.per_frame``);
the encoder sees the 156 kept tokens only; a decoder of 4 blocks of width 512 with 8 heads
(DECODER_DEPTH 4, DECODER_EMBED_DIM 512, heads = width / 64) and one joint position table
(DECODER_SEP_POS_EMBED: False); the target is the normalised pixels of the first frame of each
tubelet (PRED_HOG off, TIME_STRIDE_LOSS and NORM_PRED_PIXEL on: 768 values per token), an MSE
on the masked tokens. Optimizer: AdamW betas (0.9, 0.95), wd 0.05, clip 0.02, lr 1e-4 per node
batch (ViT-B: 64 clips; ViT-L, -H: 32) from 1e-6 over 60 (B, H) / 30 (L) warm-up epochs, cosine
to 1e-6, 200 epochs (H: 400).

Fine-tuning from a pre-training workdir (k400_VIT_{B,L,H}_16x4_FT):

    python -m maskfeat_jax.main --config=configs/vit_k400_mae.py:B,ft --workdir=$WORKDIR/vit_b_ft \\
        --config.init_from=$WORKDIR/vit_b_mae \\
        --config.video.csv_dir=/data/kinetics400/csv --config.video.root=/data/kinetics400/videos

Official: mean-pooled tokens, LayerNorm, dropout 0.3 (B, L) / 0.5 (H) (MODEL.DROPOUT_RATE,
``model.head_dropout``), Linear to 400 (head init x0.001); drop path 0.1 (B) /
0.2 (L, H); AdamW wd 0.05, clip 5.0; lr 6e-4 (B) / 3e-4 (L, H) with layer decay 0.65 / 0.75 /
0.8; 5 warm-up epochs from 1e-8, cosine to 1e-5 (B, L) / 1e-6 (H); 75 epochs (L: 50);
RandAugment m7-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / cutmix 1.0, label smoothing 0.1;
two clips per decoded video (AUG.NUM_SAMPLE 2; H: 1); test 3 spatial crops x 10 clips.

Deviations from the official recipe:

* Global batch: 512 clips (ViT-B) / 256 (ViT-L, -H) pre-training, 256 fine-tuning, i.e. 8 nodes;
  the lr follows the batch linearly (``optim.reference_batch`` = the official per-node batch).
* Pre-training draws one clip per decoded video; the official configs take 4 clips at different
  times from each (DATA.TRAIN_CROP_NUM_TEMPORAL: 4), so an official epoch holds 4x the clips:
  ``--config.epochs=800`` (H: 1600) matches the official number of clips seen.
* Decoding: short side 256 then the random resized crop (as ``mvit_k400.py``); official decodes
  at 320 (DECODING_SHORT_SIZE).
* ViT-B fine-tuning: the yaml's TRAIN.BATCH_SIZE is 1 (which cannot split over its 8 GPUs);
  the lr is taken per 32 clips as ViT-L's (16 videos x 2 clips).
* The official runs stop when the loss jumps 2x (TRAIN.KILL_LOSS_EXPLOSION_FACTOR); here only a
  non-finite loss stops a run (``config.nonfinite``).
* Compute in bfloat16 on GPU/TPU (``model.dtype='auto'``); official runs: float32.

Smoke run on the CPU (pre-training; add ``,ft`` for fine-tuning):

    python -m maskfeat_jax.main --config=configs/vit_k400_mae.py:B,runlocal --workdir=/tmp/vit_mae_smoke
"""
from maskfeat_jax import config as config_lib, config_cli

# what differs between the variants; everything else is shared by the recipe functions below
PRETRAIN = {
    "B": {"model.variant": "B/16", "input.global_batch_size": 512, "optim.reference_batch": 64,
          "optim.warmup_epochs": 60},
    "L": {"model.variant": "L/16", "input.global_batch_size": 256, "optim.reference_batch": 32,
          "optim.warmup_epochs": 30},
    "H": {"model.variant": "H/16", "input.global_batch_size": 256, "optim.reference_batch": 32,
          "optim.warmup_epochs": 60, "epochs": 400, "model.remat": "dots_saveable"},
}
FINETUNE = {
    "B": {"model.variant": "B/16", "model.drop_path": 0.1, "optim.base_lr": 6e-4, "optim.layer_decay": 0.65,
          "epochs": 75, "model.head_dropout": 0.3},
    "L": {"model.variant": "L/16", "model.drop_path": 0.2, "optim.base_lr": 3e-4, "optim.layer_decay": 0.75,
          "epochs": 50, "model.head_dropout": 0.3},
    "H": {"model.variant": "H/16", "model.drop_path": 0.2, "optim.base_lr": 3e-4, "optim.layer_decay": 0.8,
          "model.head_dropout": 0.5,
          "epochs": 75, "optim.end_lr": 1e-6, "video.num_sample": 1, "optim.reference_batch": 16,
          "model.remat": "dots_saveable"},
}


def get_config(arg=None):
    variant, switches = config_cli.parse_arg(arg, tuple(PRETRAIN), switches=("pt", "ft", "runlocal"))
    if {"pt", "ft"} <= switches:
        raise ValueError(f"config argument {arg!r}: choose one of pt (pre-training) and ft (fine-tuning)")
    c = config_lib.base_config()
    c.model.name = "vit"
    c.model.tubelet = 2                # PATCH_KERNEL = PATCH_STRIDE = (2, 16, 16)
    c.model.sep_pos_embed = True       # SEP_POS_EMBED: True
    c.model.dtype = "auto"             # bf16 compute on GPU/TPU, f32 on CPU; official runs: float32
    c.input.dataset = "video_csv"
    c.input.train_split = "train"
    c.input.eval_split = "validation"
    c.input.image_size = 224
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
    c.mae.enabled = True               # MAE_ON, MAE_RND_MASK
    c.mae.mask_ratio = 0.9             # AUG.MASK_RATIO
    c.mae.per_frame = False            # PER_FRAME_MASKING default
    c.mae.tube = False                 # AUG.MASK_TUBE default
    c.mae.decoder_dim = 512            # DECODER_EMBED_DIM
    c.mae.decoder_depth = 4            # DECODER_DEPTH
    c.mae.decoder_heads = 8            # MSSeparateHead: DECODER_EMBED_DIM // 64
    c.mae.decoder_sep_pos_embed = False  # DECODER_SEP_POS_EMBED default
    c.target.hog = 0.0                 # PRED_HOG not set: pixels
    c.target.pixel = 1.0
    c.target.norm_pix = True           # NORM_PRED_PIXEL default
    c.target.pixel_all_frames = False  # TIME_STRIDE_LOSS default: the first frame of each tubelet
    c.epochs = 200
    c.optim.base_lr = 1e-4             # per optim.reference_batch clips (one node)
    c.optim.warmup_start_lr = 1e-6
    c.optim.end_lr = 1e-6
    c.optim.weight_decay = 0.05
    c.optim.b1, c.optim.b2 = 0.9, 0.95  # SOLVER.BETAS
    c.optim.grad_clip = 0.02


def _finetune(c):
    c.task = "finetune"
    c.model.num_classes = 400
    c.input.global_batch_size = 256
    c.video.test_clips = 10            # NUM_TEMPORAL_CLIPS [5, 7, 10]: the 10-clip figure
    c.video.test_crops = 3             # NUM_SPATIAL_CROPS: 3
    c.video.num_sample = 2             # AUG.NUM_SAMPLE: 2 (repeated augmentation)
    c.augment.randaug_magnitude = 7.0  # rand-m7-mstd0.5-inc1
    c.augment.erase_prob = 0.25
    c.augment.mixup_alpha = 0.8
    c.augment.cutmix_alpha = 1.0
    c.augment.label_smoothing = 0.1
    c.optim.reference_batch = 32       # 16 videos x 2 clips per node
    c.optim.warmup_start_lr = 1e-8
    c.optim.end_lr = 1e-5
    c.optim.warmup_epochs = 5
    c.optim.weight_decay = 0.05
    c.optim.grad_clip = 5.0
    c.evals.every_steps = 5000
    c.evals.batch_size = 64


def _runlocal(c):
    c.model.variant = "mu/16"          # width 32, 2 blocks
    c.model.remat = "none"
    c.model.num_classes = 10           # the embedded clips' digits
    c.input.dataset = "video_demo"     # moving digits, written once as mp4 files
    c.input.image_size = 64            # 4 x 4 patches
    c.input.global_batch_size = 8
    c.input.worker_count = 0
    c.video.num_frames = 8             # 4 tubelets: 64 tokens, 6 kept at 0.9
    c.video.sampling_rate = 2
    c.video.short_side = 64
    c.video.target_fps = 0.0
    c.video.test_clips = 2
    c.video.test_crops = 1
    c.video.num_sample = 1
    c.mae.decoder_dim = 32
    c.mae.decoder_depth = 1
    c.mae.decoder_heads = 2
    c.total_steps = 3
    c.log_every_steps = 1
    c.evals.batch_size = 8
    c.checkpoint.every_steps = 3
