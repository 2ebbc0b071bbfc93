"""Brute-force auto-mapping for tests: every placement x every allocation, each set's
layouts by exhaustive joint enumeration (no pruning). Small clusters only."""

from __future__ import annotations

from hybridflow.planner.cpsat import Instance, brute_force
from hybridflow.planner.search import Placement, rule_set, set_partitions
from hybridflow.planner.tables import Tables, set_sizes
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.job import Job
from hybridflow.simulator.profile import Profile


def brute_force_best(
    cluster: Cluster, job: Job, profile: Profile, scheme: str = "hybridengine"
) -> tuple[float, Placement, tuple[int, ...]] | None:
    """(iteration seconds, placement, GPUs per set) of the best plan, or None."""
    tables = Tables(job, profile, cluster.gpus_per_node, scheme)
    best = None
    for placement in set_partitions(job.gpu_roles):
        sizes, costs = [], []
        for roles in placement:
            row = [
                (n, c)
                for n in set_sizes(cluster.gpus_per_node, cluster.n_gpus)
                if (c := tables.best_set(roles, n, prune=False)) is not None
            ]
            sizes.append(tuple(n for n, _ in row))
            costs.append(tuple(c.stages for _, c in row))
        if not all(sizes):
            continue
        if (rules := rule_set(job)) is not None:
            sizes.append(rules[0])
            costs.append(rules[1])
        sol = brute_force(Instance(cluster.n_gpus, tuple(sizes), tuple(costs)))
        if sol is not None and (best is None or sol.objective < best[0]):
            best = (sol.objective, placement, sol.gpus[: len(placement)])
    return best
