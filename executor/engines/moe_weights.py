"""Mixture-of-experts layers (Qwen3-MoE): megatron-core settings, megatron and Hugging Face names.

The executor builds one MoE form, Qwen3-MoE's: every layer routes each token to its top-k of
``spec.experts`` SwiGLU experts (softmax over all experts, the top-k probabilities
renormalised: ``norm_topk_prob``), no shared expert, no router bias, no dense layers.
megatron-core (local spec, ``SequentialMLP``, expert parallel 1, experts split over TP like a
dense MLP) names them, layer-locally:

- ``mlp.router.weight`` [E, H], replicated <- HF ``mlp.gate.weight``;
- ``mlp.experts.local_experts.{e}.linear_fc1.weight`` [2F, H], rows ``[gate; up]`` per TP
  shard (as the dense ``linear_fc1``) <- HF ``mlp.experts.{e}.gate_proj`` / ``up_proj``;
- ``mlp.experts.local_experts.{e}.linear_fc2.weight`` [H, F], split on dim 1 (as the dense
  ``linear_fc2``) <- HF ``mlp.experts.{e}.down_proj``.

vLLM's Qwen3MoeForCausalLM loads the Hugging Face names (its fused experts split each
expert's F over TP the same way), so megatron -> vLLM is megatron -> Hugging Face.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from hybridflow.simulator.architecture import ModelSpec

StateDict = dict[str, Tensor]

ROUTER = "mlp.router.weight"
HF_ROUTER = "mlp.gate.weight"
_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")
_KINDS = {"linear_fc1": "fc1", "linear_fc2": "row"}


def unbuildable_reason(spec: ModelSpec) -> str | None:
    """Why the executor cannot build the MoE model `spec` (None: it is of Qwen3-MoE form,
    or dense)."""
    if not spec.is_moe:
        return None
    wrong = [
        what
        for what, bad in (
            ("shared experts", spec.shared_experts > 0),
            ("a router score bias", spec.router_bias),
            (f"{spec.dense_layers} dense (non-MoE) layers", spec.dense_layers > 0),
            ("no q/k norms", not spec.qk_norm),
            ("a qkv bias", spec.qkv_bias),
            ("latent attention", spec.is_mla),
        )
        if bad
    ]
    if not wrong:
        return None
    return (
        f"model {spec.name!r}: of mixture-of-experts models the executor builds Qwen3-MoE only "
        f"(routed experts in every layer, q/k norms); this one has {', '.join(wrong)}"
    )


def megatron_config(spec: ModelSpec) -> dict[str, Any]:
    """TransformerConfig fields of Qwen3-MoE's experts ({} for a dense model): softmax over
    the top-k router logits (= the top-k of the softmax, renormalised: ``norm_topk_prob``),
    no load-balancing loss, no token dropping, per-expert GEMMs (no grouped-GEMM kernel), the
    all-gather dispatcher (collectives only; the all-to-all one makes CUDA streams)."""
    if not spec.is_moe:
        return {}
    return dict(
        num_moe_experts=spec.experts,
        moe_router_topk=spec.experts_per_token,
        moe_ffn_hidden_size=spec.expert_ffn,
        moe_router_pre_softmax=False,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        expert_model_parallel_size=1,
    )


def prepare_megatron() -> None:
    """megatron-core 0.16.1's MoE router gating tests the name ``te_general_gemm``
    (``transformer/moe/moe_utils.py:1192,1225``), bound only when Transformer Engine imports
    (``:34``): without TE, bind it to None, the value that selects its plain torch.mm path."""
    from megatron.core.transformer.moe import moe_utils

    if not moe_utils.HAVE_TE and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


class _OneRank:
    """Stands in for a process group of one rank (only its size is read)."""

    def size(self) -> int:
        return 1


def train_without_sequence_parallel(chunks: list[torch.nn.Module], tp: int) -> None:
    """Let the MoE layers of a TP > 1 model train without sequence parallelism (which the
    local spec's torch norms refuse, ``transformer/torch_norm.py:32``), exactly. megatron's
    MoELayer refuses it (``transformer/moe/moe_layer.py:379``; its ``attn_tp_group`` is read
    for that check only): its all-gather dispatcher then gathers the TP ranks' identical
    tokens, so each rank runs its slice of every expert on `tp` copies of each token. Outputs,
    input and router gradients stay exact (the reduce-scatters sum the slices), but the
    experts' weight gradients come out `tp` times too large: a hook divides them by `tp`."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    if tp == 1:
        return
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, MoELayer):
                module.attn_tp_group = _OneRank()
                for param in module.experts.parameters():
                    param.register_hook(lambda g: g / tp)


def expert_of(local: str) -> tuple[int, str] | None:
    """(expert index, "linear_fc1" | "linear_fc2") of a layer-local expert name, else None."""
    m = _EXPERT_RE.match(local)
    return (int(m.group(1)), m.group(2)) if m else None


def split_kind(local: str) -> str | None:
    """How TP splits a layer-local MoE parameter (the dense kinds), None if not one."""
    if local == ROUTER:
        return "replicated"
    expert = expert_of(local)
    return _KINDS[expert[1]] if expert else None


def hf_name(local: str) -> str | None:
    """The Hugging Face layer-local name of a one-to-one MoE parameter (router, an expert's
    ``linear_fc2``); None for an expert's fused ``linear_fc1`` or a non-MoE name."""
    if local == ROUTER:
        return HF_ROUTER
    expert = expert_of(local)
    if expert and expert[1] == "linear_fc2":
        return f"mlp.experts.{expert[0]}.down_proj.weight"
    return None


def fc1_parts(local: str) -> tuple[str, str] | None:
    """Hugging Face layer-local (gate, up) names of an expert's ``linear_fc1``, else None."""
    expert = expert_of(local)
    if not expert or expert[1] != "linear_fc1":
        return None
    pre = f"mlp.experts.{expert[0]}."
    return pre + "gate_proj.weight", pre + "up_proj.weight"


def layer_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Full (TP=1) shapes of one MoE layer's MLP parameters, layer-local names."""
    h, f = spec.hidden, spec.expert_ffn
    out: dict[str, tuple[int, ...]] = {ROUTER: (spec.experts, h)}
    for e in range(spec.experts):
        pre = f"mlp.experts.local_experts.{e}."
        out[pre + "linear_fc1.weight"] = (2 * f, h)
        out[pre + "linear_fc2.weight"] = (h, f)
    return out


def layer_from_hf(hf: StateDict, pre: str, mp: str, spec: ModelSpec) -> StateDict:
    """The megatron MLP tensors (prefix `mp`) of one Hugging Face MoE layer (prefix `pre`)."""
    out: StateDict = {}
    for local in layer_shapes(spec):
        parts = fc1_parts(local)
        if parts:
            out[mp + local] = torch.cat([hf[pre + parts[0]], hf[pre + parts[1]]])
        else:
            out[mp + local] = hf[pre + str(hf_name(local))]
    return out
