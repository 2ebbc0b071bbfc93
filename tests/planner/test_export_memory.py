"""The plan's memory settings, context parallelism and uneven pipelines in the exports,
under verl's and OpenRLHF's own names (planner/verl_0.9.1_ppo_megatron_keys.json,
planner/openrlhf_0.11.2_train_ppo_ray_args.json)."""

from __future__ import annotations

import copy
import shlex
import sys
from pathlib import Path

import pytest

from hybridflow.plan import Plan
from hybridflow.planner.export import export
from hybridflow.planner.export_openrlhf import check_constraints, parse_command
from hybridflow.planner.export_refdata import verl_accepts
from hybridflow.planner.search import standard_placements
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.job import Job

sys.path.insert(0, str(Path(__file__).parent))
from test_export import ALL_IN_ONE, GRPO, _lay  # noqa: E402

JOB = Job.create("ppo", "llama-2-7b", 512, 512, 256, mini_batches=4)
A, C = "actor_rollout_ref.actor.megatron", "critic.megatron"
OTC = "override_transformer_config"


@pytest.fixture(scope="module")
def colocated() -> dict:
    """The planner's all-colocated plan (every role on one set of 16 GPUs)."""
    return standard_placements(Cluster.from_gpus("a100-80gb", 16, 8), JOB)["colocated"].to_dict()


def _memory_heavy(plan: dict) -> Plan:
    """The plan with cp 2 everywhere, and recompute full, offload and four sequences per
    micro-batch for its trained roles."""
    p = copy.deepcopy(plan)
    s = p["sets"][0]
    for lay in s["layouts"].values():
        kind = "train" if "train" in lay else "infer"
        lay[kind] = lay[kind] | {"cp": 2, "dp": lay[kind]["dp"] // 2}
    tokens = 4 * JOB.seq_len
    heavy = {"recompute": "full", "offload": True, "micro_batch_tokens": tokens}
    s["memory"] = {r: dict(heavy, distributed_optimizer=True) for r in ("actor", "critic")}
    return Plan.from_dict(p)


def _verl(plan: Plan | dict) -> dict[str, str]:
    exp = export(plan, "verl")
    values = dict(a.split("=", 1) for a in exp.args)
    assert all(verl_accepts(k) for k in values), [k for k in values if not verl_accepts(k)]
    return values


def _openrlhf(plan: Plan | dict):
    exp = export(plan, "openrlhf")
    ns = parse_command([w for a in exp.args for w in a.split(" ", 1)])
    check_constraints(ns)
    return exp, ns


def test_recompute_offload_and_cp_in_verl(colocated: dict) -> None:
    o = _verl(_memory_heavy(colocated))
    for m in (A, C):
        assert o[f"{m}.context_parallel_size"] == "2"
        assert o[f"{m}.use_distributed_optimizer"] == "true"
        assert o[f"{m}.param_offload"] == o[f"{m}.optimizer_offload"] == "true"
        assert o[f"{m}.{OTC}.recompute_granularity"] == "full"
        assert o[f"{m}.{OTC}.recompute_method"] == "uniform"
        assert o[f"{m}.{OTC}.recompute_num_layers"] == "1"
    # 4096 tokens per micro-batch over cp 2 (verl multiplies the budget by cp)
    for prefix in ("actor_rollout_ref.actor", "critic"):
        assert o[f"{prefix}.use_dynamic_bsz"] == "true"
        assert o[f"{prefix}.ppo_max_token_len_per_gpu"] == "2048"
        assert f"{prefix}.ppo_micro_batch_size_per_gpu" not in o
    assert o["actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu"] == "2048"
    # the reference keeps one sequence and its weights (verl would take the actor's offload)
    assert o["actor_rollout_ref.ref.megatron.context_parallel_size"] == "2"
    assert o["actor_rollout_ref.ref.megatron.param_offload"] == "false"
    assert o["actor_rollout_ref.ref.log_prob_use_dynamic_bsz"] == "false"
    assert not any("grad_offload" in k for k in o)  # verl 0.9.1 has none


def test_recompute_offload_and_cp_in_openrlhf(colocated: dict) -> None:
    exp, ns = _openrlhf(_memory_heavy(colocated))
    g = lambda k: getattr(ns, k)  # noqa: E731 (dests contain dots)
    assert g("ds.ring_attn_size") == 2 and g("ds.packing_samples")
    assert g("actor.gradient_checkpointing_enable") and g("ds.enable_sleep")
    assert not g("ds.adam_offload")
    assert g("train.dynamic_batch_enable") and g("train.max_tokens_per_gpu") == 2048
    assert g("ds.zero_stage") == 3  # the planner's pp 2 layouts: ZeRO-3, no AutoTP
    assert any("adam_offload" in n for n in exp.notes)
    assert any("ring attention 2" in n for n in exp.notes)


def test_default_settings(colocated: dict) -> None:
    """A plan without memory settings gets verl's megatron defaults, said explicitly."""
    o = _verl(colocated | {"sets": _no_memory(colocated)})
    assert o[f"{A}.use_distributed_optimizer"] == o[f"{C}.use_distributed_optimizer"] == "true"
    assert o[f"{A}.param_offload"] == "false" and o[f"{A}.context_parallel_size"] == "1"
    assert not any("recompute" in k for k in o)
    assert o["actor_rollout_ref.actor.use_dynamic_bsz"] == "false"
    assert o["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu"] == "1"
    exp, ns = _openrlhf(ALL_IN_ONE)
    assert getattr(ns, "ds.zero_stage") == 2 and getattr(ns, "ds.ring_attn_size") == 1
    assert not getattr(ns, "ds.enable_sleep") and not getattr(ns, "ds.packing_samples")
    assert any("ZeRO-2" in n for n in exp.notes)


def _no_memory(plan: dict) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "memory"} for s in plan["sets"]]


