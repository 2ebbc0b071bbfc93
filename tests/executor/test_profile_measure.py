"""The measuring code on tiny grids: tables have the shapes the writer and simulator expect.
No timing assertions: only that every shape was timed with a finite positive duration."""

from __future__ import annotations

import math

import pytest
import torch

from hybridflow.executor.profiler import collectives, ops, train_layer
from hybridflow.executor.spawn import run_ranks

GRID = ops.OpGrid(
    matmul=((8, 16, 32), (4, 8, 8)),
    attention=((1, 2, 16, 32),),
    elementwise=(256,),
    min_time_s=0.001,
)


def _positive(rows: list[dict]) -> bool:
    return bool(rows) and all(math.isfinite(r["seconds"]) and r["seconds"] > 0 for r in rows)


def test_ops_tables_in_process() -> None:
    t = ops.measure_ops(GRID)
    assert [(r["m"], r["n"], r["k"]) for r in t.matmul] == [(8, 16, 32), (4, 8, 8)]
    assert [r["op"] for r in t.elementwise] == ["add", "silu", "rms_norm"]
    assert t.elementwise[0]["bytes"] == 3 * 256 * 4
    assert _positive(t.matmul) and _positive(t.attention) and _positive(t.elementwise)


@pytest.mark.process  # spawned ranks
def test_ops_concurrent_ranks_and_slowdown() -> None:
    shared = ops.measure_ops_concurrent(GRID, 2)
    assert [(r["m"], r["n"], r["k"]) for r in shared.matmul] == [(8, 16, 32), (4, 8, 8)]
    assert _positive(shared.matmul) and _positive(shared.elementwise)
    half = ops.OpTables(
        *[
            [dict(r, seconds=r["seconds"] / 2) for r in getattr(shared, n)]
            for n in ("matmul", "attention", "elementwise")
        ]
    )
    assert ops.slowdown(half, shared) == pytest.approx(2.0)


def test_op_grid_validation() -> None:
    with pytest.raises(ValueError, match="matmul"):
        ops.OpGrid(matmul=((0, 1, 1),), attention=((1, 1, 1, 1),), elementwise=(1,))
    with pytest.raises(ValueError, match="dtype"):
        ops.OpGrid(matmul=((1, 1, 1),), attention=((1, 1, 1, 1),), elementwise=(1,), dtype="x")


@pytest.mark.process  # spawned ranks
def test_collectives_two_ranks() -> None:
    grid = collectives.CollectiveGrid(world=2, sizes=(4096,), repeats=1)
    out = collectives.measure_collectives(grid, "gloo")
    assert sorted(out) == sorted(collectives.OPS)
    for op in collectives.OPS:
        assert [(r["ranks"], r["bytes"]) for r in out[op]] == [(2, 4096)], op
        assert _positive(out[op])


def test_collective_grid_groups() -> None:
    assert collectives.CollectiveGrid(world=4, sizes=(8,)).group_sizes == (2, 4)
    assert collectives.CollectiveGrid(world=6, sizes=(8,)).group_sizes == (2, 4, 6)
    with pytest.raises(ValueError, match="at least 2 ranks"):
        collectives.CollectiveGrid(world=1, sizes=(8,))


def _sum_ranks(rank: int, world: int, payload: int) -> float:
    t = torch.tensor([float(rank + payload)])
    torch.distributed.all_reduce(t)
    return float(t.item())


def _fail_on_one(rank: int, world: int, payload: None) -> int:
    if rank == 1:
        raise RuntimeError("boom")
    return rank


@pytest.mark.process  # spawned ranks
def test_run_ranks_results_and_errors() -> None:
    assert run_ranks(_sum_ranks, 2, 10, backend="gloo") == [21.0, 21.0]
    with pytest.raises(RuntimeError, match="rank 1 failed"):
        run_ranks(_fail_on_one, 2, None)


def test_train_layer_rows() -> None:
    grid = train_layer.TrainLayerGrid("tiny-gqa", (1, 2), (8,), min_time_s=0.001)
    rows = train_layer.measure_train_layer(grid)  # no torch.distributed: the torch stand-in
    assert [(r["batch"], r["seq"], r["tokens"], r["impl"]) for r in rows] == [
        (1, 8, 8, "torch"),
        (2, 8, 16, "torch"),
    ]
    assert _positive(rows) and all(r["forward_s"] > 0 for r in rows)
    # megatron-core's layer (inside a torch.distributed world): see the end-to-end test
    with pytest.raises(ValueError, match="unknown model"):
        train_layer.TrainLayerGrid("nope", (1,), (8,))


