"""What this executor can run, checked on a plan before any worker starts.

The plan itself (keys, roles of its algorithm, sets, layout arithmetic) was validated when
it was built (hybridflow.plan); these are the executor's own limits.
"""

from __future__ import annotations

from hybridflow.errors import UserError
from hybridflow.plan import Plan
from hybridflow.vocab import TRAINED_ROLES, Role


class PlanNotRunnable(UserError):
    """A plan this executor cannot run here (one clear message)."""


def check_runnable(plan: Plan, devices: int | None = None) -> None:
    """`devices`: the devices of the cluster it will run on (None: not known yet)."""
    job = plan.job
    if devices is not None and plan.gpus > devices:
        raise PlanNotRunnable(
            f"the plan needs {plan.gpus} devices, the cluster it runs on has {devices}"
        )
    models = {job.model(r) for r in job.gpu_roles}
    if len(models) != 1:
        raise PlanNotRunnable(
            f"the executor runs one model architecture for every role "
            f"(the task's artifacts); the plan names {sorted(models)}"
        )
    for s in plan.sets:
        for role in s.models:
            _check_split(role, s.layout(role).dp, job.sequences, job.mini_batches)
        if Role.ACTOR in s.models and s.generation().pp != 1:
            raise PlanNotRunnable(
                f"actor: generation pp={s.generation().pp}: the executor "
                f"generates with pp=1 (tensor-parallel vLLM groups)"
            )


def _check_split(role: str, dp: int, responses: int, mini_batches: int) -> None:
    trained = role in TRAINED_ROLES
    if responses % (dp * (mini_batches if trained else 1)):
        raise PlanNotRunnable(
            f"role {role}: {responses} responses per iteration do not split over "
            f"dp={dp}" + (f" x {mini_batches} mini-batches" if trained else "")
        )
