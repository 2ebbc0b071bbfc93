"""The plan schema's pipeline: sync plans load and write as before, async plans round-trip, and
every malformed pipeline or set is refused in one line that names the problem."""

from __future__ import annotations

import copy
import json

import pytest

from hybridflow.cli.main import main
from hybridflow.errors import UserError
from hybridflow.layout import RolloutLayout
from hybridflow.pipeline import Pipeline
from hybridflow.plan import Plan
from hybridflow.planner.export import export_plan

TRAIN8 = {"pp": 1, "tp": 1, "dp": 8}
ASYNC = {
    "version": 1,
    "cluster": {"gpu": "a100-80gb", "nodes": 2, "gpus_per_node": 8},
    "job": {
        "algorithm": "grpo",
        "models": {"actor": "qwen2.5-1.5b", "reference": "qwen2.5-1.5b", "reward": "rule"},
        "prompt_len": 256,
        "response_len": 512,
        "global_batch": 64,
        "n_samples": 4,
        "mini_batches": 2,
    },
    "pipeline": {"mode": "async", "staleness": 1},
    "sets": [
        {
            "models": ["actor", "reference"],
            "gpus": 8,
            "layouts": {"actor": {"train": TRAIN8}, "reference": {"infer": TRAIN8}},
        },
        {
            "models": ["rollout"],
            "gpus": 8,
            "layouts": {"rollout": {"generate": {"pp": 1, "tp": 2, "dp": 4}}},
        },
    ],
}


def _sync() -> dict:
    d = copy.deepcopy(ASYNC)
    del d["pipeline"]
    d["sets"] = [
        {
            "models": ["actor", "reference"],
            "gpus": 16,
            "layouts": {
                "actor": {
                    "train": {"pp": 1, "tp": 1, "dp": 16},
                    "generate": {"pp": 1, "tp": 1, "micro_dp": 1},
                },
                "reference": {"infer": {"pp": 1, "tp": 1, "dp": 16}},
            },
        }
    ]
    return d


def test_async_plan_round_trips_and_names_its_sets() -> None:
    plan = Plan.from_dict(ASYNC)
    assert plan.asynchronous and plan.pipeline == Pipeline("async", 1)
    assert plan.rollout_set.rollout() == RolloutLayout(1, 2, 4)
    assert [s.models for s in plan.training_sets] == [("actor", "reference")]
    d = plan.to_dict()
    assert d["pipeline"] == {"mode": "async", "staleness": 1}
    assert Plan.from_dict(json.loads(json.dumps(d))) == plan


def test_sync_plans_load_unchanged_and_are_written_without_a_pipeline() -> None:
    plan = Plan.from_dict(_sync())
    assert not plan.asynchronous and "pipeline" not in plan.to_dict()
    explicit = {**_sync(), "pipeline": {"mode": "sync"}}
    assert Plan.from_dict(explicit) == plan
    assert Plan.from_dict(plan.to_dict()) == plan


def _set(d: dict, i: int) -> dict:
    return d["sets"][i]


def _critic_beside_rollout(d: dict) -> None:
    """A PPO plan whose rollout set also trains the critic."""
    d["job"].pop("n_samples")
    d["job"].update(algorithm="ppo", models={r: "qwen2.5-1.5b" for r in PPO_ROLES})
    _set(d, 1).update(
        models=["rollout", "critic", "reward"],
        layouts={
            "rollout": {"generate": {"pp": 1, "tp": 1, "dp": 8}},
            "critic": {"train": TRAIN8},
            "reward": {"infer": TRAIN8},
        },
    )


