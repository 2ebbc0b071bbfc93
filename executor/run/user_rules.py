"""A user's job's rules: responses decoded by the actor's tokenizer and scored by the user's
function (or a built-in rule) in processes on the controller, with each prompt's record
(data_source, ground truth, extra_info) as verl passes them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridflow.executor.data.prompts import TOKENIZER_FILES, load_tokenizer
from hybridflow.executor.run.config import DataConfig
from hybridflow.executor.run.inputs import COST, SCORE, InputError, Ref
from hybridflow.simulator.job import Job
from hybridflow.vocab import Role


def check_tokenizers(actor: str, folders: dict[str, str]) -> None:
    """Every model scores the actor's token ids as they are (no re-tokenization): a folder
    with a tokenizer of its own must have the actor's vocabulary, and every model's
    embedding must hold every id of it."""
    from hybridflow.simulator.model import load_model

    tok = load_tokenizer(actor)
    vocab = tok.get_vocab()
    for role, folder in folders.items():
        has_own = any((Path(folder) / f).exists() for f in TOKENIZER_FILES)
        if folder != actor and has_own and load_tokenizer(folder).get_vocab() != vocab:
            raise InputError(
                f"the {role} model's tokenizer ({folder}) differs from the actor's "
                f"({actor}): every role reads the actor's token ids, so they must share it"
            )
        rows = load_model(folder).vocab
        if rows < len(tok):
            raise InputError(
                f"the {role} model ({folder}) has {rows} embedding rows, fewer than the "
                f"actor's tokenizer's {len(tok)} tokens"
            )


@dataclass
class UserRules:
    """Rule score and cost of a user's job (either may be absent: a learned model scores)."""

    tokenizer: Any
    records: dict[str, list[Any]]  # split -> the Record of each prompt, in order
    scorers: dict[str, Any]  # "score" | "cost" -> RewardScorer

    @classmethod
    def create(cls, job: Job, data: DataConfig, actor: str, sets: dict[str, Any]) -> UserRules:
        from hybridflow.executor.data.rewards import RewardScorer

        needs = {SCORE: Role.REWARD, COST: Role.COST}
        given = {SCORE: data.reward_fn, COST: data.cost_fn}
        for kind, role in needs.items():
            if role in dict(job.models) and job.is_rule(role) and not given[kind]:
                flag = "--reward-fn" if kind == SCORE else "--cost-fn"
                raise InputError(
                    f"the plan's {role} is a rule: say which with {flag} FILE.py:NAME "
                    f"(or a built-in rule: exact, math)"
                )
        scorers = {k: RewardScorer(v, data.reward_processes) for k, v in given.items() if v}
        records = {split: [rec for _, rec in s.items] for split, s in sets.items()}
        return cls(load_tokenizer(actor), records, scorers)

    def has(self, kind: str) -> bool:
        return kind in self.scorers

    def score(self, kind: str, refs: Sequence[Ref], responses: Sequence[list[int]]) -> list[float]:
        from hybridflow.executor.data.prompts import decode
        from hybridflow.executor.data.rewards import Sample

        samples = []
        for (split, i), ids in zip(refs, responses):
            rec = self.records[split][i]
            samples.append(
                Sample(
                    index=rec.index,
                    data_source=rec.data_source,
                    solution_str=decode(self.tokenizer, ids),
                    ground_truth=rec.answer,
                    extra_info=rec.extra_info,
                )
            )
        return self.scorers[kind].score(samples)

    def close(self) -> None:
        for s in self.scorers.values():
            s.close()
