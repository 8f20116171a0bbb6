"""Fine-tuning ViT-B/16 on ImageNet-1k from a MaskFeat checkpoint (spec 9.2, in1k_VIT_B_MaskFeat_FT).

    python -m maskfeat_jax.main --config=configs/vit_b_in1k_ft.py --workdir=$WORKDIR/ft \\
        --config.init_from=$WORKDIR/pt --config.input.data_dir=$TFDS_DATA_DIR

Evaluate a saved checkpoint without training:
    python -m maskfeat_jax.main --config=configs/vit_b_in1k_ft.py --workdir=$WORKDIR/ft --mode=eval

Official: batch 512 per node, base lr 2e-3 per 512 images, layer decay 0.65, 100 epochs, warm-up
20 epochs from 1e-8, cosine to 1e-6, drop path 0.1, wd 0.05, no clipping, RandAugment
m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / cutmix 1.0 (switch 0.5), label smoothing 0.1.
Paper result: 84.0 top-1 (1600-epoch pre-training).
The global batch of 1024 (two nodes' worth) is this codebase's choice: the lr, warm-up start and
end lr scale linearly with it (peak 4e-3), as the official multi-node rule does. For the
one-node setting pass ``--config.input.global_batch_size=512`` (peak 2e-3).
"""
from maskfeat_jax.config import base_config


def get_config():
    c = base_config()
    c.task = "finetune"
    c.model.variant = "B/16"
    c.model.drop_path = 0.1
    c.model.dtype = "auto"             # bf16 compute on GPU/TPU, f32 on CPU; official runs: float32 (deviation, see README)
    c.model.num_classes = 1000
    c.input.dataset = "imagenet2012"
    c.input.image_size = 224
    c.input.global_batch_size = 1024
    c.epochs = 100
    c.optim.base_lr = 2e-3             # per reference_batch images
    c.optim.reference_batch = 512
    c.optim.warmup_start_lr = 1e-8
    c.optim.end_lr = 1e-6
    c.optim.warmup_epochs = 20
    c.optim.weight_decay = 0.05
    c.optim.grad_clip = 0.0            # none for ImageNet fine-tuning
    c.optim.layer_decay = 0.65
    c.evals.every_steps = 2500
    c.evals.batch_size = 1024          # divides 8..1024 devices; the last batch is padded
    c.checkpoint.every_steps = 2500
    return c