PPO_ROLES = ("actor", "critic", "reference", "reward")
BAD = [  # (mutation of the async plan, what the one line says)
    (lambda d: d["pipeline"].update(staleness=-1), "staleness must be an integer from 0"),
    (lambda d: d["pipeline"].update(staleness=1.5), "staleness must be an integer from 0"),
    (lambda d: d["pipeline"].update(staleness=True), "staleness must be an integer from 0"),
    (lambda d: d["pipeline"].update(staleness="1"), "staleness must be an integer from 0"),
    (lambda d: d["pipeline"].pop("staleness"), "mode async needs a staleness"),
    (lambda d: d["pipeline"].update(mode="overlap"), "mode must be one of sync, async"),
    (lambda d: d["pipeline"].update(streaming=True), 'expected {"mode": "sync"}'),
    (lambda d: d.update(pipeline="async"), 'expected {"mode": "sync"}'),
    (lambda d: d["pipeline"].update(streamed="yes"), "streamed must be true or false"),
    (
        lambda d: d.update(pipeline={"mode": "sync", "streamed": True}),
        "streamed applies to mode async only",
    ),
    (lambda d: d["sets"].pop(1), "an asynchronous plan needs a rollout set"),
    (
        lambda d: _set(d, 1)["layouts"]["rollout"].update(train=TRAIN8),
        "rollout needs layouts generate, got generate, train (a rollout set only generates)",
    ),
    (
        lambda d: _set(d, 1)["layouts"].update(rollout={"train": TRAIN8}),
        "rollout needs layouts generate, got train",
    ),
    (
        lambda d: _set(d, 0)["layouts"]["actor"].update(generate={"pp": 1, "tp": 1, "micro_dp": 1}),
        "the actor only trains (layout train); generation runs in the rollout set",
    ),
    (
        lambda d: _set(d, 1)["layouts"]["rollout"].update(
            generate={"pp": 1, "tp": 8, "micro_dp": 1}
        ),
        "rollout layout: expected {pp, tp, dp}",
    ),
    (
        lambda d: _set(d, 1)["layouts"]["rollout"]["generate"].update(dp=2),
        "rollout layout pp=1 tp=2 dp=2 uses 4 GPUs, but its set has 8",
    ),
    (  # 12 heads: tp 8 does not divide them
        lambda d: _set(d, 1)["layouts"]["rollout"]["generate"].update(tp=8, dp=1),
        "rollout layout pp=1 tp=8: tp=8 does not divide the model's 12 heads",
    ),
    (  # 2 KV heads: tp 3 neither divides them nor is filled by their copies
        lambda d: _set(d, 1).update(
            gpus=3, layouts={"rollout": {"generate": {"pp": 1, "tp": 3, "dp": 1}}}
        ),
        "tp=3 does not divide the model's 2 KV heads (nor do they divide it)",
    ),
    (
        lambda d: _set(d, 1).update(
            gpus=32, layouts={"rollout": {"generate": {"pp": 32, "tp": 1, "dp": 1}}}
        ),
        "pp=32 exceeds the model's 28 layers",
    ),
    (
        lambda d: (
            _set(d, 0).update(models=["actor"], layouts={"actor": {"train": TRAIN8}}),
            _set(d, 1).update(
                models=["rollout", "reference"],
                layouts={
                    "rollout": {"generate": {"pp": 1, "tp": 1, "dp": 8}},
                    "reference": {"train": TRAIN8},
                },
            ),
        ),
        "reference needs layouts infer, got train",
    ),
    (
        _critic_beside_rollout,
        "beside the rollout a set holds only inference roles (cost, reference, reward), got critic",
    ),
]


@pytest.mark.parametrize("mutate, message", BAD)
def test_bad_async_plans_get_one_clear_line(mutate, message: str) -> None:
    d = copy.deepcopy(ASYNC)
    mutate(d)
    with pytest.raises(UserError) as e:
        Plan.from_dict(d)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_rollout_set_needs_an_async_pipeline() -> None:
    d = copy.deepcopy(ASYNC)
    d["pipeline"] = {"mode": "sync"}
    with pytest.raises(UserError, match="a rollout set needs an asynchronous pipeline"):
        Plan.from_dict(d)
    d = copy.deepcopy(ASYNC)
    d["pipeline"] = {"mode": "sync", "staleness": 1}
    with pytest.raises(UserError, match="staleness applies to mode async only"):
        Plan.from_dict(d)


def test_a_sync_actor_still_needs_both_layouts() -> None:
    d = _sync()
    _set(d, 0)["layouts"]["actor"].pop("generate")
    with pytest.raises(UserError, match="actor needs layouts train, generate, got train"):
        Plan.from_dict(d)


def test_simulate_refuses_a_bad_async_plan_in_one_line(tmp_path, capsys) -> None:
    d = copy.deepcopy(ASYNC)
    d["pipeline"]["staleness"] = -2
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    assert main(["simulate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "staleness must be an integer from 0" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("fmt", ["verl", "openrlhf"])
def test_an_async_plan_is_not_exported_as_a_synchronous_script(fmt: str) -> None:
    with pytest.raises(UserError, match="an asynchronous plan .* has no verl or OpenRLHF"):
        export_plan(ASYNC, fmt)
    assert export_plan(_sync(), fmt)  # the synchronous plan of the same job exports
