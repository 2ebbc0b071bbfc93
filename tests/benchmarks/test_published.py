"""benchmarks/published.py: every row builds, included rows load and predict, the JSON keys
(accuracy is what the benchmark measures, never asserted here)."""

import dataclasses
import json

import pytest

from hybridflow.plan import Plan
from hybridflow.simulator.costs import DoesNotFit
from hybridflow.simulator.predict import predict_plan
from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("published")


@pytest.fixture(scope="module")
def results(bench):
    return [bench.evaluate(r) for r in bench.ROWS]


def test_every_row_builds_a_plan_of_its_own_layout(bench):
    for row in bench.ROWS:
        plan = bench.build_plan(row)
        assert plan.gpus <= row.gpus and plan.cluster.gpu == row.gpu
        if row.separate is None:
            (placed,) = plan.sets
            lay = placed.layout("actor")
            assert (lay.pp, lay.tp, lay.cp, lay.dp, lay.ep) == (
                row.pp,
                row.tp,
                row.cp,
                row.dp,
                row.ep,
            )
            assert placed.gpus == row.gpus
        assert plan.job.sequences == row.batch * row.n_samples


def test_included_rows_load_and_predict(bench):
    for row in bench.ROWS:
        if row.excluded is not None:
            continue
        plan = Plan.from_dict(json.loads(json.dumps(bench.build_plan(row).to_dict())))
        try:
            pred = predict_plan(plan, row.gpu)
        except DoesNotFit:
            continue  # printed as the row's result
        assert pred.iteration_s > 0
        assert set(bench.stage_seconds(row, pred)) == {str(s) for s in pred.stages}


def test_no_row_crashes_and_results_are_complete(results, bench):
    assert [r["name"] for r in results] == [r.name for r in bench.ROWS]
    for r in results:
        if r["predicted_s"] is None:
            assert r["result"] and r["error"] is None
        else:
            assert r["predicted_s"] > 0
            assert r["error"] == pytest.approx(r["predicted_s"] / r["published_s"] - 1)
            assert set(r["phases"]) == set(
                next(x for x in bench.ROWS if x.name == r["name"]).phases
            )


def test_without_a_reference_prepare_leaves_it_out(bench):
    row = next(r for r in bench.ROWS if not r.reference and r.excluded is None)
    pred = predict_plan(bench.build_plan(row), row.gpu)
    with_ref = bench.stage_seconds(dataclasses.replace(row, reference=True), pred)
    assert bench.stage_seconds(row, pred)["prepare"] < with_ref["prepare"]


def test_json_and_table(bench, capsys, tmp_path):
    assert bench.main(["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(
        set(r) == {"name", "predicted_s", "published_s", "error", "included"} for r in rows
    )
    assert any(r["included"] for r in rows) and any(not r["included"] for r in rows)
    out = tmp_path / "published.md"
    assert bench.main(["--out", str(out)]) == 0
    text = out.read_text()
    assert "median |error|" in text and "excluded:" in text and "Not built" in text
    s = bench.summary([bench.evaluate(r) for r in bench.ROWS])
    assert s["included"] == sum(r.excluded is None for r in bench.ROWS)
