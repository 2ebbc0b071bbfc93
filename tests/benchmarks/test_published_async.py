"""benchmarks/published_async.py: every asynchronous row builds an asynchronous plan of its
own split and layouts, predicts its step as the simulator's terms, and is printed (accuracy
is what the benchmark measures, never asserted here)."""

import json

import pytest

from hybridflow.plan import Plan
from hybridflow.simulator.predict import predict_plan
from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("published")


@pytest.fixture(scope="module")
def rows():
    return load_benchmark("published_async").ASYNC_ROWS


def test_every_async_row_builds_its_own_split(bench, rows):
    mod = load_benchmark("published_async")
    for a in rows:
        plan = mod.build_async_plan(a, bench.build_job)
        assert plan.asynchronous and plan.pipeline.staleness == 1
        assert plan.rollout_set.gpus == a.rollout_gpus
        assert plan.rollout_set.rollout().tp == a.row.rollout_tp
        (training,) = plan.training_sets
        lay = training.layout("actor")
        assert (lay.pp, lay.tp, lay.cp, lay.dp, lay.ep) == (
            a.row.pp,
            a.row.tp,
            a.row.cp,
            a.row.dp,
            a.row.ep,
        )
        assert plan.gpus == a.row.gpus and plan.job.sequences == a.row.batch * a.row.n_samples
        assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_the_step_is_the_slower_side_plus_the_exposed_sync(bench, rows):
    mod = load_benchmark("published_async")
    for a in rows:
        pred = predict_plan(mod.build_async_plan(a, bench.build_job), a.row.gpu)
        got = mod.async_step(a, pred)
        consume = got["prepare"] + got["train"]
        p = pred.pipeline
        sharing = p.consume.seconds - sum(
            p.consume.as_dict().get(k, 0) for k in ("prepare", "train")
        )
        assert got["step"] == pytest.approx(
            max(got["produce"], consume + sharing) + p.exposed.seconds
        )
        if a.row.reference:  # the consume is the prediction's own
            assert got["step"] == pytest.approx(pred.iteration_s)
        else:  # DAPO: no reference model, its forward passes left out
            assert got["prepare"] < p.consume.as_dict()["prepare"]


def test_async_rows_are_printed_with_their_error(bench, rows, capsys):
    assert bench.main(["--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in printed}
    for a in rows:
        r = by_name[a.name]
        assert r["published_s"] == a.row.published_s
        if r["predicted_s"] is not None:
            assert r["error"] == pytest.approx(r["predicted_s"] / r["published_s"] - 1)
    assert bench.main([]) == 0
    text = capsys.readouterr().out
    assert "Asynchronous rows" in text and all(a.name in text for a in rows)
    assert "asynchronous (another issue)" not in text
