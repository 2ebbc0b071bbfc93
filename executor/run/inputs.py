"""What a run starts from: each role's Hugging Face folder, the prompts (training and
held-out) as token ids, the pad id, and the rules that score responses.

Two sources give the same :class:`JobInputs`: the built-in task (its cached artifacts; their
prompts a JSONL file read by the loader a user's data goes through) and a user's job (the
plan's model folders, ``--data``, ``--reward-fn``). The runtime and the loops see only
JobInputs. Every check here runs on the controller, before any worker starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from hybridflow.errors import UserError
from hybridflow.executor.run.config import DataConfig
from hybridflow.plan import Plan
from hybridflow.vocab import LM_ROLES, VALUE_ROLES, Role

if TYPE_CHECKING:
    from hybridflow.executor.task.artifacts import Artifacts

Ref = tuple[str, int]  # (split "train" | "eval", index of the prompt in it)
SCORE, COST = "score", "cost"


class InputError(UserError):
    """A model folder, data file or rule that a run cannot start from."""


class Rules(Protocol):
    """The rule score and cost of responses, by the prompts they answer."""

    def has(self, kind: str) -> bool: ...

    def score(self, kind: str, refs: Sequence[Ref], responses: Sequence[list[int]]) -> list[float]:
        """`kind` "score" or "cost"; `responses` the token ids of each (through its EOS)."""
        ...

    def close(self) -> None: ...


@dataclass
class JobInputs:
    init_dirs: dict[str, str]  # role -> the Hugging Face folder its weights start from
    rollout_dir: str  # the folder vLLM starts from (the actor's; weights then resharded in)
    tokenizer_dir: str  # copied into exported actors
    train: tuple[tuple[int, ...], ...]
    eval: tuple[tuple[int, ...], ...]
    pad: int
    rules: Rules
    counts: dict = field(default_factory=dict)  # prompts read, truncated (the summary's)

    def __post_init__(self) -> None:
        if not self.train:
            raise InputError("no training prompts")

    def pool(self, split: str) -> tuple[tuple[int, ...], ...]:
        return self.train if split == "train" else self.eval

    def close(self) -> None:
        self.rules.close()


# ---- the built-in task -------------------------------------------------------------------
def role_init_dir(art, role: str) -> str:
    """The task artifact a role starts from: the SFT actor for LM roles, else the reward or
    cost model (critics start from the model they learn the values of)."""
    if role in LM_ROLES:
        return str(art.actor_dir)
    return str(art.cost_dir if role in (Role.COST, Role.COST_CRITIC) else art.reward_dir)


@dataclass
class TaskRules:
    """The built-in task's rules (partial credit, forbidden-letter share) on its prompts."""

    art: object
    train: tuple[tuple[int, ...], ...]
    eval: tuple[tuple[int, ...], ...]

    def has(self, kind: str) -> bool:
        return kind in (SCORE, COST)

    def score(self, kind: str, refs: Sequence[Ref], responses: Sequence[list[int]]) -> list[float]:
        fn = self.art.score if kind == SCORE else self.art.cost  # type: ignore[attr-defined]
        pools = {"train": self.train, "eval": self.eval}
        return [fn(pools[s][i], r) for (s, i), r in zip(refs, responses)]

    def close(self) -> None:
        pass


def task_inputs(plan: Plan, seed: int, art: Artifacts | None = None) -> JobInputs:
    """The built-in task's artifacts (`art`, or the plan's, built first if not cached) as
    a run's inputs."""
    from hybridflow.executor.task.artifacts import ensure_artifacts, prompt_records

    if art is None:
        art = ensure_artifacts(model=plan.job.model(plan.job.gpu_roles[0]), seed=seed)
    train, evals = (
        tuple(tuple(art.encode_prompt(r.prompt)) for r in prompt_records(art, split))
        for split in ("train", "eval")
    )
    return JobInputs(
        init_dirs={r: role_init_dir(art, r) for r in plan.job.gpu_roles},
        rollout_dir=str(art.actor_dir),
        tokenizer_dir=str(art.root / "tokenizer"),
        train=train,
        eval=evals,
        pad=art.special.pad,
        rules=TaskRules(art, train, evals),
        counts={"prompts": len(train), "eval_prompts": len(evals), "truncated": 0},
    )


# ---- a user's job ------------------------------------------------------------------------
def model_folders(plan: Plan) -> dict[str, str]:
    """Each GPU role's folder, as the plan names it; refused unless every one is a folder."""
    job = plan.job
    out = {r: job.model(r) for r in job.gpu_roles}
    not_dirs = {r: m for r, m in out.items() if not Path(m).is_dir()}
    if not_dirs:
        r, m = next(iter(not_dirs.items()))
        raise InputError(
            f"--data runs the plan's own models, but the {r} model {m!r} is not a Hugging "
            f"Face checkpoint folder (plan with --model DIR; the built-in task runs without "
            f"--data)"
        )
    return out


def check_models(plan: Plan, folders: dict[str, str]) -> None:
    """Each folder's config, architecture and weights (headers only), as its role needs."""
    from hybridflow.executor.engines.hf_folder import check_folder

    for role, folder in folders.items():
        check_folder(folder, value_head=role in VALUE_ROLES, critic=role in _CRITICS)


_CRITICS = (Role.CRITIC, Role.COST_CRITIC)


def user_inputs(plan: Plan, data: DataConfig) -> JobInputs:
    """A user's job: the plan's folders, the data files, the rules; all checked here."""
    from hybridflow.executor.data import prompts as P
    from hybridflow.executor.run.user_rules import UserRules, check_tokenizers

    assert data.data is not None
    folders = model_folders(plan)
    check_models(plan, folders)
    actor = folders[Role.ACTOR]
    check_tokenizers(actor, folders)
    job = plan.job
    sets = {
        split: P.tokenize_prompts(
            P.load_records(path, data.prompt_key, data.answer_key),
            actor,
            job.prompt_len,
            chat_template=data.chat_template,
            overlong=data.overlong,
        )
        for split, path in (("train", data.data), ("eval", data.eval_data))
        if path is not None
    }
    rules = UserRules.create(job, data, actor, sets)
    train = sets["train"]
    evals = sets.get("eval")
    return JobInputs(
        init_dirs=folders,
        rollout_dir=actor,
        tokenizer_dir=actor,
        train=tuple(ids for ids, _ in train.items),
        eval=tuple(ids for ids, _ in evals.items) if evals else (),
        pad=P.pad_id(actor),
        rules=rules,
        counts={
            "prompts": train.count,
            "eval_prompts": evals.count if evals else 0,
            "truncated": train.truncated + (evals.truncated if evals else 0),
        },
    )


def job_inputs(plan: Plan, data: DataConfig, seed: int) -> JobInputs:
    """The inputs of a run: a user's job with --data, else the built-in task."""
    return user_inputs(plan, data) if data.user_job else task_inputs(plan, seed)