def _with_memory(plan: dict, **settings: dict) -> dict:
    p = copy.deepcopy(plan)
    p["sets"][0]["memory"] = settings
    return p


def test_no_distributed_optimizer_and_selective_recompute() -> None:
    off = {"distributed_optimizer": False, "recompute": "selective"}
    plan = _with_memory(ALL_IN_ONE, actor=off, critic=off)
    o = _verl(plan)
    assert o[f"{A}.use_distributed_optimizer"] == "false"
    assert o[f"{C}.{OTC}.recompute_granularity"] == "selective"
    assert f"{A}.{OTC}.recompute_method" not in o  # selective: verl's core_attn modules
    exp, ns = _openrlhf(plan)
    assert getattr(ns, "ds.zero_stage") == 0
    assert getattr(ns, "actor.gradient_checkpointing_enable")
    assert any("no selective recomputation" in n for n in exp.notes)


def test_openrlhf_shares_one_setting_for_actor_and_critic() -> None:
    actor, critic = {"micro_batch_tokens": 8192}, {"offload": True, "micro_batch_tokens": 4096}
    exp, ns = _openrlhf(_with_memory(ALL_IN_ONE, actor=actor, critic=critic))
    # the smaller budget, 4096 tokens, over AutoTP 8 (OpenRLHF multiplies it by ring x tp)
    assert getattr(ns, "ds.enable_sleep") and getattr(ns, "train.max_tokens_per_gpu") == 512
    assert getattr(ns, "ds.zero_stage") == 2  # AutoTP 8 trains with ZeRO 0-2 only
    assert any("one set of DeepSpeed settings" in n for n in exp.notes)
    assert any("DeepSpeed > 0.17.5" in n for n in exp.notes)


def _uneven_grpo(ref_pp: int) -> dict:
    """GRPO on qwen2.5-7b (28 layers) with the actor on pp 2: 15 and 13 layers."""
    p = copy.deepcopy(GRPO)
    lay = p["sets"][0]["layouts"]
    lay["actor"] = {"train": _lay(2, 2, 4), "generate": {"pp": 1, "tp": 2, "micro_dp": 2}}
    lay["reference"] = {"infer": _lay(ref_pp, 2, 8 // ref_pp)}
    return p


def test_uneven_pipeline_in_verl() -> None:
    o = _verl(_uneven_grpo(ref_pp=1))
    assert o[f"+{A}.{OTC}.num_layers_in_first_pipeline_stage"] == "15"
    assert o[f"+{A}.{OTC}.num_layers_in_last_pipeline_stage"] == "13"
    # the reference (pp 1) must not inherit the actor's split: its own dict replaces it
    assert shlex.split(o[f"actor_rollout_ref.ref.megatron.{OTC}"]) == ["{attention_backend:flash}"]
    same = _verl(_uneven_grpo(ref_pp=2))  # the same split: the inherited dict is right
    assert f"actor_rollout_ref.ref.megatron.{OTC}" not in same
    assert "layers per stage 15/13" in export(_uneven_grpo(1), "verl").render()


def test_verl_accepts_only_appendable_megatron_fields() -> None:
    assert verl_accepts(f"+{A}.{OTC}.num_layers_in_last_pipeline_stage")
    assert not verl_accepts(f"+{A}.{OTC}.recompute_granularity")  # Hydra: already there
    assert not verl_accepts(f"+{A}.{OTC}.num_layers_in_middle_stage")
    assert not verl_accepts(f"+{A}.num_layers_in_first_pipeline_stage")
    assert not verl_accepts(f"{A}.grad_offload")
