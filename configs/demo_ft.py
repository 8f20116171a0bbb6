"""Fine-tuning the demo ViT on the embedded digits, from a demo pre-training run or from scratch.

    python -m maskfeat_jax.main --config=configs/demo.py --workdir=/tmp/maskfeat_demo
    python -m maskfeat_jax.main --config=configs/demo_ft.py --workdir=/tmp/maskfeat_demo_ft \\
        --config.init_from=/tmp/maskfeat_demo

Same recipe as the ImageNet fine-tuning configs (layer decay, drop path, RandAugment, random
erasing, mixup/cutmix, label smoothing), shortened for a laptop CPU.
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
    c.optim.base_lr = 2e-3             # per 512 images, as ViT-B
    c.optim.reference_batch = 512
    c.optim.warmup_start_lr = 1e-8
    c.optim.end_lr = 1e-6
    c.optim.warmup_epochs = 2
    c.optim.grad_clip = 0.0
    c.optim.layer_decay = 0.65
    c.log_every_steps = 20
    c.evals.every_steps = 110
    c.evals.batch_size = 120
    c.checkpoint.every_steps = 1000
    return c
