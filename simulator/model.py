"""Model architectures: parameter counts, FLOPs and KV-cache bytes per token.

A ModelSpec is built from the catalog (``load_model("llama-2-7b")``) or from the path of a
Hugging Face ``config.json``. Counts are computed from the architecture, never looked up.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path


class ModelError(ValueError):
    """A model name, file or architecture that cannot be used."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads
    tied_embeddings: bool = False
    qkv_bias: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_position: int = 4096

    def __post_init__(self) -> None:
        for f in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                raise ModelError(f"model {self.name!r}: {f} must be a positive integer, "
                                 f"got {getattr(self, f)!r}")
        if self.head_dim == 0:
            if self.hidden % self.heads:
                raise ModelError(f"model {self.name!r}: hidden {self.hidden} is not a "
                                 f"multiple of heads {self.heads}")
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        if self.heads % self.kv_heads:
            raise ModelError(f"model {self.name!r}: heads {self.heads} is not a multiple "
                             f"of kv_heads {self.kv_heads}")

    # ---- sizes ---------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def attn_params_per_layer(self) -> int:
        bias = (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        return self.hidden * (self.q_dim + 2 * self.kv_dim) + bias + self.q_dim * self.hidden

    @property
    def mlp_params_per_layer(self) -> int:
        return 3 * self.hidden * self.ffn  # SwiGLU: gate, up, down

    @property
    def layer_params(self) -> int:
        return self.attn_params_per_layer + self.mlp_params_per_layer + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        """Total parameters of the language model (embedding, layers, final norm, head)."""
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.embedding_params + self.layers * self.layer_params + self.hidden + head

    @property
    def value_model_params(self) -> int:
        """Parameters as a critic or reward model: the LM head becomes a scalar head."""
        return self.embedding_params + self.layers * self.layer_params + self.hidden + self.hidden

    def flops_per_token(self, context: int = 0) -> float:
        """Forward FLOPs for one token: 2 per matmul weight, plus attention over `context`."""
        matmul = 2 * (self.layers * (self.attn_params_per_layer + self.mlp_params_per_layer)
                      + self.vocab * self.hidden)
        attention = 2 * 2 * self.layers * self.q_dim * context  # QK^T and AV
        return float(matmul + attention)

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        return 2 * self.layers * self.kv_dim * bytes_per_value

    def to_dict(self) -> dict:
        return asdict(self)


def _spec(name: str, layers: int, hidden: int, heads: int, kv: int, ffn: int, vocab: int,
          **kw) -> ModelSpec:
    return ModelSpec(name=name, layers=layers, hidden=hidden, heads=heads, kv_heads=kv,
                     ffn=ffn, vocab=vocab, **kw)


_QWEN = dict(qkv_bias=True, rope_theta=1e6, norm_eps=1e-6, max_position=32768)
CATALOG: dict[str, ModelSpec] = {m.name: m for m in [
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
    # The executor's local models: head size 32 (vLLM's CPU attention needs >= 32).
    _spec("tiny", 2, 128, 4, 4, 352, 512, max_position=512),
    _spec("tiny-4l", 4, 128, 4, 4, 352, 512, max_position=512),
    _spec("tiny-gqa", 2, 128, 4, 2, 352, 512, max_position=512),
    _spec("tiny-wide", 4, 256, 8, 8, 704, 512, max_position=512),
]}

# Hugging Face config.json keys -> ModelSpec fields.
_HF_KEYS = {"num_hidden_layers": "layers", "hidden_size": "hidden",
            "num_attention_heads": "heads", "num_key_value_heads": "kv_heads",
            "intermediate_size": "ffn", "vocab_size": "vocab", "head_dim": "head_dim",
            "tie_word_embeddings": "tied_embeddings", "rope_theta": "rope_theta",
            "rms_norm_eps": "norm_eps", "max_position_embeddings": "max_position"}


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
    if not isinstance(cfg, dict):
        raise ModelError(f"model config {str(path)!r} is not a JSON object")
    kw = {dst: cfg[src] for src, dst in _HF_KEYS.items() if cfg.get(src) is not None}
    kw.setdefault("kv_heads", cfg.get("num_attention_heads"))
    missing = [f for f in ("layers", "hidden", "heads", "ffn", "vocab") if f not in kw]
    if missing:
        raise ModelError(f"model config {str(path)!r} lacks {', '.join(missing)} "
                         f"(keys {', '.join(k for k, v in _HF_KEYS.items() if v in missing)})")
    kw["qkv_bias"] = bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2"))
    known = {f.name for f in fields(ModelSpec)}
    return ModelSpec(name=cfg.get("_name_or_path") or path.parent.name or path.stem,
                     **{k: v for k, v in kw.items() if k in known})


def load_model(name_or_path: str) -> ModelSpec:
    """A catalog name, or the path of a Hugging Face config.json (or its folder)."""
    if name_or_path in CATALOG:
        return CATALOG[name_or_path]
    p = Path(name_or_path)
    if p.suffix == ".json" or p.is_dir() or p.exists():
        return from_hf_config(p)
    raise ModelError(f"unknown model {name_or_path!r}: not in the catalog "
                     f"({', '.join(sorted(CATALOG))}) and not a config.json path")
