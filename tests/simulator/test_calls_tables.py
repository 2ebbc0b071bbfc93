"""The per-call tables of a measured profile (`calls:`): parsing, the lookups, the named
terms each predictor builds from them, and the analytic fallback (source "roofline")
where they do not apply."""

import pytest
import yaml

from hybridflow.executor.profiler.calls_grid import generation_configs, train_layouts
from hybridflow.executor.profiler.calls_tables import _pool_by
from hybridflow.layout import GenLayout, ParallelLayout
from hybridflow.profiles import shipped
from hybridflow.simulator.calls import parse_calls
from hybridflow.simulator.generation import gen_shape, generation_cost
from hybridflow.simulator.job import Job
from hybridflow.simulator.model import load_model
from hybridflow.simulator.profile import ProfileError, load_profile
from hybridflow.simulator.reshard import reshard_cost
from hybridflow.simulator.training import WEIGHT_BYTES, infer_cost, train_cost

CALLS = {
    "model": "tiny",
    "prompt_len": 16,
    "response_len": 8,
    "micro_batch": 8,
    "scheme": "hybridengine",
    "forward": [
        {"ranks": 4, "tp": 1, "pp": 1, "sequences": 4, "seconds": 0.02},
        {"ranks": 4, "tp": 1, "pp": 1, "sequences": 16, "seconds": 0.05},
    ],
    "train_step": [
        {"ranks": 4, "tp": 1, "pp": 1, "sequences": 4, "seconds": 0.10, "optimizer_s": 0.02},
        {"ranks": 4, "tp": 1, "pp": 1, "sequences": 8, "seconds": 0.14, "optimizer_s": 0.02},
    ],
    "generate": [
        {
            "ranks": 4,
            "tg": 1,
            "micro_dp": 1,
            "sequences": 8,
            "tokens": t,
            "seconds": s + 0.001,
            "vllm_s": s,
        }
        for t, s in ((1, 0.03), (8, 0.10))
    ],
    "reshard": [{"ranks": 4, "tg": 1, "micro_dp": 1, "seconds": 0.15}],
    "dispatch": {
        k: [
            {"ranks": 4, "sequences": 8, "seconds": 0.01},
            {"ranks": 4, "sequences": 32, "seconds": 0.02},
        ]
        for k in ("forward", "train", "generate")
    },
}


def _profile(tmp_path, calls=CALLS):
    data = yaml.safe_load(shipped("a100-80gb").read_text())
    data["calls"] = calls
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_profile(str(path))


JOB = Job.create("ppo", "tiny", 16, 8, 32, mini_batches=2)
DP4 = ParallelLayout(1, 1, 4)


def test_train_and_infer_terms_from_the_tables(tmp_path):
    prof = _profile(tmp_path)
    c = train_cost(JOB, "actor", DP4, prof, 8)
    # 2 optimizer steps of 16 / 4 = 4 sequences per DP rank; one call carrying 32
    assert c.as_dict() == pytest.approx(
        {"train_steps": 2 * 0.08, "optimizer_steps": 2 * 0.02, "dispatch": 0.02}
    )
    assert set(c.sources().values()) == {"measured"}
    c = infer_cost(JOB, "critic", DP4, prof, 8, 32)  # 8 per DP rank: between 4 and 16
    assert c.as_dict() == pytest.approx({"forward_calls": 0.03, "dispatch": 0.02})
    remax = Job.create("remax", "tiny", 16, 8, 32)
    c = infer_cost(remax, "reward", DP4, prof, 8, 64)  # the greedy baseline: a second call
    assert c.as_dict() == pytest.approx({"forward_calls": 0.06, "dispatch": 0.04})


def test_value_models_read_their_own_rows(tmp_path):
    value = {
        **CALLS,
        "forward_value": [
            {"ranks": 4, "tp": 1, "pp": 1, "sequences": 4, "seconds": 0.04},
            {"ranks": 4, "tp": 1, "pp": 1, "sequences": 16, "seconds": 0.10},
        ],
        "train_step_value": [
            {"ranks": 4, "tp": 1, "pp": 1, "sequences": 4, "seconds": 0.20, "optimizer_s": 0.05}
        ],
    }
    prof = _profile(tmp_path, value)
    # the critic and the reward model read the value rows, the actor and reference the LM's
    assert infer_cost(JOB, "reward", DP4, prof, 8, 32).as_dict()["forward_calls"] == pytest.approx(
        0.06
    )
    assert infer_cost(JOB, "reference", DP4, prof, 8, 32).as_dict()[
        "forward_calls"
    ] == pytest.approx(0.03)
    assert train_cost(JOB, "critic", DP4, prof, 8).as_dict()["optimizer_steps"] == pytest.approx(
        2 * 0.05
    )
    assert train_cost(JOB, "actor", DP4, prof, 8).as_dict()["optimizer_steps"] == pytest.approx(
        2 * 0.02
    )
    # a profile without value rows: value models read the LM rows
    assert infer_cost(JOB, "reward", DP4, _profile(tmp_path), 8, 32).as_dict()[
        "forward_calls"
    ] == pytest.approx(0.03)


