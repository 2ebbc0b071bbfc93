"""Prompts from a data file, as verl, OpenRLHF and TRL users keep them.

JSONL or Parquet rows; the prompt a string or a list of chat messages (``{"role", "content"}``),
the ground truth anywhere in the row (dotted keys reach into nested fields: verl's
``reward_model.ground_truth``), ``data_source`` and ``extra_info`` passed on to the reward
function. Tokenized by the actor's tokenizer with its chat template when it has one; prompts
longer than the plan's prompt length are refused, or cut from the left (the end of the
prompt, where the generation starts, kept) and counted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from hybridflow.errors import UserError

SUFFIXES = (".jsonl", ".json", ".parquet")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
Messages = tuple[dict[str, str], ...]


class DataError(UserError):
    """A data file, or a row of it, that cannot be used."""


@dataclass(frozen=True)
class Record:
    index: int  # the row's number in its file (from 0)
    prompt: str | Messages
    answer: str | None = None
    data_source: str = ""
    extra_info: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class PromptSet:
    items: tuple[tuple[tuple[int, ...], Record], ...]  # (token ids, the row)
    truncated: int = 0  # prompts cut to the prompt length

    @property
    def count(self) -> int:
        return len(self.items)


# ---- rows --------------------------------------------------------------------------------
def read_rows(path: str | Path) -> list[dict]:
    """The rows of a JSONL or Parquet file, as dicts."""
    p = Path(path)
    if p.suffix not in SUFFIXES:
        raise DataError(f"data file {str(p)!r}: expected one of {', '.join(SUFFIXES)}")
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} does not exist")
    rows = _parquet_rows(p) if p.suffix == ".parquet" else _jsonl_rows(p)
    if not rows:
        raise DataError(f"data file {str(p)!r} is empty: no rows")
    return rows


def _jsonl_rows(p: Path) -> list[dict]:
    rows = []
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"data file {str(p)!r} cannot be read ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"data file {str(p)!r}, line {n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"data file {str(p)!r}, line {n}: a row must be a JSON object")
        rows.append(row)
    return rows


def _parquet_rows(p: Path) -> list[dict]:
    import pandas as pd

    try:
        frame = pd.read_parquet(p)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds; one line out
        raise DataError(f"data file {str(p)!r}: not a readable Parquet file ({e})") from None
    return [_plain(r) for r in frame.to_dict(orient="records")]


def _plain(v: Any) -> Any:
    """numpy arrays and scalars of a Parquet row as lists and Python values."""
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        v = v.tolist()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _get(row: dict, key: str) -> Any:
    v: Any = row
    for part in key.split("."):
        if not isinstance(v, dict) or part not in v:
            raise KeyError(key)
        v = v[part]
    return v


def _prompt(v: Any, where: str) -> str | Messages:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and all(_is_message(m) for m in v):
        return tuple({"role": m["role"], "content": m["content"]} for m in v)
    raise DataError(f"{where}: the prompt must be a string or a list of chat messages")


def _is_message(m: Any) -> bool:
    return (
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
    )


def _answer(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def load_records(
    path: str | Path, prompt_key: str = "prompt", answer_key: str | None = None
) -> list[Record]:
    """The file's rows as records; every row must hold the prompt (and the answer, if a key
    is given)."""
    rows = read_rows(path)
    source = Path(path).stem
    out = []
    for i, row in enumerate(rows):
        where = f"data file {str(path)!r}, row {i}"
        try:
            prompt = _prompt(_get(row, prompt_key), where)
        except KeyError:
            raise DataError(
                f"{where} has no prompt key {prompt_key!r} (its keys: {', '.join(map(str, row))}); "
                f"name it with --prompt-key"
            ) from None
        answer = None
        if answer_key:
            try:
                answer = _answer(_get(row, answer_key))
            except KeyError:
                raise DataError(f"{where} has no answer key {answer_key!r}") from None
        extra = row.get("extra_info")
        out.append(
            Record(
                index=i,
                prompt=prompt,
                answer=answer,
                data_source=str(row.get("data_source") or source),
                extra_info=extra if isinstance(extra, dict) else {},
            )
        )
    return out


# ---- tokens ------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def load_tokenizer(folder: str) -> Any:
    """The tokenizer of a checkpoint folder (local files only), or one clear DataError."""
    from transformers import AutoTokenizer

    if not any((Path(folder) / f).exists() for f in TOKENIZER_FILES):
        raise DataError(
            f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}): the actor's "
            f"folder must hold its tokenizer"
        )
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; one line out
        raise DataError(
            f"{folder}: its tokenizer does not load ({type(e).__name__}: {e})"
        ) from None


def _encode(tok: Any, prompt: str | Messages, chat_template: bool) -> list[int]:
    if chat_template and getattr(tok, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    return [int(i) for i in tok(text, add_special_tokens=True)["input_ids"]]


def tokenize_prompts(
    records: list[Record],
    tokenizer_dir: str | Path,
    max_prompt_len: int,
    chat_template: bool = True,
    overlong: str = "refuse",
) -> PromptSet:
    """Each record's prompt as token ids of at most `max_prompt_len` (overlong "refuse":
    one longer is an error naming it; "truncate": its last max_prompt_len tokens)."""
    tok = load_tokenizer(str(tokenizer_dir))
    encoded = [_encode(tok, r.prompt, chat_template) for r in records]
    long = [(r, len(ids)) for r, ids in zip(records, encoded) if len(ids) > max_prompt_len]
    if long and overlong == "refuse":
        r, n = long[0]
        raise DataError(
            f"{len(long)} of {len(records)} prompts are longer than the plan's prompt_len "
            f"{max_prompt_len}, the first row {r.index} ({n} tokens): plan a longer "
            f"--prompt-len, or run with --truncate-prompts"
        )
    items = tuple((tuple(ids[-max_prompt_len:]), r) for ids, r in zip(encoded, records))
    return PromptSet(items, truncated=len(long))


def pad_id(tokenizer_dir: str | Path) -> int:
    """The tokenizer's pad id (its EOS when it has none; prompts are masked anyway)."""
    tok = load_tokenizer(str(tokenizer_dir))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return int(pad or 0)


def decode(tok: Any, ids: list[int]) -> str:
    """A response's text, special tokens (EOS, pad) left out."""
    return str(tok.decode(ids, skip_special_tokens=True))
