"""The built-in offline task: short string transformations with a checkable answer.

A prompt is ``"rev:cadb="`` (reverse the letters) or ``"sort:cadb="`` (sort them); the answer is
``"bdac"`` or ``"abcd"`` followed by EOS. Letters are distinct, drawn from a small alphabet, so
a tiny transformer learns the task in minutes on a CPU. Everything is a pure function of the
text and a seed: the answer is recomputed from the prompt, nothing is looked up.

Rules (the ground truth RL is judged by):
- ``score``: positional partial credit in [0, 1]; 1 only for the exact answer.
- ``cost``: the share of the response's characters that are the forbidden letter, in [0, 1];
  the constraint of the Safe-RLHF variant (the forbidden letter can be part of a correct
  answer, so reward and cost pull against each other).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from hybridflow.errors import UserError

OPS = ("rev", "sort")
_PROMPT_RE = re.compile(r"^(rev|sort):([a-z]+)=$")


class TaskError(UserError):
    """A task setting or prompt that cannot be used."""


@dataclass(frozen=True)
class TaskConfig:
    alphabet: str = "abcdefghij"
    min_len: int = 3
    max_len: int = 6
    ops: tuple[str, ...] = OPS
    forbidden: str = "j"

    def __post_init__(self) -> None:
        if (
            len(set(self.alphabet)) != len(self.alphabet)
            or not self.alphabet.isalpha()
            or not self.alphabet.islower()
        ):
            raise TaskError(f"alphabet must be distinct lower-case letters, got {self.alphabet!r}")
        if not 1 <= self.min_len <= self.max_len <= len(self.alphabet):
            raise TaskError(
                f"need 1 <= min_len <= max_len <= {len(self.alphabet)} "
                f"(alphabet size), got {self.min_len}, {self.max_len}"
            )
        if not self.ops or any(op not in OPS for op in self.ops):
            raise TaskError(f"ops must be a non-empty subset of {OPS}, got {self.ops!r}")
        if self.forbidden not in self.alphabet:
            raise TaskError(f"forbidden letter {self.forbidden!r} is not in the alphabet")

    @property
    def max_answer_len(self) -> int:
        return self.max_len

    def to_dict(self) -> dict:
        return {
            "alphabet": self.alphabet,
            "min_len": self.min_len,
            "max_len": self.max_len,
            "ops": list(self.ops),
            "forbidden": self.forbidden,
        }


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


def answer_of(op: str, letters: str) -> str:
    if op == "rev":
        return letters[::-1]
    if op == "sort":
        return "".join(sorted(letters))
    raise TaskError(f"unknown op {op!r}; expected one of {OPS}")


def parse_prompt(prompt: str) -> tuple[str, str]:
    """``"rev:abc="`` -> ``("rev", "abc")``."""
    m = _PROMPT_RE.match(prompt)
    if not m:
        raise TaskError(f"not a task prompt: {prompt!r} (expected e.g. 'rev:abc=')")
    return m.group(1), m.group(2)


def target(prompt: str) -> str:
    return answer_of(*parse_prompt(prompt))


def make_examples(n: int, seed: int, cfg: TaskConfig = TaskConfig()) -> list[Example]:
    """``n`` prompts with their answers, the same for the same seed."""
    if n < 0:
        raise TaskError(f"number of examples must be >= 0, got {n}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        op = rng.choice(cfg.ops)
        letters = "".join(rng.sample(cfg.alphabet, rng.randint(cfg.min_len, cfg.max_len)))
        out.append(Example(f"{op}:{letters}=", answer_of(op, letters)))
    return out


def score(prompt: str, response: str) -> float:
    """Share of answer positions right: matches / max(len(answer), len(response))."""
    t = target(prompt)
    denom = max(len(t), len(response))
    if denom == 0:
        return 1.0
    return sum(a == b for a, b in zip(t, response)) / denom


def cost(response: str, cfg: TaskConfig = TaskConfig()) -> float:
    """Share of the response's characters that are the forbidden letter (0 for empty)."""
    if not response:
        return 0.0
    return response.count(cfg.forbidden) / len(response)


def corrupt(answer: str, edits: int, rng: random.Random, cfg: TaskConfig = TaskConfig()) -> str:
    """``answer`` after ``edits`` random substitutions, deletions, insertions or swaps."""
    s = list(answer)
    for _ in range(edits):
        kind = rng.choice(("sub", "del", "ins", "swap"))
        if kind == "sub" and s:
            s[rng.randrange(len(s))] = rng.choice(cfg.alphabet)
        elif kind == "del" and len(s) > 1:
            del s[rng.randrange(len(s))]
        elif kind == "swap" and len(s) > 1:
            i = rng.randrange(len(s) - 1)
            s[i], s[i + 1] = s[i + 1], s[i]
        elif len(s) < cfg.max_len + 2:
            s.insert(rng.randrange(len(s) + 1), rng.choice(cfg.alphabet))
    return "".join(s)


def preference_pairs(
    examples: list[Example], seed: int, cfg: TaskConfig = TaskConfig(), by: str = "score"
) -> list[tuple[str, str, str]]:
    """(prompt, better, worse) pairs: two corruptions of the answer, ranked by a rule.

    ``by="score"``: better has the higher rule score (reward-model data).
    ``by="cost"``: "better" has the higher rule cost (cost-model data: the model learns to
    output a cost, higher = worse). Ties are dropped.
    """
    if by not in ("score", "cost"):
        raise TaskError(f"preference rule must be 'score' or 'cost', got {by!r}")
    rng = random.Random(seed)
    pairs = []
    for ex in examples:
        a, b = (corrupt(ex.answer, rng.randint(0, 3), rng, cfg) for _ in range(2))
        if by == "cost":
            a, b = _with_forbidden(a, rng, cfg), _with_forbidden(b, rng, cfg)
            ra, rb = cost(a, cfg), cost(b, cfg)
        else:
            ra, rb = score(ex.prompt, a), score(ex.prompt, b)
        if ra != rb:
            pairs.append((ex.prompt, a, b) if ra > rb else (ex.prompt, b, a))
    return pairs


def _with_forbidden(s: str, rng: random.Random, cfg: TaskConfig) -> str:
    """Replace some characters by the forbidden letter so costs spread over [0, 1]."""
    chars = list(s)
    for i in range(len(chars)):
        if rng.random() < 0.25:
            chars[i] = cfg.forbidden
    return "".join(chars)
