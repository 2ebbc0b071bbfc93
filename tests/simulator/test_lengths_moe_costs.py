"""Response-length spread (expected wave maximum) and MoE communication by hand."""

from __future__ import annotations

import random

import pytest

from hybridflow.simulator.lengths import LengthError, ResponseLengths
from hybridflow.simulator.model import load_model
from hybridflow.simulator.moe import (
    alltoall_bytes,
    alltoall_seconds,
    moe_alltoall_seconds,
    touched_fraction,
)
from hybridflow.simulator.profile import load_profile


def test_no_spread_is_the_fixed_length() -> None:
    r = ResponseLengths(1024)
    assert (r.mean, r.spread, r.expected_max(64), r.mean_square) == (1024, False, 1024, 1024**2)
    assert r.to_dict() == {}


def test_power_law_by_hand() -> None:
    r = ResponseLengths(1000, 500)  # shape a = 500 / 500 = 1: uniform on [0, 1000]
    assert r.expected_max(1) == pytest.approx(500)
    assert r.expected_max(3) == pytest.approx(750)  # M n / (n + 1)
    assert r.mean_square == pytest.approx(1000**2 / 3)
    assert r.to_dict() == {"response_mean": 500.0}


def test_power_law_against_sampling() -> None:
    r, rng = ResponseLengths(8192, 1000), random.Random(0)
    a = r.mean / (r.max - r.mean)
    draws = [[r.max * rng.random() ** (1 / a) for _ in range(16)] for _ in range(20000)]
    assert sum(map(max, draws)) / len(draws) == pytest.approx(r.expected_max(16), rel=0.02)
    flat = [x for d in draws for x in d]
    assert sum(flat) / len(flat) == pytest.approx(1000, rel=0.02)


def test_explicit_distribution_by_hand() -> None:
    r = ResponseLengths(1000, points=((1000, 1), (100, 1)))
    assert r.points == ((100, 1.0), (1000, 1.0)) and r.mean == 550
    assert r.expected_max(2) == pytest.approx(100 * 0.25 + 1000 * 0.75)
    assert r.mean_square == pytest.approx((100**2 + 1000**2) / 2)


def test_spread_waves_run_longer_than_the_mean() -> None:
    r = ResponseLengths(16384, 2048)
    assert r.mean < r.expected_max(8) < r.expected_max(64) < r.max


@pytest.mark.parametrize(
    "kw",
    [
        dict(max=0),
        dict(max=100, mean=101),
        dict(max=100, mean=0.5),
        dict(max=100, points=((101, 1.0),)),
        dict(max=100, points=((10, -1.0),)),
        dict(max=100, points=((10, 0.0),)),
        dict(max=100, points=((10, 1.0), (10, 2.0))),
        dict(max=100, points=(("a", 1.0),)),
    ],
)
def test_bad_lengths(kw: dict) -> None:
    with pytest.raises(LengthError):
        ResponseLengths(**kw)


def test_alltoall_volume_by_hand() -> None:
    m = load_model("tiny-moe")  # hidden 128, 8 experts, top 2
    assert alltoall_bytes(m, 10, 4) == 10 * 2 * 128 * 2 * 3 / 4
    assert alltoall_bytes(m, 10, 1) == 0 == alltoall_bytes(load_model("tiny"), 10, 4)


def test_alltoall_seconds_by_hand() -> None:
    p = load_profile("h100-80gb")
    bw_in, bw_out = (
        p.intra_node_bandwidth * p.eff_communication,
        p.inter_node_bandwidth * p.eff_communication,
    )
    assert alltoall_seconds(p, 3e6, 4, 1, 8) == pytest.approx(p.comm_latency_s + 3e6 / bw_in)
    share = 15e6 / 15  # ep 16 at stride 2: 3 peers in the node, 12 outside
    assert alltoall_seconds(p, 15e6, 16, 2, 8) == pytest.approx(
        p.comm_latency_s + max(3 * share / bw_in, 12 * share / bw_out)
    )
    m = load_model("tiny-moe")
    one = alltoall_seconds(p, alltoall_bytes(m, 64 / 2, 4), 4, 2, 8)
    assert moe_alltoall_seconds(p, m, 64, 4, 2, 1, 8, 4) == pytest.approx(2 * 4 * one)


def test_touched_experts() -> None:
    m = load_model("qwen3-235b-a22b")  # 8 of 128 experts per token
    assert touched_fraction(m, 1) == pytest.approx(8 / 128)
    assert touched_fraction(m, 2) == pytest.approx(1 - (120 / 128) ** 2)
    assert touched_fraction(m, 512) > 0.999
    assert touched_fraction(load_model("tiny"), 3) == 1.0
