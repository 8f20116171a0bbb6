"""Fine-tuning ViT-B/16 on ImageNet-1k from a MaskFeat checkpoint.

The setting ``configs/vit_in1k.py:B/16,ft`` under its own name; the recipe and its notes are there.

    python -m maskfeat_jax.main --config=configs/vit_b_in1k_ft.py --workdir=$WORKDIR/ft \\
        --config.init_from=$WORKDIR/pt --config.input.data_dir=$TFDS_DATA_DIR
"""
from maskfeat_jax import config_cli


def get_config():
    return config_cli.from_file(__file__, "vit_in1k.py:B/16,ft")
