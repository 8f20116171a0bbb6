"""MaskFeat pre-training of MViTv2-L 16x4 on Kinetics-400 (spec 9.1, k400_MVITv2_L_16x4_MaskFeat_PT).

    python -m maskfeat_jax.main --config=configs/mvit_l_k400.py --workdir=$WORKDIR/mvit_l_pt \\
        --config.video.csv_dir=/data/kinetics400/csv --config.video.root=/data/kinetics400/videos

Same recipe as MViTv2-S (see configs/mvit_s_k400.py). The released MViTv2-L checkpoint was
pre-trained for 800 epochs (``--config.epochs=800``) and fine-tunes to 84.3 top-1.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("mvit_s_k400", os.path.join(os.path.dirname(__file__), "mvit_s_k400.py"))
_s = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_s)


def get_config():
    c = _s.get_config("L")
    c.model.remat = "dots_saveable"    # 48 blocks at 8x56x56 tokens: trade compute for memory
    return c
