"""Resharding the actor from its training to its generation layout: the three schemes of the
paper's Table 2 on the same 4 local ranks (gloo), a model enlarged to >= 50 M parameters.

    python benchmarks/reshard.py [--json] [--tp 4 --pp 1 --dp 1 --tg 2] [--repeats 3]

Per scheme: seconds (median over repeats) of to_generation() (all-gathers and assembly of
the generation shard; no vLLM engine), bytes each rank received, and the simulator's
prediction (simulator.reshard with the local-cpu profile) next to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from executor.hybrid_engine import SCHEMES, ReshardPlan  # noqa: E402
from executor.vllm_engine import launch_local  # noqa: E402
from simulator.layout import TrainLayout  # noqa: E402
from simulator.model import ModelSpec, load_model  # noqa: E402


def bench_model() -> ModelSpec:
    """`tiny` widened and deepened until the weights dominate (~68 M parameters)."""
    return dataclasses.replace(load_model("tiny"), name="tiny-bench-68m", layers=4,
                               hidden=1024, heads=16, kv_heads=16, ffn=2816, vocab=8192,
                               head_dim=64)


def _rank_main(rank: int, world: int, layout: tuple[int, int, int], tg: int,
               repeats: int) -> dict:
    import torch
    import torch.distributed as dist

    from executor import weights as W
    from executor.hybrid_engine import HybridEngine
    torch.set_num_threads(1)
    spec = bench_model()
    lay = TrainLayout(*layout)
    out = {}
    for scheme in SCHEMES:
        plan = ReshardPlan(lay, tg, scheme)
        he = HybridEngine(spec, plan)
        s, r, _ = plan.coords(rank)
        g = torch.Generator().manual_seed(rank)
        shard = {n: torch.randn(W.shard_shape(n, shape, lay.tp), generator=g) for n, shape
                 in W.stage_state(W.megatron_shapes(spec), spec, lay.pp, s).items()}
        times, gathers = [], []
        for _ in range(repeats):
            stats = he.to_generation(shard)
            he.to_training()
            t = torch.tensor([stats.seconds, stats.gather_seconds])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank ends the phase
            times.append(float(t[0]))
            gathers.append(float(t[1]))
        out[scheme] = {"seconds": statistics.median(times), "bytes_per_rank": stats.bytes_received,
                       "gather_seconds": statistics.median(gathers)}
    return out


def predicted_seconds(scheme: str, spec: ModelSpec, lay: TrainLayout, tg: int) -> float | None:
    try:
        from simulator.profile import load_profile
        from simulator.reshard import reshard_cost
    except ImportError:
        return None
    profile = load_profile("local-cpu")
    return reshard_cost(scheme, spec.params * 4.0, lay.pp, lay.tp, lay.dp, 1, tg, profile,
                        profile.gpus_per_node).seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--tg", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    try:
        lay = TrainLayout(args.pp, args.tp, args.dp)
        ReshardPlan(lay, args.tg)
        if args.repeats < 1:
            raise ValueError("--repeats must be >= 1")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spec = bench_model()
    per_rank = launch_local(_rank_main, lay.n_gpus, (lay.pp, lay.tp, lay.dp), args.tg,
                            args.repeats, timeout=1800)
    result = {}
    for scheme in SCHEMES:
        got = [r[scheme] for r in per_rank]
        result[scheme] = {"seconds": max(g["seconds"] for g in got),
                          "bytes_per_rank": max(g["bytes_per_rank"] for g in got),
                          "gather_seconds": max(g["gather_seconds"] for g in got),
                          "predicted_seconds": predicted_seconds(scheme, spec, lay, args.tg)}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model {spec.name}: {spec.params / 1e6:.1f} M parameters, fp32; training "
          f"p={lay.pp} t={lay.tp} d={lay.dp} -> generation tg={args.tg}, {lay.n_gpus} ranks")
    print(f"{'scheme':<16}{'seconds':>10}{'gather s':>10}{'MB/rank':>10}{'predicted s':>13}")
    for scheme, r in result.items():
        pred = "-" if r["predicted_seconds"] is None else f"{r['predicted_seconds']:.3f}"
        print(f"{scheme:<16}{r['seconds']:>10.3f}{r['gather_seconds']:>10.3f}"
              f"{r['bytes_per_rank'] / 1e6:>10.1f}{pred:>13}")
    ratio = result["allgather"]["seconds"] / result["hybridengine"]["seconds"]
    print(f"allgather / hybridengine time: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
