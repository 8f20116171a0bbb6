"""MaskFeat with ViT-B/16 and ViT-L/16 on ImageNet-1k: pre-training (spec 9.1) and fine-tuning (spec 9.2).

The argument after ``vit_in1k.py:`` is ``VARIANT[,ft][,runlocal]``: ``VARIANT`` is ``B/16``
(the default) or ``L/16``; ``ft`` gives the fine-tuning recipe instead of pre-training;
``runlocal`` keeps the recipe but shrinks it to a smoke run on a laptop CPU (the ``mu/16``
model, random 32-pixel images, batch 8, 3 steps, no download).

Pre-training (in1k_VIT_B_MaskFeat_PT, in1k_VIT_L_MaskFeat_PT):

    python -m maskfeat_jax.main --config=configs/vit_in1k.py:B/16 --workdir=gs://BUCKET/maskfeat_vit_b \\
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets
    python -m maskfeat_jax.main --config=configs/vit_in1k.py:L/16 --workdir=gs://BUCKET/maskfeat_vit_l \\
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets

Global batch 2048 with lr 2e-4 per 256 images (linear scaling, as the official configs
scale per 8-GPU node). The official config file trains 300 epochs; the released
checkpoints (84.0 top-1 for ViT-B, 85.7 for ViT-L after fine-tuning) were trained for 1600:
set ``--config.epochs=1600`` to match them.

Fine-tuning from a pre-training workdir (in1k_VIT_B_MaskFeat_FT, in1k_VIT_L_MaskFeat_FT), and
evaluating a saved checkpoint without training:

    python -m maskfeat_jax.main --config=configs/vit_in1k.py:B/16,ft --workdir=$WORKDIR/ft \\
        --config.init_from=$WORKDIR/pt --config.input.data_dir=$TFDS_DATA_DIR
    python -m maskfeat_jax.main --config=configs/vit_in1k.py:B/16,ft --workdir=$WORKDIR/ft --mode=eval

Official ViT-B: batch 512 per node, base lr 2e-3 per 512 images, layer decay 0.65, 100 epochs,
warm-up 20 epochs from 1e-8, cosine to 1e-6, drop path 0.1, wd 0.05, no clipping, RandAugment
m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / cutmix 1.0 (switch 0.5), label smoothing 0.1.
Official ViT-L: batch 256 per node, base lr 1e-3 per 256 images, layer decay 0.75, 50 epochs,
warm-up 5 epochs; the rest as ViT-B. Paper results: 84.0 (B) and 85.7 (L) top-1 after
1600-epoch pre-training. The global batch of 1024 (two ViT-B nodes, four ViT-L nodes) is this
codebase's choice: the lr, warm-up start and end lr scale linearly with it (peak 4e-3), as the
official multi-node rule does. For the one-node setting pass
``--config.input.global_batch_size=512`` (ViT-B, peak 2e-3) or ``=256`` (ViT-L, peak 1e-3).

Smoke run on the CPU (pre-training; add ``,ft`` for fine-tuning):

    python -m maskfeat_jax.main --config=configs/vit_in1k.py:B/16,runlocal --workdir=/tmp/vit_smoke
"""
from maskfeat_jax import config as config_lib, config_cli

# what differs between the variants; everything else is shared by the recipe functions below
PRETRAIN = {"B/16": {}, "L/16": {}}
FINETUNE = {
    "B/16": {"epochs": 100, "optim.base_lr": 2e-3, "optim.reference_batch": 512, "optim.warmup_epochs": 20,
             "optim.layer_decay": 0.65},
    "L/16": {"epochs": 50, "optim.base_lr": 1e-3, "optim.reference_batch": 256, "optim.warmup_epochs": 5,
             "optim.layer_decay": 0.75},
}


def get_config(arg=None):
    variant, switches = config_cli.parse_arg(arg, tuple(PRETRAIN))
    c = config_lib.base_config()
    c.model.variant = variant
    c.model.dtype = "auto"             # bf16 compute on GPU/TPU, f32 on CPU; official runs: float32 (deviation, see README)
    c.input.dataset = "imagenet2012"
    c.input.image_size = 224
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
    c.input.global_batch_size = 2048
    c.mask.ratio = 0.4                 # block-wise, at most 78 of 196 patches
    c.epochs = 300
    c.optim.base_lr = 2e-4             # per 256 images
    c.optim.warmup_start_lr = 1e-6
    c.optim.end_lr = 1e-6
    c.optim.warmup_epochs = 30
    c.optim.weight_decay = 0.05
    c.optim.grad_clip = 0.02
    c.checkpoint.every_steps = 1000


def _finetune(c):
    c.task = "finetune"
    c.model.drop_path = 0.1
    c.model.num_classes = 1000
    c.input.global_batch_size = 1024
    c.optim.warmup_start_lr = 1e-8
    c.optim.end_lr = 1e-6
    c.optim.weight_decay = 0.05
    c.optim.grad_clip = 0.0            # none for ImageNet fine-tuning
    c.evals.every_steps = 2500
    c.evals.batch_size = 1024          # divides 8..1024 devices; the last batch is padded
    c.checkpoint.every_steps = 2500


def _runlocal(c):
    c.model.variant = "mu/16"          # width 32, depth 2
    c.input.dataset = "synthetic"      # random images, deterministic per index
    c.input.synthetic_size = 64
    c.input.image_size = 32
    c.input.global_batch_size = 8
    c.input.worker_count = 0
    c.total_steps = 3
    c.log_every_steps = 1
    c.evals.batch_size = 8
    c.checkpoint.every_steps = 3
