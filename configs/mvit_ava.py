"""AVA v2.2 action detection with MViTv2-S 16x4 and MViTv2-L 40x3 from a Kinetics MaskFeat model.

The argument after ``mvit_ava.py:`` is ``VARIANT[,runlocal]``: ``VARIANT`` is ``S`` (the
default) or ``L``; ``runlocal`` keeps the recipe but shrinks it to a smoke run on a laptop CPU
(the ``mu`` model on the embedded AVA-like demo: moving digits as persons, written once in
AVA's own file formats; 8 frames of 64x64, batch 8, 3 steps, no download).

    python -m maskfeat_jax.main --config=configs/mvit_ava.py:S --workdir=$WORKDIR/mvit_s_ava \\
        --config.init_from=$WORKDIR/mvit_s_ft --config.ava.root=/data/ava
    python -m maskfeat_jax.main --config=configs/mvit_ava.py:L --workdir=$WORKDIR/mvit_l_ava \\
        --config.init_from=$WORKDIR/mvit_l_ft --config.ava.root=/data/ava

``init_from`` is a Kinetics-400 workdir of this codebase, MaskFeat pre-training
(``configs/mvit_k400.py:S``) or its Kinetics fine-tuning (``:S,ft``): only the encoder is loaded, the LayerNorm and the 80-way box head are new. ``ava.root`` is
PySlowFast's AVA folder (its DATASET.md) with the videos cut to minutes 15-30::

    /data/ava/annotations/ava_train_v2.2.csv, ava_val_v2.2.csv,
        ava_action_list_v2.2_for_activitynet_2019.pbtxt, ava_val_excluded_timestamps_v2.2.csv,
        person_box_67091280_iou90/ava_detection_train_boxes_and_labels_include_negative_v2.2.csv,
        person_box_67091280_iou90/ava_detection_val_boxes_and_labels.csv
    /data/ava/videos_15min/<video_id>.mp4 (or .mkv, .webm), frame 0 at second 900

Training reads the ground-truth boxes plus the person detections scoring >= 0.8 (the
"include negative" list: detections without an action are all-negative boxes); evaluation
scores the val detections >= 0.8 and reports frame-mAP@0.5 over the label map's 60 classes
(``eval/mAP``, PySlowFast's protocol), every keyframe by default
(``--config.ava.eval_second_stride=4`` is PySlowFast's quicker in-training subset).

From the official code (PySlowFast ``MViT`` with ``DETECTION.ENABLE`` and its
``ResNetRoIHead``; ``configs/AVA/SLOWFAST_32x2_R50_SHORT.yaml`` for the AVA data; facts read
from them): the last stage's map (stride 32) through the final LayerNorm, averaged over time,
RoIAlign 7x7 (aligned, adaptive sampling) and a max over the bins, dropout 0.5, a Linear to 80
classes, sigmoid binary cross-entropy; frames short side jittered in [256, 320]
(inverse-uniform), a random 224 crop and a flip; test: short side 224, centre crop;
detection score threshold 0.8.

The MaskFeat paper reports 38.8 mAP with MViTv2-L (its abstract); the optimizer, schedule and
clip settings of the papers' AVA runs are in their appendices, which could not be read here
and are not in PySlowFast's configs. Deviations and choices of this codebase:

* Optimizer and schedule: AdamW with the MaskFeat Kinetics fine-tuning's values of the same
  model (``mvit_k400.py:S,ft`` / ``:L,ft``: lr 6e-4 per 32 / 16 clips, layer decay 0.75 /
  0.875, weight decay 0.05 on matrices, drop path 0.1 / 0.2), 30 epochs with 5 warm-up epochs
  from 1e-6 and a cosine to 1e-6, no gradient clipping. PySlowFast's AVA configs train with
  SGD, but their values for MViTv2 are not in its configs, so the Kinetics fine-tuning's tested
  AdamW recipe is kept. The clips are the Kinetics models' own (S 16x4, L 40x3).
* The global batch is 256 clips, as the Kinetics configs (the lr follows it linearly); set it
  to your hardware (``--config.input.global_batch_size=16`` keeps L's single-node lr).
* L's crop is 320 (MViTv2-L 40x3 runs at 312 in the official Kinetics and SSv2 recipes; MViTv2
  here needs multiples of 32), its jitter [356, 446] (the [256, 320] / 224 ratios at 312).
* Resizing is Pillow's bilinear on decoded video frames (PySlowFast: cv2 on extracted JPEG frames).
* The head's LayerNorm and Linear start fresh with the Linear scaled by 0.001 (the MaskFeat
  fine-tuning's HEAD_INIT_SCALE).

Smoke run on the CPU:

    python -m maskfeat_jax.main --config=configs/mvit_ava.py:S,runlocal --workdir=/tmp/mvit_ava_smoke
"""
from maskfeat_jax import config as config_lib, config_cli

