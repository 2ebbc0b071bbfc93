"""megatron-core GPTModel built as a Llama-style decoder from a simulator ModelSpec, dense or
Qwen3-MoE (``moe_weights.megatron_config``: top-k routed SwiGLU experts in every layer, megatron's
``SequentialMLP``, expert parallel 1, experts split over TP like a dense MLP).

RMSNorm, SwiGLU (gate and up fused in ``linear_fc1``, gate first), rotary positions
(neox style), GQA through ``num_query_groups``, no biases but Qwen2's qkv bias
(``add_qkv_bias``), Qwen3's per-head RMSNorm of queries and keys (``qk_layernorm``), tied
embeddings (``share_embeddings_and_output_weights``: none at pp = 1, the last stage's copy
synced over the embedding group at pp > 1). With ``value_head=True`` the LM head becomes a
scalar head (critic / reward model): a plain ``Linear(hidden, 1)``, replicated on every TP
rank, and the embedding is never tied to it.

Build under a role's groups (``RoleGroups.active()``): the local pipeline stage (and its
virtual chunks) comes from megatron's parallel_state. Weights are drawn by
:func:`init_weights` as slices of full tensors seeded by their global names, so TP/PP
shards equal slices of the one-process model built with the same seed.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hybridflow.errors import UserError
from hybridflow.executor.engines import cuda_bridge
from hybridflow.executor.engines import moe_weights as MW
from hybridflow.executor.engines.groups import RoleGroups
from hybridflow.executor.engines.weights import EMBED, OUTPUT
from hybridflow.layout import ParallelLayout
from hybridflow.simulator.architecture import ModelSpec

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig


# megatron's TransformerConfig fields of each recompute setting: full recomputes every
# layer from its input (one layer per unit), selective the attention core (its default
# recompute_modules, ["core_attn"])
RECOMPUTE: dict[str, dict] = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full": {
        "recompute_granularity": "full",
        "recompute_method": "uniform",
        "recompute_num_layers": 1,
    },
}


class ValueHead(torch.nn.Module):
    """Scalar head in place of megatron's output layer (same call signature)."""

    def __init__(self, hidden: int, seed: int, std: float) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)  # identical on every TP rank
        weight = torch.empty(1, hidden).normal_(0.0, std, generator=gen)
        self.weight = torch.nn.Parameter(weight)

    def forward(
        self,
        hidden_states: torch.Tensor,
        weight: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
        **_: object,
    ) -> tuple[torch.Tensor, None]:
        return F.linear(hidden_states, self.weight), None


@dataclass(frozen=True)
class ModelOptions:
    """How to build the model: head kind, dtype, init, activation recompute."""

    value_head: bool = False
    dtype: str = "float32"
    init_std: float = 0.02
    recompute: str = "none"  # none | selective (core attention) | full (every layer)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"model dtype must be float32, bfloat16 or float16, got {self.dtype!r}"
            )
        if not self.init_std > 0:
            raise ValueError(f"init_std must be positive, got {self.init_std}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(
                f"recompute must be one of {', '.join(RECOMPUTE)}, got {self.recompute!r}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


class UnbuildableModel(UserError):
    """A ModelSpec this builder cannot make (MoE other than Qwen3-MoE's, latent attention)."""


def check_buildable(spec: ModelSpec) -> None:
    """Raise UnbuildableModel unless `spec` is a dense decoder with standard attention or a
    Qwen3-MoE one."""
    reason = MW.unbuildable_reason(spec)
    if reason:
        raise UnbuildableModel(reason)
    if spec.is_mla:
        raise UnbuildableModel(
            f"model {spec.name!r}: multi-head latent attention cannot be built by the executor"
        )


def transformer_config(
    spec: ModelSpec, layout: ParallelLayout, options: ModelOptions
) -> TransformerConfig:
    check_buildable(spec)
    layout.check_model(spec.layers, spec.heads, spec.kv_heads, spec.vocab)
    dtype = options.torch_dtype
    return TransformerConfig(
        num_layers=spec.layers,
        hidden_size=spec.hidden,
        num_attention_heads=spec.heads,
        num_query_groups=spec.kv_heads,
        ffn_hidden_size=spec.ffn,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=options.init_std,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=True,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        batch_p2p_comm=False,
        batch_p2p_sync=False,
        sequence_parallel=False,
        **RECOMPUTE[options.recompute],
        **MW.megatron_config(spec),
    )


def _build_chunk(
    spec: ModelSpec,
    config: TransformerConfig,
    options: ModelOptions,
    vp_stage: int | None,
    seed: int,
) -> GPTModel:
    pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(
            num_experts=spec.experts or None,
            moe_grouped_gemm=False,
            normalization="RMSNorm",
            qk_layernorm=spec.qk_norm,
        ),
        vocab_size=spec.vocab,
        max_sequence_length=spec.max_position,
        pre_process=pre,
        post_process=post,
        parallel_output=True,
        share_embeddings_and_output_weights=spec.tied_embeddings and not options.value_head,
        position_embedding_type="rope",
        rotary_base=int(spec.rope_theta),
        rope_scaling=spec.rope_scaling > 0,
        rope_scaling_factor=spec.rope_scaling or 8.0,
        vp_stage=vp_stage,
    )
    if options.value_head and post:
        model.output_layer = ValueHead(spec.hidden, seed + 7, options.init_std)
    return model


