"""The RLHF worker: one rank holding a set's roles, with the actor's 3D-HybridEngine.

Sequences are ``input_ids`` [b, P + R]: the prompt left-padded to P, the response
right-padded to R, with ``attention_mask``. Megatron's LM head gives at position t the
log-prob of token t+1, so the response's log-probs and values sit at positions P-1 .. P+R-2
(algorithms.response_slice); a reward model scores the last real token. The losses the
controller sends with an update are executor.rl.losses.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hybridflow.errors import UserError
from hybridflow.executor.controller.batch import Batch
from hybridflow.executor.controller.protocols import GENERATE, MEGATRON_3D, ONE_TO_ALL, register
from hybridflow.executor.controller.worker import Worker
from hybridflow.executor.engines import hf_folder, timers
from hybridflow.executor.engines import megatron_model as mm
from hybridflow.executor.engines.vllm_engine import VllmConfig, VllmEngine
from hybridflow.executor.hybrid_engine.engine import HybridEngine
from hybridflow.executor.hybrid_engine.reshard_plan import ReshardPlan
from hybridflow.executor.rl import algorithms as alg


# ---- optimizer checkpoints ---------------------------------------------------------------
def optimizer_state(optimizer: Any) -> list[tuple[dict, dict] | None]:
    """This rank's optimizer state: each (chained) megatron optimizer's state dict and its
    torch optimizer's. A distributed optimizer's own state dict leaves out Adam's moments
    (megatron saves them apart); the torch optimizer holds this rank's shard of them. None
    for one that has not stepped yet (a role still waiting for its first update), which
    is a fresh optimizer's state (and which megatron's state_dict refuses)."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return [(o.state_dict(), o.optimizer.state_dict()) if o.optimizer.state else None for o in subs]


def load_optimizer_state(optimizer: Any, state: list[tuple[dict, dict] | None] | dict) -> None:
    """Inverse of :func:`optimizer_state`, on the same plan (the same shards per rank)."""
    if isinstance(state, dict):  # a checkpoint of the megatron state dict alone
        optimizer.load_state_dict(state)
        return
    for o, saved in zip(getattr(optimizer, "chained_optimizers", [optimizer]), state):
        if saved is not None:
            o.load_state_dict(saved[0])
            o.optimizer.load_state_dict(saved[1])


# ---- what a rank needs to build its roles ------------------------------------------------
@dataclass(frozen=True)
class RolloutConfig:
    """The actor's generation side: generation TP, resharding scheme, vLLM engine sizes."""

    tg: int
    scheme: str
    model_dir: str  # Hugging Face folder vLLM starts from (weights then replaced)
    kv_cache_bytes: int = 16 << 20
    max_model_len: int = 128
    max_num_seqs: int = 256
    seed: int = 0


