"""`hybridflow report --compare`: the planner's plan against the standard placements and the
resharding schemes, over model sizes and GPU counts (simulated, as the paper's Figures 8-13).

Every number comes from the planner and simulator: planner.sweep.planner_points gives, per
GPU count, the best plan and the standard placements' throughput; simulator.predict.predict_plan
re-predicts the best plan under each resharding scheme. This module only tabulates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from hybridflow.errors import UserError, unreadable
from hybridflow.plan import Plan
from hybridflow.planner.search import Planner, plan_job
from hybridflow.planner.sweep import planner_points
from hybridflow.report import plots
from hybridflow.report.markdown import fmt, image, table
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.costs import DoesNotFit
from hybridflow.simulator.job import Job
from hybridflow.simulator.model import load_model
from hybridflow.simulator.predict import predict_plan
from hybridflow.simulator.profile import load_profile
from hybridflow.simulator.reshard import SCHEMES

SYSTEMS = ("hybridflow", "colocated", "split", "separate")
SYSTEM_NOTES = {
    "hybridflow": "the planner's best plan",
    "colocated": "all models on all GPUs (verl, DeepSpeed-Chat)",
    "split": "actor+reference | critic+reward (NeMo-Aligner-like)",
    "separate": "one set per model (OpenRLHF)",
}


class CompareError(UserError):
    """A comparison that cannot be set up (bad models, GPU counts or GPU kind)."""


@dataclass(frozen=True)
class CompareSpec:
    gpu: str
    models: tuple[str, ...]
    gpus: tuple[int, ...]
    algorithm: str = "ppo"
    prompt_len: int = 1024
    response_len: int = 1024
    global_batch: int = 1024
    ppo_epochs: int = 1
    mini_batches: int = 8
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        if not self.models:
            raise CompareError("--compare needs at least one model")
        if not self.gpus or any(
            isinstance(g, bool) or not isinstance(g, int) or g <= 0 for g in self.gpus
        ):
            raise CompareError(f"GPU counts must be positive integers, got {self.gpus}")
        for g in self.gpus:  # raises ClusterError for e.g. 12 GPUs on 8-GPU nodes
            Cluster.from_gpus(self.gpu, g, self.gpus_per_node)

    def job(self, model: str) -> Job:
        return Job.create(
            self.algorithm,
            model,
            self.prompt_len,
            self.response_len,
            self.global_batch,
            self.ppo_epochs,
            self.mini_batches,
        )


def _placement(plan: dict) -> str:
    return " | ".join("+".join(s["models"]) + f"@{s['gpus']}" for s in plan["sets"])


def _model_rows(spec: CompareSpec, model: str, profile) -> tuple[list[dict], list[dict]]:
    """Throughput rows (one per system and GPU count) and reshard rows (one per scheme)."""
    job = spec.job(model)
    plan_at = planner_points(spec.gpu, job, profile, spec.gpus_per_node)
    planners = {
        scheme: Planner(job, profile, spec.gpus_per_node, scheme=scheme) for scheme in SCHEMES
    }
    systems, reshards = [], []
    for gpus in sorted(set(spec.gpus)):
        point = plan_at(gpus)
        best = point.plan
        tps = {
            "hybridflow": best["predicted"]["tokens_per_s"] if best else None,
            **{k: point.standard.get(k) for k in SYSTEMS[1:]},
        }
        for system in SYSTEMS:
            value = tps[system]
            systems.append(
                {
                    "model": model,
                    "gpus": gpus,
                    "system": system,
                    "tokens_per_s": value if value else math.nan,
                    "placement": _placement(best) if system == "hybridflow" and best else "",
                    "note": "" if value else "does not fit",
                }
            )
        if best is not None:
            reshards += _scheme_rows(spec, model, gpus, Plan.from_dict(best), profile, planners)
    return systems, reshards


def _scheme_rows(
    spec: CompareSpec, model: str, gpus: int, plan, profile, planners: dict
) -> list[dict]:
    """Per scheme: the planner's plan re-predicted with that resharding (same layouts; NaN
    where it does not fit), and the best plan when the planner itself uses that scheme."""
    rows = []
    cluster = Cluster.from_gpus(spec.gpu, gpus, spec.gpus_per_node)
    for scheme, planner in planners.items():
        row = {"model": model, "gpus": gpus, "scheme": scheme}
        try:
            pred = predict_plan(plan, profile, reshard=scheme)
            row.update(reshard_s=pred.stages["reshard"], iteration_s=pred.iteration_s)
        except DoesNotFit:
            row.update(reshard_s=math.nan, iteration_s=math.nan)
        try:
            own = plan_job(cluster, plan.job, profile, planner=planner)[0].to_dict()["predicted"]
            row.update(
                replanned_reshard_s=own["stages"]["reshard"],
                replanned_tokens_per_s=own["tokens_per_s"],
            )
        except DoesNotFit:
            row.update(replanned_reshard_s=math.nan, replanned_tokens_per_s=math.nan)
        rows.append(row)
    return rows


def compare_frames(spec: CompareSpec):
    """(throughput frame with speedup of hybridflow over each system, reshard frame)."""
    profile = load_profile(spec.gpu)
    for m in spec.models:
        load_model(m)  # one clear message for an unknown model before any planning
    systems, reshards = [], []
    for model in spec.models:
        s, r = _model_rows(spec, model, profile)
        systems += s
        reshards += r
    frame = pd.DataFrame(systems)
    best = frame[frame["system"] == "hybridflow"].set_index(["model", "gpus"])["tokens_per_s"]
    frame["speedup"] = [
        best[(m, g)] / t if t and not math.isnan(t) else math.nan
        for m, g, t in zip(frame["model"], frame["gpus"], frame["tokens_per_s"])
    ]
    return frame, pd.DataFrame(
        reshards,
        columns=[
            "model",
            "gpus",
            "scheme",
            "reshard_s",
            "iteration_s",
            "replanned_reshard_s",
            "replanned_tokens_per_s",
        ],
    )


def _speedup_lines(frame) -> list[str]:
    lines = []
    for system in SYSTEMS[1:]:
        sp = frame[(frame["system"] == system)]["speedup"].dropna()
        if len(sp):
            lines.append(
                f"- over {system}, {SYSTEM_NOTES[system]}: {sp.min():.2f}×–"
                f"{sp.max():.2f}×, geometric mean "
                f"{math.exp(sum(map(math.log, sp)) / len(sp)):.2f}× ({len(sp)} points)"
            )
    return lines


def _cell(row) -> str:
    if math.isnan(row.tokens_per_s):
        return "does not fit"
    speed = (
        "" if row.system == "hybridflow" or math.isnan(row.speedup) else f" ({row.speedup:.2f}×)"
    )
    return fmt(float(round(row.tokens_per_s))) + speed


def _scheme_lines(reshard) -> list[str]:
    """Throughput of the planner using hybridengine over the planner using each other scheme."""
    lines = []
    base = reshard[reshard["scheme"] == SCHEMES[0]].set_index(["model", "gpus"])
    for scheme in SCHEMES[1:]:
        other = reshard[reshard["scheme"] == scheme].set_index(["model", "gpus"])
        ratio = (base["replanned_tokens_per_s"] / other["replanned_tokens_per_s"]).dropna()
        if len(ratio):
            lines.append(
                f"- {SCHEMES[0]} resharding over {scheme}, best plans: "
                f"{ratio.min():.3f}×–{ratio.max():.3f}× ({len(ratio)} points)"
            )
    return lines


def _throughput_table(frame, model: str) -> str:
    sub = frame[frame["model"] == model]
    rows = []
    for gpus, g in sub.groupby("gpus"):
        by = {r.system: r for r in g.itertuples()}
        rows.append((gpus, *[_cell(by[s]) for s in SYSTEMS], by["hybridflow"].placement))
    return table(["GPUs", *SYSTEMS, "planner's placement"], rows)


def _reshard_table(reshard, model: str) -> str:
    sub = reshard[reshard["model"] == model]
    rows = []
    for gpus, g in sub.groupby("gpus"):
        by = {r.scheme: r for r in g.itertuples()}
        rows.append(
            (
                gpus,
                *[by[s].reshard_s if s in by else math.nan for s in SCHEMES],
                *[
                    float(round(by[s].replanned_tokens_per_s))
                    if s in by and not math.isnan(by[s].replanned_tokens_per_s)
                    else math.nan
                    for s in SCHEMES
                ],
            )
        )
    return table(["GPUs", *[f"{s} s" for s in SCHEMES], *[f"{s} tokens/s" for s in SCHEMES]], rows)


def _markdown(spec: CompareSpec, frame, reshard) -> str:
    out = [
        f"# HybridFlow placement comparison (simulated, {spec.gpu})",
        "",
        f"{spec.algorithm.upper()}, all roles the same model; prompt {spec.prompt_len} + "
        f"response {spec.response_len} tokens, global batch {spec.global_batch}, "
        f"{spec.ppo_epochs} epoch(s) of {spec.mini_batches} mini-batches; "
        f"{spec.gpus_per_node} GPUs per node. Throughput = (prompt + response tokens of the "
        "batch) / predicted iteration time. Speedup = HybridFlow's throughput / the system's.",
        "",
        "## HybridFlow's speedup",
        "",
        *_speedup_lines(frame),
        *_scheme_lines(reshard),
        "",
        image("throughput per placement", "throughput.png"),
        "",
        image("resharding time per scheme", "reshard.png"),
        "",
    ]
    for model in spec.models:
        out += [
            f"## {model}",
            "",
            "Tokens/s (speedup of HybridFlow):",
            "",
            _throughput_table(frame, model),
            "",
            "Resharding (Table 2's schemes): seconds per iteration of the planner's plan "
            "re-predicted with each scheme (same layouts; – where that scheme's memory does "
            "not fit), and tokens/s of the best plan when the planner itself uses the "
            "scheme:",
            "",
            _reshard_table(reshard, model),
            "",
        ]
    return "\n".join(out)


def write_compare_report(
    gpu: str, models: list[str], gpus: list[int], out: str | Path, algorithm: str = "ppo"
) -> Path:
    """Write report.md, compare.csv, reshard.csv, throughput.png and reshard.png to `out`."""
    spec = CompareSpec(gpu, tuple(models), tuple(gpus), algorithm)
    spec.job(models[0])  # bad algorithm -> one clear message before planning
    frame, reshard = compare_frames(spec)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompareError(f"report output {str(out)!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise unreadable("cannot write the report to", out, e) from None
    frame.to_csv(out / "compare.csv", index=False)
    reshard.to_csv(out / "reshard.csv", index=False)
    plots.compare_bars(frame, SYSTEMS, out / "throughput.png")
    plots.reshard_lines(reshard, out / "reshard.png")
    path = out / "report.md"
    path.write_text(_markdown(spec, frame, reshard))
    return path
