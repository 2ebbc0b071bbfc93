"""The sweep's arithmetic on hand-made planner answers (no planner involved)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from hybridflow.planner.sweep import (
    Point,
    SweepError,
    Target,
    category,
    gpu_counts,
    parse_range,
    run_sweep,
)
from hybridflow.report.sweep import table, to_json, write_outputs

JOB = {
    "algorithm": "ppo",
    "models": {"actor": "llama-2-7b"},
    "prompt_len": 1024,
    "response_len": 1024,
    "global_batch": 1024,
}


def _plan(
    sets: list[list[str]], gpus: int, tokens_per_s: float, iteration_s: float, peak: float = 40.0
) -> dict:
    per = gpus // len(sets)
    return {
        "sets": [{"models": s, "gpus": per} for s in sets],
        "predicted": {
            "tokens_per_s": tokens_per_s,
            "iteration_s": iteration_s,
            "peak_memory_gib": {"actor": peak, "critic": peak / 2},
        },
    }


ALL = [["actor", "critic", "reference", "reward"]]
SPLIT = [["actor", "reference"], ["critic", "reward"]]
# Hand-made answers: 8 GPUs infeasible, then throughput 1000, 1800, 3000, 4000 tokens/s.
POINTS = {
    8: Point(8, None, reason="needs at least 16 GPUs"),
    16: Point(16, _plan(ALL, 16, 1000.0, 2097.152), {"colocated": 1000.0, "split": None}),
    32: Point(32, _plan(ALL, 32, 1800.0, 1165.084), {"colocated": 1800.0, "split": 1500.0}),
    64: Point(64, _plan(SPLIT, 64, 3000.0, 699.051), {"colocated": 2900.0, "split": 3000.0}),
    128: Point(128, _plan(SPLIT, 128, 4000.0, 524.288), {"colocated": 3500.0, "split": 4000.0}),
}


def _sweep(target: Target):
    return run_sweep([128, 8, 32, 16, 64], POINTS.__getitem__, target, JOB, "a100-80gb", 8)


def test_derived_columns_by_hand() -> None:
    rows = _sweep(Target()).rows
    assert [r.gpus for r in rows] == [8, 16, 32, 64, 128]
    assert not rows[0].feasible and rows[0].reason == "needs at least 16 GPUs"
    # efficiency per GPU against 16 GPUs (62.5 tokens/s/GPU): 32 -> 56.25/62.5, 128 -> 31.25/62.5
    assert rows[1].scaling_efficiency == pytest.approx(1.0)
    assert rows[2].scaling_efficiency == pytest.approx(0.9)
    assert rows[4].scaling_efficiency == pytest.approx(0.5)
    # GPU-hours per 1,000 steps: 64 GPUs x 699.051 s x 1000 / 3600
    assert rows[3].gpu_hours_per_1k_steps == pytest.approx(64 * 699.051 * 1000 / 3600)
    assert rows[3].category == "split" and rows[1].category == "colocated"
    assert rows[1].peak_memory_gib == 40.0


@pytest.mark.parametrize(
    "target, smallest",
    [
        (Target(tokens_per_s=1800.0), 32),  # 32 GPUs give exactly 1800
        (Target(tokens_per_s=1800.1), 64),
        (Target(tokens_per_s=5000.0), None),
        # 500 steps in 100 h = 720 s/step: 32 GPUs take 1165 s, 64 take 699 s
        (Target(steps=500, deadline_hours=100.0), 64),
        (Target(steps=500, deadline_hours=162.0), 32),  # 500 x 1165.084 s = 161.8 h
        (Target(tokens_per_s=3500.0, steps=500, deadline_hours=162.0), 128),
    ],
)
def test_smallest_count_meeting_target(target: Target, smallest: int | None) -> None:
    result = _sweep(target)
    mark = result.smallest_meeting_target
    assert (mark.gpus if mark else None) == smallest


def test_no_target_marks_nothing() -> None:
    assert _sweep(Target()).smallest_meeting_target is None


def test_outputs(tmp_path: Path) -> None:
    result = _sweep(Target(tokens_per_s=2000.0))
    csv_path, png_path = write_outputs(result, tmp_path / "out")
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["gpus"] for r in rows] == ["8", "16", "32", "64", "128"]
    assert [r["smallest_meeting_target"] for r in rows] == [
        "False",
        "False",
        "False",
        "True",
        "False",
    ]
    assert rows[2]["split tokens_per_s"] == "1500.0" and rows[1]["split tokens_per_s"] == ""
    assert rows[0]["tokens_per_s"] == "" and rows[0]["reason"] == "needs at least 16 GPUs"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = table(result)
    assert "smallest count meeting the target: 64" in text and "infeasible" in text
    assert to_json(result)["smallest_meeting_target"] == 64


@pytest.mark.parametrize(
    "lo, hi, per_node, expected",
    [
        (1, 32, 8, [1, 2, 4, 8, 16, 24, 32]),
        (8, 40, 8, [8, 16, 24, 32, 40]),
        (2, 12, 4, [2, 4, 8, 12]),
        (3, 7, 8, [4]),
    ],
)
def test_gpu_counts(lo: int, hi: int, per_node: int, expected: list[int]) -> None:
    assert gpu_counts(lo, hi, per_node) == expected


@pytest.mark.parametrize("text", ["8-256", "0:8", "16:8", "a:b", "1:2:3"])
def test_bad_ranges(text: str) -> None:
    with pytest.raises(SweepError):
        parse_range(text)


def test_bad_targets_and_empty_range() -> None:
    with pytest.raises(SweepError, match="go together"):
        Target(steps=10)
    with pytest.raises(SweepError, match="positive"):
        Target(tokens_per_s=0)
    with pytest.raises(SweepError, match="no cluster size"):
        gpu_counts(9, 15, 8)
    assert parse_range("8:256") == (8, 256) and parse_range("16") == (16, 16)


def test_categories() -> None:
    assert (
        category(_plan([["actor"], ["critic"], ["reference"], ["reward"]], 32, 1, 1)) == "separate"
    )
    assert (
        category(_plan([["actor", "critic"], ["reference", "reward"]], 32, 1, 1))
        == "other (2 sets)"
    )
