"""Config validation: every bad value stops before compile with a message naming the key."""
import importlib.util
import json
import pathlib

import pytest

from maskfeat_jax import config as config_lib, config_cli
import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cfg(**kw):
    """The tiny pre-training config on the embedded digits, then ``kw`` (``{"dotted.key": value}``)."""
    return tiny.config(overrides={"input.dataset": "digits", "model.num_classes": 1000, **kw})


@pytest.mark.parametrize("overrides,key", [
    ({"input.image_size": 40}, "config.input.image_size"),
    ({"hog.cell_size": 6}, "config.hog.cell_size"),
    ({"input.global_batch_size": 12}, "config.input.global_batch_size"),
    ({"mask.ratio": 1.0}, "config.mask.ratio"),
    ({"mask.ratio": 0.0}, "config.mask.ratio"),
    ({"model.variant": "Q/16"}, "config.model.variant"),
    ({"input.dataset": "imagenet2013"}, "config.input.dataset"),
    ({"input.dataset": "folder:/does/not/exist"}, "config.input.dataset"),
    ({"input.dataset": "imagenet2012", "input.data_dir": "/does/not/exist"}, "config.input.data_dir"),
    ({"task": "distill"}, "config.task"),
    ({"mesh.tensor": 4, "mesh.data": 2}, "config.mesh.tensor"),
    ({"mesh.fsdp": 8, "mesh.data": 1, "model.variant": "demo/16"}, None),
    ({"mesh.data": 3}, "config.mesh"),
    ({"optim.grad_accum_steps": 2}, "config.optim.grad_accum_steps"),       # 8 = 2 x 4, not a multiple of 8
    ({"optim.grad_accum_steps": 2, "input.global_batch_size": 16}, None),
    ({"optim.grad_accum_steps": 0}, "config.optim.grad_accum_steps"),
    ({"input.dataset": "imagenet2012", "input.data_dir": "gs://bucket/tfds"}, None),   # checked when opened
    ({"task": "finetune", "model.num_classes": 10, "mesh.tensor": 4, "mesh.data": 2, "model.variant": "demo/16"},
     "config.mesh.tensor"),                                  # 10 classes over 4 devices
    ({"task": "finetune", "model.num_classes": 12, "mesh.tensor": 4, "mesh.data": 2, "model.variant": "demo/16"},
     None),
    ({"model.name": "mvit", "model.variant": "S", "input.dataset": "video_demo", "mesh.tensor": 2, "mesh.data": 4},
     "config.mesh.tensor"),                                  # MViTv2-S starts with 1 head
    ({"model.name": "mvit", "model.variant": "L", "input.dataset": "video_demo", "mesh.tensor": 2, "mesh.data": 4},
     None),
    ({"model.name": "mvit", "model.variant": "S", "input.dataset": "video_demo", "mesh.fsdp": 8, "mesh.data": 1},
     None),                                                  # widths 96..768
    ({"model.name": "mvit", "model.variant": "S", "input.image_size": 64, "input.dataset": "video_demo",
      "evals.probe": True}, "config.evals.probe"),           # the probe reads images, not videos
])
def test_validation_names_the_key(overrides, key):
    if key is None:   # valid
        config_lib.validate(_cfg(**overrides), num_devices=8)
        return
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        config_lib.validate(_cfg(**overrides), num_devices=8)


def test_mvit_fsdp_is_checked_against_every_stage_width():
    mvit_s = {"model.name": "mvit", "model.variant": "S", "input.dataset": "video_demo", "mesh.data": 1}
    config_lib.validate(_cfg(**mvit_s, **{"mesh.fsdp": 3, "input.global_batch_size": 6}), num_devices=3)
    with pytest.raises(ValueError, match=r"config\.mesh\.fsdp=5 does not divide the widths 96, 192, 384, 768"):
        config_lib.validate(_cfg(**mvit_s, **{"mesh.fsdp": 5, "input.global_batch_size": 10}), num_devices=5)


def test_valid_config_passes():
    config_lib.validate(_cfg(), num_devices=8)


