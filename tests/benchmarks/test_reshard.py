"""benchmarks/reshard.py: the paired speed-up, the Table 2 check and bad input (nothing timed)."""

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("reshard")


def _rank(he: list[float], ag: list[float], ag_bytes: int) -> dict:
    rounds = lambda ts: [[t, t / 2, t / 4] for t in ts]  # noqa: E731
    return {
        "hybridengine": {"rounds": rounds(he), "first_seconds": 9.0, "bytes_per_rank": 1},
        "allgather": {"rounds": rounds(ag), "first_seconds": 8.0, "bytes_per_rank": ag_bytes},
    }


def test_speed_up_pairs_the_schemes_of_one_round(bench):
    # the load doubles in round 2: per-scheme medians mix rounds, the paired ratio does not
    per_rank = [_rank([1.0, 2.0, 1.0], [3.0, 6.0, 3.0], 3)] * 2
    ag = bench.summarise(per_rank, "allgather")
    assert ag["over_hybridengine"] == 3.0
    assert ag["seconds"] == 3.0 and ag["gather_seconds"] == 1.5
    assert ag["assemble_seconds"] == 0.75 and ag["first_seconds"] == 8.0
    assert bench.summarise(per_rank, "hybridengine")["over_hybridengine"] == 1.0
    assert not ag["bytes_differ_by_rank"]
    skewed = bench.summarise([per_rank[0], _rank([1.0], [3.0], 4)], "allgather")
    assert skewed["bytes_differ_by_rank"] and skewed["bytes_per_rank"] == 4


def test_table2_prediction_is_the_sharded_model_over_the_schemes(bench):
    spec = bench.bench_model()
    m = bench.sharded_bytes(spec)
    assert 50e6 * 4 <= m <= spec.params * 4  # >= 50 M parameters, norms excluded
    lay = bench.ParallelLayout(1, 4, 1)
    he, ag = (bench.predicted(s, spec, lay, 2) for s in ("hybridengine", "allgather"))
    assert he["table2_bytes"] == m / 4 and ag["table2_bytes"] == 3 * m / 4
    assert 0 < he["predicted_seconds"] < ag["predicted_seconds"]


def test_bad_layouts_exit_2(bench, capsys):
    assert bench.main(["--tg", "3"]) == 2
    assert "must divide" in capsys.readouterr().err
    assert bench.main(["--repeats", "0"]) == 2
