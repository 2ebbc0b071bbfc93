"""Read and validate run directories written by `hybridflow run`.

A run dir holds ``summary.json`` = {"plan": {...}, "measured": TIMES, "predicted": TIMES} with
TIMES = {"iteration_s", "tokens_per_s", "stages": {"generate", "reshard", "prepare", "train"}},
and optionally ``metrics.jsonl`` (one JSON object per iteration). Nothing is recomputed here:
the run's measurement and the simulator's prediction are taken as written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from hybridflow.errors import UserError, unreadable
from hybridflow.vocab import STAGES  # noqa: E402

METRIC_KEYS = ("iteration", "stages", "tokens_per_s", "reward", "score", "kl")


class RunDirError(UserError):
    """A run directory, summary or metrics file that cannot be read as a run."""


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RunDirError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise RunDirError(f"{where} must be finite and >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Times:
    """Seconds per iteration, per stage, and throughput: one side (measured or predicted)."""

    iteration_s: float
    tokens_per_s: float
    stages: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [s for s in STAGES if s not in self.stages]
        if missing:
            raise RunDirError(f"stages lack {', '.join(missing)}")
        for name, value in (
            ("iteration_s", self.iteration_s),
            ("tokens_per_s", self.tokens_per_s),
            *self.stages.items(),
        ):
            _number(value, name)

    @classmethod
    def from_dict(cls, data: object, where: str) -> Times:
        if not isinstance(data, dict):
            raise RunDirError(f"{where} must be an object with iteration_s, tokens_per_s, stages")
        missing = [k for k in ("iteration_s", "tokens_per_s", "stages") if k not in data]
        if missing:
            raise RunDirError(f"{where} lacks {', '.join(missing)}")
        stages = data["stages"]
        if not isinstance(stages, dict):
            raise RunDirError(f"{where}.stages must be an object, got {stages!r}")
        missing = [s for s in STAGES if s not in stages]
        if missing:
            raise RunDirError(f"{where}.stages lacks {', '.join(missing)}")
        return cls(
            _number(data["iteration_s"], f"{where}.iteration_s"),
            _number(data["tokens_per_s"], f"{where}.tokens_per_s"),
            {s: _number(stages[s], f"{where}.stages.{s}") for s in STAGES},
        )


@dataclass(frozen=True)
class Run:
    path: Path
    plan: dict
    measured: Times
    predicted: Times
    metrics: tuple[dict, ...] = ()
    label: str = ""
    terms: tuple[tuple[str, str, str, float, str], ...] = ()  # role, stage, term, s, source
    notes: tuple[tuple[str, str], ...] = ()  # other scalar keys the run wrote, as written

    def __post_init__(self) -> None:
        if not isinstance(self.plan, dict):
            raise RunDirError(f"{self.path}: summary.json 'plan' must be an object")
        if not self.label:
            object.__setattr__(self, "label", plan_label(self.plan) or self.path.name)

    def with_label(self, label: str) -> Run:
        return Run(
            self.path,
            self.plan,
            self.measured,
            self.predicted,
            self.metrics,
            label,
            self.terms,
            self.notes,
        )


def _notes(summary: dict) -> tuple[tuple[str, str], ...]:
    """Scalar keys of measured/predicted beside the standard ones (e.g. the profile the
    prediction used, iterations, first and last score)."""
    out = []
    for side in ("measured", "predicted"):
        for key, value in summary[side].items():
            if (
                key not in ("iteration_s", "tokens_per_s", "stages")
                and isinstance(value, (str, int, float))
                and not isinstance(value, bool)
            ):
                out.append((f"{side} {key}", value if isinstance(value, str) else f"{value:.4g}"))
    return tuple(out)


def _terms(predicted: dict, where: str) -> tuple[tuple[str, str, str, float, str], ...]:
    """The prediction's named terms ({role: {stage: {term: seconds}}}) where the run wrote
    them, with {role: {stage: {term: source}}} from "sources" where present."""
    terms, sources = predicted.get("terms"), predicted.get("sources") or {}
    if terms is None:
        return ()
    if not isinstance(terms, dict) or not all(isinstance(v, dict) for v in terms.values()):
        raise RunDirError(f"{where}.terms must map role -> stage -> term -> seconds")
    rows = []
    for role, stages in terms.items():
        for stage, named in stages.items():
            if not isinstance(named, dict):
                raise RunDirError(f"{where}.terms.{role}.{stage} must map term -> seconds")
            src = ((sources.get(role) or {}).get(stage) or {}) if isinstance(sources, dict) else {}
            rows += [
                (
                    role,
                    stage,
                    term,
                    _number(v, f"{where}.terms.{role}.{stage}.{term}"),
                    str(src.get(term, "")) if isinstance(src, dict) else "",
                )
                for term, v in named.items()
            ]
    return tuple(rows)


def plan_label(plan: dict) -> str:
    """A short human name for a plan: algorithm, then each set as roles@GPUs."""
    sets = plan.get("sets")
    if not isinstance(sets, list):
        return ""
    parts = []
    for s in sets:
        if isinstance(s, dict) and isinstance(s.get("models"), list):
            parts.append("+".join(map(str, s["models"])) + f"@{s.get('gpus', '?')}")
    algorithm = (
        (plan.get("job") or {}).get("algorithm", "") if isinstance(plan.get("job"), dict) else ""
    )
    return (f"{algorithm} " if algorithm else "") + " | ".join(parts)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"run dir {str(path.parent)!r} has no {path.name}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise unreadable("run dir file", path, e) from None


def _read_metrics(path: Path) -> tuple[dict, ...]:
    if not path.exists():
        return ()
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunDirError(f"{path}:{n} is not valid JSON: {e}") from None
        if not isinstance(row, dict) or "iteration" not in row:
            raise RunDirError(f"{path}:{n} must be an object with an 'iteration' key")
        if "event" not in row:  # a restart record, not an iteration's metrics
            rows.append(row)
    return tuple(rows)


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.exists():
        raise RunDirError(f"run dir {str(path)!r} does not exist")
    if not path.is_dir():
        raise RunDirError(f"run dir {str(path)!r} is not a directory")
    summary = _read_json(path / "summary.json")
    where = str(path / "summary.json")
    if not isinstance(summary, dict):
        raise RunDirError(f"{where} must be a JSON object")
    missing = [k for k in ("plan", "measured", "predicted") if k not in summary]
    if missing:
        raise RunDirError(f"{where} lacks {', '.join(missing)}")
    measured = Times.from_dict(summary["measured"], f"{where}: measured")
    predicted = Times.from_dict(summary["predicted"], f"{where}: predicted")
    if not isinstance(summary["plan"], dict):
        raise RunDirError(f"{where}: 'plan' must be an object")
    return Run(
        path,
        summary["plan"],
        measured,
        predicted,
        _read_metrics(path / "metrics.jsonl"),
        terms=_terms(summary["predicted"], f"{where}: predicted"),
        notes=_notes(summary),
    )


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Load every run dir; labels are made unique by appending the dir name where plans repeat."""
    if not paths:
        raise RunDirError("no run dirs given")
    runs = [load_run(p) for p in paths]
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.label] = counts.get(r.label, 0) + 1
    out = [r.with_label(f"{r.label} ({r.path.name})") if counts[r.label] > 1 else r for r in runs]
    if len({r.label for r in out}) != len(out):
        out = [r.with_label(f"{r.label} [{i}]") for i, r in enumerate(out)]
    return out


