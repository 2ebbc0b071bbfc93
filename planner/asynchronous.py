"""The asynchronous search: a rollout set, the training sets beside it, and the staleness.

A candidate is (the scoring roles placed on the rollout side S, the rollout set's size, a
placement of the other roles into training sets, their allocation). The rollout side's best
engine layout (pp, tp, dp) and its scoring roles' layouts at each size come from the same
role tables as the synchronous search (planner.tables), chosen for the side's own produce +
weight_load; each training set's best layouts for its own prepare + train time, the actor
training only. The training sets' allocation is the synchronous search's problem over the
GPUs the rollout set leaves (planner.cpsat): the slowest set's prepare plus the slowest
set's train (consume), with the exposed weight_send in the reshard stage at staleness 0.
So the step of each (S, rollout size, placement) is exact:

    k >= 1: max(produce, min consume) + weight_load
    k  = 0: produce + weight_load + min(consume + weight_send)

and candidates are solved in the order of a lower bound, skipped once it cannot beat the
best found (exact). Every k >= 1 gives the same step (simulator.steady): the search takes
k = 1, the smallest that reaches it; a bound of 0 searches k = 0. The rollout is planned
not streamed (a batch waits for its longest responses); a hand-written plan may say
"streamed". On a host whose devices share its cores (the local cluster) the candidates are
ranked by their unshared step; the chosen plan's prediction adds the sharing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

from hybridflow.layout import ParallelLayout, RolloutLayout
from hybridflow.pipeline import ASYNC, MAX_STALENESS, Pipeline, PipelineError
from hybridflow.plan import PlacedSet, Plan
from hybridflow.planner.choices import SetChoice, _pareto, _Partial
from hybridflow.planner.cpsat import Instance, Solution, brute_force, solve
from hybridflow.planner.search import Placement, Planner, rule_set, set_partitions
from hybridflow.planner.tables import _powers_of_two, set_sizes
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.predict import predict_plan
from hybridflow.simulator.rollout import engine_cost, engine_shape, weight_load, weight_sync
from hybridflow.vocab import ROLLOUT, SCORING_ROLES, STAGES, Kind, Stage

PREPARE, RESHARD = STAGES.index(Stage.PREPARE), STAGES.index(Stage.RESHARD)


@dataclass(frozen=True)
class RolloutChoice:
    """The rollout side at one size: the engines' layout, the scoring roles beside them."""

    layout: RolloutLayout
    scoring: _Partial
    generate_s: float
    load_s: float

    @property
    def produce_s(self) -> float:
        return self.generate_s + self.scoring.stages[PREPARE]

    @property
    def total(self) -> float:
        return self.produce_s + self.load_s


@dataclass(frozen=True)
class AsyncCandidate:
    staleness: int
    rollout: RolloutChoice
    rollout_gpus: int
    placement: Placement  # the training sets
    solution: Solution  # their allocation (and a rule's 0-GPU set last)
    choices: tuple[SetChoice, ...]

    @property
    def objective(self) -> float:
        return step_s(self.staleness, self.rollout, self.solution.objective)


Entry = tuple[float, RolloutChoice, int, Placement, Instance]


def step_s(k: int, rc: RolloutChoice, consume: float) -> float:
    """The step of a rollout choice and a training allocation's objective (its consume,
    plus the weight_send at k = 0)."""
    if k == 0:
        return rc.produce_s + rc.load_s + consume
    return max(rc.produce_s, consume) + rc.load_s


def staleness_searched(bound: int) -> int:
    """The k the search plans with: 1 (every k >= 1 gives the same step), 0 if bound 0."""
    if isinstance(bound, bool) or not isinstance(bound, int) or not 0 <= bound <= MAX_STALENESS:
        raise PipelineError(
            f"--staleness must be an integer from 0 to {MAX_STALENESS}, got {bound!r}"
        )
    return min(bound, 1)


