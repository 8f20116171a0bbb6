"""What a new user meets in the first hour: config files found from any folder, one-line errors
(config file, workdir, normalisation, split folders, --mode=eval, a full disk), the console
(signals, a finished run, progress line, MFU label, ETA), --help and --print_config, figures."""
import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from maskfeat_jax import config as config_lib, curves, metrics, saved as saved_lib, storage, visualize

import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--config=configs/demo.py", "--config.model.variant=mu/16", "--config.input.image_size=32",
         "--config.input.global_batch_size=16", "--config.log_every_steps=2", "--config.optim.warmup_epochs=0.1",
         "--config.evals.probe=False", "--config.evals.figures_every_steps=0"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(*args, cwd=ROOT, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _main(workdir, *extra, cwd=ROOT):
    return _run("-m", "maskfeat_jax.main", f"--workdir={workdir}", *SMALL, *extra, cwd=cwd)


def _one_line_error(p, *needles):
    """Exit code 2, one ``error:`` line on stderr holding every needle, no traceback anywhere."""
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, p.stderr[-3000:]
    for n in needles:
        assert n in p.stderr, (n, p.stderr[-3000:])


def _rows(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step pre-training workdir."""
    work = tmp_path_factory.mktemp("trained")
    p = _main(work, "--config.total_steps=2")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return work


# ---- config file, --print_config, --help


@pytest.mark.e2e
def test_config_is_found_from_another_folder_and_print_config_lists_every_key(tmp_path):
    p = _run("-m", "maskfeat_jax.main", "--config=configs/demo.py", "--print_config", "--config.seed=7",
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert "seed = 7  # seeds parameters, data order, masks and drop path" in lines
    assert "input.dataset = 'digits'  # TFDS name, \"digits\" (embedded), \"synthetic\", \"folder:<root>\"; video: " \
           "\"video_csv\" (video.csv_dir) or \"video_demo\" (embedded); detection: \"ava\" (ava.root) or " \
           "\"ava_demo\" (embedded)" in lines                                                # a continued comment
    assert lines[0].startswith("task = 'pretrain'  # ")                                 # the base config's order
    assert len(lines) == len(config_lib.flat_keys(config_lib.base_config()))


@pytest.mark.e2e
def test_a_missing_config_file_is_one_line_naming_the_closest(tmp_path):
    p = _run("-m", "maskfeat_jax.main", "--config=configs/dmeo.py", f"--workdir={tmp_path}", cwd=tmp_path)
    _one_line_error(p, "--config=configs/dmeo.py: no such file", "did you mean configs/demo.py")


@pytest.mark.e2e
def test_a_bad_config_argument_is_one_line_naming_what_the_file_takes(tmp_path):
    p = _run("-m", "maskfeat_jax.main", "--config=configs/vit_in1k.py:B/32", f"--workdir={tmp_path}", cwd=tmp_path)
    _one_line_error(p, "vit_in1k.py:B/32", "config argument 'B/32'", "VARIANT one of B/16, L/16",
                    "SWITCH one of ft, runlocal")


@pytest.mark.e2e
def test_help_exits_0_and_starts_with_the_flags():
    p = _run("-m", "maskfeat_jax.main", "--help")
    assert p.returncode == 0 and "print_config: Print every config key" in p.stdout and "--workdir" in p.stdout, p.stderr[-2000:]
    p = _run("-m", "maskfeat_jax.export", "--help")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "--encoder_only" in "\n".join(p.stdout.splitlines()[:10]), p.stdout[:2000]
    for module, text in (("maskfeat_jax.curves", "the metric to plot"),
                         ("maskfeat_jax.visualize", "one figure each"),
                         ("maskfeat_jax.dry_run", "Simulate this many CPU devices"),
                         ("maskfeat_jax.evaluators.probe", "the checkpoint step"),
                         ("maskfeat_jax.data.check_videos", "decodes and counts every frame"),
                         ("maskfeat_jax.data.make_video_demo", "Frames per video"),
                         ("maskfeat_jax.data.make_ava_demo", "Video length"),
                         ("maskfeat_jax.data.make_ssv2_demo", "Shortest video")):
        p = _run("-m", module, "--help")
        assert p.returncode == 0 and text in p.stdout, (module, p.stdout, p.stderr[-2000:])


@pytest.mark.e2e
def test_a_command_exits_with_mains_status_or_0_when_it_returns_what_it_wrote():
    """``config_cli.run``: an exit status from ``main``, or (``exit_code=False``) 0 whatever ``main``
    returns, an empty list of written files included (``sys.exit([])`` would exit 1)."""
    run = "from maskfeat_jax import config_cli; config_cli.run(lambda argv: {}, lambda fv: fv{})"
    assert _run("-c", run.format("[]", ", exit_code=False")).returncode == 0
    assert _run("-c", run.format("3", "")).returncode == 3
    p = _run("-c", run.format("0", ""), "--no_such_flag")
    assert p.returncode == 2 and p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1


# ---- the workdir


@pytest.mark.e2e
def test_a_workdir_that_is_a_file_fails_before_start_up(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    p = _main(f)
    _one_line_error(p, f"--workdir={f} is a file, not a folder")
    assert p.stdout == ""                       # nothing started: no config line, no devices
    p = _main(tmp_path / "missing", "--mode=eval")
    _one_line_error(p, "does not exist")
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("err", [OSError(errno.EROFS, "Read-only file system"),
                                 PermissionError(errno.EACCES, "Permission denied")])
def test_check_workdir_refuses_a_folder_it_cannot_write(tmp_path, monkeypatch, err):
    storage.check_workdir(str(tmp_path / "new"))            # made, written, fine
    assert (tmp_path / "new").is_dir() and not list((tmp_path / "new").iterdir())

    def refuse(**_):
        raise err
    monkeypatch.setattr(storage.tempfile, "mkstemp", refuse)
    with pytest.raises(ValueError, match=f"--workdir=.*: cannot write there \\({err.strerror}\\)"):
        storage.check_workdir(str(tmp_path / "new"))


# ---- config values


def _digits_config():
    return tiny.config(overrides={"input.dataset": "digits", "input.global_batch_size": 16,
                                  "model.num_classes": 1000})   # base_config's: pre-training has no classifier


@pytest.mark.e2e
def test_mean_and_std_need_three_values(tmp_path):
    for key, value in (("mean", (0.5,)), ("mean", (0.5, 0.5)), ("std", (0.5,) * 4), ("std", (0.5, 0.5, 0.0))):
        c = _digits_config()
        c.input[key] = value
        with pytest.raises(ValueError, match=f"config.input.{key}="):
            config_lib.validate(c, 8)
    config_lib.validate(_digits_config(), 8)
    p = _main(tmp_path, "--config.input.std=(0.5,0.5)")
    _one_line_error(p, "config.input.std=(0.5, 0.5): expected 3 numbers, one per RGB channel")
    assert p.stderr.count("config.input.std") == 1        # said once, not also as a log line


def test_a_folder_dataset_without_its_eval_split_fails_at_start_up(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)

    def folder_config(**changes):
        c = _digits_config()
        c.input.dataset = f"folder:{tmp_path}"
        c.update_from_flattened_dict(changes)
        return c
    config_lib.validate(folder_config(), 8)   # pre-training without evaluation reads the train split only
    for changes in ({"task": "finetune"}, {"evals.probe": True}, {"evals.figures_every_steps": 10}):
        with pytest.raises(ValueError, match=f"config.input.eval_split='validation': '{tmp_path}/validation' "
                                             f"does not exist \\(splits in '{tmp_path}': \\['train'\\]\\)"):
            config_lib.validate(folder_config(**changes), 8)
    c = folder_config(**{"input.train_split": "training"})
    with pytest.raises(ValueError, match="config.input.train_split='training'"):
        config_lib.validate(c, 8)


# ---- --mode=eval and a finished run


@pytest.mark.e2e
def test_eval_without_a_checkpoint_or_with_another_config_is_one_line(trained, tmp_path):
    _one_line_error(_main(tmp_path, "--mode=eval"), "holds no finished checkpoint")
    _one_line_error(_main(trained, "--mode=eval", "--config.model.variant=demo/16"),
                    "differs in shape-changing keys", "model.variant: saved 'mu/16', now 'demo/16'",
                    "Evaluate with the config it was trained with")


@pytest.mark.e2e
def test_eval_of_a_pretraining_checkpoint_says_what_to_do_and_writes_rows_once(trained):
    before = _rows(trained)
    p = _main(trained, "--mode=eval")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step 2: a MaskFeat pre-training checkpoint has no evaluation of its own; its last logged " \
           "train/loss is" in p.stdout and "--config.evals.probe=True" in p.stdout, p.stdout
    assert _rows(trained) == before
    for _ in range(2):
        p = _main(trained, "--mode=eval", "--config.evals.probe=True")
        assert p.returncode == 0, p.stderr[-3000:]
        assert '"eval/knn_top1"' in p.stdout
    assert len([r for r in _rows(trained) if "eval/knn_top1" in r]) == 1


@pytest.mark.e2e
def test_a_finished_run_rerun_says_so_and_exits_0(trained):
    p = _main(trained, "--config.total_steps=2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "already done" in p.stdout and "step 2 of 2" in p.stdout and "devices:" not in p.stdout


# ---- the console


@pytest.mark.e2e
def test_sigint_is_named_and_says_how_to_resume(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "maskfeat_jax.main", f"--workdir={tmp_path}", *SMALL,
                             "--config.total_steps=100000", "--config.checkpoint.every_steps=2"],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not saved_lib.finished_steps(str(tmp_path)):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    assert "SIGINT: saved step" in out and "rerun the same command to resume" in out and "signal 2" not in out


def test_progress_line_is_ended_before_other_lines(monkeypatch, capsys):
    p = metrics.Progress(10, 5, 0)
    p.tty = True
    p.update(2, {"train/loss": 0.5})
    p.print("eval/knn_top1 0.5")
    p.print("next")
    out = capsys.readouterr().out
    assert out.startswith("\r[") and out.endswith("\neval/knn_top1 0.5\nnext\n") and "\n\n" not in out


def test_mfu_from_a_measured_peak_is_marked_and_capped(capsys):
    for estimate, mfu, shown in ((True, 1.7, "mfu~ >100%"), (True, 0.5, "mfu~ 50.0%"), (False, 0.5, "mfu 50.0%")):
        metrics.Progress(10, 5, 0, mfu_estimate=estimate).update(2, {"perf/mfu": mfu})
        assert f"| {shown} |" in capsys.readouterr().out


def test_eta_counts_from_the_restart_not_from_the_compile(capsys):
    p = metrics.Progress(1000, 100, 500)
    p.t0 -= 600                          # ten minutes of start-up and compile
    p.update(510, {})
    slow = capsys.readouterr().out
    p.restart(510)
    p.t0 -= 1.0                          # then 10 steps in one second
    p.update(520, {})
    assert "eta 8:1" in slow, slow                              # 490 steps at 10 per ten minutes
    assert "eta 0:00:4" in capsys.readouterr().out              # 480 steps at 10 per second


# ---- a full disk while saving


FULL_DISK = """
import json, re, runpy, sys
from orbax.checkpoint._src.serialization import serialization
write = serialization.async_serialize_from_host

async def full_disk(rslices, spec, *args, **kwargs):   # TensorStore's error for ENOSPC
    step = re.search(r"/(\\d+)\\.orbax-checkpoint-tmp", json.dumps(spec, default=str))
    if step and int(step.group(1)) >= 4:
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "x": Failed to write 4096 bytes to file 8: '
                         "No space left on device [os_error_code='28']")
    return await write(rslices, spec, *args, **kwargs)

serialization.async_serialize_from_host = full_disk
sys.argv = ["maskfeat_jax.main"] + sys.argv[1:]
runpy.run_module("maskfeat_jax.main", run_name="__main__")
"""


@pytest.mark.e2e
def test_a_full_disk_stops_with_one_line_leaves_no_temporary_checkpoint_and_resumes(tmp_path):
    args = [f"--workdir={tmp_path}", *SMALL, "--config.total_steps=6", "--config.checkpoint.every_steps=2"]
    p = _run("-c", FULL_DISK, *args)
    _one_line_error(p, f"--workdir={tmp_path}: disk full while saving a checkpoint (", " free after removing",
                    "last complete checkpoint: step 2", "rerun the same command to resume")
    assert len((p.stdout + p.stderr).splitlines()) < 30, p.stdout + p.stderr
    assert not list((tmp_path / "checkpoints").glob("*orbax-checkpoint-tmp*"))
    assert saved_lib.finished_steps(str(tmp_path)) == [2]
    p = _main(tmp_path, "--config.total_steps=6", "--config.checkpoint.every_steps=2")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resuming from step 2" in p.stdout
    assert saved_lib.finished_steps(str(tmp_path))[-1] == 6


def test_disk_full_is_recognised_through_the_exception_chain():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("save failed") from e
    except RuntimeError as e:
        assert storage.is_disk_full(e)
    assert not storage.is_disk_full(ValueError("RESOURCE_EXHAUSTED: out of memory"))
    assert storage.free_space("/").endswith(("KiB", "MiB", "GiB", " B"))


# ---- figures and the install line


def test_hog_figure_panels_have_titles_above_them():
    panel, gap = 128, 4
    fig = np.full((panel, 4 * panel + 3 * gap, 3), 255, np.uint8)
    out = visualize.titled(fig, panel, gap)
    strip = out[:-panel]
    assert strip.shape[0] >= 18 and np.array_equal(out[-panel:], fig)
    for k in range(4):                                       # dark text over every panel, none in the gaps
        assert strip[:, k * (panel + gap):k * (panel + gap) + panel].min() < 100
    assert visualize.auto_cell_px(8) == 32 and visualize.auto_cell_px(28) == 16


def test_loss_plot_has_a_y_label_and_a_grid():
    img = np.asarray(curves.plot(np.arange(1.0, 21.0), 1.0 / np.arange(1.0, 21.0), ylabel="train/loss"))
    h = img.shape[0]
    assert img[h // 3:2 * h // 3, :16].min() < 100                      # the label, left of the tick values
    grey = np.all(img == 225, axis=-1)
    assert grey[:, 100:600].sum() > 1000                                 # grid lines across the plot
    assert not np.asarray(curves.plot(np.arange(1.0, 21.0), np.ones(20)))[h // 3:2 * h // 3, :16].min() < 100


def test_the_tensorboard_viewer_is_an_extra_named_in_the_install_line():
    assert '"tensorboard": ["tensorboard' in (ROOT / "setup.py").read_text()
    assert 'pip install -e ".[tensorboard]"' in (ROOT / "README.md").read_text()
