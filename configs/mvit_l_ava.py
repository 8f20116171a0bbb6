"""AVA v2.2 action detection with MViTv2-L 40x3 from a Kinetics-400 MaskFeat model.

The setting ``configs/mvit_ava.py:L`` under its own name; the recipe and its notes are there.

    python -m maskfeat_jax.main --config=configs/mvit_l_ava.py --workdir=$WORKDIR/mvit_l_ava \\
        --config.init_from=$WORKDIR/mvit_l_ft --config.ava.root=/data/ava
"""
from maskfeat_jax import config_cli


def get_config():
    return config_cli.from_file(__file__, "mvit_ava.py:L")
