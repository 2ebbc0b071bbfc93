"""Reward rules: built-in ones and a user's function with verl's signature,
``fn(data_source, solution_str, ground_truth, extra_info) -> float``, run in processes on the
controller's CPU.

Built-in: ``exact`` (whitespace-normalised equality) and ``math`` (the final answer of a math
response: the last ``\\boxed{...}``, else the number after the last ``####``, else the last
number; compared as numbers when both are, else as text). A function that raises, or returns
anything but a finite real number, stops the scoring with one line naming the sample's row.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from hybridflow.errors import UserError

RewardFn = Callable[[str, str, Any, dict], float]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
INLINE_BELOW = 8  # fewer samples than this are scored in the controller's own process


class RewardError(UserError):
    """A reward function that cannot be loaded, or that failed on a sample."""


@dataclass(frozen=True)
class Sample:
    index: int  # the prompt's row in its data file
    data_source: str
    solution_str: str
    ground_truth: Any
    extra_info: dict = field(default_factory=dict)


# ---- built-in rules ----------------------------------------------------------------------
def exact_match(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict) -> float:
    """1.0 when the response is the ground truth (whitespace normalised), else 0.0."""
    return float(" ".join(solution_str.split()) == " ".join(str(ground_truth).split()))


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def final_answer(text: str) -> str | None:
    """A math response's final answer: boxed, else after ``####``, else the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _number(s: str) -> float | None:
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(s)
    except ValueError:
        return None


def _truth(s: str) -> str:
    """A ground truth as given, or its boxed part, or what follows its last ``####``."""
    boxed = last_boxed(s)
    if boxed is not None:
        return boxed.strip()
    return s.rsplit("####", 1)[1].strip() if "####" in s else s.strip()


def math_answer(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict) -> float:
    """1.0 when the response's final answer equals the ground truth's (itself plain, in
    ``####`` or in ``\\boxed{}`` form), numerically where both are numbers."""
    got, want = final_answer(solution_str), _truth(str(ground_truth))
    if got is None:
        return 0.0
    a, b = _number(got), _number(want)
    if a is not None and b is not None:
        return float(math.isclose(a, b, rel_tol=0.0, abs_tol=1e-9))
    return float(" ".join(got.split()) == " ".join(want.split()))


RULES: dict[str, RewardFn] = {"exact": exact_match, "math": math_answer}


# ---- a user's function -------------------------------------------------------------------
def load_reward_fn(spec: str) -> RewardFn:
    """A built-in rule by name, or NAME from FILE.py ("FILE.py:NAME")."""
    if spec in RULES:
        return RULES[spec]
    file, sep, name = spec.rpartition(":")
    if not sep or not name:
        raise RewardError(
            f"reward function {spec!r}: expected FILE.py:NAME or a built-in rule "
            f"({', '.join(RULES)})"
        )
    path = Path(file)
    if path.suffix != ".py":
        raise RewardError(f"reward function {spec!r}: {file!r} is not a .py file")
    if not path.is_file():
        raise RewardError(f"reward function {spec!r}: {file} does not exist")
    module = _import(path, spec)
    fn = getattr(module, name, None)
    if fn is None:
        names = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise RewardError(
            f"reward function {spec!r}: {file} has no {name!r} (its functions: "
            f"{', '.join(names) or 'none'})"
        )
    if not callable(fn):
        raise RewardError(f"reward function {spec!r}: {name} is not callable")
    return fn


def _import(path: Path, spec: str) -> Any:
    mod_spec = importlib.util.spec_from_file_location(f"hybridflow_reward_{path.stem}", path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's code: one line, no traceback
        raise RewardError(
            f"reward function {spec!r}: importing {path} failed ({type(e).__name__}: {e})"
        ) from None
    return module


def call(fn: RewardFn, s: Sample) -> float:
    """`fn` on one sample; RewardError naming the row when it raises or returns a non-number."""
    try:
        v = fn(s.data_source, s.solution_str, s.ground_truth, s.extra_info)
    except Exception as e:  # noqa: BLE001 - the user's code: one line, no traceback
        raise RewardError(
            f"the reward function raised on the sample of row {s.index} "
            f"(data_source {s.data_source!r}): {type(e).__name__}: {e}"
        ) from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RewardError(
            f"the reward function returned {v!r} for the sample of row {s.index}: "
            f"expected a finite number"
        )
    return float(v)


# ---- scoring in processes ----------------------------------------------------------------
_WORKER_FN: RewardFn | None = None


def _init_worker(spec: str) -> None:
    global _WORKER_FN
    _WORKER_FN = load_reward_fn(spec)


def _score_chunk(samples: list[Sample]) -> list[float]:
    assert _WORKER_FN is not None
    return [call(_WORKER_FN, s) for s in samples]


class RewardScorer:
    """Scores samples with one rule, in `processes` spawned processes (each loads the
    function itself: it need not be picklable); one pool for the scorer's life."""

    def __init__(self, spec: str, processes: int = 2) -> None:
        self.spec, self.fn = spec, load_reward_fn(spec)  # errors here, before any worker
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None

    def score(self, samples: Sequence[Sample]) -> list[float]:
        if self.processes == 1 or len(samples) < INLINE_BELOW or self.spec in RULES:
            return [call(self.fn, s) for s in samples]
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.processes,
                mp_context=get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.spec,),
            )
        size = math.ceil(len(samples) / self.processes)
        chunks = [list(samples[i : i + size]) for i in range(0, len(samples), size)]
        return [v for part in self._pool.map(_score_chunk, chunks) for v in part]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
