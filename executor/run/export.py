"""The trained actor as a Hugging Face folder: written into every checkpoint (``actor_hf/``)
from the ranks' own shards, and copied to ``--export-hf DIR`` at the end of a run.

The folder is what the actor started from with the trained weights: its config.json (and
generation_config.json), the tokenizer's files and ``model.safetensors``, loadable by
transformers and vLLM with no conversion. Only the controller's CPU does the merge: the
data-parallel rank 0 of every (pipeline stage, tensor rank) gives its shard, tensor shards
are merged in megatron's layout and renamed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from hybridflow.errors import UserError
from hybridflow.executor.engines import weights as W
from hybridflow.executor.run.inputs import JobInputs
from hybridflow.plan import Plan
from hybridflow.vocab import Role

HF_DIR = "actor_hf"
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


class ExportError(UserError):
    """An export folder that cannot be written."""


def full_actor_state(folder: Path) -> dict[str, torch.Tensor]:
    """The actor's full megatron state (TP merged, every stage) from a checkpoint's rank
    files (each holds its rank's coordinates)."""
    by_tp: dict[int, dict[str, torch.Tensor]] = {}
    for f in sorted(folder.glob(f"{Role.ACTOR}.rank*.pt")):
        state = torch.load(f, weights_only=False, map_location="cpu")
        coords = state["coords"]
        if coords["dp_rank"] == 0:
            by_tp.setdefault(coords["tp_rank"], {}).update(state["params"])
    if not by_tp:
        raise ExportError(f"{folder} holds no actor shards")
    shards = [by_tp[r] for r in sorted(by_tp)]
    return W.merge_tp(shards)


def write_actor_hf(folder: Path, plan: Plan, inputs: JobInputs) -> Path:
    """`folder`/actor_hf from the checkpoint `folder`'s actor shards."""
    from safetensors.torch import save_file

    from hybridflow.simulator.model import load_model

    spec = load_model(plan.job.model(Role.ACTOR))
    full = full_actor_state(folder)
    if spec.tied_embeddings:
        full.pop(W.OUTPUT, None)  # the last stage's copy of the embedding
    hf = W.megatron_to_hf(full, spec)
    out = folder / HF_DIR
    out.mkdir()
    save_file({k: v.detach().contiguous() for k, v in hf.items()}, str(out / "model.safetensors"))
    for src, names in ((inputs.rollout_dir, CONFIG_FILES), (inputs.tokenizer_dir, TOKENIZER_FILES)):
        for name in names:
            if (Path(src) / name).is_file():
                shutil.copy2(Path(src) / name, out / name)
    return out


def check_export_dir(path: str | None) -> None:
    """Refused before the run starts: an export folder that exists and is not empty, or
    whose parent cannot be written."""
    if path is None:
        return
    p = Path(path)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise ExportError(f"--export-hf {path}: exists and is not an empty folder")
    parent = p.parent if p.parent != Path("") else Path(".")
    if parent.exists() and not parent.is_dir():
        raise ExportError(f"--export-hf {path}: {parent} is not a folder")


def export_actor(checkpoint: Path | None, path: str) -> Path:
    """Copy the newest checkpoint's actor folder to `path`."""
    if checkpoint is None or not (checkpoint / HF_DIR).is_dir():
        raise ExportError("no checkpoint with an exported actor to copy")
    dest = Path(path)
    if dest.exists():
        dest.rmdir()  # empty: check_export_dir
    shutil.copytree(checkpoint / HF_DIR, dest)
    return dest
