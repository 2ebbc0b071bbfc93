"""vLLM prefill and decode step times over batch and context, on a random-init tiny Llama.

The model is built from a simulator ModelSpec with transformers (random weights, saved locally;
nothing is downloaded) and served by vLLM in one fresh process (in-process engine, eager mode).
Engine steps are timed one by one: prefill is the first step of a batch of `tokens`-token
prompts (it samples the first token); decode is the median of the d steps that follow a
prompt of `context` tokens (reported at the middle context).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hybridflow.executor.spawn import run_ranks
from hybridflow.simulator.architecture import ModelSpec
from hybridflow.simulator.model import load_model


@dataclass(frozen=True)
class GenerateGrid:
    model: str
    batches: tuple[int, ...]
    prompt_tokens: tuple[int, ...]  # prefill lengths
    contexts: tuple[int, ...]  # decode contexts
    decode_steps: int = 8
    dtype: str = "float32"
    repeats: int = 2

    def __post_init__(self) -> None:
        spec = load_model(self.model)  # raises ModelError for an unknown model
        for name in ("batches", "prompt_tokens", "contexts"):
            vals = getattr(self, name)
            if not vals or any(not isinstance(v, int) or v <= 0 for v in vals):
                raise ValueError(f"generate grid {name} must be positive integers: {vals}")
        longest = max(max(self.prompt_tokens) + 1, max(self.contexts) + self.decode_steps + 1)
        if longest > spec.max_position:
            raise ValueError(
                f"generate grid needs {longest} positions; model {self.model!r} "
                f"has {spec.max_position}"
            )
        if self.decode_steps < 1 or self.repeats < 1:
            raise ValueError("decode_steps and repeats must be >= 1")

    @property
    def max_len(self) -> int:
        return max(max(self.prompt_tokens) + 1, max(self.contexts) + self.decode_steps + 1)


def default_grid(quick: bool, gpu: bool, model: str = "tiny") -> GenerateGrid:
    if gpu:
        return GenerateGrid(
            model,
            (1, 8, 32) if quick else (1, 4, 16, 64, 128),
            (64, 256) if quick else (32, 128, 256, 480),
            (64, 256) if quick else (32, 128, 256, 480),
            dtype="bfloat16",
        )
    return GenerateGrid(
        model,
        (1, 8) if quick else (1, 4, 16, 32),
        (16, 128) if quick else (16, 64, 128, 256),
        (16, 128) if quick else (16, 64, 128, 256),
        repeats=1 if quick else 2,
    )


def save_random_llama(spec: ModelSpec, folder: Path, dtype: str, seed: int = 0) -> Path:
    """A Hugging Face Llama checkpoint with random weights, built from `spec`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.ffn,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position,
        rms_norm_eps=spec.norm_eps,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=spec.tied_embeddings,
        attention_bias=spec.qkv_bias,
        torch_dtype=dtype,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(folder)
    return folder


def _step_seconds(
    llm, batch: int, prompt_len: int, new_tokens: int, vocab: int, tag: str
) -> list[float]:
    """Seconds of each engine step while `batch` prompts generate `new_tokens` tokens each:
    the first step is the prefill (it samples the first token), the rest are decode steps."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(
        max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, temperature=0.0
    )
    for i in range(batch):
        ids = [(7 * i + 3 * j + 1) % vocab for j in range(prompt_len)]
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": ids}, params)
    times = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


def _measure(llm, grid: GenerateGrid, vocab: int) -> dict[str, list[dict]]:
    """Prefill: the fastest first step over repeats. Decode: the median step after it."""
    prefill, decode = [], []
    for b in grid.batches:
        for t in grid.prompt_tokens:
            firsts = [
                _step_seconds(llm, b, t, 1, vocab, f"p{b}-{t}-{r}")[0] for r in range(grid.repeats)
            ]
            prefill.append({"batch": b, "tokens": t, "seconds": min(firsts)})
        for c in grid.contexts:
            steps = [
                x
                for r in range(grid.repeats)
                for x in _step_seconds(llm, b, c, 1 + grid.decode_steps, vocab, f"d{b}-{c}-{r}")[1:]
            ]
            decode.append(
                {
                    "batch": b,
                    "context": c + grid.decode_steps // 2,
                    "seconds": statistics.median(steps),
                }
            )
    return {"prefill": prefill, "decode": decode}


def _rank_generate(rank: int, world: int, grid: GenerateGrid) -> dict[str, list[dict]]:
    import torch
    from vllm import LLM

    spec = load_model(grid.model)
    with tempfile.TemporaryDirectory(prefix="hf-profile-") as tmp:
        path = save_random_llama(spec, Path(tmp), grid.dtype)
        llm = LLM(
            model=str(path),
            skip_tokenizer_init=True,
            enforce_eager=True,
            dtype=grid.dtype,
            max_model_len=grid.max_len,
            seed=0,
            max_num_seqs=max(grid.batches),
            max_num_batched_tokens=max(grid.batches) * grid.max_len,
            gpu_memory_utilization=0.5 if torch.cuda.is_available() else 0.9,
        )
        _step_seconds(llm, 1, 8, 2, spec.vocab, "warm-up")
        return _measure(llm, grid, spec.vocab)


def measure_generate(
    grid: GenerateGrid, threads: int = 1, kv_cache_gib: int = 1
) -> dict[str, list[dict]]:
    """{"prefill": [{batch, tokens, seconds}], "decode": [{batch, context, seconds}]}."""

    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }
    return run_ranks(_rank_generate, 1, grid, threads=threads, env=env)[0]
