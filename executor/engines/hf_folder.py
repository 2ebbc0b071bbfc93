"""A user's Hugging Face checkpoint folder: checked on the controller before any worker
starts (:func:`check_folder`), then read by every rank for its own parameters only
(:func:`load_rank_weights`: its pipeline stage's tensors, and of the tensor-parallel ones
only its rows or columns, through safetensors slices; one file or a sharded index alike).

The executor builds Llama, Mistral, Qwen2 and Qwen3 decoders (causal LMs, and their
sequence classifiers as value heads) and Qwen3-MoE causal LMs; :data:`BUILDABLE` names them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hybridflow.errors import UserError
from hybridflow.executor.engines import moe_weights as MW
from hybridflow.executor.engines import weights as W
from hybridflow.executor.engines.hf_checkpoint import INDEX, LLAMA3_FIXED, SINGLE, hf_shapes
from hybridflow.simulator.architecture import ModelSpec
from hybridflow.simulator.hf_config import llama3_rope

FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3")
MOE_BUILDABLE = ("Qwen3MoeForCausalLM",)
_HEADS = ("CausalLM", "SequenceClassification")
BUILDABLE = (*(f"{f}For{k}" for k in _HEADS for f in FAMILIES), *MOE_BUILDABLE)
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some old exports saved with the weights


class CheckpointError(UserError):
    """A checkpoint folder the executor cannot start a role from."""


@dataclass(frozen=True)
class FolderInfo:
    """What check_folder found: the architecture, the spec its config gives, and where
    each tensor lies (shard file) with its shape."""

    path: Path
    architecture: str
    classifier: bool  # a *ForSequenceClassification (score.weight, no lm_head)
    spec: ModelSpec
    files: dict[str, str]  # tensor name -> file name in the folder
    shapes: dict[str, tuple[int, ...]]


# ---- checks ---------------------------------------------------------------------------
def check_folder(path: str | Path, value_head: bool, critic: bool = False) -> FolderInfo:
    """Refuse (CheckpointError, one message) a folder a role cannot start from: missing,
    no config.json, no safetensors weights, an architecture or config feature the executor
    cannot build, a head that does not fit the role (`value_head`: score.weight needed, but
    a `critic` may start from a causal LM, its value head then fresh), weights whose names or
    shapes (read from the headers only) are not the ones the config implies."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {str(folder)!r} does not exist")
    cfg = _read_config(folder)
    arch = _architecture(cfg, folder)
    _check_features(cfg, arch, folder)
    spec = _spec(cfg, folder)
    _check_moe(cfg, spec, arch, folder)
    classifier = arch.endswith("ForSequenceClassification")
    _check_role(arch, classifier, value_head, critic, folder)
    files = tensor_files(folder)
    shapes = _header_shapes(folder, files)
    _check_tensors(shapes, expected_shapes(spec, classifier), spec, folder)
    return FolderInfo(folder, arch, classifier, spec, files, shapes)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"model folder {str(folder)!r} has no config.json")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{str(path)!r} cannot be read: {e.strerror}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{str(path)!r} is not a JSON object")
    return cfg


def _architecture(cfg: dict[str, Any], folder: Path) -> str:
    archs = cfg.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch in BUILDABLE:
        return arch
    moe = f"; of mixture-of-experts models it builds {', '.join(MOE_BUILDABLE)} only"
    raise CheckpointError(
        f"model folder {str(folder)!r}: architecture {arch or 'unnamed'!r} cannot be built by "
        f"the executor (it builds {', '.join(BUILDABLE)}){moe if _is_moe(cfg, arch) else ''}"
    )


def _is_moe(cfg: dict[str, Any], arch: str | None) -> bool:
    experts = ("num_experts", "num_local_experts", "n_routed_experts")
    return any(cfg.get(k) for k in experts) or "moe" in (arch or "").lower()


