"""The profile writer: header numbers derived from the tables, and a round trip through
hybridflow.simulator.profile.load_profile."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hybridflow.cli.main import main as cli_main
from hybridflow.executor.profiler.ops import OpTables
from hybridflow.executor.profiler.writer import (
    MachineInfo,
    Measurements,
    build_profile,
    write_profile,
)
from hybridflow.simulator.profile import load_profile

INFO = MachineInfo(
    "cpu",
    "test cpu (2 cores)",
    devices=4,
    memory_gib=6.0,
    host_cores=2,
    threads_per_rank=1,
    backend="gloo",
)


def tables(scale: float) -> OpTables:
    matmul = [
        {"m": 16, "n": 128, "k": 128, "seconds": 4e-5 * scale},
        {"m": 256, "n": 512, "k": 512, "seconds": 5e-3 * scale},
    ]
    attention = [{"batch": 1, "heads": 4, "seq": 64, "head_dim": 32, "seconds": 1e-4 * scale}]
    elementwise = [
        {"op": "add", "elements": 1 << 20, "bytes": 12 << 20, "seconds": 1e-3 * scale},
        {"op": "silu", "elements": 1 << 20, "bytes": 8 << 20, "seconds": 2e-3 * scale},
    ]
    return OpTables(matmul, attention, elementwise)


def measurements() -> Measurements:
    coll = {
        "all_reduce": [
            {"ranks": 2, "bytes": 4096, "seconds": 2e-4},
            {"ranks": 4, "bytes": 1 << 22, "seconds": 1.2e-2},
        ],
        "all_gather": [{"ranks": 2, "bytes": 4096, "seconds": 3e-4}],
        "broadcast": [{"ranks": 2, "bytes": 4096, "seconds": 1e-4}],
        "p2p": [{"ranks": 2, "bytes": 4096, "seconds": 5e-5}],
    }
    gen = {
        "prefill": [
            {"batch": 1, "tokens": 16, "seconds": 0.02},
            {"batch": 8, "tokens": 128, "seconds": 0.15},
        ],
        "decode": [
            {"batch": 1, "context": 20, "seconds": 0.01},
            {"batch": 8, "context": 132, "seconds": 0.013},
        ],
    }
    train = [
        {
            "model": "tiny",
            "batch": b,
            "seq": t,
            "tokens": b * t,
            "forward_s": 1e-4 * b * t,
            "seconds": 3e-4 * b * t,
        }
        for b in (1, 4)
        for t in (32, 128)
    ]
    dispatch = {"actors": 4, "call_s": 7e-3, "transfer": [{"bytes": 1024, "seconds": 9e-3}]}
    return Measurements(
        tables(1.0),
        {1: tables(1.0), 2: tables(1.5), 4: tables(2.0)},
        coll,
        gen,
        "tiny",
        train,
        dispatch,
    )


def test_header_derived_from_tables() -> None:
    p = build_profile("t", INFO, measurements(), 1.0)
    assert p["peak_flops"] == pytest.approx(2 * 256 * 512 * 512 / 5e-3)
    assert p["hbm_bandwidth"] == pytest.approx((12 << 20) / 1e-3)
    assert p["comm_latency_s"] == pytest.approx(2e-4 / 2)  # 2 ring steps at 2 ranks
    ring = 2 * 3 / 4 * (1 << 22) / (1.2e-2 - 6 * 1e-4)
    assert p["intra_node_bandwidth"] == pytest.approx(ring)
    assert p["step_overhead_s"] == 0.01
    assert p["host_cores"] == 2 and p["gpus_per_node"] == 4
    assert p["sharing"]["slowdown"] == [
        {"ranks": 1, "factor": 1.0},
        {"ranks": 2, "factor": 1.5},
        {"ranks": 4, "factor": 2.0},
    ]
    # per-sequence train-layer points at the largest batch
    assert p["measured"]["train_layer"]["points"] == [
        {"tokens": 32, "seconds": 3e-4 * 32},
        {"tokens": 128, "seconds": 3e-4 * 128},
    ]


def test_round_trip_through_simulator(tmp_path: Path) -> None:
    path = write_profile(
        build_profile("cpu-test", INFO, measurements(), 12.3), tmp_path / "cpu-test.yaml"
    )
    prof = load_profile(str(path))
    assert prof.name == "cpu-test" and prof.host_cores == 2 and not prof.estimate
    assert prof.measured.matmul == ((16, 128, 128, 4e-5), (256, 512, 512, 5e-3))
    assert prof.measured.collective("all_reduce") == ((2, 4096, 2e-4), (4, 1 << 22, 1.2e-2))
    assert prof.measured.generate_model == "tiny" and len(prof.measured.decode) == 2
    assert prof.measured.train_layer_model == "tiny"
    flops, source = prof.matmul_flops(256, 512, 512)
    assert source == "measured" and flops == pytest.approx(2 * 256 * 512 * 512 / 5e-3)
    raw = yaml.safe_load(path.read_text())
    assert raw["extra"]["attention"][0]["seq"] == 64 and raw["generated"]["seconds"] == 12.3
    assert raw["extra"]["dispatch"]["call_s"] == 7e-3
    write_profile(yaml.safe_load(path.read_text()), tmp_path / "again.yaml")
    again = load_profile(str(tmp_path / "again.yaml"))
    assert again.measured == prof.measured and again.peak_flops == prof.peak_flops


def test_single_gpu_without_links_or_generation_still_loads(tmp_path: Path) -> None:
    info = MachineInfo(
        "gpu",
        "one gpu",
        devices=1,
        memory_gib=80.0,
        host_cores=16,
        threads_per_rank=1,
        backend="nccl",
    )
    m = measurements()
    m = Measurements(m.alone, {1: m.alone}, {}, None, "tiny", m.train_layer)
    p = build_profile("one-gpu", info, m, 1.0)
    assert p["sources"]["intra_node_bandwidth"].startswith("estimate")
    assert p["sources"]["step_overhead_s"].startswith("estimate")
    prof = load_profile(str(write_profile(p, tmp_path / "one-gpu.yaml")))
    assert prof.intra_node_bandwidth == pytest.approx(p["hbm_bandwidth"])
    assert prof.measured.collectives == () and prof.measured.decode == ()


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must end in .yaml"):
        write_profile(build_profile("x", INFO, measurements(), 1.0), tmp_path / "x.json")
    with pytest.raises(ValueError, match="kind must be cpu or gpu"):
        MachineInfo("tpu", "x", 1, 1.0, 1, 1, "gloo")
    with pytest.raises(ValueError, match="matmul"):
        Measurements(OpTables(), {}, {}, None, "tiny")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", "p.json"], "must be a .yaml path"),
        (["--devices", "1"], "at least 2"),
        (["--model", "no-such-model"], "unknown model"),
        (["--sweeps", "0"], "--sweeps must be at least 1"),
    ],
)
def test_profile_cli_bad_input(tmp_path: Path, capsys, argv, message) -> None:
    argv = argv if "--out" in argv else [*argv, "--out", str(tmp_path / "p.yaml")]
    assert cli_main(["profile", "--quick", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_profile_sweeps_default_one(tmp_path: Path) -> None:
    # a few minutes at most: one sweep unless asked; several profiles merge instead
    from hybridflow.executor.profiler.machine import ProfileOptions

    out = tmp_path / "p.yaml"
    assert ProfileOptions(out).sweeps == 1
    assert ProfileOptions(out, quick=True).sweeps == 1
    assert ProfileOptions(out, quick=True, sweeps=2).sweeps == 2
