"""Mixture-of-experts and latent-attention models: published counts, hand-computed layers,
expert-parallel shares, Hugging Face config.json reading and round trip."""

from __future__ import annotations

import json

import pytest

from hybridflow.simulator.architecture import ModelError, ModelSpec
from hybridflow.simulator.model import CATALOG, load_model, to_hf_config

B = 1e9
# (model, count, published value, source). Counts: "total" = params, "active" = active_params
# (the whole embedding table included, as Qwen counts), "active-no-embedding" = without the
# input embedding (DeepSeek's README_WEIGHTS count: "including 0.9B for the output Head").
PUBLISHED = [
    ("qwen3-30b-a3b", "total", 30.5 * B, "huggingface.co/Qwen/Qwen3-30B-A3B model card"),
    ("qwen3-30b-a3b", "non-embedding", 29.9 * B, "same card, 'Non-Embedding: 29.9B'"),
    # The card says "3.3B activated" (two digits); NVIDIA Megatron-LM's Qwen3-30B-A3B
    # recipe (examples/megatron_fsdp_v2_prototype/qwen3_30b_a3b_mxfp8/README.md) gives 3.35B.
    ("qwen3-30b-a3b", "active", 3.35 * B, "Megatron-LM Qwen3-30B-A3B recipe README"),
    ("qwen3-235b-a22b", "total", 235 * B, "huggingface.co/Qwen/Qwen3-235B-A22B model card"),
    ("qwen3-235b-a22b", "non-embedding", 234 * B, "same card, 'Non-Embedding: 234B'"),
    ("qwen3-235b-a22b", "active", 22 * B, "same card, '22B activated'"),
    # 671B main model; the hub's 685B adds the 14B multi-token-prediction module.
    ("deepseek-v3", "total", 671 * B, "arXiv 2412.19437 abstract; DeepSeek-V3 README_WEIGHTS.md"),
    (
        "deepseek-v3",
        "active-no-embedding",
        36.6 * B,
        "DeepSeek-V3 README_WEIGHTS.md (first revision): 'Activation parameters: 36.6B "
        "(including 0.9B for the output Head)'",
    ),
]


def _count(m: ModelSpec, kind: str) -> int:
    return {
        "total": m.params,
        "active": m.active_params,
        "non-embedding": m.params - m.embedding_params - m.head_params,
        "active-no-embedding": m.active_params - m.embedding_params,
    }[kind]


@pytest.mark.parametrize("name,kind,published,source", PUBLISHED)
def test_published_counts_within_1pct(name: str, kind: str, published: float, source: str) -> None:
    assert abs(_count(load_model(name), kind) - published) <= 0.01 * published, source


def test_headline_active_counts() -> None:
    # Two-digit headline figures: Qwen3-30B-A3B "3.3B", DeepSeek-V3 "37B" (arXiv abstract);
    # ours (3.353B, 37.55B with the embedding) round down to them.
    assert int(load_model("qwen3-30b-a3b").active_params / 1e8) == 33
    assert int(load_model("deepseek-v3").active_params / B) == 37


def _small_moe(**kw) -> ModelSpec:
    base = dict(
        name="moe",
        layers=3,
        hidden=64,
        heads=4,
        kv_heads=2,
        ffn=256,
        vocab=100,
        experts=8,
        experts_per_token=2,
        expert_ffn=32,
        shared_experts=1,
        dense_layers=1,
        router_bias=True,
    )
    return ModelSpec(**{**base, **kw})


def test_moe_layer_by_hand() -> None:
    m = _small_moe()
    attn = 64 * (64 + 2 * 32) + 64 * 64  # q, k, v (2 KV heads of 16), o
    expert = 3 * 64 * 32
    router = 8 * 64 + 8  # gate and score-correction bias
    assert (m.attn_params_per_layer, m.expert_params, m.router_params) == (attn, expert, router)
    assert m.shared_expert_ffn == 32 and m.shared_expert_params == expert
    assert m.moe_params_per_layer == router + 8 * expert + expert
    assert m.moe_active_params_per_layer == router + 2 * expert + expert
    assert m.moe_layers == 2
    layers = 3 * (attn + 2 * 64) + 3 * 64 * 256 + 2 * (router + 9 * expert)
    assert m.layers_params == layers
    assert m.params == 100 * 64 + layers + 64 + 100 * 64
    assert m.active_params == m.params - 2 * 6 * expert
    matmul = 3 * attn + 3 * 64 * 256 + 2 * (router + 3 * expert) + 100 * 64
    assert m.flops_per_token() == 2 * matmul
    assert m.flops_per_token(10) == 2 * matmul + 2 * 3 * (64 + 64) * 10
    assert m.kv_bytes_per_token() == 2 * 3 * 32 * 2


def test_expert_parallel_shares() -> None:
    m = _small_moe()
    routed = 2 * 8 * 3 * 64 * 32
    assert m.routed_expert_params == routed
    assert m.non_expert_params == m.params - routed
    assert [m.params_per_ep_rank(ep) for ep in (1, 2, 8)] == [
        m.params,
        m.params - routed // 2,
        m.params - routed + routed // 8,
    ]
    for ep in (3, 16, 0):
        with pytest.raises(ModelError):
            m.params_per_ep_rank(ep)


def test_shared_expert_gate_and_width() -> None:
    m = _small_moe(
        shared_experts=0, shared_expert_ffn=48, shared_expert_gate=True, router_bias=False
    )
    assert m.shared_experts == 1
    assert m.shared_expert_params == 3 * 64 * 48 + 64


