"""3D-HybridEngine resharding on 4 local gloo ranks: generation weights, bytes (Table 2)."""

import pytest
import torch

from hybridflow.executor.engines import hf_checkpoint as H
from hybridflow.executor.engines import weights as W
from hybridflow.executor.hybrid_engine.reshard_plan import ReshardError, ReshardPlan, split_micro_dp
from hybridflow.executor.spawn import run_ranks
from hybridflow.layout import ParallelLayout
from hybridflow.simulator.model import load_model

LAYOUTS = {
    "t4": ParallelLayout(1, 4, 1),
    "t2d2": ParallelLayout(1, 2, 2),
    "p2t2": ParallelLayout(2, 2, 1),
}
CASES = [
    (name, tg, scheme)
    for name, lay in LAYOUTS.items()
    for tg in (1, 2, 4)
    if lay.tp % tg == 0
    for scheme in ("hybridengine", "hybridengine-v", "allgather")
]


def table2(scheme: str, p: int, t: int, d: int, tg: int, m: float) -> float:
    """Bytes each rank receives, the paper's Table 2 (pg = 1)."""
    if scheme == "allgather":
        return (t * p * d - 1) / (t * p * d) * m
    if scheme == "hybridengine-v":
        return (t * p - 1) / (t * p) * m
    return (t * p - tg) / (tg * t * p) * m


def train_shard(full, spec, lay: ParallelLayout, plan: ReshardPlan, rank: int):
    c = plan.train.coords(rank)
    s, r = c.pp, c.tp
    return {
        n: v.clone()
        for n, v in W.split_tp(W.stage_state(full, spec, lay.pp, s), spec, lay.tp, r).items()
    }


def _reshard_all(rank: int, world: int, model: str) -> list[dict]:
    """Every case twice, from two different models: the second switch reuses the buffers
    of the first (keep_buffers, the default) or allocates them again (hybridengine-v)."""
    from hybridflow.executor.hybrid_engine.engine import HybridEngine

    spec = load_model(model)
    fulls = [W.hf_to_megatron(H.random_hf_state(spec, seed=seed), spec) for seed in (7, 8)]
    out = []
    for name, tg, scheme in CASES:
        lay = LAYOUTS[name]
        plan = ReshardPlan(lay, tg, scheme)
        he = HybridEngine(spec, plan, keep_buffers=scheme != "hybridengine-v")
        bad, extra, untouched, dropped = [], [], True, True
        for full in fulls:
            mine = train_shard(full, spec, lay, plan, rank)
            before = {n: v.clone() for n, v in mine.items()}
            stats = he.to_generation(mine)
            want = W.split_tp(full, spec, tg, he.gen_tp_rank)
            bad += sorted(
                n
                for n in want
                if n not in he.gen_shard or not torch.equal(he.gen_shard[n], want[n])
            )
            extra += sorted(set(he.gen_shard) - set(want))
            he.to_training()
            untouched &= all(torch.equal(before[n], mine[n]) for n in mine)
            dropped &= he.gen_shard is None
        out.append(
            dict(
                case=(name, tg, scheme),
                bad=bad,
                extra=extra,
                stats=stats,
                untouched=untouched,
                dropped=dropped,
            )
        )
    return out


@pytest.fixture(scope="module")
def resharded():
    return run_ranks(_reshard_all, 4, "tiny", backend="gloo", timeout_s=600)


def _sharded_bytes(spec) -> int:
    full = W.hf_to_megatron(H.random_hf_state(spec), spec)
    return sum(v.numel() * 4 for n, v in full.items() if W.split_kind(n) != "replicated")


def test_generation_weights_equal_single_process_slices(resharded):
    for rank, results in enumerate(resharded):
        for r in results:
            assert r["bad"] == [] and r["extra"] == [], (rank, r["case"], r["bad"], r["extra"])
            assert r["untouched"] and r["dropped"], (rank, r["case"])


def test_bytes_received_equal_table2(resharded):
    spec = load_model("tiny")
    m = _sharded_bytes(spec)
    for rank, results in enumerate(resharded):
        for r in results:
            name, tg, scheme = r["case"]
            lay = LAYOUTS[name]
            want = table2(scheme, lay.pp, lay.tp, lay.dp, tg, m)
            assert r["stats"].bytes_received == want, (rank, r["case"])
            # with p = 2 each rank fetches the other stage's norms (stage 1 has the final one)
            other = 0
            if lay.pp == 2:
                other = spec.hidden * 4 * (spec.layers + 1 if rank < 2 else spec.layers)
            assert r["stats"].replicated_bytes == other, (rank, r["case"])


def test_hybridengine_moves_least():
    spec = load_model("tiny")
    m = _sharded_bytes(spec)
    he, v, ag = (table2(s, 1, 4, 1, 2, m) for s in ("hybridengine", "hybridengine-v", "allgather"))
    assert he < v <= ag


def test_plan_groups_follow_the_paper():
    """Paper §5 example shape: training TP 4 -> generation TP 2 strided, micro-DP consecutive."""
    plan = ReshardPlan(ParallelLayout(1, 4, 1), 2, "hybridengine")
    assert plan.gen_tp_groups() == [[0, 2], [1, 3]]
    assert plan.micro_dp_groups() == [[0, 1], [2, 3]]
    v = ReshardPlan(ParallelLayout(1, 4, 1), 2, "hybridengine-v")
    assert v.gen_tp_groups() == [[0, 1], [2, 3]] and v.gather_groups() == [[0, 1, 2, 3]]
    pp = ReshardPlan(ParallelLayout(2, 2, 1), 2, "hybridengine")
    assert pp.gen_tp_groups() == [[0, 1], [2, 3]] and pp.micro_dp_groups() == [[0, 2], [1, 3]]
    dp = ReshardPlan(ParallelLayout(1, 2, 2), 1, "hybridengine")
    assert dp.micro_dp_groups() == [[0, 1], [2, 3]]


def test_invalid_plans_raise_value_errors():
    with pytest.raises(ReshardError, match="unknown resharding scheme"):
        ReshardPlan(ParallelLayout(1, 4, 1), 2, "magic")
    with pytest.raises(ValueError, match="must divide"):
        ReshardPlan(ParallelLayout(1, 2, 2), 4, "hybridengine")


def test_micro_dp_split_covers_every_prompt_once():
    items = list(range(10))
    parts = [split_micro_dp(items, i, 4) for i in range(4)]
    assert [x for _, p in parts for x in p] == items
    assert [off for off, _ in parts] == [0, 2, 5, 7]
