"""Exports of hand-written plans to verl overrides and OpenRLHF command lines.

The names are checked against the key/argument lists taken from the released wheels
(planner/verl_0.9.1_ppo_megatron_keys.json, planner/openrlhf_0.11.2_train_ppo_ray_args.json).
"""

from __future__ import annotations

import copy
import shlex
import subprocess

import pytest

from hybridflow.errors import UserError
from hybridflow.planner.export import ExportError, export, export_plan
from hybridflow.planner.export_openrlhf import check_constraints, parse_command
from hybridflow.planner.export_refdata import load_openrlhf_reference, load_verl_reference
from hybridflow.planner.export_view import node_split, parse_plan

ROLES4 = {
    "actor": "llama-2-13b",
    "critic": "llama-2-13b",
    "reference": "llama-2-13b",
    "reward": "llama-2-13b",
}


def _plan(sets: list[dict], algorithm: str = "ppo", models: dict | None = None, **job) -> dict:
    j = {
        "algorithm": algorithm,
        "models": models or ROLES4,
        "prompt_len": 1024,
        "response_len": 1024,
        "global_batch": 1024,
        "ppo_epochs": 1,
        "mini_batches": 8,
    }
    j.update(job)
    return {
        "version": 1,
        "cluster": {"gpu": "a100-80gb", "nodes": 16, "gpus_per_node": 8},
        "job": j,
        "sets": sets,
        "predicted": {"iteration_s": 50.0, "tokens_per_s": 41943.0},
    }


def _lay(pp: int, tp: int, dp: int) -> dict:
    return {"pp": pp, "tp": tp, "dp": dp}


ACTOR = {"train": _lay(1, 8, 8), "generate": {"pp": 1, "tp": 2, "micro_dp": 4}}
SPLIT = _plan(
    [
        {
            "models": ["actor", "reference"],
            "gpus": 64,
            "layouts": {"actor": ACTOR, "reference": {"infer": _lay(1, 4, 16)}},
        },
        {
            "models": ["critic", "reward"],
            "gpus": 64,
            "layouts": {"critic": {"train": _lay(2, 4, 8)}, "reward": {"infer": _lay(1, 4, 16)}},
        },
    ]
)
ALL_IN_ONE = _plan(
    [
        {
            "models": ["actor", "critic", "reference", "reward"],
            "gpus": 128,
            "layouts": {
                "actor": {"train": _lay(1, 8, 16), "generate": {"pp": 1, "tp": 4, "micro_dp": 2}},
                "critic": {"train": _lay(1, 8, 16)},
                "reference": {"infer": _lay(1, 8, 16)},
                "reward": {"infer": _lay(1, 8, 16)},
            },
        }
    ]
)
REWARD_APART = _plan(
    [
        {
            "models": ["actor", "critic", "reference"],
            "gpus": 96,
            "layouts": {
                "actor": {"train": _lay(2, 4, 12), "generate": {"pp": 1, "tp": 4, "micro_dp": 2}},
                "critic": {"train": _lay(1, 8, 12)},
                "reference": {"infer": _lay(1, 8, 12)},
            },
        },
        {"models": ["reward"], "gpus": 32, "layouts": {"reward": {"infer": _lay(1, 4, 8)}}},
    ],
    global_batch=1536,
    mini_batches=4,
)  # 384 prompts per mini-batch: 32 per actor dp rank
GRPO = _plan(
    [
        {
            "models": ["actor", "reference", "reward"],
            "gpus": 16,
            "layouts": {
                "actor": {"train": _lay(1, 2, 8), "generate": {"pp": 1, "tp": 2, "micro_dp": 1}},
                "reference": {"infer": _lay(1, 2, 8)},
                "reward": {"infer": _lay(1, 2, 8)},
            },
        }
    ],
    algorithm="grpo",
    models={"actor": "qwen2.5-7b", "reference": "qwen2.5-7b", "reward": "qwen2.5-7b"},
    global_batch=256,
    mini_batches=4,
    n_samples=8,
)


def _command_words(script: str, entry: str) -> list[str]:
    """The argument words of the rendered script's command (continuations joined)."""
    body = script.split(entry, 1)[1].split("\n\n", 1)[0]
    return shlex.split(body.replace("\\\n", " "))


def _verl_overrides(plan: dict) -> dict[str, str]:
    script = export_plan(plan, "verl")
    words = _command_words(script, "python3 -m verl.trainer.main_ppo")
    return dict(w.split("=", 1) for w in words)


# ---- verl --------------------------------------------------------------------------------
@pytest.mark.parametrize("plan", [SPLIT, ALL_IN_ONE, REWARD_APART, GRPO])
def test_verl_override_keys_exist_in_verl_config(plan: dict) -> None:
    ref = load_verl_reference()
    overrides = _verl_overrides(plan)
    assert overrides["model_engine"] in ref["group_overrides"]["model_engine"]
    unknown = [k for k in overrides if k != "model_engine" and k not in ref["key_set"]]
    assert not unknown
    # a key verl does not have is caught by the same check
    assert "actor_rollout_ref.actor.megatron.tp" not in ref["key_set"]


