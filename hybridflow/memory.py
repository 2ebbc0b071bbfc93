"""How a trained role keeps its training state: the plan's per-role "memory" settings.

These are the megatron-core / FSDP-style options verl, NeMo-RL and OpenRLHF turn on, each
trading time for memory: the distributed optimizer (fp32 master weights and Adam states
sharded over data parallel, ZeRO-1), activation recomputation, CPU offload of a colocated
model's state while the other models run, and micro-batches packed to a token budget per
GPU, and fully sharded data parallel (FSDP2 / ZeRO-3: weights and gradients sharded too,
each layer gathered for its forward and backward) as verl's and NeMo-RL's FSDP backends and
OpenRLHF's ZeRO-3 run it. A plan that leaves them out gets verl's megatron defaults
(``DEFAULT``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hybridflow.errors import UserError

RECOMPUTE = ("none", "selective", "full")
MAX_MICRO_BATCH_TOKENS = 2**31  # a job's sequences are capped at 2**31 tokens too
KEYS = ("distributed_optimizer", "recompute", "offload", "micro_batch_tokens", "fsdp")


class MemorySettingsError(UserError):
    """A memory setting that cannot be used."""


@dataclass(frozen=True)
class MemorySettings:
    """distributed_optimizer: shard master weights and Adam states over dp; recompute:
    none | selective (attention core) | full (every layer's activations); offload: params,
    grads and optimizer state on the host between this role's own stages; micro_batch_tokens:
    tokens packed into one micro-batch per GPU (None: one sequence, filled in from the job);
    fsdp: shard weights and gradients over dp as well (no tensor or pipeline parallelism)."""

    distributed_optimizer: bool = True
    recompute: str = "none"
    offload: bool = False
    micro_batch_tokens: int | None = None
    fsdp: bool = False

    def __post_init__(self) -> None:
        for name in ("distributed_optimizer", "offload", "fsdp"):
            if not isinstance(getattr(self, name), bool):
                raise MemorySettingsError(
                    f"memory: {name} must be true or false, got {getattr(self, name)!r}"
                )
        if self.recompute not in RECOMPUTE:
            raise MemorySettingsError(
                f"memory: recompute must be one of {', '.join(RECOMPUTE)}, got {self.recompute!r}"
            )
        t = self.micro_batch_tokens
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, int) or not 0 < t <= MAX_MICRO_BATCH_TOKENS
        ):
            raise MemorySettingsError(
                f"memory: micro_batch_tokens must be a positive integer of at most "
                f"{MAX_MICRO_BATCH_TOKENS:,}, got {t!r}"
            )

    def resolved(self, seq_len: int) -> MemorySettings:
        """With the token budget filled in (one sequence of `seq_len`) and checked."""
        tokens = seq_len if self.micro_batch_tokens is None else self.micro_batch_tokens
        if tokens < seq_len:
            raise MemorySettingsError(
                f"memory: micro_batch_tokens={tokens} cannot hold one sequence of the "
                f"job's {seq_len} tokens (prompt + response)"
            )
        return replace(self, micro_batch_tokens=tokens)

    def sequences_per_micro(self, seq_len: int) -> int:
        """Longest sequences a micro-batch's budget holds."""
        return max(1, (self.micro_batch_tokens or seq_len) // seq_len)

    def to_dict(self) -> dict:
        return {
            "distributed_optimizer": self.distributed_optimizer,
            "recompute": self.recompute,
            "offload": self.offload,
            "micro_batch_tokens": self.micro_batch_tokens,
            "fsdp": self.fsdp,
        }

    @classmethod
    def from_dict(cls, d: object) -> MemorySettings:
        if not isinstance(d, dict) or not set(d) <= set(KEYS):
            raise MemorySettingsError(
                f"memory: expected an object with keys among {', '.join(KEYS)}, got {d!r}"
            )
        return cls(**d)

    def label(self, seq_len: int | None = None) -> str:
        """What is on, in a few words; the token budget left out where it is one sequence
        of `seq_len` tokens."""
        parts = ["fsdp" if self.fsdp else "distopt" if self.distributed_optimizer else "no-distopt"]
        if self.recompute != "none":
            parts.append(f"recompute={self.recompute}")
        if self.offload:
            parts.append("offload")
        if self.micro_batch_tokens and self.micro_batch_tokens != seq_len:
            parts.append(f"mbt={self.micro_batch_tokens}")
        return " ".join(parts)

    def __str__(self) -> str:
        return self.label()


DEFAULT = MemorySettings()
