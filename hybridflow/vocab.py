"""The vocabulary every package shares: stages, roles, what a role does, and the algorithms.

An algorithm is registered once (:func:`register`) with its roles and the few facts of its
dataflow the simulator, planner and executor read (grouped samples, a greedy baseline, where
its KL term goes); the executor adds its loop (``executor.rl.loops``) and its advantage
estimator (``executor.rl.algorithms``) under the same name.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from hybridflow.errors import UserError


class Stage(StrEnum):
    """The stages of one iteration, in the order plans and predictions list them."""

    GENERATE = "generate"
    PREPARE = "prepare"
    TRAIN = "train"
    RESHARD = "reshard"


STAGES: tuple[Stage, ...] = tuple(Stage)


class Role(StrEnum):
    ACTOR = "actor"
    CRITIC = "critic"
    REFERENCE = "reference"
    REWARD = "reward"
    COST = "cost"
    COST_CRITIC = "cost_critic"


ROLES: tuple[Role, ...] = tuple(Role)
LM_ROLES = frozenset({Role.ACTOR, Role.REFERENCE})  # language-model head
VALUE_ROLES = frozenset({Role.CRITIC, Role.REWARD, Role.COST, Role.COST_CRITIC})  # scalar head
TRAINED_ROLES = frozenset({Role.ACTOR, Role.CRITIC, Role.COST_CRITIC})
CRITIC_ROLES = TRAINED_ROLES - {Role.ACTOR}
RULE_ROLES = frozenset({Role.REWARD, Role.COST})  # may be a rule instead of a model
RULE = "rule"  # a reward or cost computed by a function on the controller's CPU: no GPUs


class Kind(StrEnum):
    """What a role does in a stage; generate, infer and train also name its layouts."""

    GENERATE = "generate"
    INFER = "infer"
    TRAIN = "train"
    RULE = "rule"


# An asynchronous plan's generation engines: a role of its own, in a set of its own
# (hybridflow.pipeline); beside it only inference roles, whose forward passes then score
# each rollout batch on the rollout side
ROLLOUT = "rollout"
INFER_ROLES = frozenset({Role.REFERENCE, Role.REWARD, Role.COST})
SCORING_ROLES = frozenset({Role.REWARD, Role.COST})  # what the planner puts beside it


def layout_kinds(role: str, asynchronous: bool = False) -> tuple[Kind, ...]:
    """The layouts a role needs: the actor trains and generates (in an asynchronous plan it
    only trains; the rollout generates), critics train (and infer with the same layout),
    the others only infer."""
    if role == ROLLOUT:
        return (Kind.GENERATE,)
    if role == Role.ACTOR:
        return (Kind.TRAIN,) if asynchronous else (Kind.TRAIN, Kind.GENERATE)
    return (Kind.TRAIN,) if role in TRAINED_ROLES else (Kind.INFER,)


@dataclass(frozen=True)
class Algorithm:
    """One RL algorithm's dataflow, as the packages read it."""

    name: str
    roles: tuple[Role, ...]
    grouped: bool = False  # n >= 2 responses per prompt, scored against their group
    default_samples: int = 1  # responses per prompt when the job does not say
    greedy_baseline: bool = False  # a greedy response per prompt, scored as the baseline
    kl_in_loss: bool = False  # the KL to the reference is a loss term, not a token reward

    def __post_init__(self) -> None:
        assert self.roles and self.roles[0] == Role.ACTOR, "the actor comes first"
        assert self.grouped or self.default_samples == 1

    @property
    def critics(self) -> tuple[Role, ...]:
        """The value models it trains beside the actor."""
        return tuple(r for r in self.roles if r in CRITIC_ROLES)


ALGORITHMS: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    assert algorithm.name not in ALGORITHMS, f"{algorithm.name} is registered twice"
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def _unknown_algorithm(name: object) -> str:
    return f"unknown algorithm {name!r}: choose one of {', '.join(ALGORITHMS)}"


def algorithm(name: str, error: type[Exception] = UserError) -> Algorithm:
    """The registered algorithm `name`; `error` (a UserError) names the known ones."""
    try:
        return ALGORITHMS[name]
    except (KeyError, TypeError):
        raise error(_unknown_algorithm(name)) from None


_PPO_ROLES = (Role.ACTOR, Role.CRITIC, Role.REFERENCE, Role.REWARD)
register(Algorithm("ppo", _PPO_ROLES))
register(
    Algorithm(
        "grpo",
        (Role.ACTOR, Role.REFERENCE, Role.REWARD),
        grouped=True,
        default_samples=4,
        kl_in_loss=True,
    )
)
register(Algorithm("remax", (Role.ACTOR, Role.REFERENCE, Role.REWARD), greedy_baseline=True))
register(Algorithm("safe-rlhf", _PPO_ROLES + (Role.COST, Role.COST_CRITIC)))
