"""Hugging Face checkpoint folders: written for vLLM and tests (config.json of the spec's
family and safetensors, one file or sharded with an index), read whole into full megatron
names for a role (a sequence-classification head becomes the value head), and random states
for tests and benchmarks. Names and layouts are executor.engines.weights; checking a user's
folder and reading one rank's slices of it are executor.engines.hf_folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from hybridflow.executor.engines.moe_weights import unbuildable_reason
from hybridflow.executor.engines.weights import (
    OUTPUT,
    StateDict,
    hf_to_megatron,
    megatron_shapes,
    megatron_to_hf,
)
from hybridflow.layout import LayoutError
from hybridflow.simulator.architecture import ModelSpec

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def hf_family(spec: ModelSpec) -> str:
    """The Hugging Face family written for `spec`: Qwen3Moe (experts), Qwen3 (q/k norms),
    Qwen2 (qkv bias) or Llama."""
    if spec.is_moe:
        reason = unbuildable_reason(spec)
        if reason:
            raise LayoutError(reason)
        return "Qwen3Moe"
    if spec.qk_norm and spec.qkv_bias:
        raise LayoutError(
            f"model {spec.name!r}: q/k norms with a qkv bias have no Hugging Face family here"
        )
    return "Qwen3" if spec.qk_norm else "Qwen2" if spec.qkv_bias else "Llama"


def hf_config_dict(spec: ModelSpec, dtype: str = "float32", value_head: bool = False) -> dict:
    """The config (via transformers: LlamaConfig, Qwen2Config, Qwen3Config or
    Qwen3MoeConfig, by :func:`hf_family`) for `spec`, as the dict config.json holds;
    `value_head` makes it a one-label sequence classifier."""
    import transformers

    family = hf_family(spec)
    kwargs: dict[str, Any] = dict(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.ffn,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position,
        rms_norm_eps=spec.norm_eps,
        rope_parameters=_rope_parameters(spec),
        tie_word_embeddings=spec.tied_embeddings,
        hidden_act="silu",
        dtype=dtype,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
    )
    if family == "Llama":
        kwargs.update(attention_bias=False, mlp_bias=False)
    elif family == "Qwen3":
        kwargs.update(attention_bias=False)
    elif family == "Qwen3Moe":  # as built: experts in every layer, top-k renormalised
        kwargs.update(
            attention_bias=False,
            num_experts=spec.experts,
            num_experts_per_tok=spec.experts_per_token,
            moe_intermediate_size=spec.expert_ffn,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    if value_head:
        if family == "Qwen3Moe":
            raise LayoutError(f"model {spec.name!r}: no Qwen3-MoE sequence classifier is built")
        kwargs.update(num_labels=1)
    cfg = getattr(transformers, f"{family}Config")(**kwargs)
    d = cfg.to_dict()
    d["architectures"] = [f"{family}For{'SequenceClassification' if value_head else 'CausalLM'}"]
    return d


# megatron-core's llama3 RoPE scaling takes the factor and fixes these (Llama 3.x's values)
LLAMA3_FIXED: dict[str, float] = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _rope_parameters(spec: ModelSpec) -> dict[str, Any]:
    """transformers 5's rope_parameters for the spec (llama3 when it scales RoPE)."""
    theta = {"rope_theta": float(spec.rope_theta)}
    if not spec.rope_scaling:
        return {"rope_type": "default", **theta}
    return {"rope_type": "llama3", "factor": spec.rope_scaling, **LLAMA3_FIXED, **theta}


def save_hf_model(
    path: str | Path,
    hf_state: StateDict | None,
    config: dict,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write config.json and the weights: one model.safetensors, or (when they pass
    `max_shard_bytes`) shard files ``model-0000i-of-0000n.safetensors`` and their index."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    if hf_state is None:
        return path
    state = {k: v.detach().contiguous() for k, v in hf_state.items()}
    shards = _shard_names(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(state, str(path / SINGLE), metadata={"format": "pt"})
        return path
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n] for n in names}, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX).write_text(json.dumps(index, indent=1))
    return path


def _shard_names(state: StateDict, max_bytes: int | None) -> list[list[str]]:
    """Names in order, split where a shard would pass `max_bytes` (None: one shard)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if max_bytes is not None and shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def save_hf_checkpoint(
    path: str | Path,
    spec: ModelSpec,
    hf_state: StateDict | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write config.json of `spec`'s family (and the weights when `hf_state` is given)."""
    return save_hf_model(path, hf_state, hf_config_dict(spec), max_shard_bytes)


def weight_files(path: str | Path) -> dict[str, list[str]]:
    """Shard file -> its tensor names, from the index (sharded) or the single file."""
    path = Path(path)
    if (path / INDEX).is_file():
        files: dict[str, list[str]] = {}
        for name, file in json.loads((path / INDEX).read_text())["weight_map"].items():
            files.setdefault(file, []).append(name)
        return files
    from safetensors import safe_open

    with safe_open(str(path / SINGLE), framework="pt") as f:
        return {SINGLE: list(f.keys())}


def load_hf_folder(path: str | Path) -> StateDict:
    """Every tensor of a Hugging Face folder (model.safetensors or its sharded form)."""
    from safetensors.torch import load_file

    out: StateDict = {}
    for file in weight_files(path):
        out.update(load_file(str(Path(path) / file)))
    return out


def hf_to_full_megatron(hf: StateDict, spec: ModelSpec, value_head: bool) -> StateDict:
    """A Hugging Face causal-LM (or sequence-classification) state as full megatron names;
    a value head takes the classifier's score row as its output layer."""
    body = {k: v for k, v in hf.items() if k not in ("score.weight", "lm_head.weight")}
    if not value_head and "lm_head.weight" in hf:
        body["lm_head.weight"] = hf["lm_head.weight"]
    full = hf_to_megatron(body, spec)
    if value_head:
        if "score.weight" not in hf:
            raise LayoutError(
                "a value-head role needs a sequence-classification checkpoint (score.weight)"
            )
        full[OUTPUT] = hf["score.weight"].reshape(1, spec.hidden)
    return full


def hf_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor of the Hugging Face causal LM of `spec` (by its names)."""
    meta = {n: torch.empty(s, device="meta") for n, s in megatron_shapes(spec).items()}
    return {n: tuple(t.shape) for n, t in megatron_to_hf(meta, spec).items()}


def random_hf_state(spec: ModelSpec, seed: int = 0, std: float = 0.05) -> StateDict:
    """A randomly initialised causal-LM state dict with HF names (norm gains near 1): q/k/v
    biases for a qkv-bias spec, q/k norms for a qk-norm one, no lm_head when tied."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in hf_shapes(spec).items():
        t = torch.randn(math.prod(shape), generator=g).view(shape) * std
        out[name] = 1 + t if name.endswith("norm.weight") else t
    return out