def test_generation_and_reshard_terms_from_the_tables(tmp_path):
    prof = _profile(tmp_path)
    gen = GenLayout(1, 1, 1)
    shape = gen_shape(JOB, DP4, gen, 32)
    c = generation_cost(JOB, gen, shape, 8, prof, 8)
    assert c.as_dict() == pytest.approx(
        {"vllm_first_token": 0.03, "vllm_decode": 0.07, "micro_dp_gather": 0.001, "dispatch": 0.02}
    )
    bytes_ = WEIGHT_BYTES * load_model("tiny").params
    assert reshard_cost("hybridengine", bytes_, 1, 1, 4, 1, 1, prof, 8, model="tiny").as_dict() == {
        "reshard_calls": 0.15
    }
    # another scheme, or another model: the analytic terms
    other = reshard_cost("allgather", bytes_, 1, 1, 4, 1, 1, prof, 8, model="tiny")
    assert "reshard_calls" not in other.as_dict()
    assert (
        "reshard_calls"
        not in reshard_cost(
            "hybridengine", bytes_, 1, 1, 4, 1, 1, prof, 8, model="tiny-gqa"
        ).as_dict()
    )


def test_generation_pools_vllm_seconds_over_micro_dp(tmp_path):
    # micro-DP 2 rows: vLLM slower by noise (0.05 / 0.12 against 0.03 / 0.10), gather 0.004
    mdp2 = [
        {
            "ranks": 4,
            "tg": 1,
            "micro_dp": 2,
            "sequences": 8,
            "tokens": t,
            "seconds": s + 0.004,
            "vllm_s": s,
        }
        for t, s in ((1, 0.05), (8, 0.12))
    ]
    prof = _profile(tmp_path, {**CALLS, "generate": CALLS["generate"] + mdp2})
    shape = gen_shape(JOB, DP4, GenLayout(1, 1, 1), 32)
    for micro_dp, gather in ((1, 0.001), (2, 0.004)):
        c = generation_cost(JOB, GenLayout(1, 1, micro_dp), shape, 8, prof, 8).as_dict()
        # the engine's seconds are the mean of both layouts' rows; the gather is its own
        assert c["vllm_first_token"] == pytest.approx(0.04)
        assert c["vllm_decode"] == pytest.approx(0.11 - 0.04)
        assert c["micro_dp_gather"] == pytest.approx(gather)
    # a micro-DP without rows of its own has no measured terms
    c = generation_cost(JOB, GenLayout(1, 1, 4), shape, 8, prof, 8)
    assert "vllm_first_token" not in c.as_dict()


def test_generate_call_lasts_as_long_as_the_longest_response_of_every_replica(tmp_path):
    # one response in ten runs to 8 tokens, the rest stop after 2; 4 replicas of 8 each:
    # the call returns with its slowest replica, so the steps are the longest of all 32
    job = Job.create("ppo", "tiny", 16, 8, 32, mini_batches=2)
    job = Job.from_dict({**job.to_dict(), "response_dist": [[2, 0.9], [8, 0.1]]})
    shape = gen_shape(job, DP4, GenLayout(1, 1, 1), 32)
    c = generation_cost(job, GenLayout(1, 1, 1), shape, 8, _profile(tmp_path), 8).as_dict()
    longest = job.lengths.expected_max(32)
    assert longest > job.lengths.expected_max(8) + 2
    assert c["vllm_decode"] == pytest.approx((0.10 - 0.03) / 7 * (longest - 1))


