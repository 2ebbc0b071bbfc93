"""On the executor's own CPU cluster (a profile whose devices share host cores) the planner
offers only what the executor runs there: TP-only generation, even pipeline stages, no
FSDP. GPU profiles keep the whole search."""

from __future__ import annotations

import json
from pathlib import Path

from hybridflow.executor.run.checks import check_runnable
from hybridflow.planner.search import plan_job
from hybridflow.planner.tables import Tables
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.job import Job
from hybridflow.simulator.profile import load_profile

LOCAL = load_profile("local-cpu")
# qwen2.5-0.5b has 24 layers: pipelines of 5 or 7 stages would be uneven
JOB = Job.create("grpo", "qwen2.5-0.5b", 64, 64, 8, n_samples=4, reward="rule")


def test_local_tables_keep_to_what_the_executor_runs(tmp_path: Path) -> None:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256}
    cfg.update(hidden_size=64, intermediate_size=128, num_attention_heads=2)
    cfg.update(num_key_value_heads=1, num_hidden_layers=5, max_position_embeddings=256)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    five = Job.create("grpo", str(tmp_path), 64, 64, 8, n_samples=4, reward="rule")
    assert {lay.pp for lay in Tables(five, LOCAL, 4).layouts("actor", 4)} == {1}
    assert 2 in {lay.pp for lay in Tables(five, load_profile("h100-80gb"), 4).layouts("actor", 4)}
    t = Tables(JOB, LOCAL, 4)
    assert t.max_gen_pp == 1
    assert not any(
        m.fsdp for lay in t.layouts("actor", 4) for m in t.settings_options("actor", lay)
    )


def test_gpu_profiles_keep_the_whole_search() -> None:
    t = Tables(JOB, load_profile("h100-80gb"), 8)
    assert t.max_gen_pp is None
    lays = list(t.layouts("actor", 8))
    assert any(m.fsdp for lay in lays for m in t.settings_options("actor", lay))


def test_every_local_plan_is_runnable() -> None:
    for plan in plan_job(Cluster.from_gpus("local-cpu", 4, 4), JOB, LOCAL, top=5):
        check_runnable(plan, 4, user_job=True)


def test_local_micro_batches_are_the_measured_ones() -> None:
    """The local profile's per-call tables were measured at a micro-batch of several
    sequences: its plans train at that micro-batch, GPU plans at one sequence."""
    assert LOCAL.calls.micro_batch > 1
    plan = plan_job(Cluster.from_gpus("local-cpu", 4, 4), JOB, LOCAL)[0]
    settings = next(s.settings("actor") for s in plan.sets if "actor" in s.models)
    assert settings.micro_batch_tokens == LOCAL.calls.micro_batch * JOB.seq_len
    gpu = Tables(JOB, load_profile("h100-80gb"), 8)
    assert {m.micro_batch_tokens for m in gpu.settings_options("actor", None)} == {JOB.seq_len}
