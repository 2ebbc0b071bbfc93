"""What this executor can run, checked on a plan before any worker starts.

The plan itself (keys, roles of its algorithm, sets, layout arithmetic) was validated when
it was built (hybridflow.plan); these are the executor's own limits.
"""

from __future__ import annotations

from hybridflow.errors import UserError
from hybridflow.layout import ParallelLayout
from hybridflow.memory import MemorySettings
from hybridflow.plan import Plan
from hybridflow.simulator.architecture import ModelSpec
from hybridflow.simulator.train_memory import stage_split
from hybridflow.vocab import TRAINED_ROLES, VALUE_ROLES, Role


class PlanNotRunnable(UserError):
    """A plan this executor cannot run here (one clear message)."""


def check_runnable(plan: Plan, devices: int | None = None, user_job: bool = False) -> None:
    """`devices`: the devices of the cluster it will run on (None: not known yet);
    `user_job`: the roles start from the plan's own folders (else the built-in task's)."""
    job = plan.job
    if plan.pipeline.asynchronous:
        raise PlanNotRunnable(
            "the plan's pipeline is async (a rollout set): `hybridflow run` runs synchronous "
            "plans only; plan with --pipeline sync to run it (async plans are planned and "
            "simulated)"
        )
    if devices is not None and plan.gpus > devices:
        raise PlanNotRunnable(
            f"the plan needs {plan.gpus} devices, the cluster it runs on has {devices}"
        )
    models = {job.model(r) for r in job.gpu_roles}
    if not user_job and len(models) != 1:
        raise PlanNotRunnable(
            f"the built-in task runs one model architecture for every role (its "
            f"artifacts); the plan names {sorted(models)}: give --data to run the plan's "
            f"own checkpoint folders"
        )
    for s in plan.sets:
        for role in s.models:
            _check_split(role, s.layout(role).dp, job.sequences, job.mini_batches)
            _check_layout(role, job.spec(role), s.layout(role), s.settings(role))
        if Role.ACTOR in s.models and s.generation().decoupled(s.layout(Role.ACTOR)):
            raise PlanNotRunnable(
                f"actor: generation tp={s.generation().tp} is wider than the training "
                f"model-parallel group: the executor reshards with the 3D-HybridEngine only"
            )
        if Role.ACTOR in s.models and s.generation().pp != 1:
            raise PlanNotRunnable(
                f"actor: generation pp={s.generation().pp}: the executor "
                f"generates with pp=1 (tensor-parallel vLLM groups)"
            )


def _check_layout(
    role: str, spec: ModelSpec, layout: ParallelLayout, settings: MemorySettings
) -> None:
    """What the local megatron-core engines run: no host offload, no context parallelism,
    even pipeline stages (the plan's stage_split, which the simulator costed)."""
    if role in TRAINED_ROLES and settings.offload:
        raise PlanNotRunnable(
            f"role {role}: memory offload: true: CPU offload is not run by the executor "
            f"on CPU devices"
        )
    if role in TRAINED_ROLES and settings.fsdp:
        raise PlanNotRunnable(
            f"role {role}: memory fsdp: true: the executor trains with megatron-core "
            f"(distributed optimizer), not FSDP"
        )
    if layout.cp > 1:
        raise PlanNotRunnable(
            f"role {role}: cp={layout.cp}: the executor does not run context parallelism"
        )
    split = stage_split(spec, layout.pp, role in VALUE_ROLES)
    if spec.layers % (layout.pp * (layout.vpp or 1)) or len(set(split)) > 1:
        raise PlanNotRunnable(
            f"role {role}: pp={layout.pp} splits the {spec.layers} layers unevenly "
            f"{split}: the executor runs megatron-core's even pipeline stages only"
        )


def _check_split(role: str, dp: int, responses: int, mini_batches: int) -> None:
    trained = role in TRAINED_ROLES
    if responses % (dp * (mini_batches if trained else 1)):
        raise PlanNotRunnable(
            f"role {role}: {responses} responses per iteration do not split over "
            f"dp={dp}" + (f" x {mini_batches} mini-batches" if trained else "")
        )
