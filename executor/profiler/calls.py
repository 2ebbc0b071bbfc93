"""Per-call costs of the executor's worker methods, measured with the executor's own parts.

On a small model every stage of an iteration is a handful of calls whose fixed costs (the
controller's Ray round trip, megatron's per-step work, vLLM's per-call scheduling,
resharding with vLLM's weight reload) outweigh the FLOPs, so they are measured as a run
makes them: a local Ray cluster, one worker group of k ranks per set size (one Ray actor per
logical device, all k busy at once, as a k-device set of `hybridflow run`), and RLWorker's
own methods on a random model in every layout k devices allow:

- forward: ``response_outputs`` over s sequences per DP rank (the prepare stage's calls);
- train_step: ``update`` with one mini-batch, and the optimizer step's share of it;
- generate: ``generate`` of an actor in each (generation tp, micro-DP) its layouts reach,
  with the micro-DP gather; its resharding (to the generation layout incl. vLLM's weight
  reload, and back) is ``reshard``;
- dispatch: each call's wall time at the controller minus its slowest rank's own time;

each for an LM (the actor's loss) and a value model (the critic's: ``*_value``). The layouts
of k ranks share one worker group and are measured as a run holds them: the generation
layouts by vLLM engine, the training layouts beside the first engine, each generate call
after an optimizer step; rounds through all of a batch's calls, so that a row's rounds
spread over the whole measurement. Rows are the slowest rank's seconds, the mean over the
rounds. Why it is done this way, with the measurements that decided it: profiles/README.md
("Per-call tables of the executor").
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hybridflow.executor.controller.batch import Batch
from hybridflow.executor.controller.cluster import Cluster, ClusterConfig
from hybridflow.executor.engines.vllm_engine import SamplingConfig
from hybridflow.executor.hybrid_engine.reshard_plan import ReshardPlan
from hybridflow.executor.profiler.calls_grid import (
    CallsGrid,
    Recorder,
    generation_configs,
    role_engine_config,
    role_loss,
    sequence_batch,
    train_layouts,
)
from hybridflow.executor.profiler.calls_sharing import measure_concurrency
from hybridflow.executor.profiler.rank_pool import RankPool
from hybridflow.executor.profiler.vllm_steps import save_random_llama
from hybridflow.executor.rl.worker import RolloutConfig
from hybridflow.executor.run.config import RunConfig
from hybridflow.layout import ParallelLayout
from hybridflow.simulator.architecture import ModelSpec
from hybridflow.simulator.model import load_model


def measure_layouts(
    rec: Recorder,
    grid: CallsGrid,
    spec: ModelSpec,
    k: int,
    layouts: list[tuple[int, int, int]],
    out: dict[str, list[dict]],
) -> None:
    """forward and train_step rows, of an LM and of a value model, (and dispatch rows) of
    each (tp, pp, dp) on k ranks: all their roles at once, each round through every
    layout's calls, so that each row's rounds spread over the whole measurement (this VM's
    speed drifts by ~20% over tens of seconds; a row timed in a block of its own took on
    the speed of that block)."""
    calls, roles = [], []
    for tp, pp, dp in layouts:
        for value in (False, True):
            role = f"{'value' if value else 'lm'}-tp{tp}-pp{pp}"
            rec.group.add_role(
                role, grid.model, ParallelLayout(tp=tp, pp=pp, dp=dp), role_engine_config(value)
            )
            roles.append(role)
            loss = role_loss(grid, value)
            for s in grid.sequences:
                batch = sequence_batch(s * dp, grid, spec.vocab, seed=s)
                calls += [
                    (("forward", tp, pp, value, s), role, "profile_outputs", (batch, "out")),
                    (("train", tp, pp, value, s), role, "profile_update", (batch, loss, 1, 1)),
                ]
    got = rec.rounds(calls)
    for (tp, pp, dp), value, s in (
        (lay, v, s) for lay in layouts for v in (False, True) for s in grid.sequences
    ):
        suffix = "_value" if value else ""
        key = dict(ranks=k, tp=tp, pp=pp, sequences=s)
        (fw_wall, fw) = got[("forward", tp, pp, value, s)]
        (tr_wall, tr) = got[("train", tp, pp, value, s)]
        out["forward" + suffix].append({**key, "seconds": fw["seconds"]})
        out["train_step" + suffix].append(
            {**key, "seconds": tr["seconds"], "optimizer_s": tr.get("optimizer_s", 0.0)}
        )
        out["dispatch_forward"].append(
            dict(ranks=k, sequences=s * dp, seconds=max(fw_wall - fw["seconds"], 1e-6))
        )
        out["dispatch_train"].append(
            dict(ranks=k, sequences=s * dp, seconds=max(tr_wall - tr["seconds"], 1e-6))
        )
    for role in roles:
        rec.group.run(role, "drop_role")


def engine_batches(spec: ModelSpec, k: int, scheme: str) -> list[tuple[int, list[int]]]:
    """(generation tp, the training tps) of k devices whose generation layouts use one vLLM
    engine (the same generation TP groups), in generation_configs' order: a batch is
    measured together, its rounds interleaved."""
    batches: dict[tuple[tuple[int, ...], ...], tuple[int, list[int]]] = {}
    for tp, tg in generation_configs(spec, k):
        groups = ReshardPlan(ParallelLayout(1, tp, k // tp), tg, scheme).gen_tp_groups()
        batches.setdefault(tuple(map(tuple, groups)), (tg, []))[1].append(tp)
    return list(batches.values())


def _generation_calls(
    grid: CallsGrid, spec: ModelSpec, k: int, tp: int, tg: int, role: str
) -> list:
    """An actor's generate calls, each after an optimizer step, as in a run (the update,
    then the next iteration's generation): resharding and vLLM find the caches a run
    leaves them."""
    cfg = RunConfig()
    update = (
        ("update", tp),
        role,
        "profile_update",
        (
            sequence_batch(grid.micro_batch_per_rank * (k // tp), grid, spec.vocab),
            role_loss(grid, False),
            1,
            1,
        ),
    )
    calls = []
    for s in grid.gen_sequences:
        prompts = [
            [4 + (7 * i + 3 * j) % (spec.vocab - 4) for j in range(grid.prompt_len)]
            for i in range(s * k // tg)
        ]
        for tokens in sorted({1, grid.response_len}):
            sampling = SamplingConfig(
                temperature=cfg.temperature,
                max_tokens=tokens,
                seed=s * 31 + tokens,
                ignore_eos=True,
            )
            calls += [
                update,
                (
                    (tp, s, tokens),
                    role,
                    "profile_generate",
                    (Batch(non_tensors={"prompt_ids": prompts}), sampling),
                ),
            ]
    return calls


def measure_generation(
    rec: Recorder,
    grid: CallsGrid,
    spec: ModelSpec,
    k: int,
    tps: list[int],
    tg: int,
    model_dir: str,
    out: dict[str, list[dict]],
) -> None:
    """generate and reshard rows of actors trained at tp x dp = k (each tp of `tps`)
    generating at tg with one vLLM engine: all their roles at once, each round through
    every layout's calls, so that rows of the same engine work (micro-DP 1, 2, 4) take
    the same phases of this VM's speed rather than each a block of its own."""
    cfg = RunConfig()
    roles, calls = [], []
    try:
        for tp in tps:
            role = f"gen-tp{tp}-tg{tg}"
            rec.group.add_role(
                role, grid.model, ParallelLayout(tp=tp, pp=1, dp=k // tp), role_engine_config(False)
            )
            roles.append(role)
            rec.group.run(
                role,
                "init_rollout",
                RolloutConfig(
                    tg=tg,
                    scheme=cfg.reshard,
                    model_dir=model_dir,
                    kv_cache_bytes=cfg.kv_cache_mib << 20,
                    max_model_len=grid.seq_len,
                    seed=cfg.seed,
                ),
            )
            calls += _generation_calls(grid, spec, k, tp, tg, role)
        got = rec.rounds(calls)
    finally:
        for role in roles:
            rec.group.run(role, "drop_role")
    _generation_rows(got, k, tg, out)


def _generation_rows(got: dict, k: int, tg: int, out: dict[str, list[dict]]) -> None:
    """The generate, dispatch and reshard rows of measured generate calls."""
    replicas = k // tg
    for (tp, s, tokens), (wall, own) in ((n, v) for n, v in got.items() if n[0] != "update"):
        gen, resh = own.get("generate_s", 0.0), own.get("reshard_s", 0.0)
        if own.get("vllm_s", 0.0) > 1.01 * gen:
            raise RuntimeError(
                f"profiling gen-tp{tp}-tg{tg}: vLLM's clock "
                f"({own['vllm_s']:.3f} s) exceeds its generate call's"
            )
        out["generate"].append(
            dict(
                ranks=k,
                tg=tg,
                micro_dp=tp // tg,
                sequences=s,
                tokens=tokens,
                seconds=gen,
                vllm_s=own.get("vllm_s", 0.0),
            )
        )
        out["dispatch_generate"].append(
            dict(ranks=k, sequences=s * replicas, seconds=max(wall - gen - resh, 1e-6))
        )
        out["reshard"].append(dict(ranks=k, tg=tg, micro_dp=tp // tg, seconds=resh))


Step = tuple[str, Callable]  # (description, fn(group, model_dir, out))


def _groups(grid: CallsGrid, spec: ModelSpec) -> list[tuple[int, list[Step]]]:
    """(group size, its steps) of each worker group in measuring order: one group per set
    size k, its generation layouts by vLLM engine (generation tp), the training layouts
    after the first engine's, beside it (see the module docstring)."""
    groups: list[tuple[int, list[Step]]] = []
    for k in grid.group_sizes:
        gen_rounds = grid.per_sweep(grid.gen_repeats)
        by_engine: list[Step] = []
        for tg, tps in engine_batches(spec, k, RunConfig().reshard):
            by_engine.append(
                (
                    f"generate tp{','.join(map(str, tps))}->tg{tg} on {k}",
                    lambda g, d, o, k=k, tps=tps, tg=tg, gen_rounds=gen_rounds: measure_generation(
                        Recorder(g, gen_rounds), grid, spec, k, tps, tg, d, o
                    ),
                )
            )
        steps: list[Step] = []
        for i, gen_step in enumerate(by_engine):
            steps.append(gen_step)
            if i == 0:
                lays = train_layouts(spec, k)
                steps.append(
                    (
                        f"train/forward, {len(lays)} layouts on {k}",
                        lambda g, d, o, k=k, lays=lays: measure_layouts(
                            Recorder(g, grid.per_sweep(grid.repeats)), grid, spec, k, lays, o
                        ),
                    )
                )
        groups.append((k, steps))
    return groups


TABLES = (
    "forward",
    "train_step",
    "forward_value",
    "train_step_value",
    "generate",
    "reshard",
    "dispatch_forward",
    "dispatch_train",
    "dispatch_generate",
)


def measure_calls(
    grid: CallsGrid,
    progress: Callable[[str], None] | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, list[dict]]:
    """Every table of the module docstring: TABLES -> rows. `timings` gets the seconds each
    group's start and each layout took."""
    timings = {} if timings is None else timings
    spec = load_model(grid.model)
    out: dict[str, list[dict]] = {k: [] for k in TABLES}  # + "concurrency" (sharing factors)
    groups = _groups(grid, spec)
    n = max(grid.group_sizes)
    with (
        tempfile.TemporaryDirectory(prefix="hf-calls-") as tmp,
        Cluster.start(ClusterConfig(devices=n)) as cluster,
    ):
        model_dir = str(save_random_llama(spec, Path(tmp), "float32"))
        t0 = time.perf_counter()
        if progress:
            progress(f"start {n} ranks")
        with RankPool(cluster, n) as ranks:
            timings[f"start {n} ranks"] = round(time.perf_counter() - t0, 1)
            for sweep in range(grid.sweeps):
                for k, steps in groups:
                    _measure_group(
                        ranks,
                        k,
                        steps,
                        model_dir,
                        out,
                        timings,
                        progress,
                        f" (sweep {sweep + 1})" if sweep else "",
                    )
            if grid.concurrency:
                if progress:
                    progress("concurrent one-rank sets")
                t0 = time.perf_counter()
                out["concurrency"] = [
                    {"ranks": c, "factor": f}
                    for c, f in measure_concurrency(ranks, grid, spec, n).items()
                ]
                timings["concurrent sets"] = round(time.perf_counter() - t0, 1)
    return out


def _measure_group(
    ranks,
    k: int,
    steps: list[Step],
    model_dir: str,
    out: dict[str, list[dict]],
    timings: dict[str, float],
    progress: Callable[[str], None] | None,
    sweep: str = "",
) -> None:
    """Run `steps` on a worker group of the pool's first k ranks, then release it."""
    group = ranks.group(range(k), f"profile-calls-{k}")
    with ranks.lent([group]):
        for desc, fn in steps:
            if progress:
                progress(desc + sweep)
            t0 = time.perf_counter()
            fn(group, model_dir, out)
            timings[desc + sweep] = round(time.perf_counter() - t0, 1)
