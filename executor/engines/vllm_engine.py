"""vLLM as an SPMD generation engine inside an existing torch.distributed (gloo) world.

Every rank of the world creates one :class:`VllmEngine` together; each tensor-parallel group
(any partition of the ranks into equal groups, strided ones included) is one vLLM instance,
the groups are independent replicas. vLLM runs with ``distributed_executor_backend=
"external_launcher"`` (in-process engine, one worker per rank), after we have built vLLM's
parallel groups ourselves: vLLM would otherwise make consecutive TP groups.

Weights are loaded *sharded and in place*: the engine's parameters are marked so vLLM's own
weight loaders copy the rank-local tensors as they are (no full tensor is ever built), then
the worker's ``reload_weights`` runs the usual post-load processing (oneDNN repacking on CPU).
"""

from __future__ import annotations

import glob
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import MethodType
from typing import Any

import torch
import torch.distributed as dist

from hybridflow.errors import UserError
from hybridflow.executor.engines.groups import WorldWatch, shared_new_groups

_VLLM_WORLD = WorldWatch()  # the torch world vLLM's world group belongs to


class EngineError(UserError):
    """Bad engine or sampling settings."""


@dataclass(frozen=True)
class SamplingConfig:
    """Generation settings of the job (one vLLM SamplingParams)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    n: int = 1
    seed: int | None = None
    ignore_eos: bool = True  # fixed-length responses

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise EngineError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1 or self.n < 1:
            raise EngineError(f"max_tokens and n must be >= 1, got {self.max_tokens}, {self.n}")
        if self.temperature == 0 and self.n > 1:
            raise EngineError("greedy sampling (temperature 0) with n > 1 gives n equal samples")

    def to_vllm(self, seed: int | None = None):
        from vllm import SamplingParams

        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            n=self.n,
            seed=self.seed if seed is None else seed,
            logprobs=0,
            detokenize=False,
            ignore_eos=self.ignore_eos,
        )


@dataclass(frozen=True)
class Completion:
    """One sampled response: its prompt's index in the caller's list, sample number."""

    prompt_index: int
    sample: int
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]


@dataclass(frozen=True)
class VllmConfig:
    model_dir: str  # a Hugging Face checkpoint dir (config.json; weights unless "dummy")
    tp_groups: tuple[tuple[int, ...], ...]  # global ranks, ordered by TP rank
    seed: int = 0
    kv_cache_bytes: int = 32 << 20
    max_model_len: int = 256
    max_num_seqs: int = 64
    threads: int = 1
    load_format: str = "auto"  # "dummy": random weights, to be replaced by load_sharded()
    dtype: str = "float32"
    world_size: int = field(init=False)

    def __post_init__(self) -> None:
        groups = tuple(tuple(int(r) for r in g) for g in self.tp_groups)
        object.__setattr__(self, "tp_groups", groups)
        ranks = sorted(r for g in groups for r in g)
        if not groups or ranks != list(range(len(ranks))):
            raise EngineError(f"tp_groups {groups} must partition ranks 0..N-1")
        if len({len(g) for g in groups}) != 1:
            raise EngineError(f"tp_groups {groups} must all have the same size")
        if self.kv_cache_bytes <= 0 or self.max_model_len <= 0 or self.threads <= 0:
            raise EngineError("kv_cache_bytes, max_model_len and threads must be positive")
        if self.load_format not in ("auto", "dummy", "safetensors"):
            raise EngineError(f"load_format {self.load_format!r}: auto, dummy or safetensors")
        object.__setattr__(self, "world_size", len(ranks))

    @property
    def tp_size(self) -> int:
        return len(self.tp_groups[0])


_ident_count = 0  # calls of _world_ident so far


def _world_ident() -> str:
    """A name unique to this job, the same on every rank (rank 0's pid and a counter)."""
    global _ident_count
    obj = [f"hf{os.getpid()}x{_ident_count}"]
    _ident_count += 1
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def _use_job_ident(ident: str) -> None:
    """vLLM names its CPU shared-memory segments after the init method, hard-coded "env://"
    for external launchers, so concurrent or leftover jobs collide; give it a unique one."""
    from vllm.v1.executor.uniproc_executor import ExecutorWithExternalLauncher

    def _distributed_args(self) -> tuple[str, int, int]:
        return f"tcp://127.0.0.1:{ident}", int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])

    ExecutorWithExternalLauncher._distributed_args = _distributed_args
    os.environ["VLLM_DIST_IDENT"] = ident


def _install_parallel_groups(tp_groups: Sequence[Sequence[int]]) -> None:
    """Build vLLM's groups from ours before LLM(): TP as given, PP/DP/CP of one rank."""
    from vllm.distributed import parallel_state as ps

    with shared_new_groups():
        _init_vllm_groups(ps, tp_groups)


