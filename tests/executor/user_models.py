"""Small random-initialised Hugging Face folders, data files and reward functions, built with
transformers the way a user's own checkpoints look (for the user-job tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = [str(d) for d in range(10)] + list("abcdefghijklmnopqrstuvwxyz") + ["+", "=", "?"]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
VOCAB = 256  # a multiple of 64 x tp (vLLM's vocab shards), room for unused rows
CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def save_tokenizer(folder: Path, chat_template: bool = True) -> None:
    """A word-level tokenizer over digits, letters and a few symbols, BOS prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))


def _common(layers: int, hidden: int, heads: int, kv: int, ffn: int) -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hidden // heads,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="float32",
    )


def qwen2_actor(folder: Path, seed: int = 0) -> Path:
    """A Qwen2 causal LM with QKV bias and tied embeddings (as Qwen2.5-0.5B), 2 layers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**_common(2, 64, 2, 1, 128), tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg)
    _spread_biases(model)
    model.save_pretrained(str(folder), safe_serialization=True)
    save_tokenizer(folder)
    return folder


def llama_reward(folder: Path, seed: int = 1) -> Path:
    """A Llama sequence classifier (one label: the score head), 4 layers, wider than the
    actor: a reward model of another size."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(**_common(4, 128, 4, 2, 256), num_labels=1, tie_word_embeddings=False)
    LlamaForSequenceClassification(cfg).save_pretrained(str(folder), safe_serialization=True)
    save_tokenizer(folder)
    return folder


@torch.no_grad()
def _spread_biases(model: torch.nn.Module) -> None:
    """transformers initialises biases to zero: random ones, so that a lost bias shows."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.normal_(0.0, 0.1)


def write_prompts(path: Path, n: int, seed: int = 0) -> Path:
    """n verl-style rows: a chat prompt "what is a + b ?", its answer under reward_model."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        a, b = (int(x) for x in torch.randint(0, 5, (2,), generator=g))
        rows.append(
            {
                "data_source": "sums",
                "prompt": [{"role": "user", "content": f"what is {a} + {b} ?"}],
                "reward_model": {"ground_truth": str(a + b)},
                "extra_info": {"row": i},
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


REWARD_FN = '''
def digit_reward(data_source, solution_str, ground_truth, extra_info):
    """1 for the right sum anywhere in the answer, else the share of digits in it."""
    words = solution_str.split()
    if ground_truth in words:
        return 1.0
    return sum(w.isdigit() for w in words) / max(len(words), 1) * 0.5
'''


def write_reward_fn(path: Path) -> Path:
    path.write_text(REWARD_FN)
    return path
