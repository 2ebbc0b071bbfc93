"""Checks a plan against what this executor can run, before any worker starts."""
from __future__ import annotations

from hybridflow.executor.run.config import RunConfig, samples_per_prompt

TRAINED = ("actor", "critic", "cost_critic")


class PlanNotRunnable(ValueError):
    """A plan this executor cannot run here (one clear message)."""


def _layout(s: dict, role: str) -> dict:
    lay = s["layouts"][role]
    return lay.get("train") or lay.get("infer")


def check_plan(plan: dict, cfg: RunConfig, devices: int | None = None) -> None:
    """Validate the plan file (hybridflow.planner.Plan) and the executor's own limits.

    `devices`: the devices of the cluster it will run on (None: not known yet)."""
    from hybridflow.plan import Plan
    Plan.from_dict(plan)  # keys, roles of the algorithm, sets, layout arithmetic
    job = plan["job"]
    need = sum(s["gpus"] for s in plan["sets"])
    if devices is not None and need > devices:
        raise PlanNotRunnable(f"the plan needs {need} devices, the cluster it runs on has "
                              f"{devices}")
    models = {m for m in job["models"].values() if m != "rule"}
    if len(models) != 1:
        raise PlanNotRunnable(f"the executor runs one model architecture for every role "
                              f"(the task's artifacts); the plan names {sorted(models)}")
    responses = job["global_batch"] * samples_per_prompt(job)
    for s in plan["sets"]:
        for role in s["models"]:
            lay = _layout(s, role)
            parts = lay["dp"] * (job["mini_batches"] if role in TRAINED else 1)
            if responses % parts:
                raise PlanNotRunnable(
                    f"role {role}: {responses} responses per iteration do not split over "
                    f"dp={lay['dp']}" + (f" x {job['mini_batches']} mini-batches"
                                          if role in TRAINED else ""))
        if "actor" in s["models"]:
            gen, train = s["layouts"]["actor"]["generate"], _layout(s, "actor")
            if gen["pp"] != 1:
                raise PlanNotRunnable(f"actor: generation pp={gen['pp']}: the executor "
                                      f"generates with pp=1 (tensor-parallel vLLM groups)")
            if train["tp"] % gen["tp"]:
                raise PlanNotRunnable(f"actor: generation tp={gen['tp']} must divide the "
                                      f"training tp={train['tp']}")
    if cfg.iterations < 1:
        raise PlanNotRunnable("iterations must be >= 1")
