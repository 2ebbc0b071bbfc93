"""The simulator's terms for a measured CPU profile: ranks sharing the host's cores, the
controller's per-call dispatch, the resharding barriers; each against hand-computed values."""

from types import SimpleNamespace

import pytest
import yaml

from hybridflow.layout import GenLayout, ParallelLayout
from hybridflow.plan import PlacedSet
from hybridflow.profiles import shipped
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.generation import gen_shape, generation_cost
from hybridflow.simulator.job import Job
from hybridflow.simulator.predict import fluid_finish, predict_plan, predict_set
from hybridflow.simulator.profile import ProfileError, load_profile
from hybridflow.simulator.reshard import reshard_cost
from hybridflow.simulator.training import DISPATCH_FIELDS, infer_cost, train_cost

SHARING = {
    "host_cores": 2,
    "threads_per_rank": 1,
    "slowdown": [
        {"ranks": 1, "factor": 1.0},
        {"ranks": 2, "factor": 1.5},
        {"ranks": 4, "factor": 2.0},
    ],
}
DISPATCH = {
    "actors": 4,
    "call_s": 0.003,
    "transfer": [{"bytes": 1000, "seconds": 0.004}, {"bytes": 1001000, "seconds": 0.024}],
}
MEASURED = {
    "matmul": [{"m": 64, "n": 64, "k": 64, "seconds": 1e-4}],
    "collectives": {
        "all_reduce": [
            {"ranks": 4, "bytes": 4096, "seconds": 0.002},
            {"ranks": 4, "bytes": 409600, "seconds": 0.01},
        ],
        "all_gather": [
            {"ranks": 2, "bytes": 4096, "seconds": 0.001},
            {"ranks": 2, "bytes": 4096000, "seconds": 0.011},
        ],
    },
    "generate": {
        "model": "tiny",
        "prefill": [{"batch": 1, "tokens": 16, "seconds": 0.01}],
        "decode": [{"batch": 8, "context": 16, "seconds": 0.004}],
    },
    "train_layer": {"model": "tiny", "points": [{"tokens": 24, "seconds": 0.002}]},
}


def _profile(tmp_path, **keys):
    data = yaml.safe_load(shipped("local-cpu").read_text())
    for k in ("sharing", "extra", "measured", "calls"):
        data.pop(k, None)
    data.update({k: v for k, v in keys.items() if v is not None})
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_profile(str(path))


@pytest.fixture
def prof(tmp_path):
    return _profile(tmp_path, sharing=SHARING, extra={"dispatch": DISPATCH}, measured=MEASURED)


def test_sharing_slowdown_interpolates_and_scales_compute(prof):
    o = prof.overheads
    assert (o.slowdown(1), o.slowdown(2), o.slowdown(3), o.slowdown(4)) == (1.0, 1.5, 1.75, 2.0)
    assert o.slowdown(8) == pytest.approx(4.0)  # beyond the table: in proportion
    four = prof.shared(4)
    assert four.slowdown == 2.0 and prof.shared(1) is prof
    assert four.memory_seconds(1e9) == pytest.approx(2 * prof.memory_seconds(1e9))
    assert four.matmul_flops(64, 64, 64)[0] == pytest.approx(prof.matmul_flops(64, 64, 64)[0] / 2)
    job = Job.create("ppo", "tiny", 16, 8, 32, mini_batches=2)
    lay = ParallelLayout(1, 1, 4)
    alone, shared = (train_cost(job, "actor", lay, p, 4).as_dict() for p in (prof, four))
    # 8 sequences per rank, 24 tokens each, 2 layers, 0.002 s per layer per sequence
    assert alone["train_compute"] == pytest.approx(8 * 2 * 0.002)
    assert shared["train_compute"] == pytest.approx(2 * alone["train_compute"])
    assert shared["dispatch"] == alone["dispatch"]  # the controller is not slowed


def test_dispatch_term_per_call(prof):
    job = Job.create("ppo", "tiny", 16, 8, 32, mini_batches=2)
    lay = ParallelLayout(1, 1, 4)
    nbytes = 32 * 24 * 8 * DISPATCH_FIELDS["train"]
    want = 0.004 + 0.02 * (nbytes - 1000) / 1e6
    c = train_cost(job, "actor", lay, prof, 4)
    assert c.as_dict()["dispatch"] == pytest.approx(want) and c.sources()["dispatch"] == "measured"
    nbytes = 32 * 24 * 8 * DISPATCH_FIELDS["infer"]
    assert infer_cost(job, "reward", lay, prof, 4, 32).as_dict()["dispatch"] == pytest.approx(
        0.004 + 0.02 * (nbytes - 1000) / 1e6
    )


