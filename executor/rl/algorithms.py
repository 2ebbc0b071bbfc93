"""RL math for PPO, GRPO, ReMax and Safe-RLHF: pure torch, no distributed code.

Shapes: ``B`` sequences, ``T`` response tokens, right-padded; ``mask`` (B, T) is 1 on real
response tokens (a prefix of each row). Per-token tensors are aligned with the response:
``logprobs[:, t]`` is the log-probability of ``responses[:, t]``, ``values[:, t]`` the value of
the state before it. ``scores`` (B,) are sequence-level rewards (reward model or rule).

The controller computes advantages (``compute_advantages``, by the estimator each algorithm
registers); the losses the training engine calls are executor.rl.losses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hybridflow import vocab
from hybridflow.errors import UserError
from hybridflow.vocab import ALGORITHMS

KL_KINDS = ("k1", "abs", "k2", "k3")


class AlgorithmError(UserError):
    """An RL setting that cannot be used."""


# ---- masked statistics ------------------------------------------------------------------
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the masked entries (0 where there are none)."""
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1.0)


def seq_token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over sequences (rows) of each one's masked token mean: what the losses take, so
    that equal micro-batches of any size, averaged, give the whole batch's loss."""
    return masked_mean(x, mask, dim=1).mean()


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.to(x.dtype).sum()
    if unbiased:
        if n < 2:
            raise AlgorithmError("unbiased variance needs at least two masked entries")
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries become 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# ---- log-probabilities and KL -----------------------------------------------------------
def response_slice(full: torch.Tensor, prompt_len: int, response_len: int) -> torch.Tensor:
    """The positions of a (B, P+T, ...) model output that predict the T response tokens."""
    if prompt_len < 1 or response_len < 1 or full.shape[1] < prompt_len + response_len - 1:
        raise AlgorithmError(
            f"cannot take {response_len} response positions after a prompt "
            f"of {prompt_len} from a sequence of {full.shape[1]}"
        )
    return full[:, prompt_len - 1 : prompt_len - 1 + response_len]


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log p(labels) under softmax(logits / temperature); (B, T, V), (B, T) -> (B, T)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_divergence(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1"
) -> torch.Tensor:
    """Per-token estimators of KL(policy || reference) from sampled-token log-probs.

    k1: log r; abs: |log r|; k2: (log r)^2 / 2; k3: exp(-log r) - 1 + log r (non-negative,
    low variance), with log r = logprobs - ref_logprobs.
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "abs":
        return log_ratio.abs()
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise AlgorithmError(f"unknown KL estimator {kind!r}; expected one of {KL_KINDS}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (rows need at least one)."""
    lengths = mask.long().sum(-1)
    if (lengths == 0).any():
        raise AlgorithmError("every response needs at least one token")
    return lengths - 1


def token_level_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl): -kl_coef * KL on every token, plus the score on the last one."""
    kl = kl_divergence(logprobs, ref_logprobs, kl_kind) * mask.to(logprobs.dtype)
    return terminal_rewards(scores, mask, logprobs.dtype) - kl_coef * kl, kl


def terminal_rewards(
    scores: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Zeros, with each row's score on its last real token."""
    rewards = torch.zeros(mask.shape, dtype=dtype)
    rewards[torch.arange(scores.shape[0]), last_token_index(mask)] = scores.to(dtype)
    return rewards


