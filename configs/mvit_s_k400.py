"""MaskFeat pre-training of MViTv2-S 16x4 on Kinetics-400 (spec 9.1, k400_MVITv2_S_16x4_MaskFeat_PT).

    python -m maskfeat_jax.main --config=configs/mvit_s_k400.py --workdir=$WORKDIR/mvit_s_pt \\
        --config.video.csv_dir=/data/kinetics400/csv --config.video.root=/data/kinetics400/videos

``csv_dir`` holds train.csv and val.csv, one ``path label`` line per video (space or comma
separated; paths absolute or relative to ``video.root``). Official: 32 clips per 8-GPU node
with lr 1e-4 per node batch (scaled linearly here with reference_batch=32), AdamW wd 0.05,
10 warm-up epochs from 1e-6, cosine to 1e-6, clip 0.02, cube masking 40% on the 8x7x7 grid,
HOG of frames 0, 2, ..., 14 predicted on the 8x14x14 stride-16 grid. The official config
trains 300 epochs (the released MViTv2-S checkpoint: 300, fine-tuned to 82.2 top-1).
The global batch of 256 (8 nodes) is this codebase's choice; set it to your hardware.
"""
from maskfeat_jax.config import base_config


def get_config(variant="S"):
    c = base_config()
    c.task = "pretrain"
    c.model.name = "mvit"
    c.model.variant = variant
    c.model.drop_path = 0.0
    c.model.dtype = "auto"             # bf16 compute on GPU/TPU, f32 on CPU; official runs: float32 (deviation, see README)
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
    c.mask.ratio = 0.4
    c.epochs = 300
    c.optim.base_lr = 1e-4             # per 32 clips (one node)
    c.optim.reference_batch = 32
    c.optim.warmup_start_lr = 1e-6
    c.optim.end_lr = 1e-6
    c.optim.warmup_epochs = 10
    c.optim.weight_decay = 0.05
    c.optim.grad_clip = 0.02
    c.checkpoint.every_steps = 1000
    return c
