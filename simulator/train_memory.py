"""Per-rank bytes of a model's training state on one parallel layout, as megatron-core holds it.

A rank holds its pipeline stage's layers (uneven stages: hybridflow.layout.pipeline_split),
the embedding on the first stage and the final norm and head on the last (a tied embedding
has a copy on both when pp > 1), column- and row-parallel weights split over tp (norms whole),
routed experts split over ep.

Training state per parameter of the rank: the weights (bf16 on GPU: 2 bytes), their
gradients (fp32 buffer: 4 bytes) and Adam (an fp32 master copy when the weights are not fp32,
and the moments m, v: 4 + 4 + 4 or 4 + 4 bytes). The distributed optimizer shards master
copy and moments over the data-parallel (x context-parallel) ranks; gradients stay whole.
With it megatron also moves the weights into a buffer like the gradients', padded so that
each parameter starts 64-aligned and each bucket splits evenly (``distributed_buffer``); a
rank's optimizer state is its slice's parameter elements. The counts equal what the
executor's megatron-core ranks hold (tests/executor/test_train_options.py).
"""

from __future__ import annotations

import functools
import math

from hybridflow.layout import ParallelLayout, pipeline_split
from hybridflow.memory import DEFAULT, MemorySettings
from hybridflow.simulator.architecture import ModelSpec
from hybridflow.simulator.costs import Memory, memory
from hybridflow.simulator.job import Job
from hybridflow.vocab import TRAINED_ROLES, VALUE_ROLES

GRAD_BYTES = 4  # megatron's fp32 main_grad buffer (grad_reduce_in_fp32)
MOMENT_BYTES = 8  # Adam m and v, fp32
MASTER_BYTES = 4  # fp32 master weights (absent when the weights are fp32 already)


def head_layers(spec: ModelSpec, value_head: bool = False) -> float:
    """The last stage's extra work in layers' worth: the LM head's matmul (a value head's is
    negligible)."""
    if value_head:
        return 0.0
    per_layer = (spec.active_matmul_params - spec.vocab * spec.hidden) / spec.layers
    return spec.vocab * spec.hidden / max(per_layer, 1.0)


@functools.lru_cache(maxsize=65536)
def stage_split(spec: ModelSpec, pp: int, value_head: bool = False) -> tuple[int, ...]:
    """Layers per pipeline stage, balanced against the LM head on the last stage."""
    return pipeline_split(spec.layers, pp, 0.0, head_layers(spec, value_head))


