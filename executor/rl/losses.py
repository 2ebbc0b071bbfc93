"""The losses the controller sends with an update: called by the training engine on each
micro-batch with megatron's per-token output (log-probs or values, [b, P+R]) and the
micro-batch's slice of the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridflow.executor.controller.batch import Batch
from hybridflow.executor.rl import algorithms as alg


@dataclass(frozen=True)
class ActorLoss:
    """PPO-clip (with GRPO's optional KL term) on megatron's per-token log-probs."""

    cfg: alg.RLConfig
    prompt_len: int
    response_len: int

    def __call__(self, output: torch.Tensor, mb: Batch) -> tuple[torch.Tensor, dict]:
        logp = alg.response_slice(output, self.prompt_len, self.response_len)
        return alg.policy_loss(logp, mb, self.cfg)


@dataclass(frozen=True)
class CriticLoss:
    cfg: alg.RLConfig
    prompt_len: int
    response_len: int
    prefix: str = ""  # "cost_" for Safe-RLHF's cost critic

    def __call__(self, output: torch.Tensor, mb: Batch) -> tuple[torch.Tensor, dict]:
        values = alg.response_slice(output, self.prompt_len, self.response_len)
        return alg.critic_loss(values, mb, self.cfg, self.prefix)
