"""MaskFeat pre-training of MViTv2-L 16x4 on Kinetics-400.

The setting ``configs/mvit_k400.py:L`` under its own name; the recipe and its notes are there.

    python -m maskfeat_jax.main --config=configs/mvit_l_k400.py --workdir=$WORKDIR/mvit_l_pt \\
        --config.video.csv_dir=/data/kinetics400/csv --config.video.root=/data/kinetics400/videos
"""
from maskfeat_jax import config_cli


def get_config():
    return config_cli.from_file(__file__, "mvit_k400.py:L")