def _split(n: int, tp: int) -> int:
    """One TP rank's part of a split dimension (megatron-core needs tp to divide it; where
    it does not, the part padded up)."""
    return -(-n // tp)


def _attn_tensors(spec: ModelSpec, tp: int) -> list[int]:
    """One layer's attention parameters on one TP rank, in megatron's order: the output
    projection, then (column-parallel) qkv with its bias, the per-head q/k norms (whole on
    every rank); MLA's down projections and their norms are replicated over TP (TE spec,
    ``parallel_mode="duplicated"``), its up projections split."""
    h = spec.hidden
    if spec.is_mla:
        n, q_lora, kv_lora = spec.heads, spec.q_lora_rank, spec.kv_lora_rank
        if q_lora:
            q = [h * q_lora, _split(q_lora * n * spec.head_dim, tp)]
        else:
            q = [_split(h * n * spec.head_dim, tp)]
        kv = [h * (kv_lora + spec.qk_rope_head_dim)]
        kv.append(_split(kv_lora * n * (spec.qk_nope_head_dim + spec.v_head_dim), tp))
        norms = ([q_lora] if q_lora else []) + [kv_lora]
        return [_split(spec.v_dim * h, tp), *q, *kv, *norms]
    qkv = spec.q_dim + 2 * spec.kv_dim
    out = [_split(spec.q_dim * h, tp), _split(qkv * h, tp)]
    if spec.qkv_bias:
        out.append(_split(qkv, tp))
    if spec.qk_norm:
        out += [spec.head_dim, spec.head_dim]
    return out


def _mlp_tensors(spec: ModelSpec, index: int, tp: int, ep: int) -> tuple[list[int], list[int]]:
    """(dense, routed-expert) MLP parameters of layer `index` on one rank: SwiGLU fc1
    (gate and up) and fc2 split over tp; an MoE layer's router whole (its score-correction
    bias is a buffer, not a parameter), experts/ep routed experts, the shared experts split
    and their gate whole."""
    h = spec.hidden
    if not (spec.is_moe and index >= spec.dense_layers):
        return [_split(2 * spec.ffn * h, tp), _split(spec.ffn * h, tp)], []
    expert = [_split(2 * spec.expert_ffn * h, tp), _split(spec.expert_ffn * h, tp)]
    dense = [spec.experts * h]
    if spec.shared_expert_ffn:
        f = spec.shared_expert_ffn
        dense += [_split(2 * f * h, tp), _split(f * h, tp)] + (
            [h] if spec.shared_expert_gate else []
        )
    return dense, expert * _split(spec.experts, ep)


def _layer_params(spec: ModelSpec, index: int, tp: int, ep: int) -> float:
    """One decoder layer's parameters on one rank (its two norms whole)."""
    dense, experts = _mlp_tensors(spec, index, tp, ep)
    return 2 * spec.hidden + sum(_attn_tensors(spec, tp)) + sum(dense) + sum(experts)


def _chunk_layers(spec: ModelSpec, layout: ParallelLayout, stage: int, value_head: bool):
    """The layer indices of each model chunk of a rank of `stage` (vpp chunks when
    interleaved: chunk c holds megatron's (c * pp + stage)-th slice of even ones)."""
    if layout.vpp is None or spec.layers % (layout.pp * layout.vpp):
        split = stage_split(spec, layout.pp, value_head)
        start = sum(split[:stage])
        return [range(start, start + split[stage])]
    per = spec.layers // (layout.pp * layout.vpp)
    return [
        range((c * layout.pp + stage) * per, (c * layout.pp + stage + 1) * per)
        for c in range(layout.vpp)
    ]


@functools.lru_cache(maxsize=4096)
def rank_tensors(
    spec: ModelSpec, layout: ParallelLayout, stage: int, value_head: bool = False
) -> tuple[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]:
    """Per model chunk of a rank of `stage`, its parameters' sizes in megatron's order, in
    the DDP buckets they go to: (dense, the shared embedding's own bucket, routed experts).
    A tied embedding with pp > 1 is a shared embedding: the first stage's embedding and
    the last stage's copy of it as the head; with pp = 1 the head reuses the embedding."""
    tp, h = layout.tp, spec.hidden
    emb, tied_copy = _split(spec.vocab, tp) * h, spec.tied_embeddings and layout.pp > 1
    chunks = _chunk_layers(spec, layout, stage, value_head)
    out = []
    for c, layers in enumerate(chunks):
        dense: list[int] = []
        shared: list[int] = []
        experts: list[int] = []
        if stage == 0 and c == 0:
            (shared if tied_copy else dense).append(emb)
        for i in layers:
            mlp, routed = _mlp_tensors(spec, i, tp, layout.ep)
            dense += [h, *_attn_tensors(spec, tp), h, *mlp]
            experts += routed
        if stage == layout.pp - 1 and c == len(chunks) - 1:
            dense.append(h)  # final norm
            if value_head:
                dense.append(h)
            elif tied_copy:
                shared.append(emb)
            elif not spec.tied_embeddings:
                dense.append(emb)
        out.append((tuple(dense), tuple(shared), tuple(experts)))
    return tuple(out)


@functools.lru_cache(maxsize=65536)
def rank_params(
    spec: ModelSpec, layout: ParallelLayout, stage: int, value_head: bool = False
) -> int:
    """Parameters on one rank of pipeline stage `stage`."""
    return sum(sum(map(sum, chunk)) for chunk in rank_tensors(spec, layout, stage, value_head))


def rank_expert_params(spec: ModelSpec, layout: ParallelLayout, stage: int) -> int:
    """The routed-expert part of rank_params (its gradients reduce over dp / ep ranks)."""
    return sum(sum(chunk[2]) for chunk in rank_tensors(spec, layout, stage))


# ---- megatron's DDP buffer with the distributed optimizer ------------------------------
PARAM_ALIGN = 64  # each parameter starts at a multiple of 64 elements in the buffer
BUCKET_ALIGN = 128  # each bucket ends at a multiple of lcm(dp ranks, 128)


def _ceil_to(n: int, k: int) -> int:
    return -(-n // k) * k


def _bucket_shards(sizes: tuple[int, ...], ranks: int) -> tuple[int, list[int]]:
    """(padded elements, each dp rank's parameter elements) of one bucket of parameters
    `sizes` (megatron's order; the buffer lays them out reversed, each starting at a
    multiple of PARAM_ALIGN, and pads the end for an even split over `ranks`). The
    distributed optimizer gives dp rank r the r-th slice, and state for the parameter
    elements in it only."""
    spans, at = [], 0
    for n in reversed(sizes):
        at = _ceil_to(at, PARAM_ALIGN)
        spans.append((at, at + n))
        at += n
    total = _ceil_to(at, math.lcm(ranks, BUCKET_ALIGN))
    shard, held = total // ranks, [0] * ranks
    for a, b in spans:
        while a < b:
            r = a // shard
            end = min(b, (r + 1) * shard)
            held[r] += end - a
            a = end
    return total, held


@functools.lru_cache(maxsize=4096)
def distributed_buffer(
    spec: ModelSpec, layout: ParallelLayout, stage: int, value_head: bool = False
) -> tuple[int, int]:
    """(elements of megatron's param and grad buffers, optimizer-state elements of the
    dp rank holding the most) on a rank of `stage` with the distributed optimizer: one
    DDP per model chunk, each with a dense buffer sharded over dp x cp ranks and an expert
    buffer over dp x cp / ep; one bucket each (overlap_grad_reduce off, as the executor
    runs), the shared embedding in a bucket of its own."""
    ranks = layout.dp * layout.cp
    groups = ((0, ranks), (1, ranks), (2, max(ranks // layout.ep, 1)))
    padded, dense_held, expert_held = 0, [0] * ranks, [0] * groups[2][1]
    for chunk in rank_tensors(spec, layout, stage, value_head):
        for i, r in groups:
            if chunk[i]:
                total, held = _bucket_shards(chunk[i], r)
                padded += total
                acc = expert_held if i == 2 else dense_held
                acc[:] = [x + y for x, y in zip(acc, held)]
    return padded, max(dense_held) + max(expert_held)


def state_memory(
    spec: ModelSpec,
    layout: ParallelLayout,
    settings: MemorySettings,
    stage: int,
    *,
    value_head: bool = False,
    trained: bool = True,
    param_bytes: int = 2,
) -> Memory:
    """Bytes of weights, gradients and optimizer state on one rank of `stage`."""
    n = rank_params(spec, layout, stage, value_head)
    if not trained:
        return memory(weights=param_bytes * n)
    if settings.fsdp:
        return fsdp_state(spec, layout, n)
    per_param = MOMENT_BYTES + (MASTER_BYTES if param_bytes != 4 else 0)
    optimizer = per_param * n
    if settings.distributed_optimizer:  # the weights live in megatron's padded buffer too
        n, shard = distributed_buffer(spec, layout, stage, value_head)
        optimizer = per_param * shard
    return memory(weights=param_bytes * n, grads=GRAD_BYTES * n, optimizer=optimizer)


def largest_state(
    spec: ModelSpec,
    layout: ParallelLayout,
    settings: MemorySettings,
    *,
    value_head: bool = False,
    trained: bool = True,
) -> Memory:
    """state_memory of the stage that holds the most (the middle stages of an uneven
    pipeline hold the same: the first, one middle and the last stage decide)."""
    # only the distributed optimizer changes the state: one cache entry for the rest
    plain = MemorySettings(distributed_optimizer=settings.distributed_optimizer, fsdp=settings.fsdp)
    return _largest_state(spec, layout, plain, value_head, trained)


FSDP_PREFETCH_LAYERS = 2  # FSDP2 gathers the next layer while one computes


def fsdp_state(spec: ModelSpec, layout: ParallelLayout, n: int) -> Memory:
    """FSDP2 with bf16 compute: fp32 weights, fp32 gradients and Adam sharded over the
    dp x cp ranks (as verl's and NeMo-RL's FSDP backends keep them), and the gathered bf16
    weights of the layers in flight."""
    shards = layout.dp * layout.cp
    per_layer = (spec.layers_params / spec.layers) / layout.tp
    return memory(
        weights=MASTER_BYTES * n / shards,
        grads=GRAD_BYTES * n / shards,
        optimizer=MOMENT_BYTES * n / shards,
        fsdp_gathered=FSDP_PREFETCH_LAYERS * 2 * per_layer,
    )


@functools.lru_cache(maxsize=65536)
def _largest_state(
    spec: ModelSpec,
    layout: ParallelLayout,
    settings: MemorySettings,
    value_head: bool,
    trained: bool,
) -> Memory:
    stages = range(layout.pp) if layout.vpp else sorted({0, min(1, layout.pp - 1), layout.pp - 1})
    return max(
        (
            state_memory(spec, layout, settings, s, value_head=value_head, trained=trained)
            for s in stages
        ),
        key=lambda m: m.bytes,
    )


# ---- what a role holds during an iteration ----------------------------------------------
ACT_BYTES_PER_TOKEN_HIDDEN = {"none": 34, "selective": 26}  # per layer (Korthikanti 2022)
LOGIT_BYTES = 4  # fp32 logits for log-probs (megatron's vocab-parallel cross entropy)
FSDP_LOGIT_BYTES = 2  # bf16: verl's FSDP actor takes log-probs with a fused cross entropy


def resident_memory(
    job: Job, role: str, layout: ParallelLayout, settings: MemorySettings = DEFAULT
) -> Memory:
    """Bytes per GPU held for the whole iteration (an offloaded role holds nothing while
    the other models run: see stage_memory)."""
    if job.is_rule(role):
        return Memory()
    trained = role in TRAINED_ROLES
    if trained and settings.offload:
        return Memory()
    return largest_state(
        job.spec(role), layout, settings, value_head=role in VALUE_ROLES, trained=trained
    )


def offloaded_state(
    job: Job, role: str, layout: ParallelLayout, settings: MemorySettings, kind: str
) -> Memory:
    """What an offloaded role loads back for one of its stages: weights (the actor's also
    to reshard and generate), and gradients for a train stage (Adam's states and step stay
    on the host)."""
    if not settings.offload or role not in TRAINED_ROLES:
        return Memory()
    state = largest_state(job.spec(role), layout, settings, value_head=role in VALUE_ROLES)
    d = state.as_dict()
    return memory(
        loaded_weights=d.get("weights", 0.0), loaded_grads=d["grads"] if kind == "train" else 0.0
    )


def reloaded_weights(
    job: Job, role: str, layout: ParallelLayout, settings: MemorySettings
) -> float:
    """Bytes of an offloaded role's weights back on the GPU (0 when it is not offloaded)."""
    return (
        offloaded_state(job, role, layout, settings, "infer").as_dict().get("loaded_weights", 0.0)
    )


def micro_tokens(job: Job, settings: MemorySettings) -> int:
    """The token budget of one micro-batch (one longest sequence by default)."""
    return settings.micro_batch_tokens or job.seq_len


def stage_memory(
    job: Job, role: str, layout: ParallelLayout, kind: str, settings: MemorySettings = DEFAULT
) -> Memory:
    """Transient bytes per GPU during a train or infer stage, on the stage that needs the
    most: 1F1B keeps up to pp - s micro-batches of activations on stage s; full recompute
    keeps each layer's input and one layer's activations; the last stage adds the logits."""
    spec = job.spec(role)
    tokens = micro_tokens(job, settings) / layout.cp
    per_token = spec.hidden / layout.tp * tokens
    value = role in VALUE_ROLES
    per_logit = FSDP_LOGIT_BYTES if settings.fsdp else LOGIT_BYTES
    logits = 0.0 if value else tokens * spec.vocab / layout.tp * per_logit
    loaded = offloaded_state(job, role, layout, settings, kind)
    if kind != "train":
        acts = ACT_BYTES_PER_TOKEN_HIDDEN["none"] * per_token
        return memory(activations=acts, logits=logits) + loaded
    split = stage_split(spec, layout.pp, value)
    micro = train_micro_batches(job, layout, settings)
    best = Memory()
    # the middle stages hold equal layers and fewer micro-batches the later they are
    for s in sorted({0, min(1, layout.pp - 1), layout.pp - 1}):
        n_layers, in_flight = split[s], min(layout.pp - s, micro)
        if settings.recompute == "full":
            acts = (2 * n_layers * in_flight + ACT_BYTES_PER_TOKEN_HIDDEN["none"]) * per_token
        else:
            acts = ACT_BYTES_PER_TOKEN_HIDDEN[settings.recompute] * n_layers * in_flight * per_token
        last = 2 * logits if s == layout.pp - 1 else 0.0
        m = memory(activations=acts, logits=last)
        best = max(best, m, key=lambda x: x.bytes)
    return best + loaded


def train_micro_batches(job: Job, layout: ParallelLayout, settings: MemorySettings) -> int:
    """Micro-batches of one data-parallel rank per optimizer step: its sequences packed by
    their real tokens into micro-batches of the token budget (one sequence each by default)."""
    sequences = math.ceil(job.sequences / (job.mini_batches * layout.dp))
    budget = micro_tokens(job, settings)
    if budget <= job.seq_len:
        return sequences
    return max(1, math.ceil(sequences * job.mean_seq_len / budget))
