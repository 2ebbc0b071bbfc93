"""Hugging Face config.json <-> ModelSpec, for Llama/Qwen2/Qwen3 dense models and the
mixture-of-experts families Qwen2-MoE, Qwen3-MoE, Mixtral, DeepSeek-V2/V3.

DeepSeek's multi-token-prediction layers (``num_nextn_predict_layers``) are not part of the
ModelSpec: the published 671B of DeepSeek-V3 is the main model without its 14B MTP module.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from hybridflow.simulator.architecture import ModelError, ModelSpec

# Hugging Face config.json keys -> ModelSpec fields (every family; the
# mixture-of-experts and latent-attention keys are read below).
HF_KEYS = {
    "num_hidden_layers": "layers",
    "hidden_size": "hidden",
    "num_attention_heads": "heads",
    "num_key_value_heads": "kv_heads",
    "intermediate_size": "ffn",
    "vocab_size": "vocab",
    "head_dim": "head_dim",
    "tie_word_embeddings": "tied_embeddings",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "norm_eps",
    "max_position_embeddings": "max_position",
}


_MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_QKV_BIAS_TYPES = ("qwen2", "qwen2_moe")
_QK_NORM_TYPES = ("qwen3", "qwen3_moe")


def spec_from_hf_dict(cfg: dict[str, Any], name: str, where: str) -> ModelSpec:
    """A ModelSpec from a parsed config.json; `where` names the file in messages."""
    kw: dict[str, Any] = {dst: cfg[src] for src, dst in HF_KEYS.items() if cfg.get(src) is not None}
    kw.setdefault("kv_heads", cfg.get("num_attention_heads"))
    mtype = cfg.get("model_type", "")
    if mtype == "mixtral" and "ffn" in kw:
        kw["expert_ffn"] = kw["ffn"]
    missing = [f for f in ("layers", "hidden", "heads", "ffn", "vocab") if f not in kw]
    if missing:
        raise ModelError(
            f"model config {where!r} lacks {', '.join(missing)} "
            f"(keys {', '.join(k for k, v in HF_KEYS.items() if v in missing)})"
        )
    kw["qkv_bias"] = bool(cfg.get("attention_bias", mtype in _QKV_BIAS_TYPES))
    kw["qk_norm"] = mtype in _QK_NORM_TYPES
    if cfg.get("kv_lora_rank"):
        kw.update({k: cfg.get(k) or 0 for k in _MLA_KEYS})
        kw.pop("head_dim", None)  # some exports write the rotary size here; derived instead
    kw.update(_moe_fields(cfg, kw["layers"], where))
    known = {f.name for f in fields(ModelSpec)}
    return ModelSpec(name=name, **{k: v for k, v in kw.items() if k in known})


def _moe_fields(cfg: dict[str, Any], layers: Any, where: str) -> dict[str, Any]:
    experts = (
        cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg.get("num_local_experts") or 0
    )
    if not experts:
        return {}
    out: dict[str, Any] = {
        "experts": experts,
        "experts_per_token": cfg.get("num_experts_per_tok") or 0,
    }
    if cfg.get("moe_intermediate_size"):
        out["expert_ffn"] = cfg["moe_intermediate_size"]
    if cfg.get("n_shared_experts"):
        out["shared_experts"] = cfg["n_shared_experts"]
    if cfg.get("shared_expert_intermediate_size"):
        out["shared_expert_ffn"] = cfg["shared_expert_intermediate_size"]
        out["shared_expert_gate"] = cfg.get("model_type") == "qwen2_moe"
    out["router_bias"] = cfg.get("topk_method") == "noaux_tc"
    if isinstance(layers, int) and layers > 0:
        out["dense_layers"] = sum(not _is_moe_layer(cfg, i, where) for i in range(layers))
    return out


def _is_moe_layer(cfg: dict[str, Any], i: int, where: str) -> bool:
    """Which layers carry experts, by each family's rule."""
    if "first_k_dense_replace" in cfg or "moe_layer_freq" in cfg:  # DeepSeek
        k, freq = _get(cfg, "first_k_dense_replace", 0), _get(cfg, "moe_layer_freq", 1)
        _check_ints(where, {"first_k_dense_replace": [k], "moe_layer_freq": [freq]})
        return i >= k and i % freq == 0
    step, only = _get(cfg, "decoder_sparse_step", 1), _get(cfg, "mlp_only_layers", [])
    if not isinstance(only, list):
        raise ModelError(f"model config {where!r}: mlp_only_layers must be a list of layers")
    _check_ints(where, {"decoder_sparse_step": [step], "mlp_only_layers": only})
    return i not in only and (i + 1) % step == 0


def _get(cfg: dict[str, Any], key: str, default: Any) -> Any:
    return default if cfg.get(key) is None else cfg[key]


def _check_ints(where: str, values: dict[str, list[Any]]) -> None:
    for key, vs in values.items():
        for v in vs:
            if (
                not isinstance(v, int)
                or isinstance(v, bool)
                or v < 0
                or (key in ("moe_layer_freq", "decoder_sparse_step") and v == 0)
            ):
                raise ModelError(f"model config {where!r}: bad {key} value {v!r}")


def spec_to_hf_dict(spec: ModelSpec) -> dict[str, Any]:
    """The config.json keys that `spec_from_hf_dict` reads back to an equal ModelSpec."""
    cfg: dict[str, Any] = {src: getattr(spec, dst) for src, dst in HF_KEYS.items()}
    cfg.update(_name_or_path=spec.name, attention_bias=spec.qkv_bias, model_type=_model_type(spec))
    if spec.is_mla:
        cfg.pop("head_dim")
        cfg.update({k: getattr(spec, k) for k in _MLA_KEYS})
    if not spec.is_moe:
        return cfg
    cfg.update(num_experts_per_tok=spec.experts_per_token, moe_intermediate_size=spec.expert_ffn)
    if spec.is_mla:
        if (
            spec.shared_expert_ffn != spec.shared_experts * spec.expert_ffn
            or spec.shared_expert_gate
        ):
            raise ModelError(
                f"model {spec.name!r}: DeepSeek configs need shared experts of "
                f"the routed experts' width, without a gate"
            )
        cfg.update(
            n_routed_experts=spec.experts,
            n_shared_experts=spec.shared_experts,
            first_k_dense_replace=spec.dense_layers,
            moe_layer_freq=1,
            topk_method="noaux_tc" if spec.router_bias else "greedy",
        )
        return cfg
    if spec.router_bias or spec.shared_expert_gate != (
        cfg["model_type"] == "qwen2_moe" and spec.shared_experts > 0
    ):
        raise ModelError(f"model {spec.name!r}: its router has no Qwen config.json form")
    cfg.update(
        num_experts=spec.experts,
        decoder_sparse_step=1,
        mlp_only_layers=list(range(spec.dense_layers)),
        n_shared_experts=spec.shared_experts,
        shared_expert_intermediate_size=spec.shared_expert_ffn,
    )
    return cfg


def _model_type(spec: ModelSpec) -> str:
    if spec.is_mla:
        return "deepseek_v3" if spec.is_moe else "deepseek_v2"
    if spec.qk_norm:
        return "qwen3_moe" if spec.is_moe else "qwen3"
    if spec.is_moe:
        return "qwen2_moe"
    return "qwen2" if spec.qkv_bias else "llama"
