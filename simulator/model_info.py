"""What a plan says about its model: the counts it was planned with, and a one-line warning
naming what the simulator does not model (the spec's notes, from hf_config)."""

from __future__ import annotations

from typing import Any

from hybridflow.simulator.architecture import ModelSpec


def model_summary(spec: ModelSpec, value_head: bool = False) -> dict[str, Any]:
    """Parameters (total, and used per token: they differ for MoE), the bf16 KV cache of one
    token over the whole model, the layer count and the notes. `value_head`: the model as a
    critic or reward model, its LM head replaced by a scalar head."""
    params = spec.value_model_params if value_head else spec.params
    return {
        "params": params,
        "active_params": params - spec.inactive_params,
        "kv_bytes_per_token": spec.kv_bytes_per_token(2),
        "layers": spec.layers,
        "notes": list(spec.notes),
    }


def warning_line(spec: ModelSpec) -> str | None:
    """``warning: <model>: <note>; <note>``, or None when nothing was left out."""
    if not spec.notes:
        return None
    return f"warning: {spec.name}: {'; '.join(spec.notes)}"
