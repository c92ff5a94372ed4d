"""The metrics of bench/digits_quality.py: Fréchet distance, spread and the run's training time."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.digits_quality import (
    CLASSES,
    DigitClassifier,
    DigitSplits,
    assess,
    collapsed_rows,
    frechet_distance,
    log_span_s,
    main,
    mean_pairwise_distance,
    real_rows,
    spread_ratios,
    sweep_settings,
    target_check,
    to_features,
    training_time,
)
from flowmill.run_dir import Checkpoint, RunDir


@pytest.fixture(scope="module")
def splits() -> DigitSplits:
    return DigitSplits.make(seed=0)


@pytest.fixture(scope="module")
def classifier(splits) -> DigitClassifier:
    return DigitClassifier(splits.train_x, splits.train_y, seed=0)


def gaussian(count: int, dim: int, seed: int, mean: float = 0.0, std: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(mean, std, size=(count, dim))


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = gaussian(500, 16, seed=0)
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_grows_with_a_shift_and_matches_the_closed_form():
    dim = 8
    reference = gaussian(20000, dim, seed=0)
    same = frechet_distance(reference, gaussian(20000, dim, seed=1))
    shifted = frechet_distance(reference, gaussian(20000, dim, seed=1, mean=1.0))
    wider = frechet_distance(reference, gaussian(20000, dim, seed=1, std=2.0))
    assert same < 0.01
    assert shifted == pytest.approx(dim * 1.0**2, rel=0.05)  # |Δμ|² = dim
    assert wider == pytest.approx(dim * (1 + 4 - 2 * 2), rel=0.05)  # tr(I + 4I - 2·(4I)^½) = dim
    assert frechet_distance(reference, gaussian(20000, dim, seed=1, mean=2.0)) > shifted > same


def test_frechet_distance_takes_a_collapsed_set():
    reference = gaussian(1000, 8, seed=0)
    collapsed = np.repeat(reference[:1], 100, axis=0)  # zero covariance: singular
    distance = frechet_distance(reference, collapsed)
    assert np.isfinite(distance)
    assert distance == pytest.approx(np.trace(np.cov(reference, rowvar=False)) + np.sum((reference.mean(0) - reference[0]) ** 2))


def test_mean_pairwise_distance():
    assert mean_pairwise_distance(np.ones((5, 3))) == 0.0
    assert mean_pairwise_distance(np.array([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_distance(np.zeros((1, 3)))


def test_spread_of_a_collapsed_generator_is_zero_and_of_real_digits_about_one(splits):
    collapsed_x, collapsed_y = collapsed_rows(splits, per_class=20)
    assert np.all(spread_ratios(collapsed_x, collapsed_y, splits.reference_x, splits.reference_y) == 0.0)
    real_x, real_y = real_rows(splits, per_class=20, seed=0)
    real = spread_ratios(real_x, real_y, splits.reference_x, splits.reference_y)
    assert real.shape == (CLASSES,)
    assert 0.9 < real.mean() < 1.1
    assert np.all((real > 0.7) & (real < 1.3))


def test_assess_ranks_real_digits_above_one_image_per_class(splits, classifier):
    assert classifier.score(splits.held_out_x, splits.held_out_y) > 0.93
    real = assess(*real_rows(splits, per_class=20, seed=0), classifier, splits)
    collapsed = assess(*collapsed_rows(splits, per_class=20), classifier, splits)
    assert real["count"] == collapsed["count"] == 200
    assert collapsed["spread"] == 0.0 and real["spread"] > 0.9
    assert collapsed["fd"] > 5 * real["fd"]
    assert set(real["per_digit"]) == {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}


def test_features_are_block_means_at_any_side_divisible_by_eight():
    images = np.zeros((2, 16, 16))
    images[1, :2, :2] = 255.0  # the top-left 2x2 block
    features = to_features(images)
    assert features.shape == (2, 64)
    assert features[1, 0] == 1.0 and features[1, 1:].sum() == 0.0 and features[0].sum() == 0.0
    with pytest.raises(ValueError, match="multiple of 8"):
        to_features(np.zeros((1, 12, 12)))


def test_log_span_sums_the_segments_of_a_resumed_run():
    lines = [
        "2026-12-07 18:55:30,000 INFO run dir: runs/x",
        "2026-12-07 18:55:40,500 INFO step 10/20 loss 1.0",
        "a line without a timestamp",
        "2026-12-07 19:00:00,000 INFO run dir: runs/x",  # resumed later: the gap is not training
        "2026-12-07 19:00:05,000 INFO step 20/20 loss 0.5",
    ]
    assert log_span_s(lines) == pytest.approx(10.5 + 5.0)
    assert log_span_s([]) == 0.0


def test_training_time_sums_the_last_record_of_each_step_up_to_the_checkpoint(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.logs.mkdir()
    records = [{"step": 1, "train/samples_per_s": 64.0}, {"step": 2, "train/samples_per_s": 32.0},
               {"step": 2, "train/samples_per_s": 16.0},  # step 2 again after a resume: this one counts
               {"step": 3, "train/samples_per_s": 1.0}]  # after the checkpoint: not counted
    run_dir.metrics_file.write_text("".join(json.dumps(record) + "\n" for record in records))
    checkpoint_dir = tmp_path / "checkpoints" / "step-00000002"
    checkpoint_dir.mkdir(parents=True)
    (checkpoint_dir / "flowmill.json").write_text(json.dumps({"step": 2, "global_batch": 64, "world_size": 2}))
    time = training_time(run_dir, Checkpoint(checkpoint_dir))
    assert time == {"step": 2, "steps_s": pytest.approx(64 / 64 + 64 / 16), "wall_s": None}


@pytest.mark.slow
def test_main_reports_each_run_beside_the_floor_and_the_ceiling(finished_run, capsys):
    checkpoint = finished_run / "checkpoints" / "step-00000002"
    assert main([str(finished_run), str(checkpoint), "--num-samples", "2", "--steps", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    latest, earlier = result["runs"]
    assert (latest["name"], latest["step"], earlier["step"]) == (finished_run.name, 4, 2)
    assert latest["steps_s"] > earlier["steps_s"] > 0 and latest["wall_s"] > 0
    for row in (latest, earlier, result["floor"], result["ceiling"]):
        assert row["count"] == 20 and 0.0 <= row["accuracy"] <= 1.0 and row["fd"] >= 0.0
    assert result["ceiling"]["spread"] == 0.0
    assert main([str(finished_run), "--num-samples", "2", "--steps", "2"]) == 0
    table = capsys.readouterr().out
    assert "real held-out digits (floor)" in table and finished_run.name in table


def test_main_refuses_a_source_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing"), "--num-samples", "2"])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_sweep_settings_parse_cfg_scales_then_raag_pairs():
    settings = sweep_settings("1,3", "18:12,2:0.5")
    assert [(s.name, s.guidance, s.scale, s.alpha) for s in settings] == [
        ("CFG 1", "cfg", 1.0, 0.0), ("CFG 3", "cfg", 3.0, 0.0),
        ("RAAG w_max 18 α 12", "raag", 18.0, 12.0), ("RAAG w_max 2 α 0.5", "raag", 2.0, 0.5)]
    with pytest.raises(ValueError, match="W_MAX:ALPHA"):
        sweep_settings("1", "18")
    with pytest.raises(ValueError, match="w_max must be a finite number >= 1"):
        sweep_settings("1", "0.5:12")


def test_target_needs_97_percent_at_an_fd_within_1_2_times_unguided():
    def row(name, guidance, scale, accuracy, fd):
        return {"name": name, "guidance": guidance, "scale": scale, "by_steps": {25: {"accuracy": accuracy, "fd": fd}}}

    rows = [row("CFG 1", "cfg", 1.0, 0.91, 0.60), row("CFG 3", "cfg", 3.0, 1.0, 5.5),
            row("RAAG a", "raag", 3.0, 0.97, 0.72), row("RAAG b", "raag", 3.0, 0.99, 0.73)]
    target = target_check(rows, 25)
    assert target["met_by"] == ["RAAG a"] and target["fd_limit"] == pytest.approx(0.72)
    assert target_check(rows[1:], 25) == {"steps": 25, "unguided_fd": None, "met_by": []}


@pytest.mark.slow
def test_sweep_compares_cfg_and_raag_at_each_step_count(finished_run, capsys):
    argv = [str(finished_run), "--sweep", "--num-samples", "2", "--sweep-steps", "1,2", "--sweep-cfg", "1,2",
            "--sweep-raag", "3:2"]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in result["settings"]] == ["CFG 1", "CFG 2", "RAAG w_max 3 α 2"]
    assert result["step_counts"] == [1, 2] and result["target"]["steps"] == 2
    raag = result["settings"][2]["by_steps"]
    assert [len(raag[steps]["scale_per_step"]) for steps in ("1", "2")] == [1, 2]  # one per Euler evaluation
    assert all(1.0 <= scale <= 3.0 for scale in raag["2"]["scale_per_step"]) and len(raag["2"]["ratio_per_step"]) == 2
    for row in result["settings"]:
        assert all(row["by_steps"][steps]["count"] == 20 for steps in ("1", "2"))
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "RAAG w_max 3 α 2" in out and "2 steps: acc / FD / spread" in out and "target at 2 steps" in out


@pytest.mark.parametrize("flags, message", [(["--guidance", "raga"], "unknown guidance 'raga'"),
                                            (["--guidance", "raag", "--cfg", "0.5"], "w_max must be"),
                                            (["--sweep", "--sweep-raag", "3:-1"], "alpha must be")])
def test_main_refuses_bad_guidance_before_sampling(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing"), "--num-samples", "2", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
