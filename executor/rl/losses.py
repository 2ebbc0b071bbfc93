"""The losses: the PPO policy and value losses, and the loss callables the controller sends
with an update (called by the training engine on each micro-batch with megatron's
per-token output, log-probs or values [b, P+R], and the micro-batch's slice of the batch).
Shapes as in executor.rl.algorithms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from hybridflow.executor.controller.batch import Batch
from hybridflow.executor.rl.algorithms import (
    RLConfig,
    entropy_from_logits,
    kl_divergence,
    logprobs_from_logits,
    response_slice,
    seq_token_mean,
)


class TensorFields(Protocol):
    """A batch slice the losses index by field name: a dict of tensors or a controller Batch."""

    def __getitem__(self, key: str, /) -> torch.Tensor: ...


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_ratio: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate: the sequence mean of token means of max(-A r, -A clip(r, 1-e,
    1+e)) (:func:`seq_token_mean`: independent of how the batch is cut into micro-batches)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio)
    loss = seq_token_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "pg_loss": loss.item(),
            "pg_clipfrac": seq_token_mean((clipped > unclipped).float(), mask).item(),
            "ppo_kl": seq_token_mean(old_logprobs - logprobs, mask).item(),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """0.5 * sequence mean of token means of max((v - R)^2, (v_clipped - R)^2), v_clipped
    near the old value."""
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    loss1, loss2 = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * seq_token_mean(torch.maximum(loss1, loss2), mask)
    with torch.no_grad():
        metrics = {
            "vf_loss": loss.item(),
            "vf_clipfrac": seq_token_mean((loss2 > loss1).float(), mask).item(),
            "vpred_mean": seq_token_mean(values, mask).item(),
        }
    return loss, metrics


def actor_loss(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], cfg: RLConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip actor loss from response-aligned logits (B, T, V) and the batch slice.

    Batch keys: responses, response_mask, old_log_probs, advantages; ref_log_probs when
    cfg.kl_loss_coef > 0.
    """
    mask = batch["response_mask"]
    logprobs = logprobs_from_logits(logits, batch["responses"], cfg.temperature)
    entropy = (
        seq_token_mean(entropy_from_logits(logits, cfg.temperature), mask)
        if cfg.entropy_coef > 0
        else None
    )
    return policy_loss(logprobs, batch, cfg, entropy)


def policy_loss(
    logprobs: torch.Tensor,
    batch: TensorFields,
    cfg: RLConfig,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip actor loss from response-aligned log-probs (B, T): the clipped surrogate,
    minus entropy_coef x `entropy` (when given), plus kl_loss_coef x KL to the reference."""
    mask = batch["response_mask"]
    loss, metrics = ppo_policy_loss(
        logprobs, batch["old_log_probs"], batch["advantages"], mask, cfg.clip_ratio
    )
    if entropy is not None:
        loss = loss - cfg.entropy_coef * entropy
        metrics["entropy"] = entropy.item()
    if cfg.kl_loss_coef > 0:
        kl = seq_token_mean(kl_divergence(logprobs, batch["ref_log_probs"], cfg.kl_loss_kind), mask)
        loss = loss + cfg.kl_loss_coef * kl
        metrics["kl_loss"] = kl.item()
    metrics["actor_loss"] = loss.item()
    return loss, metrics


def critic_loss(
    values: torch.Tensor, batch: TensorFields, cfg: RLConfig, prefix: str = ""
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss from response-aligned values (B, T) and the batch slice.

    Batch keys: response_mask, ``{prefix}values`` (old), ``{prefix}returns``; Safe-RLHF's
    cost critic uses prefix "cost_".
    """
    loss, metrics = value_loss(
        values.float(),
        batch[f"{prefix}values"],
        batch[f"{prefix}returns"],
        batch["response_mask"],
        cfg.value_clip,
    )
    return loss, {f"{prefix}{k}": v for k, v in metrics.items()}


@dataclass(frozen=True)
class ActorLoss:
    """PPO-clip (with GRPO's optional KL term) on megatron's per-token log-probs."""

    cfg: RLConfig
    prompt_len: int

    def __call__(self, output: torch.Tensor, mb: Batch) -> tuple[torch.Tensor, dict]:
        # the batch's own response length: batches are cut after their longest response
        logp = response_slice(output, self.prompt_len, mb["response_mask"].shape[1])
        return policy_loss(logp, mb, self.cfg)


@dataclass(frozen=True)
class CriticLoss:
    cfg: RLConfig
    prompt_len: int
    prefix: str = ""  # "cost_" for Safe-RLHF's cost critic

    def __call__(self, output: torch.Tensor, mb: Batch) -> tuple[torch.Tensor, dict]:
        values = response_slice(output, self.prompt_len, mb["response_mask"].shape[1])
        return critic_loss(values, mb, self.cfg, self.prefix)