def test_fallback_to_analytic_where_no_row(tmp_path):
    prof = _profile(tmp_path)
    tp2 = ParallelLayout(1, 2, 2)  # no tp 2 rows
    assert train_cost(JOB, "actor", tp2, prof, 8).sources()["train_compute"] == "roofline"
    other = Job.create("ppo", "tiny-wide", 16, 8, 32, mini_batches=2)
    assert "train_compute" in train_cost(other, "actor", DP4, prof, 8).as_dict()
    plain = load_profile("a100-80gb")  # a datasheet profile has no tables: as before
    assert (
        plain.calls.model == ""
        and "train_compute" in train_cost(JOB, "actor", DP4, plain, 8).as_dict()
    )


def test_malformed_calls_are_profile_errors(tmp_path):
    with pytest.raises(ProfileError, match="calls.forward"):
        _profile(tmp_path, {**CALLS, "forward": [{"ranks": 4, "seconds": 1.0}]})
    with pytest.raises(ProfileError, match="unknown keys"):
        _profile(tmp_path, {**CALLS, "bogus": []})
    with pytest.raises(ProfileError, match="calls.dispatch"):
        _profile(tmp_path, {**CALLS, "dispatch": {"other": []}})
    with pytest.raises(ProfileError, match="calls"):
        parse_calls({"forward": []})