def relative_error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured; NaN where nothing was measured but time predicted."""
    if measured == 0:
        return 0.0 if predicted == 0 else math.nan
    return (predicted - measured) / measured


def runs_frame(runs: list[Run]):
    """The runs.csv table: one row per run and stage (the four stages, then iteration)."""
    import pandas as pd

    rows = []
    for r in runs:
        pairs: list[tuple[str, float, float]] = [
            (s, r.predicted.stages[s], r.measured.stages[s]) for s in STAGES
        ]
        pairs.append(("iteration", r.predicted.iteration_s, r.measured.iteration_s))
        rows += [
            {
                "plan": r.label,
                "stage": s,
                "predicted_s": p,
                "measured_s": m,
                "error": relative_error(p, m),
            }
            for s, p, m in pairs
        ]
    return pd.DataFrame(rows, columns=["plan", "stage", "predicted_s", "measured_s", "error"])


def throughput_frame(runs: list[Run]):
    """Predicted and measured tokens/s per run (the paper's definition, as the run wrote it)."""
    import pandas as pd

    rows = [
        {
            "plan": r.label,
            "predicted_tokens_per_s": r.predicted.tokens_per_s,
            "measured_tokens_per_s": r.measured.tokens_per_s,
            "error": relative_error(r.predicted.tokens_per_s, r.measured.tokens_per_s),
        }
        for r in runs
    ]
    return pd.DataFrame(
        rows, columns=["plan", "predicted_tokens_per_s", "measured_tokens_per_s", "error"]
    )
