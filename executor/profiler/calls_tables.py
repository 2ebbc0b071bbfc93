"""The profile's `calls:` section (format: profiles/README.md) from the rows that
hybridflow.executor.profiler.calls measures: rows of one size (one per sweep) pooled into their mean
(their median with three sweeps or more), and each table made never to decrease with the
work it times."""

from __future__ import annotations

import statistics

from hybridflow.executor.profiler.calls_grid import CallsGrid
from hybridflow.executor.run.config import RunConfig


def pool(values: list[float]) -> float:
    """Measurements of one quantity taken at other times (rows of one size, one per sweep;
    `hybridflow profile --merge`'s profiles): with three or more their median (one taken in a
    slow phase of the host, which lasts minutes on this VM, is left out, as fidelity.py's
    median over passes leaves out a slow run), else their mean."""
    return statistics.median(values) if len(values) >= 3 else statistics.fmean(values)


def _pool_by(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """One row per distinct `keys`, each other column pooled (pool)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return [
        {**dict(zip(keys, key)), **{c: pool([r[c] for r in rs]) for c in rs[0] if c not in keys}}
        for key, rs in sorted(groups.items())
    ]


def isotonic(values: list[float]) -> list[float]:
    """The non-decreasing sequence nearest `values` in least squares (pool adjacent
    violators): a run of values that decreases is replaced by its mean."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, n in blocks for _ in range(int(n))]


def _monotone(rows: list[dict], keys: tuple[str, ...], cols: tuple[str, ...]) -> list[dict]:
    """Rows whose `cols` never decrease with `sequences` within a group of equal `keys`
    (more work never takes less time): the isotonic fit of each column, after rows of the
    same size (one per sweep) are pooled (pool)."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in _pool_by(rows, keys + ("sequences",)):
        groups.setdefault(tuple(r[k] for k in keys), []).append(dict(r))
    for key in sorted(groups):
        series = sorted(groups[key], key=lambda r: r["sequences"])
        for col in cols:
            for r, v in zip(series, isotonic([r[col] for r in series])):
                r[col] = v
        out += series
    return out


def calls_section(measured: dict[str, list[dict]], grid: CallsGrid) -> dict:
    """The profile's `calls:` table (format: profiles/README.md) from measure_calls rows."""
    cfg = RunConfig()
    return {
        "model": grid.model,
        "prompt_len": grid.prompt_len,
        "response_len": grid.response_len,
        "micro_batch": cfg.micro_batch_size,
        "scheme": cfg.reshard,
        "forward": _monotone(measured["forward"], ("ranks", "tp", "pp"), ("seconds",)),
        **{
            name: _monotone(measured[name], ("ranks", "tp", "pp"), ("seconds",))
            for name in ("train_step", "forward_value", "train_step_value")
        },
        "generate": _monotone(
            measured["generate"], ("ranks", "tg", "micro_dp", "tokens"), ("seconds", "vllm_s")
        ),
        "reshard": _pool_by(measured["reshard"], ("ranks", "tg", "micro_dp")),
        "dispatch": {
            kind: _monotone(measured[f"dispatch_{kind}"], ("ranks",), ("seconds",))
            for kind in ("forward", "train", "generate")
        },
    }
