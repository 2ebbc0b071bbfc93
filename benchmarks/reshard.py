"""Resharding the actor from its training to its generation layout: the three schemes of the
paper's Table 2 on the same 4 local ranks (gloo), a model enlarged to >= 50 M parameters.

    python benchmarks/reshard.py [--json] [--tp 4 --pp 1 --dp 1 --tg 2] [--repeats 15]
                                 [--out reports/reshard.md]

Per scheme: seconds of to_generation() (all-gathers and assembly of the generation shard; no
vLLM engine), the slowest rank's, median over repeats; the schemes take turns in every
repeat (a round), so a change of load hits all three alike, and the speed-up is the median
over rounds of the ratio within a round. The first call, which also allocates the
buffers the later ones reuse, is reported apart. Bytes each rank received, checked against
Table 2 as the simulator computes it (hybridflow.simulator.reshard), and the simulator's predicted
seconds (local-cpu profile) next to the measured ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybridflow.executor.hybrid_engine.reshard_plan import SCHEMES, ReshardPlan  # noqa: E402
from hybridflow.executor.spawn import run_ranks  # noqa: E402
from hybridflow.layout import ParallelLayout  # noqa: E402
from hybridflow.report.markdown import emit, table  # noqa: E402
from hybridflow.simulator.architecture import ModelSpec  # noqa: E402
from hybridflow.simulator.model import load_model

PHASES = ("seconds", "gather_seconds", "assemble_seconds")


def bench_model() -> ModelSpec:
    """`tiny` widened and deepened until the weights dominate (~68 M parameters)."""
    return dataclasses.replace(
        load_model("tiny"),
        name="tiny-bench-68m",
        layers=4,
        hidden=1024,
        heads=16,
        kv_heads=16,
        ffn=2816,
        vocab=8192,
        head_dim=64,
    )


def sharded_bytes(spec: ModelSpec) -> int:
    """M of Table 2: the fp32 bytes of the TP-sharded tensors (norms are replicated)."""
    from hybridflow.executor.engines import weights as W

    return sum(
        4 * math.prod(shape)
        for name, shape in W.megatron_shapes(spec).items()
        if W.split_kind(name) != "replicated"
    )


def _rank_main(rank: int, world: int, payload: tuple[tuple[int, int, int], int, int]) -> dict:
    layout, tg, repeats = payload
    import torch
    import torch.distributed as dist

    from hybridflow.executor.engines import weights as W
    from hybridflow.executor.hybrid_engine.engine import HybridEngine

    torch.set_num_threads(1)
    spec, lay = bench_model(), ParallelLayout(*layout)
    engines = {s: HybridEngine(spec, ReshardPlan(lay, tg, s)) for s in SCHEMES}
    stage = engines["hybridengine"].stage
    g = torch.Generator().manual_seed(rank)
    shard = {
        n: torch.randn(W.shard_shape(n, shape, lay.tp), generator=g)
        for n, shape in W.stage_state(W.megatron_shapes(spec), spec, lay.pp, stage).items()
    }
    runs: dict[str, list[list[float]]] = {s: [] for s in SCHEMES}
    received = {}
    for i in range(repeats + 1):  # the first round allocates the buffers
        for scheme in SCHEMES[i % 3 :] + SCHEMES[: i % 3]:  # who goes first rotates
            stats = engines[scheme].to_generation(shard)
            engines[scheme].to_training()
            t = torch.tensor([getattr(stats, p) for p in PHASES])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank ends the phase
            runs[scheme].append(t.tolist())
            received[scheme] = stats.bytes_received
    return {
        scheme: {
            "rounds": rows[1:],
            "first_seconds": rows[0][0],
            "bytes_per_rank": received[scheme],
        }
        for scheme, rows in runs.items()
    }


def summarise(per_rank: list[dict], scheme: str) -> dict:
    """Medians over the rounds; `over_hybridengine`: the median over rounds of this scheme's
    time over hybridengine's in the same round (paired: both saw the same load)."""
    got = sorted({r[scheme]["bytes_per_rank"] for r in per_rank})
    rows, base = per_rank[0][scheme]["rounds"], per_rank[0]["hybridengine"]["rounds"]
    out = {p: statistics.median(r[i] for r in rows) for i, p in enumerate(PHASES)}
    out["over_hybridengine"] = statistics.median(r[0] / b[0] for r, b in zip(rows, base))
    return {
        **out,
        "first_seconds": per_rank[0][scheme]["first_seconds"],
        "bytes_per_rank": got[-1],
        "bytes_differ_by_rank": len(got) > 1,
    }


