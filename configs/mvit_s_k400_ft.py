"""Fine-tuning MViTv2-S 16x4 on Kinetics-400 from MaskFeat.

The setting ``configs/mvit_k400.py:S,ft`` under its own name; the recipe and its notes are there.

    python -m maskfeat_jax.main --config=configs/mvit_s_k400_ft.py --workdir=$WORKDIR/mvit_s_ft \\
        --config.init_from=$WORKDIR/mvit_s_pt \\
        --config.video.csv_dir=/data/kinetics400/csv --config.video.root=/data/kinetics400/videos
"""
from maskfeat_jax import config_cli


def get_config():
    return config_cli.from_file(__file__, "mvit_k400.py:S,ft")
