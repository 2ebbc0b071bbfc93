"""A sweep's table (text, CSV, JSON) and plot (PNG: throughput and throughput per GPU vs
GPUs per placement, on linear axes from zero; 'x' where a placement does not fit; a line
that coincides with another drawn dashed over it and labelled so)."""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass, replace
from pathlib import Path

from hybridflow.errors import unreadable
from hybridflow.planner.sweep import ASYNC_LINE, Row, SweepResult

BEST = "HybridFlow (best plan)"


def _standard_names(result: SweepResult) -> list[str]:
    names: list[str] = []
    for row in result.rows:
        names += [n for n in row.standard if n not in names]
    return names


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isinf(x)) else format(x, spec)


def table(result: SweepResult) -> str:
    """The readable table printed by `hybridflow sweep`."""
    job = result.job
    mark = result.smallest_meeting_target
    lines = [
        f"{job['algorithm']} {job['models'].get('actor')}, prompt {job['prompt_len']} + "
        f"response {job['response_len']}, batch {job['global_batch']} on {result.gpu} "
        f"({result.gpus_per_node} per node); target: {result.target.describe()}",
        f"{'GPUs':>5} {'placement':<14} {'tokens/s':>10} {'iter s':>8} {'peak GiB':>8} "
        f"{'scaling':>7} {'GPU-h/1k':>9} {'async t/s':>10}  sets",
    ]
    for r in result.rows:
        if not r.feasible:
            lines.append(f"{r.gpus:>5} {'infeasible':<14} {r.reason}")
            continue
        star = "  <= smallest meeting target" if mark is not None and r.gpus == mark.gpus else ""
        lines.append(
            f"{r.gpus:>5} {r.category:<14} {r.tokens_per_s:>10,.0f} {r.iteration_s:>8.1f} "
            f"{r.peak_memory_gib:>8.1f} {r.scaling_efficiency:>7.0%} "
            f"{r.gpu_hours_per_1k_steps:>9,.0f} {_fmt(r.standard.get(ASYNC_LINE), ',.0f'):>10}"
            f"  {r.sets}{star}"
        )
    if result.target.given:
        lines.append(f"smallest count meeting the target: {mark.gpus if mark else 'none in range'}")
    return "\n".join(lines)


def to_json(result: SweepResult) -> dict:
    mark = result.smallest_meeting_target
    return {
        "gpu": result.gpu,
        "gpus_per_node": result.gpus_per_node,
        "job": result.job,
        "target": {
            "tokens_per_s": result.target.tokens_per_s,
            "steps": result.target.steps,
            "deadline_hours": result.target.deadline_hours,
        },
        "smallest_meeting_target": mark.gpus if mark else None,
        "rows": [_row_dict(r) | {"plan": r.plan} for r in result.rows],
    }


def _row_dict(r: Row) -> dict:
    d = {
        "gpus": r.gpus,
        "feasible": r.feasible,
        "category": r.category,
        "sets": r.sets,
        "tokens_per_s": r.tokens_per_s,
        "iteration_s": r.iteration_s,
        "peak_memory_gib": r.peak_memory_gib,
        "scaling_efficiency": r.scaling_efficiency,
        "gpu_hours_per_1k_steps": r.gpu_hours_per_1k_steps,
        "meets_target": r.meets_target,
        "reason": r.reason,
    }
    if not r.feasible:
        d |= dict.fromkeys(
            (
                "tokens_per_s",
                "iteration_s",
                "peak_memory_gib",
                "scaling_efficiency",
                "gpu_hours_per_1k_steps",
            )
        )
    return d | {f"{name} tokens_per_s": tps for name, tps in r.standard.items()}


def write_csv(result: SweepResult, path: Path) -> None:
    names = _standard_names(result)
    columns = [
        "gpus",
        "feasible",
        "category",
        "sets",
        "tokens_per_s",
        "iteration_s",
        "peak_memory_gib",
        "scaling_efficiency",
        "gpu_hours_per_1k_steps",
        "meets_target",
        "smallest_meeting_target",
        *[f"{n} tokens_per_s" for n in names],
        "reason",
    ]
    mark = result.smallest_meeting_target
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in result.rows:
            d = _row_dict(r) | {"smallest_meeting_target": mark is not None and r.gpus == mark.gpus}
            w.writerow({k: ("" if d.get(k) is None else d.get(k, "")) for k in columns})


