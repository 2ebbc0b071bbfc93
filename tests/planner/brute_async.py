"""Brute-force asynchronous planning for tests: every scoring side, every rollout size, every
placement of the training roles and every allocation of their sets, each side's layouts by
exhaustive joint enumeration (no pruning, no bounds, no CP-SAT). Small clusters only."""

from __future__ import annotations

from hybridflow.planner.asynchronous import AsyncSearch, step_s
from hybridflow.planner.cpsat import brute_force
from hybridflow.planner.search import Placement, Planner, set_partitions
from hybridflow.planner.tables import set_sizes
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.job import Job
from hybridflow.simulator.profile import Profile


def brute_force_async(
    cluster: Cluster, job: Job, profile: Profile, staleness: int = 1
) -> tuple[float, tuple[str, ...], int, Placement, tuple[int, ...]] | None:
    """(step seconds, scoring roles beside the engines, rollout GPUs, training placement,
    GPUs per training set) of the best asynchronous plan, or None."""
    search = AsyncSearch(Planner(job, profile, cluster.gpus_per_node), staleness)
    search.intra = cluster.n_gpus <= cluster.gpus_per_node
    best = None
    for scoring in search.scoring_sides():
        rest = tuple(r for r in job.gpu_roles if r not in scoring)
        for n in set_sizes(cluster.gpus_per_node, cluster.n_gpus - 1):
            rc = search.rollout(scoring, n, prune=False)
            if rc is None:
                continue
            for placement in set_partitions(rest):
                inst = search.instance(placement, cluster.n_gpus - n, rc, prune=False)
                sol = None if inst is None else brute_force(inst)
                if sol is None:
                    continue
                step = step_s(search.k, rc, sol.objective)
                if best is None or step < best[0]:
                    best = (step, scoring, n, placement, sol.gpus[: len(placement)])
    return best
