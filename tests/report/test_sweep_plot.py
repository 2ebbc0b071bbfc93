"""What the sweep plot is drawn from: per-GPU throughput, the counts where a line does not
fit, and lines that coincide (labelled so, and drawn apart) -- the data, not the pixels."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from hybridflow.planner.sweep import Point, Target, gpu_counts, planner_points, run_sweep
from hybridflow.report.plots import reshard_lines, scheme_series
from hybridflow.report.sweep import (
    BEST,
    Series,
    _styles,
    coincide,
    equal_counts,
    mark_twins,
    missing_marks,
    plot_series,
    write_png,
)
from hybridflow.simulator.job import Job
from hybridflow.simulator.profile import load_profile

JOB = {
    "algorithm": "grpo",
    "models": {"actor": "qwen2.5-0.5b"},
    "prompt_len": 256,
    "response_len": 256,
    "global_batch": 8,
}


def _plan(tokens_per_s: float) -> dict:
    sets = [{"models": ["actor", "reference"], "gpus": 1}]
    return {"sets": sets, "predicted": {"tokens_per_s": tokens_per_s, "iteration_s": 1.0}}


def _result(points: dict[int, Point]):
    return run_sweep(list(points), points.__getitem__, Target(), JOB, "a100-80gb", 8)


POINTS = {  # split equals colocated within 0.5% where both fit; separate fits from 4 GPUs
    1: Point(1, None, reason="needs 2 GPUs"),
    2: Point(2, _plan(1000.0), {"colocated": 1000.0, "split": 1004.0}),
    4: Point(4, _plan(1800.0), {"colocated": 1800.0, "split": 1800.0, "separate": 1200.0}),
    8: Point(8, _plan(2400.0), {"colocated": 2300.0, "split": 2290.0, "separate": 2400.0}),
}


def test_lines_per_gpu_and_does_not_fit() -> None:
    best, colocated, split, separate = plot_series(_result(POINTS))
    assert best.name == BEST and best.gpus == (2, 4, 8) and best.missing == (1,)
    assert best.values == (1000.0, 1800.0, 2400.0)
    assert best.per_gpu == (500.0, 450.0, 300.0)  # falling efficiency, on a linear axis
    assert separate.gpus == (4, 8) and separate.missing == (1, 2)
    assert separate.per_gpu == (300.0, 300.0)
    marks = missing_marks([best, colocated, split, separate])
    assert sorted(name for _, name in marks) == sorted(
        [BEST, "colocated", "split"] + ["separate"] * 2
    )
    at_one = sorted(x for x, _ in marks if round(x) == 1)
    assert len(at_one) == 4 and len(set(at_one)) == 4  # spread apart, not on top of each other


def test_coinciding_lines_say_so() -> None:
    best, colocated, split, separate = plot_series(_result(POINTS))
    assert coincide(split, colocated)  # 1004 vs 1000 is 0.4%; 2290 vs 2300 is 0.43%
    assert split.same_as == "colocated" and split.same_everywhere
    assert split.label == "split (same as colocated)"
    # colocated meets the best plan at 2 and 4 GPUs only: it says where
    assert not coincide(colocated, best)
    assert equal_counts(colocated, best) == ((2, 4, 8), (2, 4))
    assert colocated.label == "colocated (= the best plan at 2, 4 GPUs)"
    assert separate.label == "separate (= the best plan at 8 GPUs)"
    styles = dict(
        zip(
            [s.name for s in (best, colocated, split, separate)],
            _styles([best, colocated, split, separate]),
        )
    )
    assert styles["split"]["markerfacecolor"] == "none" and "linestyle" in styles["split"]
    assert styles["split"]["markersize"] > styles["colocated"]["markersize"]
    assert "linestyle" not in styles["colocated"]  # over the best plan's wide pale line: visible


def test_coincidence_tolerance_and_partial_range() -> None:
    a = Series("a", (1, 2, 4), (100.0, 200.0, 400.0))
    assert coincide(Series("b", (1, 2, 4), (100.4, 199.2, 401.9)), a)
    assert not coincide(Series("b", (1, 2, 4), (100.0, 200.0, 403.0)), a)  # 0.75% at 4
    assert not coincide(Series("b", (8,), (100.0,)), a)  # nothing in common
    c = mark_twins([a, Series("c", (2, 4), (200.0, 400.0), missing=(1,))])[1]
    assert c.label == "c (same as a where both fit)"


def test_planner_sweep_with_a_rule_reward_split_is_colocated(tmp_path: Path) -> None:
    """With a rule reward the job's GPU roles are actor and reference: 'split' places them as
    'colocated' does, so the two lines are one, and the plot says so."""
    job = Job.create("grpo", "qwen2.5-0.5b", 256, 256, 8, mini_batches=2, reward="rule")
    profile = load_profile("a100-80gb")
    plan_at = planner_points("a100-80gb", job, profile, 8)
    result = run_sweep(gpu_counts(1, 16, 8), plan_at, Target(), job.to_dict(), "a100-80gb", 8)
    lines = {s.name: s for s in plot_series(result)}
    assert lines["split"].values == lines["colocated"].values
    assert lines["split"].label.startswith("split (same as ")
    for row, per_gpu in zip([r for r in result.rows if r.feasible], lines[BEST].per_gpu):
        assert per_gpu == pytest.approx(row.tokens_per_s / row.gpus)
    write_png(result, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_reshard_lines_mark_twins_and_misfits(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "model": ["m"] * 6,
            "gpus": [8, 16] * 3,
            "scheme": ["hybridengine"] * 2 + ["hybridengine-v"] * 2 + ["allgather"] * 2,
            "replanned_tokens_per_s": [100.0, 200.0, 100.0, 200.0, math.nan, 150.0],
            "reshard_s": [0.0, 0.0, 0.1, 0.2, math.nan, 0.3],
        }
    )
    he, hev, ag = scheme_series(frame, "replanned_tokens_per_s")
    assert hev.label == "hybridengine-v (same as hybridengine)"
    assert ag.missing == (8,) and ag.gpus == (16,) and ag.label == "allgather"
    assert reshard_lines(frame, tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