def _init_vllm_groups(ps: Any, tp_groups: Sequence[Sequence[int]]) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if _VLLM_WORLD.changed():
        # vLLM keeps its world group for the process; this process joined a new world
        ps._WORLD, ps._NODE_COUNT = None, None
    ps.init_distributed_environment(world, rank, "env://", rank, backend=backend)
    singles = [[r] for r in range(world)]
    groups = [list(g) for g in tp_groups]
    ps._TP = ps.init_model_parallel_group(
        groups, rank, backend, use_message_queue_broadcaster=True, group_name="tp"
    )
    ps._ETP = ps._EP = ps._TP  # MoE: experts split over TP (vLLM's EP group is DP x TP)
    ps._DCP = ps.init_model_parallel_group(
        singles, rank, backend, use_message_queue_broadcaster=True, group_name="dcp"
    )
    ps._PCP = ps.init_model_parallel_group(singles, rank, backend, group_name="pcp")
    ps._PP = ps.init_model_parallel_group(singles, rank, backend, group_name="pp")
    ps._DP = ps.init_model_parallel_group(singles, rank, backend, group_name="dp")


def _vocab_shard_loader(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    n = loaded_weight.shape[0]
    param.data[:n].copy_(loaded_weight)
    param.data[n:].fill_(0)


def _load_expert_shard(
    layer: Any,
    param: torch.Tensor,
    loaded_weight: torch.Tensor,
    weight_name: str,
    shard_id: str,
    expert_id: int,
    return_success: bool = False,
) -> Any:
    """vLLM's fused-MoE expert loader (``RoutedExperts.weight_loader``, same signature) for a
    rank-local expert tensor: run as at TP 1, where it copies the tensor whole instead of
    narrowing it to this rank's 1/TP."""
    par = layer.moe_config.moe_parallel_config
    saved = par.tp_size, par.tp_rank
    par.tp_size, par.tp_rank = 1, 0
    try:
        loader = type(layer).weight_loader
        return loader(layer, param, loaded_weight, weight_name, shard_id, expert_id, return_success)
    finally:
        par.tp_size, par.tp_rank = saved


def _expert_shard_loader(loader: Any) -> Any:
    """:func:`_load_expert_shard` bound as `loader` (a bound ``RoutedExperts.weight_loader``)
    is: to the layer, or to the placeholder vLLM's reload metadata binds it to."""
    if not isinstance(loader, MethodType) or loader.__func__ is _load_expert_shard:
        return loader
    return MethodType(_load_expert_shard, loader.__self__)


def _process_and_prepack(method: Any, layer: torch.nn.Module) -> None:
    """vLLM's unquantized fused-MoE post-load step, but on a weight update also the experts'
    own step: vLLM runs that (on CPU: pad the intermediate size, prepack into the grouped-GEMM
    layout) on the first load only (``unquantized_fused_moe_method.py:191-204``), so a
    reload would leave raw, unpadded weights where the CPU kernel reads packed ones."""
    update = method.moe_kernel is not None
    type(method).process_weights_after_loading(method, layer)
    if update:
        method.moe_kernel.fused_experts.process_weights_after_loading(layer)


def _mark_sharded_loading(model: torch.nn.Module) -> None:
    """Make vLLM's loaders take rank-local tensors as they are: v1 linear loaders honour
    ``is_sharded_weight``, v2 parameters slice at their ``tp_rank`` (set to 0: the local
    tensor is the whole slice); vocab layers get a loader that copies the local rows; fused
    MoE experts a loader run as for TP 1 (:func:`_expert_shard_loader`). Set on the metadata
    the in-place reload restores parameters from, so every reload uses it. The engine's
    weights then only ever come from load_sharded()."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
    from vllm.model_executor.parameter import BasevLLMParameter

    for module in model.modules():
        if not isinstance(module, (LinearBase, VocabParallelEmbedding, RoutedExperts)):
            continue
        restore = get_layerwise_info(module).restore_metadata[0]
        for p in [*restore.values(), *module.parameters(recurse=False)]:
            if isinstance(module, RoutedExperts):
                p.weight_loader = _expert_shard_loader(p.weight_loader)
                if not torch.cuda.is_available():
                    method = module.quant_method
                    method.process_weights_after_loading = MethodType(_process_and_prepack, method)
            elif isinstance(module, VocabParallelEmbedding):
                p.weight_loader = _vocab_shard_loader
            elif isinstance(p, BasevLLMParameter):
                p.tp_rank = 0  # v2 loaders narrow at tp_rank * local size: the identity
            else:
                p.is_sharded_weight = True


def _tied_heads(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The LM heads that share their weight with an input embedding (tied models)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        VocabParallelEmbedding,
    )

    modules = list(model.modules())
    embeds = {
        id(m.weight)
        for m in modules
        if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)
    }
    return [m for m in modules if isinstance(m, ParallelLMHead) and id(m.weight) in embeds]


def _refresh_tied_heads(model: torch.nn.Module) -> None:
    """A tied LM head receives no weights of its own on reload (the checkpoint has no
    lm_head), so vLLM keeps its post-load kernel (on CPU a oneDNN matrix packed from the
    previous weights): rebuild it from the shared, just loaded embedding."""
    for head in _tied_heads(model):
        head.quant_method.process_weights_after_loading(head)


def request_seed(seed: int, index: int, prompt: Sequence[int]) -> int:
    """A deterministic per-request seed from the call's seed, the request and its prompt."""
    blob = ",".join(map(str, (seed, index, *prompt))).encode()
    return zlib.crc32(blob) & 0x7FFFFFFF


class VllmEngine:
    """One rank's part of a vLLM instance; create it on every rank of the world together."""

    def __init__(self, cfg: VllmConfig):
        if not dist.is_initialized() or dist.get_world_size() != cfg.world_size:
            raise EngineError(f"VllmEngine needs a torch.distributed world of {cfg.world_size}")
        self.cfg = cfg
        self.rank = dist.get_rank()
        self.replica = next(i for i, g in enumerate(cfg.tp_groups) if self.rank in g)
        self.tp_rank = cfg.tp_groups[self.replica].index(self.rank)
        self._ident = _world_ident()
        for k, v in {
            "RANK": self.rank,
            "LOCAL_RANK": self.rank,
            "WORLD_SIZE": cfg.world_size,
            "VLLM_ENABLE_V1_MULTIPROCESSING": 0,
            "HF_HUB_OFFLINE": 1,
        }.items():
            os.environ[k] = str(v)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")  # unused: the world already exists
        torch.set_num_threads(cfg.threads)  # vLLM turns set_num_threads into a no-op
        _use_job_ident(self._ident)
        _install_parallel_groups(cfg.tp_groups)
        from vllm import LLM

        self.llm = LLM(
            model=cfg.model_dir,
            tensor_parallel_size=cfg.tp_size,
            distributed_executor_backend="external_launcher",
            enforce_eager=True,
            seed=cfg.seed,
            skip_tokenizer_init=True,
            dtype=cfg.dtype,
            kv_cache_memory_bytes=cfg.kv_cache_bytes,
            load_format=cfg.load_format,
            max_model_len=cfg.max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            enable_prefix_caching=False,
        )
        _mark_sharded_loading(self.model)

    @property
    def tp_size(self) -> int:
        return self.cfg.tp_size

    @property
    def worker(self):
        return self.llm.llm_engine.model_executor.driver_worker.worker

    @property
    def model(self) -> torch.nn.Module:
        return self.worker.model_runner.get_model()

    def load_sharded(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load this rank's TP shard, as (Hugging Face name, local tensor) pairs with the
        fused parts of a layer together (q, k, v; gate, up), in place. A tied model's pairs
        have no lm_head: its head is the embedding."""
        self.worker.reload_weights(weights_iterator=iter(list(pairs)), is_checkpoint_format=True)
        _refresh_tied_heads(self.model)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        ids: Sequence[int] | None = None,
    ) -> list[Completion]:
        """Generate for this replica's prompts; every rank of the TP group passes the same.
        `ids` (default 0, 1, ...) seed each prompt's sampling with `sampling.seed`."""
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        params = sampling.to_vllm()
        if sampling.seed is not None:
            # one seed per request: a shared seed would give every prompt the same random
            # draws (samples correlated across the batch)
            ids = range(len(prompts)) if ids is None else ids
            params = [
                sampling.to_vllm(seed=request_seed(sampling.seed, i, p))
                for i, p in zip(ids, prompts)
            ]
        outs = self.llm.generate(inputs, params, use_tqdm=False) if inputs else []
        result = []
        for i, out in enumerate(outs):
            for s, c in enumerate(out.outputs):
                lps = tuple(float(d[t].logprob) for t, d in zip(c.token_ids, c.logprobs))
                result.append(Completion(i, s, tuple(c.token_ids), lps))
        return result

    def free_cache(self) -> None:
        """Drop generation state before training resumes. GPU: vLLM sleep (weights and KV
        cache released); CPU has no sleep mode, so only the prefix cache is reset."""
        if torch.cuda.is_available():
            self.llm.sleep(level=2)
        else:
            self.llm.reset_prefix_cache()

    def wake(self) -> None:
        if torch.cuda.is_available():
            self.llm.wake_up()

    def close(self) -> None:
        """Remove this job's shared-memory segments (vLLM leaves them behind)."""
        for path in glob.glob(f"/dev/shm/{self._ident}-*"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def shutdown(self) -> None:
        """Release the engine and vLLM's parallel groups but not the torch.distributed
        world (vLLM's own teardown destroys it), so that another engine, with other groups,
        can be created in this process."""
        import gc

        import vllm.v1.engine.core as core
        from vllm.distributed import parallel_state as ps

        dist.barrier()
        teardown = core.cleanup_dist_env_and_memory
        core.cleanup_dist_env_and_memory = lambda *a, **k: None
        try:
            self.llm.llm_engine.engine_core.shutdown()
            del self.llm
            gc.collect()
        finally:
            core.cleanup_dist_env_and_memory = teardown
        # ps.destroy_model_parallel() would destroy one-rank groups as the default group
        for name in ("_TP", "_ETP", "_EP", "_DCP", "_PCP", "_PP", "_DP"):
            setattr(ps, name, None)
        dist.barrier()
        self.close()
