"""Fine-tuning the demo ViT on the embedded digits, from a demo pre-training run or from scratch.

    python -m maskfeat_jax.main --config=configs/demo.py --workdir=/tmp/maskfeat_demo
    python -m maskfeat_jax.main --config=configs/demo_ft.py --workdir=/tmp/maskfeat_demo_ft \\
        --config.init_from=/tmp/maskfeat_demo

The ImageNet fine-tuning recipe (layer decay, drop path, RandAugment, random erasing, label
smoothing, warm-up + cosine) adapted to 8x8 digits on a laptop CPU: a gentler crop (scale 0.35-1
instead of 0.08-1: a 8% crop of a digit is no longer a digit), no horizontal flip (digits are not
mirror-symmetric), RandAugment magnitude 5 instead of 9, no mixup/cutmix, 15 epochs.
"""
from maskfeat_jax.config import base_config


def get_config():
    c = base_config()
    c.task = "finetune"
    c.model.variant = "demo/16"
    c.model.drop_path = 0.1
    c.model.num_classes = 10
    c.input.dataset = "digits"
    c.input.image_size = 64
    c.input.global_batch_size = 64
    c.input.worker_count = 0
    c.input.mean = (0.5, 0.5, 0.5)
    c.input.std = (0.5, 0.5, 0.5)
    c.epochs = 15
    c.optim.base_lr = 2e-3             # per 64 images
    c.optim.reference_batch = 64
    c.optim.warmup_start_lr = 1e-8
    c.optim.end_lr = 1e-6
    c.optim.warmup_epochs = 2
    c.optim.grad_clip = 0.0
    c.optim.layer_decay = 0.75
    c.augment.crop_min_scale = 0.35
    c.augment.flip = False
    c.augment.randaug_magnitude = 5.0
    c.augment.mixup_alpha = 0.0
    c.augment.cutmix_alpha = 0.0
    c.log_every_steps = 20
    c.evals.every_steps = 110
    c.evals.batch_size = 120
    c.checkpoint.every_steps = 1000
    return c