@pytest.mark.parametrize("plan", [SPLIT, ALL_IN_ONE, REWARD_APART, GRPO])
def test_verl_overrides_pass_verl_batch_checks(plan: dict) -> None:
    """The arithmetic verl 0.9.1's validate_config (verl/utils/config.py) asserts."""
    o = {k: int(v) for k, v in _verl_overrides(plan).items() if v.isdigit()}
    n_gpus = o["trainer.nnodes"] * o["trainer.n_gpus_per_node"]
    mp = (
        o["actor_rollout_ref.actor.megatron.tensor_model_parallel_size"]
        * o["actor_rollout_ref.actor.megatron.pipeline_model_parallel_size"]
    )
    assert n_gpus % mp == 0
    minimal = n_gpus // mp * o["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu"]
    assert o["data.train_batch_size"] * o["actor_rollout_ref.rollout.n"] % minimal == 0
    assert o["data.train_batch_size"] >= o["actor_rollout_ref.actor.ppo_mini_batch_size"]


def test_verl_values_follow_the_plan() -> None:
    o = _verl_overrides(SPLIT)
    assert (o["trainer.nnodes"], o["trainer.n_gpus_per_node"]) == ("8", "8")
    assert o["actor_rollout_ref.actor.megatron.tensor_model_parallel_size"] == "8"
    assert o["actor_rollout_ref.rollout.tensor_model_parallel_size"] == "2"
    assert o["actor_rollout_ref.ref.megatron.tensor_model_parallel_size"] == "4"
    assert o["critic.megatron.pipeline_model_parallel_size"] == "2"
    assert o["actor_rollout_ref.actor.ppo_mini_batch_size"] == "128"
    assert o["algorithm.adv_estimator"] == "gae" and o["algorithm.use_kl_in_reward"] == "true"
    g = _verl_overrides(GRPO)
    assert g["algorithm.adv_estimator"] == "grpo" and g["actor_rollout_ref.rollout.n"] == "8"
    assert g["critic.enable"] == "false" and g["actor_rollout_ref.actor.use_kl_loss"] == "true"


def test_verl_resource_pools() -> None:
    split = export(SPLIT, "verl")
    assert "'pool_1': [8, 8, 8, 8, 8, 8, 8, 8]" in split.extra
    assert "Role.Critic: 'pool_1'" in split.extra and "Role.RewardModel: 'pool_1'" in split.extra
    assert "Role.ActorRolloutRef: 'global_pool'" in split.extra
    assert any("strided" in n for n in split.notes)  # generation tp 2 x micro_dp 4
    apart = _verl_overrides(REWARD_APART)  # reward alone: verl's own reward pool, no mapping
    assert apart["reward.reward_model.enable_resource_pool"] == "true"
    assert (apart["reward.reward_model.nnodes"], apart["reward.reward_model.n_gpus_per_node"]) == (
        "4",
        "8",
    )
    assert (apart["trainer.nnodes"], apart["trainer.n_gpus_per_node"]) == ("12", "8")
    assert export(REWARD_APART, "verl").extra == ""
    ref_apart = _plan(
        [
            {
                "models": ["critic", "reference"],
                "gpus": 64,
                "layouts": {
                    "critic": {"train": _lay(2, 4, 8)},
                    "reference": {"infer": _lay(1, 4, 16)},
                },
            },
            {
                "models": ["actor", "reward"],
                "gpus": 64,
                "layouts": {"actor": ACTOR, "reward": {"infer": _lay(1, 4, 16)}},
            },
        ]
    )
    exp = export(ref_apart, "verl")
    assert (
        "Role.RefPolicy: 'pool_0'" in exp.extra and "Role.ActorRollout: 'global_pool'" in exp.extra
    )
    assert any("stand-alone Role.RefPolicy" in n for n in exp.notes)
    one = export(ALL_IN_ONE, "verl")
    assert one.extra == "" and "reward.reward_model.enable_resource_pool=true" not in one.render()


def _safe_rlhf() -> dict:
    """ALL_IN_ONE with Safe-RLHF's cost model and cost critic beside the others."""
    safe = copy.deepcopy(ALL_IN_ONE)
    safe["job"]["algorithm"] = "safe-rlhf"
    safe["job"]["models"] = ROLES4 | {"cost": "llama-2-13b", "cost_critic": "llama-2-13b"}
    s = safe["sets"][0]
    s["models"] += ["cost", "cost_critic"]
    s["layouts"] |= {"cost": {"infer": _lay(1, 8, 16)}, "cost_critic": {"train": _lay(1, 8, 16)}}
    return safe


def _without_critic(plan: dict, algorithm: str) -> dict:
    out = copy.deepcopy(plan)
    out["job"]["algorithm"] = algorithm
    out["job"]["models"] = {r: m for r, m in out["job"]["models"].items() if r != "critic"}
    for s in out["sets"]:
        s["models"] = [r for r in s["models"] if r != "critic"]
        s["layouts"].pop("critic", None)
    return out


