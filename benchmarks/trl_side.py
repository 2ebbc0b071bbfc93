"""The TRL side of benchmarks/trl_grpo.py: its tokenizer over the task's, the rule reward as
a TRL reward function, GRPOConfig for the workload, and one timed GRPOTrainer run. Run the
benchmark, not this file."""

from __future__ import annotations

import statistics
import tempfile
import time

from trl_workload import Workload, iteration_seconds, throughput

from hybridflow.executor.run.config import RunConfig


def trl_tokenizer(art):
    """The actor's tokenizer for TRL, which tokenizes prompt text itself: BOS + the text's
    tokens, the layout of every prompt in the artifacts (Artifacts.encode_prompt)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(art.actor_dir))
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", art.special.bos)]
    )
    return tok


class RuleReward:
    """TRL reward function: the task's rule score; records each generation batch's mean score
    and response tokens (TRL's completion ids run up to and including EOS)."""

    def __init__(self, art) -> None:
        self.art, self.batches = art, []
        self.__name__ = "rule_score"  # TRL names reward columns after the function

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        completion_ids: list[list[int]],
        **_: object,
    ) -> list[float]:
        from hybridflow.executor.task import rules as task

        scores = [task.score(p, self.art.decode(ids)) for p, ids in zip(prompts, completion_ids)]
        self.batches.append(
            {
                "score": statistics.mean(scores),
                "response_tokens": sum(len(ids) for ids in completion_ids),
            }
        )
        return scores


def trl_config(w: Workload, out_dir: str):
    """GRPOConfig for the workload: one generation batch of prompts x samples per iteration,
    `mini_batches` optimizer steps on it, hybridflow's micro-batch and optimizer settings."""
    from trl import GRPOConfig

    cfg = RunConfig()
    per_step = w.prompts * w.samples // w.mini_batches
    micro = cfg.micro_batch_size if per_step % cfg.micro_batch_size == 0 else per_step
    accum = per_step // micro
    return GRPOConfig(
        output_dir=out_dir,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        seed=w.seed,
        data_seed=w.seed,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        steps_per_generation=accum * w.mini_batches,
        num_iterations=1,
        max_steps=w.iterations * w.mini_batches,
        num_generations=w.samples,
        max_completion_length=w.response_len,
        shuffle_dataset=False,
        use_vllm=False,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=0,
        learning_rate=cfg.actor_lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=cfg.clip_grad,
        epsilon=0.2,
        beta=w.trl_beta,
        loss_type="bnpo",
        scale_rewards="group",
        log_completions=False,
    )


def run_trl(w: Workload, art, texts: list[str], tokens: int, threads: int, tokenizer=None) -> dict:
    """TRL's GRPOTrainer on the workload (its actor: the built-in task's, or the folder
    `w.model`) in this process; one table row."""
    import torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM, TrainerCallback
    from trl import GRPOTrainer

    class StepClock(TrainerCallback):
        t0, ends = 0.0, []

        def on_train_begin(self, *args, **kw):
            self.t0, self.ends = time.perf_counter(), []

        def on_step_end(self, *args, **kw):
            self.ends.append(time.perf_counter())

    torch.set_num_threads(threads)
    wall0 = time.perf_counter()
    torch.manual_seed(w.seed)
    folder = str(art.actor_dir) if w.model == "tiny" else w.model
    model = LlamaForCausalLM.from_pretrained(folder).float()
    reward, clock = RuleReward(art), StepClock()
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=trl_config(w, out_dir),
            train_dataset=Dataset.from_dict({"prompt": texts}),
            processing_class=tokenizer or trl_tokenizer(art),
            callbacks=[clock],
        )
        trainer.train()
    seconds = iteration_seconds(clock.t0, clock.ends, w.mini_batches)
    if len(seconds) != w.iterations or len(reward.batches) != w.iterations:
        raise RuntimeError(
            f"TRL ran {len(seconds)} iterations and {len(reward.batches)} "
            f"generation batches, expected {w.iterations}"
        )
    mean, tok_s = throughput(tokens, seconds)
    return {
        "system": "TRL GRPOTrainer",
        "iterations": len(seconds),
        "setup": f"1 process, {threads} torch thread{'s' if threads > 1 else ''}, "
        f"HF generate (no vLLM)",
        "seconds": mean,
        "tokens_per_s": tok_s,
        "response_tokens": statistics.mean(b["response_tokens"] for b in reward.batches[1:]),
        "score": statistics.mean(b["score"] for b in reward.batches[1:]),
        "stages": "–",
        "wall": time.perf_counter() - wall0,
        # model loading and the trainer's set-up (trl and torch imported before)
        "startup": clock.t0 - wall0,
        "per_iteration_s": [round(x, 3) for x in seconds],
    }