class RLWorker(Worker):
    """A rank of one worker group: the roles of one colocated set."""

    def __init__(self, rank: int, world_size: int, group_name: str = "group") -> None:
        super().__init__(rank, world_size, group_name)
        self.rollout: dict[str, HybridEngine] = {}

    # ---- set-up ------------------------------------------------------------------------
    @register(dispatch_mode=ONE_TO_ALL)
    def load_hf(self, role: str, path: str) -> None:
        """Load a Hugging Face folder's weights into this rank's shards of `role`: the rank
        reads only its stage's tensors and, of the split ones, only its slices."""
        engine, groups = self.role(role).engine, self.role(role).groups
        hf_folder.load_rank_weights(
            engine.model,
            path,
            engine.spec,
            engine.config.value_head,
            groups.tp_rank,
            groups.layout.tp,
        )

    @register(dispatch_mode=ONE_TO_ALL)
    def init_rollout(self, role: str, cfg: RolloutConfig) -> None:
        plan = ReshardPlan(self.role(role).groups.layout, cfg.tg, cfg.scheme)

        def factory(tp_groups: list[list[int]]) -> VllmEngine:
            return self.new_engine(
                VllmConfig(
                    model_dir=cfg.model_dir,
                    tp_groups=tuple(map(tuple, tp_groups)),
                    seed=cfg.seed,
                    kv_cache_bytes=cfg.kv_cache_bytes,
                    max_model_len=cfg.max_model_len,
                    max_num_seqs=cfg.max_num_seqs,
                    load_format="dummy",
                )
            )

        self.rollout[role] = HybridEngine(self.role(role).engine.spec, plan, factory)

    def new_engine(self, config: VllmConfig) -> VllmEngine:
        """The vLLM engine of a rollout (collective: every rank, in the same order); the
        profiler's worker reuses one across roles."""
        return VllmEngine(config)

    # ---- generation --------------------------------------------------------------------
    @register(dispatch_mode=GENERATE)
    def generate(self, role: str, prompts: Batch, sampling: Any) -> Batch:
        """Reshard to the generation layout, sample, reshard back. Prompts are this DP
        replica's ``prompt_ids`` (object field; ``prompt_seq``, if given, their indices in
        the whole batch, which seed the sampling); responses are padded to max_tokens."""
        he = self.rollout[role]
        t0 = time.perf_counter()
        shard = {n: p.detach() for n, p in self.role(role).engine.named_local_parameters()}
        stats = he.to_generation(shard)
        t1 = time.perf_counter()
        done = he.generate(
            [list(p) for p in prompts["prompt_ids"]], sampling, prompts.get("prompt_seq")
        )
        t2 = time.perf_counter()
        he.to_training()
        t3 = time.perf_counter()
        timers.add(f"generate:{role}.reshard", (t1 - t0) + (t3 - t2))
        timers.add(f"generate:{role}.vllm", t2 - t1)
        done = sorted(done, key=lambda c: (c.prompt_index, c.sample))
        R = sampling.max_tokens
        responses = torch.zeros(len(done), R, dtype=torch.long)
        mask = torch.zeros(len(done), R, dtype=torch.long)
        logprobs = torch.zeros(len(done), R)
        for i, c in enumerate(done):
            n = len(c.token_ids)
            responses[i, :n] = torch.tensor(c.token_ids, dtype=torch.long)
            mask[i, :n] = 1
            logprobs[i, :n] = torch.tensor(c.logprobs)
        # the stage ends with its slowest rank, as the profile's rows take it: every rank's
        # time, not only the replicas' first ranks that return the completions
        reshard = torch.tensor([(t1 - t0) + (t3 - t2)], dtype=torch.float64)
        torch.distributed.all_reduce(reshard, op=torch.distributed.ReduceOp.MAX)
        timing = {
            "reshard_s": float(reshard),
            "generate_s": t2 - t1,
            "reshard_bytes": stats.bytes_received,
        }
        return Batch(
            {"responses": responses, "response_mask": mask, "rollout_log_probs": logprobs},
            non_tensors={
                "prompt_index": [c.prompt_index for c in done],
                "timing": [timing] * len(done),
            },
        )

    # ---- forward-only ------------------------------------------------------------------
    def _forward(self, role: str, batch: Batch) -> torch.Tensor | None:
        """Per-token outputs [b, P+R] on the role's output rank, None elsewhere."""
        engine = self.role(role).engine
        out = engine.forward(batch.select(["input_ids", "attention_mask"]))
        return out if out is not None and engine.is_output_rank else None

    @register(dispatch_mode=MEGATRON_3D)
    def response_outputs(self, role: str, batch: Batch, key: str) -> Batch | None:
        """Log-probs (LM roles) or values (value roles) of the response tokens as `key`."""
        out = self._forward(role, batch)
        if out is None:
            return None
        P, R = batch.meta["prompt_len"], batch["responses"].shape[1]
        return Batch({key: alg.response_slice(out, P, R).contiguous()})

    @register(dispatch_mode=MEGATRON_3D)
    def sequence_scores(self, role: str, batch: Batch, key: str) -> Batch | None:
        """A value-head model's score at each sequence's last real token."""
        out = self._forward(role, batch)
        if out is None:
            return None
        last = batch["attention_mask"].long().cumsum(-1).argmax(-1)
        return Batch({key: out[torch.arange(out.shape[0]), last].contiguous()})

    # ---- training ----------------------------------------------------------------------
    @register(dispatch_mode=MEGATRON_3D)
    def update(
        self, role: str, batch: Batch, loss_fn: Any, mini_batches: int, epochs: int
    ) -> Batch | None:
        """`epochs` passes over this DP slice in `mini_batches` optimizer steps; the mean
        of each metric over the steps."""
        engine = self.role(role).engine
        steps = [
            engine.train_step(mb, loss_fn)
            for _ in range(epochs)
            for mb in batch.split(mini_batches)
        ]
        if not engine.is_output_rank:
            return None
        mean = {k: sum(s[k] for s in steps) / len(steps) for k in steps[0]}
        return Batch(non_tensors={k: [v] for k, v in mean.items()})

    # ---- checkpoints -------------------------------------------------------------------
    @register(dispatch_mode=ONE_TO_ALL)
    def save_role(self, role: str, folder: str) -> str:
        engine, groups = self.role(role).engine, self.role(role).groups
        state = {
            "coords": {
                "tp_rank": groups.tp_rank,
                "pp_rank": groups.pp_rank,
                "dp_rank": groups.dp_rank,
            },
            "params": {n: p.detach().clone() for n, p in engine.named_local_parameters()},
            "optimizer": optimizer_state(engine.optimizer) if engine.optimizer else None,
        }
        path = Path(folder) / f"{role}.rank{self.rank}.pt"
        # through a Python file: a full disk is an OSError (errno ENOSPC), not the
        # RuntimeError torch.save(state, path) raises from its zip writer
        with path.open("wb") as f:
            torch.save(state, f)
        return str(path)

    @register(dispatch_mode=ONE_TO_ALL)
    def load_role(self, role: str, folder: str) -> None:
        engine = self.role(role).engine
        path = Path(folder) / f"{role}.rank{self.rank}.pt"
        if not path.exists():
            raise UserError(f"checkpoint {folder} lacks {path.name} (a different plan?)")
        state = torch.load(path, weights_only=False)
        with torch.no_grad():
            mm.load_local_state(engine.model, state["params"])
        if engine.optimizer is not None and state["optimizer"] is not None:
            load_optimizer_state(engine.optimizer, state["optimizer"])

    def shutdown(self) -> None:
        for he in self.rollout.values():
            he.close()
        self.rollout.clear()
        super().shutdown()

    @register(dispatch_mode=ONE_TO_ALL)
    def pid(self, role: str | None = None) -> int:
        return os.getpid()
