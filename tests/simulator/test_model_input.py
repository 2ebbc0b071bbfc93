"""Model input a practitioner can trust: per-family config defaults, multimodal text_config,
gpt-oss/MiniMax/Llama 4 experts, notes for what is not modelled, and refusals. Config dicts
are written inline; transformers (where installed) builds tiny models to count against."""

from __future__ import annotations

import json

import pytest

from hybridflow.simulator.architecture import ModelError, ModelSpec
from hybridflow.simulator.hf_config import spec_from_hf_dict
from hybridflow.simulator.model import load_model
from hybridflow.simulator.model_info import model_summary, warning_line

B = 1e9
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
    "vocab_size": 128,
}
_MOE = {"num_local_experts": 4, "num_experts_per_tok": 2}
# model_type -> keys on top of TINY; dense families first (the list), then MoE.
TRANSFORMERS_CASES = {
    "gemma": {},  # no tie_word_embeddings, no head_dim: Gemma's class ties, head_dim 256
    "llama": {},
    "qwen2": {},
    "qwen3": {},  # head_dim 128 by default, per-head q/k norms
    "mistral": {},
    "mixtral": _MOE,
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "llama4_text": {**_MOE, "intermediate_size_mlp": 160, "head_dim": 16},
}


def spec(cfg: dict, name: str = "m") -> ModelSpec:
    return spec_from_hf_dict(cfg, name, "config.json")


@pytest.mark.parametrize("mtype", sorted(TRANSFORMERS_CASES))
def test_counts_equal_transformers(mtype: str) -> None:
    transformers = pytest.importorskip("transformers")
    extra = TRANSFORMERS_CASES[mtype]
    hf_cfg = transformers.AutoConfig.for_model(mtype, **TINY, **extra)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    m = spec({"model_type": mtype, **TINY, **extra})
    assert m.params == sum(p.numel() for p in model.parameters())  # tied tensors once
    assert m.tied_embeddings == bool(hf_cfg.tie_word_embeddings)


def test_gemma_ties_when_the_key_is_absent() -> None:
    gemma = spec({"model_type": "gemma", **TINY})
    assert gemma.tied_embeddings and gemma.head_dim == 256 and gemma.head_params == 0
    assert gemma.params == gemma.embedding_params + gemma.layers_params + gemma.hidden
    assert not spec({"model_type": "gemma", **TINY, "tie_word_embeddings": False}).tied_embeddings
    assert not spec({"model_type": "llama", **TINY}).tied_embeddings
    assert spec({"model_type": "gemma2", **TINY}).tied_embeddings
    assert spec({"model_type": "gemma3_text", **TINY}).tied_embeddings


def test_family_defaults() -> None:
    qwen2 = spec({"model_type": "qwen2", **TINY})
    assert qwen2.qkv_bias and qwen2.norm_eps == 1e-6 and qwen2.rope_theta == 1e4
    oss = spec({"model_type": "gpt_oss", **TINY, **_MOE})
    assert oss.qkv_bias and oss.head_dim == 64 and oss.rope_theta == 1.5e5
    assert oss.norm_eps == 1e-5
    # transformers 5 writes rope_theta inside rope_parameters (Gemma 3: per attention kind)
    v5 = spec({"model_type": "llama", **TINY, "rope_parameters": {"rope_theta": 5e5}})
    assert v5.rope_theta == 5e5
    g3 = {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}
    assert spec({"model_type": "gemma3_text", **TINY, "rope_parameters": g3}).rope_theta == 1e6
    # a key the config sets wins; no model_type: the ModelSpec defaults
    assert spec({"model_type": "qwen2", **TINY, "attention_bias": False}).qkv_bias is False
    plain = spec(dict(TINY))
    assert (plain.norm_eps, plain.tied_embeddings, plain.notes) == (1e-5, False, ())


GEMMA3_4B = {  # google/gemma-3-4b-it: the text_config leaves heads and vocab to the class
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "vision_config": {"hidden_size": 1152, "model_type": "siglip_vision_model"},
}


def test_text_config_is_the_language_model() -> None:
    m = spec(GEMMA3_4B, "gemma-3-4b")
    assert (m.layers, m.hidden, m.heads, m.kv_heads, m.head_dim) == (34, 2560, 8, 4, 256)
    assert m.vocab == 262_208 and m.tied_embeddings and m.qk_norm
    assert abs(m.params - 3.88 * B) < 0.01 * B  # Gemma 3 4B: 3.88B language model
    assert m.notes[0] == "read text_config as the language model (vision_config left out)"
    assert "sliding-window attention (window 1024, 29 of 34 layers)" in m.notes[1]
    flat = spec(GEMMA3_4B["text_config"], "gemma-3-4b")
    assert flat == m  # the same architecture; only the notes differ
    untied = spec({**GEMMA3_4B, "tie_word_embeddings": False})  # the wrapper's key governs
    assert not untied.tied_embeddings
    mistral3 = spec({"model_type": "mistral3", "text_config": {**TINY, "sliding_window": None}})
    assert mistral3.notes == ("read text_config as the language model",)


