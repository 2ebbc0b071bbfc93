"""An asynchronous plan's step, term by term: produce and consume computed by hand from the
sets' own predictions, the weight sync from the profile's bandwidths, the exposed part by the
staleness, the long tail of a length spread, and `hybridflow simulate` printing it."""

from __future__ import annotations

import copy
import json

import pytest

from hybridflow.cli.main import main
from hybridflow.plan import Plan
from hybridflow.simulator.costs import DoesNotFit
from hybridflow.simulator.predict import predict_plan, predict_set, rule_seconds
from hybridflow.simulator.profile import load_profile
from hybridflow.simulator.rollout import predict_rollout_set
from hybridflow.simulator.training import WEIGHT_BYTES
from tests.planner.test_async_plan import ASYNC

A100 = load_profile("a100-80gb")


def _plan(staleness: int = 1, **job: object) -> Plan:
    d = copy.deepcopy(ASYNC)
    d["pipeline"]["staleness"] = staleness
    d["job"].update(job)
    return Plan.from_dict(d)


def _by_hand(plan: Plan) -> tuple[float, float, float, float]:
    """(produce, consume, weight_send, weight_load) from the sets' predictions and the
    profile's numbers."""
    job, gpn = plan.job, plan.cluster.gpus_per_node
    train = [predict_set(job, s, A100, gpn) for s in plan.training_sets]
    rollout = predict_rollout_set(job, plan.rollout_set, A100, gpn)
    produce = rollout.stage_seconds("generate") + rollout.stage_seconds("prepare")
    prepare = max(max(s.stage_seconds("prepare") for s in train), rule_seconds(job))
    consume = prepare + max(s.stage_seconds("train") for s in train)
    model = WEIGHT_BYTES * job.spec("actor").params
    lay, actor = plan.rollout_set.rollout(), plan.set_of("actor").layout("actor")
    link = model / min(lay.model_parallel, actor.model_parallel)  # the larger shard
    bw = A100.inter_node_bandwidth if plan.cluster.nodes > 1 else A100.intra_node_bandwidth
    send = A100.comm_latency_s + link / (bw * A100.eff_communication)
    load = 2 * model / lay.model_parallel / (A100.hbm_bandwidth * A100.eff_memory)
    return produce, consume, send, load


def test_step_is_the_slower_side_plus_the_engine_load() -> None:
    plan = _plan(1)
    pred = predict_plan(plan)
    produce, consume, send, load = _by_hand(plan)
    p = pred.to_dict()["pipeline"]
    assert p["produce_s"] == pytest.approx(produce)
    assert p["consume_s"] == pytest.approx(consume)
    assert p["weight_sync"] == pytest.approx({"weight_send": send, "weight_load": load})
    assert pred.iteration_s == pytest.approx(max(produce, consume) + load)
    assert p["exposed_sync_s"] == pytest.approx(load) and send > load > 0
    assert p["bound"] == ("produce" if produce > consume else "consume")
    assert pred.tokens_per_s == pytest.approx(plan.job.tokens_per_iteration / pred.iteration_s)
    # the stages are each side's own; they overlap, so the step is not their sum
    assert pred.stages["generate"] == pytest.approx(produce)
    assert pred.stages["reshard"] == pytest.approx(load)
    assert pred.iteration_s < sum(pred.stages.values())


def test_staleness_zero_exposes_everything_and_overlaps_nothing() -> None:
    plan = _plan(0)
    produce, consume, send, load = _by_hand(plan)
    pred = predict_plan(plan)
    assert pred.iteration_s == pytest.approx(produce + consume + send + load)
    assert pred.to_dict()["pipeline"]["step"] == "produce + consume + weight_send + weight_load"
    # a larger staleness changes nothing beyond 1: only the overlap matters
    assert predict_plan(_plan(2)).iteration_s == pytest.approx(predict_plan(_plan(1)).iteration_s)
    assert predict_plan(_plan(1)).iteration_s < pred.iteration_s


def test_inside_one_node_the_weights_go_over_the_node_links() -> None:
    d = copy.deepcopy(ASYNC)
    d["cluster"] = {"gpu": "a100-80gb", "nodes": 1, "gpus_per_node": 16}
    plan = Plan.from_dict(d)
    send = predict_plan(plan).to_dict()["pipeline"]["weight_sync"]["weight_send"]
    assert send == pytest.approx(_by_hand(plan)[2])
    assert send < predict_plan(_plan(1)).to_dict()["pipeline"]["weight_sync"]["weight_send"]


