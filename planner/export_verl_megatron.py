"""A trained role's megatron section in verl's overrides: parallel degrees, uneven
pipeline splits, memory settings and micro-batch budgets (engine/megatron.yaml names)."""

from __future__ import annotations

from hybridflow.layout import ParallelLayout
from hybridflow.planner.export_view import PlanView, RoleView


def megatron_section(prefix: str, layout: ParallelLayout) -> dict[str, object]:
    o: dict[str, object] = {
        f"{prefix}.megatron.tensor_model_parallel_size": layout.tp,
        f"{prefix}.megatron.pipeline_model_parallel_size": layout.pp,
        f"{prefix}.megatron.context_parallel_size": layout.cp,
    }
    if layout.ep > 1:  # the plan's experts keep the layout's tp (simulator/moe.py)
        o |= {
            f"{prefix}.megatron.expert_model_parallel_size": layout.ep,
            f"{prefix}.megatron.expert_tensor_parallel_size": layout.tp,
        }
    return o


def split_fields(role: RoleView) -> dict[str, int]:
    """megatron-core's layers of the first and last pipeline stage, where they differ from
    the middle ones (hybridflow.simulator.train_memory.stage_split)."""
    if not role.uneven:
        return {}
    return {
        "num_layers_in_first_pipeline_stage": role.stages[0],
        "num_layers_in_last_pipeline_stage": role.stages[-1],
    }


def memory_section(prefix: str, role: RoleView) -> dict[str, object]:
    """A trained role's memory settings and pipeline split under megatron's names."""
    mem, m = role.settings, f"{prefix}.megatron"
    o: dict[str, object] = {
        f"{m}.use_distributed_optimizer": mem.distributed_optimizer,
        f"{m}.param_offload": mem.offload,
        f"{m}.optimizer_offload": mem.offload,
    }
    otc = f"{m}.override_transformer_config"
    if mem.recompute != "none":
        o[f"{otc}.recompute_granularity"] = mem.recompute
    if mem.recompute == "full":
        o |= {f"{otc}.recompute_method": "uniform", f"{otc}.recompute_num_layers": 1}
    return o | {f"+{otc}.{k}": n for k, n in split_fields(role).items()}


def token_budget(v: PlanView, role: RoleView) -> int | None:
    """verl's *_max_token_len_per_gpu for a role that packs micro-batches: the budget over
    cp, which verl multiplies it by (rounded up: a longest sequence always fits)."""
    tokens = role.packed_tokens(v.seq_len)
    return None if tokens is None else -(-tokens // role.training.cp)


def micro_keys(prefix: str, keys: tuple[str, str, str], tokens: int | None, micro: int) -> dict:
    """keys: (dynamic switch, token budget, sequences per micro-batch) under prefix."""
    dynamic, budget, size = (f"{prefix}.{k}" for k in keys)
    if tokens is None:
        return {dynamic: False, size: micro}
    return {dynamic: True, budget: tokens}


TRAIN_KEYS = ("use_dynamic_bsz", "ppo_max_token_len_per_gpu", "ppo_micro_batch_size_per_gpu")
LOG_PROB_KEYS = (
    "log_prob_use_dynamic_bsz",
    "log_prob_max_token_len_per_gpu",
    "log_prob_micro_batch_size_per_gpu",
)


def memory_notes(v: PlanView) -> list[str]:
    notes = []
    for r in (v.roles[n] for n in ("actor", "critic") if v.role(n) is not None):
        budget, tokens = token_budget(v, r), r.packed_tokens(v.seq_len)
        held = f"{v.micro_batch} sequence(s) per GPU, as the simulator predicts"
        if budget:
            held = f"{tokens} tokens (ppo_max_token_len_per_gpu {budget} x cp {r.training.cp})"
        notes.append(f"the {r.name}'s micro-batches hold {held}")
        if r.settings.offload:
            notes.append(
                f"the {r.name} offloads (param_offload, optimizer_offload; no grad_offload in "
                f"verl 0.9.1): verl brings Adam's states back for a step on the GPU, which the "
                f"simulator prices on the host"
            )
        if r.settings.fsdp:
            notes.append(
                f"the {r.name} trains with FSDP in the plan: run verl's fsdp2 strategy "
                f"({r.name.replace('actor', 'actor_rollout_ref.actor')}.strategy=fsdp2); "
                f"this export writes the megatron keys"
            )
    return notes
