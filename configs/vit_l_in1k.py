"""MaskFeat pre-training of ViT-L/16 on ImageNet-1k.

The setting ``configs/vit_in1k.py:L/16`` under its own name; the recipe and its notes are there.

    python -m maskfeat_jax.main --config=configs/vit_l_in1k.py --workdir=gs://BUCKET/maskfeat_vit_l \\
        --config.input.data_dir=gs://BUCKET/tensorflow_datasets
"""
from maskfeat_jax import config_cli


def get_config():
    return config_cli.from_file(__file__, "vit_in1k.py:L/16")