# ---- advantages -------------------------------------------------------------------------
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; (advantages, returns), zero past each response."""
    m = mask.to(values.dtype)
    T = rewards.shape[1]
    adv = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv[:, t] = delta + gamma * lam * next_adv
        next_value, next_adv = values[:, t] * m[:, t], adv[:, t] * m[:, t]
    return adv * m, (adv + values) * m


def grpo_advantages(
    scores: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """(score - group mean) / (group std + eps) on every token; groups are consecutive rows."""
    B = scores.shape[0]
    if group_size < 2 or B % group_size:
        raise AlgorithmError(
            f"GRPO needs groups of >= 2 responses dividing the batch; "
            f"got group size {group_size} for {B} responses"
        )
    g = scores.float().view(B // group_size, group_size)
    adv = g - g.mean(-1, keepdim=True)
    if scale_by_std:
        adv = adv / (g.std(-1, keepdim=True) + eps)
    return adv.view(B, 1) * mask.float()


def remax_advantages(
    rewards: torch.Tensor, baseline_scores: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Return-to-go of the token rewards minus the greedy response's score (ReMax)."""
    m = mask.to(rewards.dtype)
    returns = torch.flip(torch.cumsum(torch.flip(rewards * m, [1]), 1), [1])
    return (returns - baseline_scores.to(rewards.dtype).unsqueeze(1)) * m


def safe_rlhf_advantages(
    reward_adv: torch.Tensor, cost_adv: torch.Tensor, lagrange: float
) -> torch.Tensor:
    """(A_reward - lambda * A_cost) / (1 + lambda), the Safe-RLHF policy advantage."""
    if lagrange < 0:
        raise AlgorithmError(f"Lagrange multiplier must be >= 0, got {lagrange}")
    return (reward_adv - lagrange * cost_adv) / (1.0 + lagrange)


# ---- controllers ------------------------------------------------------------------------
class FixedKLController:
    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise AlgorithmError(f"KL coefficient must be >= 0, got {kl_coef}")
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019: move the coefficient to keep the KL near a target."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        super().__init__(init_kl_coef)
        if target <= 0 or horizon <= 0:
            raise AlgorithmError(
                f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}"
            )
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


@dataclass
class LagrangeMultiplier:
    """Safe-RLHF's lambda: projected gradient ascent on lambda * (mean cost - threshold)."""

    value: float = 1.0
    lr: float = 0.1
    threshold: float = 0.0
    max_value: float = 100.0

    def __post_init__(self) -> None:
        if not 0 <= self.value <= self.max_value or self.lr <= 0:
            raise AlgorithmError(f"need 0 <= lambda <= max and lr > 0, got {self}")

    def update(self, mean_cost: float) -> float:
        """One step with the batch's mean episode cost; returns the new lambda."""
        self.value = min(
            max(self.value + self.lr * (mean_cost - self.threshold), 0.0), self.max_value
        )
        return self.value


# ---- what the controller and the training engine call -----------------------------------
@dataclass(frozen=True)
class RLConfig:
    """Settings of one algorithm's advantage and loss computation."""

    algorithm: str = "ppo"
    gamma: float = 1.0
    lam: float = 0.95
    clip_ratio: float = 0.2
    value_clip: float = 0.2
    kl_coef: float = 0.0  # KL penalty folded into the token rewards
    kl_kind: str = "k1"
    kl_loss_coef: float = 0.0  # KL term in the actor loss (GRPO's choice)
    kl_loss_kind: str = "k3"
    entropy_coef: float = 0.0
    group_size: int = 1  # GRPO: responses per prompt
    whiten_advantages: bool = True
    temperature: float = 1.0

    def __post_init__(self) -> None:
        vocab.algorithm(self.algorithm, AlgorithmError)
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise AlgorithmError(
                f"gamma and lambda must lie in [0, 1], got {self.gamma}, {self.lam}"
            )
        if self.clip_ratio <= 0 or self.value_clip <= 0 or self.temperature <= 0:
            raise AlgorithmError("clip ratio, value clip and temperature must be positive")
        if min(self.kl_coef, self.kl_loss_coef, self.entropy_coef) < 0:
            raise AlgorithmError("KL and entropy coefficients must be >= 0")
        for kind in (self.kl_kind, self.kl_loss_kind):
            if kind not in KL_KINDS:
                raise AlgorithmError(f"unknown KL estimator {kind!r}; expected {KL_KINDS}")
        if ALGORITHMS[self.algorithm].grouped and self.group_size < 2:
            raise AlgorithmError(f"{self.algorithm} needs group_size >= 2 responses per prompt")

    @property
    def uses_critic(self) -> bool:
        return bool(ALGORITHMS[self.algorithm].critics)


