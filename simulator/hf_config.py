"""Hugging Face config.json <-> ModelSpec, for Llama/Qwen2/Qwen3/Mistral/Gemma dense models
and the mixture-of-experts families Qwen2-MoE, Qwen3-MoE, Qwen3-Next, Mixtral, DeepSeek-V2/V3,
gpt-oss, MiniMax and Llama 4; a multimodal wrapper is read through its ``text_config``.

Keys a config leaves out take its family's transformers default (hf_features); what the
simulator does not model (sliding windows, linear or sparse attention, multi-token-prediction
layers, quantized weights) is kept as the spec's notes. DeepSeek's multi-token-prediction
layers (``num_nextn_predict_layers``) are not part of the ModelSpec: the published 671B of
DeepSeek-V3 is the main model without its 14B MTP module.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from hybridflow.simulator.architecture import ModelError, ModelSpec
from hybridflow.simulator.hf_features import (
    ENCODER_DECODER,
    ENCODER_ONLY,
    WRAPPER_TEXT_TYPES,
    feature_notes,
    with_defaults,
)

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
# Other families' names for the required keys (read by none of them here).
_ALIASES = {
    "layers": ("n_layer", "n_layers", "num_layers"),
    "hidden": ("n_embd", "d_model"),
    "heads": ("n_head", "n_heads"),
}


_MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_QK_NORM_TYPES = (
    "qwen3",
    "qwen3_moe",
    "qwen3_next",
    "qwen3_vl_text",
    "qwen3_vl_moe_text",
    "gemma3_text",
)
# MoE families whose intermediate_size is the dense MLP's width (the experts' is
# moe_intermediate_size); elsewhere (Mixtral, gpt-oss, MiniMax) it is the experts' width.
_SEPARATE_EXPERT_WIDTH = (
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_next",
    "qwen3_vl_moe_text",
    "deepseek_v2",
    "deepseek_v3",
    "deepseek_v32",
    "glm4_moe",
)
_ROUTER_BIAS_TYPES = ("gpt_oss", "glm4_moe")  # a bias (or score correction) per expert
_SHARED_GATE_TYPES = ("qwen2_moe", "qwen3_next")


def spec_from_hf_dict(cfg: dict[str, Any], name: str, where: str) -> ModelSpec:
    """A ModelSpec from a parsed config.json; `where` names the file in messages. What the
    simulator does not model is named in the spec's notes."""
    _refuse_non_decoder(cfg, where)
    text, notes = language_model(cfg, where)
    if text is not cfg:
        where = f"{where} (text_config)"
    text = with_defaults(text)
    kw: dict[str, Any] = {
        dst: text[src] for src, dst in HF_KEYS.items() if text.get(src) is not None
    }
    kw.setdefault("kv_heads", text.get("num_attention_heads"))
    _check_present(kw, text, where)
    kw["qkv_bias"] = bool(text.get("attention_bias", False))
    kw["qk_norm"] = text.get("model_type", "") in _QK_NORM_TYPES
    kw["rope_scaling"] = llama3_rope(text, where).get("factor", 0.0)
    if text.get("kv_lora_rank"):
        kw.update({k: text.get(k) or 0 for k in _MLA_KEYS})
        kw.pop("head_dim", None)  # some exports write the rotary size here; derived instead
    kw.update(_moe_fields(text, kw["layers"], where))
    layers = kw["layers"] if _is_count(kw["layers"]) else 0
    notes += feature_notes(text, layers, where)
    known = {f.name for f in fields(ModelSpec)}
    kw = {k: v for k, v in kw.items() if k in known}
    return ModelSpec(name=name, notes=tuple(notes), **kw)


def llama3_rope(cfg: dict[str, Any], where: str = "") -> dict[str, Any]:
    """The llama3 RoPE scaling parameters (Llama 3.1+) of a config, {} if it has none
    (transformers 4 names them rope_scaling, transformers 5 rope_parameters)."""
    for key in ("rope_scaling", "rope_parameters"):
        value = cfg.get(key)
        if isinstance(value, dict) and (value.get("rope_type") or value.get("type")) == "llama3":
            factor = value.get("factor")
            if not isinstance(factor, int | float) or isinstance(factor, bool) or factor < 1:
                raise ModelError(
                    f"model config {where!r}: {key}.factor must be a number >= 1, got {factor!r}"
                )
            return {**value, "factor": float(factor)}
    return {}


