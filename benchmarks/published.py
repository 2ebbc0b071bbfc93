"""The simulator against published RL step times: each row of benchmarks/published_rows.py
(from ../shared/published-calibration.md) rebuilt as a plan with the row's own layout (not
the planner's search), predicted with predict_plan on the row's GPU profile, and compared
with the published step and phase seconds. A row without a reference model (DAPO) leaves
the reference's prepare seconds out; its weights still take memory (a smaller KV cache, the
simulator's GRPO always has one). Goals over the included rows: median |error|
<= 15% and every row within 25% (error = predicted / published - 1). Nothing here is fitted:
the profiles' numbers and their sources are in profiles/.

Run:  .venv/bin/python benchmarks/published.py [--json] [--out reports/published.md]
--json prints [{"name", "predicted_s", "published_s", "error", "included"}] for every row
that could be built (a row that does not fit in memory has predicted_s and error null), the
asynchronous rows (benchmarks/published_async.py: each an asynchronous plan with the row's
own split of rollout and training GPUs) after the synchronous ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from published_async import ASYNC_ROWS, evaluate_async  # noqa: E402
from published_rows import NOT_BUILT, ROWS, Row, model_path  # noqa: E402

from hybridflow.errors import UserError  # noqa: E402
from hybridflow.layout import GenLayout, ParallelLayout  # noqa: E402
from hybridflow.memory import MemorySettings  # noqa: E402
from hybridflow.plan import PlacedSet, Plan  # noqa: E402
from hybridflow.report.markdown import emit, percent, table  # noqa: E402
from hybridflow.simulator.cluster import Cluster  # noqa: E402
from hybridflow.simulator.job import Job  # noqa: E402
from hybridflow.simulator.predict import Prediction, RolePrediction, predict_plan  # noqa: E402
from hybridflow.vocab import STAGES, TRAINED_ROLES  # noqa: E402

MEDIAN_GOAL, MAX_GOAL = 0.15, 0.25


def build_job(row: Row) -> Job:
    """The row's job: its model for every GPU role, a rule or model reward."""
    return Job.create(
        row.algorithm,
        model_path(row.model),
        row.prompt_len,
        row.response_len,
        row.batch,
        mini_batches=row.mini_batches,
        n_samples=row.n_samples if row.algorithm == "grpo" else None,
        response_mean=row.mean_response,
        prompt_mean=row.prompt_mean or 0.0,
        reward="rule" if row.reward == "rule" else None,
    )


