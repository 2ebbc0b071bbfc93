"""A plan as verl's Hydra overrides (megatron engine) and, if needed, its resource pools.

verl 0.9.1 places roles with a ResourcePoolManager (verl/trainer/ppo/v1/trainer_base.py,
``_init_resource_pool_mgr``): actor, rollout, reference and critic share ``global_pool``
(trainer.nnodes x trainer.n_gpus_per_node) and only the reward model may get a pool of its
own (reward.reward_model.enable_resource_pool). Plans that split the other roles get the
pool spec and role mapping a TaskRunner subclass must set, beside the overrides.

A trained role's memory settings go to its megatron section (engine/megatron.yaml):
use_distributed_optimizer; offload as param_offload and optimizer_offload (0.9.1 has no
grad_offload: the gradient buffers follow param_offload); recompute as
override_transformer_config.recompute_granularity (selective: verl's default
recompute_modules [core_attn]; full: recompute_method uniform, recompute_num_layers 1); a
budget of more than one sequence as use_dynamic_bsz with ppo_max_token_len_per_gpu over cp
(verl/workers/actor/megatron_actor.py multiplies it by cp); uneven pipelines as
megatron-core's num_layers_in_first/last_pipeline_stage, appended ("+").
"""

from __future__ import annotations

import shlex

from hybridflow.plan import Plan
from hybridflow.planner.export_refdata import VERL_SOURCE, load_verl_reference, verl_accepts
from hybridflow.planner.export_verl_megatron import (
    LOG_PROB_KEYS,
    TRAIN_KEYS,
    megatron_section,
    memory_notes,
    memory_section,
    micro_keys,
    split_fields,
    token_budget,
)
from hybridflow.planner.export_view import (
    ExportError,
    FrameworkExport,
    PlanView,
    RoleView,
    node_split,
    parse_plan,
    settings_line,
)

ADV_ESTIMATOR = {"ppo": "gae", "grpo": "grpo", "remax": "remax"}
VERL_ROLE = {
    "actor": "ActorRollout",
    "reference": "RefPolicy",
    "critic": "Critic",
    "reward": "RewardModel",
}
MODEL_PATH_KEY = {
    "actor": "actor_rollout_ref.model.path",
    "critic": "critic.model.path",
    "reward": "reward.reward_model.model_path",
}


def _model_path(role: RoleView) -> tuple[str, tuple[str, str] | None]:
    """The path override value, and the variable the user must set if any."""
    if role.model.endswith("config.json"):
        return role.model.rsplit("/", 1)[0] if "/" in role.model else ".", None
    var = f"{role.name.upper()}_MODEL_PATH"
    return f'"${var}"', (var, f"directory of the Hugging Face checkpoint of {role.model}")


RULE_FN_VAR = "REWARD_FN_PATH"


def _reference(v: PlanView, ref: RoleView) -> dict[str, object]:
    """The reference's megatron section. verl takes its param_offload and whole
    override_transformer_config from the actor's (${oc.select:...}); the plan keeps it
    resident, and a split unlike the actor's replaces the dict (keeping verl's default
    attention_backend, engine/megatron.yaml)."""
    m = "actor_rollout_ref.ref.megatron"
    o = megatron_section("actor_rollout_ref.ref", ref.compute) | {f"{m}.param_offload": False}
    own = split_fields(ref)
    if own != split_fields(v.roles["actor"]):
        fields = {"attention_backend": "flash"} | own
        o[f"{m}.override_transformer_config"] = (
            "{" + ",".join(f"{k}:{n}" for k, n in fields.items()) + "}"
        )
    return o


def _vllm_ep(prefix: str, tp: int, ep: int) -> dict[str, object]:
    """vLLM expert parallelism: experts split over each engine's tp x dp GPUs, dp = ep
    attention replicas; each GPU holds the same share of experts as in the plan."""
    if ep <= 1:
        return {}
    return {f"{prefix}.data_parallel_size": ep, f"{prefix}.expert_parallel_size": tp * ep}


def _check_dp_split(v: PlanView, role: RoleView, sequences: int, what: str) -> None:
    """verl splits each batch evenly over the data-parallel ranks in micro-batches."""
    dp = role.compute.dp
    if sequences % (dp * v.micro_batch):
        raise ExportError(
            f"verl cannot split the {what} of {sequences} sequences over the {role.name}'s "
            f"data-parallel size {dp} in micro-batches of {v.micro_batch} "
            f"(verl/utils/config.py validate_config); change global_batch or mini_batches"
        )