def test_scoring_beside_the_engines_counts_in_produce() -> None:
    d = copy.deepcopy(ASYNC)
    d["job"]["models"]["reward"] = "qwen2.5-0.5b"
    d["sets"][1]["models"].append("reward")
    d["sets"][1]["layouts"]["reward"] = {"infer": {"pp": 1, "tp": 1, "dp": 8}}
    plan = Plan.from_dict(d)
    pred = predict_plan(plan)
    p = pred.to_dict()["pipeline"]
    produce, consume, _, load = _by_hand(plan)
    assert p["produce"]["rollout_scoring"] > 0
    assert p["produce_s"] == pytest.approx(produce) and p["consume_s"] == pytest.approx(consume)
    assert pred.iteration_s == pytest.approx(max(produce, consume) + load)
    # the reward's weights and activations leave the engines less KV cache
    alone = predict_rollout_set(plan.job, _plan(1).rollout_set, A100, 8)
    assert pred.sets[-1].in_flight <= alone.in_flight


def test_a_length_spread_finishes_each_rollout_batch_with_its_longest_responses() -> None:
    spread = predict_plan(_plan(1, response_mean=128))
    full = predict_plan(_plan(1))
    basis = spread.to_dict()["response_tokens"]["generate"]
    assert "not streamed" in basis["basis"] and "stragglers" in basis["basis"]
    assert 128 < basis["tokens"] <= 512  # the expected longest response of a wave
    assert spread.stages["generate"] < full.stages["generate"]
    assert "not streamed" in spread.to_dict()["pipeline"]["rollout"]


def test_an_engine_that_leaves_no_kv_cache_does_not_fit() -> None:
    d = copy.deepcopy(ASYNC)
    d["job"]["models"].update(actor="llama-2-70b", reference="llama-2-70b")
    d["job"]["response_len"] = 1024
    d["sets"][0]["layouts"] = {
        "actor": {"train": {"pp": 1, "tp": 8, "dp": 1}},
        "reference": {"infer": {"pp": 1, "tp": 8, "dp": 1}},
    }
    d["sets"][1]["layouts"]["rollout"]["generate"] = {"pp": 1, "tp": 1, "dp": 8}
    plan = Plan.from_dict(d)  # 138 GB of weights on each engine GPU
    with pytest.raises(DoesNotFit, match="rollout layout pp=1 tp=1: no memory left"):
        predict_rollout_set(plan.job, plan.rollout_set, A100, 8)
    d["sets"][1]["layouts"]["rollout"]["generate"] = {"pp": 1, "tp": 8, "dp": 1}
    engines = predict_rollout_set(plan.job, Plan.from_dict(d).rollout_set, A100, 8)
    assert engines.in_flight > 0 and engines.peak_bytes <= A100.usable_bytes


def test_simulate_prints_the_two_sides_and_the_sync(tmp_path, capsys) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(ASYNC))
    assert main(["simulate", str(path)]) == 0
    out = capsys.readouterr().out
    p = predict_plan(Plan.from_dict(ASYNC)).to_dict()["pipeline"]
    assert "asynchronous (staleness 1)" in out
    assert f"max(produce {p['produce_s']:.2f} s, consume {p['consume_s']:.2f} s)" in out
    assert f"weight_load {p['weight_sync']['weight_load']:.2f} s" in out
    assert "weight_send" in out and "overlaps the next generation" in out
    assert "rollout     generate" in out and "not streamed" in out
    assert main(["simulate", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["pipeline"] == {"mode": "async", "staleness": 1}
    assert d["predicted"]["iteration_s"] == pytest.approx(p["step_s"])


def test_streamed_generation_waits_for_no_stragglers() -> None:
    d = copy.deepcopy(ASYNC)
    d["job"]["response_mean"] = 128
    whole = Plan.from_dict(d)
    d["pipeline"]["streamed"] = True
    streamed = Plan.from_dict(d)
    assert streamed.pipeline.streamed and Plan.from_dict(streamed.to_dict()) == streamed
    a, b = predict_plan(whole), predict_plan(streamed)
    assert b.stages["generate"] < a.stages["generate"]
    assert b.to_dict()["pipeline"]["rollout"].startswith("streamed")
    assert b.to_dict()["response_tokens"]["generate"]["tokens"] == 128
    assert a.to_dict()["response_tokens"]["generate"]["tokens"] > 128
    # the training side follows the mean either way
    assert b.to_dict()["pipeline"]["consume"] == pytest.approx(a.to_dict()["pipeline"]["consume"])
    # without a spread there is no tail to stream away
    d = copy.deepcopy(ASYNC)
    d["pipeline"]["streamed"] = True
    assert predict_plan(Plan.from_dict(d)).iteration_s == pytest.approx(
        predict_plan(Plan.from_dict(ASYNC)).iteration_s
    )
