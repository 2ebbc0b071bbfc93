"""Per-call costs of the executor's worker methods, measured with the executor's own parts.

On a model this small every stage of an iteration is a handful of calls whose fixed costs
(the controller's Ray round trip, megatron's per-step work, vLLM's per-call scheduling,
resharding with vLLM's weight reload) outweigh the FLOPs, so they are measured as the run
makes them: a local Ray cluster, one worker group of k ranks per set size (one Ray actor per
logical device, one thread each, all k busy at once: k = 4 puts 4 ranks on the host's cores
exactly as a 4-device set of `hybridflow run` does), and RLWorker's own methods on a random
model of every layout a set of k devices allows:

- forward: ``response_outputs`` over s sequences per DP rank (the prepare stage's calls);
- train_step: ``update`` with one mini-batch (one optimizer step over s sequences per DP rank,
  the executor's micro-batch size), and the optimizer step's share of it;
- generate: ``generate`` of an actor in each (generation tp, micro-DP) its layouts reach, over
  s prompts per generation replica and t new tokens, with the micro-DP gather; its
  resharding (to the generation layout incl. vLLM's weight reload, and back) is ``reshard``;
- dispatch: each call's wall time at the controller minus its slowest rank's own time.

The forward and train_step tables are measured twice, for an LM (the actor's loss) and for a
model with a value head (the critic's loss): `forward_value`, `train_step_value`.

The layouts of k ranks are measured in one worker group of k processes, as a run's set of
k devices holds its roles: the generation layouts in order of generation tp, those with the
same generation TP groups (one vLLM engine; micro-DP 1, 2 and 4 at tg 1) all at once, each
round through all of their calls (the next engine starts once the last one is shut down),
and after the first engine's, with it still alive (as a run's actor set trains beside
its engine; it slowed megatron's calls by about a fifth on a 2-core VM), all training
layouts at once, each round through all of their calls. Each generate call follows an
optimizer step of its actor, as a run's generation follows its update. Process groups are
shared per rank list (hybridflow.executor.engines.groups.shared_new_groups) by the roles and by each engine
and its successor: groups kept per role, and vLLM's ~10 per engine, had piled up idle gloo
threads and slowed what was measured last up to twice. The worker groups of 1, 2 and 4
ranks, and the one-rank sets timed at once, are new worlds over the same 4 processes
(hybridflow.executor.profiler.rank_pool), which import megatron-core and vLLM once, all together.

Rows give the slowest rank's seconds (a call ends with its slowest rank): after a warm-up
round, the mean over rounds through all the calls measured together; with `sweeps` > 1
(`hybridflow profile --sweeps`), the rounds are split among that many passes over all the
groups (1, 2, 4 ranks, then again), minutes apart, and pooled.
This VM's own speed drifts by ~20% over tens of seconds (the same calls on 4 processes in
turn: per-process means within 3%, means over successive 10-s spans 0.088 to 0.071 s), and
a run's iteration time is a mean over such phases: so rows are means, not medians or
minima (those had come out 10-20% below the runs), and each row's rounds are spread over
its group's measurement rather than taken in a block of their own. Two sweeps (7 min 51 s
instead of 4-5.5) did not make profiles agree better: rows of profiles taken half an hour
apart differed by 13% on average with two sweeps, 14-21% with one (the host's speed moves
over minutes and hours too). Where a row exceeds a larger size's (more work never takes
less time), the two are pooled into their mean (isotonic fit, hybridflow.executor.profiler.calls_tables),
which keeps the table's mean where a clamp would lower it.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from hybridflow.simulator.model import ModelSpec, load_model


@dataclass(frozen=True)
class CallsGrid:
    model: str = "tiny"
    group_sizes: tuple[int, ...] = (1, 2, 4)
    sequences: tuple[int, ...] = (4, 8, 16, 32)   # per DP rank (forward, train step)
    gen_sequences: tuple[int, ...] = (8, 32)      # per generation replica
    prompt_len: int = 16
    response_len: int = 8
    repeats: int = 4            # rounds of the forward and train calls
    gen_repeats: int = 3        # rounds of the generate calls (each one reshards too)
    sweeps: int = 1             # passes over every worker group, the rounds split among them
    micro_batch_per_rank: int = 4  # the optimizer step before each generate call
    concurrency: bool = True    # time calls of one-rank sets running at once (sharing)

    def __post_init__(self) -> None:
        spec = load_model(self.model)
        for name in ("group_sizes", "sequences", "gen_sequences"):
            vals = getattr(self, name)
            if not vals or any(not isinstance(v, int) or v <= 0 for v in vals):
                raise ValueError(f"calls grid {name} must be positive integers: {vals}")
        if min(self.prompt_len, self.response_len, self.repeats, self.gen_repeats,
               self.sweeps) < 1:
            raise ValueError("prompt_len, response_len, repeats and sweeps must be >= 1")
        if self.prompt_len + self.response_len > spec.max_position:
            raise ValueError(f"model {self.model!r} holds {spec.max_position} positions")

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    def per_sweep(self, rounds: int) -> int:
        """Rounds of a call in each sweep: `rounds` split among the sweeps (at least 1)."""
        return -(-rounds // self.sweeps)


def default_grid(quick: bool, model: str = "tiny", sweeps: int = 1) -> CallsGrid:
    if quick:
        return CallsGrid(model, sequences=(4, 16, 32), gen_sequences=(8, 32), repeats=2,
                         gen_repeats=1, sweeps=sweeps)
    return CallsGrid(model, sweeps=sweeps)


def _pow2(limit: int) -> list[int]:
    out, v = [], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def train_layouts(spec: ModelSpec, k: int) -> list[tuple[int, int, int]]:
    """(tp, pp, dp) of every layout of k devices the model allows (the planner's choices)."""
    return [(t, p, k // (t * p)) for t in _pow2(k) if spec.heads % t == 0 and spec.kv_heads % t == 0
            for p in range(1, spec.layers + 1) if spec.layers % p == 0 and k % (t * p) == 0]


def generation_configs(spec: ModelSpec, k: int) -> list[tuple[int, int]]:
    """(training tp, generation tp) covering each (generation tp, micro-DP) of k devices
    once: generation pp is 1, so micro-DP = tp / tg (pp > 1 layouts share these). Ordered
    by generation tp, so that layouts whose vLLM engines are alike follow each other."""
    return sorted(((t, g) for t, p, _ in train_layouts(spec, k) if p == 1 for g in _pow2(t)
                   if spec.heads % g == 0), key=lambda c: (c[1], c[0]))


# ---- batches as the controller builds them ------------------------------------------------
def sequence_batch(n: int, grid: CallsGrid, vocab: int, seed: int = 0) -> "Batch":
    """n sequences with every field the prepare and train calls read."""
    from hybridflow.executor.controller.batch import Batch
    g = torch.Generator().manual_seed(seed)
    P, R = grid.prompt_len, grid.response_len
    ids = torch.randint(4, vocab, (n, P + R), generator=g)
    resp = torch.ones(n, R, dtype=torch.long)
    small = torch.randn(n, R, generator=g) * 0.1
    return Batch({"input_ids": ids, "attention_mask": torch.ones(n, P + R, dtype=torch.long),
                  "responses": ids[:, P:], "response_mask": resp, "old_log_probs": small - 2.0,
                  "ref_log_probs": small - 2.0, "advantages": small, "returns": small,
                  "values": small}, meta={"prompt_len": P})


@dataclass
class Recorder:
    """Times calls on a worker group: controller wall and each rank's own seconds."""
    group: object
    repeats: int

    def _once(self, role: str, method: str, args: tuple) -> tuple[float, dict[str, float]]:
        t0 = time.perf_counter()
        self.group.run(role, method, *args)
        wall = time.perf_counter() - t0
        ranks = [c[-1] for c in self.group.run(None, "take_seconds")]
        slowest = max(ranks, key=lambda c: c["seconds"])
        return wall, {k: max(c.get(k, 0.0) for c in ranks) for k in slowest}

    def rounds(self, calls: list[tuple[object, str, str, tuple]]
               ) -> dict[object, tuple[float, dict[str, float]]]:
        """{name: (wall, the slowest rank's own seconds and parts)} of each (name, role,
        method, args): a warm-up round through the whole list (lazy set-up, and the first
        calls of each size after a vLLM engine starts, which had come out up to a third
        slower), then `repeats` rounds, so that a burst of other load lands in one round of
        every call rather than in all rounds of a few; the mean over rounds."""
        for _, role, method, args in calls:
            self._once(role, method, args)
        got: dict[object, list[tuple[float, dict[str, float]]]] = {}
        for _ in range(self.repeats):
            for name, role, method, args in calls:
                got.setdefault(name, []).append(self._once(role, method, args))
        return {name: (statistics.fmean(w for w, _ in runs),
                       {k: statistics.fmean(o.get(k, 0.0) for _, o in runs)
                        for k in set().union(*(o for _, o in runs))})
                for name, runs in got.items()}


def _engine_config(value_head: bool):
    from hybridflow.executor.run.config import RunConfig
    from hybridflow.executor.rl.runtime import engine_config
    return engine_config("critic" if value_head else "actor", RunConfig())


def _losses(grid: CallsGrid, value: bool):
    from hybridflow.executor.rl import algorithms as alg
    from hybridflow.executor.rl.worker import ActorLoss, CriticLoss
    loss = CriticLoss if value else ActorLoss
    return loss(alg.RLConfig(algorithm="ppo"), grid.prompt_len, grid.response_len)


def measure_layouts(rec: Recorder, grid: CallsGrid, spec: ModelSpec, k: int,
                    layouts: list[tuple[int, int, int]], out: dict[str, list[dict]]) -> None:
    """forward and train_step rows, of an LM and of a value model, (and dispatch rows) of
    each (tp, pp, dp) on k ranks: all their roles at once, each round through every
    layout's calls, so that each row's rounds spread over the whole measurement (this VM's
    speed drifts by ~20% over tens of seconds; a row timed in a block of its own took on
    the speed of that block)."""
    from hybridflow.layout import ParallelLayout
    calls, roles = [], []
    for tp, pp, dp in layouts:
        for value in (False, True):
            role = f"{'value' if value else 'lm'}-tp{tp}-pp{pp}"
            rec.group.add_role(role, grid.model, ParallelLayout(tp=tp, pp=pp, dp=dp),
                               _engine_config(value))
            roles.append(role)
            loss = _losses(grid, value)
            for s in grid.sequences:
                batch = sequence_batch(s * dp, grid, spec.vocab, seed=s)
                calls += [(("forward", tp, pp, value, s), role, "profile_outputs",
                           (batch, "out")),
                          (("train", tp, pp, value, s), role, "profile_update",
                           (batch, loss, 1, 1))]
    got = rec.rounds(calls)
    for (tp, pp, dp), value, s in ((lay, v, s) for lay in layouts for v in (False, True)
                                   for s in grid.sequences):
        suffix = "_value" if value else ""
        key = dict(ranks=k, tp=tp, pp=pp, sequences=s)
        (fw_wall, fw) = got[("forward", tp, pp, value, s)]
        (tr_wall, tr) = got[("train", tp, pp, value, s)]
        out["forward" + suffix].append({**key, "seconds": fw["seconds"]})
        out["train_step" + suffix].append({**key, "seconds": tr["seconds"],
                                           "optimizer_s": tr.get("optimizer_s", 0.0)})
        out["dispatch_forward"].append(dict(ranks=k, sequences=s * dp,
                                            seconds=max(fw_wall - fw["seconds"], 1e-6)))
        out["dispatch_train"].append(dict(ranks=k, sequences=s * dp,
                                          seconds=max(tr_wall - tr["seconds"], 1e-6)))
    for role in roles:
        rec.group.run(role, "drop_role")


def engine_batches(spec: ModelSpec, k: int, scheme: str) -> list[tuple[int, list[int]]]:
    """(generation tp, the training tps) of k devices whose generation layouts use one vLLM
    engine (the same generation TP groups), in generation_configs' order: a batch is
    measured together, its rounds interleaved."""
    from hybridflow.executor.hybrid_engine.reshard_plan import ReshardPlan
    from hybridflow.layout import ParallelLayout
    batches: dict[tuple[tuple[int, ...], ...], tuple[int, list[int]]] = {}
    for tp, tg in generation_configs(spec, k):
        groups = ReshardPlan(ParallelLayout(1, tp, k // tp), tg, scheme).gen_tp_groups()
        batches.setdefault(tuple(map(tuple, groups)), (tg, []))[1].append(tp)
    return list(batches.values())


def _generation_calls(grid: CallsGrid, spec: ModelSpec, k: int, tp: int, tg: int,
                      role: str) -> list:
    """An actor's generate calls, each after an optimizer step, as in a run (the update,
    then the next iteration's generation): resharding and vLLM find the caches a run
    leaves them."""
    from hybridflow.executor.controller.batch import Batch
    from hybridflow.executor.run.config import RunConfig
    from hybridflow.executor.engines.vllm_engine import SamplingConfig
    cfg = RunConfig()
    update = (("update", tp), role, "profile_update",
              (sequence_batch(grid.micro_batch_per_rank * (k // tp), grid, spec.vocab),
               _losses(grid, False), 1, 1))
    calls = []
    for s in grid.gen_sequences:
        prompts = [[4 + (7 * i + 3 * j) % (spec.vocab - 4) for j in range(grid.prompt_len)]
                   for i in range(s * k // tg)]
        for tokens in sorted({1, grid.response_len}):
            sampling = SamplingConfig(temperature=cfg.temperature, max_tokens=tokens,
                                      seed=s * 31 + tokens, ignore_eos=True)
            calls += [update, ((tp, s, tokens), role, "profile_generate",
                               (Batch(non_tensors={"prompt_ids": prompts}), sampling))]
    return calls


def measure_generation(rec: Recorder, grid: CallsGrid, spec: ModelSpec, k: int,
                       tps: list[int], tg: int, model_dir: str,
                       out: dict[str, list[dict]]) -> None:
    """generate and reshard rows of actors trained at tp x dp = k (each tp of `tps`)
    generating at tg with one vLLM engine: all their roles at once, each round through
    every layout's calls, so that rows of the same engine work (micro-DP 1, 2, 4) take
    the same phases of this VM's speed rather than each a block of its own."""
    from hybridflow.layout import ParallelLayout
    from hybridflow.executor.rl.worker import RolloutConfig
    from hybridflow.executor.run.config import RunConfig
    cfg = RunConfig()
    roles, calls = [], []
    try:
        for tp in tps:
            role = f"gen-tp{tp}-tg{tg}"
            rec.group.add_role(role, grid.model, ParallelLayout(tp=tp, pp=1, dp=k // tp),
                               _engine_config(False))
            roles.append(role)
            rec.group.run(role, "init_rollout", RolloutConfig(
                tg=tg, scheme=cfg.reshard, model_dir=model_dir,
                kv_cache_bytes=cfg.kv_cache_mib << 20, max_model_len=grid.seq_len,
                seed=cfg.seed))
            calls += _generation_calls(grid, spec, k, tp, tg, role)
        got = rec.rounds(calls)
    finally:
        for role in roles:
            rec.group.run(role, "drop_role")
    replicas = k // tg
    for (tp, s, tokens), (wall, own) in ((n, v) for n, v in got.items() if n[0] != "update"):
        gen, resh = own.get("generate_s", 0.0), own.get("reshard_s", 0.0)
        if own.get("vllm_s", 0.0) > 1.01 * gen:
            raise RuntimeError(f"profiling gen-tp{tp}-tg{tg}: vLLM's clock "
                               f"({own['vllm_s']:.3f} s) exceeds its generate call's")
        out["generate"].append(dict(ranks=k, tg=tg, micro_dp=tp // tg, sequences=s,
                                    tokens=tokens, seconds=gen, vllm_s=own.get("vllm_s", 0.0)))
        out["dispatch_generate"].append(dict(ranks=k, sequences=s * replicas,
                                             seconds=max(wall - gen - resh, 1e-6)))
        out["reshard"].append(dict(ranks=k, tg=tg, micro_dp=tp // tg, seconds=resh))


Step = tuple[str, Callable]  # (description, fn(group, model_dir, out))


def _groups(grid: CallsGrid, spec: ModelSpec) -> list[tuple[int, list[Step]]]:
    """(group size, its steps) of each worker group in measuring order: one group per set
    size k, its generation layouts by vLLM engine (generation tp), the training layouts
    after the first engine's, beside it (see the module docstring)."""
    from hybridflow.executor.run.config import RunConfig
    groups: list[tuple[int, list[Step]]] = []
    for k in grid.group_sizes:
        gen_rounds = grid.per_sweep(grid.gen_repeats)
        by_engine: list[Step] = []
        for tg, tps in engine_batches(spec, k, RunConfig().reshard):
            by_engine.append((f"generate tp{','.join(map(str, tps))}->tg{tg} on {k}",
                              lambda g, d, o, k=k, tps=tps, tg=tg:
                              measure_generation(Recorder(g, gen_rounds), grid, spec, k,
                                                 tps, tg, d, o)))
        steps: list[Step] = []
        for i, gen_step in enumerate(by_engine):
            steps.append(gen_step)
            if i == 0:
                lays = train_layouts(spec, k)
                steps.append((f"train/forward, {len(lays)} layouts on {k}",
                              lambda g, d, o, k=k, lays=lays: measure_layouts(
                                  Recorder(g, grid.per_sweep(grid.repeats)), grid, spec, k,
                                  lays, o)))
        groups.append((k, steps))
    return groups


TABLES = ("forward", "train_step", "forward_value", "train_step_value", "generate", "reshard",
          "dispatch_forward", "dispatch_train", "dispatch_generate")


def measure_calls(grid: CallsGrid, progress: Callable[[str], None] | None = None,
                  timings: dict[str, float] | None = None) -> dict[str, list[dict]]:
    """Every table of the module docstring: TABLES -> rows. `timings` gets the seconds each
    group's start and each layout took."""
    timings = {} if timings is None else timings
    from hybridflow.executor.controller.cluster import Cluster, ClusterConfig
    from hybridflow.executor.profiler.vllm_steps import save_random_llama
    from hybridflow.executor.profiler.rank_pool import RankPool
    spec = load_model(grid.model)
    out: dict[str, list[dict]] = {k: [] for k in TABLES}  # + "concurrency" (sharing factors)
    groups = _groups(grid, spec)
    n = max(grid.group_sizes)
    with tempfile.TemporaryDirectory(prefix="hf-calls-") as tmp, \
            Cluster.start(ClusterConfig(devices=n)) as cluster:
        model_dir = str(save_random_llama(spec, Path(tmp), "float32"))
        t0 = time.perf_counter()
        if progress:
            progress(f"start {n} ranks")
        with RankPool(cluster, n) as ranks:
            timings[f"start {n} ranks"] = round(time.perf_counter() - t0, 1)
            for sweep in range(grid.sweeps):
                for k, steps in groups:
                    _measure_group(ranks, k, steps, model_dir, out, timings, progress,
                                   f" (sweep {sweep + 1})" if sweep else "")
            if grid.concurrency:
                if progress:
                    progress("concurrent one-rank sets")
                t0 = time.perf_counter()
                from hybridflow.executor.profiler.calls_sharing import measure_concurrency
                out["concurrency"] = [{"ranks": c, "factor": f} for c, f in
                                      measure_concurrency(ranks, grid, spec, n).items()]
                timings["concurrent sets"] = round(time.perf_counter() - t0, 1)
    return out


def _measure_group(ranks, k: int, steps: list[Step], model_dir: str,
                   out: dict[str, list[dict]], timings: dict[str, float],
                   progress: Callable[[str], None] | None, sweep: str = "") -> None:
    """Run `steps` on a worker group of the pool's first k ranks, then release it."""
    group = ranks.group(range(k), f"profile-calls-{k}")
    with ranks.lent([group]):
        for desc, fn in steps:
            if progress:
                progress(desc + sweep)
            t0 = time.perf_counter()
            fn(group, model_dir, out)
            timings[desc + sweep] = round(time.perf_counter() - t0, 1)