def build_local_model(
    spec: ModelSpec, groups: RoleGroups, options: ModelOptions, seed: int
) -> list[GPTModel]:
    """This rank's model chunks (one, or vpp chunks when interleaved), initialised by
    :func:`init_weights`. Call under ``groups.active()``; reseeds the role's RNG tracker."""
    config = transformer_config(spec, groups.layout, options)
    if spec.is_moe:
        MW.prepare_megatron()
    torch.manual_seed(seed)
    cuda_bridge.seed_tracker(groups.rng_tracker, seed, groups.tp_rank)
    vpp = groups.layout.vpp
    chunks = [
        _build_chunk(spec, config, options, vp_stage, seed)
        for vp_stage in ([None] if vpp is None else range(vpp))
    ]
    chunks = [c.to(cuda_bridge.device()) for c in chunks]
    if spec.is_moe:
        MW.train_without_sequence_parallel(chunks, groups.layout.tp)
    init_weights(
        chunks,
        seed,
        options.init_std,
        spec.layers,
        groups.tp_rank,
        groups.layout.tp,
        spec.tied_embeddings and not options.value_head,
    )
    return chunks


def named_local_parameters(chunks: list[torch.nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron name, local shard) of this rank. Layer numbers are global (offset by the
    rank's pipeline stage), so names are the same as in the one-process model."""
    for chunk in chunks:
        module = unwrap(chunk)
        offset = _layer_offset(module)
        for name, param in module.named_parameters():
            yield _global_layer_name(name, offset), param


def unwrap(module: torch.nn.Module) -> GPTModel:
    while not isinstance(module, GPTModel):
        module = module.module
    return module


def _layer_offset(model: GPTModel) -> int:
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def _global_layer_name(name: str, offset: int) -> str:
    prefix = "decoder.layers."
    if not name.startswith(prefix):
        return name
    idx, rest = name[len(prefix) :].split(".", 1)
    return f"{prefix}{int(idx) + offset}.{rest}"


def local_layer_name(name: str, chunks: list[torch.nn.Module]) -> tuple[int, str] | None:
    """(chunk index, local name) of a global megatron name on this rank, or None."""
    for i, chunk in enumerate(chunks):
        module = unwrap(chunk)
        local = dict(module.named_parameters())
        if not name.startswith("decoder.layers."):
            if name in local:
                return i, name
            continue
        idx, rest = name[len("decoder.layers.") :].split(".", 1)
        local_name = f"decoder.layers.{int(idx) - _layer_offset(module)}.{rest}"
        if local_name in local and _global_layer_name(local_name, _layer_offset(module)) == name:
            return i, local_name
    return None


# ---- layout-independent weights -------------------------------------------------------
def tp_partition(param: torch.Tensor) -> tuple[int, int] | None:
    """(partition dim, stride) of a TP-split parameter, None if replicated over TP."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return int(param.partition_dim), int(getattr(param, "partition_stride", 1))


def full_shape(param: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    part = tp_partition(param)
    if part is not None:
        shape[part[0]] *= tp_size
    return tuple(shape)


def shard_of(
    full: torch.Tensor, partition: tuple[int, int] | None, tp_rank: int, tp_size: int
) -> torch.Tensor:
    """This TP rank's slice of a full tensor, as megatron splits its master weight."""
    if partition is None:
        return full
    dim, stride = partition
    pieces = torch.chunk(full, tp_size * stride, dim=dim)
    return torch.cat(pieces[tp_rank::tp_size], dim=dim)


def merge_shards(shards: list[torch.Tensor], partition: tuple[int, int] | None) -> torch.Tensor:
    """Inverse of :func:`shard_of`: the full tensor from the shards of TP ranks 0..n-1."""
    if partition is None:
        return shards[0]
    dim, stride = partition
    per_rank = [torch.chunk(s, stride, dim=dim) for s in shards]
    return torch.cat([per_rank[r][k] for k in range(stride) for r in range(len(shards))], dim=dim)


def _init_full(
    name: str, shape: tuple[int, ...], seed: int, std: float, layers: int
) -> torch.Tensor:
    if "layernorm" in name:  # RMSNorm gains (input, pre-MLP, final)
        return torch.ones(shape)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = std / math.sqrt(2.0 * layers)  # megatron's scaled init of output projections
    if name.endswith("bias"):
        return torch.zeros(shape)
    return torch.empty(shape).normal_(0.0, std, generator=gen)


def shares_embedding(chunks: list[torch.nn.Module]) -> bool:
    """Whether the model ties its output layer to its embedding (on some stage)."""
    return any(unwrap(c).share_embeddings_and_output_weights for c in chunks)


def source_name(name: str, tied: bool) -> str:
    """The full tensor a local parameter is a shard of: a tied model's output layer (the
    last stage's copy, pp > 1) is the embedding."""
    return EMBED if tied and name == OUTPUT else name


@torch.no_grad()
def init_weights(
    chunks: list[torch.nn.Module],
    seed: int,
    std: float,
    layers: int,
    tp_rank: int,
    tp_size: int,
    tied: bool | None = None,
) -> None:
    """Initialise every local shard as a slice of a full tensor drawn from (seed, global
    name): the same model whatever the layout, so any layout equals the one-process run.
    RMSNorm gains (q/k norms included) start at one, biases at zero; a tied output layer
    (`tied`, by default whether the chunks share their embedding) starts as the embedding."""
    tied = shares_embedding(chunks) if tied is None else tied
    for name, param in named_local_parameters(chunks):
        full = _init_full(source_name(name, tied), full_shape(param, tp_size), seed, std, layers)
        param.copy_(shard_of(full, tp_partition(param), tp_rank, tp_size).to(param.dtype))


@torch.no_grad()
def load_full_state(
    chunks: list[torch.nn.Module], state: dict[str, torch.Tensor], tp_rank: int, tp_size: int
) -> None:
    """Copy this rank's slices of a full megatron-named state dict (global layer numbers);
    a tied model's output-layer copy comes from the embedding."""
    tied = shares_embedding(chunks)
    local = {n: (source_name(n, tied), p) for n, p in named_local_parameters(chunks)}
    missing = [src for src, _ in local.values() if src not in state]
    if missing:
        raise KeyError(f"state dict lacks {len(missing)} parameters, e.g. {missing[:3]}")
    for name, (src, param) in local.items():
        shard = shard_of(state[src], tp_partition(param), tp_rank, tp_size)
        if tuple(shard.shape) != tuple(param.shape):
            raise ValueError(
                f"{name}: full tensor {tuple(state[src].shape)} gives a shard "
                f"{tuple(shard.shape)}, the model holds {tuple(param.shape)}"
            )
        param.copy_(shard.to(param.dtype))


@torch.no_grad()
def load_local_state(
    chunks: list[torch.nn.Module],
    shards: dict[str, torch.Tensor],
    keep: Collection[str] = (),
) -> None:
    """Copy already-sliced shards (megatron names, global layer numbers) into this rank;
    parameters named in `keep` may be absent (they stay as they are)."""
    local = dict(named_local_parameters(chunks))
    unknown = [n for n in shards if n not in local]
    missing = [n for n in local if n not in shards and n not in keep]
    if unknown or missing:
        raise KeyError(
            f"shards do not match this rank's parameters: unknown {unknown[:3]}, "
            f"missing {missing[:3]}"
        )
    for name, tensor in shards.items():
        if tuple(tensor.shape) != tuple(local[name].shape):
            raise ValueError(
                f"{name}: shard {tuple(tensor.shape)}, the model holds {tuple(local[name].shape)}"
            )
        local[name].copy_(tensor.to(local[name].dtype))
