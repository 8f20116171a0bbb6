"""The embedded default: MaskFeat pre-training of a small ViT on scikit-learn's digits.

Needs no download and runs on a laptop CPU (2 cores) in a few minutes with a clearly
falling loss. Same trainer, model and loss as the paper configs; only values differ.

    python -m maskfeat_jax.main --config=configs/demo.py --workdir=/tmp/maskfeat_demo
"""
from maskfeat_jax.config import base_config


def get_config():
    c = base_config()
    c.task = "pretrain"
    c.model.variant = "demo/16"        # width 128, depth 6, 4 heads, patch 16
    c.input.dataset = "digits"         # 1,437 train / 360 validation images, 10 classes
    c.input.image_size = 64            # 4x4 patches of 16 px, 8x8 HOG cells -> 108-d targets
    c.input.global_batch_size = 64
    c.input.worker_count = 0
    c.input.mean = (0.5, 0.5, 0.5)
    c.input.std = (0.5, 0.5, 0.5)
    c.mask.ratio = 0.4                 # at most round(16 * 0.4) = 6 of 16 patches
    c.epochs = 40
    c.optim.base_lr = 1.5e-3           # per 256 images; higher than the paper's for a short run
    c.optim.warmup_epochs = 2
    c.optim.grad_clip = 0.02
    c.log_every_steps = 10
    c.checkpoint.every_steps = 200
    c.evals.batch_size = 120
    c.evals.every_steps = 220          # k-NN and linear probe on frozen features every 10 epochs
    c.evals.probe = True
    c.evals.figures_every_steps = 220  # HOG prediction pictures in TensorBoard
    c.model.num_classes = 10
    return c
