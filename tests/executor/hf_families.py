"""Small random Hugging Face models of each family the executor builds, made by transformers
itself (Llama, Qwen2 with QKV bias and tied embeddings, Qwen3 with q/k norms, their
one-label sequence classifiers, a Mistral, a Qwen3-MoE), and their outputs as references."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

VOCAB = 256
COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # vLLM on CPU needs >= 32
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    initializer_range=0.1,  # peaked next-token distributions: greedy tokens are clear
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=None,
)
# Llama 3.1's RoPE: low frequencies divided by `factor`; theta 5e5 puts several under it
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=5e5,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
# name -> (family, head, config changes); vLLM's Qwen2 takes head_dim = hidden / heads
MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("Llama", "ForCausalLM", dict(hidden_size=64)),  # head_dim * heads != hidden
    "qwen2": ("Qwen2", "ForCausalLM", dict(hidden_size=128, tie_word_embeddings=True)),
    "qwen3": ("Qwen3", "ForCausalLM", dict(hidden_size=64)),
    "llama3": (
        "Llama",
        "ForCausalLM",
        dict(hidden_size=64, rope_parameters=LLAMA3_ROPE, max_position_embeddings=131072),
    ),
    "mistral": ("Mistral", "ForCausalLM", dict(hidden_size=64, sliding_window=None)),
    "qwen2-cls": ("Qwen2", "ForSequenceClassification", dict(hidden_size=128, num_labels=1)),
    "llama-cls": ("Llama", "ForSequenceClassification", dict(hidden_size=64, num_labels=1)),
    # 4 experts, top 2 renormalised, in every layer (intermediate_size: unused dense width)
    "qwen3moe": (
        "Qwen3Moe",
        "ForCausalLM",
        dict(
            hidden_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
        ),
    ),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """A random-initialised transformers model of `name`, biases and norm gains spread (a
    bias or norm that is lost or misplaced changes the outputs)."""
    import transformers

    family, head, changes = MODELS[name]
    cfg = getattr(transformers, f"{family}Config")(**{**COMMON, **changes})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}{head}")(cfg).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0.0, 0.2)
            elif n.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
    return model


def save(model: torch.nn.Module, folder: Path, max_shard_size: str | None = None) -> Path:
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(folder), safe_serialization=True, **kw)
    return folder


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows (as the engine derives them)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def logprobs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(ids[t+1] | ids[<=t]) [b, s-1] by transformers."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
    lp = torch.log_softmax(out.logits.float(), -1)[:, :-1]
    return lp.gather(-1, ids[:, 1:, None])[..., 0]


@torch.no_grad()
def token_scores(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sequence classifier's score head on every position's final hidden state [b, s]."""
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
    return model.score(hidden.last_hidden_state)[..., 0]


@torch.no_grad()
def greedy(model: torch.nn.Module, prompts: list[list[int]], n: int) -> list[tuple[int, ...]]:
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        g = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        out.append(tuple(g[0, len(p) :].tolist()))
    return out


# ---- shared by the family tests ------------------------------------------------------------
PROMPTS = [[3, 14, 15, 92, 65], [35, 89, 79], [32, 38, 46, 26, 43, 38], [83, 27]]


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four rows of 12 token ids, two of them left-padded, and their attention mask."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[3, :1] = 0
    return ids, mask


def copy_folder(src: Path, dst: Path, **config: object) -> Path:
    """A copy of the folder `src`, its config.json updated with `config`."""
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def refused(folder: Path, *words: str, value_head: bool = False) -> None:
    """check_folder refuses `folder` in one line holding every one of `words`."""
    from hybridflow.executor.engines.hf_folder import CheckpointError, check_folder

    with pytest.raises(CheckpointError) as e:
        check_folder(folder, value_head=value_head)
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