def _check_features(cfg: dict[str, Any], arch: str, folder: Path) -> None:
    """Config features the builder has no form of, each named."""
    where = f"model folder {str(folder)!r} ({arch})"
    family = next((f for f in FAMILIES if arch.startswith(f + "For")), arch.split("For")[0])
    _check_rope(cfg, where)
    window = _sliding_window(cfg, family)
    if window:
        raise CheckpointError(f"{where}: sliding-window attention ({window}) cannot be built")
    if _is_moe(cfg, arch) and arch not in MOE_BUILDABLE:
        raise CheckpointError(f"{where}: mixture-of-experts layers cannot be built")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: activation {cfg['hidden_act']!r} (SwiGLU/silu only)")
    if cfg.get("mlp_bias"):
        raise CheckpointError(f"{where}: MLP biases (mlp_bias) cannot be built")
    if family != "Qwen2" and cfg.get("attention_bias"):
        raise CheckpointError(
            f"{where}: attention biases (attention_bias, o_proj included) cannot be built"
        )
    if cfg.get("quantization_config"):
        raise CheckpointError(f"{where}: quantized weights cannot be built")
    hidden, heads, head_dim = (
        cfg.get(k) for k in ("hidden_size", "num_attention_heads", "head_dim")
    )
    if family == "Qwen2" and head_dim and heads and head_dim * heads != hidden:
        raise CheckpointError(
            f"{where}: head_dim {head_dim} is not hidden_size / num_attention_heads "
            f"({hidden} / {heads}), which vLLM's Qwen2 assumes"
        )


def _check_moe(cfg: dict[str, Any], spec: ModelSpec, arch: str, folder: Path) -> None:
    """Qwen3-MoE as built: every layer's experts (no mlp_only_layers), top-k renormalised."""
    if arch not in MOE_BUILDABLE:
        return
    reason = MW.unbuildable_reason(spec)
    if reason:
        raise CheckpointError(f"model folder {str(folder)!r} ({arch}): {reason}")
    if not cfg.get("norm_topk_prob"):
        raise CheckpointError(
            f"model folder {str(folder)!r} ({arch}): norm_topk_prob false (top-k routing "
            "weights not renormalised) cannot be built; the executor builds norm_topk_prob true"
        )


def _check_rope(cfg: dict[str, Any], where: str) -> None:
    rope = _rope_type(cfg)
    if rope == "llama3":
        params = llama3_rope(cfg, where)
        other = {k: params.get(k) for k, v in LLAMA3_FIXED.items() if params.get(k) != v}
        if other:
            raise CheckpointError(
                f"{where}: llama3 rope scaling with {other} cannot be built (megatron-core "
                f"fixes {LLAMA3_FIXED})"
            )
    elif rope != "default":
        raise CheckpointError(
            f"{where}: rope scaling {rope!r} cannot be built (plain RoPE and llama3 only)"
        )


def _rope_type(cfg: dict[str, Any]) -> str:
    for key in ("rope_scaling", "rope_parameters"):
        value = cfg.get(key)
        if isinstance(value, dict):
            kind = value.get("rope_type") or value.get("type") or "default"
            if kind != "default":
                return str(kind)
    return "default"


def _sliding_window(cfg: dict[str, Any], family: str) -> str | None:
    """A description of the sliding windows in use, None if every layer attends fully."""
    window, longest = cfg.get("sliding_window"), cfg.get("max_position_embeddings")
    if not window or (isinstance(longest, int) and window >= longest):
        return None
    if family == "Mistral":
        return f"window {window} < max_position_embeddings {longest}"
    types = cfg.get("layer_types") or []
    sliding = sum(t == "sliding_attention" for t in types)
    if sliding or (cfg.get("use_sliding_window") and not types):
        return f"window {window}, use_sliding_window on"
    return None