class AsyncSearch:
    """Asynchronous plans of one job, on the synchronous planner's tables."""

    def __init__(self, planner: Planner, staleness: int = 1) -> None:
        self.planner, self.tables, self.job = planner, planner.tables, planner.job
        self.k = staleness_searched(staleness)
        self._rollout: dict[tuple[tuple[str, ...], int, bool], RolloutChoice | None] = {}
        self._train: dict[tuple[tuple[str, ...], int, bool], SetChoice | None] = {}
        self._gen: dict[tuple[RolloutLayout, int], float] = {}
        self.intra = True  # a one-node cluster syncs weights inside the node (the search's)
        self._rows: dict[tuple, list[tuple[int, tuple[float, ...]]]] = {}

    @property
    def gpn(self) -> int:
        return self.tables.gpn

    # ---- the rollout side ---------------------------------------------------------
    def scoring_sides(self) -> list[tuple[str, ...]]:
        """Every subset of the job's scoring models (reward, cost) beside the engines."""
        scoring = [r for r in self.job.gpu_roles if r in SCORING_ROLES]
        return [c for n in range(len(scoring) + 1) for c in itertools.combinations(scoring, n)]

    def rollout_layouts(self, n: int) -> Iterator[RolloutLayout]:
        spec = self.job.spec("actor")
        top_pp = self.tables.max_gen_pp or spec.layers
        for tp in _powers_of_two(min(self.gpn, n)):
            if spec.heads % tp or (spec.kv_heads % tp and tp % spec.kv_heads):
                continue  # vLLM copies KV heads to fill a larger tp
            for pp in range(1, min(top_pp, spec.layers) + 1):
                if n % (pp * tp) == 0:
                    yield RolloutLayout(pp, tp, n // (pp * tp))

    def rollout(self, scoring: tuple[str, ...], n: int, prune: bool = True) -> RolloutChoice | None:
        """The rollout side's fastest produce + weight_load on n GPUs, or None."""
        key = (scoring, n, prune)
        if key not in self._rollout:
            self._rollout[key] = self._search_rollout(scoring, n, prune)
        return self._rollout[key]

    def _search_rollout(
        self, scoring: tuple[str, ...], n: int, prune: bool
    ) -> RolloutChoice | None:
        job, prof, usable = self.job, self.tables.profile, self.tables.profile.usable_bytes
        partials = self.tables._partials(scoring, n, prune)
        best: RolloutChoice | None = None
        for lay in self.rollout_layouts(n):
            shape, engine = engine_shape(job, lay)
            load = weight_load(job, lay, prof).seconds
            for p in partials:
                slots = shape.in_flight(usable - p.resident - p.transient - engine)
                if slots < 1:
                    continue
                if (lay, slots) not in self._gen:
                    self._gen[(lay, slots)] = engine_cost(
                        job, lay, shape, slots, prof, self.gpn
                    ).seconds
                choice = RolloutChoice(lay, p, self._gen[(lay, slots)], load)
                if best is None or choice.total < best.total:
                    best = choice
        return best

    # ---- the training side --------------------------------------------------------
    def train_set(self, roles: tuple[str, ...], n: int, prune: bool = True) -> SetChoice | None:
        """A training set's fastest prepare + train on n GPUs (the actor training only)."""
        key = (roles, n, prune)
        if key not in self._train:
            others = tuple(r for r in roles if r != "actor")
            partials = sorted(self.tables._partials(others, n, prune), key=lambda p: p.total)
            if "actor" not in roles:
                self._train[key] = _choice(partials[0]) if partials else None
            else:
                self._train[key] = self._with_actor(partials, n, prune)
        return self._train[key]

    def _with_actor(self, partials: list[_Partial], n: int, prune: bool) -> SetChoice | None:
        """The training actor's layout and the other roles' (partials, fastest first) with
        the least prepare + train that fit together; pruned, actors are taken fastest first
        and stop once none can win (exact: a candidate's time is the sum of its parts)."""
        usable, best = self.tables.profile.usable_bytes, None
        actors = self.tables.role_candidates("actor", n, prune)
        floor = partials[0].total if partials else 0.0
        for a in sorted(_pareto(actors) if prune else actors, key=lambda c: c.total):
            if prune and best is not None and a.total + floor >= best.total:
                break
            for p in partials:  # the first that fits is this actor's best
                if p.resident + a.resident + max(p.transient, a.transient) <= usable:
                    merged = _Partial(
                        p.resident + a.resident,
                        max(p.transient, a.transient),
                        tuple(x + y for x, y in zip(a.stages, p.stages)),
                        (("actor", {Kind.TRAIN: a.layout}),) + p.layouts,
                        (("actor", a.settings),) + p.memory,
                    )
                    if best is None or merged.total < best.total:
                        best = _choice(merged)
                    break
        return best

    def _send_s(self, choice: SetChoice, rc: RolloutChoice) -> float:
        layouts = dict(choice.layouts)
        if self.k != 0 or "actor" not in layouts:
            return 0.0
        train = layouts["actor"]["train"]
        assert isinstance(train, ParallelLayout)
        fsdp = dict(choice.memory)["actor"].fsdp
        c = weight_sync(self.job, train, fsdp, rc.layout, self.tables.profile, self.intra)
        return c.seconds - rc.load_s

    def train_rows(
        self, roles: tuple[str, ...], capacity: int, rc: RolloutChoice, prune: bool = True
    ) -> list[tuple[int, tuple[float, ...]]]:
        """A training set's (size, stage seconds) up to `capacity`, the weight_send in the
        reshard stage where exposed (staleness 0); undominated sizes only where pruned."""
        key = (roles, capacity, prune, rc.layout if self.k == 0 else None)
        if key not in self._rows:
            self._rows[key] = self._train_rows(roles, capacity, rc, prune)
        return self._rows[key]

    def _train_rows(
        self, roles: tuple[str, ...], capacity: int, rc: RolloutChoice, prune: bool
    ) -> list[tuple[int, tuple[float, ...]]]:
        rows = []
        for n in set_sizes(self.gpn, capacity):
            c = self.train_set(roles, n, prune)
            if c is not None:
                stages = list(c.stages)
                stages[RESHARD] += self._send_s(c, rc)
                rows.append((n, tuple(stages)))
        return _undominated(rows) if prune else rows

    def instance(
        self, placement: Placement, capacity: int, rc: RolloutChoice, prune: bool = True
    ) -> Instance | None:
        if capacity <= 0:
            return None
        rows = [self.train_rows(roles, capacity, rc, prune) for roles in placement]
        if not all(rows):
            return None
        spare = capacity - sum(r[0][0] for r in rows)
        if spare < 0:
            return None
        sizes = [tuple(n for n, _ in r if n - r[0][0] <= spare) for r in rows]
        costs = [tuple(c for n, c in r if n - r[0][0] <= spare) for r in rows]
        rules = rule_set(self.job)
        if rules is not None:
            sizes.append(rules[0])
            costs.append(rules[1])
        return Instance(capacity, tuple(sizes), tuple(costs))

    # ---- the search ---------------------------------------------------------------
    def candidates(self, cluster: Cluster) -> Iterator[Entry]:
        """(lower bound on the step, rollout side, its size, training placement, the
        training allocation's instance) of every candidate."""
        if self.intra != (cluster.n_gpus <= self.gpn):  # the exposed weight_send's link
            self.intra, self._rows = cluster.n_gpus <= self.gpn, {}
        for scoring in self.scoring_sides():
            rest = tuple(r for r in self.job.gpu_roles if r not in scoring)
            for n in set_sizes(self.gpn, cluster.n_gpus - 1):
                rc = self.rollout(scoring, n)
                if rc is None:
                    continue
                for placement in set_partitions(rest):
                    inst = self.instance(placement, cluster.n_gpus - n, rc)
                    if inst is not None:
                        yield step_s(self.k, rc, _lower_bound(inst)), rc, n, placement, inst

    def best(self, cluster: Cluster) -> AsyncCandidate | None:
        """The fastest asynchronous candidate (exact over the tables' choices)."""
        found: AsyncCandidate | None = None
        ranked = sorted(self.candidates(cluster), key=lambda c: c[0])
        for bound, rc, n, placement, inst in ranked:
            if found is not None and bound >= found.objective:
                break
            cand = self._solve(inst, rc, n, placement, found)
            if cand is not None and (found is None or cand.objective < found.objective):
                found = cand
        return found

    def _solve(
        self,
        inst: Instance,
        rc: RolloutChoice,
        n: int,
        placement: Placement,
        found: AsyncCandidate | None,
    ) -> AsyncCandidate | None:
        cutoff = math.inf
        if found is not None:  # the consume (+ send) that could still beat it
            cutoff = found.objective - rc.load_s - (rc.produce_s if self.k == 0 else 0.0)
        sol = brute_force(inst) if len(placement) == 1 else solve(inst, self.planner.config, cutoff)
        if sol is None:
            return None
        choices = []
        for roles, g in zip(placement, sol.gpus):
            choice = self.train_set(roles, g)
            assert choice is not None, f"{roles} fit on {g} GPUs"
            choices.append(choice)
        return AsyncCandidate(self.k, rc, n, placement, sol, tuple(choices))

    def to_plan(self, cand: AsyncCandidate, cluster: Cluster) -> Plan:
        sets = [
            PlacedSet(roles, g, dict(c.layouts), dict(c.memory))
            for roles, g, c in zip(cand.placement, cand.solution.gpus, cand.choices)
        ]
        rc = cand.rollout
        layouts = {ROLLOUT: {"generate": rc.layout}, **dict(rc.scoring.layouts)}
        sets.append(PlacedSet((ROLLOUT, *dict(rc.scoring.layouts)), cand.rollout_gpus, layouts))
        plan = Plan(cluster, self.job, tuple(sets), pipeline=Pipeline(ASYNC, cand.staleness))
        prof, scheme = self.tables.profile, self.planner.scheme
        return plan.with_prediction(predict_plan(plan, prof, scheme).to_dict())

    def plan(self, cluster: Cluster) -> Plan | None:
        """The best asynchronous plan, or None if none fits."""
        self.planner._check_cluster(cluster)
        if self.tables.profile.overheads.sharing:
            return self._plan_shared(cluster)
        cand = self.best(cluster)
        return None if cand is None else self.to_plan(cand, cluster)

    def solved(self, cluster: Cluster) -> list[AsyncCandidate]:
        """Every candidate's best allocation (no bound), fastest step first."""
        found = (
            self._solve(inst, rc, n, p, None) for _, rc, n, p, inst in self.candidates(cluster)
        )
        return sorted((c for c in found if c is not None), key=lambda c: c.objective)

    def _plan_shared(self, cluster: Cluster) -> Plan | None:
        """On a host whose devices share its cores the two sides, working at once, slow each
        other, which the step of the tables leaves out: the prediction ranks. It is never
        below a candidate's step (slowdowns >= 1), so candidates are predicted in step order
        until the next step cannot beat the best prediction (exact; such clusters are
        small, so every candidate is solved)."""
        best: Plan | None = None
        for cand in self.solved(cluster):
            if best is not None and cand.objective >= best.prediction["iteration_s"]:
                break
            plan = self.to_plan(cand, cluster)
            if best is None or plan.prediction["iteration_s"] < best.prediction["iteration_s"]:
                best = plan
        return best


def _choice(p: _Partial) -> SetChoice:
    return SetChoice(p.layouts, p.stages, p.resident + p.transient, p.memory)


def _undominated(
    rows: list[tuple[int, tuple[float, ...]]],
) -> list[tuple[int, tuple[float, ...]]]:
    """Sizes no faster in any stage than a smaller size never help an allocation (exact)."""
    keep: list[tuple[int, tuple[float, ...]]] = []
    for n, c in sorted(rows, key=lambda r: r[0]):
        if not any(all(a <= b for a, b in zip(k, c)) for _, k in keep):
            keep.append((n, c))
    return keep


def _lower_bound(inst: Instance) -> float:
    """No allocation of the training sets consumes faster than this."""
    per_stage = sum(
        max(min(c[k] for c in costs) for costs in inst.costs) for k in range(inst.n_stages)
    )
    per_set = max(min(sum(c) for c in costs) for costs in inst.costs)
    return max(per_stage, per_set)
