"""Fine-tuning MViTv2-S 16x4 on Something-Something v2 from a Kinetics-400 MaskFeat model.

The setting ``configs/mvit_ssv2.py:S`` under its own name; the recipe and its notes are there.

    python -m maskfeat_jax.main --config=configs/mvit_s_ssv2_ft.py --workdir=$WORKDIR/mvit_s_ssv2 \\
        --config.init_from=$WORKDIR/mvit_s_pt --config.video.csv_dir=/data/ssv2
"""
from maskfeat_jax import config_cli


def get_config():
    return config_cli.from_file(__file__, "mvit_ssv2.py:S")