def _spec(cfg: dict[str, Any], folder: Path) -> ModelSpec:
    from hybridflow.simulator.hf_config import spec_from_hf_dict

    name = cfg.get("_name_or_path") or folder.name
    try:
        return spec_from_hf_dict(cfg, str(name), str(folder / "config.json"))
    except UserError as e:
        raise CheckpointError(str(e)) from None


def _check_role(arch: str, classifier: bool, value_head: bool, critic: bool, folder: Path) -> None:
    where = f"model folder {str(folder)!r} ({arch})"
    if value_head and not classifier and not critic:
        raise CheckpointError(
            f"{where}: a value-head role (reward or cost model) needs a "
            "*ForSequenceClassification checkpoint with score.weight"
        )
    if classifier and not value_head:
        raise CheckpointError(
            f"{where}: a sequence classifier cannot be a causal-LM role (actor or reference); "
            "give a *ForCausalLM checkpoint"
        )


def tensor_files(folder: str | Path) -> dict[str, str]:
    """Tensor name -> the safetensors file holding it (the index's weight_map, or the
    single file's names); CheckpointError when there are no safetensors weights."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{str(folder / INDEX)!r} has no valid weight_map: {e}") from None
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise CheckpointError(
                f"model folder {str(folder)!r}: {INDEX} names shard {missing[0]!r}, not there"
            )
        return dict(weight_map)
    if (folder / SINGLE).is_file():
        with _opened(folder / SINGLE) as f:
            return dict.fromkeys(f.keys(), SINGLE)
    others = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
    found = f" (found {others[0]}: safetensors only)" if others else " (safetensors only)"
    raise CheckpointError(
        f"model folder {str(folder)!r} has no weights: neither {SINGLE} nor {INDEX}{found}"
    )


def _opened(path: Path) -> Any:
    """A safetensors handle (a context manager; only the header is read here)."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (OSError, RuntimeError, ValueError) as e:  # SafetensorError is a ValueError
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {e}") from None


def _header_shapes(folder: Path, files: dict[str, str]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(files.values())):
        with _opened(folder / file) as f:
            held = set(f.keys())
            for name in (n for n, fl in files.items() if fl == file):
                if name not in held:
                    raise CheckpointError(f"{str(folder / file)!r} lacks tensor {name!r}")
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def expected_shapes(spec: ModelSpec, classifier: bool) -> dict[str, tuple[int, ...]]:
    """The Hugging Face tensors the config implies: a causal LM's, or a classifier's (no
    lm_head; a one-label score head)."""
    out = hf_shapes(spec)
    if classifier:
        out.pop("lm_head.weight", None)
        out["score.weight"] = (1, spec.hidden)
    return out


def _check_tensors(
    found: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    spec: ModelSpec,
    folder: Path,
) -> None:
    where = f"model folder {str(folder)!r}"
    for name, shape in expected.items():
        if name not in found:
            raise CheckpointError(
                f"{where}: weights lack {name!r} (shape {list(shape)} by its config.json)"
            )
        if found[name] != shape:
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {list(found[name])}, its config.json "
                f"implies {list(shape)}"
            )
    optional = {"lm_head.weight": (spec.vocab, spec.hidden)} if spec.tied_embeddings else {}
    for name, shape in found.items():
        if name in expected or name.endswith(_IGNORED):
            continue
        if name in optional and shape == optional[name]:
            continue
        raise CheckpointError(
            f"{where}: tensor {name!r} (shape {list(shape)}) is not a weight its config.json "
            "implies"
        )


