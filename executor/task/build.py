"""Build the task artifacts into one folder (executor.task.artifacts caches the folder)."""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hybridflow.executor.task import rules as task
from hybridflow.executor.task import warmup
from hybridflow.executor.task.settings import BuildSettings
from hybridflow.executor.task.tokens import (
    SPECIAL_TOKENS,
    SpecialIds,
    decode_prompt,
    decode_response,
)
from hybridflow.simulator.model import load_model

SPECIAL = SpecialIds(pad=0, bos=1, eos=2)


def train_tokenizer(texts: list[str], vocab_limit: int):
    """A BPE tokenizer over single characters and whole op words ("rev:", "sort:")."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Payload letters stay one token each; only the op words can merge.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[a-z]+:|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_limit, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i
    if tok.get_vocab_size() > vocab_limit:
        raise ValueError(f"tokenizer needs {tok.get_vocab_size()} ids, model has {vocab_limit}")
    return tok


def _save_tokenizer(tok, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    fast.save_pretrained(str(out))


def noisy_answers(examples: list[task.Example], s: BuildSettings) -> list[str]:
    """The SFT demonstrations: a share ``sft_noise`` of them have 1-3 random edits.

    The warmed-up policy then puts most of its mass on the right answer (greedy is good) but
    samples a wrong one often: room for RL to improve the sampled rule score.
    """
    rng = random.Random(s.seed + 20_000)
    return [
        task.corrupt(e.answer, rng.randint(1, 3), rng, s.task)
        if rng.random() < s.sft_noise
        else e.answer
        for e in examples
    ]


def _pearson(x: list[float], y: list[float]) -> float:
    t = torch.tensor([x, y], dtype=torch.float64)
    if t.std(dim=1).min() == 0:
        return 0.0
    return float(torch.corrcoef(t)[0, 1])


def _policy_samples(policy, prompts: list[list[int]], s: BuildSettings):
    """Two sampled responses per eval prompt (temperature 1), the distribution RL starts from."""
    out = []
    for k in range(2):
        out += warmup.generate(policy, prompts, s.max_response_len, SPECIAL, 1.0, s.seed + k)
    return prompts + prompts, out


def _pairs_to_ids(tok, pairs) -> list[tuple[list[int], list[int]]]:
    def ids(prompt: str, response: str) -> list[int]:
        return [SPECIAL.bos] + tok.encode(prompt + response).ids + [SPECIAL.eos]

    return [(ids(p, good), ids(p, bad)) for p, good, bad in pairs]


def _policy_pairs(policy, tok, examples, s: BuildSettings) -> list[tuple[list[int], list[int]]]:
    """Pairs of the SFT policy's own samples (2 per prompt), ordered by the rule score."""
    prompts = [[SPECIAL.bos] + tok.encode(e.prompt).ids for e in examples]
    a = warmup.generate(policy, prompts, s.max_response_len, SPECIAL, 1.0, s.seed + 30_000)
    b = warmup.generate(policy, prompts, s.max_response_len, SPECIAL, 1.0, s.seed + 30_001)
    pairs = []
    for e, p, ra, rb in zip(examples, prompts, a, b):
        sa = task.score(e.prompt, decode_response(tok, ra, SPECIAL))
        sb = task.score(e.prompt, decode_response(tok, rb, SPECIAL))
        if sa != sb:
            pairs.append((p + ra, p + rb) if sa > sb else (p + rb, p + ra))
    return pairs


