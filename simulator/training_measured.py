"""Training and forward calls of the executor from a profile's measured per-call tables
(the local cluster's), used in place of the roofline where they apply."""

from __future__ import annotations

import math

from hybridflow.layout import ParallelLayout
from hybridflow.simulator.costs import Cost, cost
from hybridflow.simulator.job import Job
from hybridflow.simulator.profile import Profile
from hybridflow.vocab import VALUE_ROLES


def _measured_calls(job: Job, role: str, layout: ParallelLayout, profile: Profile) -> bool:
    return profile.calls.applies(job.spec(role).name) and layout.ep == 1


def measured_train(job: Job, role: str, layout: ParallelLayout, profile: Profile) -> Cost | None:
    """The executor's update call from the profile's per-call tables: ppo_epochs x
    mini_batches optimizer steps of this DP rank's share, and the controller's dispatch;
    None where the tables have no row for this model, layout and set size."""
    if not _measured_calls(job, role, layout, profile):
        return None
    calls = profile.calls
    per_rank = math.ceil(job.sequences / (job.mini_batches * layout.dp))
    step = calls.train_step(
        layout.n_gpus,
        layout.tp,
        layout.pp,
        calls.same_work(per_rank, job.seq_len),
        role in VALUE_ROLES,
    )
    disp = calls.dispatch("train", layout.n_gpus, job.sequences)
    if step is None or disp is None:
        return None
    steps = job.ppo_epochs * job.mini_batches
    return cost(
        ("train_steps", steps * (step[0] - step[1]), "measured"),
        ("optimizer_steps", steps * step[1], "measured"),
        ("dispatch", disp, "measured"),
    )


def measured_infer(
    job: Job, role: str, layout: ParallelLayout, profile: Profile, sequences: int
) -> Cost | None:
    """Forward calls of the executor (one per batch of the job's sequences: ReMax scores
    its greedy baseline in a call of its own) from the per-call tables, or None."""
    if not _measured_calls(job, role, layout, profile):
        return None
    calls = profile.calls
    n_calls = math.ceil(sequences / job.sequences)
    per_call = sequences / n_calls
    fwd = calls.forward(
        layout.n_gpus,
        layout.tp,
        layout.pp,
        calls.same_work(math.ceil(per_call / layout.dp), job.seq_len),
        role in VALUE_ROLES,
    )
    disp = calls.dispatch("forward", layout.n_gpus, per_call)
    if fwd is None or disp is None:
        return None
    return cost(
        ("forward_calls", n_calls * fwd, "measured"), ("dispatch", n_calls * disp, "measured")
    )
