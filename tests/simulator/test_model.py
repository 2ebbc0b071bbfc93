"""Dense model catalog: exact parameter counts, FLOPs and KV bytes by hand, bad inputs."""

from __future__ import annotations

import json

import pytest

from hybridflow.simulator.architecture import ModelError, ModelSpec
from hybridflow.simulator.model import CATALOG, load_model

# Parameter counts of the Hugging Face safetensors checkpoints (model pages' "Model size").
EXACT = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "codellama-34b": 33_743_970_304,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-72b": 72_706_203_648,
}


@pytest.mark.parametrize("name,count", sorted(EXACT.items()))
def test_dense_counts_are_exact(name: str, count: int) -> None:
    m = load_model(name)
    assert m.params == count
    assert m.active_params == m.params  # a dense model uses every weight
    assert not m.is_moe and m.moe_layers == 0 and m.inactive_params == 0


def test_tiny_by_hand() -> None:
    m = load_model("tiny")  # 2 layers, hidden 128, 4 heads of 32, ffn 352, vocab 512
    attn = 128 * (128 + 2 * 128) + 128 * 128
    mlp = 3 * 128 * 352
    assert m.attn_params_per_layer == attn and m.mlp_params_per_layer == mlp
    assert m.layer_params == attn + mlp + 2 * 128
    assert m.params == 512 * 128 + 2 * (attn + mlp + 256) + 128 + 512 * 128
    assert m.value_model_params == m.params - 512 * 128 + 128
    assert m.flops_per_token(0) == 2 * (2 * (attn + mlp) + 512 * 128)
    assert m.flops_per_token(100) == m.flops_per_token(0) + 4 * 2 * 128 * 100
    assert m.kv_bytes_per_token() == 2 * 2 * 128 * 2
    assert load_model("tiny-gqa").kv_bytes_per_token(4) == 2 * 2 * 64 * 4


def test_ep_on_a_dense_model() -> None:
    m = load_model("tiny")
    assert m.params_per_ep_rank(1) == m.params
    with pytest.raises(ModelError, match="does not divide"):
        m.params_per_ep_rank(2)


@pytest.mark.parametrize(
    "field,value",
    [
        ("layers", 0),
        ("hidden", -1),
        ("heads", 2.5),
        ("ffn", True),
        ("experts", -2),
        ("kv_heads", 3),
    ],
)
def test_bad_fields(field: str, value: object) -> None:
    kw = dict(name="x", layers=2, hidden=128, heads=4, kv_heads=4, ffn=352, vocab=512)
    kw[field] = value
    with pytest.raises(ModelError):
        ModelSpec(**kw)


def test_unknown_model_and_bad_files(tmp_path) -> None:
    with pytest.raises(ModelError, match="unknown model"):
        load_model("llama-9")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(ModelError, match="not a JSON object"):
        load_model(str(bad))
    bad.write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ModelError, match="lacks layers"):
        load_model(str(tmp_path))
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "missing.json"))


def test_catalog_names_match() -> None:
    assert all(m.name == name for name, m in CATALOG.items())
