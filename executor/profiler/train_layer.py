"""Seconds of one training step (forward + backward) of one decoder layer of a model.

A plain torch Llama decoder layer (RMSNorm, GQA attention with rotary-free causal SDPA, SwiGLU)
with the model's shapes, timed over (batch, sequence length). Its matmuls and attention are
the same work as a megatron-core layer at TP = 1; the fused optimizer step is not included.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from executor.profiler.ops import time_call
from simulator.model import ModelSpec, load_model


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.attn_norm = nn.RMSNorm(spec.hidden, eps=spec.norm_eps)
        self.qkv = nn.Linear(spec.hidden, spec.q_dim + 2 * spec.kv_dim, bias=spec.qkv_bias)
        self.proj = nn.Linear(spec.q_dim, spec.hidden, bias=False)
        self.mlp_norm = nn.RMSNorm(spec.hidden, eps=spec.norm_eps)
        self.fc1 = nn.Linear(spec.hidden, 2 * spec.ffn, bias=False)  # [gate; up]
        self.fc2 = nn.Linear(spec.ffn, spec.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        b, t, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split([s.q_dim, s.kv_dim, s.kv_dim], dim=-1)
        q = q.view(b, t, s.heads, s.head_dim).transpose(1, 2)
        k = k.view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        v = v.view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              enable_gqa=s.kv_heads != s.heads)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, s.q_dim))
        gate, up = self.fc1(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.fc2(F.silu(gate) * up)


@dataclass(frozen=True)
class TrainLayerGrid:
    model: str
    batches: tuple[int, ...]
    seqs: tuple[int, ...]
    dtype: str = "float32"
    min_time_s: float = 0.03

    def __post_init__(self) -> None:
        load_model(self.model)
        for name in ("batches", "seqs"):
            vals = getattr(self, name)
            if not vals or any(not isinstance(v, int) or v <= 0 for v in vals):
                raise ValueError(f"train-layer grid {name} must be positive integers: {vals}")


def default_grids(quick: bool, gpu: bool) -> tuple[TrainLayerGrid, ...]:
    if gpu:
        models = ("llama-2-7b",) if quick else ("llama-2-7b", "llama-2-13b")
        return tuple(TrainLayerGrid(m, (1, 4), (512, 2048), dtype="bfloat16", min_time_s=0.02)
                     for m in models)
    models = ("tiny",) if quick else ("tiny", "tiny-wide")
    return tuple(TrainLayerGrid(m, (1, 8) if quick else (1, 4, 16),
                                (32, 128) if quick else (32, 128, 256),
                                min_time_s=0.01 if quick else 0.03) for m in models)


def measure_train_layer(grid: TrainLayerGrid, seed: int = 0) -> list[dict]:
    """[{model, batch, seq, tokens, forward_s, seconds}]: seconds = forward + backward."""
    spec = load_model(grid.model)
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(seed)
    layer = DecoderLayer(spec).to(dev, getattr(torch, grid.dtype))
    rows = []
    for b in grid.batches:
        for t in grid.seqs:
            x = torch.randn(b, t, spec.hidden, device=dev, dtype=layer.qkv.weight.dtype,
                            requires_grad=True)

            def forward() -> None:
                with torch.no_grad():
                    layer(x)

            def step() -> None:
                layer(x).sum().backward()
            rows.append({"model": grid.model, "batch": b, "seq": t, "tokens": b * t,
                         "forward_s": time_call(forward, grid.min_time_s),
                         "seconds": time_call(step, grid.min_time_s)})
            layer.zero_grad(set_to_none=True)
    return rows
