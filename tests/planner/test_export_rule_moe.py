"""Exports of plans with a rule reward (no reward model) and of mixture-of-experts plans (ep)."""

from __future__ import annotations

import copy

import pytest

from hybridflow.errors import UserError
from hybridflow.planner.export import export
from hybridflow.planner.export_openrlhf import check_constraints, parse_command
from hybridflow.planner.export_refdata import verl_accepts
from hybridflow.planner.export_view import parse_plan
from hybridflow.planner.search import plan_job
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.job import Job


def _lay(pp: int, tp: int, dp: int, ep: int = 1) -> dict:
    return {"pp": pp, "tp": tp, "dp": dp} | ({"ep": ep} if ep > 1 else {})


def _plan(models: dict, sets: list[dict]) -> dict:
    return {
        "version": 1,
        "cluster": {"gpu": "h100-80gb", "nodes": 2, "gpus_per_node": 8},
        "job": {
            "algorithm": "grpo",
            "models": models,
            "prompt_len": 1024,
            "response_len": 4096,
            "global_batch": 256,
            "mini_batches": 4,
            "n_samples": 8,
        },
        "sets": sets,
        "predicted": {"iteration_s": 80.0, "tokens_per_s": 20000.0},
    }


RULE = _plan(
    {"actor": "qwen2.5-7b", "reference": "qwen2.5-7b", "reward": "rule"},
    [
        {
            "models": ["actor", "reference"],
            "gpus": 16,
            "layouts": {
                "actor": {"train": _lay(1, 2, 8), "generate": {"pp": 1, "tp": 2, "micro_dp": 1}},
                "reference": {"infer": _lay(1, 2, 8)},
            },
        }
    ],
)
MOE = _plan(
    {"actor": "qwen3-30b-a3b", "reference": "qwen3-30b-a3b", "reward": "rule"},
    [
        {
            "models": ["actor", "reference"],
            "gpus": 16,
            "layouts": {
                "actor": {
                    "train": _lay(1, 2, 8, ep=4),
                    "generate": {"pp": 1, "tp": 2, "micro_dp": 1},
                },
                "reference": {"infer": _lay(1, 1, 16, ep=8)},
            },
        }
    ],
)


def _verl(plan: dict) -> dict[str, str]:
    exp = export(plan, "verl")
    values = dict(a.split("=", 1) for a in exp.args)
    assert all(verl_accepts(k) for k in values)
    return values


def _openrlhf(plan: dict):
    exp = export(plan, "openrlhf")
    ns = parse_command([w for a in exp.args for w in a.split(" ", 1)])
    check_constraints(ns)
    return exp, ns


# ---- rule reward ---------------------------------------------------------------------------
def test_rule_reward_is_in_no_set_and_exports_to_verl() -> None:
    assert parse_plan(RULE).rule_roles == ("reward",)
    o = _verl(RULE)
    assert o["reward.reward_model.enable"] == "false"
    assert o["reward.custom_reward_function.path"] == '"$REWARD_FN_PATH"'
    assert o["reward.custom_reward_function.name"] == "compute_score"
    assert not any(k.startswith("reward.reward_model.rollout") for k in o)
    exp = export(RULE, "verl")
    assert any("reward is a rule" in n for n in exp.notes)
    assert "REWARD_FN_PATH" in dict(exp.env)


def test_rule_reward_exports_to_openrlhf_as_a_reward_function() -> None:
    exp, ns = _openrlhf(RULE)
    assert getattr(ns, "reward.remote_url") == "/path"  # the shell variable REWARD_FUNC_PATH
    assert getattr(ns, "reward.model_name_or_path") is None
    assert not any(a.startswith("--reward.num_nodes") for a in exp.args)
    assert any("reward is a rule" in n for n in exp.notes)


def _place_the_rule(p: dict) -> None:
    p["sets"][0]["models"].append("reward")
    p["sets"][0]["layouts"]["reward"] = {"infer": _lay(1, 2, 8)}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_place_the_rule, "reward is a rule"),
        (lambda p: p["job"]["models"].update(reference="rule"), "reference cannot be a rule"),
        (lambda p: p["job"]["models"].update(reward="qwen2.5-7b"), "missing reward"),
    ],
)
def test_rule_plans_that_cannot_be_exported(mutate, message: str) -> None:
    plan = copy.deepcopy(RULE)
    mutate(plan)
    with pytest.raises(UserError, match=message):
        export(plan, "verl")


# ---- expert parallelism --------------------------------------------------------------------
def test_verl_carries_expert_parallelism() -> None:
    o = _verl(MOE)
    assert o["actor_rollout_ref.actor.megatron.expert_model_parallel_size"] == "4"
    assert o["actor_rollout_ref.actor.megatron.expert_tensor_parallel_size"] == "2"
    assert o["actor_rollout_ref.ref.megatron.expert_model_parallel_size"] == "8"
    assert o["actor_rollout_ref.ref.megatron.expert_tensor_parallel_size"] == "1"
    # vLLM: experts over tp 2 x dp 4 = 8 GPUs per engine, 2 engines on the 16 GPUs
    assert o["actor_rollout_ref.rollout.expert_parallel_size"] == "8"
    assert o["actor_rollout_ref.rollout.data_parallel_size"] == "4"
    assert any("expert parallelism 4" in n for n in export(MOE, "verl").notes)
    dense = _verl(RULE)
    assert (
        not any("expert" in k for k in dense)
        and "actor_rollout_ref.rollout.data_parallel_size" not in dense
    )


def test_openrlhf_notes_it_has_no_expert_parallelism() -> None:
    exp, ns = _openrlhf(MOE)
    assert getattr(ns, "ds.zero_stage") == 3
    assert any("no expert parallelism" in n and "actor (ep 4)" in n for n in exp.notes)
    _, dense = _openrlhf(RULE)
    assert getattr(dense, "ds.zero_stage") == 2


def test_ep_must_divide_dp() -> None:
    plan = copy.deepcopy(MOE)
    plan["sets"][0]["layouts"]["actor"]["train"]["ep"] = 3
    with pytest.raises(UserError, match="ep=3 must divide dp=8"):
        export(plan, "verl")


# ---- plans the planner makes -----------------------------------------------------------------
def test_planner_moe_plan_with_rule_reward_exports() -> None:
    """The reported failure: `plan --reward rule --export verl` said the reward is in no set."""
    job = Job.create("grpo", "qwen3-30b-a3b", 1024, 1024, 256, mini_batches=4, reward="rule")
    plan = plan_job(Cluster.from_gpus("a100-80gb", 16, 8), job)[0].to_dict()
    train = next(s for s in plan["sets"] if "actor" in s["models"])["layouts"]["actor"]["train"]
    o = _verl(plan)
    assert o["reward.reward_model.enable"] == "false"
    key = "actor_rollout_ref.actor.megatron.expert_model_parallel_size"
    assert o.get(key, "1") == str(train.get("ep", 1))