# ---- one rank's read --------------------------------------------------------------------
class _Reader:
    """Slices of a folder's tensors, each file opened once."""

    def __init__(self, folder: Path, files: dict[str, str], stack: contextlib.ExitStack):
        self.folder, self.files, self.stack = folder, files, stack
        self.handles: dict[str, Any] = {}

    def has(self, name: str) -> bool:
        return name in self.files

    def slice(self, name: str) -> Any:
        file = self.files.get(name)
        if file is None:
            raise CheckpointError(f"model folder {str(self.folder)!r} has no tensor {name!r}")
        if file not in self.handles:
            self.handles[file] = self.stack.enter_context(_opened(self.folder / file))
        return self.handles[file].get_slice(name)

    def rows(self, name: str, tp: int, rank: int) -> torch.Tensor:
        """Rank `rank`'s block of `tp` equal row blocks (1-D tensors: elements)."""
        sl = self.slice(name)
        n = sl.get_shape()[0] // tp
        return sl[rank * n : (rank + 1) * n]

    def cols(self, name: str, tp: int, rank: int) -> torch.Tensor:
        sl = self.slice(name)
        n = sl.get_shape()[1] // tp
        return sl[:, rank * n : (rank + 1) * n]

    def full(self, name: str) -> torch.Tensor:
        return self.slice(name)[:]


def _read_top(
    r: _Reader, name: str, spec: ModelSpec, tp: int, rank: int, value_head: bool
) -> torch.Tensor | None:
    if name == W.EMBED:
        return r.rows("model.embed_tokens.weight", tp, rank)
    if name == W.FINAL_NORM:
        return r.full("model.norm.weight")
    if value_head:  # the score head, replicated; absent: a critic's fresh head
        return r.full("score.weight").reshape(1, spec.hidden) if r.has("score.weight") else None
    src = "model.embed_tokens.weight" if spec.tied_embeddings else "lm_head.weight"
    return r.rows(src, tp, rank)


def _read_layer(r: _Reader, name: str, spec: ModelSpec, tp: int, rank: int) -> torch.Tensor:
    layer, local = W.layer_of(name)
    pre = f"model.layers.{layer}."
    if local.startswith("self_attention.linear_qkv."):
        kind = local.rsplit(".", 1)[1]
        q, k, v = (r.rows(pre + f"self_attn.{p}_proj.{kind}", tp, rank) for p in "qkv")
        return W.hf_to_qkv(q, k, v, spec)  # whole KV groups: q, k, v rows are blocks
    if W.split_kind(name) == "fc1":  # the dense MLP's or an expert's: gate rows, up rows
        return torch.cat([r.rows(pre + p, tp, rank) for p in W.fc1_parts(local)])
    hf = W.hf_layer_name(local)
    return r.cols(pre + hf, tp, rank) if W.split_kind(name) == "row" else r.full(pre + hf)


def read_rank_shards(
    path: str | Path,
    spec: ModelSpec,
    names: Iterable[str],
    tp: int,
    tp_rank: int,
    value_head: bool,
) -> W.StateDict:
    """The TP-rank `tp_rank` (of `tp`) shards of the megatron parameters `names` (global
    layer numbers: this rank's stage) from a Hugging Face folder, reading only those rows
    or columns. A tied model's output layer is the embedding's rows; a value head is the
    classifier's score row (left out when the folder has none: a critic's fresh head)."""
    folder = Path(path)
    out: W.StateDict = {}
    with contextlib.ExitStack() as stack:
        r = _Reader(folder, tensor_files(folder), stack)
        for name in names:
            if name in (W.EMBED, W.OUTPUT, W.FINAL_NORM):
                t = _read_top(r, name, spec, tp, tp_rank, value_head)
            else:
                t = _read_layer(r, name, spec, tp, tp_rank)
            if t is not None:
                out[name] = t
    return out


def load_rank_weights(
    chunks: list[torch.nn.Module],
    path: str | Path,
    spec: ModelSpec,
    value_head: bool,
    tp_rank: int,
    tp: int,
) -> None:
    """Fill this rank's model chunks from a Hugging Face folder, reading only their
    tensors (and TP slices)."""
    from hybridflow.executor.engines import megatron_model as mm

    names = [n for n, _ in mm.named_local_parameters(chunks)]
    shards = read_rank_shards(path, spec, names, tp, tp_rank, value_head)
    mm.load_local_state(chunks, shards, keep=(W.OUTPUT,) if value_head else ())
