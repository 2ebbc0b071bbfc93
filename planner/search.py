"""Auto-mapping (the paper's Algorithm 1): every placement of the job's roles into disjoint
sets, the GPU allocation across sets by CP-SAT over cached best-layout tables, ranked by
predicted iteration time (the allocation's sum of stage maxima; where devices share a host's
cores, the full prediction, which slows sets that run at once)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

from hybridflow.errors import UserError
from hybridflow.plan import PlacedSet, Plan
from hybridflow.planner.cpsat import Config, Instance, Solution, brute_force, solve
from hybridflow.planner.tables import SetChoice, Tables, set_sizes
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.costs import DoesNotFit
from hybridflow.simulator.job import Job
from hybridflow.simulator.predict import predict_plan, rule_seconds
from hybridflow.simulator.profile import Profile, load_profile
from hybridflow.vocab import STAGES, Stage

Placement = tuple[tuple[str, ...], ...]
SEARCH_LIMIT_GPUS = 8192  # how far to look for the smallest GPU count that fits

log = logging.getLogger(__name__)


def set_partitions(items: tuple[str, ...]) -> Iterator[Placement]:
    """Every partition of `items` into non-empty disjoint sets (Bell number many)."""
    if not items:
        yield ()
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        yield ((first,) + part[0],) + part[1:] if part else ((first,),)
        if part:
            for i in range(1, len(part)):
                yield part[:i] + ((first,) + part[i],) + part[i + 1 :]
            yield ((first,),) + part


def _undominated(rows: list[tuple[int, SetChoice]]) -> list[tuple[int, SetChoice]]:
    """Drop sizes no faster in any stage than a smaller size: an optimal allocation never
    needs them (exact), and CP-SAT's tables get much shorter."""
    keep: list[tuple[int, SetChoice]] = []
    for n, c in sorted(rows, key=lambda r: r[0]):
        if not any(all(a <= b for a, b in zip(k.stages, c.stages)) for _, k in keep):
            keep.append((n, c))
    return keep


def rule_set(job: Job) -> tuple[tuple[int, ...], tuple[tuple[float, ...], ...]] | None:
    """Rule rewards and costs as one more 'set' of 0 GPUs for the allocation: its CPU
    seconds take part in the prepare stage's maximum."""
    seconds = rule_seconds(job)
    if seconds <= 0:
        return None
    return (0,), (tuple(seconds if st == Stage.PREPARE else 0.0 for st in STAGES),)


def standard_layouts(job: Job) -> dict[str, Placement]:
    """Placements used by existing systems, for comparison (GPU roles only: rules need
    no set)."""
    roles = job.gpu_roles
    rest = tuple(r for r in roles if r not in ("actor", "reference"))
    return {
        "colocated": (roles,),  # verl, DeepSpeed-Chat
        "split": (("actor", "reference"),) + ((rest,) if rest else ()),  # | critic+reward
        "separate": tuple((r,) for r in roles),
    }  # OpenRLHF: one set per model


@dataclass(frozen=True)
class Candidate:
    placement: Placement
    solution: Solution
    choices: tuple[SetChoice, ...]