def test_latent_attention_by_hand() -> None:
    m = ModelSpec(
        name="mla",
        layers=2,
        hidden=64,
        heads=4,
        kv_heads=4,
        ffn=128,
        vocab=100,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
    )
    assert m.head_dim == 12 and m.q_dim == 48 and m.v_dim == 32
    q = 64 * 32 + 32 + 32 * 4 * 12  # down, norm, up
    kv = 64 * (16 + 4) + 16 + 16 * 4 * (8 + 8)  # down (latent + rotary key), norm, up
    assert m.attn_params_per_layer == q + kv + 4 * 8 * 64
    assert m.kv_bytes_per_token() == 2 * (16 + 4) * 2  # the latent, not per-head K and V
    assert m.flops_per_token(5) - m.flops_per_token(0) == 2 * 2 * (48 + 32) * 5
    full_q = ModelSpec(**{**m.to_dict(), "q_lora_rank": 0})
    assert full_q.attn_params_per_layer == 64 * 4 * 12 + kv + 4 * 8 * 64


def test_deepseek_v3_kv_cache_is_the_latent() -> None:
    assert load_model("deepseek-v3").kv_bytes_per_token() == 61 * (512 + 64) * 2


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(experts_per_token=9), "experts_per_token"),
        (dict(experts_per_token=0), "experts_per_token"),
        (dict(expert_ffn=0), "expert_ffn"),
        (dict(dense_layers=3), "dense_layers"),
        (dict(experts=0), "need experts"),
        (dict(v_head_dim=8), "kv_lora_rank"),
        (dict(kv_lora_rank=16), "needs qk_nope_head_dim"),
    ],
)
def test_bad_moe_specs(kw: dict, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        _small_moe(**kw)


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_hf_config_round_trip(name: str, tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(CATALOG[name])))
    assert load_model(str(tmp_path)) == CATALOG[name]


def _load(tmp_path, cfg: dict) -> ModelSpec:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return load_model(str(path))


def test_reads_qwen3_moe_config(tmp_path) -> None:
    cfg = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "attention_bias": False,
        "decoder_sparse_step": 1,
        "head_dim": 128,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "max_position_embeddings": 40960,
        "mlp_only_layers": [],
        "moe_intermediate_size": 1536,
        "norm_topk_prob": True,
        "num_attention_heads": 64,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 94,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 151936,
    }
    m = _load(tmp_path, cfg)
    assert m.params == CATALOG["qwen3-235b-a22b"].params
    assert m.active_params == CATALOG["qwen3-235b-a22b"].active_params
    dense_every_other = _load(
        tmp_path, {**cfg, "decoder_sparse_step": 2, "mlp_only_layers": [1, 3]}
    )
    # experts on layers whose i+1 is even, except the listed 1 and 3
    assert dense_every_other.dense_layers == 47 + 2


def test_reads_deepseek_v3_config(tmp_path) -> None:
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "first_k_dense_replace": 3,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "kv_lora_rank": 512,
        "max_position_embeddings": 163840,
        "moe_intermediate_size": 2048,
        "moe_layer_freq": 1,
        "n_group": 8,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 61,
        "num_key_value_heads": 128,
        "num_nextn_predict_layers": 1,
        "q_lora_rank": 1536,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "tie_word_embeddings": False,
        "topk_group": 4,
        "topk_method": "noaux_tc",
        "v_head_dim": 128,
        "vocab_size": 129280,
        "head_dim": 64,
    }  # newer exports write the rotary size here
    m = _load(tmp_path, cfg)
    assert m.params == 671_026_419_200 == CATALOG["deepseek-v3"].params
    assert m.to_dict() == {**CATALOG["deepseek-v3"].to_dict(), "name": m.name}


def test_reads_qwen2_moe_and_mixtral(tmp_path) -> None:
    qwen15 = _load(
        tmp_path,
        {  # Qwen1.5-MoE-A2.7B: "14.3B total, 2.7B activated"
            "model_type": "qwen2_moe",
            "hidden_size": 2048,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "intermediate_size": 5632,
            "moe_intermediate_size": 1408,
            "shared_expert_intermediate_size": 5632,
            "num_experts": 60,
            "num_experts_per_tok": 4,
            "vocab_size": 151936,
        },
    )
    assert qwen15.shared_expert_gate and qwen15.qkv_bias
    assert abs(qwen15.params - 14.3 * B) < 0.01 * 14.3 * B
    assert abs(qwen15.active_params - 2.7 * B) < 0.01 * 2.7 * B
    mixtral = _load(
        tmp_path,
        {  # Mixtral-8x7B: 46,702,792,704 in its safetensors
            "model_type": "mixtral",
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 14336,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "vocab_size": 32000,
        },
    )
    assert mixtral.params == 46_702_792_704
    assert mixtral.expert_ffn == 14336 and mixtral.dense_layers == 0


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"num_experts_per_tok": None}, "experts_per_token"),
        ({"mlp_only_layers": "0,1"}, "mlp_only_layers"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step"),
        ({"num_experts_per_tok": 200}, "experts_per_token"),
    ],
)
def test_bad_moe_configs(tmp_path, extra: dict, match: str) -> None:
    cfg = {
        "model_type": "qwen3_moe",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 100,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
    }
    with pytest.raises(ModelError, match=match):
        _load(tmp_path, {**cfg, **extra})
