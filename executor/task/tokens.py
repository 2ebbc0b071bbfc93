"""The task's special tokens and how token ids read back as text (the rules score text)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3, in this order


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    bos: int
    eos: int

    def __post_init__(self) -> None:
        if len({self.pad, self.bos, self.eos}) != 3 or min(self.pad, self.bos, self.eos) < 0:
            raise ValueError(f"special token ids must be distinct and >= 0, got {self}")


def decode_response(tok: Any, ids: Iterable[int], special: SpecialIds) -> str:
    """Text of response ids up to the first EOS. An id that is not a literal token of the
    tokenizer (pad, BOS, unk, or one of the model's unused vocabulary rows) reads as "?", so
    it costs the rule score a position instead of vanishing."""
    ids = [int(i) for i in ids]
    if special.eos in ids:
        ids = ids[: ids.index(special.eos)]
    pieces = (tok.id_to_token(i) for i in ids)
    return "".join("?" if t is None or t in SPECIAL_TOKENS else t for t in pieces)


def decode_prompt(tok: Any, ids: Iterable[int], special: SpecialIds) -> str:
    """Text of prompt ids (left padding and BOS dropped)."""
    ids = [int(i) for i in ids]
    while ids and ids[0] in (special.pad, special.bos):
        ids = ids[1:]
    return decode_response(tok, ids, special)
