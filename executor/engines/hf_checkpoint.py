"""Hugging Face checkpoint folders: written for vLLM (config.json and safetensors), read into
full megatron names for a role (a sequence-classification head becomes the value head), and
random Llama states for tests and benchmarks. Names and layouts are executor.engines.weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from hybridflow.executor.engines.weights import OUTPUT, StateDict, hf_to_megatron
from hybridflow.layout import LayoutError
from hybridflow.simulator.architecture import ModelSpec


def hf_config_dict(spec: ModelSpec, dtype: str = "float32") -> dict:
    """A LlamaConfig (via transformers) for `spec`, as the dict config.json holds."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.ffn,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position,
        rms_norm_eps=spec.norm_eps,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=spec.tied_embeddings,
        attention_bias=spec.qkv_bias,
        mlp_bias=False,
        hidden_act="silu",
        torch_dtype=dtype,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
    )
    d = cfg.to_dict()
    d["architectures"] = ["LlamaForCausalLM"]
    return d


def save_hf_checkpoint(
    path: str | Path, spec: ModelSpec, hf_state: StateDict | None = None
) -> Path:
    """Write config.json (and model.safetensors when `hf_state` is given) for vLLM."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config_dict(spec), indent=1))
    if hf_state is not None:
        save_file(
            {k: v.detach().contiguous() for k, v in hf_state.items()},
            str(path / "model.safetensors"),
        )
    return path


def load_hf_folder(path: str | Path) -> StateDict:
    """The weights of a Hugging Face folder (a single model.safetensors)."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def hf_to_full_megatron(hf: StateDict, spec: ModelSpec, value_head: bool) -> StateDict:
    """A Hugging Face Llama (or sequence-classification) state as full megatron names; a
    value head takes the classifier's score row as its output layer."""
    body = {k: v for k, v in hf.items() if k != "score.weight"}
    if value_head:
        body.setdefault("lm_head.weight", torch.zeros(spec.vocab, spec.hidden))
    full = hf_to_megatron(body, spec)
    if value_head:
        if "score.weight" not in hf:
            raise LayoutError(
                "a value-head role needs a sequence-classification checkpoint (score.weight)"
            )
        full[OUTPUT] = hf["score.weight"].reshape(1, spec.hidden)
    return full


def random_hf_state(spec: ModelSpec, seed: int = 0, std: float = 0.05) -> StateDict:
    """A randomly initialised Llama state dict with HF names (norm weights near 1)."""
    g = torch.Generator().manual_seed(seed)
    h, q, kv, f, v = spec.hidden, spec.q_dim, spec.kv_dim, spec.ffn, spec.vocab

    def rnd(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g) * std

    out = {
        "model.embed_tokens.weight": rnd(v, h),
        "lm_head.weight": rnd(v, h),
        "model.norm.weight": 1 + rnd(h),
    }
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        out.update(
            {
                p + "self_attn.q_proj.weight": rnd(q, h),
                p + "self_attn.k_proj.weight": rnd(kv, h),
                p + "self_attn.v_proj.weight": rnd(kv, h),
                p + "self_attn.o_proj.weight": rnd(h, q),
                p + "mlp.gate_proj.weight": rnd(f, h),
                p + "mlp.up_proj.weight": rnd(f, h),
                p + "mlp.down_proj.weight": rnd(h, f),
                p + "input_layernorm.weight": 1 + rnd(h),
                p + "post_attention_layernorm.weight": 1 + rnd(h),
            }
        )
    return out