def test_verl_rejects_what_it_cannot_run() -> None:
    with pytest.raises(ExportError, match="cost"):
        export_plan(_safe_rlhf(), "verl")
    odd = copy.deepcopy(ALL_IN_ONE)
    odd["sets"][0]["layouts"]["actor"]["train"] = _lay(1, 8, 16)
    odd["job"]["global_batch"], odd["job"]["mini_batches"] = 1000, 125  # 8 prompts over dp 16
    with pytest.raises(ExportError, match="data-parallel size 16"):
        export_plan(odd, "verl")


# ---- OpenRLHF ----------------------------------------------------------------------------
def test_openrlhf_command_parses_with_openrlhf_arguments() -> None:
    script = export_plan(GRPO, "openrlhf")
    words = _command_words(script, "python3 -m openrlhf.cli.train_ppo_ray")
    ns = parse_command(words)
    g = lambda k: getattr(ns, k)  # noqa: E731
    assert g("train.colocate_all") and g("vllm.enable_sleep")
    assert g("vllm.num_engines") * g("vllm.tensor_parallel_size") == 16
    assert (g("actor.num_nodes"), g("actor.num_gpus_per_node")) == (2, 8)
    assert (g("ref.num_nodes"), g("reward.num_gpus_per_node")) == (2, 8)
    assert g("ds.tensor_parallel_size") == 2 and g("ds.zero_stage") == 2
    assert g("rollout.n_samples_per_prompt") == 8 and g("train.batch_size") == 512
    assert g("algo.advantage.estimator") == "group_norm" and g("data.max_len") == 2048
    check_constraints(ns)
    ref = load_openrlhf_reference()
    assert f"OpenRLHF {ref['version']}" in script and ref["source_file"] in script


def test_openrlhf_parser_rejects_names_it_does_not_have() -> None:
    with pytest.raises(AssertionError, match="no arguments"):
        parse_command(["--colocate_all_models"])  # the pre-0.10 flag name
    with pytest.raises(AssertionError, match="rejects"):
        parse_command(["--algo.advantage.estimator", "remax"])


def test_openrlhf_pipeline_layouts_become_zero3() -> None:
    plan = copy.deepcopy(ALL_IN_ONE)
    plan["sets"][0]["layouts"]["critic"]["train"] = _lay(2, 8, 8)
    exp = export(plan, "openrlhf")
    ns = parse_command(_command_words(exp.render(), exp.entry_point))
    assert getattr(ns, "ds.zero_stage") == 3 and getattr(ns, "ds.tensor_parallel_size") == 1
    assert any("ZeRO-3" in n for n in exp.notes)


@pytest.mark.parametrize(
    "plan, message",
    [
        (SPLIT, "colocate_all"),
        (_without_critic(ALL_IN_ONE, "remax"), "no remax trainer"),
    ],
)
def test_openrlhf_rejects_what_it_cannot_express(plan: dict, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        export_plan(plan, "openrlhf")


def test_openrlhf_grpo_needs_several_samples() -> None:
    one = copy.deepcopy(GRPO)
    one["job"]["n_samples"] = 1  # no plan has it: the job refuses it before OpenRLHF's check
    with pytest.raises(UserError, match="n_samples >= 2"):
        export_plan(one, "openrlhf")
    ns = parse_command(
        _command_words(export_plan(GRPO, "openrlhf"), "python3 -m openrlhf.cli.train_ppo_ray")
    )
    setattr(ns, "rollout.n_samples_per_prompt", 1)
    with pytest.raises(ExportError, match="more than one sample"):
        check_constraints(ns)


# ---- shared ------------------------------------------------------------------------------
@pytest.mark.process  # bash -n
@pytest.mark.parametrize("fmt", ["verl", "openrlhf"])
def test_scripts_are_valid_bash(fmt: str) -> None:
    script = export_plan(ALL_IN_ONE, fmt)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: p.pop("sets"), "expected keys"),
        (lambda p: p["sets"][0].update(gpus=0), "positive integer"),
        (lambda p: p["sets"][0]["models"].append("critic"), "distinct roles"),
        (
            lambda p: p["sets"][0]["layouts"]["actor"].pop("generate"),
            "needs layouts train, generate",
        ),
        (lambda p: p["sets"][0]["layouts"]["actor"]["train"].update(tp=16), "uses 256 GPUs"),
        (lambda p: p["job"].update(algorithm="dpo"), "unknown algorithm"),
    ],
)
def test_bad_plans_get_one_clear_error(mutate, message: str) -> None:
    """An export validates a plan dict as every plan is (hybridflow.plan), once."""
    plan = copy.deepcopy(ALL_IN_ONE)
    mutate(plan)
    with pytest.raises(UserError, match=message):
        parse_plan(plan)


def test_unknown_format() -> None:
    with pytest.raises(ExportError, match="choose from verl, openrlhf"):
        export_plan(ALL_IN_ONE, "deepspeed-chat")


@pytest.mark.parametrize(
    "gpus, per_node, expected",
    [(64, 8, (8, 8)), (4, 8, (1, 4)), (12, 8, (2, 6)), (8, 8, (1, 8)), (24, 4, (6, 4))],
)
def test_node_split(gpus: int, per_node: int, expected: tuple[int, int]) -> None:
    assert node_split(gpus, per_node) == expected
