"""The model catalog and ``load_model``: a catalog name, or a Hugging Face config.json.

``load_model("llama-2-7b")`` returns the catalog's ModelSpec (hybridflow.simulator.
architecture); a path (a config.json or its folder) is read by hybridflow.simulator.hf_config.
"""

from __future__ import annotations

import json
from pathlib import Path

from hybridflow.errors import unreadable
from hybridflow.simulator.architecture import ModelError, ModelSpec
from hybridflow.simulator.hf_config import spec_from_hf_dict, spec_to_hf_dict


def _spec(
    name: str, layers: int, hidden: int, heads: int, kv: int, ffn: int, vocab: int, **kw
) -> ModelSpec:
    return ModelSpec(
        name=name,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv,
        ffn=ffn,
        vocab=vocab,
        **kw,
    )


_QWEN = dict(qkv_bias=True, rope_theta=1e6, norm_eps=1e-6, max_position=32768)
# Qwen3-MoE: no qkv bias, per-head q/k norms, 128 experts (top 8), no shared experts.
_QWEN3_MOE = dict(
    head_dim=128,
    qk_norm=True,
    rope_theta=1e6,
    norm_eps=1e-6,
    max_position=40960,
    experts=128,
    experts_per_token=8,
)
CATALOG: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        _spec("llama-2-7b", 32, 4096, 32, 32, 11008, 32000),
        _spec("llama-2-13b", 40, 5120, 40, 40, 13824, 32000),
        _spec("llama-2-70b", 80, 8192, 64, 8, 28672, 32000),
        _spec("codellama-34b", 48, 8192, 64, 8, 22016, 32000, rope_theta=1e6, max_position=16384),
        _spec("llama-3.1-8b", 32, 4096, 32, 8, 14336, 128256, rope_theta=5e5, max_position=131072),
        _spec("llama-3.1-70b", 80, 8192, 64, 8, 28672, 128256, rope_theta=5e5, max_position=131072),
        _spec("qwen2.5-0.5b", 24, 896, 14, 2, 4864, 151936, tied_embeddings=True, **_QWEN),
        _spec("qwen2.5-1.5b", 28, 1536, 12, 2, 8960, 151936, tied_embeddings=True, **_QWEN),
        _spec("qwen2.5-3b", 36, 2048, 16, 2, 11008, 151936, tied_embeddings=True, **_QWEN),
        _spec("qwen2.5-7b", 28, 3584, 28, 4, 18944, 152064, **_QWEN),
        _spec("qwen2.5-14b", 48, 5120, 40, 8, 13824, 152064, **_QWEN),
        _spec("qwen2.5-32b", 64, 5120, 40, 8, 27648, 152064, **_QWEN),
        _spec("qwen2.5-72b", 80, 8192, 64, 8, 29568, 152064, **_QWEN),
        # Mixture of experts (config.json of each Hugging Face repository).
        _spec("qwen3-30b-a3b", 48, 2048, 32, 4, 6144, 151936, expert_ffn=768, **_QWEN3_MOE),
        _spec("qwen3-235b-a22b", 94, 4096, 64, 4, 12288, 151936, expert_ffn=1536, **_QWEN3_MOE),
        # DeepSeek-V3 without its multi-token-prediction module (671B, not 685B).
        _spec(
            "deepseek-v3",
            61,
            7168,
            128,
            128,
            18432,
            129280,
            norm_eps=1e-6,
            max_position=163840,
            q_lora_rank=1536,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            experts=256,
            experts_per_token=8,
            expert_ffn=2048,
            shared_experts=1,
            dense_layers=3,
            router_bias=True,
        ),
        # The executor's local models: head size 32 (vLLM's CPU attention needs >= 32).
        _spec("tiny", 2, 128, 4, 4, 352, 512, max_position=512),
        _spec("tiny-4l", 4, 128, 4, 4, 352, 512, max_position=512),
        _spec("tiny-gqa", 2, 128, 4, 2, 352, 512, max_position=512),
        _spec("tiny-wide", 4, 256, 8, 8, 704, 512, max_position=512),
        _spec(
            "tiny-moe",
            2,
            128,
            4,
            4,
            352,
            512,
            max_position=512,
            qk_norm=True,
            experts=8,
            experts_per_token=2,
            expert_ffn=96,
        ),
    ]
}


def from_hf_config(path: str | Path) -> ModelSpec:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"model config {str(path)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"model config {str(path)!r} is not valid JSON: {e}") from None
    except OSError as e:
        raise unreadable("model config", path, e) from None
    if not isinstance(cfg, dict):
        raise ModelError(f"model config {str(path)!r} is not a JSON object")
    name = cfg.get("_name_or_path") or path.parent.name or path.stem
    return spec_from_hf_dict(cfg, str(name), str(path))


def to_hf_config(spec: ModelSpec) -> dict:
    """config.json keys for `spec` (Llama, Qwen2/3, Qwen-MoE or DeepSeek style);
    `from_hf_config` reads them back to an equal ModelSpec."""
    return spec_to_hf_dict(spec)


def load_model(name_or_path: str) -> ModelSpec:
    """A catalog name, or the path of a Hugging Face config.json (or its folder)."""
    if name_or_path in CATALOG:
        return CATALOG[name_or_path]
    p = Path(name_or_path)
    if p.suffix == ".json" or p.is_dir() or p.exists():
        return from_hf_config(p)
    raise ModelError(
        f"unknown model {name_or_path!r}: not in the catalog "
        f"({', '.join(sorted(CATALOG))}) and not a config.json path"
    )