def test_unknown_dataset_suggests_close_names():
    with pytest.raises(ValueError, match="imagenet2012"):
        config_lib.validate(_cfg(**{"input.dataset": "imagenet2021"}), num_devices=8)


def test_mesh_shape_must_fit_devices():
    from maskfeat_jax import sharding
    assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="config.mesh"):
        sharding.mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="config.mesh"):
        sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)


def test_shape_differences_lists_changed_keys():
    saved = _cfg().to_dict()
    now = _cfg(**{"model.variant": "demo/16", "optim.base_lr": 1.0})
    diffs = config_lib.shape_differences(saved, now)
    assert len(diffs) == 1 and "model.variant" in diffs[0]


def test_optimizer_structure_changes_count_as_shape_changes():
    """Clipping or layer decay switched on or off changes the optimizer state; new values do not."""
    saved = _cfg(**{"optim.grad_clip": 1.0, "optim.layer_decay": 1.0}).to_dict()
    assert config_lib.shape_differences(saved, _cfg(**{"optim.grad_clip": 5.0, "optim.layer_decay": 1.0})) == []
    diffs = config_lib.shape_differences(saved, _cfg(**{"optim.grad_clip": 0.0, "optim.layer_decay": 0.75}))
    assert len(diffs) == 2 and "clipping off" in diffs[0] and "layer-wise decay on" in diffs[1], diffs
    diffs = config_lib.shape_differences(saved, _cfg(**{"optim.grad_clip": 1.0, "optim.name": "sgd"}))
    assert len(diffs) == 1 and "optim.name: saved 'adamw', now 'sgd'" in diffs[0], diffs
    del saved["optim"]["name"]     # a config saved before the key existed had AdamW
    assert len(config_lib.shape_differences(saved, _cfg(**{"optim.grad_clip": 1.0, "optim.name": "sgd"}))) == 1


def test_zero_intervals_are_rejected_naming_the_key():
    for key in ("log_every_steps", "evals.every_steps", "checkpoint.every_steps"):
        with pytest.raises(ValueError, match=f"config.{key}=0"):
            config_lib.validate(_cfg(**{key: 0}), 1)