def test_load_model_reads_a_wrapper_file(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(GEMMA3_4B))
    m = load_model(str(tmp_path))
    assert m.name == tmp_path.name and m.layers == 34 and len(m.notes) == 2


GPT_OSS_120B = {  # openai/gpt-oss-120b config.json (rope_scaling left out)
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "attention_bias": True,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 18,
    "max_position_embeddings": 131072,
    "num_attention_heads": 64,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "num_local_experts": 128,
    "quantization_config": {"modules_to_not_convert": [], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_theta": 150000,
    "sliding_window": 128,
    "tie_word_embeddings": False,
    "vocab_size": 201088,
}


def test_gpt_oss_experts_are_planned() -> None:
    m = spec(GPT_OSS_120B, "gpt-oss-120b")
    assert m.is_moe and (m.experts, m.experts_per_token, m.expert_ffn) == (128, 4, 2880)
    assert m.dense_layers == 0 and m.router_bias
    # OpenAI's model card: 116.83B total, 5.13B active (without the embedding table); the
    # biases and attention sinks (about 40M) are not counted here.
    assert abs(m.params - 116.83 * B) < 0.001 * m.params
    assert abs(m.active_params - m.embedding_params - 5.13 * B) < 0.01 * B
    assert m.notes == (
        "sliding-window attention (window 128, 18 of 36 layers) costed as full attention",
        "quantized weights (mxfp4) planned as bf16",
    )
    small = {**GPT_OSS_120B, "num_hidden_layers": 24, "num_local_experts": 32}
    small["layer_types"] = small["layer_types"][:24]
    del small["experts_per_token"]
    small["num_experts_per_tok"] = 4  # either key names the top-k
    m20 = spec(small)
    assert abs(m20.params - 20.91 * B) < 0.01 * B
    assert abs(m20.active_params - m20.embedding_params - 3.61 * B) < 0.01 * B


MINIMAX_TEXT_01 = {  # MiniMaxAI/MiniMax-Text-01: 7 lightning layers, then a softmax one
    "model_type": "minimax_text_01",
    "attn_type_list": ([0] * 7 + [1]) * 10,
    "head_dim": 128,
    "hidden_size": 6144,
    "intermediate_size": 9216,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 80,
    "num_local_experts": 32,
    "shared_intermediate_size": 0,
    "vocab_size": 200064,
}
MINIMAX_M2 = {  # MiniMaxAI/MiniMax-M2 (230B total, 10B active)
    "model_type": "minimax_m2",
    "attn_type_list": [1] * 62,
    "head_dim": 128,
    "hidden_size": 3072,
    "intermediate_size": 1536,
    "num_attention_heads": 48,
    "num_key_value_heads": 8,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 62,
    "num_local_experts": 256,
    "num_mtp_modules": 3,
    "mtp_transformer_layers": 1,
    "use_mtp": True,
    "use_routing_bias": True,
    "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
    "vocab_size": 200064,
}


def test_minimax_experts_are_planned() -> None:
    t01 = spec(MINIMAX_TEXT_01)
    assert t01.is_moe and (t01.experts, t01.expert_ffn, t01.shared_experts) == (32, 9216, 0)
    assert t01.notes == ("lightning linear attention (70 of 80 layers) costed as full attention",)
    m2 = spec(MINIMAX_M2)
    assert (m2.experts, m2.experts_per_token, m2.expert_ffn) == (256, 8, 1536)
    assert m2.router_bias and abs(m2.params - 230 * B) < 0.01 * 230 * B
    assert abs(m2.active_params - m2.embedding_params - m2.head_params - 10 * B) < 0.1 * 10 * B
    assert m2.notes == (
        "3 multi-token-prediction layers left out",
        "quantized weights (fp8) planned as bf16",
    )


def test_llama4_dense_width_and_shared_expert() -> None:
    text = {  # meta-llama/Llama-4-Scout-17B-16E text_config (17B active)
        "model_type": "llama4_text",
        "attention_chunk_size": 8192,
        "hidden_size": 5120,
        "intermediate_size": 8192,
        "intermediate_size_mlp": 16384,
        "num_attention_heads": 40,
        "num_experts_per_tok": 1,
        "num_hidden_layers": 48,
        "num_key_value_heads": 8,
        "num_local_experts": 16,
        "vocab_size": 202048,
    }
    scout = spec({"model_type": "llama4", "text_config": text, "vision_config": {"x": 1}})
    assert (scout.expert_ffn, scout.ffn, scout.shared_experts, scout.dense_layers) == (
        8192,
        16384,
        1,
        0,
    )
    assert round(scout.active_params / B) == 17
    assert "chunked attention (chunks of 8192, 36 of 48 layers) costed as full attention" in (
        scout.notes
    )
    maverick = spec({**text, "num_local_experts": 128, "interleave_moe_layer_step": 2})
    assert maverick.dense_layers == 24 and round(maverick.active_params / B) == 17


def _notes(**extra) -> tuple[str, ...]:
    return spec({"model_type": "llama", **TINY, **extra}).notes


def test_each_unmodelled_feature_is_named() -> None:
    window = "sliding-window attention (window 4096) costed as full attention"
    assert spec({"model_type": "mistral", **TINY}).notes == (window,)  # the class default
    assert spec({"model_type": "mistral", **TINY, "sliding_window": None}).notes == ()
    qwen = {"model_type": "qwen2", **TINY, "sliding_window": 4096}
    assert spec(qwen).notes == ()  # set but not used
    used = spec({**qwen, "use_sliding_window": True, "max_window_layers": 1}).notes
    assert used == (
        "sliding-window attention (window 4096, 1 of 2 layers) costed as full attention",
    )
    assert "1 of 2 layers" in spec({"model_type": "gemma2", **TINY}).notes[0]
    hybrid = _notes(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=8)
    assert hybrid == ("linear attention (1 of 2 layers) costed as full attention",)
    qwen3_next = spec({"model_type": "qwen3_next", **TINY, "num_hidden_layers": 8}).notes
    assert qwen3_next == ("linear attention (6 of 8 layers) costed as full attention",)
    assert _notes(attn_type_list=[0, 1])[0].startswith("lightning linear attention (1 of 2")
    assert _notes(index_topk=2048) == (
        "DeepSeek sparse attention (index_topk 2048) costed as dense attention, "
        "its indexer left out",
    )
    assert _notes(num_nextn_predict_layers=1) == ("1 multi-token-prediction layer left out",)
    assert _notes(mtp_num_hidden_layers=2) == ("2 multi-token-prediction layers left out",)
    assert _notes(num_nextn_predict_layers=0, use_mtp=False) == ()
    assert _notes(quantization_config={"quant_method": "fp8"}) == (
        "quantized weights (fp8) planned as bf16",
    )
    assert _notes(layer_types=["mamba", "full_attention"]) == (
        "'mamba' layers (1 of 2) costed as full attention",
    )
    assert _notes(vision_config={"hidden_size": 8}) == (
        "vision_config left out (language model only)",
    )


def test_deepseek_v32_sparse_attention_and_mtp() -> None:
    cfg = {
        "model_type": "deepseek_v32",
        **TINY,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 8,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "index_topk": 2048,
        "num_nextn_predict_layers": 1,
    }
    m = spec(cfg)
    assert m.is_mla and m.is_moe and len(m.notes) == 2 and "index_topk 2048" in m.notes[0]


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"model_type": "bert", **TINY}, r"'bert' is an encoder-only model"),
        ({"model_type": "t5", "d_model": 64}, r"'t5' is an encoder-decoder model"),
        ({"model_type": "x", "is_encoder_decoder": True, **TINY}, "encoder-decoder"),
        ({"model_type": "gpt2", "n_layer": 2, "n_embd": 64}, r"lacks layers.*it has n_layer"),
        ({"model_type": "gemma3", "text_config": {"hidden_size": 64}}, r"\(text_config\)' lacks"),
        ({"model_type": "gemma3", "text_config": [1]}, "text_config must be a JSON object"),
        (
            {"model_type": "qwen3_moe", **TINY, "num_experts": 4, "num_experts_per_tok": 2},
            "names experts but not their width",
        ),
        ({"model_type": "llama", **TINY, "layer_types": "full"}, "layer_types must be a list"),
    ],
)
def test_refusals(cfg: dict, match: str) -> None:
    with pytest.raises(ModelError, match=match) as e:
        spec(cfg)
    assert "\n" not in str(e.value)


