"""An RLHF job: algorithm, the model of each role, sequence lengths, batch and updates.

The algorithm fixes the dataflow: which roles exist and which stages each takes part in.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

from hybridflow import vocab
from hybridflow.errors import UserError
from hybridflow.simulator.architecture import ModelSpec
from hybridflow.simulator.lengths import ResponseLengths
from hybridflow.simulator.model import load_model
from hybridflow.vocab import (
    ALGORITHMS,
    CRITIC_ROLES,
    RULE,
    RULE_ROLES,
    VALUE_ROLES,
    Algorithm,
    Kind,
    Role,
    Stage,
)


class JobError(UserError):
    """A job description that cannot run."""


_POSITIVE_FIELDS = (
    "prompt_len",
    "response_len",
    "global_batch",
    "ppo_epochs",
    "mini_batches",
    "n_samples",
)
# estimate: a math-answer check (parse the final answer, compare) in Python, per response
RULE_CPU_S = 1e-3


@dataclass(frozen=True)
class Work:
    """What one role does in one stage."""

    stage: Stage
    kind: Kind
    sequences: int


# upper bounds of the positive fields, and why: beyond them a plan is no answer
_CAPS: dict[str, tuple[int, str]] = {
    "prompt_len": (2**31, "tokens, longer than any model's context"),
    "response_len": (2**31, "tokens, longer than any model's context"),
    "global_batch": (2**24, "prompts per iteration; RLHF batches are hundreds to thousands"),
    "ppo_epochs": (10**4, "passes over each batch; 1 to 4 is usual"),
    "mini_batches": (2**31, "updates per epoch"),
    "n_samples": (2**12, "responses per prompt; GRPO samples 4 to 64"),
}
# a rule reward or cost is a function on the CPU: more than an hour per response is no rule
RULE_CPU_S_MAX = 3600.0


def _pos(what: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise JobError(f"job: {what} must be a positive integer, got {v!r}")
    cap, why = _CAPS.get(what, (2**31, "a count beyond any job"))
    if v > cap:
        raise JobError(f"job: {what} must be at most {cap:,} ({why}), got {v!r}")
    return v


def _check_numbers(d: dict, dist: list) -> None:
    """A job file's real numbers: none an integer beyond a float, rule_cpu_s within its
    bound (the Job checks the rest)."""
    named = [(k, d[k]) for k in ("response_mean", "rule_cpu_s", "prompt_mean") if k in d]
    named += [
        (f"response_dist[{i}]", x) for i, p in enumerate(dist) if isinstance(p, list) for x in p
    ]
    for what, x in named:
        if type(x) is int and abs(x) > sys.float_info.max:
            raise JobError(f"job: {what} is beyond the range of a number (1.8e308)")
    cpu_s = d.get("rule_cpu_s", RULE_CPU_S)
    if type(cpu_s) in (int, float) and cpu_s > RULE_CPU_S_MAX:
        raise JobError(
            f"job: rule_cpu_s must be at most {RULE_CPU_S_MAX:g} s per response "
            f"(a rule is a function on the CPU), got {cpu_s!r}"
        )


@dataclass(frozen=True)
class Job:
    algorithm: str
    models: tuple[tuple[str, str], ...]  # (role, model name or config path), in role order
    prompt_len: int
    response_len: int
    global_batch: int
    ppo_epochs: int = 1
    mini_batches: int = 1
    n_samples: int = 1
    response_mean: float = 0.0  # 0: every response is response_len long
    response_dist: tuple[tuple[int, float], ...] = ()  # (length, weight); overrides the mean
    rule_cpu_s: float = RULE_CPU_S  # seconds of CPU per response scored by a rule
    prompt_mean: float = 0.0  # 0: every prompt is prompt_len long
    _specs: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        algo = vocab.algorithm(self.algorithm, JobError)
        for f in _POSITIVE_FIELDS:
            _pos(f, getattr(self, f))
        self._check_roles(algo)
        self._check_samples(algo)
        object.__setattr__(
            self,
            "response_dist",
            tuple(tuple(p) if isinstance(p, list) else p for p in self.response_dist),
        )
        self._specs["lengths"] = ResponseLengths(
            self.response_len, self.response_mean, self.response_dist
        )
        if (
            isinstance(self.rule_cpu_s, bool)
            or not isinstance(self.rule_cpu_s, (int, float))
            or not math.isfinite(self.rule_cpu_s)
            or self.rule_cpu_s < 0
        ):
            raise JobError(f"job: rule_cpu_s must be a number >= 0, got {self.rule_cpu_s!r}")
        self._check_prompt_mean()
        self._load_models()

    def _check_prompt_mean(self) -> None:
        m = self.prompt_mean
        if (
            isinstance(m, bool)
            or not isinstance(m, (int, float))
            or not math.isfinite(m)
            or not 0 <= m <= self.prompt_len
        ):
            raise JobError(
                f"job: prompt_mean must be a number in [0, prompt_len={self.prompt_len}] "
                f"(0: every prompt is prompt_len long), got {m!r}"
            )

    def _check_roles(self, algo: Algorithm) -> None:
        """Exactly the algorithm's roles, put in its order."""
        given = dict(self.models)
        roles = algo.roles
        if set(given) != set(roles) or len(given) != len(self.models):
            raise JobError(
                f"job: {self.algorithm} needs exactly the roles {', '.join(roles)}, "
                f"got {', '.join(r for r, _ in self.models) or 'none'}"
            )
        # plain names in the data (a Role is its value); the vocabulary's members compare equal
        object.__setattr__(self, "models", tuple((str(r), given[r]) for r in roles))

    def _check_samples(self, algo: Algorithm) -> None:
        if algo.grouped and self.n_samples < 2:
            raise JobError(f"job: {self.algorithm} needs n_samples >= 2 responses per prompt")
        if not algo.grouped and self.n_samples != 1:
            raise JobError(
                f"job: n_samples applies to "
                f"{' and '.join(a.name for a in ALGORITHMS.values() if a.grouped)} "
                f"only ({self.algorithm} samples one)"
            )
        if self.sequences % self.mini_batches:
            raise JobError(
                f"job: {self.sequences} sequences per iteration do not split into "
                f"{self.mini_batches} equal mini-batches"
            )

    def _load_models(self) -> None:
        """Each role's ModelSpec (none for a rule), its positions checked against the job's."""
        for role, name in self.models:
            if not isinstance(name, str) or not name:
                raise JobError(f"job: the {role} model must be a name or path, got {name!r}")
            if name == RULE:
                if role not in RULE_ROLES:
                    raise JobError(
                        f"job: the {role} cannot be a rule (only "
                        f"{' and '.join(sorted(RULE_ROLES))} can)"
                    )
                continue
            spec = load_model(name)
            if self.seq_len > spec.max_position:
                raise JobError(
                    f"job: prompt_len + response_len = {self.seq_len} exceeds the "
                    f"{role} model's max_position {spec.max_position}"
                )
            self._specs[role] = spec

    @property
    def dataflow(self) -> Algorithm:
        return ALGORITHMS[self.algorithm]

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(str(r) for r in self.dataflow.roles)

    @property
    def gpu_roles(self) -> tuple[str, ...]:
        """The roles that run a model on GPUs (all but rule rewards and costs)."""
        return tuple(r for r, m in self.models if m != RULE)

    @property
    def rule_roles(self) -> tuple[str, ...]:
        return tuple(r for r, m in self.models if m == RULE)

    def model(self, role: str) -> str:
        """The model name or path of `role` ("rule" for a rule reward or cost)."""
        return dict(self.models)[role]

    def is_rule(self, role: str) -> bool:
        return dict(self.models).get(role) == RULE

    @property
    def lengths(self) -> ResponseLengths:
        return self._specs["lengths"]

    @property
    def seq_len(self) -> int:
        """The longest sequence: what memory (KV cache, activations) must hold."""
        return self.prompt_len + self.response_len

    @property
    def prompt_tokens(self) -> float:
        """The mean prompt: what prefill and training compute follow."""
        return float(self.prompt_mean or self.prompt_len)

    @property
    def mean_seq_len(self) -> float:
        """Mean prompt plus the mean response: the tokens really produced per sequence."""
        return self.prompt_tokens + self.lengths.mean

    @property
    def sequences(self) -> int:
        """Sampled responses per iteration (what is scored and trained on)."""
        return self.global_batch * self.n_samples

    @property
    def tokens_per_iteration(self) -> int:
        """Prompt + response tokens of the global batch (the paper's throughput numerator);
        with a length spread, the responses' mean length."""
        if not self.lengths.spread and not self.prompt_mean:
            return self.sequences * self.seq_len
        return round(self.sequences * self.mean_seq_len)

    def spec(self, role: str) -> ModelSpec:
        if self.is_rule(role):
            raise JobError(f"job: the {role} is a rule, it has no model")
        return self._specs[role]

    def params(self, role: str) -> int:
        if self.is_rule(role):
            return 0
        s = self.spec(role)
        return s.value_model_params if role in VALUE_ROLES else s.params

    def works(self, role: str) -> tuple[Work, ...]:
        """The stages `role` takes part in, with the number of sequences of each."""
        greedy = self.global_batch if self.dataflow.greedy_baseline else 0
        n = self.sequences
        if self.is_rule(role):
            return (Work(Stage.PREPARE, Kind.RULE, n + (greedy if role == Role.REWARD else 0)),)
        if role == Role.ACTOR:
            return (
                Work(Stage.GENERATE, Kind.GENERATE, n + greedy),
                Work(Stage.PREPARE, Kind.INFER, n),
                Work(Stage.TRAIN, Kind.TRAIN, n),
            )
        if role in CRITIC_ROLES:
            return (Work(Stage.PREPARE, Kind.INFER, n), Work(Stage.TRAIN, Kind.TRAIN, n))
        if role == Role.REWARD:
            return (Work(Stage.PREPARE, Kind.INFER, n + greedy),)
        if role in (Role.REFERENCE, Role.COST):
            return (Work(Stage.PREPARE, Kind.INFER, n),)
        raise JobError(f"job: unknown role {role!r}")

    def to_dict(self) -> dict:
        d = {
            "algorithm": self.algorithm,
            "models": dict(self.models),
            "prompt_len": self.prompt_len,
            "response_len": self.response_len,
            "global_batch": self.global_batch,
            "ppo_epochs": self.ppo_epochs,
            "mini_batches": self.mini_batches,
        }
        if self.dataflow.grouped:
            d["n_samples"] = self.n_samples
        d.update(self.lengths.to_dict())
        if self.rule_roles and self.rule_cpu_s != RULE_CPU_S:
            d["rule_cpu_s"] = self.rule_cpu_s
        if self.prompt_mean:
            d["prompt_mean"] = self.prompt_mean
        return d

    @classmethod
    def from_dict(cls, d: object) -> Job:
        keys = {
            "algorithm",
            "models",
            "prompt_len",
            "response_len",
            "global_batch",
            "ppo_epochs",
            "mini_batches",
            "n_samples",
            "response_mean",
            "response_dist",
            "rule_cpu_s",
            "prompt_mean",
        }
        if not isinstance(d, dict) or not isinstance(d.get("models"), dict):
            raise JobError(f"job: expected a mapping with a models mapping, got {d!r}")
        if set(d) - keys or not {"algorithm", "prompt_len", "response_len", "global_batch"} <= set(
            d
        ):
            raise JobError(
                f"job: expected keys among {', '.join(sorted(keys))} "
                f"(algorithm, models, prompt_len, response_len, global_batch required)"
            )
        dist = d.get("response_dist", [])
        if not isinstance(dist, list):
            raise JobError(
                f"job: response_dist must be a list of [length, weight] pairs, got {dist!r}"
            )
        _check_numbers(d, dist)
        return cls(
            d["algorithm"],
            tuple(d["models"].items()),
            d["prompt_len"],
            d["response_len"],
            d["global_batch"],
            d.get("ppo_epochs", 1),
            d.get("mini_batches", 1),
            d.get("n_samples", 1),
            d.get("response_mean", 0.0),
            tuple(dist),
            d.get("rule_cpu_s", RULE_CPU_S),
            d.get("prompt_mean", 0.0),
        )

    @classmethod
    def create(
        cls,
        algorithm: str,
        model: str,
        prompt_len: int,
        response_len: int,
        global_batch: int,
        ppo_epochs: int = 1,
        mini_batches: int = 1,
        n_samples: int | None = None,
        response_mean: float = 0.0,
        rule_cpu_s: float = RULE_CPU_S,
        prompt_mean: float = 0.0,
        **role_models: str | None,
    ) -> Job:
        """`model` for every role unless role_models names another (critic, reference,
        reward, cost; cost_critic follows critic); "rule" for reward or cost: a function."""
        unknown = set(role_models) - {"critic", "reference", "reward", "cost"}
        if unknown:
            raise JobError(f"job: unknown role option(s) {', '.join(sorted(unknown))}")
        algo = vocab.algorithm(algorithm, JobError)
        chosen: dict[str, str | None] = {r: m for r, m in role_models.items() if m}
        chosen.setdefault("cost_critic", chosen.get("critic"))
        models = tuple((r, chosen.get(r) or model) for r in algo.roles)
        extra = set(chosen) - set(algo.roles) - {"cost_critic"}
        if extra:
            raise JobError(f"job: {algorithm} has no {', '.join(sorted(extra))} role")
        if n_samples is None:
            n_samples = algo.default_samples
        return cls(
            algorithm,
            models,
            prompt_len,
            response_len,
            global_batch,
            ppo_epochs,
            mini_batches,
            n_samples,
            response_mean,
            (),
            rule_cpu_s,
            prompt_mean,
        )
