"""Actors of benchmarks/trl_grpo.py beyond the built-in tiny one: random-initialised
Llama-style models of about 25 M and 100 M parameters over the built-in task's tokenizer,
saved as Hugging Face folders (what `hybridflow plan --model DIR` and TRL both load), the
task's training prompts as a JSONL data file, and the task's rule as a `--reward-fn`
function. Run the benchmark, not this file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# hidden, layers, heads, FFN: 8 x 3.2 M and 14 x 7.1 M parameters per layer
SIZES: dict[str, tuple[int, int, int, int]] = {
    "25m": (512, 8, 8, 1408),
    "100m": (768, 14, 12, 2048),
}
REWARD_FN = f"{Path(__file__).resolve().with_name('trl_reward.py')}:rule_score"


def actor_folder(size: str, art, root: Path, seed: int, max_len: int) -> Path:
    """The `size` actor as a Hugging Face folder under `root` (built once), the task's
    tokenizer files beside its weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybridflow.executor.task.artifacts import ensure_tokenizer_folder

    out = root / f"actor-{size}-seed{seed}"
    if (out / "config.json").exists():
        return out
    hidden, layers, heads, ffn = SIZES[size]
    vocab = json.loads((Path(art.actor_dir) / "config.json").read_text())["vocab_size"]
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(256, max_len),
        tie_word_embeddings=False,
        bos_token_id=art.special.bos,
        eos_token_id=art.special.eos,
        pad_token_id=art.special.pad,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    for f in ensure_tokenizer_folder(art).iterdir():
        shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out


def parameters(model: str | Path) -> int:
    """The parameter count of a model (a catalog name or a folder), as the simulator
    counts it."""
    from hybridflow.simulator.model import load_model

    return load_model(str(model)).params


def data_file(art, root: Path) -> Path:
    """The task's training prompts as JSONL, each row's answer key the prompt itself (the
    task's rule scores a response against its prompt: trl_reward.rule_score)."""
    from hybridflow.executor.task.artifacts import prompt_records

    out = root / "train.jsonl"
    rows = [json.dumps({"prompt": r.prompt}) for r in prompt_records(art, "train")]
    out.write_text("\n".join(rows) + "\n")
    return out
