"""Streaming text out of token ids: whole characters only, and never any part of a stop string."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], **kwargs) -> str: ...


class IncrementalDecoder:
    """Turns tokens into text pieces as they arrive.

    Each step decodes a short window of recent tokens and emits what the new token added; while the
    window ends in an incomplete UTF-8 sequence (byte-fallback tokens, byte-level BPE), the text is held
    back. Decoding a window rather than one token keeps SentencePiece's word-boundary spaces right.
    The pieces joined equal the decode of all the tokens, except for a last character left incomplete.

    `prompt_ids`: the text continues them. The window starts at the prompt's last token, so a reply's
    first word keeps the space SentencePiece gives it (LLaMA's "▁Paris" after "is" is " Paris", where
    decoded alone it is "Paris" and a completion read "isParis"), as byte-level BPE's "ĠParis" always is.
    A prompt that ends with a character spelled in byte tokens (an emoji, a CJK character LLaMA's vocabulary
    lacks) has the window start at the character's first byte: its last byte alone is no character, and
    SentencePiece's byte tokens that follow it (the reply's own emoji) decoded as U+FFFD with it.
    """

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int] = ()) -> None:
        # A fast tokenizer's own `tokenizers` backend decodes the same text without transformers' per-call
        # argument handling (~15 us of Python a call, twice a token for every row of a batch).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:
            self._decode = lambda ids: tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        self._ids: list[int] = list(prompt_ids[-1:])
        if "\ufffd" in self._decode(self._ids):  # a character's bytes are at most 4 tokens
            n = next((n for n in range(2, 5) if "\ufffd" not in self._decode(prompt_ids[-n:])), 1)
            self._ids = list(prompt_ids[-n:])
        self._prefix = 0  # window start
        self._read = len(self._ids)  # tokens whose text has been emitted

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """What is still held back, at the end of a reply. A character cut off by the reply's token
        limit or by Ctrl-C (its first bytes only) is dropped rather than shown as U+FFFD: byte-level BPE
        decodes the cut bytes as one U+FFFD, SentencePiece's byte tokens as one for each byte."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :].rstrip("\ufffd")


class StopMatcher:
    """Holds back text that could be the start of a stop string, and cuts the text at a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self._quiet = 0  # how many of the held characters came in `quiet` pushes
        self.matched: str | None = None

    def push(self, text: str, quiet: bool = False) -> str:
        """Text that is safe to show; after a match, `matched` is set and later text is dropped.

        `quiet`: text of a reply shorter than its min_new_tokens, where no stop string ends yet (as vLLM's
        min_tokens: the reply goes on); one that begins there and ends in later text still counts."""
        if self.matched is not None:
            return ""
        buf = self._held + text
        quiet_end = len(buf) if quiet else self._quiet  # no stop may end within buf[:quiet_end]
        hits = [] if quiet else [(at, s) for s in self._stops if (at := self._find(buf, s, quiet_end)) != -1]
        if hits:
            at, self.matched = min(hits)
            self._held, self._quiet = "", 0
            return buf[:at]
        keep = 0
        for stop in self._stops:  # the longest end of buf that begins some stop string
            # only where its first character is: one `find` a stop, not a comparison per length (an
            # editor plugin sends dozens of stop strings, and this runs for every token of every stream)
            at = buf.find(stop[0], max(len(buf) - len(stop) + 1, 0), len(buf) - keep)
            while at != -1:
                if stop.startswith(buf[at:]):
                    keep = len(buf) - at
                    break
                at = buf.find(stop[0], at + 1, len(buf) - keep)
        self._held = buf[len(buf) - keep :] if keep else ""
        self._quiet = max(quiet_end - (len(buf) - keep), 0)
        return buf[: len(buf) - keep]

    @staticmethod
    def _find(buf: str, stop: str, quiet_end: int) -> int:
        """Where `stop` first occurs in `buf` ending after `quiet_end`, or -1."""
        return buf.find(stop, max(quiet_end - len(stop) + 1, 0))

    def flush(self) -> str:
        held, self._held, self._quiet = self._held, "", 0
        return "" if self.matched is not None else held


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE (GPT-2, SmolLM2, LLaMA 3) spells each byte as one printable character: the printable
    Latin-1 bytes as themselves, the other 68 as the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


class TokenBytes:
    """Each token's own bytes, which a token's text cannot give when it holds part of a character (a byte of
    a Chinese character in byte-level BPE, or SentencePiece's <0xE4>-style byte tokens)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.alphabet = _byte_level_alphabet() if "ByteLevel" in repr(decoder) else None
        self.special = set(getattr(tokenizer, "all_special_ids", ()))
        self._known: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        found = self._known.get(token_id)
        if found is None:
            found = self._known[token_id] = self._bytes(token_id)
        return found

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if token_id in self.special or not piece:
            return (piece or "").encode("utf-8")
        if self.alphabet is not None and all(c in self.alphabet for c in piece):
            return bytes(self.alphabet[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece's byte tokens
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        if "\u2581" in piece:  # SentencePiece's word-boundary mark is a space
            return piece.replace("\u2581", " ").encode("utf-8")
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def text(self, token_id: int) -> str:
        """The token's text: its bytes as UTF-8, a byte of a split character as `\\xe4`."""
        return self(token_id).decode("utf-8", errors="backslashreplace")