def test_summary_and_warning_line() -> None:
    m = spec(GPT_OSS_120B, "gpt-oss-120b")
    s = model_summary(m)
    assert set(s) == {"params", "active_params", "kv_bytes_per_token", "layers", "notes"}
    assert (s["params"], s["active_params"], s["layers"]) == (m.params, m.active_params, 36)
    assert s["kv_bytes_per_token"] == 2 * 36 * 8 * 64 * 2 and s["notes"] == list(m.notes)
    critic = model_summary(m, value_head=True)
    assert critic["params"] == m.value_model_params
    assert critic["params"] - critic["active_params"] == m.inactive_params
    assert warning_line(m) == (
        "warning: gpt-oss-120b: sliding-window attention (window 128, 18 of 36 layers) "
        "costed as full attention; quantized weights (mxfp4) planned as bf16"
    )
    assert (
        warning_line(load_model("tiny")) is None
        and model_summary(load_model("tiny"))["notes"] == []
    )


def test_notes_are_not_part_of_the_identity() -> None:
    a = spec({"model_type": "llama", **TINY})
    b = spec({"model_type": "llama", **TINY, "quantization_config": {"quant_method": "fp8"}})
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert a.to_dict() == b.to_dict() and "notes" not in a.to_dict()
    with pytest.raises(ModelError, match="notes must be a tuple"):
        ModelSpec(name="x", layers=2, hidden=64, heads=4, kv_heads=4, ffn=96, vocab=8, notes=[1])