def language_model(cfg: dict[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """The language model's keys and a note: a multimodal wrapper's text_config, with the
    wrapper's keys that govern it (its LM head's tying, its quantization)."""
    towers = [k for k in ("vision_config", "audio_config") if cfg.get(k)]
    text = cfg.get("text_config")
    if text is None:
        return cfg, [f"{' and '.join(towers)} left out (language model only)"] if towers else []
    if not isinstance(text, dict):
        raise ModelError(f"model config {where!r}: text_config must be a JSON object")
    out = dict(text)
    out.setdefault("model_type", WRAPPER_TEXT_TYPES.get(cfg.get("model_type", ""), ""))
    for key in ("tie_word_embeddings", "quantization_config"):
        if cfg.get(key) is not None:
            out[key] = cfg[key]
    left_out = f" ({' and '.join(towers)} left out)" if towers else ""
    return out, [f"read text_config as the language model{left_out}"]


def _refuse_non_decoder(cfg: dict[str, Any], where: str) -> None:
    text = cfg.get("text_config")
    for c in (cfg, text) if isinstance(text, dict) else (cfg,):
        mtype = c.get("model_type", "")
        if mtype in ENCODER_ONLY:
            kind = "an encoder-only"
        elif mtype in ENCODER_DECODER or c.get("is_encoder_decoder"):
            kind = "an encoder-decoder"
        else:
            continue
        raise ModelError(
            f"model config {where!r}: {repr(mtype) if mtype else 'it'} is {kind} model; only "
            "decoder-only language models can be planned"
        )


def _check_present(kw: dict[str, Any], cfg: dict[str, Any], where: str) -> None:
    missing = [f for f in ("layers", "hidden", "heads", "ffn", "vocab") if f not in kw]
    if not missing:
        return
    keys = ", ".join(k for k, v in HF_KEYS.items() if v in missing)
    others = [a for f in missing for a in _ALIASES.get(f, ()) if a in cfg]
    hint = f"; it has {', '.join(others)}, a layout not read here" if others else ""
    raise ModelError(f"model config {where!r} lacks {', '.join(missing)} (keys {keys}){hint}")


def _moe_fields(cfg: dict[str, Any], layers: Any, where: str) -> dict[str, Any]:
    experts = (
        cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg.get("num_local_experts") or 0
    )
    if not experts:
        return {}
    mtype = cfg.get("model_type", "")
    out: dict[str, Any] = {
        "experts": experts,
        "experts_per_token": cfg.get("num_experts_per_tok") or cfg.get("experts_per_token") or 0,
    }
    out.update(_expert_widths(cfg, mtype, where))
    shared = cfg.get("n_shared_experts") or cfg.get("num_shared_experts")
    if shared:
        out["shared_experts"] = shared
    shared_ffn = cfg.get("shared_expert_intermediate_size") or cfg.get("shared_intermediate_size")
    if shared_ffn:
        out["shared_expert_ffn"] = shared_ffn
        out["shared_expert_gate"] = mtype in _SHARED_GATE_TYPES
    out["router_bias"] = bool(
        cfg.get("topk_method") == "noaux_tc"
        or mtype in _ROUTER_BIAS_TYPES
        or cfg.get("use_routing_bias")  # MiniMax-M2's score correction
    )
    if _is_count(layers):
        out["dense_layers"] = sum(not _is_moe_layer(cfg, i, where) for i in range(layers))
    return out


def _expert_widths(cfg: dict[str, Any], mtype: str, where: str) -> dict[str, Any]:
    """expert_ffn (and, where the family has them apart, the dense width and shared expert)."""
    if cfg.get("moe_intermediate_size"):
        return {"expert_ffn": cfg["moe_intermediate_size"]}
    if mtype == "llama4_text":  # experts and the shared expert of intermediate_size
        dense = cfg.get("intermediate_size_mlp") or cfg.get("intermediate_size")
        return {"expert_ffn": cfg.get("intermediate_size"), "ffn": dense, "shared_experts": 1}
    if mtype in _SEPARATE_EXPERT_WIDTH:
        raise ModelError(
            f"model config {where!r}: {mtype} names experts but not their width "
            "(key moe_intermediate_size)"
        )
    return {"expert_ffn": cfg.get("intermediate_size") or 0}


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_moe_layer(cfg: dict[str, Any], i: int, where: str) -> bool:
    """Which layers carry experts, by each family's rule."""
    if "moe_layers" in cfg or "interleave_moe_layer_step" in cfg:  # Llama 4
        listed, step = cfg.get("moe_layers"), _get(cfg, "interleave_moe_layer_step", 1)
        if listed is not None and not isinstance(listed, list):
            raise ModelError(f"model config {where!r}: moe_layers must be a list of layers")
        _check_ints(where, {"moe_layers": listed or [], "interleave_moe_layer_step": [step]})
        return i in listed if listed is not None else (i + 1) % step == 0
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
                or (
                    key in ("moe_layer_freq", "decoder_sparse_step", "interleave_moe_layer_step")
                    and v == 0
                )
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