# AVA v2.2's training keyframes, at most (235 videos x seconds 902..1798), for the eval and save
# intervals only: an epoch's steps are counted from the keyframes the run finds
TRAIN_KEYFRAMES = 235 * 897

# what differs between the variants; everything else is the S recipe below
VARIANTS = {
    "S": {},
    "L": {"model.drop_path": 0.2, "model.remat": "dots_saveable",
          "input.image_size": 320,                                   # 312 in the 40x3 recipes (module doc)
          "video.num_frames": 40, "video.sampling_rate": 3, "video.train_jitter_scales": (356, 446),
          "optim.reference_batch": 16, "optim.layer_decay": 0.875},
}


def get_config(arg=None):
    variant, switches = config_cli.parse_arg(arg, tuple(VARIANTS), switches=("runlocal",))
    c = config_lib.base_config()
    c.task = "detect"
    c.init_from = ""                   # a Kinetics MaskFeat workdir (module doc)
    c.model.name = "mvit"
    c.model.variant = variant
    c.model.dtype = "auto"             # bf16 compute on GPU/TPU, f32 on CPU; official runs: float32
    c.model.drop_path = 0.1
    c.model.num_classes = 80           # MODEL.NUM_CLASSES: every AVA action id (60 evaluated)
    c.model.head_dropout = 0.5         # MODEL.DROPOUT_RATE
    c.input.dataset = "ava"
    c.input.image_size = 224           # DATA.TRAIN_CROP_SIZE / TEST_CROP_SIZE
    c.input.global_batch_size = 256
    c.input.mean = (0.45, 0.45, 0.45)  # DATA.MEAN / STD defaults
    c.input.std = (0.225, 0.225, 0.225)
    c.video.num_frames = 16
    c.video.sampling_rate = 4          # 16 x 4 frames at 30 fps around the keyframe
    c.video.train_jitter_scales = (256, 320)  # DATA.TRAIN_JITTER_SCALES, inverse-uniform draw
    c.augment.flip = True              # the AVA training flip (boxes flipped with the frames)
    c.augment.randaug_ops = 0          # the rest of the augment group is unused by detection
    c.augment.erase_prob = 0.0
    c.augment.mixup_alpha = 0.0
    c.augment.cutmix_alpha = 0.0
    c.augment.label_smoothing = 0.0
    c.ava.root = ""                    # the AVA folder (module doc)
    c.ava.fps = 30
    c.ava.detection_score_thresh = 0.8  # AVA.DETECTION_SCORE_THRESH of configs/AVA/*.yaml
    c.ava.train_detections = True      # TRAIN_PREDICT_BOX_LISTS: ground truth + detections
    c.ava.max_boxes = 16
    c.ava.eval_second_stride = 1
    c.ava.protocol = "pyslowfast"
    c.epochs = 30
    c.optim.base_lr = 6e-4             # AdamW, per 32 clips (module doc)
    c.optim.reference_batch = 32
    c.optim.warmup_start_lr = 1e-6
    c.optim.end_lr = 1e-6
    c.optim.warmup_epochs = 5
    c.optim.weight_decay = 0.05
    c.optim.grad_clip = 0.0
    c.optim.layer_decay = 0.75
    steps_per_epoch = TRAIN_KEYFRAMES // c.input.global_batch_size
    c.evals.every_steps = 5 * steps_per_epoch   # TRAIN.EVAL_PERIOD 5 (epochs)
    c.evals.batch_size = 64
    c.checkpoint.every_steps = steps_per_epoch  # TRAIN.CHECKPOINT_PERIOD 1 (epoch)
    c.update_from_flattened_dict(VARIANTS[variant])
    if "runlocal" in switches:
        _runlocal(c)
    return c


def _runlocal(c):
    c.model.variant = "mu"             # 4 one-block stages, width 16 -> 128
    c.model.remat = "none"
    c.input.dataset = "ava_demo"       # moving digits as persons, written once in AVA's file formats
    c.input.image_size = 64
    c.input.global_batch_size = 8
    c.input.worker_count = 0
    c.video.num_frames = 8
    c.video.sampling_rate = 1          # 8 frames of the demo's 6 fps around the keyframe
    c.video.train_jitter_scales = (73, 91)   # [256, 320] / 224 at a 64 crop
    c.ava.fps = 6                      # make_ava_demo.FPS
    c.ava.max_boxes = 6                # the demo's most boxes in a training keyframe
    c.total_steps = 3
    c.log_every_steps = 1
    c.evals.batch_size = 8
    c.checkpoint.every_steps = 3