@dataclass(frozen=True)
class Series:
    """One line of a plot over GPU counts (the sweep's: a placement's tokens/s) where it
    fits, the counts where it does not, and the earlier lines it would hide at some counts
    (it is drawn over them)."""

    name: str
    gpus: tuple[int, ...]
    values: tuple[float, ...]  # one per count of `gpus`
    missing: tuple[int, ...] = ()  # GPU counts of the sweep where it does not fit
    same_as: str | None = None  # the first earlier line equal at every count both fit at
    same_everywhere: bool = True  # False: both do not fit at the same counts
    overlaps: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (earlier line, counts equal)

    @property
    def per_gpu(self) -> tuple[float, ...]:
        return tuple(t / n for n, t in zip(self.gpus, self.values))

    @property
    def label(self) -> str:
        if self.same_as is not None:
            where = "" if self.same_everywhere else " where both fit"
            return f"{self.name} (same as {SHORT.get(self.same_as, self.same_as)}{where})"
        if self.overlaps:
            parts = [f"= {SHORT.get(o, o)} at {_counts(c)}" for o, c in self.overlaps]
            return f"{self.name} ({'; '.join(parts)})"
        return self.name


SHORT = {BEST: "the best plan"}
SAME = 0.005  # two lines meet at a count where their throughputs are within 0.5%


def _counts(counts: tuple[int, ...]) -> str:
    if len(counts) <= 4:
        return f"{', '.join(map(str, counts))} GPUs"
    return f"{len(counts)} counts"


