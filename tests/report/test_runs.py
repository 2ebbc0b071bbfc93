"""`hybridflow report RUN_DIR...`: reading run dirs, runs.csv, report.md, plots, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from hybridflow.cli.main import main as cli_main
from hybridflow.report.runs import RunDirError, load_run, load_runs, relative_error, runs_frame
from tests.conftest import load_benchmark

PLAN = {
    "version": 1,
    "cluster": {"gpu": "cpu-local", "nodes": 1, "gpus_per_node": 4},
    "job": {
        "algorithm": "ppo",
        "models": {"actor": "tiny", "critic": "tiny"},
        "prompt_len": 16,
        "response_len": 16,
        "global_batch": 8,
    },
    "sets": [
        {
            "models": ["actor", "critic"],
            "gpus": 4,
            "layouts": {
                "actor": {
                    "train": {"pp": 1, "tp": 2, "dp": 2},
                    "generate": {"pp": 1, "tp": 1, "micro_dp": 2},
                }
            },
        }
    ],
}


def times(generate: float, reshard: float, prepare: float, train: float, tps: float) -> dict:
    return {
        "iteration_s": generate + reshard + prepare + train,
        "tokens_per_s": tps,
        "stages": {"generate": generate, "reshard": reshard, "prepare": prepare, "train": train},
    }


def make_run(
    root: Path, name: str, measured: dict, predicted: dict, plan: dict = PLAN, iterations: int = 3
) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(
        json.dumps({"plan": plan, "measured": measured, "predicted": predicted})
    )
    lines = [
        json.dumps(
            {
                "iteration": i,
                "stages": measured["stages"],
                "tokens_per_s": 10.0 + i,
                "reward": 0.1 * i,
                "score": 0.2 * i,
                "kl": 0.01 * i,
            }
        )
        for i in range(iterations)
    ]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    split = dict(PLAN, sets=[{"models": ["actor"], "gpus": 2}, {"models": ["critic"], "gpus": 2}])
    predicted = dict(
        times(2.2, 0.4, 1.0, 3.0, 120.0),
        profile="local-cpu",
        terms={"actor": {"generate": {"decode_measured": 1.5, "prefill": 0.7}}},
        sources={"actor": {"generate": {"decode_measured": "measured", "prefill": "roofline"}}},
    )
    a = make_run(tmp_path, "colocated", times(2.0, 0.5, 1.0, 4.0, 100.0), predicted)
    b = make_run(
        tmp_path,
        "split",
        times(1.0, 0.0, 1.0, 2.0, 200.0),
        times(1.0, 0.0, 0.9, 2.2, 195.0),
        plan=split,
    )
    return [a, b]


def test_runs_frame_values(two_runs: list[Path]) -> None:
    frame = runs_frame(load_runs(two_runs))
    assert list(frame.columns) == ["plan", "stage", "predicted_s", "measured_s", "error"]
    assert list(frame["stage"][:5]) == ["generate", "prepare", "train", "reshard", "iteration"]
    row = frame[(frame["plan"] == "ppo actor+critic@4") & (frame["stage"] == "train")].iloc[0]
    assert row["measured_s"] == 4.0 and row["predicted_s"] == 3.0
    assert row["error"] == pytest.approx(-0.25)
    it = frame[(frame["plan"] == "ppo actor@2 | critic@2") & (frame["stage"] == "iteration")]
    assert it.iloc[0]["error"] == pytest.approx((4.1 - 4.0) / 4.0)
    zero = frame[(frame["plan"] == "ppo actor@2 | critic@2") & (frame["stage"] == "reshard")]
    assert zero.iloc[0]["error"] == 0.0


def test_relative_error_edges() -> None:
    assert relative_error(0.0, 0.0) == 0.0
    assert math.isnan(relative_error(1.0, 0.0))
    assert relative_error(3.0, 2.0) == pytest.approx(0.5)


def test_cli_writes_report(two_runs: list[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "reports" / "demo"
    assert cli_main(["report", *map(str, two_runs), "--out", str(out)]) == 0
    assert "report.md" in capsys.readouterr().out
    for name in (
        "report.md",
        "runs.csv",
        "throughput.csv",
        "stages.png",
        "throughput.png",
        "fidelity.png",
        "curves.png",
    ):
        assert (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv = pd.read_csv(out / "runs.csv")
    assert len(csv) == 10 and set(csv["stage"]) == {
        "generate",
        "reshard",
        "prepare",
        "train",
        "iteration",
    }
    md = (out / "report.md").read_text()
    assert "ppo actor+critic@4" in md and "-25.0%" in md and "![" in md
    assert "median absolute error of iteration time" in md
    assert "| actor | generate | decode_measured | 1.5 | measured |" in md
    assert "- predicted profile: local-cpu" in md


def test_duplicate_plans_get_distinct_labels(tmp_path: Path) -> None:
    a = make_run(tmp_path, "r1", times(1, 0, 1, 1, 5), times(1, 0, 1, 1, 5))
    b = make_run(tmp_path, "r2", times(2, 0, 1, 1, 5), times(1, 0, 1, 1, 5))
    labels = [r.label for r in load_runs([a, b])]
    assert labels == ["ppo actor+critic@4 (r1)", "ppo actor+critic@4 (r2)"]


def _summary(d: Path) -> dict:
    return json.loads((d / "summary.json").read_text())


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: (d / "summary.json").unlink(), "has no summary.json"),
        (lambda d: (d / "summary.json").write_text("{not json"), "is not valid JSON"),
        (lambda d: (d / "summary.json").write_text("[1, 2]"), "must be a JSON object"),
        (
            lambda d: (d / "summary.json").write_text(
                json.dumps({k: v for k, v in _summary(d).items() if k != "predicted"})
            ),
            "lacks predicted",
        ),
        (
            lambda d: (d / "summary.json").write_text(
                json.dumps(
                    dict(
                        _summary(d),
                        measured={"iteration_s": 1, "tokens_per_s": 1, "stages": {"generate": 1}},
                    )
                )
            ),
            "stages lacks prepare, train, reshard",
        ),
        (
            lambda d: (d / "summary.json").write_text(
                json.dumps(dict(_summary(d), measured=times(-1, 0, 0, 0, 1)))
            ),
            "must be finite and >= 0",
        ),
        (
            lambda d: (d / "summary.json").write_text(
                json.dumps(
                    dict(_summary(d), predicted=dict(times(1, 0, 0, 0, 1), iteration_s="fast"))
                )
            ),
            "predicted.iteration_s must be a number",
        ),
        (
            lambda d: (d / "summary.json").write_text(
                json.dumps(
                    dict(
                        _summary(d),
                        predicted=dict(times(1, 0, 0, 0, 1), terms={"actor": {"train": 3}}),
                    )
                )
            ),
            "terms.actor.train must map term",
        ),
        (
            lambda d: (d / "metrics.jsonl").write_text('{"iteration": 0}\n{oops\n'),
            "metrics.jsonl:2 is not valid JSON",
        ),
    ],
)
def test_malformed_run_dir(tmp_path: Path, capsys, breakage, message) -> None:
    d = make_run(tmp_path, "bad", times(1, 0, 1, 1, 5), times(1, 0, 1, 1, 5))
    breakage(d)
    with pytest.raises(RunDirError, match=message):
        load_run(d)
    assert cli_main(["report", str(d), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message.split()[0] in err and "Traceback" not in err and err.count("\n") == 1


def test_missing_and_non_dir(tmp_path: Path, capsys) -> None:
    with pytest.raises(RunDirError, match="does not exist"):
        load_run(tmp_path / "nope")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunDirError, match="is not a directory"):
        load_run(f)
    assert cli_main(["report"]) == 2
    assert "give one or more RUN_DIRs" in capsys.readouterr().err


def test_fidelity_pools_passes_into_one_run(tmp_path: Path) -> None:
    """benchmarks/fidelity.py --passes: a plan's runs pooled into one run dir that
    `hybridflow report` reads, each stage the median of the passes' means."""
    load_benchmark("fidelity")
    from fidelity import _passes, pool_passes

    pred = times(1.0, 0.1, 1.0, 2.0, 50.0)
    runs = []
    for i, (m, n) in enumerate(
        (
            (times(1.0, 0.2, 1.0, 2.0, 100.0), 2),
            (times(2.0, 0.2, 2.0, 4.0, 40.0), 6),
            (times(1.2, 0.3, 0.5, 2.0, 90.0), 4),
        )
    ):
        d = make_run(tmp_path / f"pass{i + 1}", "ppo", dict(m, timed_iterations=n), pred)
        runs.append(
            (
                dict(
                    plan=PLAN,
                    measured=dict(m, timed_iterations=n),
                    predicted=pred,
                    each_iteration_s=[m["iteration_s"]] * n,
                ),
                d,
            )
        )
    got = pool_passes("ppo", [s for s, _ in runs], [d for _, d in runs], tmp_path)
    m = got["measured"]
    # each a median over the three passes: one pass far off does not move it
    assert m["stages"]["generate"] == pytest.approx(1.2)
    assert m["stages"]["prepare"] == pytest.approx(1.0)
    assert m["iteration_s"] == pytest.approx(4.2)
    assert m["tokens_per_s"] == pytest.approx(90.0)
    assert (m["timed_iterations"], m["passes"], len(got["each_iteration_s"])) == (12, 3, 12)
    run = load_run(tmp_path / "ppo")
    assert run.measured.stages["generate"] == pytest.approx(1.2)
    assert run.predicted.iteration_s == pytest.approx(4.1) and len(run.metrics) == 3
    assert m["pass_iteration_s"] == pytest.approx([4.2, 8.2, 4.0])
    assert _passes({"ppo": got}) == "\n\nIteration error of each pass alone: ppo -2% / -50% / +2%"


def test_fidelity_ranking_shows_the_same_plan_measured_twice() -> None:
    """The planner's first plan is also one of the standard placements: the benchmark runs
    it under both names, and the verdict shows how far apart the two measured."""
    load_benchmark("fidelity")
    from fidelity import _ranking

    stats = {
        "planner_first": ["ppo-planner", "ppo-separate"],
        "ppo_measured_s": {
            "ppo-planner": (0.5, 0.1),
            "ppo-separate": (0.6, 0.1),
            "ppo-split": (0.55, 0.05),
        },
    }
    text = _ranking(stats)
    assert "ppo-planner (planner) 0.500 ± 0.100; ppo-split 0.550 ± 0.050" in text
    assert "measured 0.500 and 0.600 s per iteration: 20% apart" in text
    stats["planner_first"] = ["ppo-planner"]
    assert "apart" not in _ranking(stats)
