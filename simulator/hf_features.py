"""What a Hugging Face config.json leaves to its class: per-family defaults (transformers'
config classes), and the features of a config that the simulator does not model, as notes.

The defaults are those of transformers' ``configuration_<family>.py`` for the keys a
ModelSpec reads; a key the config sets always wins. The notes are short phrases a warning
line joins ("sliding-window attention (window 4096) costed as full attention").
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hybridflow.simulator.architecture import ModelError

_LLAMA = {"tie_word_embeddings": False, "rms_norm_eps": 1e-6, "rope_theta": 1e4}
_QWEN2_VL = {**_LLAMA, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "attention_bias": True}
_GEMMA = {"tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 1e4, "head_dim": 256}
_MINIMAX = {**_LLAMA, "rms_norm_eps": 1e-5, "rope_theta": 1e6}
# model_type -> config.json defaults (transformers 5 configuration classes).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA,
    "mistral": {**_LLAMA, "sliding_window": 4096},
    "mixtral": {**_LLAMA, "rms_norm_eps": 1e-5, "rope_theta": 1e6},
    "qwen2": {**_LLAMA, "attention_bias": True, "sliding_window": 4096},
    "qwen2_moe": {**_LLAMA, "attention_bias": True},
    "qwen2_vl_text": _QWEN2_VL,
    "qwen2_5_vl_text": _QWEN2_VL,
    "qwen3": {**_LLAMA, "head_dim": 128, "sliding_window": 4096},
    "qwen3_moe": _LLAMA,
    "qwen3_next": {**_LLAMA, "head_dim": 256},
    "qwen3_vl_text": {**_LLAMA, "rope_theta": 5e5, "head_dim": 128},
    "qwen3_vl_moe_text": {**_LLAMA, "rope_theta": 5e5, "head_dim": 128},
    "gemma": _GEMMA,
    "gemma2": {**_GEMMA, "sliding_window": 4096},
    # Gemma 3's published text_config leaves its head layout and vocabulary to the class.
    "gemma3_text": {
        **_GEMMA,
        "rope_theta": 1e6,
        "sliding_window": 4096,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 262_208,
        "max_position_embeddings": 131_072,
    },
    "gpt_oss": {
        **_LLAMA,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1.5e5,
        "head_dim": 64,
        "attention_bias": True,
        "sliding_window": 128,
    },
    "minimax": _MINIMAX,
    "minimax_m1": _MINIMAX,
    "minimax_text_01": _MINIMAX,
    "minimax_m2": {**_LLAMA, "rope_theta": 5e6, "head_dim": 128},
    "llama4_text": {**_LLAMA, "rms_norm_eps": 1e-5, "rope_theta": 5e5, "head_dim": 128},
    "deepseek_v2": _LLAMA,
    "deepseek_v3": _LLAMA,
    "deepseek_v32": _LLAMA,
    "phi3": {**_LLAMA, "rms_norm_eps": 1e-5},
}

# Multimodal wrappers: the model_type of their text_config when it names none.
WRAPPER_TEXT_TYPES = {
    "gemma3": "gemma3_text",
    "mistral3": "mistral",
    "llama4": "llama4_text",
    "qwen2_vl": "qwen2_vl_text",
    "qwen2_5_vl": "qwen2_5_vl_text",
    "qwen3_vl": "qwen3_vl_text",
    "qwen3_vl_moe": "qwen3_vl_moe_text",
}

ENCODER_ONLY = frozenset(
    "albert bert camembert deberta deberta-v2 distilbert electra ernie eurobert modernbert "
    "mpnet nomic_bert roberta xlm-roberta xlm-roberta-xl".split()
)
ENCODER_DECODER = frozenset(
    "bart bigbird_pegasus blenderbot fsmt led longt5 m2m_100 marian mbart mt5 nllb_moe "
    "pegasus plbart prophetnet switch_transformers t5 t5gemma umt5 whisper".split()
)

# Families whose sliding_window, when set, applies to every layer (no layer_types).
_ALL_LAYERS_SLIDE = ("mistral", "mixtral", "phi3", "starcoder2")


def with_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with its family's defaults for the keys it leaves out."""
    out = dict(cfg)
    theta = _rope_theta(cfg.get("rope_parameters"))
    if out.get("rope_theta") is None and theta is not None:
        out["rope_theta"] = theta
    for key, value in FAMILY_DEFAULTS.get(cfg.get("model_type", ""), {}).items():
        out.setdefault(key, value)  # a key set to null keeps its null, as in transformers
    return out


def _rope_theta(params: Any) -> Any:
    """transformers 5 writes rope_theta inside rope_parameters (Gemma 3: per attention kind)."""
    if not isinstance(params, dict):
        return None
    full = params.get("full_attention")
    if params.get("rope_theta") is None and isinstance(full, dict):
        return full.get("rope_theta")
    return params.get("rope_theta")


