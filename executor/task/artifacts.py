"""Build and cache the task artifacts RL starts from: tokenizer, SFT actor, reward and cost models.

``ensure_artifacts(model, seed)`` returns them at once when the cache holds them, else builds
them (``tiny``: about 2.5 CPU-minutes on one thread, executor.task.build) into a temporary folder
and renames it into place, so concurrent callers never see a half-written cache entry.
The actor is SFT'd on demonstrations half of which are wrong (it knows the format, samples
the right answer about half the time); the reward model's score correlates with the rule
score on the actor's samples (Pearson in ``metrics``); the cost model is > 0 exactly when a
response holds the forbidden letter. Each model is a Hugging
Face folder (config.json, model.safetensors, tokenizer.json): the format vLLM loads and the
executor converts to megatron shards. Nothing is downloaded.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer

from hybridflow.executor.task import build
from hybridflow.executor.task import rules as task
from hybridflow.executor.task.settings import ArtifactError, BuildSettings
from hybridflow.executor.task.tokens import SpecialIds, decode_prompt, decode_response
from hybridflow.simulator.model import load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptSet:
    train: tuple[tuple[int, ...], ...]
    eval: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if not self.train or not self.eval:
            raise ArtifactError("prompt set needs train and eval prompts")


@dataclass(frozen=True)
class Artifacts:
    root: Path
    tokenizer_path: Path
    actor_dir: Path
    reward_dir: Path
    cost_dir: Path
    prompts: PromptSet
    special: SpecialIds
    max_response_len: int
    task: task.TaskConfig
    metrics: dict

    @cached_property
    def _tokenizer(self):
        return Tokenizer.from_file(str(self.tokenizer_path))

    def encode_prompt(self, text: str) -> list[int]:
        """BOS + the prompt's tokens (the layout of every prompt in ``prompts``)."""
        task.parse_prompt(text)
        return [self.special.bos] + self._tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        """Text of response ids up to the first EOS (see ``decode_response``)."""
        return decode_response(self._tokenizer, ids, self.special)

    def decode_prompt(self, ids) -> str:
        return decode_prompt(self._tokenizer, ids, self.special)

    def score(self, prompt_ids, response_ids) -> float:
        """The rule score in [0, 1] of a response (token ids) to a prompt (token ids)."""
        return task.score(self.decode_prompt(prompt_ids), self.decode(response_ids))

    def cost(self, prompt_ids, response_ids) -> float:
        """The rule cost in [0, 1] (share of forbidden letters) of a response."""
        return task.cost(self.decode(response_ids), self.task)


def prompt_records(art: Artifacts, split: str) -> list:
    """The task's prompts of `split` ("train", "eval") as data-file records, read from the
    artifacts' JSONL file (written from prompts.json the first time) by the loader a user's
    data goes through; the prompt text with its answer."""
    from hybridflow.executor.data.prompts import load_records

    path = art.root / f"{split}.jsonl"
    if not path.exists():
        pool = art.prompts.train if split == "train" else art.prompts.eval
        texts = [art.decode_prompt(p) for p in pool]
        rows = [json.dumps({"prompt": t, "answer": task.target(t)}) for t in texts]
        _write_atomically(path, "\n".join(rows) + "\n")
    ensure_tokenizer_folder(art)
    return load_records(path, "prompt", "answer")


def ensure_tokenizer_folder(art: Artifacts) -> Path:
    """The task tokenizer as a Hugging Face tokenizer folder (what exports carry)."""
    folder = art.root / "tokenizer"
    if not (folder / "tokenizer_config.json").exists():
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(
            tokenizer_file=str(art.tokenizer_path),
            pad_token="<pad>",
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
        )
        tmp = folder.with_name(f"tokenizer.tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    return folder


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def default_cache_dir() -> Path:
    """$HYBRIDFLOW_CACHE, else the user's cache folder ($XDG_CACHE_HOME or ~/.cache)."""
    if os.environ.get("HYBRIDFLOW_CACHE"):
        return Path(os.environ["HYBRIDFLOW_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hybridflow"


def ensure_artifacts(
    model: str = "tiny",
    seed: int = 0,
    cache_dir: str | Path | None = None,
    settings: BuildSettings | None = None,
) -> Artifacts:
    """The cached artifacts of (model, seed), built first if the cache lacks them.

    ``settings`` (tests, experiments) replaces the defaults, model and seed included.
    """
    if settings is None:
        settings = BuildSettings(model=model, seed=seed)
    spec = load_model(settings.model)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", spec.name)  # a HF name may hold "/"
    root = cache / f"{name}-seed{settings.seed}-{settings.key()}"
    if not (root / "meta.json").exists():
        log.info(
            "building the task artifacts into %s (tokenizer, SFT actor, reward and cost "
            "models: a few CPU-minutes, once)",
            root,
        )
        _build_atomically(settings, root)
    return load_artifacts(root)


def _build_atomically(settings: BuildSettings, root: Path) -> None:
    """Build into a temporary folder and rename it into place; a lock file makes concurrent
    callers (several workers starting on a cold cache) wait for one build."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "meta.json").exists():  # built while we waited
            return
        tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build.build_all(settings, tmp)
            shutil.rmtree(root, ignore_errors=True)  # a damaged entry without meta.json
            os.rename(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def load_artifacts(root: str | Path) -> Artifacts:
    """Artifacts from a built folder (as ``ensure_artifacts`` leaves it)."""
    root = Path(root)
    try:
        meta = json.loads((root / "meta.json").read_text())
        prompts = json.loads((root / "prompts.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise ArtifactError(
            f"artifact folder {str(root)!r} is incomplete or damaged: {e}"
        ) from None
    s = meta["settings"]
    cfg = task.TaskConfig(**{**s["task"], "ops": tuple(s["task"]["ops"])})
    return Artifacts(
        root=root,
        tokenizer_path=root / "tokenizer.json",
        actor_dir=root / "actor",
        reward_dir=root / "reward",
        cost_dir=root / "cost",
        prompts=PromptSet(
            train=tuple(map(tuple, prompts["train"])), eval=tuple(map(tuple, prompts["eval"]))
        ),
        special=SpecialIds(**meta["special"]),
        max_response_len=s["max_response_len"],
        task=cfg,
        metrics=meta["metrics"],
    )
