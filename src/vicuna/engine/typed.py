"""Special-token text typed in a message stays text.

A message may hold a special token's text: a user types `</s>` or `<|im_end|>`, an HTML snippet holds
`<s>`. Tokenized with the rendered prompt, it would become the token and end a turn or open one (a
forged system or assistant turn). Before rendering, each such text in the messages is swapped for a
private-use character (`mask`); after rendering it is put back, and where it lies the tokens are those
of its characters (`retokenize`), so that only the template's own markers are special tokens.
Chat prompts (`Engine.encode_chat`) and training data (`vicuna.train.data.Encoder`) both go this way,
so a conversation is tokenized alike for training and for replies.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from vicuna.conversation import Message

PRIVATE_USE = range(0xE000, 0xF900)


def special_texts(tokenizer: Any) -> tuple[str, ...]:
    """The texts the tokenizer reads as special tokens wherever they appear in a string."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    texts = set(tokenizer.all_special_tokens) | {t.content for t in added if t.special}
    return tuple(sorted(t for t in texts if t))


@dataclass
class Masked:
    """Messages with each typed special text swapped for a private-use character (`marks`)."""

    messages: list[Message]
    marks: dict[str, str]  # the character -> the special text it stands for
    typed_at: dict[int, str] = field(default_factory=dict)  # where `unmask` put each back

    def unmask(self, text: str, start: int = 0) -> str:
        """`text` (rendered from `messages`, at character `start` of the whole prompt) with the special
        texts back, noting where each lies in the prompt."""
        out, pos = [], start
        for c in text:
            special = self.marks.get(c)
            if special is not None:
                self.typed_at[pos] = special
            out.append(special or c)
            pos += len(out[-1])
        return "".join(out)


def mask(messages: Sequence[Message], specials: Sequence[str]) -> Masked | None:
    """The messages with their special texts masked; None when they hold none."""
    typed = [s for s in specials if any(s in m.content for m in messages)]
    if not typed:
        return None
    used = {c for m in messages for c in m.content}
    marks = [c for c in map(chr, PRIVATE_USE) if c not in used][: len(typed)]
    to_mark = dict(zip(typed, marks, strict=True))
    pattern = re.compile("|".join(re.escape(s) for s in sorted(typed, key=len, reverse=True)))
    masked = [
        replace(m, content=pattern.sub(lambda found: to_mark[found.group()], m.content)) for m in messages
    ]
    return Masked(masked, {mark: special for special, mark in to_mark.items()})


def retokenize(
    tokenizer: Any, ids: Sequence[int], offsets: Sequence[tuple[int, int]], typed_at: dict[int, str]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets where each token that is a typed special text (at `typed_at`)
    becomes the tokens of its characters (each with the special text's offsets)."""
    out_ids: list[int] = []
    out_offsets: list[tuple[int, int]] = []
    for token, (start, end) in zip(ids, offsets, strict=True):
        special = typed_at.get(start)
        pieces = (
            as_text(tokenizer, special) if special is not None and end - start == len(special) else [token]
        )
        out_ids += pieces
        out_offsets += [(start, end)] * len(pieces)
    return out_ids, out_offsets


def as_text(tokenizer: Any, special: str) -> list[int]:
    """The ids of a special token's characters within a text. Tokenized after a newline, as
    SentencePiece tokenizers give the start of a text a space that the middle has not."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    newline, after = ids("\n"), ids("\n" + special)
    return after[len(newline) :] if after[: len(newline)] == newline else ids(special)
