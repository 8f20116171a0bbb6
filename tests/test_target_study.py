"""benchmarks/target_study.py: its table against numbers computed here, its flags, and the config
of every run it makes."""
import pathlib
import statistics
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import demo_finetune  # noqa: E402
import target_study  # noqa: E402


def test_table_gives_mean_and_sample_std_per_column():
    results = {"HOG": {"knn": [0.5, 0.6, 0.7], "linear": [0.8, 0.82, 0.86], "finetune": [0.7, 0.75, 0.71],
                       "loss_ratio": [0.951]},
               "none": {"knn": [0.61, 0.59, 0.6], "linear": [0.85, 0.85, 0.85], "finetune": [0.6, 0.65, 0.62]}}
    rows = target_study.table(results, [0, 1, 2])
    assert rows[0].count("|") == len(target_study.COLUMNS) + 2 and set(rows[1]) == {"|", "-"}
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:4]]
    assert [c[0] for c in cells] == ["HOG", "none"]
    for (label, cols), row in zip(results.items(), cells):
        for j, (key, _) in enumerate(target_study.COLUMNS[:3]):
            xs = [100 * x for x in cols[key]]
            assert row[1 + j] == f"{statistics.mean(xs):.1f} +- {statistics.stdev(xs):.1f}"
    assert cells[0][4] == "0.951" and cells[1][4] == "-"      # one seed's ratio; none for the random row
    assert "3 seed(s) (0, 1, 2)" in rows[-1]


def test_unknown_variant_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        target_study.parse(["--workdir=/tmp/x", "--variants=hog,hgo"])
    assert e.value.code == 2 and "--variants: unknown hgo" in capsys.readouterr().err


@pytest.mark.parametrize("variant", list(target_study.VARIANTS))
def test_every_run_of_the_study_has_a_valid_config(variant, tmp_path):
    """Each row's pre-training and fine-tuning arguments parse as the command parses them, set what
    the row says, and pass the trainer's validation (no compile: the study's runs are its test)."""
    from maskfeat_jax import config_validate
    pt = demo_finetune.config_of(target_study.pretrain_args(variant, 1, 120, tmp_path / "pt", []))
    ft = demo_finetune.config_of(target_study.finetune_args(tmp_path / "pt", 1, 90, tmp_path / "ft", []))
    for c in (pt, ft):
        config_validate.validate(c, 1)
        assert c.seed == 1 and c.evals.every_steps > c.total_steps
    assert (pt.task, pt.total_steps, ft.task, ft.total_steps) == ("pretrain", 120, "finetune", 90)
    assert pt.evals.probe and ft.init_from == str(tmp_path / "pt")
    assert (ft.augment.randaug_ops, ft.model.drop_path) == (0, 0.0)       # target_study.SHORT_FINETUNE
    assert pt.optim.warmup_epochs * 22 == pytest.approx(12, abs=0.01)      # 10% of the steps
    want = {"hog": (1.0, 0.0, True, False), "hog_raw": (1.0, 0.0, False, False), "pixel": (0.0, 1.0, True, False),
            "pixel_norm": (0.0, 1.0, True, False), "hog_pixel": (1.0, 0.1, True, False),
            "mae_hog": (1.0, 0.0, True, True)}[variant]
    assert (pt.target.hog, pt.target.pixel, pt.hog.normalize, pt.mae.enabled) == want
    assert pt.target.norm_pix == (variant != "pixel")
