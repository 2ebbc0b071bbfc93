"""Prompt files: JSONL and Parquet rows, dotted keys, chat templates, overlong prompts, and
one clear error per bad file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from hybridflow.executor.data import prompts as P
from tests.executor import user_models as U

ROWS = [
    {"data_source": "sums", "prompt": [{"role": "user", "content": "what is 1 + 2 ?"}],
     "reward_model": {"ground_truth": "3"}, "extra_info": {"row": 0}},
    {"data_source": "sums", "prompt": [{"role": "user", "content": "what is 2 + 2 ?"}],
     "reward_model": {"ground_truth": "4"}, "extra_info": {"row": 1}},
]  # fmt: skip


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    U.save_tokenizer(root / "chat")
    U.save_tokenizer(root / "plain", chat_template=False)
    return {"chat": root / "chat", "plain": root / "plain"}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_and_parquet_give_the_same_records(tmp_path: Path) -> None:
    a = P.load_records(_jsonl(tmp_path / "d.jsonl", ROWS), answer_key="reward_model.ground_truth")
    pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
    b = P.load_records(tmp_path / "d.parquet", answer_key="reward_model.ground_truth")
    assert a == b
    assert a[1].answer == "4" and a[0].data_source == "sums" and a[1].extra_info == {"row": 1}
    assert a[0].prompt == ({"role": "user", "content": "what is 1 + 2 ?"},)


def test_plain_string_prompts_take_the_files_name_as_source(tmp_path: Path) -> None:
    recs = P.load_records(_jsonl(tmp_path / "easy.jsonl", [{"q": "what is 1 ?", "a": 1}]), "q", "a")
    assert recs == [P.Record(0, "what is 1 ?", "1", "easy")]


def test_chat_template_is_applied_when_the_tokenizer_has_one(tok_dirs, tmp_path: Path) -> None:
    recs = P.load_records(_jsonl(tmp_path / "d.jsonl", ROWS))
    chat = P.tokenize_prompts(recs, tok_dirs["chat"], 32)
    tok = P.load_tokenizer(str(tok_dirs["chat"]))
    want = tok.apply_chat_template(list(recs[0].prompt), add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert list(chat.items[0][0]) == list(want)
    plain = P.tokenize_prompts(recs, tok_dirs["chat"], 32, chat_template=False)
    assert plain.items[0][0] != chat.items[0][0]
    assert list(plain.items[0][0]) == tok("what is 1 + 2 ?")["input_ids"]
    no_template = P.tokenize_prompts(recs, tok_dirs["plain"], 32)
    assert no_template.items[0][0] == plain.items[0][0]


def test_overlong_prompts_are_refused_or_cut_from_the_left(tok_dirs, tmp_path: Path) -> None:
    rows = [{"prompt": "a b c d e f g h"}, {"prompt": "a b"}, {"prompt": "a b c d e f"}]
    recs = P.load_records(_jsonl(tmp_path / "d.jsonl", rows))
    with pytest.raises(P.DataError, match=re.escape("2 of 3 prompts are longer than")) as e:
        P.tokenize_prompts(recs, tok_dirs["plain"], 5)
    assert "row 0 (9 tokens)" in str(e.value) and "--truncate-prompts" in str(e.value)
    cut = P.tokenize_prompts(recs, tok_dirs["plain"], 5, overlong="truncate")
    assert cut.truncated == 2 and cut.count == 3
    full = P.tokenize_prompts(recs, tok_dirs["plain"], 16)
    assert cut.items[0][0] == full.items[0][0][-5:] and cut.items[1][0] == full.items[1][0]


@pytest.mark.parametrize(
    "content,args,message",
    [
        (None, {}, "does not exist"),
        ("", {}, "is empty: no rows"),
        ('{"prompt": "x"}\nnot json\n', {}, "line 2: not JSON"),
        ('{"question": "x"}\n', {}, "row 0 has no prompt key 'prompt' (its keys: question)"),
        ('{"prompt": "x"}\n', {"answer_key": "answer"}, "row 0 has no answer key 'answer'"),
        ('{"prompt": 3}\n', {}, "must be a string or a list of chat messages"),
        ("[1, 2]\n", {}, "a row must be a JSON object"),
    ],
)
def test_bad_files_are_named(tmp_path: Path, content: str | None, args: dict, message: str) -> None:
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(P.DataError, match=re.escape(message)):
        P.load_records(path, **args)


def test_unknown_suffix_and_bad_parquet_are_named(tmp_path: Path) -> None:
    with pytest.raises(P.DataError, match="expected one of .jsonl, .json, .parquet"):
        P.load_records(tmp_path / "d.csv")
    (tmp_path / "d.parquet").write_text("not parquet")
    with pytest.raises(P.DataError, match="not a readable Parquet file"):
        P.load_records(tmp_path / "d.parquet")
    with pytest.raises(P.DataError, match="no tokenizer files"):
        P.load_tokenizer(str(tmp_path))
