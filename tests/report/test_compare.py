"""`hybridflow report --compare`: the planner's plan against the standard placements and the
resharding schemes, tabulated from the planner and simulator."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from hybridflow.cli.main import main as cli_main
from hybridflow.planner.search import plan_job, standard_placements
from hybridflow.report.compare import CompareError, CompareSpec, compare_frames
from hybridflow.simulator.cluster import Cluster


@pytest.fixture(scope="module")
def frames():
    spec = CompareSpec("a100-80gb", ("llama-2-7b",), (8, 16))
    return spec, *compare_frames(spec)


def test_hybridflow_is_never_slower_than_a_standard_placement(frames) -> None:
    _, frame, _ = frames
    assert set(frame["system"]) == {"hybridflow", "colocated", "split", "separate"}
    speedups = frame["speedup"].dropna()
    assert len(speedups) == 8 and (speedups >= 1 - 1e-9).all()


def test_numbers_are_the_planners(frames) -> None:
    spec, frame, reshard = frames
    cluster = Cluster.from_gpus("a100-80gb", 16, 8)
    job = spec.job("llama-2-7b")
    best = plan_job(cluster, job)[0].to_dict()["predicted"]
    row = frame[(frame["gpus"] == 16) & (frame["system"] == "hybridflow")].iloc[0]
    assert row["tokens_per_s"] == pytest.approx(best["tokens_per_s"])
    split = standard_placements(cluster, job)["split"].to_dict()["predicted"]
    row = frame[(frame["gpus"] == 16) & (frame["system"] == "split")].iloc[0]
    assert row["tokens_per_s"] == pytest.approx(split["tokens_per_s"])
    he = reshard[(reshard["gpus"] == 16) & (reshard["scheme"] == "hybridengine")].iloc[0]
    assert he["reshard_s"] == pytest.approx(best["stages"]["reshard"])
    assert he["replanned_tokens_per_s"] == pytest.approx(best["tokens_per_s"])


def test_hybridengine_reshards_no_slower_than_the_other_schemes(frames) -> None:
    _, _, reshard = frames
    for gpus, g in reshard.groupby("gpus"):
        by = g.set_index("scheme")["reshard_s"]
        for other in ("hybridengine-v", "allgather"):
            if not math.isnan(by[other]):
                assert by["hybridengine"] <= by[other] + 1e-12, (gpus, other)


def test_cli_compare_writes_report(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    assert (
        cli_main(
            [
                "report",
                "--compare",
                "--gpu",
                "a100-80gb",
                "--models",
                "llama-2-7b",
                "--gpus",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    for name in ("report.md", "compare.csv", "reshard.csv", "throughput.png", "reshard.png"):
        assert (out / name).stat().st_size > 0, name
    csv = pd.read_csv(out / "compare.csv")
    assert {"model", "gpus", "system", "tokens_per_s", "speedup"} <= set(csv.columns)
    md = (out / "report.md").read_text()
    assert "## llama-2-7b" in md and "over separate" in md


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--models", "llama-9b"], "unknown model"),
        (["--gpus", "12"], "not a whole number"),
        (["--gpus", "8,x"], "comma-separated list of integers"),
        (["--gpus", "0"], "positive"),
        (["--gpu", "tpu-v9"], "unknown GPU kind"),
        (["--algorithm", "dpo"], "unknown algorithm"),
        (["some_run_dir"], "takes no RUN_DIR"),
    ],
)
def test_compare_bad_input(tmp_path: Path, capsys, argv, message) -> None:
    base = [
        "report",
        "--compare",
        "--models",
        "llama-2-7b",
        "--gpus",
        "8",
        "--out",
        str(tmp_path / "o"),
    ]
    assert cli_main(base + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_compare_spec_validation() -> None:
    with pytest.raises(CompareError, match="at least one model"):
        CompareSpec("a100-80gb", (), (8,))
    with pytest.raises(CompareError, match="positive integers"):
        CompareSpec("a100-80gb", ("llama-2-7b",), (True,))
