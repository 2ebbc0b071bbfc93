"""Weight names and layouts: megatron-core GPTModel shards <-> Hugging Face Llama <-> vLLM.

A *megatron shard* here is a dict of megatron-core parameter names (local spec: separate
``input_layernorm`` / ``pre_mlp_layernorm``) with **global** layer indices, holding the
tensors of one tensor-parallel rank (``tp`` ranks in all). Concatenating consecutive shards
(:func:`merge_tp`) gives the shard of a coarser TP degree, which is what the 3D-HybridEngine
relies on: ``t/tg`` consecutive training shards form one generation shard, no slicing needed.

Layouts (nq = query heads per KV group, hd = head dim, G = KV groups, H = hidden):
- ``linear_qkv`` rows are per group ``[its nq query heads, k, v]``: a TP shard holds whole
  groups, so splitting dim 0 into equal chunks is the TP split.
- ``linear_fc1`` rows are ``[gate; up]`` *per shard* (not a slice of the full tensor).
- ``linear_proj`` / ``linear_fc2`` split dim 1; embedding / output layer split dim 0 (vocab).
- norms are replicated over TP ranks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from hybridflow.layout import LayoutError
from hybridflow.simulator.architecture import ModelSpec

StateDict = dict[str, Tensor]

EMBED = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# megatron layer-local name -> (Hugging Face layer-local name, how TP splits it)
_LAYER_PARAMS: dict[str, tuple[str | None, str]] = {
    "input_layernorm.weight": ("input_layernorm.weight", "replicated"),
    "self_attention.linear_qkv.weight": (None, "qkv"),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight", "row"),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight", "replicated"),
    "mlp.linear_fc1.weight": (None, "fc1"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight", "row"),
}
_TOP_PARAMS = {
    EMBED: ("model.embed_tokens.weight", "vocab"),
    OUTPUT: ("lm_head.weight", "vocab"),
    FINAL_NORM: ("model.norm.weight", "replicated"),
}


def split_kind(name: str) -> str:
    """How tensor parallelism splits the parameter `name` (a megatron name)."""
    if name in _TOP_PARAMS:
        return _TOP_PARAMS[name][1]
    m = _LAYER_RE.match(name)
    if not m or m.group(2) not in _LAYER_PARAMS:
        raise LayoutError(f"unknown megatron parameter {name!r}")
    return _LAYER_PARAMS[m.group(2)][1]


def check_tp(spec: ModelSpec, tp: int) -> None:
    """Raise LayoutError unless `spec` splits evenly over `tp` ranks."""
    if tp < 1:
        raise LayoutError(f"tensor-parallel size must be >= 1, got {tp}")
    for what, n in (
        ("KV heads", spec.kv_heads),
        ("FFN size", spec.ffn),
        ("vocab", spec.vocab),
        ("heads", spec.heads),
    ):
        if n % tp:
            raise LayoutError(
                f"model {spec.name!r}: {what} {n} is not a multiple of tensor-parallel size {tp}"
            )


def stage_layers(spec: ModelSpec, pp: int, stage: int) -> range:
    """Global layer indices of pipeline stage `stage` (even split, as megatron does)."""
    if pp < 1 or spec.layers % pp:
        raise LayoutError(
            f"model {spec.name!r}: {spec.layers} layers do not split over {pp} pipeline stages"
        )
    n = spec.layers // pp
    return range(stage * n, (stage + 1) * n)


def rename_layers(sd: StateDict, offset: int) -> StateDict:
    """Shift the layer index of every ``decoder.layers.i.`` name by `offset`.

    megatron's state_dict on pipeline stage s numbers its layers from 0; +offset makes them
    global, -offset local again.
    """
    out = {}
    for name, t in sd.items():
        m = _LAYER_RE.match(name)
        out[f"decoder.layers.{int(m.group(1)) + offset}.{m.group(2)}" if m else name] = t
    return out


# ---- TP split / merge in megatron layout --------------------------------------------------
def _split(t: Tensor, kind: str, tp: int, rank: int) -> Tensor:
    if kind == "replicated":
        return t
    if kind in ("qkv", "vocab"):
        return t.chunk(tp, dim=0)[rank]
    if kind == "row":
        return t.chunk(tp, dim=1)[rank]
    gate, up = t.chunk(2, dim=0)  # fc1
    return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]])


def merged_shape(part: tuple[int, ...], kind: str, n: int) -> tuple[int, ...]:
    """Shape of `n` TP shards of shape `part` merged (the shard of a TP degree n times
    coarser)."""
    if kind == "replicated":
        return part
    dim = 1 if kind == "row" else 0
    return tuple(x * n if i == dim else x for i, x in enumerate(part))


def part_view(out: Tensor, kind: str, i: int, n: int) -> Tensor:
    """Where TP shard `i` of `n` lies inside their merge `out` (a view; for fc1 shaped
    [2, rows, ...]: its gate and its up half, each contiguous)."""
    if kind == "replicated":
        return out
    if kind == "fc1":
        return out.view(2, n, -1, *out.shape[1:])[:, i]
    dim = 1 if kind == "row" else 0
    size = out.shape[dim] // n
    return out.narrow(dim, i * size, size)


def part_slice(out: Tensor, kind: str, i: int, n: int, a: int, e: int) -> Tensor | None:
    """Elements a:e of the flattened TP shard `i` (of `n`) inside their merge `out`, as a
    flat view, when they are contiguous there (not for row-split tensors; fc1's a:e must
    not straddle its gate and up halves)."""
    if kind in ("row", "replicated"):
        return None
    seg = part_view(out, kind, i, n)
    if kind == "fc1":
        half = seg[0].numel()
        seg, a, e = (seg[0], a, e) if a < half else (seg[1], a - half, e - half)
    return seg.view(-1)[a:e]


def merge_tp_into(parts: Sequence[Tensor], kind: str, out: Tensor) -> Tensor:
    """Merge consecutive TP shards of one parameter into the preallocated `out` (shape
    :func:`merged_shape`): one copy per part, no temporary."""
    if kind == "replicated":
        return out.copy_(parts[0])
    for i, part in enumerate(parts):
        dst = part_view(out, kind, i, len(parts))
        dst.copy_(part.reshape(dst.shape))
    return out


def _merge(parts: Sequence[Tensor], kind: str) -> Tensor:
    if kind == "replicated":
        return parts[0]
    out = parts[0].new_empty(merged_shape(tuple(parts[0].shape), kind, len(parts)))
    return merge_tp_into(parts, kind, out)


def split_tp(full: StateDict, spec: ModelSpec, tp: int, rank: int) -> StateDict:
    """The TP-rank `rank` shard (of `tp`) of a TP=1 megatron state dict (views, no copy)."""
    check_tp(spec, tp)
    if not 0 <= rank < tp:
        raise LayoutError(f"TP rank {rank} out of range for TP size {tp}")
    return {n: _split(t, split_kind(n), tp, rank) for n, t in full.items()}


def merge_tp(shards: Sequence[StateDict]) -> StateDict:
    """Merge consecutive TP shards (same names) into the shard of a coarser TP degree."""
    if not shards:
        raise LayoutError("merge_tp needs at least one shard")
    names = shards[0].keys()
    if any(s.keys() != names for s in shards):
        raise LayoutError("merge_tp: shards hold different parameters")
    return {n: _merge([s[n] for s in shards], split_kind(n)) for n in names}


# ---- megatron <-> Hugging Face names ----------------------------------------------------
def _qkv_to_hf(qkv: Tensor, spec: ModelSpec) -> tuple[Tensor, Tensor, Tensor]:
    nq, hd = spec.heads // spec.kv_heads, spec.head_dim
    g = qkv.view(-1, nq + 2, hd, qkv.shape[-1])
    return (
        g[:, :nq].reshape(-1, qkv.shape[-1]),
        g[:, nq].reshape(-1, qkv.shape[-1]),
        g[:, nq + 1].reshape(-1, qkv.shape[-1]),
    )


def _hf_to_qkv(q: Tensor, k: Tensor, v: Tensor, spec: ModelSpec) -> Tensor:
    nq, hd, h = spec.heads // spec.kv_heads, spec.head_dim, q.shape[-1]
    groups = k.shape[0] // hd
    return torch.cat(
        [q.view(groups, nq, hd, h), k.view(groups, 1, hd, h), v.view(groups, 1, hd, h)], dim=1
    ).reshape(-1, h)


def megatron_to_hf(shard: StateDict, spec: ModelSpec, vocab_rows: int | None = None) -> StateDict:
    """Hugging Face Llama names for a megatron shard (any TP degree; sizes stay local).

    On the full model (TP=1) this is the HF state dict. ``vocab_rows`` keeps only the first
    rows of the embedding / output layer (strips megatron's vocab padding).
    """
    out: StateDict = {}
    for name, t in shard.items():
        if name in _TOP_PARAMS:
            hf = _TOP_PARAMS[name][0]
            out[hf] = t[:vocab_rows] if vocab_rows and _TOP_PARAMS[name][1] == "vocab" else t
            continue
        m = _LAYER_RE.match(name)
        if not m or m.group(2) not in _LAYER_PARAMS:
            raise LayoutError(f"unknown megatron parameter {name!r}")
        pre, local = f"model.layers.{m.group(1)}.", m.group(2)
        if local == "self_attention.linear_qkv.weight":
            q, k, v = _qkv_to_hf(t, spec)
            out.update(
                {
                    pre + "self_attn.q_proj.weight": q,
                    pre + "self_attn.k_proj.weight": k,
                    pre + "self_attn.v_proj.weight": v,
                }
            )
        elif local == "mlp.linear_fc1.weight":
            gate, up = t.chunk(2, dim=0)
            out.update({pre + "mlp.gate_proj.weight": gate, pre + "mlp.up_proj.weight": up})
        else:
            hf_local = _LAYER_PARAMS[local][0]
            assert hf_local is not None  # only qkv and fc1 have none, handled above
            out[pre + hf_local] = t
    return out


def hf_to_megatron(hf: StateDict, spec: ModelSpec) -> StateDict:
    """Megatron names (TP=1, global layer indices) for a Hugging Face Llama state dict."""
    out: StateDict = {}
    for meg, (name, _) in _TOP_PARAMS.items():
        if name in hf:
            out[meg] = hf[name]
    for i in range(spec.layers):
        pre = f"model.layers.{i}."
        if pre + "self_attn.q_proj.weight" not in hf:
            continue
        mp = f"decoder.layers.{i}."
        out[mp + "self_attention.linear_qkv.weight"] = _hf_to_qkv(
            hf[pre + "self_attn.q_proj.weight"],
            hf[pre + "self_attn.k_proj.weight"],
            hf[pre + "self_attn.v_proj.weight"],
            spec,
        )
        out[mp + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[pre + "mlp.gate_proj.weight"], hf[pre + "mlp.up_proj.weight"]]
        )
        for local, (hf_local, _) in _LAYER_PARAMS.items():
            if hf_local is not None:
                out[mp + local] = hf[pre + hf_local]
    return out


def check_vllm_vocab(spec: ModelSpec, tp: int) -> None:
    """vLLM pads the vocab to a multiple of 64 and splits the padded rows evenly; a megatron
    vocab shard is a vLLM one only when both splits agree."""
    if spec.vocab % (64 * tp):
        raise LayoutError(
            f"model {spec.name!r}: vocab {spec.vocab} must be a multiple of "
            f"64*TP = {64 * tp} to load vocab shards into vLLM directly"
        )


def megatron_to_vllm(shard: StateDict, spec: ModelSpec, tp: int) -> list[tuple[str, Tensor]]:
    """(Hugging Face name, local tensor) pairs of a TP-`tp` megatron shard, in the order
    vLLM's loader wants (fused parts of one layer together: q,k,v then gate,up)."""
    check_tp(spec, tp)
    check_vllm_vocab(spec, tp)
    return list(megatron_to_hf(shard, spec).items())


# ---- shapes of stages and shards ------------------------------------------------------
def stage_state(full: StateDict, spec: ModelSpec, pp: int, stage: int) -> StateDict:
    """The parameters (megatron names) pipeline stage `stage` of `pp` holds."""
    layers = set(stage_layers(spec, pp, stage))
    out = {}
    for name, t in full.items():
        m = _LAYER_RE.match(name)
        if m:
            keep = int(m.group(1)) in layers
        else:
            keep = (name == EMBED and stage == 0) or (name != EMBED and stage == pp - 1)
        if keep:
            out[name] = t
    return out


def megatron_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Full (TP=1) shapes of every megatron parameter of `spec`, global layer names."""
    h, q, kv, f, v = spec.hidden, spec.q_dim, spec.kv_dim, spec.ffn, spec.vocab
    out = {EMBED: (v, h), OUTPUT: (v, h), FINAL_NORM: (h,)}
    for i in range(spec.layers):
        p = f"decoder.layers.{i}."
        out.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "self_attention.linear_qkv.weight": (q + 2 * kv, h),
                p + "self_attention.linear_proj.weight": (h, q),
                p + "pre_mlp_layernorm.weight": (h,),
                p + "mlp.linear_fc1.weight": (2 * f, h),
                p + "mlp.linear_fc2.weight": (h, f),
            }
        )
    return out


def shard_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """Shape of one TP shard of parameter `name` whose full shape is `shape`."""
    kind = split_kind(name)
    if kind == "replicated":
        return shape
    dim = 1 if kind == "row" else 0
    return tuple(n // tp if i == dim else n for i, n in enumerate(shape))


def flat_views(
    flat: Tensor, offset: int, shapes: dict[str, tuple[int, ...]], names: Sequence[str]
) -> StateDict:
    """Tensors of `shapes` (in the order of `names`) one after another in the 1-D `flat`
    from `offset`: views, no copy."""
    out = {}
    for n in names:
        m = math.prod(shapes[n])
        out[n] = flat[offset : offset + m].view(shapes[n])
        offset += m
    return out


def tensors_bytes(ts: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)