def _load(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, (mod.get_config(arg) if arg is not None else mod.get_config())


@pytest.mark.parametrize("name", ["demo", "vit_b_in1k", "vit_l_in1k"])
def test_shipped_configs_load_and_hold_their_launch_command(name):
    mod, c = _load(name)
    assert f"--config=configs/{name}.py" in mod.__doc__
    assert c.task == "pretrain" and c.mask.ratio == 0.4 and c.hog.gaussian_window == 0


# every setting of the configs that take an argument, and the file names that name one of them
SETTINGS = [("vit_in1k", arg) for v in ("B/16", "L/16") for arg in (v, f"{v},ft")] + \
    [("mvit_k400", arg) for v in ("S", "L") for arg in (v, f"{v},ft")]
RUNLOCAL = [("vit_in1k", "B/16,runlocal"), ("vit_in1k", "L/16,ft,runlocal"), ("mvit_k400", "S,runlocal"),
            ("mvit_k400", "L,ft,runlocal")]
NAMED = {"vit_b_in1k": "B/16", "vit_l_in1k": "L/16", "vit_b_in1k_ft": "B/16,ft", "vit_l_in1k_ft": "L/16,ft",
         "mvit_s_k400": "S", "mvit_l_k400": "L", "mvit_s_k400_ft": "S,ft", "mvit_l_k400_ft": "L,ft"}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_paper_configs_keep_every_value(name):
    """Each paper setting, by its own file name and as ``vit_in1k.py:ARG`` / ``mvit_k400.py:ARG``,
    gives exactly the values the per-setting config files gave (stored in tests/data)."""
    before = json.loads((ROOT / "tests" / "data" / "configs_before_args.json").read_text())[name]
    as_json = lambda c: json.dumps(c.to_dict(), sort_keys=True)     # noqa: E731 - tuples as lists, as stored
    assert as_json(_load(name)[1]) == json.dumps(before, sort_keys=True)
    family = "mvit_k400" if name.startswith("mvit") else "vit_in1k"
    assert as_json(_load(family, NAMED[name])[1]) == json.dumps(before, sort_keys=True)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.py")), ids=lambda p: p.stem)
def test_every_shipped_config_holds_its_launch_command_and_validates(path, tmp_path):
    """Each config file names its own command and passes validation on a GPU host (8 devices)
    and, for the paper configs, on 64- and 256-chip pods."""
    mod, c = _load(path.stem)
    assert f"--config=configs/{path.name}" in mod.__doc__
    _validate(c, tmp_path, (8,) if path.stem.startswith("demo") else (8, 64, 256))


def _validate(c, tmp_path, device_counts):
    if c.input.dataset == "video_csv":             # validation reads the CSV folder
        (tmp_path / f"{c.input.train_split}.csv").write_text("a.mp4 0\n")
        c.video.csv_dir = str(tmp_path)
    for devices in device_counts:
        config_lib.validate(c, devices)


@pytest.mark.parametrize("name,arg", SETTINGS + RUNLOCAL, ids=lambda x: x)
def test_every_setting_of_a_config_with_an_argument_validates_and_is_documented(name, arg, tmp_path):
    mod, c = _load(name, arg)
    assert f"--config=configs/{name}.py:{arg.split(',')[0]}" in mod.__doc__
    assert c.task == ("finetune" if "ft" in arg.split(",") else "pretrain")
    _validate(c, tmp_path, (8,) if "runlocal" in arg else (8, 64, 256))


def test_runlocal_is_a_tiny_run_on_embedded_or_random_data():
    for name, arg in RUNLOCAL:
        c = _load(name, arg)[1]
        assert c.model.variant.split("/")[0] == "mu" and c.total_steps == 3 and c.input.global_batch_size == 8
        assert c.input.dataset in ("synthetic", "video_demo") and c.input.worker_count == 0
        # the rest of the recipe stays: e.g. the fine-tuning optimizer of that variant
        full = _load(name, arg.replace(",runlocal", ""))[1]
        assert (c.optim.base_lr, c.optim.layer_decay, c.task) == (full.optim.base_lr, full.optim.layer_decay, full.task)


@pytest.mark.parametrize("arg", ["Q/16", "B/16,finetune", "B/16,ft,,", "ft"])
def test_a_bad_config_argument_names_what_the_file_takes(arg):
    with pytest.raises(ValueError, match=r"config argument .*expected VARIANT\[,SWITCH...\] with VARIANT one of "
                                         r"B/16, L/16 and SWITCH one of ft, runlocal"):
        _load("vit_in1k", arg)


def test_the_default_argument_is_the_first_variants_pretraining():
    assert _load("vit_in1k")[1].to_dict() == _load("vit_in1k", "B/16")[1].to_dict()
    assert _load("mvit_k400")[1].to_dict() == _load("mvit_k400", "S")[1].to_dict()


def test_paper_config_values():
    c = _load("vit_b_in1k")[1]
    assert (c.optim.base_lr, c.optim.reference_batch, c.optim.warmup_epochs) == (2e-4, 256, 30)
    assert (c.optim.weight_decay, c.optim.grad_clip, c.optim.b2, c.optim.eps) == (0.05, 0.02, 0.999, 1e-8)
    assert (c.optim.warmup_start_lr, c.optim.end_lr) == (1e-6, 1e-6)
    for name in ("mvit_s_k400", "mvit_l_k400", "mvit_s_k400_ft", "mvit_l_k400_ft"):
        v = _load(name)[1].video
        assert (v.num_frames, v.sampling_rate, v.target_fps) == (16, 4, 30.0), name   # 16x4 at 30 fps


def test_unknown_override_message_uses_ml_collections_suggestion():
    """The one-line message from ml_collections' own error for an unknown override key (no second
    load of the config file): the whole key, with the closest name put in its place."""
    from ml_collections.config_flags import config_path
    c = config_lib.base_config()
    for key, want in (("optim.base_rl", "unknown config key config.optim.base_rl; did you mean optim.base_lr?"),
                      ("optm.base_lr", "unknown config key config.optm.base_lr; did you mean optim.base_lr?"),
                      ("sed", "unknown config key config.sed; did you mean seed?"),
                      ("xyzzy", "unknown config key config.xyzzy")):
        with pytest.raises((AttributeError, KeyError)) as e:
            config_path.get_type(key, c)
        assert config_cli.unknown_override_message(e.value, ["--config=x.py", f"--config.{key}=3"]) == want
    assert config_cli.unknown_override_message(ValueError("config.x"), ["--config.x=1"]) is None


DISTRIBUTED_CASES = [
    ({}, None, None, False),                                               # a laptop
    ({"SLURM_JOB_ID": "7"}, None, None, False),                            # sbatch shell / salloc, no srun
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0",
      "SLURM_STEP_NUM_TASKS": "1"}, None, None, False),                    # srun with one task
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "1",
      "SLURM_STEP_NUM_TASKS": "16"}, None, None, True),                    # srun, 16 tasks
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, None, None, True),                   # TPU VM pod
    ({}, None, "localhost:1234", True),                                    # explicit coordinator
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, False, None, False),                 # --nodistributed wins
]


