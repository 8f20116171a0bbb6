"""Fine-tuning ViT-L/16 on ImageNet-1k from a MaskFeat checkpoint (spec 9.2, in1k_VIT_L_MaskFeat_FT).

    python -m maskfeat_jax.main --config=configs/vit_l_in1k_ft.py --workdir=$WORKDIR/ft \\
        --config.init_from=$WORKDIR/pt --config.input.data_dir=$TFDS_DATA_DIR

Official: batch 256 per node, base lr 1e-3 per 256 images, layer decay 0.75, 50 epochs, warm-up
5 epochs from 1e-8, cosine to 1e-6, drop path 0.1; augmentation as ViT-B.
Paper result: 85.7 top-1 (1600-epoch pre-training).
The global batch of 1024 (four nodes' worth) is this codebase's choice: the lr, warm-up start and
end lr scale linearly with it (peak 4e-3), as the official multi-node rule does. For the
one-node setting pass ``--config.input.global_batch_size=256`` (peak 1e-3).
"""
from maskfeat_jax.config import base_config


def get_config():
    c = base_config()
    c.task = "finetune"
    c.model.variant = "L/16"
    c.model.drop_path = 0.1
    c.model.dtype = "auto"             # bf16 compute on GPU/TPU, f32 on CPU; official runs: float32 (deviation, see README)
    c.model.num_classes = 1000
    c.input.dataset = "imagenet2012"
    c.input.image_size = 224
    c.input.global_batch_size = 1024
    c.epochs = 50
    c.optim.base_lr = 1e-3             # per reference_batch images
    c.optim.reference_batch = 256
    c.optim.warmup_start_lr = 1e-8
    c.optim.end_lr = 1e-6
    c.optim.warmup_epochs = 5
    c.optim.weight_decay = 0.05
    c.optim.grad_clip = 0.0
    c.optim.layer_decay = 0.75
    c.evals.every_steps = 2500
    c.evals.batch_size = 1024          # divides 8..1024 devices; the last batch is padded
    c.checkpoint.every_steps = 2500
    return c
