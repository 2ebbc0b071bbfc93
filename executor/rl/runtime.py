"""What the controller loops stand on: the worker groups of a plan, data and stage timers.

:class:`Runtime` builds one worker group per set of the plan (colocated roles share the
group's processes), loads every role from the task artifacts, and gives the algorithm
loops a few verbs: ``prompts``, ``generate``, ``outputs``, ``scores``, ``update``.
Calls on roles of different sets run concurrently: ``outputs`` issues all its calls before
waiting on any.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybridflow.errors import UserError
from hybridflow.executor.controller.batch import Batch
from hybridflow.executor.controller.cluster import Cluster
from hybridflow.executor.controller.worker_group import WorkerGroup, metrics_of
from hybridflow.executor.engines import timers
from hybridflow.executor.engines.train_engine import EngineConfig
from hybridflow.executor.engines.vllm_engine import SamplingConfig
from hybridflow.executor.rl.breakdown import breakdown
from hybridflow.executor.rl.worker import RLWorker, RolloutConfig
from hybridflow.executor.run.config import RunConfig
from hybridflow.executor.run.export import write_actor_hf
from hybridflow.executor.run.inputs import JobInputs, Ref
from hybridflow.memory import MemorySettings
from hybridflow.plan import PlacedSet, Plan
from hybridflow.simulator.job import Job
from hybridflow.vocab import STAGES, TRAINED_ROLES, VALUE_ROLES, Role, Stage

log = logging.getLogger(__name__)


def engine_config(
    role: str, cfg: RunConfig, settings: MemorySettings | None = None, seq_len: int = 1
) -> EngineConfig:
    """A role's engine; a trained role's plan `settings` give its distributed optimizer,
    recompute and micro-batch (as many `seq_len` sequences as its token budget holds)."""
    lr = cfg.actor_lr if role == Role.ACTOR else cfg.critic_lr
    config = EngineConfig(
        micro_batch_size=cfg.micro_batch_size,
        forward_micro_batch_size=cfg.micro_batch_size,
        lr=lr,
        value_head=role in VALUE_ROLES,
        trainable=role in TRAINED_ROLES,
        seed=cfg.seed + 17,
        clip_grad=cfg.clip_grad,
    )
    if settings is None or role not in TRAINED_ROLES:
        return config
    return dataclasses.replace(
        config,
        micro_batch_size=settings.sequences_per_micro(seq_len),
        use_distributed_optimizer=settings.distributed_optimizer,
        recompute=settings.recompute,
    )


def rollout_kv_bytes(job: Job, placed: PlacedSet, floor_mib: int) -> int:
    """KV cache of each vLLM engine: its share of the batch at full length (fp32 keys and
    values, its tp's share of the heads, a spare block per sequence), at least `floor_mib`,
    so that an engine never runs its batch in waves for want of cache."""
    spec, tg = job.spec(Role.ACTOR), placed.generation().tp
    per_token = spec.kv_bytes_per_token(4) // min(tg, max(1, spec.kv_heads))
    replicas = max(1, placed.gpus // tg)
    sequences = -(-job.sequences // replicas)
    need = sequences * (job.seq_len + 16) * per_token
    return max(floor_mib << 20, need)


@dataclass
class Runtime:
    plan: Plan
    cfg: RunConfig
    inputs: JobInputs
    cluster: Cluster
    groups: dict[str, WorkerGroup] = field(default_factory=dict)  # role -> its set's group
    timings: dict[str, float] = field(default_factory=dict)

    # ---- set-up ------------------------------------------------------------------------
    def start(self) -> None:
        """One worker group per set; every role built and loaded, the sets concurrently
        (their workers start, build megatron-core and vLLM at once)."""
        pools = []
        for i, s in enumerate(self.plan.sets):
            log.info("set %d: %s on %d devices", i, "+".join(s.models), s.gpus)
            pools.append(self.cluster.create_pool(f"set{i}", s.gpus))
        with ThreadPoolExecutor(len(pools)) as ex:
            futures = [ex.submit(self._start_set, p, s) for p, s in zip(pools, self.plan.sets)]
        for f, s in zip(futures, self.plan.sets):
            if f.exception() is None:  # shut down with the others by shutdown()
                self.groups.update(dict.fromkeys(s.models, f.result()))
        first = next((f.exception() for f in futures if f.exception() is not None), None)
        if first is not None:
            raise first

    def _start_set(self, pool: Any, placed: PlacedSet) -> WorkerGroup:
        group = WorkerGroup(self.cluster, pool, RLWorker, name="+".join(placed.models))
        try:
            for role in placed.models:
                self._build_role(group, role, placed)
        except BaseException:
            group.shutdown()
            raise
        return group

    def _build_role(self, group: WorkerGroup, role: str, placed: PlacedSet) -> None:
        job = self.plan.job
        config = engine_config(role, self.cfg, placed.settings(role), job.seq_len)
        group.add_role(role, job.model(role), placed.layout(role), config)
        group.run(role, "load_hf", self.inputs.init_dirs[role])
        if role == Role.ACTOR:
            group.run(
                role,
                "init_rollout",
                RolloutConfig(
                    tg=placed.generation().tp,
                    scheme=self.cfg.reshard,
                    model_dir=self.inputs.rollout_dir,
                    kv_cache_bytes=rollout_kv_bytes(job, placed, self.cfg.kv_cache_mib),
                    seed=self.cfg.seed,
                    max_model_len=self.plan.job.seq_len,
                ),
            )

    def save_roles(self, folder: str) -> None:
        """Every role's weights and optimizer state, per rank, into `folder` (concurrently
        over the sets)."""
        for f in [g.call(role, "save_role", folder) for role, g in self.groups.items()]:
            f.result()
        write_actor_hf(Path(folder), self.plan, self.inputs)

    def load_roles(self, folder: str) -> None:
        for f in [g.call(role, "load_role", folder) for role, g in self.groups.items()]:
            f.result()

    def shutdown(self) -> None:
        for g in {id(g): g for g in self.groups.values()}.values():
            g.shutdown()

    # ---- timing ------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def take_timings(self) -> dict[str, float]:
        out: dict[str, float] = {k: self.timings.get(k, 0.0) for k in STAGES}
        self.timings = {}
        return out

    def take_breakdown(self, stages: dict[str, float]) -> dict[str, float]:
        """Where the `stages` seconds went (executor.rl.breakdown), from every group's
        timers since the last take and the controller's."""
        groups = [g.take_timers() for g in {id(g): g for g in self.groups.values()}.values()]
        return breakdown(stages, groups, timers.take())

    # ---- data --------------------------------------------------------------------------
    def prompts(self, iteration: int) -> list[int]:
        """The iteration's prompts (their indices among the training prompts): a seeded
        pass over them, epoch by epoch."""
        pool = self.inputs.train
        n = self.plan.job.global_batch
        out: list[int] = []
        start = iteration * n
        while len(out) < n:
            epoch, offset = divmod(start + len(out), len(pool))
            order = list(range(len(pool)))
            random.Random(self.cfg.seed * 1000 + epoch).shuffle(order)
            out.extend(order[offset : offset + n - len(out)])
        return out

    def prompt_ids(self, indices: list[int], split: str = "train") -> list[list[int]]:
        pool = self.inputs.pool(split)
        return [list(pool[i]) for i in indices]

    def generate(
        self,
        indices: list[int],
        iteration: int,
        n: int = 1,
        greedy: bool = False,
        split: str = "train",
    ) -> Batch:
        """Sequences of the actor's responses to the prompts `indices` of `split` (n per
        prompt, prompt-major), stage 'generate' (its resharding time, as the workers
        measured it, goes to stage 'reshard')."""
        prompts = self.prompt_ids(indices, split)
        sampling = SamplingConfig(
            temperature=0.0 if greedy else self.cfg.temperature,
            top_p=self.cfg.top_p,
            max_tokens=self.plan.job.response_len,
            n=n,
            seed=None if greedy else self.cfg.seed * 100003 + iteration,
            ignore_eos=False,
        )
        # prompt_seq: each prompt's index in the batch seeds its sampling, so the samples
        # do not depend on how the prompts are split over replicas
        request = Batch(
            non_tensors={"prompt_ids": prompts, "prompt_seq": list(range(len(prompts)))}
        )
        with self.stage(Stage.GENERATE):
            out = self.groups[Role.ACTOR].run(Role.ACTOR, "generate", request, sampling)
        reshard = max(t["reshard_s"] for t in out.non_tensors["timing"])
        self.timings[Stage.GENERATE] -= reshard
        self.timings[Stage.RESHARD] = self.timings.get(Stage.RESHARD, 0.0) + reshard
        refs = [(split, i) for i in indices for _ in range(n)]
        return self.sequences(prompts, out, n, refs)

    def evaluate(self) -> float | None:
        """Mean rule score of one sampled response per held-out prompt (a fixed seed, so
        runs compare); not timed into the iteration's stages. None without held-out
        prompts or a rule score."""
        if not self.inputs.eval or not self.inputs.rules.has("score"):
            return None
        saved = dict(self.timings)
        batch = self.generate(list(range(len(self.inputs.eval))), -1, split="eval")
        score = float(self.rule(batch).float().mean())
        self.timings = saved
        self.take_breakdown({})  # the held-out pass is not part of an iteration
        return score

    def sequences(self, prompts: list[list[int]], out: Batch, n: int, refs: list[Ref]) -> Batch:
        P = self.plan.job.prompt_len
        pad = self.inputs.pad
        rows = [p for p in prompts for _ in range(n)]
        if any(len(p) > P for p in rows):
            raise UserError(f"a prompt is longer than prompt_len {P}")
        prompt_ids = torch.tensor([[pad] * (P - len(p)) + p for p in rows], dtype=torch.long)
        prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in rows])
        # cut the padding after the batch's longest response: every later pass costs the
        # tokens produced, and masked positions change no loss or log-prob
        longest = max(1, int(out["response_mask"].sum(1).max()))
        resp, resp_mask = out["responses"][:, :longest], out["response_mask"][:, :longest]
        return Batch(
            {
                "input_ids": torch.cat([prompt_ids, resp], 1),
                "attention_mask": torch.cat([prompt_mask, resp_mask], 1),
                "responses": resp,
                "response_mask": resp_mask,
                "rollout_log_probs": out["rollout_log_probs"][:, :longest],
            },
            non_tensors={"prompt_ids": rows, "prompt_ref": refs},
            meta={"prompt_len": P},
        )

    # ---- calls -------------------------------------------------------------------------
    def outputs(self, batch: Batch, wanted: dict[str, tuple[str, str]]) -> Batch:
        """{field: (role, method)} computed concurrently, added to the batch."""
        futures = {
            key: self.groups[role].call(role, method, batch, key)
            for key, (role, method) in wanted.items()
        }
        for f in futures.values():
            batch = batch.union(f.result())
        return batch

    def rule(self, batch: Batch, kind: str = "score") -> torch.Tensor:
        """The rule score (or cost) of each response; NaN where the job has no such rule
        (a user's job scored by a learned model alone)."""
        n = batch["responses"].shape[0]
        if not self.inputs.rules.has(kind):
            return torch.full((n,), float("nan"))
        lengths = batch["response_mask"].sum(-1).tolist()
        responses = [r[: int(k)].tolist() for r, k in zip(batch["responses"], lengths)]
        refs = batch.non_tensors["prompt_ref"]
        return torch.tensor(self.inputs.rules.score(kind, refs, responses), dtype=torch.float32)

    def update(self, updates: dict[str, Any], batch: Batch) -> dict[str, float]:
        """{role: loss_fn} trained concurrently over the job's epochs and mini-batches."""
        job = self.plan.job
        futures = [
            self.groups[role].call(role, "update", batch, loss, job.mini_batches, job.ppo_epochs)
            for role, loss in updates.items()
        ]
        metrics: dict[str, float] = {}
        for f in futures:
            metrics.update(metrics_of(f.result()))
        return metrics
