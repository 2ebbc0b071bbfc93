"""Settings of one `hybridflow run` beyond the plan: iterations, seeds, learning rates."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from hybridflow.errors import UserError
from hybridflow.executor.rl import algorithms as alg
from hybridflow.simulator.job import Job
from hybridflow.simulator.reshard import SCHEMES


class RunConfigError(UserError):
    """A run setting that cannot be used."""


OVERLONG = ("refuse", "truncate")


# where the behaviour policy's log-probs come from: the actor's recomputation (exact
# wherever generation and training numerics differ, e.g. bf16 on GPU) or the engine's own
OLD_LOGPROBS = ("recompute", "engine")


@dataclass(frozen=True)
class DataConfig:
    """A user's job: prompts, their answers and the rules that score responses (the models
        come from the plan's folders: a critic starts from the folder the plan names for it, a
    reward model's or the actor's). ``data`` None: the built-in task."""

    data: str | None = None  # JSONL or Parquet of training prompts
    eval_data: str | None = None  # held-out prompts, scored by the rule before and after
    prompt_key: str = "prompt"
    answer_key: str | None = None  # dotted, e.g. reward_model.ground_truth
    chat_template: bool = True  # the tokenizer's chat template, when it has one
    overlong: str = "refuse"  # prompts longer than the plan's prompt_len: refuse | truncate
    reward_fn: str | None = None  # FILE.py:NAME, or a built-in rule (exact, math)
    cost_fn: str | None = None  # Safe-RLHF's rule cost, the same forms
    reward_processes: int = 2  # processes the rule functions run in on the controller
    export_hf: str | None = None  # the trained actor as a Hugging Face folder, at the end

    def __post_init__(self) -> None:
        if self.overlong not in OVERLONG:
            raise RunConfigError(f"overlong must be one of {', '.join(OVERLONG)}")
        if not isinstance(self.reward_processes, int) or not 1 <= self.reward_processes <= 64:
            raise RunConfigError("reward_processes must be an integer in 1..64")
        if self.data is None and (self.eval_data or self.reward_fn or self.cost_fn):
            raise RunConfigError(
                "--eval-data, --reward-fn and --cost-fn need --data (a user's job); "
                "the built-in task has its own prompts and rules"
            )

    @property
    def user_job(self) -> bool:
        return self.data is not None


@dataclass(frozen=True)
class RunConfig:
    iterations: int = 16
    seed: int = 0
    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    clip_grad: float = 1.0
    kl_coef: float = 0.1  # KL penalty in the token rewards (PPO, ReMax, Safe-RLHF)
    kl_loss_coef: float = 0.2  # KL term in the actor loss (algorithms with kl_in_loss: GRPO)
    temperature: float = 1.0
    top_p: float = 1.0
    micro_batch_size: int = 8
    checkpoint_every: int = 5
    critic_warmup: int = 2  # PPO, Safe-RLHF: first iterations train the critics only
    reshard: str = "hybridengine"
    old_logprobs: str = "recompute"  # or "engine": vLLM's sampling log-probs (OLD_LOGPROBS)
    kv_cache_mib: int = 16
    cost_threshold: float = (
        0.0  # Safe-RLHF: mean cost-model logit to stay under (> 0: forbidden letter)
    )
    lagrange_lr: float = 0.05
    data: DataConfig = DataConfig()

    def __post_init__(self) -> None:
        lows = {
            "iterations": 1,
            "micro_batch_size": 1,
            "checkpoint_every": 1,
            "kv_cache_mib": 1,
            "critic_warmup": 0,
        }
        for f, low in lows.items():
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise RunConfigError(f"{f} must be an integer >= {low}, got {v!r}")
        if self.reshard not in SCHEMES:
            raise RunConfigError(
                f"unknown resharding scheme {self.reshard!r}: choose one of {', '.join(SCHEMES)}"
            )
        if self.old_logprobs not in OLD_LOGPROBS:
            raise RunConfigError(
                f"old_logprobs must be one of {', '.join(OLD_LOGPROBS)}, got {self.old_logprobs!r}"
            )
        if self.old_logprobs == "engine" and self.temperature != 1.0:
            raise RunConfigError(
                "old_logprobs 'engine' needs temperature 1 (the engine's log-probs are of the "
                f"unscaled logits), got temperature {self.temperature}"
            )
        if min(self.actor_lr, self.critic_lr, self.kl_coef, self.kl_loss_coef) < 0:
            raise RunConfigError("learning rates and KL coefficients must be >= 0")
        if not 0 < self.top_p <= 1 or self.temperature <= 0:
            raise RunConfigError("temperature must be > 0 and top_p in (0, 1]")

    def rl(self, job: Job) -> alg.RLConfig:
        """The advantage and loss settings of `job`'s algorithm."""
        in_loss = job.dataflow.kl_in_loss
        return alg.RLConfig(
            algorithm=job.algorithm,
            group_size=job.n_samples,
            kl_coef=0.0 if in_loss else self.kl_coef,
            kl_loss_coef=self.kl_loss_coef if in_loss else 0.0,
            temperature=self.temperature,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        d = dict(d)
        data = d.pop("data", None) or {}
        for c, given in ((cls, d), (DataConfig, data)):
            if not isinstance(given, dict):
                raise RunConfigError(f"run settings: expected a mapping, got {given!r}")
            unknown = sorted(set(given) - {f.name for f in fields(c)})
            if unknown:
                raise RunConfigError(f"unknown run settings: {', '.join(unknown)}")
        return cls(**d, data=DataConfig(**data))
