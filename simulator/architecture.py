"""Model architectures: parameter counts, FLOPs and KV-cache bytes per token.

Counts are computed from the architecture, never looked up. Dense models are Llama/Qwen2
style (GQA, SwiGLU). Mixture-of-experts models add routed experts (``experts``,
``experts_per_token``, ``expert_ffn``), optional shared experts and a number of dense
(non-MoE) layers; DeepSeek-style multi-head latent attention (MLA) is on when
``kv_lora_rank`` > 0. Two counts matter for MoE: ``params`` (every weight: memory) and
``active_params`` (weights one token uses: compute).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hybridflow.errors import UserError


class ModelError(UserError):
    """A model name, file or architecture that cannot be used."""


_POSITIVE = ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab")
_NON_NEGATIVE = (
    "head_dim",
    "experts",
    "experts_per_token",
    "expert_ffn",
    "shared_experts",
    "shared_expert_ffn",
    "dense_layers",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int  # dense MLP width (the dense layers' width in an MoE model)
    vocab: int
    head_dim: int = 0  # 0: hidden // heads (MLA: qk_nope_head_dim + qk_rope_head_dim)
    tied_embeddings: bool = False
    qkv_bias: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_position: int = 4096
    qk_norm: bool = False  # Qwen3: RMSNorm of each query and key head
    rope_scaling: float = 0.0  # Llama 3.1+: the llama3 RoPE frequency factor (0: plain RoPE)
    # ---- mixture of experts (experts == 0: dense) ----------------------------------
    experts: int = 0  # routed experts per MoE layer
    experts_per_token: int = 0  # top-k routed experts per token
    expert_ffn: int = 0  # SwiGLU width of one routed expert
    shared_experts: int = 0  # experts every token uses
    shared_expert_ffn: int = 0  # total SwiGLU width of the shared experts (0: count * expert_ffn)
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid gate (hidden -> 1) on the shared expert
    dense_layers: int = 0  # layers with the dense MLP instead of experts
    router_bias: bool = False  # DeepSeek-V3: per-expert score-correction bias
    # ---- multi-head latent attention (kv_lora_rank == 0: standard attention) --------
    q_lora_rank: int = 0  # 0: full-rank query projection
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # ---- what the counts leave out (hf_config): short phrases, not part of the identity ----
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.notes, tuple) or not all(isinstance(n, str) for n in self.notes):
            raise ModelError(f"model {self.name!r}: notes must be a tuple of strings")
        for f in _POSITIVE:
            if not _is_int(getattr(self, f)) or getattr(self, f) <= 0:
                raise ModelError(
                    f"model {self.name!r}: {f} must be a positive integer, got {getattr(self, f)!r}"
                )
        for f in _NON_NEGATIVE:
            if not _is_int(getattr(self, f)) or getattr(self, f) < 0:
                raise ModelError(
                    f"model {self.name!r}: {f} must be a non-negative integer, "
                    f"got {getattr(self, f)!r}"
                )
        self._check_mla()
        if self.head_dim == 0:
            if self.hidden % self.heads:
                raise ModelError(
                    f"model {self.name!r}: hidden {self.hidden} is not a "
                    f"multiple of heads {self.heads}"
                )
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        if self.heads % self.kv_heads:
            raise ModelError(
                f"model {self.name!r}: heads {self.heads} is not a multiple "
                f"of kv_heads {self.kv_heads}"
            )
        self._check_moe()

    def _check_mla(self) -> None:
        if self.kv_lora_rank == 0:
            if (
                self.q_lora_rank
                or self.qk_nope_head_dim
                or self.qk_rope_head_dim
                or self.v_head_dim
            ):
                raise ModelError(
                    f"model {self.name!r}: q_lora_rank and the MLA head sizes need kv_lora_rank > 0"
                )
            return
        for f in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, f) <= 0:
                raise ModelError(
                    f"model {self.name!r}: latent attention (kv_lora_rank > 0) needs {f} > 0"
                )
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.qk_nope_head_dim + self.qk_rope_head_dim)

    def _check_moe(self) -> None:
        if self.experts == 0:
            moe_only = (
                "experts_per_token",
                "expert_ffn",
                "shared_experts",
                "shared_expert_ffn",
                "dense_layers",
            )
            bad = [f for f in moe_only if getattr(self, f)]
            if bad or self.shared_expert_gate or self.router_bias:
                raise ModelError(
                    f"model {self.name!r}: {', '.join(bad) or 'expert gates'} need experts > 0"
                )
            return
        if not 1 <= self.experts_per_token <= self.experts:
            raise ModelError(
                f"model {self.name!r}: experts_per_token must be between 1 and "
                f"experts ({self.experts}), got {self.experts_per_token}"
            )
        if self.expert_ffn <= 0:
            raise ModelError(f"model {self.name!r}: an MoE model needs expert_ffn > 0")
        if self.dense_layers >= self.layers:
            raise ModelError(
                f"model {self.name!r}: dense_layers ({self.dense_layers}) must "
                f"be fewer than layers ({self.layers})"
            )
        if self.shared_expert_ffn == 0:
            object.__setattr__(self, "shared_expert_ffn", self.shared_experts * self.expert_ffn)
        elif self.shared_experts == 0:
            object.__setattr__(self, "shared_experts", 1)
        if self.shared_expert_gate and not self.shared_experts:
            raise ModelError(f"model {self.name!r}: shared_expert_gate needs a shared expert")

    # ---- shapes -----------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the keys (and of the values) of one token in one layer."""
        return self.kv_heads * self.head_dim

    @property
    def v_dim(self) -> int:
        return self.heads * (self.v_head_dim if self.is_mla else self.head_dim)

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.is_moe else 0

    # ---- parameters -------------------------------------------------------------------
    @property
    def attn_params_per_layer(self) -> int:
        if self.is_mla:
            return self._mla_params()
        bias = (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        norms = 2 * self.head_dim if self.qk_norm else 0
        return (
            self.hidden * (self.q_dim + 2 * self.kv_dim) + bias + self.q_dim * self.hidden + norms
        )

    def _mla_params(self) -> int:
        h, n = self.hidden, self.heads
        if self.q_lora_rank:  # down-projection, its norm, up-projection
            q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * n * self.head_dim
        else:
            q = h * n * self.head_dim
        kv_down = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv_up = self.kv_lora_rank * n * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv_down + kv_up + n * self.v_head_dim * h

    @property
    def mlp_params_per_layer(self) -> int:
        """The dense MLP (SwiGLU: gate, up, down); in an MoE model, that of its dense layers."""
        return 3 * self.hidden * self.ffn

    @property
    def expert_params(self) -> int:
        """One routed expert of one layer (SwiGLU of width expert_ffn)."""
        return 3 * self.hidden * self.expert_ffn

    @property
    def router_params(self) -> int:
        return self.experts * self.hidden + (self.experts if self.router_bias else 0)

    @property
    def shared_expert_params(self) -> int:
        """The shared experts of one MoE layer, with their gate if any."""
        return 3 * self.hidden * self.shared_expert_ffn + (
            self.hidden if self.shared_expert_gate else 0
        )

    @property
    def moe_params_per_layer(self) -> int:
        """Router, every routed expert and the shared experts of one MoE layer."""
        if not self.is_moe:
            return 0
        return self.router_params + self.experts * self.expert_params + self.shared_expert_params

    @property
    def moe_active_params_per_layer(self) -> int:
        """What one token uses of one MoE layer: router, its top-k experts, shared experts."""
        if not self.is_moe:
            return 0
        return (
            self.router_params
            + self.experts_per_token * self.expert_params
            + self.shared_expert_params
        )

    @property
    def layers_params(self) -> int:
        """All decoder layers together (attention, MLP or experts, two norms each)."""
        common = self.layers * (self.attn_params_per_layer + 2 * self.hidden)
        dense = (self.layers - self.moe_layers) * self.mlp_params_per_layer
        return common + dense + self.moe_layers * self.moe_params_per_layer

    @property
    def layer_params(self) -> int:
        """One decoder layer; in an MoE model the heaviest one (an MoE layer)."""
        mlp = self.moe_params_per_layer if self.is_moe else self.mlp_params_per_layer
        return self.attn_params_per_layer + mlp + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def params(self) -> int:
        """Total parameters of the language model (embedding, layers, final norm, head)."""
        return self.embedding_params + self.layers_params + self.hidden + self.head_params

    @property
    def value_model_params(self) -> int:
        """Parameters as a critic or reward model: the LM head becomes a scalar head."""
        return self.embedding_params + self.layers_params + self.hidden + self.hidden

    @property
    def inactive_params(self) -> int:
        """Routed experts one token does not use (summed over the MoE layers)."""
        return self.moe_layers * (self.experts - self.experts_per_token) * self.expert_params

    @property
    def active_params(self) -> int:
        """Parameters one token uses: all but the routed experts it is not sent to.

        Counts the embedding table whole, as Qwen's model cards do; DeepSeek publishes the
        count without the input embedding (``active_params - embedding_params``).
        """
        return self.params - self.inactive_params

    # ---- expert parallelism -------------------------------------------------------------
    @property
    def routed_expert_params(self) -> int:
        """Every routed expert of every MoE layer: the part expert parallelism divides."""
        return self.moe_layers * self.experts * self.expert_params

    @property
    def non_expert_params(self) -> int:
        """Everything but the routed experts (attention, dense MLPs, routers, shared experts,
        embedding, head): replicated across an expert-parallel group."""
        return self.params - self.routed_expert_params

    def check_ep(self, ep: int) -> None:
        if not _is_int(ep) or ep < 1:
            raise ModelError(f"expert parallel size must be a positive integer, got {ep!r}")
        if ep > 1 and (not self.is_moe or self.experts % ep):
            raise ModelError(
                f"model {self.name!r}: expert parallel size {ep} does not divide "
                f"its {self.experts} experts"
            )

    def params_per_ep_rank(self, ep: int = 1) -> int:
        """Parameters held by one rank of an expert-parallel group of size `ep` (before any
        tensor or pipeline split): the non-expert part plus experts/ep of each MoE layer."""
        self.check_ep(ep)
        return self.non_expert_params + self.routed_expert_params // ep

    # ---- compute and cache ----------------------------------------------------------------
    @property
    def active_matmul_params(self) -> int:
        """Weights one token multiplies by in a forward pass (no embedding lookup, no norms
        of the hidden state): 2 FLOPs each."""
        dense_mlp = (self.layers - self.moe_layers) * self.mlp_params_per_layer
        return (
            self.layers * self.attn_params_per_layer
            + dense_mlp
            + self.moe_layers * self.moe_active_params_per_layer
            + self.vocab * self.hidden
        )

    def flops_per_token(self, context: int = 0) -> float:
        """Forward FLOPs for one token: 2 per active matmul weight, plus attention over
        `context` earlier tokens (QK^T over the query/key head size, AV over the value's)."""
        attention = 2 * self.layers * (self.q_dim + self.v_dim) * context
        return float(2 * self.active_matmul_params + attention)

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """KV cache of one token over all layers; MLA caches its compressed latent and the
        shared rotary key instead of per-head keys and values."""
        if self.is_mla:
            return self.layers * (self.kv_lora_rank + self.qk_rope_head_dim) * bytes_per_value
        return 2 * self.layers * self.kv_dim * bytes_per_value

    def to_dict(self) -> dict:
        """The architecture's fields (the notes, which describe it, are not among them)."""
        d = asdict(self)
        del d["notes"]
        if not self.rope_scaling:
            del d["rope_scaling"]  # added later: dicts written before stay the same
        return d


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