def equal_counts(
    a: Series, b: Series, tol: float = SAME
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The counts where both lines fit, and those of them where they are within `tol`."""
    tb = dict(zip(b.gpus, b.values))
    common = tuple(n for n in a.gpus if n in tb)
    ta = dict(zip(a.gpus, a.values))
    same = tuple(n for n in common if abs(ta[n] - tb[n]) <= tol * max(abs(ta[n]), abs(tb[n])))
    return common, same


def coincide(a: Series, b: Series, tol: float = SAME) -> bool:
    """Whether one line would hide the other: both fit at some common count and, at every
    count where both fit, their throughputs are within `tol` of each other."""
    common, same = equal_counts(a, b, tol)
    return bool(common) and same == common


def _with_twins(s: Series, earlier: list[Series]) -> Series:
    """`s` marked with the first earlier line it coincides with, else with the earlier lines
    it meets at some counts."""
    twin = next((o for o in earlier if coincide(s, o)), None)
    if twin is not None:
        return replace(s, same_as=twin.name, same_everywhere=twin.gpus == s.gpus)
    meets = [(o.name, equal_counts(s, o)[1]) for o in earlier]
    return replace(s, overlaps=tuple((o, c) for o, c in meets if c))


def mark_twins(series: list[Series]) -> list[Series]:
    """Each line, in drawing order, marked with the earlier lines it would be drawn over."""
    out: list[Series] = []
    for s in series:
        out.append(_with_twins(s, out))
    return out


def plot_series(result: SweepResult) -> list[Series]:
    """The best plan's line, then each standard placement's, each marked with the earlier
    lines it would be drawn over."""
    counts = [r.gpus for r in result.rows]
    raw: list[tuple[str, list[tuple[int, float]]]] = [
        (BEST, [(r.gpus, r.tokens_per_s) for r in result.rows if r.feasible]),
        *(
            (name, [(r.gpus, t) for r in result.rows if (t := r.standard.get(name))])
            for name in _standard_names(result)
        ),
    ]
    return mark_twins(
        [
            Series(
                name,
                tuple(n for n, _ in pts),
                tuple(float(t) for _, t in pts),
                tuple(c for c in counts if c not in {n for n, _ in pts}),
            )
            for name, pts in raw
        ]
    )


def _styles(series: list[Series]) -> list[dict]:
    """Plot keywords per line. The best plan's is wide and pale underneath; a line drawn over
    another standard line (or all of the best plan's) is dashed, with hollow markers larger
    than those under it, so both show."""
    styles, k = [], 0
    colors = (f"C{i}" for i in itertools.count())
    for s in series:
        style: dict = {"color": "black" if s.name == BEST else next(colors), "marker": "o"}
        if s.name == BEST:
            style |= {"markersize": 9, "linewidth": 5, "alpha": 0.3, "zorder": 1}
        else:
            style |= {"markersize": 4, "linewidth": 1.3, "zorder": 2}
        if s.same_as is not None or any(o != BEST for o, _ in s.overlaps):
            k += 1
            style |= {"linestyle": (0, (4, 2 + 2 * k)), "markerfacecolor": "none"}
            style |= {"markersize": 6 + 3 * k, "linewidth": 1.3, "alpha": 1.0, "zorder": 2 + k}
        styles.append(style)
    return styles


def missing_marks(series: list[Series]) -> list[tuple[float, str]]:
    """Where each line's 'does not fit' mark goes: (x, line name), at the bottom of the plot;
    the marks of several lines at one count are spread a little along the (log 2) axis."""
    names = [s.name for s in series]
    marks = []
    for s in series:
        k = names.index(s.name) - (len(names) - 1) / 2
        marks += [(n * 2 ** (0.06 * k), s.name) for n in s.missing]
    return marks


def draw_lines(ax, series: list[Series], per_gpu: bool = False) -> None:
    """Every line (its values, or per GPU), labelled as `Series.label` says, with an 'x' at
    the bottom of the panel where a line does not fit (one legend entry 'does not fit')."""
    styles = _styles(series)
    color = {s.name: st["color"] for s, st in zip(series, styles)}
    for s, style in zip(series, styles):
        if s.gpus:
            ax.plot(s.gpus, s.per_gpu if per_gpu else s.values, label=s.label, **style)
    for i, (x, name) in enumerate(missing_marks(series)):
        ax.plot(
            [x],
            [0],
            marker="x",
            markersize=8,
            color=color[name],
            linestyle="none",
            clip_on=False,
            zorder=5,
            label="does not fit" if i == 0 else None,
        )


def write_png(result: SweepResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 (matplotlib.ticker.FuncFormatter below)

    fig, (top, low) = plt.subplots(2, 1, figsize=(8, 7.5), sharex=True, height_ratios=(3, 2))
    series = plot_series(result)
    draw_lines(top, series)
    draw_lines(low, series, per_gpu=True)
    mark = result.smallest_meeting_target
    if mark is not None:
        top.plot(
            [mark.gpus],
            [mark.tokens_per_s],
            marker="*",
            markersize=18,
            color="red",
            linestyle="none",
            label=f"smallest meeting target: {mark.gpus} GPUs",
        )
    if result.target.tokens_per_s is not None:
        top.axhline(result.target.tokens_per_s, color="red", linestyle="--", linewidth=0.8)
    low.set_xscale("log", base=2)
    low.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    low.set_xlabel(f"GPUs ({result.gpu})")
    top.set_ylabel("predicted tokens/s")
    low.set_ylabel("tokens/s per GPU")
    for ax in (top, low):
        ax.set_ylim(bottom=0)  # linear from zero: falling efficiency shows as a falling line
        ax.grid(True, which="both", alpha=0.3)
    job = result.job
    top.set_title(f"{job['algorithm']} {job['models'].get('actor')}: best plan per GPU count")
    top.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: SweepResult, out_dir: Path) -> tuple[Path, Path]:
    csv_path, png_path = out_dir / "sweep.csv", out_dir / "sweep.png"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_csv(result, csv_path)
        write_png(result, png_path)
    except OSError as e:
        raise unreadable("cannot write the sweep to", out_dir, e) from None
    return csv_path, png_path
