"""Single-process pre-RL training of the tiny models: SFT warm-up and Bradley–Terry reward models.

Plain PyTorch on Hugging Face Llama models built from a ModelSpec. Used by executor.task.artifacts
to build the cached task artifacts, and by the single-process RL benchmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from hybridflow.executor.task.tokens import SpecialIds
from hybridflow.simulator.architecture import ModelSpec


def llama_config(spec: ModelSpec, ids: SpecialIds, num_labels: int | None = None) -> LlamaConfig:
    """The HF LlamaConfig of a catalog architecture (no biases, untied embeddings)."""
    if spec.qkv_bias or spec.tied_embeddings:
        raise ValueError(
            f"model {spec.name!r}: the local task needs a Llama without qkv bias "
            f"and with untied embeddings"
        )
    kw = dict(num_labels=num_labels) if num_labels is not None else {}
    return LlamaConfig(
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        intermediate_size=spec.ffn,
        vocab_size=spec.vocab,
        rms_norm_eps=spec.norm_eps,
        rope_theta=spec.rope_theta,
        max_position_embeddings=spec.max_position,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=ids.pad,
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
        **kw,
    )


def new_policy(spec: ModelSpec, ids: SpecialIds, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(spec, ids)).float()


def reward_from_policy(policy: LlamaForCausalLM, seed: int) -> LlamaForSequenceClassification:
    """A scalar-head model whose backbone starts from the policy's (the usual RM init)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig.from_dict(policy.config.to_dict())
    cfg.num_labels = 1
    rm = LlamaForSequenceClassification(cfg).float()
    rm.model.load_state_dict(policy.model.state_dict())
    torch.nn.init.normal_(rm.score.weight, std=0.02)
    return rm


def pad_right(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), right-padded to the longest sequence."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_left(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), left-padded (the layout generation wants for prompts)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, n - len(s) :] = 1
    return ids, mask


def sft(
    model: LlamaForCausalLM,
    prompts: list[list[int]],
    answers: list[list[int]],
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    pad: int,
) -> list[float]:
    """Next-token loss on the answer tokens only; returns the loss of every step."""
    if not prompts or len(prompts) != len(answers):
        raise ValueError("sft needs as many answers as prompts, and at least one")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(prompts), (batch,), generator=gen).tolist()
        ids, mask = pad_right([prompts[i] + answers[i] for i in idx], pad)
        labels = torch.full_like(ids, -100)
        for row, i in enumerate(idx):
            p, a = len(prompts[i]), len(answers[i])
            labels[row, p : p + a] = ids[row, p : p + a]
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def train_bradley_terry(
    model: LlamaForSequenceClassification,
    pairs: list[tuple[list[int], list[int]]],
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    pad: int,
    signs: list[tuple[float, ...]] | None = None,
) -> list[float]:
    """-log sigmoid(r(better) - r(worse)) over (better ids, worse ids) pairs; step losses.

    ``signs`` (+1 / -1 per sequence of each pair) adds Safe-RLHF's cost-model term
    -log sigmoid(sign * r), which pins the sign of the output (cost > 0: unsafe).
    """
    if not pairs or (signs is not None and len(signs) != len(pairs)):
        raise ValueError("Bradley-Terry training needs pairs (and a sign pair for each)")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(pairs), (batch,), generator=gen).tolist()
        seqs = [pairs[i][0] for i in idx] + [pairs[i][1] for i in idx]
        r = scalar_scores(model, seqs, pad)
        loss = -F.logsigmoid(r[:batch] - r[batch:]).mean()
        if signs is not None:
            sign = torch.tensor([signs[i][0] for i in idx] + [signs[i][1] for i in idx])
            loss = loss - F.logsigmoid(sign * r).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def scalar_scores(
    model: LlamaForSequenceClassification, seqs: list[list[int]], pad: int
) -> torch.Tensor:
    """The model's scalar at the last real token of each (right-padded) sequence."""
    ids, mask = pad_right(seqs, pad)
    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, 1), at the last non-pad
    return logits[:, 0]


@torch.no_grad()
def generate(
    model: LlamaForCausalLM,
    prompts: list[list[int]],
    max_new: int,
    ids: SpecialIds,
    temperature: float,
    seed: int,
) -> list[list[int]]:
    """Responses (token ids up to and including EOS, or max_new tokens); greedy at t=0."""
    torch.manual_seed(seed)
    inp, mask = pad_left(prompts, ids.pad)
    sample = temperature > 0
    out = model.generate(
        input_ids=inp,
        attention_mask=mask,
        max_new_tokens=max_new,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_k=0 if sample else None,
        top_p=1.0 if sample else None,
        pad_token_id=ids.pad,
        eos_token_id=ids.eos,
        use_cache=True,
    )
    responses = []
    for row in out[:, inp.shape[1] :].tolist():
        cut = row.index(ids.eos) + 1 if ids.eos in row else len(row)
        responses.append(row[:cut])
    return responses
