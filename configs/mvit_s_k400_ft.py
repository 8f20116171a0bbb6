"""Fine-tuning MViTv2-S 16x4 on Kinetics-400 from MaskFeat (spec 9.2, k400_MVITv2_S_16x4_FT).

    python -m maskfeat_jax.main --config=configs/mvit_s_k400_ft.py --workdir=$WORKDIR/mvit_s_ft \\
        --config.init_from=$WORKDIR/mvit_s_pt \\
        --config.video.csv_dir=/data/kinetics400/csv --config.video.root=/data/kinetics400/videos

Official: 16 videos x 2 repeated augmentations = 32 clips per node, base lr 6e-4, layer
decay 0.75, 100 epochs, 20 warm-up epochs from 1e-6, cosine to 1e-6, drop path 0.1, clip
5.0, RandAugment m7-mstd0.5-inc1 (same ops on every frame), random erasing 0.25, mixup 0.8 /
cutmix 1.0, label smoothing 0.1; test 1 spatial crop x 10 clips. The batch counts clips: with
``video.num_sample = 2`` a step of 256 clips takes 128 videos, each decoded once into two
clips (same frames, their own RandAugment, crop, flip and erasing), and an epoch is one pass
over the videos (2 x num_videos / 256 steps).
Official result: 82.2 top-1 (300-epoch pre-training).
"""
from maskfeat_jax.config import base_config


def get_config(variant="S"):
    c = base_config()
    c.task = "finetune"
    c.model.name = "mvit"
    c.model.variant = variant
    c.model.drop_path = 0.1
    c.model.dtype = "auto"             # bf16 compute on GPU/TPU, f32 on CPU; official runs: float32 (deviation, see README)
    c.model.num_classes = 400
    c.input.dataset = "video_csv"
    c.input.train_split = "train"
    c.input.eval_split = "validation"
    c.input.image_size = 224
    c.input.global_batch_size = 256
    c.input.mean = (0.45, 0.45, 0.45)
    c.input.std = (0.225, 0.225, 0.225)
    c.video.num_frames = 16
    c.video.sampling_rate = 4
    c.video.short_side = 256
    c.video.target_fps = 30.0          # DATA.TARGET_FPS default: spans in 30 fps time
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
    c.checkpoint.every_steps = 1000
    return c
