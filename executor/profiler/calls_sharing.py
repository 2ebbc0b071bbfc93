"""How the executor's own calls slow each other when sets of a plan run at once on one
host: the `sharing.slowdown` factors of a profile with per-call tables (executor.profiler.sharing
measures the kernel factors used without them)."""

from __future__ import annotations

import statistics

from hybridflow.executor.profiler.calls_grid import (
    CallsGrid,
    role_engine_config,
    role_loss,
    sequence_batch,
)
from hybridflow.layout import ParallelLayout
from hybridflow.simulator.architecture import ModelSpec


def _together(groups: list, calls: list[tuple[str, tuple]]) -> float:
    """Each of `calls` issued to every group at once: the groups' mean own seconds."""
    for method, args in calls:
        for f in [g.call("lm", method, *args) for g in groups]:
            f.result()
    own = [sum(c["seconds"] for c in g.run(None, "take_seconds")[0]) for g in groups]
    return statistics.fmean(own)


def measure_concurrency(
    ranks, grid: CallsGrid, spec: ModelSpec, n: int, rounds: int = 7
) -> dict[int, float]:
    """{c: slowdown} of the executor's calls when c one-rank sets call at once (c = 1..n),
    as concurrent sets of a plan do: a forward and a train call of an LM on each set (one
    worker group per process of the RankPool `ranks`), the c sets' mean own seconds over
    one set's alone, interleaved rounds (1, 2, .., n sets, then again), the mean over rounds
    (as the call tables: hybridflow.executor.profiler.calls); never decreasing with c."""
    groups: list = []
    with ranks.lent(groups):
        for i in range(n):
            groups.append(ranks.group([i], f"profile-share-{i}"))
            groups[-1].add_role(
                "lm", grid.model, ParallelLayout(1, 1, 1), role_engine_config(False)
            )
        s = grid.sequences[len(grid.sequences) // 2]
        batch = sequence_batch(s, grid, spec.vocab)
        calls = [
            ("profile_outputs", (batch, "out")),
            ("profile_update", (batch, role_loss(grid, False), 1, 1)),
        ]
        _together(groups, calls)  # warm-up: lazy set-up on every set
        got: dict[int, list[float]] = {c: [] for c in range(1, n + 1)}
        for _ in range(rounds):
            for c in range(1, n + 1):
                got[c].append(_together(groups[:c], calls))
    alone = statistics.fmean(got[1])
    out, low = {}, 1.0
    for c in range(1, n + 1):
        low = out[c] = max(low, statistics.fmean(got[c]) / alone)
    return out
