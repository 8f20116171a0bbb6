"""benchmarks/transfer_demo.py: its table against numbers computed here, its flags, and the config
of every run it makes (parsed and validated, and compatible with the pre-training checkpoint)."""
import pathlib
import statistics
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import demo_finetune  # noqa: E402
import transfer_demo  # noqa: E402


def test_table_gives_mean_sample_std_and_each_seed():
    results = {"ssv2": {"maskfeat": [0.5, 0.625, 0.6], "scratch": [0.25, 0.3, 0.275]},
               "ava": {"maskfeat": [0.41, 0.45, 0.43], "scratch": [0.2, 0.22, 0.5]}}
    rows = transfer_demo.table(results, [0, 1, 2])
    assert rows[0].count("|") == 6 and set(rows[1]) == {"|", "-"} and len(rows) == 6
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]
    want = [(t, i) for t in results for i in results[t]]
    for (task, init), row in zip(want, cells):
        xs = [100 * x for x in results[task][init]]
        assert row[0] == transfer_demo.TASKS[task][0] and row[1] == transfer_demo.INITS[init]
        assert row[2] == transfer_demo.TASKS[task][3]
        assert row[3] == f"{statistics.mean(xs):.1f} +- {statistics.stdev(xs):.1f}"
        assert row[4] == ", ".join(f"{x:.1f}" for x in xs)
    assert "3 seed(s)" in rows[0] and "seeds 0, 1, 2" in rows[0]


def test_partial_results_leave_out_empty_rows():
    rows = transfer_demo.table({"ssv2": {"maskfeat": [0.5], "scratch": []}}, [0])
    assert len(rows) == 3 and rows[2].split("|")[4].strip() == "50.0 +- 0.0"


def test_unknown_task_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        transfer_demo.parse(["--workdir=/tmp/x", "--tasks=ssv2,kinetics"])
    assert e.value.code == 2 and "--tasks: unknown kinetics" in capsys.readouterr().err


@pytest.mark.parametrize("task", list(transfer_demo.TASKS))
def test_every_run_has_a_valid_config_that_fits_the_checkpoint(task, tmp_path):
    """Pre-training and both fine-tuning runs parse as the command parses them and pass the
    trainer's validation; the fine-tuning model and clip are the pre-training's (no compile: the
    study's runs are its test)."""
    from maskfeat_jax import config_validate
    pt = demo_finetune.config_of(transfer_demo.pretrain_args(40, tmp_path / "pt", []))
    config_validate.validate(pt, 1)
    assert (pt.task, pt.total_steps, pt.input.dataset) == ("pretrain", 40, "video_demo")
    for init in (tmp_path / "pt", None):
        ft = demo_finetune.config_of(transfer_demo.finetune_args(task, init, 2, 50, tmp_path / "ft", []))
        config_validate.validate(ft, 1)
        assert ft.seed == 2 and ft.total_steps == 50 and ft.evals.every_steps > ft.total_steps
        assert ft.init_from == (str(init) if init else "")
        assert ft.task == {"ssv2": "finetune", "ava": "detect"}[task]
        assert ft.input.dataset == {"ssv2": "ssv2_demo", "ava": "ava_demo"}[task]
        for key in ("model.name", "model.variant", "video.num_frames", "input.image_size", "input.mean",
                    "input.std"):
            group, name = key.split(".")
            assert ft[group][name] == pt[group][name], key
        assert ft.optim.warmup_epochs * transfer_demo.TASKS[task][4] == pytest.approx(5, abs=0.01)  # 10%
