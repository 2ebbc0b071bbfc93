"""Weight names and layouts: megatron-core GPTModel shards <-> Hugging Face Llama / Mistral /
Qwen2 / Qwen3 / Qwen3-MoE <-> vLLM (the MoE layers' names: executor.engines.moe_weights).

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
- ``linear_qkv.bias`` (Qwen2) is grouped like the weight rows; the per-head q/k norms
  (Qwen3: ``q_layernorm`` / ``k_layernorm``, HF ``q_norm`` / ``k_norm``) are replicated, as
  are the other norms.
- tied embeddings (``spec.tied_embeddings``): no ``output_layer.weight`` in the full state
  and no ``lm_head.weight`` on the Hugging Face side; with pp > 1 megatron's last stage keeps
  a copy of the embedding as its output layer (``stage_state(..., tied_copy=True)``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from hybridflow.executor.engines import moe_weights as MW
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
    "self_attention.linear_qkv.bias": (None, "qkv"),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight", "replicated"),
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight", "replicated"),
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
    local = layer_of(name)[1]
    return _LAYER_PARAMS[local][1] if local in _LAYER_PARAMS else str(MW.split_kind(local))


def layer_of(name: str) -> tuple[int, str]:
    """(global layer index, layer-local name) of a megatron layer parameter."""
    m = _LAYER_RE.match(name)
    if not m or (m.group(2) not in _LAYER_PARAMS and MW.split_kind(m.group(2)) is None):
        raise LayoutError(f"unknown megatron parameter {name!r}")
    return int(m.group(1)), m.group(2)


def hf_layer_name(local: str) -> str:
    """The Hugging Face layer-local name of a megatron one that maps one to one (not the
    fused qkv and fc1s)."""
    hf = _LAYER_PARAMS[local][0] if local in _LAYER_PARAMS else MW.hf_name(local)
    if hf is None:
        raise LayoutError(f"{local!r} is fused from several Hugging Face tensors")
    return hf


def fc1_parts(local: str) -> tuple[str, str]:
    """Hugging Face layer-local (gate, up) names of a fused ``linear_fc1`` (the dense MLP's
    or an expert's)."""
    if local == "mlp.linear_fc1.weight":
        return "mlp.gate_proj.weight", "mlp.up_proj.weight"
    parts = MW.fc1_parts(local)
    if parts is None:
        raise LayoutError(f"{local!r} is not a fused linear_fc1")
    return parts


def check_tp(spec: ModelSpec, tp: int) -> None:
    """Raise LayoutError unless `spec` splits evenly over `tp` ranks."""
    if tp < 1:
        raise LayoutError(f"tensor-parallel size must be >= 1, got {tp}")
    for what, n in (
        ("KV heads", spec.kv_heads),
        ("FFN size", spec.ffn),
        ("expert FFN size", spec.expert_ffn),
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
_QKV = {
    "self_attention.linear_qkv.weight": "weight",
    "self_attention.linear_qkv.bias": "bias",
}


def _qkv_to_hf(qkv: Tensor, spec: ModelSpec) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v rows (weight or bias) of a grouped ``linear_qkv`` tensor (any TP shard)."""
    nq, hd, rest = spec.heads // spec.kv_heads, spec.head_dim, qkv.shape[1:]
    g = qkv.view(-1, nq + 2, hd, *rest)
    return (
        g[:, :nq].reshape(-1, *rest),
        g[:, nq].reshape(-1, *rest),
        g[:, nq + 1].reshape(-1, *rest),
    )


def hf_to_qkv(q: Tensor, k: Tensor, v: Tensor, spec: ModelSpec) -> Tensor:
    """Grouped ``linear_qkv`` rows from q, k, v rows (weight or bias; the full tensors or
    the rows of whole KV groups): per group its query heads, then k, then v."""
    nq, hd, rest = spec.heads // spec.kv_heads, spec.head_dim, q.shape[1:]
    groups = k.shape[0] // hd
    return torch.cat(
        [
            q.reshape(groups, nq, hd, *rest),
            k.reshape(groups, 1, hd, *rest),
            v.reshape(groups, 1, hd, *rest),
        ],
        dim=1,
    ).reshape(-1, *rest)


def _layer_to_hf(pre: str, local: str, t: Tensor, spec: ModelSpec) -> StateDict:
    if local in _QKV:
        q, k, v = _qkv_to_hf(t, spec)
        kind = _QKV[local]
        return {pre + f"self_attn.{p}_proj.{kind}": x for p, x in zip("qkv", (q, k, v))}
    if local == "mlp.linear_fc1.weight" or MW.fc1_parts(local):
        return dict(zip((pre + p for p in fc1_parts(local)), t.chunk(2, dim=0)))
    return {pre + hf_layer_name(local): t}


def megatron_to_hf(shard: StateDict, spec: ModelSpec, vocab_rows: int | None = None) -> StateDict:
    """Hugging Face names for a megatron shard (any TP degree; sizes stay local).

    On the full model (TP=1) this is the HF state dict. ``vocab_rows`` keeps only the first
    rows of the embedding / output layer (strips megatron's vocab padding). A tied model's
    output layer (the last stage's copy of the embedding) is left out: HF has no lm_head.
    """
    out: StateDict = {}
    for name, t in shard.items():
        if name == OUTPUT and spec.tied_embeddings:
            continue
        if name in _TOP_PARAMS:
            hf = _TOP_PARAMS[name][0]
            out[hf] = t[:vocab_rows] if vocab_rows and _TOP_PARAMS[name][1] == "vocab" else t
            continue
        layer, local = layer_of(name)
        out.update(_layer_to_hf(f"model.layers.{layer}.", local, t, spec))
    return out


def _layer_from_hf(hf: StateDict, pre: str, mp: str, spec: ModelSpec) -> StateDict:
    out: StateDict = {}
    for local, kind in _QKV.items():
        q, k, v = (pre + f"self_attn.{p}_proj.{kind}" for p in "qkv")
        if q in hf:
            out[mp + local] = hf_to_qkv(hf[q], hf[k], hf[v], spec)
    if pre + "mlp.gate_proj.weight" in hf:
        gate, up = (hf[pre + p] for p in fc1_parts("mlp.linear_fc1.weight"))
        out[mp + "mlp.linear_fc1.weight"] = torch.cat([gate, up])
    if pre + MW.HF_ROUTER in hf:
        out.update(MW.layer_from_hf(hf, pre, mp, spec))
    for local, (hf_local, _) in _LAYER_PARAMS.items():
        if hf_local is not None and pre + hf_local in hf:
            out[mp + local] = hf[pre + hf_local]
    return out


def hf_to_megatron(hf: StateDict, spec: ModelSpec) -> StateDict:
    """Megatron names (TP=1, global layer indices) for a Hugging Face Llama / Mistral /
    Qwen2 / Qwen3 / Qwen3-MoE state dict. A tied model gets no output layer (an ``lm_head.weight``
    in `hf` must then equal the embedding)."""
    out: StateDict = {}
    for meg, (name, _) in _TOP_PARAMS.items():
        if name in hf:
            out[meg] = hf[name]
    if spec.tied_embeddings and OUTPUT in out:
        lm_head = out.pop(OUTPUT)
        if EMBED in out and not torch.equal(lm_head, out[EMBED]):
            raise LayoutError(
                f"model {spec.name!r} ties its embeddings, but lm_head.weight differs "
                "from model.embed_tokens.weight"
            )
    for i in range(spec.layers):
        pre = f"model.layers.{i}."
        if pre + "self_attn.q_proj.weight" in hf:
            out.update(_layer_from_hf(hf, pre, f"decoder.layers.{i}.", spec))
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
    vLLM's loader wants (fused parts of one layer together: q,k,v then gate,up; biases
    as q,k,v too). A tied model sends no lm_head: vLLM ties it to the embedding."""
    check_tp(spec, tp)
    check_vllm_vocab(spec, tp)
    return list(megatron_to_hf(shard, spec).items())


# ---- shapes of stages and shards ------------------------------------------------------
def stage_state(full: dict, spec: ModelSpec, pp: int, stage: int, tied_copy: bool = False) -> dict:
    """The parameters (megatron names) pipeline stage `stage` of `pp` holds, from `full`
    (tensors, or any values: shapes). A tied model's last stage (pp > 1) also holds a copy
    of the embedding as ``output_layer.weight``: with `tied_copy` it is included (what
    megatron holds), else left out (the distinct weights, what resharding moves)."""
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
    if tied_copy and spec.tied_embeddings and pp > 1 and stage == pp - 1 and EMBED in full:
        out[OUTPUT] = full[EMBED]
    return out


def megatron_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Full (TP=1) shapes of every megatron parameter of `spec` (LM head; none when tied),
    global layer names."""
    h, q, kv, f, v, hd = spec.hidden, spec.q_dim, spec.kv_dim, spec.ffn, spec.vocab, spec.head_dim
    out: dict[str, tuple[int, ...]] = {EMBED: (v, h)}
    if not spec.tied_embeddings:
        out[OUTPUT] = (v, h)
    out[FINAL_NORM] = (h,)
    for i in range(spec.layers):
        p = f"decoder.layers.{i}."
        out.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "self_attention.linear_qkv.weight": (q + 2 * kv, h),
                p + "self_attention.linear_proj.weight": (h, q),
                p + "pre_mlp_layernorm.weight": (h,),
            }
        )
        dense = {"mlp.linear_fc1.weight": (2 * f, h), "mlp.linear_fc2.weight": (h, f)}
        out.update({p + n: s for n, s in (MW.layer_shapes(spec) if spec.is_moe else dense).items()})
        if spec.qkv_bias:
            out[p + "self_attention.linear_qkv.bias"] = (q + 2 * kv,)
        if spec.qk_norm:
            out[p + "self_attention.q_layernorm.weight"] = (hd,)
            out[p + "self_attention.k_layernorm.weight"] = (hd,)
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
