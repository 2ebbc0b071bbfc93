"""Per-role training/inference engine over megatron-core (TP, PP with 1F1B, DP).

The engine works on this rank's data-parallel slice of a batch (a :class:`Batch` with
``input_ids`` [b, s] and optionally ``attention_mask`` [b, s] (1 = real token),
``position_ids``, ``labels``); every rank of the DP slice receives the same slice: the first
pipeline stage consumes the inputs, the last one the loss fields.

Model output handed to losses and returned by :meth:`TrainEngine.forward` (shape [b, s]):

* LM head: ``logprobs[:, t] = log p(labels[:, t] | tokens <= t)``; without a ``labels``
  field the labels are the next tokens (``input_ids[:, t+1]``, last position 0).
* value head: ``values[:, t]``, the scalar head at position t.

A loss is ``loss_fn(output, batch_slice) -> (loss, metrics)``: ``loss`` a scalar mean over the
micro-batch, ``metrics`` a dict of floats/scalar tensors (averaged over micro-batches and DP).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from hybridflow.errors import UserError
from hybridflow.executor.controller.batch import Batch
from hybridflow.executor.engines import cuda_bridge, timers, weights
from hybridflow.executor.engines import megatron_model as mm
from hybridflow.executor.engines.groups import RoleGroups
from hybridflow.simulator.architecture import ModelSpec

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

LossFn = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, dict[str, Any]]]


class EngineConfigError(UserError):
    """An engine setting that cannot be used."""


@dataclass(frozen=True)
class EngineConfig:
    micro_batch_size: int = 1
    forward_micro_batch_size: int = 0  # forward-only passes (no activations kept); 0: as train
    lr: float = 1e-3
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    use_distributed_optimizer: bool = False
    recompute: str = "none"  # activation recompute: none | selective | full
    value_head: bool = False
    trainable: bool = True
    dtype: str = "float32"
    seed: int = 1234
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if not isinstance(self.micro_batch_size, int) or self.micro_batch_size < 1:
            raise EngineConfigError(
                f"micro_batch_size must be a positive integer, got {self.micro_batch_size!r}"
            )
        if not self.lr >= 0 or not self.weight_decay >= 0 or not self.clip_grad >= 0:
            raise EngineConfigError("lr, weight_decay and clip_grad must be >= 0")
        if self.recompute not in mm.RECOMPUTE:
            raise EngineConfigError(
                f"recompute must be one of {', '.join(mm.RECOMPUTE)}, got {self.recompute!r}"
            )

    @property
    def model_options(self) -> mm.ModelOptions:
        return mm.ModelOptions(
            value_head=self.value_head,
            dtype=self.dtype,
            init_std=self.init_std,
            recompute=self.recompute,
        )


def _next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    labels = torch.zeros_like(input_ids)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def _attention_inputs(mb: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """position_ids, and megatron's boolean mask [b, 1, s, s] (True = masked) or None
    (then megatron applies its own causal mask)."""
    ids = mb["input_ids"]
    b, s = ids.shape
    if "attention_mask" not in mb:
        pos = mb.get("position_ids", torch.arange(s, device=ids.device).expand(b, s))
        return pos, None
    keep = mb["attention_mask"].bool()
    pos = mb.get("position_ids", (keep.long().cumsum(-1) - 1).clamp(min=0))
    causal = torch.ones(s, s, dtype=torch.bool, device=ids.device).triu(1)
    mask = causal[None, None] | ~keep[:, None, None, :]
    return pos, mask


class TrainEngine:
    """One role's model on this rank: forward-only outputs and train steps."""

    def __init__(
        self, role: str, spec: ModelSpec, groups: RoleGroups, config: EngineConfig
    ) -> None:
        self.role, self.spec, self.groups, self.config = role, spec, groups, config
        with groups.active():
            chunks = mm.build_local_model(spec, groups, config.model_options, config.seed)
            self.tconfig = mm.unwrap(chunks[0]).config
            self.model: list[torch.nn.Module] = chunks
            self.optimizer = None
            if config.trainable:
                self._setup_training()

    def _setup_training(self) -> None:
        # over one data-parallel rank the distributed optimizer shards nothing; its
        # parameter all-gather would still copy every weight through the process group
        distopt = self.config.use_distributed_optimizer and self.groups.layout.dp > 1
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=distopt,
        )
        self.model = [
            DDP(self.tconfig, ddp_config, chunk, disable_bucketing=(i > 0))
            for i, chunk in enumerate(self.model)
        ]
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=self.config.lr,
            weight_decay=self.config.weight_decay,
            clip_grad=self.config.clip_grad,
            adam_beta1=self.config.adam_betas[0],
            adam_beta2=self.config.adam_betas[1],
            params_dtype=self.config.model_options.torch_dtype,
            bf16=self.config.dtype == "bfloat16",
            fp16=self.config.dtype == "float16",
            use_distributed_optimizer=distopt,
        )
        self.optimizer = get_megatron_optimizer(
            opt_config, self.model, use_gloo_process_groups=False
        )

    # ---- one micro-batch -----------------------------------------------------------------
    def _forward_step(
        self, loss_fn: LossFn | None, data_iterator: Any, model: torch.nn.Module
    ) -> tuple[torch.Tensor, Callable]:
        mb: Batch = next(data_iterator).to(cuda_bridge.device())
        ids = mb["input_ids"]
        pos, mask = _attention_inputs(mb)
        labels = None
        if not self.config.value_head:
            labels = mb.get("labels", _next_token_labels(ids))
        out = model(ids, pos, mask, labels=labels)
        return out, partial(self._loss, loss_fn, mb)

    def _loss(
        self, loss_fn: LossFn | None, mb: Batch, model_out: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        # LM head with labels returns per-token cross-entropy [b, s]; value head [b, s, 1]
        output = model_out.squeeze(-1) if self.config.value_head else -model_out
        if loss_fn is None:
            return output.sum() * 0.0, {"output": output.detach()}
        loss, metrics = loss_fn(output, mb)
        return loss, {k: torch.as_tensor(v).detach().float().clone() for k, v in metrics.items()}

    def _run(self, batch: Batch, loss_fn: LossFn | None, forward_only: bool) -> list[dict]:
        size = self.config.micro_batch_size
        if forward_only and self.config.forward_micro_batch_size:
            # the largest micro-batch up to the setting that splits the batch evenly
            most = min(self.config.forward_micro_batch_size, len(batch))
            size = max(d for d in range(1, most + 1) if len(batch) % d == 0)
        micro = batch.chunks_of(min(size, len(batch)))
        model = self.model if len(self.model) > 1 else self.model[0]
        data = iter(micro) if len(self.model) == 1 else [iter(micro) for _ in self.model]
        return get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, loss_fn),
            data_iterator=data,
            model=model,
            num_microbatches=len(micro),
            seq_length=batch["input_ids"].shape[1],
            micro_batch_size=len(micro[0]),
            forward_only=forward_only,
        )

    # ---- public API ----------------------------------------------------------------------
    @property
    def is_output_rank(self) -> bool:
        """Last pipeline stage and TP rank 0: where outputs are collected."""
        return self.groups.pp_rank == self.groups.layout.pp - 1 and self.groups.tp_rank == 0

    @torch.no_grad()
    def forward(self, batch: Batch) -> torch.Tensor | None:
        """Log-probs (LM head) or values (value head) [b, s] on the last stage, else None."""
        with self.groups.active():
            for m in self.model:
                m.eval()
            with timers.timed(f"compute:{self.role}.forward"):
                store = self._run(batch, None, forward_only=True)
        if not store:
            return None
        return torch.cat([d["output"] for d in store]).cpu()

    def train_step(self, batch: Batch, loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over this rank's slice; metrics averaged over micro-batches
        and data-parallel ranks (the same dict on every rank)."""
        if self.optimizer is None:
            raise EngineConfigError(f"role {self.role!r} is forward-only (trainable=False)")
        with self.groups.active():
            for m in self.model:
                m.train()
                m.zero_grad_buffer()
            self.optimizer.zero_grad()
            with timers.timed(f"compute:{self.role}.forward_backward"):
                store = self._run(batch, loss_fn, forward_only=False)
            with timers.timed(f"compute:{self.role}.optimizer"):
                ok, grad_norm, _ = self.optimizer.step()
            with timers.timed(f"sync:{self.role}.metrics"):
                metrics = self._reduce_metrics(store)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["update_ok"] = float(bool(ok))
        return metrics

    def _reduce_metrics(self, store: list[dict]) -> dict[str, float]:
        """Mean over micro-batches on the last stage, then over DP, then sent to all stages."""
        keys = sorted(store[0]) if store else []
        names = [None] if not keys else keys
        obj = [names if ps.is_pipeline_last_stage(ignore_virtual=True) else None]
        torch.distributed.broadcast_object_list(
            obj,
            src=ps.get_pipeline_model_parallel_last_rank(),
            group=ps.get_pipeline_model_parallel_group(),
        )
        assert obj[0] is not None  # the broadcast filled it in on every stage
        keys = [k for k in obj[0] if k is not None]
        vals = torch.zeros(len(keys), dtype=torch.float64)
        if store:
            vals = torch.stack([torch.stack([d[k].double() for d in store]).mean() for k in keys])
        torch.distributed.all_reduce(vals, group=ps.get_data_parallel_group())
        vals /= ps.get_data_parallel_world_size()
        torch.distributed.broadcast(
            vals,
            src=ps.get_pipeline_model_parallel_last_rank(),
            group=ps.get_pipeline_model_parallel_group(),
        )
        return {k: float(v) for k, v in zip(keys, vals)}

    # ---- weights -------------------------------------------------------------------------
    def named_local_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """(megatron name with global layer number, local shard) of this rank."""
        return list(mm.named_local_parameters(self.model))

    def local_state(self) -> dict[str, Any]:
        """This rank's shards with their TP partition, for gathering a full state."""
        return {
            name: (p.detach().cpu().clone(), mm.tp_partition(p))
            for name, p in self.named_local_parameters()
        }

    def load_full_megatron_state(self, state: dict[str, torch.Tensor]) -> None:
        mm.load_full_state(self.model, state, self.groups.tp_rank, self.groups.layout.tp)

    def load_state(self, full_hf_state_dict: dict[str, torch.Tensor]) -> None:
        """Load a full Hugging Face Llama state dict (this rank keeps its shards of it)."""
        self.load_full_megatron_state(weights.hf_to_megatron(full_hf_state_dict, self.spec))


# ---- simple reference losses (SFT / reward-model style); the RL losses live elsewhere --
def lm_loss(output: torch.Tensor, mb: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean negative log-likelihood over ``loss_mask`` (all tokens without one)."""
    mask = mb.get("loss_mask", torch.ones_like(output)).to(output.dtype)
    loss = -(output * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"loss": loss}


def value_loss(output: torch.Tensor, mb: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean squared error of the values against ``returns`` over ``loss_mask``."""
    mask = mb.get("loss_mask", torch.ones_like(output)).to(output.dtype)
    err = (output - mb["returns"].to(output.dtype)) ** 2
    loss = (err * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"loss": loss}