def test_decoder_layer_is_causal_with_gqa() -> None:
    from hybridflow.simulator.model import load_model

    torch.manual_seed(0)
    layer = train_layer.DecoderLayer(load_model("tiny-gqa"))
    x = torch.randn(1, 6, 128)
    y = layer(x)
    x2 = x.clone()
    x2[:, 4:] += 1.0  # a change in later positions leaves earlier outputs as they were
    assert torch.allclose(layer(x2)[:, :4], y[:, :4], atol=1e-6)
    assert not torch.allclose(layer(x2)[:, 4:], y[:, 4:])


@pytest.mark.slow
def test_vllm_steps_tiny() -> None:
    from hybridflow.executor.profiler import vllm_steps

    grid = vllm_steps.GenerateGrid("tiny", (1, 2), (8,), (8,), decode_steps=2, repeats=1)
    out = vllm_steps.measure_generate(grid)
    assert [(r["batch"], r["tokens"]) for r in out["prefill"]] == [(1, 8), (2, 8)]
    assert [(r["batch"], r["context"]) for r in out["decode"]] == [(1, 9), (2, 9)]
    assert _positive(out["prefill"]) and _positive(out["decode"])
    with pytest.raises(ValueError, match="positions"):
        vllm_steps.GenerateGrid("tiny", (1,), (600,), (8,))


@pytest.mark.slow
def test_profile_machine_tiny_end_to_end(tmp_path, monkeypatch) -> None:
    """The whole command on tiny grids (no vLLM): every step runs, the simulator loads it."""
    from hybridflow.executor.profiler import machine
    from hybridflow.simulator.profile import load_profile

    monkeypatch.setattr(ops, "default_grid", lambda quick, gpu: GRID)
    monkeypatch.setattr(
        collectives,
        "default_grid",
        lambda world, quick, gpu: collectives.CollectiveGrid(world, (4096,), repeats=1),
    )
    monkeypatch.setattr(
        train_layer,
        "default_grids",
        lambda quick, gpu: (train_layer.TrainLayerGrid("tiny", (1, 2), (8, 16), min_time_s=0.001),),
    )
    options = machine.ProfileOptions(
        out=tmp_path / "tiny-host.yaml",
        quick=True,
        devices=2,
        generate=False,
        dispatch=False,
        concurrency=(1, 2),
    )
    path = machine.profile_machine(options, progress=False)
    assert path == tmp_path / "tiny-host.yaml" and sorted(p.name for p in tmp_path.iterdir()) == [
        "tiny-host.yaml"
    ]
    prof = load_profile(str(path))
    assert prof.name == "tiny-host" and prof.gpus_per_node == 2 and prof.host_cores >= 1
    assert len(prof.measured.matmul) == 2 and prof.measured.train_layer_model == "tiny"
    assert {op for op, rows in prof.measured.collectives if rows} == set(collectives.OPS)
    import yaml

    raw = yaml.safe_load(path.read_text())
    assert [r["ranks"] for r in raw["sharing"]["slowdown"]] == [1, 2]
    assert raw["extra"]["train_layer_rows"][0]["impl"] == "megatron-core"


@pytest.mark.slow
def test_dispatch_round_trips() -> None:
    from hybridflow.executor.profiler import dispatch

    # executor.controller.cluster starts Ray in a temporary folder of its own and removes it
    out = dispatch.measure_dispatch(dispatch.DispatchGrid(2, sizes=(1024, 4096), repeats=2))
    assert out["actors"] == 2 and out["call_s"] > 0
    assert [r["bytes"] for r in out["transfer"]] == [1024, 4096] and _positive(out["transfer"])
    with pytest.raises(ValueError, match="at least one device"):
        dispatch.DispatchGrid(0)


def test_sharing_factors_from_interleaved_rounds() -> None:
    from hybridflow.executor.profiler.sharing import SharingGrid, factors

    # rank 0 runs every count each round; 2 rounds of counts (1, 2, 4)
    rank0 = [(1, 1.0), (2, 1.2), (4, 2.0), (1, 2.0), (2, 2.4), (4, 4.4)]
    others = [[(2, 1.2), (4, 2.0), (2, 2.4), (4, 4.4)], [(4, 2.0), (4, 4.4)], [(4, 2.0), (4, 3.6)]]
    f = factors([rank0, *others], (1, 2, 4))
    assert f == pytest.approx({1: 1.0, 2: 1.2, 4: 2.05})  # medians of per-round ratios
    # a dip with more ranks is noise: lifted to the count below
    dip = factors(
        [[(1, 1.0), (2, 1.5), (4, 1.2)], [(2, 1.5), (4, 1.2)], [(4, 1.2)], [(4, 1.2)]], (1, 2, 4)
    )
    assert dip == pytest.approx({1: 1.0, 2: 1.5, 4: 1.5})
    with pytest.raises(ValueError, match="include 1"):
        SharingGrid(4, (2, 4))
