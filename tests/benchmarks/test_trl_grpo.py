"""benchmarks/trl_grpo.py: the token count, iteration timing and TRL's view of the prompts.

TRL itself is not needed here (the benchmark's extra requirement); nothing is timed.
"""

import pytest

from hybridflow.executor.run.driver import summarize
from hybridflow.executor.task.artifacts import ensure_artifacts
from hybridflow.executor.task.settings import BuildSettings
from tests.conftest import load_benchmark

SMALL = dict(n_train=64, n_eval=8, sft_steps=4, rm_steps=2, cost_steps=2, batch=8)


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("trl_grpo")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return ensure_artifacts(
        settings=BuildSettings(**SMALL), cache_dir=tmp_path_factory.mktemp("cache")
    )


def test_planned_tokens_is_the_controllers_count(bench):
    w = bench.Workload(prompts=6, samples=3, prompt_len=12, response_len=7, mini_batches=2)
    plan = bench.make_plan(w, 1)
    assert bench.planned_tokens(plan) == 6 * 3 * (12 + 7)
    stages = {"generate": 0.5, "reshard": 0.25, "prepare": 0.125, "train": 1.0}
    rows = [{"stages": stages, "score": 0.5}] * 2
    measured = summarize(plan, rows, None)["measured"]
    assert measured["tokens_per_s"] * measured["iteration_s"] == pytest.approx(
        bench.planned_tokens(plan)
    )


def test_iterations_are_cut_at_the_last_optimizer_step_of_each(bench):
    assert bench.iteration_seconds(10.0, [11.0, 13.0, 16.0, 20.0, 21.0], 2) == [3.0, 7.0]
    assert bench.iteration_seconds(0.0, [1.0, 3.0], 1) == [1.0, 2.0]
    with pytest.raises(ValueError):
        bench.iteration_seconds(0.0, [1.0], 0)


def test_throughput_leaves_out_the_warm_up_iteration(bench):
    assert bench.throughput(100, [50.0, 2.0, 3.0]) == (2.5, 40.0)
    assert bench.throughput(100, [4.0]) == (4.0, 25.0)


def test_workload_rejects_what_trl_or_the_planner_cannot_run(bench):
    with pytest.raises(ValueError):
        bench.Workload(samples=1)
    with pytest.raises(ValueError):
        bench.Workload(prompts=3, samples=3, mini_batches=2)
    with pytest.raises(ValueError):
        bench.Workload(iterations=1)


def test_trl_sees_the_prompt_ids_hybridflow_generates_from(bench, art):
    w = bench.Workload(prompts=4, samples=2, iterations=2)
    plan = bench.make_plan(w, 1)
    texts = bench.prompt_texts(plan, w, art)
    assert len(texts) == w.prompts * w.iterations
    tok = bench.trl_tokenizer(art)
    for text in texts:
        assert tok(text)["input_ids"] == art.encode_prompt(text)
    bench.check_prompts(art, texts, plan)


def test_rule_reward_scores_and_counts_response_tokens_with_eos(bench, art):
    reward = bench.RuleReward(art)
    prompt = "rev:abc="
    tok = bench.trl_tokenizer(art)
    right = tok("cba", add_special_tokens=False)["input_ids"] + [art.special.eos]
    wrong = tok("abc", add_special_tokens=False)["input_ids"] + [art.special.eos]
    scores = reward([prompt, prompt], ["", ""], [right, wrong])
    assert scores[0] == 1.0 and scores[1] == pytest.approx(1 / 3)
    assert reward.batches == [
        {"score": pytest.approx(2 / 3), "response_tokens": len(right) + len(wrong)}
    ]


def test_sized_actors_have_their_sizes_and_trl_sees_hybridflows_prompt_ids(bench, art, tmp_path):
    """The 25m folder loads, has about 25 M parameters and the task's tokenizer; TRL's
    tokenizer gives the ids hybridflow's data path (--data) gives; the 100m shape counts
    about 100 M; the --reward-fn rule is the task's."""
    import json

    from hybridflow.simulator.model import load_model
    from tests.conftest import REPO

    models = load_benchmark("trl_models")
    folder = models.actor_folder("25m", art, tmp_path, seed=0, max_len=144)
    assert 23e6 < models.parameters(folder) < 27e6
    hidden, layers, heads, ffn = models.SIZES["100m"]
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn)
    cfg.update(num_attention_heads=heads, num_key_value_heads=heads)
    (tmp_path / "100m").mkdir()
    (tmp_path / "100m" / "config.json").write_text(json.dumps(cfg))
    assert 95e6 < load_model(str(tmp_path / "100m")).params < 105e6
    w = bench.Workload(prompts=4, samples=2, iterations=2, model=str(folder))
    plan = bench.make_plan(w, 1)
    texts = bench.prompt_texts(plan, w, art)
    data = models.data_file(art, tmp_path)
    tok = bench.sized_tokenizer(art, w, data, plan, texts)
    # the folder's tokenizer adds no BOS, on both sides alike
    assert tok(texts[0])["input_ids"] == art.encode_prompt(texts[0])[1:]
    rule = load_benchmark("trl_reward").rule_score
    assert (
        rule("", "cba", "rev:abc=", {})
        == 1.0
        == art.score(
            art.encode_prompt("rev:abc="), tok("cba", add_special_tokens=False)["input_ids"]
        )
    )
    assert models.REWARD_FN.startswith(str(REPO / "benchmarks" / "trl_reward.py"))
