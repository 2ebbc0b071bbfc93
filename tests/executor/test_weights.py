"""Name/layout conversion: megatron-core shards <-> Hugging Face Llama <-> vLLM shards."""

import pytest
import torch

from hybridflow.executor.engines import hf_checkpoint as H
from hybridflow.executor.engines import weights as W
from hybridflow.simulator.model import load_model


@pytest.fixture(scope="module")
def gqa():
    spec = load_model("tiny-gqa")  # 4 heads, 2 KV groups: nq = 2
    hf = H.random_hf_state(spec, seed=3)
    return spec, hf


def test_hf_megatron_round_trip_is_exact(gqa):
    spec, hf = gqa
    meg = W.hf_to_megatron(hf, spec)
    back = W.megatron_to_hf(meg, spec)
    assert back.keys() == hf.keys()
    for k in hf:
        assert torch.equal(back[k], hf[k]), k


def test_qkv_is_grouped_per_kv_head(gqa):
    spec, hf = gqa
    meg = W.hf_to_megatron(hf, spec)
    qkv = meg["decoder.layers.1.self_attention.linear_qkv.weight"]
    hd, h = spec.head_dim, spec.hidden
    g = qkv.view(spec.kv_heads, 4, hd, h)  # per group: q0, q1, k, v
    q = hf["model.layers.1.self_attn.q_proj.weight"].view(spec.heads, hd, h)
    k = hf["model.layers.1.self_attn.k_proj.weight"].view(spec.kv_heads, hd, h)
    assert torch.equal(g[1, 0], q[2]) and torch.equal(g[1, 1], q[3])
    assert torch.equal(g[1, 2], k[1])
    fc1 = meg["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[: spec.ffn], hf["model.layers.0.mlp.gate_proj.weight"])


@pytest.mark.parametrize("t,tg", [(2, 1), (2, 2), (4, 2), (4, 1)])
def test_consecutive_training_shards_merge_into_generation_shard(t, tg):
    spec = load_model("tiny")
    full = W.hf_to_megatron(H.random_hf_state(spec, seed=t + tg), spec)
    shards = [W.split_tp(full, spec, t, r) for r in range(t)]
    step = t // tg
    for j in range(tg):
        merged = W.merge_tp(shards[j * step : (j + 1) * step])
        direct = W.split_tp(full, spec, tg, j)
        for k in direct:
            assert torch.equal(merged[k], direct[k]), (k, j)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vllm_shard_matches_hf_slicing(tp):
    """vLLM's TP rank r holds rows r of q, k, v, gate, up, vocab; columns r of o, down."""
    spec = load_model("tiny")
    hf = H.random_hf_state(spec, seed=11)
    full = W.hf_to_megatron(hf, spec)
    col_split = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")
    for r in range(tp):
        local = dict(W.megatron_to_vllm(W.split_tp(full, spec, tp, r), spec, tp))
        assert local.keys() == hf.keys()
        for k, v in hf.items():
            if any(c in k for c in col_split):
                want = v.chunk(tp, dim=0)[r]
            elif "o_proj" in k or "down_proj" in k:
                want = v.chunk(tp, dim=1)[r]
            else:
                want = v
            assert torch.equal(local[k], want), (k, r)


def test_stage_split_and_layer_renaming():
    spec = load_model("tiny-4l")
    full = W.hf_to_megatron(H.random_hf_state(spec), spec)
    s0, s1 = W.stage_state(full, spec, 2, 0), W.stage_state(full, spec, 2, 1)
    assert W.EMBED in s0 and W.OUTPUT in s1 and W.FINAL_NORM in s1
    assert set(s0) | set(s1) == set(full) and not set(s0) & set(s1)
    local = W.rename_layers(s1, -2)
    assert "decoder.layers.0.mlp.linear_fc2.weight" in local
    assert W.rename_layers(local, 2).keys() == s1.keys()


def test_bad_layouts_raise_value_errors():
    spec = load_model("tiny-gqa")
    full = W.hf_to_megatron(H.random_hf_state(spec), spec)
    with pytest.raises(ValueError, match="KV heads 2"):
        W.split_tp(full, spec, 4, 0)
    with pytest.raises(ValueError, match="pipeline"):
        W.stage_layers(spec, 3, 0)
    with pytest.raises(ValueError, match="unknown megatron parameter"):
        W.split_kind("decoder.layers.0.foo.weight")


def test_hf_checkpoint_loads_in_transformers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = load_model("tiny")
    hf = H.random_hf_state(spec, seed=5)
    H.save_hf_checkpoint(tmp_path, spec, hf)
    model = LlamaForCausalLM.from_pretrained(str(tmp_path))
    assert isinstance(model.config, LlamaConfig)
    sd = model.state_dict()
    for k, v in hf.items():
        assert torch.equal(sd[k], v), k


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shapes_without_tensors_match_the_real_shards(tp):
    spec = load_model("tiny-4l")
    full = W.hf_to_megatron(H.random_hf_state(spec), spec)
    shapes = W.megatron_shapes(spec)
    assert shapes == {n: tuple(v.shape) for n, v in full.items()}
    for n, v in W.split_tp(full, spec, tp, tp - 1).items():
        assert W.shard_shape(n, shapes[n], tp) == tuple(v.shape), n