def _roles(v: PlanView) -> dict[str, object]:
    actor, gen = v.roles["actor"], v.roles["actor"].generation
    o: dict[str, object] = {"model_engine": "megatron"}
    o |= megatron_section("actor_rollout_ref.actor", actor.training)
    o |= memory_section("actor_rollout_ref.actor", actor)
    o |= {
        "actor_rollout_ref.rollout.name": "vllm",
        "actor_rollout_ref.rollout.tensor_model_parallel_size": gen.tp,
        "actor_rollout_ref.rollout.pipeline_model_parallel_size": gen.pp,
    }
    o |= _vllm_ep("actor_rollout_ref.rollout", gen.tp, actor.training.ep)
    ref, critic, reward = v.role("reference"), v.role("critic"), v.role("reward")
    if ref is not None:
        o |= _reference(v, ref)
    o["critic.enable"] = critic is not None
    if critic is not None:
        o |= megatron_section("critic", critic.compute) | memory_section("critic", critic)
    o["reward.reward_model.enable"] = reward is not None
    if reward is not None:
        o |= {
            "reward.reward_model.rollout.name": "vllm",
            "reward.reward_model.rollout.tensor_model_parallel_size": reward.compute.tp,
            "reward.reward_model.rollout.pipeline_model_parallel_size": reward.compute.pp,
        }
        o |= _vllm_ep("reward.reward_model.rollout", reward.compute.tp, reward.compute.ep)
    if v.is_rule("reward"):
        o |= {
            "reward.custom_reward_function.path": f'"${RULE_FN_VAR}"',
            "reward.custom_reward_function.name": "compute_score",
        }
    return o


def _batches(v: PlanView) -> dict[str, object]:
    n, micro = v.samples_per_prompt, v.micro_batch
    actor = v.roles["actor"]
    _check_dp_split(v, actor, v.mini_batch * n, "PPO mini-batch")
    o: dict[str, object] = {
        "data.train_batch_size": v.global_batch,
        "data.max_prompt_length": v.prompt_len,
        "data.max_response_length": v.response_len,
        "actor_rollout_ref.rollout.n": n,
        "actor_rollout_ref.actor.ppo_mini_batch_size": v.mini_batch,
        "actor_rollout_ref.actor.ppo_epochs": v.ppo_epochs,
    }
    tokens = token_budget(v, actor)  # the actor's old log-probs run with its own budget
    o |= micro_keys("actor_rollout_ref.actor", TRAIN_KEYS, tokens, micro)
    o |= micro_keys("actor_rollout_ref.rollout", LOG_PROB_KEYS, tokens, micro)
    if v.role("reference") is not None:  # no settings in the plan: one sequence
        _check_dp_split(v, v.roles["reference"], v.global_batch * n, "batch")
        o |= micro_keys("actor_rollout_ref.ref", LOG_PROB_KEYS, None, micro)
    critic = v.role("critic")
    if critic is not None:  # critic.forward_max_token_len_per_gpu follows its ppo budget
        _check_dp_split(v, critic, v.mini_batch * n, "PPO mini-batch")
        o |= micro_keys("critic", TRAIN_KEYS, token_budget(v, critic), micro)
    return o


def _algorithm(v: PlanView) -> dict[str, object]:
    o: dict[str, object] = {"algorithm.adv_estimator": ADV_ESTIMATOR[v.algorithm]}
    if v.role("reference") is not None:
        # verl runs the reference only when a KL term needs it (trainer/ppo/utils.py).
        if v.algorithm == "grpo":
            o["actor_rollout_ref.actor.use_kl_loss"] = True
        else:
            o["algorithm.use_kl_in_reward"] = True
    return o


def _pool_names(v: PlanView) -> dict[int, str]:
    actor_set = v.roles["actor"].set_index
    return {
        i: "global_pool"
        if i == actor_set
        else "reward_pool"
        if members == ("reward",)
        else f"pool_{i}"
        for i, members in enumerate(v.sets)
    }


def _pools(v: PlanView) -> tuple[dict[str, object], list[str], str]:
    """Pool overrides, notes, and the mapping text when the config cannot express the plan."""
    actor_set, names = v.roles["actor"].set_index, _pool_names(v)
    nodes, per_node = node_split(v.set_gpus[actor_set], v.gpus_per_node)
    o: dict[str, object] = {"trainer.nnodes": nodes, "trainer.n_gpus_per_node": per_node}
    reward = v.role("reward")
    if reward is not None and names[reward.set_index] == "reward_pool":
        rn, rp = node_split(reward.gpus, v.gpus_per_node)
        o |= {
            "reward.reward_model.enable_resource_pool": True,
            "reward.reward_model.nnodes": rn,
            "reward.reward_model.n_gpus_per_node": rp,
        }
    apart = [
        r.name for r in v.roles.values() if names[r.set_index] not in ("global_pool", "reward_pool")
    ]
    if not apart:
        return o, [], ""
    notes = [
        f"verl's config keeps {', '.join(apart)} in global_pool with the actor; this plan "
        f"gives them GPUs of their own: set the resource pools below in a TaskRunner/"
        f"trainer subclass (_init_resource_pool_mgr)"
    ]
    if "reference" in apart:
        notes.append(
            "verl 0.9.1 fuses the reference into the actor's workers "
            "(Role.ActorRolloutRef) when the actor also generates; a reference on GPUs of "
            "its own needs a stand-alone Role.RefPolicy worker group as well as the pools"
        )
    return o, notes, _mapping_text(v, names)


