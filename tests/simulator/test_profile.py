"""Profiles: datasheet files load with a source per number; measured tables parse,
validate and replace the roofline where they apply."""

import textwrap

import pytest
import yaml

from hybridflow.layout import ParallelLayout
from hybridflow.profiles import shipped
from hybridflow.simulator.costs import collective
from hybridflow.simulator.job import Job
from hybridflow.simulator.profile import ProfileError, available_profiles, interpolate, load_profile
from hybridflow.simulator.training import train_cost


def test_shipped_profiles_load_with_sources():
    assert {"a100-80gb", "h100-80gb", "h200", "local-cpu"} <= set(available_profiles())
    a100 = load_profile("a100-80gb")
    assert (a100.peak_flops, a100.hbm_gib, a100.gpus_per_node) == (312e12, 80.0, 8)
    sources = dict(a100.sources)
    for key in (
        "peak_flops",
        "hbm_gib",
        "hbm_bandwidth",
        "intra_node_bandwidth",
        "inter_node_bandwidth",
        "efficiency",
    ):
        assert sources[key]
    # the local cluster's profile is the one `hybridflow profile` wrote: measured tables,
    # per-call tables of the executor's model, and how its 4 devices share the host's cores
    raw = yaml.safe_load(shipped("local-cpu").read_text())
    cpu = load_profile("local-cpu")
    assert raw["generated"]["by"] == "hybridflow profile" and not cpu.estimate
    assert (cpu.host_cores, cpu.gpus_per_node) == (raw["host_cores"], raw["gpus_per_node"])
    assert cpu.calls.model == raw["calls"]["model"] and cpu.calls.forward_rows
    assert cpu.overheads.slowdown(1) == 1.0 and len(cpu.overheads.sharing) >= 2


def _write(tmp_path, **changes):
    """local-cpu.yaml with only its header numbers, and `changes`."""
    data = yaml.safe_load(shipped("local-cpu").read_text())
    for k in ("measured", "calls", "sharing", "extra"):
        data.pop(k, None)
    data.update(changes)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


MEASURED = {
    "matmul": [
        {"m": 64, "n": 64, "k": 64, "seconds": 1e-4},
        {"m": 1024, "n": 1024, "k": 1024, "seconds": 0.1},
    ],
    "collectives": {
        "all_reduce": [
            {"ranks": 2, "bytes": 1000, "seconds": 1e-3},
            {"ranks": 2, "bytes": 3000, "seconds": 3e-3},
        ]
    },
    "generate": {
        "model": "tiny",
        "prefill": [{"batch": 1, "tokens": 64, "seconds": 0.01}],
        "decode": [
            {"batch": 1, "context": 64, "seconds": 0.002},
            {"batch": 1, "context": 256, "seconds": 0.004},
        ],
    },
    "train_layer": {
        "model": "tiny",
        "points": [{"tokens": 128, "seconds": 0.01}, {"tokens": 512, "seconds": 0.03}],
    },
}


def test_measured_tables_parse_and_are_used(tmp_path):
    prof = load_profile(str(_write(tmp_path, measured=MEASURED)))
    assert prof.measured.collective("all_reduce") == ((2, 1000, 1e-3), (2, 3000, 3e-3))
    assert collective(prof, "all_reduce", 2000, 2, True) == (pytest.approx(2e-3), "measured")
    assert collective(prof, "all_reduce", 2000, 4, True)[1] == "roofline"  # no 4-rank rows
    thr, src = prof.matmul_flops(1024, 1024, 1024)
    assert src == "measured" and thr == pytest.approx(2 * 1024**3 / 0.1)
    job = Job.create("ppo", "tiny", 64, 64, 8)
    cost = train_cost(job, "actor", ParallelLayout(1, 1, 1), prof, 4)
    src = cost.sources()
    assert src["train_compute"] == "measured"
    # 8 sequences of 128 tokens, 2 layers, table is fwd+bwd seconds per layer
    assert cost.as_dict()["train_compute"] == pytest.approx(8 * 2 * 0.01)
    tp2 = train_cost(job, "actor", ParallelLayout(1, 2, 1), prof, 4)
    assert tp2.sources()["tp_allreduce"] == "measured"


def test_prediction_reports_sources(tmp_path):
    from types import SimpleNamespace

    from hybridflow.layout import GenLayout
    from hybridflow.plan import PlacedSet
    from hybridflow.simulator.cluster import Cluster
    from hybridflow.simulator.predict import predict_plan

    prof = load_profile(str(_write(tmp_path, measured=MEASURED)))
    job = Job.create("grpo", "tiny", 64, 64, 4, n_samples=2)
    s = PlacedSet(
        ("actor", "reference", "reward"),
        1,
        {
            "actor": {"train": ParallelLayout(1, 1, 1), "generate": GenLayout(1, 1, 1)},
            "reference": {"infer": ParallelLayout(1, 1, 1)},
            "reward": {"infer": ParallelLayout(1, 1, 1)},
        },
    )
    pred = predict_plan(
        SimpleNamespace(cluster=Cluster("local-cpu", 1, 1), job=job, sets=(s,)), prof
    )
    src = pred.sources()
    assert src["actor"]["generate"] == {
        "prefill_measured": "measured",
        "decode_measured": "measured",
    }
    assert src["actor"]["train"]["train_compute"] == "measured"
    assert set(src["actor"]["generate"]) == set(pred.to_dict()["terms"]["actor"]["generate"])
    # 8 sequences in flight at once: one wave; decode rows at batch 1 are the nearest
    decode = pred.to_dict()["terms"]["actor"]["generate"]["decode_measured"]
    assert decode == pytest.approx(64 * (0.002 + (0.004 - 0.002) * (96 - 64) / (256 - 64)))


def test_interpolation_floor_and_extrapolation():
    pts = ((10.0, 1.0), (20.0, 3.0))
    assert interpolate(pts, 15) == 2.0
    assert interpolate(pts, 5) == 1.0  # latency floor
    assert interpolate(pts, 40) == 6.0  # proportional beyond the table


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"peak_flops": -1}, "peak_flops: must be positive"),
        ({"peak_flops": "fast"}, "expected a number"),
        ({"efficiency": {"matmul": 2, "memory": 0.5, "communication": 0.5}}, "efficiency matmul"),
        ({"sources": {}}, "no source for"),
        ({"gpus_per_node": 0}, "gpus_per_node"),
        ({"measured": {"matmul": [{"m": 1}]}}, r"measured.matmul\[0\]"),
        ({"measured": {"collectives": {"all_to_everyone": []}}}, "measured.collectives"),
        ({"measured": {"bogus": []}}, "unknown tables"),
    ],
)
def test_bad_profiles(tmp_path, changes, match):
    with pytest.raises(ProfileError, match=match):
        load_profile(str(_write(tmp_path, **changes)))


def test_unknown_and_malformed(tmp_path):
    with pytest.raises(ProfileError, match="unknown GPU kind 'v100'.*a100-80gb"):
        load_profile("v100")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(str(bad))
    bad.write_text(textwrap.dedent("- a\n- b\n"))
    with pytest.raises(ProfileError, match="mapping"):
        load_profile(str(bad))
