"""The one parallel layout: named coordinates and megatron's rank order in one place."""

from __future__ import annotations

import itertools

import pytest

from hybridflow.executor.hybrid_engine.reshard_plan import ReshardPlan
from hybridflow.layout import RANK_ORDER, Coords, LayoutError, ParallelLayout


def test_rank_order_is_tp_then_dp_then_pp() -> None:
    lay = ParallelLayout(pp=2, tp=4, dp=3)
    assert RANK_ORDER == ("tp", "cp", "dp", "pp")
    assert (lay.stride("tp"), lay.stride("dp"), lay.stride("pp")) == (1, 4, 12)
    assert (lay.span("tp"), lay.span("dp"), lay.span("pp")) == (4, 12, 24)
    assert lay.coords(0) == Coords(pp=0, dp=0, tp=0)
    assert lay.coords(5) == Coords(pp=0, dp=1, tp=1) and lay.coords(13) == Coords(1, 0, 1)
    for pp, dp, tp in itertools.product(range(2), range(3), range(4)):
        rank = lay.rank_of(pp=pp, dp=dp, tp=tp)
        assert rank == tp + 4 * (dp + 3 * pp) and lay.coords(rank) == (pp, dp, tp)
    with pytest.raises(LayoutError, match="outside"):
        lay.coords(24)


def test_the_hybrid_engine_groups_follow_the_layout() -> None:
    """Paper §5: 8 GPUs training 1-4-2 generate at 1-2-2-2 with strided TP groups."""
    plan = ReshardPlan(ParallelLayout(pp=1, tp=4, dp=2), tg=2)
    assert plan.gen_tp_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert plan.micro_dp_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(tp=0), "tp must be a positive integer"),
        (dict(dp=4, ep=3), "ep=3 must divide dp=4"),
        (dict(pp=1, vpp=2), "vpp must be None or >= 2 with pp >= 2"),
    ],
)
def test_impossible_layouts_are_refused(kw: dict, message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        ParallelLayout(**kw)


def test_plan_files_keep_their_layout_keys() -> None:
    assert ParallelLayout(2, 2, 4).to_dict() == {"pp": 2, "tp": 2, "cp": 1, "dp": 4}
    assert ParallelLayout.from_dict({"pp": 2, "tp": 2, "dp": 4}).cp == 1  # older plans
    assert ParallelLayout.from_dict({"pp": 1, "tp": 2, "dp": 8, "ep": 4}).ep == 4