class Planner:
    """Plans one job on one GPU kind; keeps its layout tables across cluster sizes."""

    def __init__(
        self,
        job: Job,
        profile: Profile,
        gpus_per_node: int,
        scheme: str = "hybridengine",
        config: Config = Config(),
        max_gen_pp: int | None = None,
    ) -> None:
        self.job, self.profile, self.scheme, self.config = job, profile, scheme, config
        self.tables = Tables(job, profile, gpus_per_node, scheme, max_gen_pp)
        self._rows: dict[tuple[tuple[str, ...], int], list[tuple[int, SetChoice]]] = {}

    @property
    def gpn(self) -> int:
        return self.tables.gpn

    def set_rows(self, roles: tuple[str, ...], capacity: int) -> list[tuple[int, SetChoice]]:
        """The undominated (size, best layouts) of a set up to `capacity`, smallest first;
        shared by every placement that has this set."""
        key = (roles, capacity)
        if key not in self._rows:
            self._rows[key] = _undominated(
                [
                    (n, c)
                    for n in set_sizes(self.gpn, capacity)
                    if (c := self.tables.best_set(roles, n)) is not None
                ]
            )
        return self._rows[key]

    def instance(self, placement: Placement, capacity: int) -> Instance | None:
        rows = [self.set_rows(roles, capacity) for roles in placement]
        if not all(rows):
            return None
        # a set can grow only by what the others leave at their smallest sizes (exact)
        spare = capacity - sum(r[0][0] for r in rows)
        if spare < 0:
            return None
        sizes, costs = [], []
        for r in rows:
            fits = [(n, c) for n, c in r if n - r[0][0] <= spare]
            sizes.append(tuple(n for n, _ in fits))
            costs.append(tuple(c.stages for _, c in fits))
        rules = rule_set(self.job)
        if rules is not None:
            sizes.append(rules[0])
            costs.append(rules[1])
        inst = Instance(capacity, tuple(sizes), tuple(costs))
        return inst if inst.gpus(tuple(0 for _ in sizes)) <= capacity else None

    def solve_placement(self, placement: Placement, capacity: int) -> Candidate | None:
        return self._solve_below(placement, capacity, math.inf)

    def _solve_below(self, placement: Placement, capacity: int, cutoff: float) -> Candidate | None:
        """The placement's best allocation if it may beat `cutoff` seconds, else None."""
        inst = self.instance(placement, capacity)
        if inst is None:
            return None
        if len(placement) == 1:  # one set (and any rule): the fastest size is optimal
            sol = brute_force(inst)
        else:
            sol = solve(inst, self.config, cutoff)
        if sol is None:
            return None
        choices = tuple(self._chosen(roles, n) for roles, n in zip(placement, sol.gpus))
        return Candidate(placement, sol, choices)

    def _chosen(self, roles: tuple[str, ...], n: int) -> SetChoice:
        """The best layouts of a set at a size the allocation chose (one of its rows)."""
        choice = self.tables.best_set(roles, n)
        assert choice is not None, f"{roles} fit on {n} GPUs"
        return choice

    def to_plan(self, cand: Candidate, cluster: Cluster) -> Plan:
        sets = tuple(
            PlacedSet(roles, n, dict(choice.layouts), dict(choice.memory))
            for roles, n, choice in zip(cand.placement, cand.solution.gpus, cand.choices)
        )
        plan = Plan(cluster, self.job, sets)
        return plan.with_prediction(predict_plan(plan, self.profile, self.scheme).to_dict())

    def _lower_bound(self, placement: Placement, capacity: int) -> float:
        inst = self.instance(placement, capacity)
        if inst is None:
            return float("inf")
        per_stage = sum(
            max(min(c[k] for c in costs) for costs in inst.costs) for k in range(inst.n_stages)
        )
        per_set = max(
            min(sum(c) for c in costs) for costs in inst.costs
        )  # sum of max >= max of sums
        return max(per_stage, per_set)

    def candidates(self, capacity: int, top: int) -> list[Candidate]:
        """The `top` best placements; placements are solved in order of their lower bound,
        the rest skipped once the bound cannot beat the top-th found, and CP-SAT asked only
        for allocations faster than that (exact)."""
        bounds = sorted(
            (self._lower_bound(p, capacity), i, p)
            for i, p in enumerate(set_partitions(self.job.gpu_roles))
        )
        found: list[Candidate] = []
        for bound, _, placement in bounds:
            if bound == float("inf") or (
                len(found) >= top and bound >= found[top - 1].solution.objective
            ):
                break
            cutoff = found[top - 1].solution.objective if len(found) >= top else math.inf
            cand = self._solve_below(placement, capacity, cutoff)
            log.debug(
                "placement %s: lower bound %.3f s, %s",
                " | ".join("+".join(roles) for roles in placement),
                bound,
                "none faster" if cand is None else f"{cand.solution.objective:.3f} s",
            )
            if cand is not None:
                found.append(cand)
                found.sort(key=lambda c: c.solution.objective)
        return found[:top]

    def plan(self, cluster: Cluster, top: int = 1) -> list[Plan]:
        self._check_cluster(cluster)
        shared = bool(self.profile.overheads.sharing)
        found = self.candidates(cluster.n_gpus, self._placements() if shared else top)
        if not found:
            raise DoesNotFit(self.infeasible_message(cluster))
        if shared:
            return self._rank_shared(found, cluster, top)
        return [self.to_plan(c, cluster) for c in found]

    def _placements(self) -> int:
        return sum(1 for _ in set_partitions(self.job.gpu_roles))

    def _rank_shared(self, found: list[Candidate], cluster: Cluster, top: int) -> list[Plan]:
        """On a host whose devices share its cores (a profile with `sharing`), sets that run
        at once slow each other, which the allocation's sum of stage maxima leaves out: the
        prediction ranks. It is never below a candidate's objective (slowdowns >= 1), so
        candidates are predicted in objective order until the next objective cannot beat
        the top-th prediction (exact over each placement's best allocation)."""
        plans: list[Plan] = []
        for cand in found:
            if (
                len(plans) >= top
                and cand.solution.objective >= plans[top - 1].prediction["iteration_s"]
            ):
                break
            plans.append(self.to_plan(cand, cluster))
            plans.sort(key=lambda p: p.prediction["iteration_s"])
        return plans[:top]

    def standard(self, cluster: Cluster) -> dict[str, Plan]:
        self._check_cluster(cluster)
        out = {}
        for name, placement in standard_layouts(self.job).items():
            cand = self.solve_placement(placement, cluster.n_gpus)
            if cand is not None:
                out[name] = self.to_plan(cand, cluster)
        return out

    def _check_cluster(self, cluster: Cluster) -> None:
        if cluster.gpus_per_node != self.gpn and cluster.nodes > 1:
            raise UserError(
                f"planner built for {self.gpn}-GPU nodes, cluster has {cluster.gpus_per_node}"
            )

    def smallest_fit(self, limit: int = SEARCH_LIMIT_GPUS) -> int | None:
        """The smallest GPU count (up to one node, or whole nodes) on which some placement fits."""
        best = None
        for placement in set_partitions(self.job.gpu_roles):
            mins = [self.tables.min_size(roles, limit) for roles in placement]
            fits = [m for m in mins if m is not None]
            if len(fits) == len(mins):
                total = sum(fits)
                if total > self.gpn:
                    total = -(-total // self.gpn) * self.gpn
                best = total if best is None else min(best, total)
        return best

    def infeasible_message(self, cluster: Cluster) -> str:
        need = self.smallest_fit()
        job = self.job
        what = (
            f"{job.algorithm} with {', '.join(sorted(set(m for _, m in job.models)))} "
            f"(prompt {job.prompt_len} + response {job.response_len}, batch {job.global_batch})"
        )
        if need is None:
            return (
                f"{what} does not fit in memory on {cluster.n_gpus} {self.profile.name} GPUs, "
                f"nor on any count up to {SEARCH_LIMIT_GPUS}"
            )
        return (
            f"{what} does not fit in memory on {cluster.n_gpus} {self.profile.name} GPUs; "
            f"the smallest GPU count that fits is {need}"
        )


def _planner(
    cluster: Cluster,
    job: Job,
    profile: Profile | str | None,
    planner: Planner | None,
    max_gen_pp: int | None = None,
) -> Planner:
    if planner is not None:
        return planner
    if profile is None or isinstance(profile, str):
        profile = load_profile(profile or cluster.gpu)
    return Planner(job, profile, cluster.gpus_per_node, max_gen_pp=max_gen_pp)


def plan_job(
    cluster: Cluster,
    job: Job,
    profile: Profile | str | None = None,
    top: int = 1,
    planner: Planner | None = None,
    max_gen_pp: int | None = None,
) -> list[Plan]:
    """The `top` best plans, best first. Pass the same `planner` for several cluster sizes
    to reuse its layout tables. Raises DoesNotFit naming the smallest GPU count that fits.
    `max_gen_pp` caps the actor's generation pipeline degree (1: TP-only generation, as the
    executor runs it)."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise UserError(f"top must be a positive integer, got {top!r}")
    return _planner(cluster, job, profile, planner, max_gen_pp).plan(cluster, top)


def standard_placements(
    cluster: Cluster,
    job: Job,
    profile: Profile | str | None = None,
    planner: Planner | None = None,
    max_gen_pp: int | None = None,
) -> dict[str, Plan]:
    """colocated / split / separate, each with its best allocation and layouts; a placement
    that does not fit is absent."""
    return _planner(cluster, job, profile, planner, max_gen_pp).standard(cluster)


__all__ = ["Planner", "plan_job", "standard_placements", "set_partitions", "standard_layouts"]