def predicted(scheme: str, spec: ModelSpec, lay: ParallelLayout, tg: int) -> dict:
    """Table 2 bytes per rank and predicted seconds, from the simulator."""
    from hybridflow.simulator.profile import load_profile
    from hybridflow.simulator.reshard import reshard_bytes_per_rank, reshard_cost

    profile, m = load_profile("local-cpu"), sharded_bytes(spec)
    cost = reshard_cost(
        scheme, m, lay.pp, lay.tp, lay.dp, 1, tg, profile, profile.gpus_per_node, model=spec.name
    )
    return {
        "predicted_seconds": cost.seconds,
        "predicted_from": "+".join(sorted({t.source for t in cost.terms})),
        "table2_bytes": reshard_bytes_per_rank(scheme, m, lay.pp, lay.tp, lay.dp, 1, tg),
    }


def report(
    result: dict,
    spec: ModelSpec,
    lay: ParallelLayout,
    tg: int,
    repeats: int,
    load: tuple[float, float],
) -> str:
    rows = [
        [
            scheme,
            f"{r['seconds']:.3f}",
            f"{r['predicted_seconds']:.3f}",
            f"{r['gather_seconds']:.3f}",
            f"{r['assemble_seconds']:.3f}",
            f"{r['first_seconds']:.3f}",
            f"{r['bytes_per_rank'] / 1e6:.1f}",
            "yes"
            if r["bytes_per_rank"] == r["table2_bytes"] and not r["bytes_differ_by_rank"]
            else "NO",
        ]
        for scheme, r in result.items()
    ]
    ratio = result["allgather"]["seconds"] / result["hybridengine"]["seconds"]
    paired = result["allgather"]["over_hybridengine"]
    return (
        f"Resharding, model {spec.name} ({spec.params / 1e6:.1f} M parameters, fp32): "
        f"training p={lay.pp} t={lay.tp} d={lay.dp} -> generation tg={tg}, "
        f"{lay.n_gpus} gloo ranks on {os.cpu_count()} {platform.machine()} cores; median "
        f"of {repeats} repeats (schemes in turn), the slowest rank; load average "
        f"{load[0]:.1f} before, {load[1]:.1f} after. Predicted: hybridflow.simulator.reshard on "
        f"profiles/local-cpu.yaml ({result['allgather']['predicted_from']} terms); MB/rank "
        f"checked against its Table 2 formula.\n\n"
        + table(
            [
                "scheme",
                "seconds",
                "predicted s",
                "gather s",
                "assemble s",
                "first call s",
                "MB/rank",
                "= Table 2",
            ],
            rows,
        )
        + f"\n\nallgather / hybridengine time: {paired:.2f}x (median over rounds of the "
        f"ratio within a round; ratio of the medians {ratio:.2f}x)\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--tg", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", help="also write the table (markdown) here, e.g. reports/reshard.md")
    args = ap.parse_args(argv)
    try:
        lay = ParallelLayout(args.pp, args.tp, args.dp)
        ReshardPlan(lay, args.tg)
        if args.repeats < 1:
            raise ValueError("--repeats must be >= 1")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spec = bench_model()
    load0 = os.getloadavg()[0]
    per_rank = run_ranks(
        _rank_main,
        lay.n_gpus,
        ((lay.pp, lay.tp, lay.dp), args.tg, args.repeats),
        backend="gloo",
        timeout_s=1800,
    )
    result = {
        scheme: {**summarise(per_rank, scheme), **predicted(scheme, spec, lay, args.tg)}
        for scheme in SCHEMES
    }  # times are already the slowest rank's
    if args.json:
        print(json.dumps(result))
        return 0
    emit(report(result, spec, lay, args.tg, args.repeats, (load0, os.getloadavg()[0])), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