def test_profiler_layouts_and_aggregation():
    tiny = load_model("tiny")  # 2 layers, 4 heads
    assert train_layouts(tiny, 4) == [(1, 1, 4), (1, 2, 2), (2, 1, 2), (2, 2, 1), (4, 1, 1)]
    assert train_layouts(tiny, 2) == [(1, 1, 2), (1, 2, 1), (2, 1, 1)]
    # each (generation tp, micro-DP) of 4 devices once
    assert sorted((g, t // g) for t, g in generation_configs(tiny, 4)) == [
        (1, 1),
        (1, 2),
        (1, 4),
        (2, 1),
        (2, 2),
        (4, 1),
    ]
    rows = [{"ranks": 2, "tg": 1, "seconds": s} for s in (0.3, 0.1, 0.2)] + [
        {"ranks": 4, "tg": 1, "seconds": 0.5}
    ]
    got = _pool_by(rows, ("ranks", "tg"))
    assert [(r["ranks"], r["tg"]) for r in got] == [(2, 1), (4, 1)]
    assert [r["seconds"] for r in got] == pytest.approx([0.2, 0.5])
    # three sweeps or more: the median (one sweep in a slow phase left out); two: the mean
    slow = [{"ranks": 2, "tg": 1, "seconds": s} for s in (0.1, 0.1, 0.4)]
    assert _pool_by(slow, ("ranks", "tg"))[0]["seconds"] == pytest.approx(0.1)
    assert _pool_by(slow[1:], ("ranks", "tg"))[0]["seconds"] == pytest.approx(0.25)


def test_profiler_one_group_per_size_training_beside_the_first_engine():
    from hybridflow.executor.profiler.calls import _groups
    from hybridflow.executor.profiler.calls_grid import CallsGrid

    groups = _groups(CallsGrid(group_sizes=(1, 4)), load_model("tiny"))
    names = [(k, [d for d, _ in steps]) for k, steps in groups]
    assert [k for k, _ in names] == [1, 4]  # one worker group (k processes) per set size
    four = names[1][1]
    tgs = [d.split("->")[1].split()[0] for d in four if d.startswith("generate")]
    # generation layouts by generation tp, those of one vLLM engine (the same generation TP
    # groups) measured together: tp1, tp2 and tp4 -> tg1 share one; tp2 -> tg2 (groups
    # [0, 1], [2, 3]) and tp4 -> tg2 (strided: [0, 2], [1, 3]) do not
    assert tgs == ["tg1", "tg2", "tg2", "tg4"]
    # every training layout at once (their rounds interleaved), once, after the first
    # engine's generation layouts, with that engine still alive
    assert len(train_layouts(load_model("tiny"), 4)) == 5
    assert four[:2] == ["generate tp1,2,4->tg1 on 4", "train/forward, 5 layouts on 4"]
    assert four[2:] == [
        "generate tp2->tg2 on 4",
        "generate tp4->tg2 on 4",
        "generate tp4->tg4 on 4",
    ]


def test_remax_greedy_generation_reshards_again(tmp_path):
    from types import SimpleNamespace

    from hybridflow.plan import PlacedSet
    from hybridflow.simulator.cluster import Cluster
    from hybridflow.simulator.predict import predict_plan

    prof = _profile(tmp_path)
    remax = Job.create("remax", "tiny", 16, 8, 32)
    s = PlacedSet(
        ("actor", "reference", "reward"),
        4,
        {
            "actor": {"train": DP4, "generate": GenLayout(1, 1, 1)},
            "reference": {"infer": DP4},
            "reward": {"infer": DP4},
        },
    )
    pred = predict_plan(
        SimpleNamespace(cluster=Cluster("a100-80gb", 1, 8), job=remax, sets=(s,)), prof
    )
    actor = pred.to_dict()["terms"]["actor"]
    assert actor["reshard"] == pytest.approx({"reshard_calls": 0.15, "greedy_reshard": 0.15})
    assert "greedy_reshard" not in actor["generate"]
    assert actor["generate"]["dispatch"] == pytest.approx(2 * 0.02)  # two generate calls


def test_other_lengths_read_the_rows_at_the_same_token_work(tmp_path):
    prof = _profile(tmp_path)
    longer = Job.create("ppo", "tiny", 32, 16, 32, mini_batches=2)  # twice the tokens
    # 4 sequences of 48 tokens per DP rank and step: the row at 8 of 24
    assert train_cost(longer, "actor", DP4, prof, 8).as_dict()["train_steps"] == pytest.approx(
        2 * 0.12
    )


def test_profile_worker_clocks_each_part_once():
    """Two roles' hybrid engines sharing one vLLM engine (as the profiler reuses them):
    every call's vLLM seconds are counted once."""
    import time
    from types import SimpleNamespace

    from hybridflow.executor.profiler.calls_worker import ProfileWorker

    class Engine:
        def generate(self, prompts, sampling):
            time.sleep(0.01)
            return []

    class Hybrid:
        def __init__(self, engine):
            self.engine = engine

        def generate(self, prompts, sampling):
            return self.engine.generate(prompts, sampling)

        def to_generation(self, shard):
            return None

        def to_training(self):
            return None

    w = ProfileWorker(0, 1)
    engine = Engine()
    for role in ("a", "b"):
        w.roles[role] = SimpleNamespace(engine=SimpleNamespace(optimizer=None))
        w.rollout[role] = Hybrid(engine)
    for role in ("a", "b", "a"):
        w._run(role, lambda r, *a: w.rollout[r].generate([], None))
    calls = w.take_seconds()
    assert len(calls) == 3 and w.take_seconds() == []
    for c in calls:
        assert 0.01 <= c["vllm_s"] <= c["generate_s"] <= c["seconds"]


def test_profiler_rows_keep_the_mean_and_never_decrease():
    from hybridflow.executor.profiler.calls_tables import _monotone, isotonic

    assert isotonic([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    assert isotonic([3.0, 1.0]) == [2.0, 2.0]
    assert isotonic([1.0, 4.0, 2.0, 0.0, 5.0]) == pytest.approx([1.0, 2.0, 2.0, 2.0, 5.0])
    rows = [
        {"ranks": 1, "sequences": s, "seconds": v}
        for s, v in ((4, 0.1), (8, 0.5), (16, 0.3), (32, 0.6))
    ]
    fixed = _monotone(rows, ("ranks",), ("seconds",))
    # the slow row at 8 and the fast one at 16 pooled into their mean, not clamped down
    assert [r["seconds"] for r in fixed] == pytest.approx([0.1, 0.4, 0.4, 0.6])
    assert sum(r["seconds"] for r in fixed) == pytest.approx(sum(r["seconds"] for r in rows))
    assert rows[1]["seconds"] == 0.5  # the input is left as it was
    # one row per sweep of the same size: pooled into their mean before the fit
    swept = rows + [{"ranks": 1, "sequences": 4, "seconds": 0.3}]
    fixed = _monotone(swept, ("ranks",), ("seconds",))
    assert [r["sequences"] for r in fixed] == [4, 8, 16, 32]
    assert fixed[0]["seconds"] == pytest.approx(0.2)


def test_profiler_sweeps_every_group_again():
    from hybridflow.executor.profiler.calls_grid import CallsGrid

    with pytest.raises(ValueError, match="sweeps"):
        CallsGrid(sweeps=0)
    one, two = CallsGrid(), CallsGrid(sweeps=2)
    assert one.per_sweep(one.repeats) == 4 and one.per_sweep(one.gen_repeats) == 3
    # the rounds split among the sweeps, at least as many in all
    assert two.per_sweep(two.repeats) == 2 and two.per_sweep(two.gen_repeats) == 2