def test_distributed_initialisation_is_detected_from_the_launch():
    # In a subprocess: main.py defines absl flags that other test modules' imports define too.
    import json
    import subprocess
    import sys
    code = ("import json, sys; from maskfeat_jax import main; "
            "print(json.dumps([main.wants_distributed(*c[:3]) for c in json.loads(sys.argv[1])]))")
    root = pathlib.Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", code, json.dumps(DISTRIBUTED_CASES)], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout) == [c[3] for c in DISTRIBUTED_CASES]




def test_turning_a_pretraining_target_on_or_off_is_a_shape_change():
    """A checkpoint saved without the target keys (HOG only) cannot resume with the pixel target
    on: the head is wider. New weights of a target that stays on are fine."""
    saved = config_lib.base_config().to_dict()
    del saved["target"]
    c = config_lib.base_config()
    assert config_lib.shape_differences(saved, c) == []
    c.target.hog = 0.5
    assert config_lib.shape_differences(saved, c) == []
    c.target.pixel = 1.0
    diffs = config_lib.shape_differences(saved, c)
    assert len(diffs) == 1 and diffs[0].startswith("target.pixel: saved 0.0, now 1.0") and "prediction head" in diffs[0]
    c.task = "finetune"
    assert not any(d.startswith("target.") for d in config_lib.shape_differences(dict(saved, task="finetune"), c))


def test_another_teacher_is_a_shape_change_where_the_features_target_is_on():
    """The features head is as wide as its teacher's tokens: a resume that names another teacher
    is refused up front, naming the key, rather than failing to restore every checkpoint."""
    saved = config_lib.base_config()
    saved.target.features, saved.target.teacher = 1.0, "/runs/teacher_b"
    c = config_lib.base_config()
    c.target.features, c.target.teacher = 1.0, "/runs/teacher_l"
    diffs = config_lib.shape_differences(saved.to_dict(), c)
    assert diffs == ["target.teacher: saved '/runs/teacher_b', now '/runs/teacher_l'"], diffs
    c.target.teacher = "/runs/teacher_b"
    assert config_lib.shape_differences(saved.to_dict(), c) == []
    c.target.teacher = "/runs/teacher_l"
    saved.target.features = 0.0            # the target turned on: that is the difference named
    assert [d.split(":")[0] for d in config_lib.shape_differences(saved.to_dict(), c)] == ["target.features"]
    c.target.features = 0.0                # no features target: the teacher is unused
    assert config_lib.shape_differences(saved.to_dict(), c) == []


def test_decoder_sizes_matter_only_when_there_is_a_decoder():
    saved = config_lib.base_config().to_dict()
    c = config_lib.base_config()
    c.mae.decoder_depth, c.head.decoder_dim = 2, 64        # both decoders off: nothing changes
    assert config_lib.shape_differences(saved, c) == []
    c.mae.enabled = True
    assert [d.split(":")[0] for d in config_lib.shape_differences(saved, c)] == ["mae.enabled", "mae.decoder_depth"]