def test_generation_dispatch_counts_remax_greedy_call(prof):
    gen = GenLayout(1, 1, 1)
    costs = {}
    for algo in ("ppo", "remax"):
        job = Job.create(algo, "tiny", 16, 8, 32)
        shape = gen_shape(job, ParallelLayout(1, 1, 4), gen, job.works("actor")[0].sequences)
        costs[algo] = generation_cost(job, gen, shape, shape.sequences, prof, 4).as_dict()
    call = 0.004 + 0.02 * (32 * 16 * 8 - 1000) / 1e6  # prompts of the global batch
    assert costs["ppo"]["dispatch"] == pytest.approx(call)
    assert costs["remax"]["dispatch"] == pytest.approx(2 * call)


def test_reshard_barriers_and_gather(prof, tmp_path):
    # tp = pp = 1, dp = 4: nothing to gather, two barriers over the 4 ranks
    c = reshard_cost("hybridengine", 1e6, 1, 1, 4, 1, 1, prof, 4, model="tiny")
    assert c.as_dict() == {"reshard_barrier": pytest.approx(2 * 0.002)}
    assert c.sources() == {"reshard_barrier": "measured"}
    # tp 2 x dp 2 generating at tg 1: micro-DP groups of 2 gather M/2 each
    c = reshard_cost("hybridengine", 2e6, 1, 2, 2, 1, 1, prof, 4, model="tiny").as_dict()
    assert c["reshard_barrier"] == pytest.approx(0.004)
    assert c["reshard_allgather"] == pytest.approx(0.001 + 0.01 * (2e6 - 4096) / (4096000 - 4096))
    # a datasheet profile (nothing measured) keeps the paper's all-gather alone
    a100 = load_profile("a100-80gb")
    assert reshard_cost("hybridengine", 1e6, 1, 1, 4, 1, 1, a100, 8, model="tiny").terms == ()


def test_malformed_sections_are_profile_errors(tmp_path):
    with pytest.raises(ProfileError, match="sharing"):
        _profile(tmp_path, sharing={"host_cores": 2})
    with pytest.raises(ProfileError, match="sharing.slowdown"):
        _profile(tmp_path, sharing={"slowdown": [{"ranks": 2}]})
    with pytest.raises(ProfileError, match="extra.dispatch"):
        _profile(tmp_path, extra={"dispatch": {"transfer": []}})
    plain = _profile(tmp_path)
    assert plain.overheads.slowdown(4) == 1.0 and plain.overheads.dispatch(1e6) == 0.0


def _plan(job: Job, *sets: PlacedSet):
    return SimpleNamespace(cluster=Cluster("local-cpu", 1, 4), job=job, sets=sets)


def test_fluid_core_sharing():
    f = {1: 1.0, 2: 1.0, 4: 2.0}.__getitem__
    assert fluid_finish([1.0, 1.0], [2, 2], f, 4) == pytest.approx([2.0, 2.0])
    # the shorter set ends at 1.0 (half speed for 1 s of its 0.5 s of work); the other has
    # done 0.5 of 1.0 by then and runs the rest alone at full speed
    assert fluid_finish([1.0, 0.5], [2, 2], f, 4) == pytest.approx([1.5, 1.0])
    assert fluid_finish([1.0, 0.0], [2, 2], f, 4) == pytest.approx([1.0, 0.0])
    assert fluid_finish([1.0], [4], f, 4) == pytest.approx([1.0])  # its own sharing is in 1.0


def test_predict_plan_shares_cores_between_concurrent_sets(prof):
    job = Job.create("ppo", "tiny", 16, 8, 32, mini_batches=2)
    lay = ParallelLayout(1, 1, 2)
    a = PlacedSet(
        ("actor", "reward"),
        2,
        {"actor": {"train": lay, "generate": GenLayout(1, 1, 1)}, "reward": {"infer": lay}},
    )
    b = PlacedSet(
        ("critic", "reference"), 2, {"critic": {"train": lay}, "reference": {"infer": lay}}
    )
    pred = predict_plan(_plan(job, a, b), prof)
    two = prof.shared(2)  # each set alone keeps its own 2 ranks busy
    alone = (predict_set(job, a, two, 4), predict_set(job, b, two, 4))
    # generation runs on the actor's set only: nothing shared
    assert pred.stages["generate"] == pytest.approx(alone[0].stage_seconds("generate"))
    assert "core_sharing" not in pred.to_dict()["terms"]["actor"]["generate"]
    # prepare and train: both sets at once, 4 ranks at 2.0 where each alone ran at 1.5
    for st in ("prepare", "train"):
        want = fluid_finish(
            [s.stage_seconds(st) for s in alone], [2, 2], prof.overheads.slowdown, 4
        )
        assert pred.stages[st] == pytest.approx(max(want))
        assert pred.stages[st] > max(s.stage_seconds(st) for s in alone)
    terms = pred.to_dict()["terms"]
    assert terms["critic"]["train"]["core_sharing"] > 0
    assert pred.sources()["critic"]["train"]["core_sharing"] == "measured"