Estimator = Callable[["RLConfig", dict[str, torch.Tensor], float, float], dict[str, torch.Tensor]]
ESTIMATORS: dict[str, Estimator] = {}  # algorithm name -> its advantage estimator


def estimator(name: str) -> Callable[[Estimator], Estimator]:
    """Register the advantage estimator of the algorithm `name` (hybridflow.vocab)."""

    def add(fn: Estimator) -> Estimator:
        assert name in ALGORITHMS and name not in ESTIMATORS, name
        ESTIMATORS[name] = fn
        return fn

    return add


def compute_advantages(
    cfg: RLConfig, batch: dict[str, torch.Tensor], kl_coef: float, lagrange: float = 0.0
) -> dict[str, torch.Tensor]:
    """The controller's prepare step: advantages (and returns) of a whole batch, by the
    estimator registered for cfg.algorithm.

    Batch keys: response_mask, scores; log_probs and ref_log_probs where the KL is a token
    reward; values (critics); costs and cost_values (Safe-RLHF); baseline_scores (ReMax).
    Returns advantages, plus returns / cost_returns for critics, token_rewards and kl where
    they apply.
    """
    return ESTIMATORS[cfg.algorithm](cfg, batch, kl_coef, lagrange)


def _token_rewards(
    cfg: RLConfig, batch: dict[str, torch.Tensor], kl_coef: float
) -> dict[str, torch.Tensor]:
    rewards, kl = token_level_rewards(
        batch["scores"],
        batch["log_probs"],
        batch["ref_log_probs"],
        batch["response_mask"],
        kl_coef,
        cfg.kl_kind,
    )
    return {"token_rewards": rewards, "kl": kl}


@estimator("grpo")
def grpo_estimate(
    cfg: RLConfig, batch: dict[str, torch.Tensor], kl_coef: float, lagrange: float = 0.0
) -> dict[str, torch.Tensor]:
    return {"advantages": grpo_advantages(batch["scores"], batch["response_mask"], cfg.group_size)}


@estimator("remax")
def remax_estimate(
    cfg: RLConfig, batch: dict[str, torch.Tensor], kl_coef: float, lagrange: float = 0.0
) -> dict[str, torch.Tensor]:
    out = _token_rewards(cfg, batch, kl_coef)
    out["advantages"] = remax_advantages(
        out["token_rewards"], batch["baseline_scores"], batch["response_mask"]
    )
    return out


@estimator("ppo")
def ppo_estimate(
    cfg: RLConfig, batch: dict[str, torch.Tensor], kl_coef: float, lagrange: float = 0.0
) -> dict[str, torch.Tensor]:
    mask = batch["response_mask"]
    out = _token_rewards(cfg, batch, kl_coef)
    adv, out["returns"] = gae(out["token_rewards"], batch["values"], mask, cfg.gamma, cfg.lam)
    out["advantages"] = masked_whiten(adv, mask) if cfg.whiten_advantages else adv
    return out


@estimator("safe-rlhf")
def safe_rlhf_estimate(
    cfg: RLConfig, batch: dict[str, torch.Tensor], kl_coef: float, lagrange: float = 0.0
) -> dict[str, torch.Tensor]:
    mask = batch["response_mask"]
    out = _token_rewards(cfg, batch, kl_coef)
    rewards = out["token_rewards"]
    adv, out["returns"] = gae(rewards, batch["values"], mask, cfg.gamma, cfg.lam)
    cost_rewards = terminal_rewards(batch["costs"], mask, rewards.dtype)
    cost_adv, out["cost_returns"] = gae(
        cost_rewards, batch["cost_values"], mask, cfg.gamma, cfg.lam
    )
    if cfg.whiten_advantages:
        adv, cost_adv = masked_whiten(adv, mask), masked_whiten(cost_adv, mask)
    out["advantages"] = safe_rlhf_advantages(adv, cost_adv, lagrange)
    return out
