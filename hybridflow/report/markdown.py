"""Markdown building blocks shared by the run report and the placement comparison."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path


def fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def percent(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:+.1f}%"


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; cells already strings are kept as they are."""

    def cell(v: object) -> str:
        return (v if isinstance(v, str) else fmt(v)).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def image(title: str, filename: str) -> str:
    return f"![{title}]({filename})"


def emit(text: str, out: str | None) -> None:
    """Print a benchmark's text and, with `out`, write it there (folders made)."""
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