def layer_types(cfg: dict[str, Any], layers: int, where: str) -> list[str]:
    """Each layer's attention kind, as transformers derives it when layer_types is absent."""
    given = cfg.get("layer_types")
    if given is not None:
        if not isinstance(given, list) or not all(isinstance(t, str) for t in given):
            raise ModelError(f"model config {where!r}: layer_types must be a list of names")
        return given
    kinds = cfg.get("attn_type_list")  # MiniMax: 0 lightning (linear), 1 softmax
    if isinstance(kinds, list):
        return ["linear_attention" if k == 0 else "full_attention" for k in kinds]
    return [_derived_type(cfg, i) for i in range(layers)]


def _derived_type(cfg: dict[str, Any], i: int) -> str:
    mtype = cfg.get("model_type", "")
    if mtype in ("gemma2", "gpt_oss", "gemma3_text"):
        every = _every(cfg, "sliding_window_pattern", 6) if mtype == "gemma3_text" else 2
        return "sliding_attention" if (i + 1) % every else "full_attention"
    if mtype == "minimax":  # transformers' MiniMax: softmax and linear layers alternate
        return "full_attention" if (i + 1) % 2 else "linear_attention"
    if mtype == "qwen3_next" or "full_attention_interval" in cfg:
        every = _every(cfg, "full_attention_interval", 4)
        return "linear_attention" if (i + 1) % every else "full_attention"
    if mtype == "llama4_text" and cfg.get("attention_chunk_size"):
        no_rope = cfg.get("no_rope_layers") or []  # 1: a RoPE layer, the chunked ones
        every = _every(cfg, "no_rope_layer_interval", 4)
        rope = no_rope[i] if i < len(no_rope) else (i + 1) % every
        return "chunked_attention" if rope else "full_attention"
    if not cfg.get("use_sliding_window"):
        return "sliding_attention" if mtype in _ALL_LAYERS_SLIDE else "full_attention"
    window_layers = cfg.get("max_window_layers")  # sliding from this layer on (0: all)
    if not isinstance(window_layers, int) or isinstance(window_layers, bool):
        window_layers = 28
    if mtype in ("qwen2", "qwen3"):
        return "sliding_attention" if i >= window_layers else "full_attention"
    if mtype == "qwen2_moe":
        return "sliding_attention" if (i + 1) % 2 and i < window_layers else "full_attention"
    return "sliding_attention"


def _every(cfg: dict[str, Any], key: str, default: int) -> int:
    """A positive integer setting of `cfg`, or the family's default when unset or not one."""
    v = cfg.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else default


def feature_notes(cfg: dict[str, Any], layers: int, where: str) -> list[str]:
    """One phrase per feature of `cfg` the simulator does not model."""
    notes = _attention_notes(cfg, layer_types(cfg, layers, where))
    if cfg.get("index_topk"):
        notes.append(
            f"DeepSeek sparse attention (index_topk {cfg['index_topk']}) costed as dense "
            "attention, its indexer left out"
        )
    mtp = _mtp_note(cfg)
    if mtp:
        notes.append(mtp)
    quant = cfg.get("quantization_config")
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        notes.append(f"quantized weights ({method or 'quantization_config'}) planned as bf16")
    return notes


def _attention_notes(cfg: dict[str, Any], types: list[str]) -> list[str]:
    counts, n = Counter(types), len(types)

    def share(kind: str) -> str:
        return "" if counts[kind] == n else f", {counts[kind]} of {n} layers"

    notes = []
    if counts["linear_attention"]:
        minimax = "attn_type_list" in cfg or cfg.get("model_type", "").startswith("minimax")
        name = "lightning linear" if minimax else "linear"
        notes.append(f"{name} attention ({share('linear_attention')[2:] or 'all layers'})")
    if counts["sliding_attention"] and cfg.get("sliding_window"):
        window = cfg["sliding_window"]
        notes.append(f"sliding-window attention (window {window}{share('sliding_attention')})")
    if counts["chunked_attention"] and cfg.get("attention_chunk_size"):
        chunk = cfg["attention_chunk_size"]
        notes.append(f"chunked attention (chunks of {chunk}{share('chunked_attention')})")
    known = ("full_attention", "linear_attention", "sliding_attention", "chunked_attention")
    notes += [f"{k!r} layers ({c} of {n})" for k, c in counts.items() if k not in known]
    return [f"{note} costed as full attention" for note in notes]


def _mtp_note(cfg: dict[str, Any]) -> str | None:
    """DeepSeek/GLM num_nextn_predict_layers, Qwen3-Next mtp_num_hidden_layers, MiniMax-M2
    num_mtp_modules x mtp_transformer_layers."""
    if cfg.get("use_mtp") is False:
        return None
    n = cfg.get("num_nextn_predict_layers") or cfg.get("mtp_num_hidden_layers")
    if not n and cfg.get("num_mtp_modules"):
        n = cfg["num_mtp_modules"] * (cfg.get("mtp_transformer_layers") or 1)
    if isinstance(n, int) and n > 0:
        return f"{n} multi-token-prediction layer{'s' if n > 1 else ''} left out"
    if any(k.startswith("mtp_") and cfg[k] for k in cfg) or cfg.get("use_mtp"):
        return "multi-token-prediction layers left out"
    return None
