"""Batches are cut after their longest response: the cut batch gives the uncut one's losses."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from hybridflow.executor.controller.batch import Batch
from hybridflow.executor.rl import algorithms as alg
from hybridflow.executor.rl.losses import ActorLoss, CriticLoss
from hybridflow.executor.rl.runtime import Runtime
from hybridflow.executor.run.config import RunConfig
from hybridflow.planner.search import plan_job
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.job import Job
from hybridflow.simulator.profile import load_profile

P, R = 4, 6


def _runtime() -> Runtime:
    job = Job.create("grpo", "tiny", P, R, 2, n_samples=2, reward="rule")
    plan = plan_job(Cluster.from_gpus("local-cpu", 1, 1), job, load_profile("local-cpu"))[0]
    return Runtime(plan, RunConfig(), SimpleNamespace(pad=0), cluster=None)  # type: ignore[arg-type]


def _generated(lengths: list[int]) -> Batch:
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1] * n + [0] * (R - n) for n in lengths])
    ids = torch.randint(3, 50, (len(lengths), R), generator=g) * mask
    return Batch(
        {"responses": ids, "response_mask": mask, "rollout_log_probs": -torch.rand(len(lengths), R)}
    )


def test_sequences_end_at_the_longest_response() -> None:
    rt, out = _runtime(), _generated([2, 3, 1, 3])
    batch = rt.sequences([[5, 6], [7, 8, 9]], out, 2, [("train", 0)] * 4)
    assert batch["responses"].shape == (4, 3) and batch["input_ids"].shape == (4, P + 3)
    assert torch.equal(batch["responses"], out["responses"][:, :3])
    assert torch.equal(batch["rollout_log_probs"], out["rollout_log_probs"][:, :3])
    assert batch["attention_mask"][:, P:].sum() == out["response_mask"].sum()
    empty = rt.sequences([[5]], _generated([0, 0]), 2, [("train", 0)] * 2)
    assert empty["responses"].shape == (2, 1)  # one position kept: no zero-width batch


def test_cut_batches_give_the_same_losses() -> None:
    g = torch.Generator().manual_seed(1)
    lengths, cut = [2, 3, 1], 3
    mask = torch.tensor([[1] * n + [0] * (R - n) for n in lengths]).float()
    full = {
        "response_mask": mask,
        "old_log_probs": -torch.rand(3, R, generator=g),
        "advantages": torch.randn(3, R, generator=g),
        "ref_log_probs": -torch.rand(3, R, generator=g),
        "values": torch.randn(3, R, generator=g),
        "returns": torch.randn(3, R, generator=g),
    }
    output = torch.randn(3, P + R, generator=g)  # per-token log-probs / values
    short = {k: v[:, :cut] for k, v in full.items()}
    rl = alg.RLConfig(algorithm="grpo", group_size=2)
    for loss in (ActorLoss(rl, P), CriticLoss(rl, P)):
        a, ma = loss(output, Batch(full))
        b, mb = loss(output[:, : P + cut], Batch(short))
        torch.testing.assert_close(a, b)
        assert ma.keys() == mb.keys()


def test_each_engine_gets_the_kv_cache_of_its_share_of_the_batch() -> None:
    from hybridflow.executor.rl.runtime import rollout_kv_bytes

    rt = _runtime()
    job, placed = rt.plan.job, rt.plan.sets[0]
    spec = job.spec("actor")
    need = job.sequences * (job.seq_len + 16) * spec.kv_bytes_per_token(4)
    assert rollout_kv_bytes(job, placed, 0) == need  # one engine: the whole batch
    assert rollout_kv_bytes(job, placed, 64) == 64 << 20  # the floor, where it is more
