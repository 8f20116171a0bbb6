"""Fine-tuning MViTv2-L 16x4 on Kinetics-400 from MaskFeat (spec 9.2, k400_MVITv2_L_16x4_FT).

    python -m maskfeat_jax.main --config=configs/mvit_l_k400_ft.py --workdir=$WORKDIR/mvit_l_ft \\
        --config.init_from=$WORKDIR/mvit_l_pt \\
        --config.video.csv_dir=/data/kinetics400/csv --config.video.root=/data/kinetics400/videos

Official: 16 clips per node, base lr 6e-4, layer decay 0.875, 75 epochs, 5 warm-up epochs
from 1e-8, cosine to 1e-5, drop path 0.2, clip 5.0, RandAugment m7, random erasing 0.25,
mixup/cutmix, label smoothing 0.1; 1 x 10 views; no repeated augmentation (the official
config leaves ``AUG.NUM_SAMPLE`` at 1, unlike MViTv2-S). Official result: 84.3 top-1.

The global batch here is MViTv2-S's 256 clips, 16 nodes' worth of the official 16, so the
linear rule (base lr per 16 clips) gives a peak lr of 9.6e-3, with warm-up start and end lr
scaled alike. That is a large AdamW step for 48 blocks; to stay at the official single-node
lr, pass ``--config.input.global_batch_size=16``, or a batch of your own (the lr follows it).
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("mvit_s_k400_ft", os.path.join(os.path.dirname(__file__), "mvit_s_k400_ft.py"))
_s = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_s)


def get_config():
    c = _s.get_config("L")
    c.model.drop_path = 0.2
    c.model.remat = "dots_saveable"
    c.epochs = 75
    c.video.num_sample = 1             # AUG.NUM_SAMPLE not set: one clip per video
    c.optim.reference_batch = 16
    c.optim.warmup_start_lr = 1e-8
    c.optim.end_lr = 1e-5
    c.optim.warmup_epochs = 5
    c.optim.layer_decay = 0.875
    return c