def _mapping_text(v: PlanView, names: dict[int, str]) -> str:
    spec = {
        names[i]: [node_split(g, v.gpus_per_node)[1]] * node_split(g, v.gpus_per_node)[0]
        for i, g in enumerate(v.set_gpus)
    }
    actor_set = v.roles["actor"].set_index
    mapping = ", ".join(
        f"Role.{_verl_role(v, r)}: {names[r.set_index]!r}"
        for r in v.roles.values()
        if not (r.name == "reference" and r.set_index == actor_set)
    )
    return (
        "Resource pools this plan needs (verl ResourcePoolManager, "
        "verl/trainer/ppo/v1/trainer_base.py):\n"
        f"resource_pool_spec = {spec!r}\nmapping = {{{mapping}}}"
    )


def _verl_role(v: PlanView, role: RoleView) -> str:
    ref = v.role("reference")
    if role.name == "actor" and ref is not None and ref.set_index == role.set_index:
        return "ActorRolloutRef"  # verl fuses a colocated reference into the actor's workers
    return VERL_ROLE[role.name]


def _notes(v: PlanView) -> list[str]:
    notes = memory_notes(v)
    gen = v.roles["actor"].generation
    if gen.tp > 1 and gen.micro_dp > 1:
        notes.append(
            f"generation TP groups: verl's vLLM rollout takes consecutive ranks "
            f"[0..{gen.tp - 1}], [{gen.tp}..{2 * gen.tp - 1}], ...; the plan's 3D-HybridEngine "
            f"groups are strided (ranks r, r+{gen.micro_dp}, ...), so resharding costs what "
            f"`hybridflow simulate --reshard hybridengine-v` predicts"
        )
    ref, actor = v.role("reference"), v.roles["actor"]
    if ref is not None and ref.model != actor.model:
        notes.append(
            f"verl loads the reference from the actor's path ({actor.model}), not {ref.model}"
        )
    reward = v.role("reward")
    if v.is_rule("reward"):
        notes.append(
            f"the reward is a rule: no reward model (reward.reward_model.enable=false); "
            f"verl scores each response on the CPU with compute_score(data_source, "
            f"solution_str, ground_truth, extra_info) from ${RULE_FN_VAR} "
            f"(reward.custom_reward_function)"
        )
    for name, ep in v.expert_parallel.items():
        what = "trains" if v.roles[name].train is not None else "runs"
        notes.append(
            f"the {name} {what} with expert parallelism {ep} (megatron "
            f"expert_model_parallel_size, experts split further by its tp)"
        )
    if actor.training.ep > 1:
        notes.append(
            f"generation: vLLM splits the experts over each engine's tp {gen.tp} x "
            f"dp {actor.training.ep} GPUs (rollout.expert_parallel_size "
            f"{gen.tp * actor.training.ep}), the same share per GPU as the plan's "
            f"ep {actor.training.ep} x tp {gen.tp}; its attention runs data-parallel"
        )
    if reward is not None:
        notes.append(
            f"the reward model runs as a vLLM server with TP {reward.compute.tp} x "
            f"PP {reward.compute.pp} per replica ({reward.compute.dp} replicas in the plan)"
        )
    return notes


def to_verl(plan: Plan | dict) -> FrameworkExport:
    """The plan as a verl launch command; ExportError for what verl cannot run."""
    v = parse_plan(plan)
    if v.algorithm not in ADV_ESTIMATOR:
        raise ExportError(
            f"verl has no {v.algorithm} trainer: it has no cost model or cost "
            f"critic roles (roles: actor, rollout, reference, critic, reward)"
        )
    ref_data = load_verl_reference()
    overrides = _roles(v) | _batches(v) | _algorithm(v)
    pool_overrides, pool_notes, mapping = _pools(v)
    overrides |= pool_overrides
    env = [("TRAIN_FILES", "training prompts (parquet)"), ("VAL_FILES", "validation prompts")]
    overrides |= {"data.train_files": '"$TRAIN_FILES"', "data.val_files": '"$VAL_FILES"'}
    if v.is_rule("reward"):
        env.append((RULE_FN_VAR, "Python file defining compute_score, the rule reward"))
    for name, key in MODEL_PATH_KEY.items():
        if v.role(name) is not None:
            value, var = _model_path(v.roles[name])
            overrides[key] = value
            env += [var] if var else []
    for key in overrides:
        assert verl_accepts(key), f"verl {ref_data['version']} has no key {key}"
    args = tuple(f"{k}={_hydra_value(val)}" for k, val in overrides.items())
    header = [
        f"{v.algorithm} on {v.total_gpus} x {v.gpu}: "
        + "; ".join(f"[{', '.join(s)}] {g} GPUs" for s, g in zip(v.sets, v.set_gpus))
    ]
    header += [settings_line(v)] if settings_line(v) else []
    if v.tokens_per_s:
        header.append(f"predicted {v.tokens_per_s:,.0f} tokens/s, {v.iteration_s:.1f} s/iteration")
    return FrameworkExport(
        "verl",
        ref_data["version"],
        VERL_SOURCE,
        ref_data["entry_point"],
        args,
        tuple(env),
        tuple(header),
        tuple(pool_notes + _notes(v)),
        mapping,
    )


def _hydra_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    return text if text.startswith('"$') else shlex.quote(text)
