"""Seconds of one training step (forward + backward) of one decoder layer of a model.

The executor's own layer where it can be built: the decoder block of a one-layer megatron-core
GPTModel from executor.engines.megatron_model (TP = 1, in a one-rank gloo world), with rotary
positions and megatron's causal mask. Without torch.distributed (or megatron-core) a plain
torch Llama decoder layer of the same shapes stands in. The optimizer step is not included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from hybridflow.executor.profiler.ops import time_call
from hybridflow.layout import ParallelLayout
from hybridflow.simulator.architecture import ModelSpec
from hybridflow.simulator.model import load_model


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
        attn = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=s.kv_heads != s.heads
        )
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
        return tuple(
            TrainLayerGrid(m, (1, 4), (512, 2048), dtype="bfloat16", min_time_s=0.02)
            for m in models
        )
    models = ("tiny",) if quick else ("tiny", "tiny-wide")
    return tuple(
        TrainLayerGrid(
            m,
            (1, 8) if quick else (1, 4, 16),
            (32, 128) if quick else (32, 128, 256),
            min_time_s=0.01 if quick else 0.03,
        )
        for m in models
    )


def _time_layer(
    layer: Callable[[torch.Tensor], torch.Tensor],
    params: nn.Module,
    x: torch.Tensor,
    min_time_s: float,
) -> tuple[float, float]:
    """(forward seconds, forward + backward seconds) of `layer` on `x`."""
    x.requires_grad_(True)

    def forward() -> None:
        with torch.no_grad():
            layer(x)

    def step() -> None:
        layer(x).float().sum().backward()

    result = time_call(forward, min_time_s), time_call(step, min_time_s)
    params.zero_grad(set_to_none=True)
    return result


def _torch_rows(grid: TrainLayerGrid, spec: ModelSpec, dev: torch.device) -> list[dict]:
    layer = DecoderLayer(spec).to(dev, getattr(torch, grid.dtype))
    rows = []
    for b in grid.batches:
        for t in grid.seqs:
            x = torch.randn(b, t, spec.hidden, device=dev, dtype=getattr(torch, grid.dtype))
            fwd, both = _time_layer(layer, layer, x, grid.min_time_s)
            rows.append(
                {
                    "model": grid.model,
                    "impl": "torch",
                    "batch": b,
                    "seq": t,
                    "tokens": b * t,
                    "forward_s": fwd,
                    "seconds": both,
                }
            )
    return rows


def _megatron_rows(grid: TrainLayerGrid, spec: ModelSpec, seed: int) -> list[dict]:
    """The decoder block of a one-layer megatron GPTModel ([seq, batch, hidden] in and out).
    megatron-core is imported here, in the measuring process, only when it measures with it
    (measure_train_layer falls back to the torch stand-in where it does not import)."""
    from hybridflow.executor.engines import megatron_model as mm
    from hybridflow.executor.engines.groups import build_role_groups

    groups = build_role_groups("profile", ParallelLayout(), seed=seed)
    rows = []
    with groups.active():
        model = mm.build_local_model(
            replace(spec, layers=1), groups, mm.ModelOptions(dtype=grid.dtype), seed
        )[0]
        dev = next(model.parameters()).device
        for b in grid.batches:
            for t in grid.seqs:
                rope = model.rotary_pos_emb(t)
                x = torch.randn(t, b, spec.hidden, device=dev, dtype=getattr(torch, grid.dtype))
                fwd, both = _time_layer(
                    lambda h: model.decoder(
                        hidden_states=h, attention_mask=None, rotary_pos_emb=rope
                    ),
                    model,
                    x,
                    grid.min_time_s,
                )
                rows.append(
                    {
                        "model": grid.model,
                        "impl": "megatron-core",
                        "batch": b,
                        "seq": t,
                        "tokens": b * t,
                        "forward_s": fwd,
                        "seconds": both,
                    }
                )
    return rows


def measure_train_layer(grid: TrainLayerGrid, seed: int = 0) -> list[dict]:
    """[{model, impl, batch, seq, tokens, forward_s, seconds}]: seconds = forward + backward.
    megatron-core's layer when torch.distributed is initialised, else the torch stand-in."""
    spec = load_model(grid.model)
    torch.manual_seed(seed)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            import hybridflow.executor.engines.megatron_model  # noqa: F401
        except ImportError:
            pass
        else:
            return _megatron_rows(grid, spec, seed)
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return _torch_rows(grid, spec, dev)