def _train_scorer(policy, tok, examples, s: BuildSettings, by: str, seed: int):
    """A Bradley-Terry scalar model from the policy's backbone; held-out pair accuracy.

    The cost model (by="cost") also learns the sign: > 0 when the response holds the
    forbidden letter, so a Safe-RLHF threshold of 0 means "no forbidden letter".
    """
    text_pairs = task.preference_pairs(examples, seed, s.task, by=by)
    pairs = _pairs_to_ids(tok, text_pairs)
    signs = None
    if by == "score":
        pairs += _policy_pairs(policy, tok, examples[: s.n_train // 2], s)
    else:
        signs = [
            tuple(1.0 if task.cost(r, s.task) > 0 else -1.0 for r in (good, bad))
            for _, good, bad in text_pairs
        ]
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held_out = set(order[: max(1, len(pairs) // 10)])
    train = [i for i in order if i not in held_out]
    model = warmup.reward_from_policy(policy, seed)
    steps = s.rm_steps if by == "score" else s.cost_steps
    losses = warmup.train_bradley_terry(
        model,
        [pairs[i] for i in train],
        steps,
        s.rm_lr,
        s.batch // 2,
        seed,
        SPECIAL.pad,
        None if signs is None else [signs[i] for i in train],
    )
    test = [pairs[i] for i in sorted(held_out)]
    with torch.no_grad():
        good = warmup.scalar_scores(model, [a for a, _ in test], SPECIAL.pad)
        bad = warmup.scalar_scores(model, [b for _, b in test], SPECIAL.pad)
    acc = float((good > bad).float().mean())
    return model, {
        "pairs": len(pairs),
        "final_loss": sum(losses[-10:]) / 10 if losses else None,
        "held_out_pair_accuracy": acc,
    }


def _rule_correlations(policy, reward, cost, tok, evals, s: BuildSettings) -> dict:
    prompts = [[SPECIAL.bos] + tok.encode(e.prompt).ids for e in evals]
    ps, rs = _policy_samples(policy, prompts, s)
    texts = [
        (decode_prompt(tok, p, SPECIAL), decode_response(tok, r, SPECIAL)) for p, r in zip(ps, rs)
    ]
    seqs = [p + r for p, r in zip(ps, rs)]
    with torch.no_grad():
        rm = warmup.scalar_scores(reward, seqs, SPECIAL.pad).tolist()
        cm = warmup.scalar_scores(cost, seqs, SPECIAL.pad).tolist()
    scores = [task.score(p, r) for p, r in texts]
    costs = [task.cost(r, s.task) for _, r in texts]
    return {
        "samples": len(seqs),
        "sampled_score": sum(scores) / len(scores),
        "sampled_cost": sum(costs) / len(costs),
        "reward_vs_score_pearson": _pearson(rm, scores),
        "cost_model_vs_cost_pearson": _pearson(cm, costs),
        "cost_model_sign_accuracy": sum((c > 0) == (r > 0) for c, r in zip(cm, costs)) / len(costs),
    }


def _greedy_score(policy, tok, evals, s: BuildSettings) -> float:
    prompts = [[SPECIAL.bos] + tok.encode(e.prompt).ids for e in evals]
    rs = warmup.generate(policy, prompts, s.max_response_len, SPECIAL, 0.0, s.seed)
    texts = [decode_response(tok, r, SPECIAL) for r in rs]
    return sum(task.score(e.prompt, t) for e, t in zip(evals, texts)) / len(evals)


def build_all(s: BuildSettings, out: Path) -> None:
    """Tokenizer, SFT actor, reward and cost models, prompts and metrics, under ``out``.

    Runs on one thread (restored after): these matmuls are too small to gain from two, on a
    loaded 2-core machine two spinning threads cost up to 8x the CPU time, and the weights
    then do not depend on the caller's thread setting.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _build(s, out)
    finally:
        torch.set_num_threads(threads)


def _bar(s: BuildSettings) -> Any:
    """The build's progress on stderr, a step per model, saying what it builds."""
    from tqdm import tqdm

    print(
        f"building the built-in task's models for {s.model!r} (once; cached): "
        "tokenizer, SFT actor, reward and cost models",
        file=sys.stderr,
    )
    return tqdm(total=5, unit="step", bar_format="{desc}: {n}/{total} [{elapsed}]")


def _build(s: BuildSettings, out: Path) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bars in run logs
    t0 = time.time()
    bar = _bar(s)
    spec = load_model(s.model)
    train = task.make_examples(s.n_train, s.seed, s.task)
    evals = task.make_examples(s.n_eval, s.seed + 10_000, s.task)
    bar.set_description("built-in task: tokenizer")
    tok = train_tokenizer([e.prompt + e.answer for e in train], spec.vocab)
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    prompts = [[SPECIAL.bos] + tok.encode(e.prompt).ids for e in train]
    answers = [tok.encode(a).ids + [SPECIAL.eos] for a in noisy_answers(train, s)]

    bar.update()
    bar.set_description(f"built-in task: SFT actor ({s.sft_steps} steps)")
    policy = warmup.new_policy(spec, SPECIAL, s.seed)
    sft_losses = warmup.sft(
        policy, prompts, answers, s.sft_steps, s.sft_lr, s.batch, s.seed, SPECIAL.pad
    )
    bar.update()
    bar.set_description("built-in task: reward model")
    reward, rm_metrics = _train_scorer(policy, tok, train, s, "score", s.seed + 1)
    bar.update()
    bar.set_description("built-in task: cost model")
    cost, cm_metrics = _train_scorer(policy, tok, train, s, "cost", s.seed + 2)
    bar.update()
    bar.set_description("built-in task: held-out scores, saving")
    metrics = {
        "sft_final_loss": sft_losses[-1] if sft_losses else None,
        "greedy_score": _greedy_score(policy, tok, evals, s),
        **_rule_correlations(policy, reward, cost, tok, evals, s),
        "reward_model": rm_metrics,
        "cost_model": cm_metrics,
    }
    for name, model in (("actor", policy), ("reward", reward), ("cost", cost)):
        model.save_pretrained(str(out / name), safe_serialization=True)
        _save_tokenizer(tok, out / name)
    metrics["build_seconds"] = round(time.time() - t0, 1)
    bar.update()
    bar.close()
    (out / "prompts.json").write_text(
        json.dumps(
            {"train": prompts, "eval": [[SPECIAL.bos] + tok.encode(e.prompt).ids for e in evals]}
        )
    )
    (out / "meta.json").write_text(
        json.dumps(
            {
                "settings": s.to_dict(),
                "special": {"pad": SPECIAL.pad, "bos": SPECIAL.bos, "eos": SPECIAL.eos},
                "metrics": metrics,
            },
            indent=1,
        )
    )