def _layouts(role: str, train: ParallelLayout, rollout_tp: int) -> dict:
    if role == "actor":
        if train.tp % rollout_tp == 0:  # inside the training group: the 3D-HybridEngine
            gen = GenLayout(1, rollout_tp, train.model_parallel // rollout_tp)
        else:  # wider than it: the general resharding
            gen = GenLayout(1, rollout_tp, 1)
        return {"train": train, "generate": gen}
    return {"train" if role in TRAINED_ROLES else "infer": train}


def build_plan(row: Row) -> Plan:
    """The row's placement with its own layouts and memory settings."""
    job = build_job(row)
    mem = MemorySettings(True, row.recompute, row.offload, row.micro_batch_tokens, row.fsdp)
    if row.separate is None:
        train = ParallelLayout(row.pp, row.tp, row.dp, row.ep, cp=row.cp)
        roles = job.gpu_roles
        layouts = {r: _layouts(r, train, row.rollout_tp) for r in roles}
        memory = {r: mem for r in roles if r in TRAINED_ROLES}
        sets = (PlacedSet(roles, row.gpus, layouts, memory),)
    else:  # each role data-parallel over its own GPUs
        sets = tuple(
            PlacedSet(
                (r,),
                n,
                {r: _layouts(r, ParallelLayout(1, 1, n), row.rollout_tp)},
                {r: mem} if r in TRAINED_ROLES else {},
            )
            for r, n in row.separate.items()
        )
    return Plan(Cluster.from_gpus(row.gpu, row.gpus), job, sets)


def stage_seconds(row: Row, pred: Prediction) -> dict[str, float]:
    """The prediction's stages; without a reference model (DAPO) its prepare seconds left
    out (a set's prepare is the sum of its roles', the stage the slowest set's, and no less
    than the controller's rule scoring)."""
    out = {str(k): v for k, v in pred.stages.items()}
    if row.reference:
        return out

    def own(roles: Iterable[RolePrediction]) -> float:
        return sum(r.stages["prepare"].seconds for r in roles if "prepare" in r.stages)

    sets = (own(s.roles) - own(r for r in s.roles if r.role == "reference") for s in pred.sets)
    rules = sum(r.stages["prepare"].seconds for r in pred.rules)
    out["prepare"] = max(max(sets), rules)
    return out


def evaluate(row: Row) -> dict:
    """{name, included, published_s, predicted_s, error, stages, phases, result}: the
    prediction, or (`result`) why the row's plan does not fit or cannot be built."""
    out = {
        "name": row.name,
        "gpus": row.gpus,
        "gpu": row.gpu,
        "included": row.excluded is None,
        "published_s": row.published_s,
        "predicted_s": None,
        "error": None,
        "stages": {},
        "phases": {},
        "result": "",
    }
    try:
        stages = stage_seconds(row, predict_plan(build_plan(row), row.gpu))
    except UserError as e:  # DoesNotFit, a layout the model refuses
        out["result"] = f"{type(e).__name__}: {e}"
        return out
    predicted = sum(stages[s] for s in STAGES)
    out.update(predicted_s=predicted, error=predicted / row.published_s - 1, stages=stages)
    out["phases"] = {k: (sum(stages[s] for s in k.split("+")), v) for k, v in row.phases.items()}
    return out


def summary(results: list[dict]) -> dict:
    """Median and max |error| over the included rows (a row that does not fit fails)."""
    inc = [r for r in results if r["included"]]
    errs = [abs(r["error"]) for r in inc if r["error"] is not None]
    failed = [r["name"] for r in inc if r["error"] is None]
    med = statistics.median(errs) if errs else float("nan")
    worst = max(errs) if errs else float("nan")
    return {
        "included": len(inc),
        "predicted": len(errs),
        "median_abs_error": med,
        "max_abs_error": worst,
        "not_predicted": failed,
        "median_goal_met": bool(errs) and med <= MEDIAN_GOAL,
        "max_goal_met": bool(errs) and not failed and worst <= MAX_GOAL,
    }


def _phase_cell(phases: dict) -> str:
    return "; ".join(f"{k} {p:.0f}/{v:.0f}" for k, (p, v) in phases.items()) or "–"


def render(results: list[dict]) -> str:
    rows = []
    for r in results:
        pred = "–" if r["predicted_s"] is None else f"{r['predicted_s']:.0f}"
        err = "–" if r["error"] is None else percent(r["error"])
        note = "" if r["included"] else "excluded: " + _row(r["name"]).excluded
        rows.append(
            [r["name"], f"{r['gpus']} {r['gpu']}", pred, f"{r['published_s']:.0f}", err,
             _phase_cell(r["phases"]), (r["result"] + " " + note).strip()]
        )  # fmt: skip
    s = summary(results)
    text = table(
        ["row", "GPUs", "predicted s", "published s", "error", "phases predicted/published s",
         "note"],
        rows,
    )  # fmt: skip
    text += (
        f"\n\nIncluded rows: {s['included']}, predicted: {s['predicted']}; over those, "
        f"median |error| {s['median_abs_error']:.1%} (goal <= {MEDIAN_GOAL:.0%}: "
        f"{'met' if s['median_goal_met'] else 'NOT met'}), max |error| "
        f"{s['max_abs_error']:.1%} (goal every included row <= {MAX_GOAL:.0%}: "
        f"{'met' if s['max_goal_met'] else 'NOT met'})"
    )
    if s["not_predicted"]:
        text += f"; not predicted: {', '.join(s['not_predicted'])}"
    text += render_async([evaluate_async(a, build_job) for a in ASYNC_ROWS])
    not_built = [*(b for b in NOT_BUILT if b[2] != "asynchronous (another issue)"), STALENESS]
    text += "\n\nNot built:\n" + "\n".join(f"- {n} ({src}): {why}" for n, src, why in not_built)
    text += "\n\nAssumptions per row:\n" + "\n".join(
        [f"- {row.name}: " + "; ".join(row.notes) for row in ROWS]
        + [f"- {a.name}: " + "; ".join(a.notes) for a in ASYNC_ROWS]
    )
    return "Published RL step times vs the simulator (profiles as shipped)\n\n" + text + "\n"


STALENESS = (
    "verl staleness sweep at 128 GPUs",
    "verl docs/advance/fully_async.md",
    "staleness 0.1 / 0.3 / 0.5 are fractions of a batch; a plan's staleness is whole updates",
)


def render_async(results: list[dict]) -> str:
    """The asynchronous rows: predicted against published step, with the error."""
    rows = []
    for r in results:
        pred = "–" if r["predicted_s"] is None else f"{r['predicted_s']:.0f}"
        err = "–" if r["error"] is None else percent(r["error"])
        note = "" if r["included"] else "excluded"
        rows.append(
            [r["name"], f"{r['gpus']} {r['gpu']}", r["split"], pred, f"{r['published_s']:.0f}",
             err, _phase_cell(r["phases"]), (r["result"] + " " + note).strip()]
        )  # fmt: skip
    errs = [abs(r["error"]) for r in results if r["included"] and r["error"] is not None]
    within = sum(e <= MAX_GOAL for e in errs)
    return (
        "\n\nAsynchronous rows (plans with the row's own split rollout:training, staleness 1, "
        "step = max(produce, consume) + weight_load):\n\n"
        + table(
            [
                "row",
                "GPUs",
                "split",
                "predicted s",
                "published s",
                "error",
                "phases predicted/published s",
                "note",
            ],
            rows,
        )  # fmt: skip
        + f"\n\nIncluded asynchronous rows predicted: {len(errs)}; within {MAX_GOAL:.0%}: "
        f"{within}; median |error| "
        f"{statistics.median(errs) if errs else float('nan'):.1%}"
    )


def _row(name: str) -> Row:
    return next(r for r in ROWS if r.name == name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--out", help="also write the table (markdown), e.g. reports/published.md")
    args = ap.parse_args(argv)
    results = [evaluate(r) for r in ROWS]
    if args.json:
        keys = ("name", "predicted_s", "published_s", "error", "included")
        results += [evaluate_async(a, build_job) for a in ASYNC_ROWS]  # asynchronous rows last
        rows = [{k: r[k] for k in keys} for r in results]
        print(json.dumps(rows, indent=2))
    else:
        emit(render(results), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
