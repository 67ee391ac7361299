"""Training data: conversations from ShareGPT JSON or OpenAI-style JSONL (or Alpaca's instructions), checked
record by record, and tokenized so that the loss falls on assistant replies and their end-of-turn marker
alone.

The assistant spans come from the template's own `Segment`s (character ranges of the rendered text);
a token carries loss when its characters lie inside a trainable span. A token that straddles a span's
edge means the span cannot be located exactly: the example is reported as bad, never silently masked
(FastChat's "tokenization mismatch ... (ignored)") nor mislabelled.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vicuna.conversation import Message, MessagesError, Segment, Template, parse_messages
from vicuna.engine.typed import mask, retokenize, special_texts
from vicuna.errors import VicunaError
from vicuna.textfile import json_problem, read_text

IGNORE = -100  # label of a token without loss (the ignore_index of PyTorch's cross-entropy)
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
SHAREGPT_NAMES = {v: k for k, v in SHAREGPT_ROLES.items()}
# ShareGPT-style files that name their roles as OpenAI does (many Chinese datasets): the same turns
SHAREGPT_ROLES |= {"user": "user", "assistant": "assistant"}
OPENAI_NAMES = {"user": "user", "assistant": "assistant", "system": "system"}
SHOWN_BAD = 10  # bad records named in the error
FORMATS = "expected a JSON list of conversations (ShareGPT) or one JSON object per line (JSONL)"


@dataclass(frozen=True)
class Conversation:
    source: str  # for messages: "data.json[3] (id 'x')" or "data.jsonl:4"
    messages: tuple[Message, ...]
    # for each assistant reply, whether it carries loss (OpenAI's `"weight": 0` says not); (): all do
    trained: tuple[bool, ...] = ()


# --- reading and checking ------------------------------------------------------------------------


def load_conversations(path: Path) -> list[Conversation]:
    """A ShareGPT JSON list (one line or many) or a JSONL file (ShareGPT or OpenAI-style records); bad
    records are an error that explains the first and names the others."""
    conversations, bad, total = read_conversations(path)
    if bad:
        raise VicunaError(bad_records(bad, total))
    return conversations


def bad_records(bad: list[tuple[str, str]], total: int) -> str:
    """The first bad record explained, and where the others are: all fixed in one pass."""
    more = ", ".join(where for where, _ in bad[1:SHOWN_BAD])
    more += f" and {len(bad) - SHOWN_BAD} more" if len(bad) > SHOWN_BAD else ""
    return bad[0][1] + (f"; {len(bad) - 1} more of the {total} records are bad: {more}" if more else "")


def read_conversations(path: Path) -> tuple[list[Conversation], list[tuple[str, str]], int]:
    """The file's good conversations, its bad records as (where, why), and how many records it has."""
    if not path.exists() and not path.suffix and len(path.parts) == 1:  # `--data JSON`, `--data Alpaca2k`
        raise VicunaError(
            f"{path}: no such file; --data takes the data file itself, as LitGPT's --data.json_path does "
            "(LitGPT's data modules, --data JSON or a dataset's name, are not here)"
        )
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise VicunaError(f"{path}: not valid JSON ({json_problem(err)})") from None
        items = [(f"{path}[{i}]", record) for i, record in enumerate(records)]
    else:
        items = []
        # not str.splitlines: it also splits at U+2028, U+2029 and U+0085, which JSON strings may hold
        # unescaped (json.dumps(..., ensure_ascii=False) writes them as they are)
        for n, line in enumerate(re.split(r"\r\n|\r|\n", text), 1):
            if line.strip():
                try:  # a byte-order mark inside: files joined with `cat`, one of them saved by Notepad
                    items.append((f"{path}:{n}", json.loads(line.removeprefix("\ufeff"))))
                except json.JSONDecodeError as err:
                    message = f"{path}:{n}: not valid JSON ({json_problem(err)})"
                    if not items:  # the first record: perhaps the file is not JSONL at all
                        if is_json(text):  # an object over several lines (a list starts with "[")
                            message = f"{path}: one JSON object over several lines"
                        message += f"; {FORMATS}"
                    raise VicunaError(message) from None
    if not items:
        raise VicunaError(f"{path}: no conversations in the file")
    conversations, bad = [], []
    for where, record in items:
        try:
            conversations.append(parse_record(record, where))
        except VicunaError as err:
            bad.append((where, str(err)))
    return conversations, bad, len(items)


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def parse_record(record: Any, where: str) -> Conversation:
    """One record: `{"id", "conversations": [{"from", "value"}]}` or `{"messages": [{"role", "content"}]}`,
    either with an optional `"system"` prompt beside the turns; an OpenAI-style assistant message may
    carry `"weight": 0` (do not train on this reply) or 1 (the default), as in OpenAI's fine-tuning data.
    An Alpaca record (`{"instruction", "input", "output"}`, LitGPT's JSON data) is one exchange."""
    alpaca = {"instruction", "output"}
    if (
        isinstance(record, dict)
        and alpaca <= record.keys()
        and not {"conversations", "messages"} & record.keys()
    ):
        record = alpaca_record(record, where)
    if not isinstance(record, dict) or not ({"conversations", "messages"} & record.keys()):
        raise VicunaError(
            f"{where}: expected an object with 'conversations' (ShareGPT), 'messages' (OpenAI style) or "
            "'instruction' and 'output' (Alpaca)"
        )
    if "id" in record:
        where += f" (id {record['id']!r})"
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise VicunaError(f"{where}.conversations: expected a non-empty list of turns")
        messages = []
        for i, turn in enumerate(turns):
            at = f"{where}.conversations[{i}]"
            if not isinstance(turn, dict):
                raise VicunaError(f"{at}: expected an object with 'from' and 'value'")
            if turn.get("from") not in SHAREGPT_ROLES:
                raise VicunaError(
                    f"{at}.from: unknown role {turn.get('from')!r}; expected human, gpt or system "
                    "(or user, assistant)"
                )
            if not isinstance(turn.get("value"), str):
                raise VicunaError(f"{at}.value: expected a string")
            messages.append(Message(SHAREGPT_ROLES[turn["from"]], turn["value"]))  # type: ignore[arg-type]
        fields = (f"{where}.conversations", "from", "value", SHAREGPT_NAMES)
        trained = [True] * len(messages)
    else:
        messages = parse_messages(record["messages"], source=f"{where}.messages")
        fields = (f"{where}.messages", "role", "content", OPENAI_NAMES)
        trained = [is_trained(m, f"{where}.messages[{i}]") for i, m in enumerate(record["messages"])]
    # LLaMA-Factory's ShareGPT files keep it beside the turns; a table's export writes null for none
    system = "" if record.get("system") is None else record["system"]
    if not isinstance(system, str):
        raise VicunaError(f"{where}.system: expected a string (the system prompt)")
    if system.strip() and messages[0].role == "system":
        raise VicunaError(f"{where}.system: the conversation has a system turn too; keep one of them")
    head = [Message("system", system)] if system.strip() else []
    turns, replies = check_turns(messages, *fields, trained=trained)
    return Conversation(where, tuple(head + turns), replies)


def alpaca_record(record: dict[str, Any], where: str) -> dict[str, Any]:
    """An Alpaca record as OpenAI-style messages: the instruction, then its input (optional: absent, null
    or empty; after a blank line, as turns in a row are joined), is the user's message; the output the
    reply. Its fields are checked here, since the messages' are not the file's to name in an error."""
    for key in ("instruction", "input", "output"):
        value = record.get(key)
        if not (value is None and key == "input") and not isinstance(value, str):
            raise VicunaError(f"{where}.{key}: expected a string")
        if key != "input" and not value.strip():
            raise VicunaError(f"{where}.{key}: empty text")
    prompt = record["instruction"] + (f"\n\n{record['input']}" if (record.get("input") or "").strip() else "")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    return {**record, "messages": messages}


def is_trained(message: Any, at: str) -> bool:
    """An OpenAI-style message's `weight`: 0 leaves an assistant reply out of the loss (a turn of a
    multi-turn example kept as context only); 1, absent or null (a table's export), it is learned. 0.0 and
    1.0 are 0 and 1: pandas and JavaScript tools write a weight column as floats."""
    weight = message.get("weight")
    if weight is None:
        return True
    if message["role"] != "assistant":
        raise VicunaError(f"{at}.weight: only an assistant message has a weight (whether to train on it)")
    if type(weight) not in (int, float) or weight not in (0, 1):  # not True, nor 0.5
        raise VicunaError(f"{at}.weight: expected 0 (do not train on this reply) or 1, got {weight!r}")
    return weight == 1


def check_turns(
    messages: list[Message],
    at: str,
    role_field: str,
    text_field: str,
    names: dict[str, str],
    trained: Sequence[bool],
) -> tuple[list[Message], tuple[bool, ...]]:
    """Non-empty texts; an optional system turn, then user and assistant turns. Consecutive turns of one
    role are joined with a blank line, as `vicuna chat` and the API join them (a chat log often has
    two messages in a row from one side); then they alternate, from a user turn. Returns the turns and,
    for each reply among them, whether it is trained on (`trained`: for each message).

    A trailing user turn is dropped: it has no reply to learn from.
    """
    first = 1 if messages[0].role == "system" else 0
    joined: list[Message] = messages[:first]
    replies: list[bool] = []
    for i, message in enumerate(messages):
        if not message.content.strip():
            raise VicunaError(f"{at}[{i}].{text_field}: empty text")
        if i < first:
            continue
        expected = "user" if (len(joined) - first) % 2 == 0 else "assistant"
        if len(joined) > first and message.role == joined[-1].role and message.role != "system":
            if message.role == "assistant" and trained[i] != replies[-1]:  # one reply: learned or not
                raise VicunaError(
                    f"{at}[{i}].weight: {int(trained[i])}, after a reply of weight {int(replies[-1])}; "
                    "replies in a row are joined into one: give them the same weight"
                )
            joined[-1] = Message(message.role, f"{joined[-1].content}\n\n{message.content}")
        elif message.role != expected:
            raise VicunaError(
                f"{at}[{i}].{role_field}: expected {names[expected]!r}, got {names[message.role]!r} "
                f"(after an optional system turn, {names['user']} and {names['assistant']} turns alternate)"
            )
        else:
            joined.append(message)
            replies += [trained[i]] if message.role == "assistant" else []
    if joined[-1].role == "user":
        joined = joined[:-1]
    if len(joined) - first < 2:
        raise VicunaError(f"{at}: no {names['assistant']!r} turn to learn from")
    return joined, tuple(replies)


# --- tokenizing with the loss mask ---------------------------------------------------------------


class SpanError(ValueError):
    """An assistant span whose edges cannot be located exactly among the tokens."""


class RefusedError(SpanError):
    """Messages the chat template refuses to render (Gemma 2: a system message): a bad example too, but
    one to be told apart from a span that cannot be located, whose remedies differ."""


@dataclass
class Encoder:
    """Renders a conversation with its template and tokenizes it into input ids and loss labels.

    A fast tokenizer's character offsets place each token; without them, each span edge is located by
    tokenizing the text before it, which must give a prefix of the whole tokenization.
    """

    tokenizer: Any
    template: Template
    use_offsets: bool | None = None  # None: when the tokenizer is a fast one

    def __post_init__(self) -> None:
        if self.use_offsets is None:
            self.use_offsets = bool(getattr(self.tokenizer, "is_fast", False))
        bos_id = self.tokenizer.bos_token_id
        adds_bos = bos_id is not None and self.tokenizer("x").input_ids[:1] == [bos_id]
        self.bos: list[int] = [bos_id] if adds_bos else []
        self.specials = special_texts(self.tokenizer)

    def _ids(self, text: str, **kwargs: Any) -> Any:
        return self.tokenizer(text, add_special_tokens=False, **kwargs)

    def _bos_for(self, text: str) -> list[int]:
        """The BOS a chat prompt of `text` starts with beyond the text's own (`Engine.encode_chat`)."""
        if not self.template.add_special_tokens or (self.bos and text.startswith(self.tokenizer.bos_token)):
            return []
        return self.bos

    def _segments(self, messages: Sequence[Message]) -> list[Segment]:
        try:
            return self.template.segments(messages, add_generation_prompt=False)
        except MessagesError as err:
            raise RefusedError(str(err).removeprefix("messages: ")) from None
        except VicunaError as err:  # e.g. a chat template that writes a reply twice
            raise SpanError(str(err)) from None

    def leaves_out_system(self) -> bool:
        """Whether the template renders a conversation that ends with a reply without its system prompt:
        Mistral v0.3's writes it into the last user turn when that ends the messages, so into prompts
        only; training would never see the system prompts of the data."""
        probe = [Message("system", "vicuna-system-probe"), Message("user", "Hi"), Message("assistant", "Hi")]
        try:
            return "vicuna-system-probe" not in "".join(s.text for s in self._segments(probe))
        except SpanError:  # a template that refuses a system message says so example by example
            return False

    def length(self, messages: Sequence[Message]) -> int:
        if mask(messages, self.specials) is not None:
            return len(self.encode(messages)[0])
        text = "".join(s.text for s in self._segments(messages))
        return len(self._bos_for(text)) + len(self._ids(text).input_ids)

    def encode(
        self, messages: Sequence[Message], trained: Sequence[bool] = ()
    ) -> tuple[list[int], list[int]]:
        """(input_ids, labels); labels are IGNORE except on the tokens of the trainable segments, of the
        replies `trained` marks (one flag per assistant message; (): all of them).
        Special-token text in a message is tokenized as text, as in a chat prompt (`vicuna.engine.typed`)."""
        masked = mask(messages, self.specials)
        text, spans, pos, marked, reply = "", [], 0, "", 0
        for segment in self._segments(masked.messages if masked else messages):
            piece = masked.unmask(segment.text, pos) if masked else segment.text
            marked += segment.text
            text += piece
            # a template renders each assistant message as one trainable segment
            if segment.trainable and (not trained or trained[reply]) and piece:
                spans.append((pos, pos + len(piece)))
            reply += segment.trainable
            pos += len(piece)
        if masked and not self.use_offsets:
            raise SpanError("a message holds a special token's text, which needs a fast tokenizer's offsets")
        if self.use_offsets:
            enc = self._ids(text, return_offsets_mapping=True)
            ids, offsets = list(enc.input_ids), enc.offset_mapping
            if masked:
                ids, offsets = retokenize(self.tokenizer, ids, offsets, masked.typed_at)
            flags = flags_from_offsets(offsets, spans, text)
        else:
            ids = list(self._ids(text).input_ids)
            flags = self._flags_from_prefixes(text, ids, spans)
        bos = self._bos_for(marked)
        labels = [t if f else IGNORE for t, f in zip(ids, flags, strict=True)]
        return bos + ids, [IGNORE] * len(bos) + labels

    def _flags_from_prefixes(self, text: str, ids: list[int], spans: list[tuple[int, int]]) -> list[bool]:
        flags = [False] * len(ids)
        for start, end in spans:
            first, last = self._token_boundary(text, ids, start), self._token_boundary(text, ids, end)
            if last <= first:
                raise SpanError(f"the assistant text at characters {start}-{end} has no tokens of its own")
            flags[first:last] = [True] * (last - first)
        return flags

    def _token_boundary(self, text: str, ids: list[int], char: int) -> int:
        before = list(self._ids(text[:char]).input_ids)
        if ids[: len(before)] != before:
            raise SpanError(
                f"character {char} ({text[max(0, char - 12) : char]!r}|{text[char : char + 12]!r}) falls "
                "inside a token: the text before it tokenizes differently on its own"
            )
        return len(before)


def flags_from_offsets(
    offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]], text: str
) -> list[bool]:
    """For each token (start, end) in characters of `text`: whether it lies inside one of the sorted `spans`.

    Some tokenizers trim the space a token starts with out of its offsets (GPT-2's `trim_offsets`);
    a token is taken to start where the previous one ended, so such a space is never lost at an edge.
    """
    flags, covered, j, prev_end = [], set(), 0, 0
    for start, end in offsets:
        if start >= end:  # zero-width: nothing of the text is in it
            flags.append(False)
            continue
        start, prev_end = min(start, prev_end), max(prev_end, end)
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        if j == len(spans) or end <= spans[j][0]:
            flags.append(False)
        elif spans[j][0] <= start and end <= spans[j][1]:
            flags.append(True)
            covered.add(j)
        else:
            raise SpanError(edge_crossed(text, start, end, spans[j]))
    if len(covered) < len(spans):
        missing = spans[min(set(range(len(spans))) - covered)]
        raise SpanError(
            f"the assistant text at characters {missing[0]}-{missing[1]} has no tokens of its own"
        )
    return flags


def edge_crossed(text: str, start: int, end: int, span: tuple[int, int]) -> str:
    """Why the token at characters start-end of `text` cannot be given to the reply `span` or kept from it:
    where it is, in the text, rather than character counts alone."""
    edge = span[0] if start < span[0] else span[1]
    why = (
        f"a token ({text[start:end]!r}) crosses the {'start' if edge == span[0] else 'end'} of the "
        f"assistant text at character {edge} ({text[max(0, edge - 12) : edge]!r}|{text[edge : edge + 12]!r})"
    )
    if edge == span[0] and text[edge : edge + 1].isspace():  # "\n" + " " of "assistant\n  Hi" is one token
        why += "; the reply begins with white space, which the tokenizer joins with the template's: strip it"
    return why


# --- the data set ----------------------------------------------------------------------------------


@dataclass
class Example:
    source: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


@dataclass
class Prepared:
    max_length: int  # tokens per example
    examples: list[Example] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (source, why its spans cannot be located)
    refused: int = 0  # of the bad, those the chat template refuses to render
    truncated: int = 0  # examples cut at --max-length
    dropped: list[str] = field(default_factory=list)  # sources of truncated examples with no loss token left
    untrained: int = 0  # examples (or --split-long parts) whose replies all have weight 0, left out
    system_left_out: int = 0  # conversations whose system prompt the chat template does not render
    # records the reader refused (a conversation that begins with a reply, an unknown role), left out under
    # --allow-bad, which counts them with the bad examples
    bad_records: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        tokens = sum(len(e.input_ids) for e in self.examples)
        loss = sum(sum(label != IGNORE for label in e.labels) for e in self.examples)
        return (
            f"{len(self.examples)} examples, {tokens} tokens of which {loss} carry loss; "
            f"{len(self.bad)} bad ({self._bad_kinds()}), "
            f"{self.truncated} truncated to --max-length {self.max_length}"
            + (f", {len(self.dropped)} of them left out (no assistant text left)" if self.dropped else "")
            + (f"; {self.untrained} left out (every reply has weight 0)" if self.untrained else "")
            + (f"; {len(self.bad_records)} bad records left out (--allow-bad)" if self.bad_records else "")
            + (
                f"; {self.system_left_out} trained without their system prompt, which the chat template "
                "leaves out of a conversation that ends with a reply"
                if self.system_left_out
                else ""
            )
        )

    def fingerprint(self) -> str:
        """A digest of the tokenized data: a resumed run must see the same examples."""
        digest = hashlib.sha256()
        for e in self.examples:
            digest.update(json.dumps([e.input_ids, e.labels]).encode())
        return digest.hexdigest()[:16]

    def add_bad(self, source: str, err: SpanError) -> None:
        self.bad.append((source, str(err)))
        self.refused += isinstance(err, RefusedError)

    def _bad_kinds(self) -> str:
        """Why the bad examples are bad, as the summary and the refusal to train say it."""
        located = len(self.bad) - self.refused
        if not self.refused:
            return "assistant text not locatable"
        if not located:
            return "refused by the chat template"
        return f"{self.refused} refused by the chat template, {located} with assistant text not locatable"

    def check_bad(self, allow_bad: int) -> None:
        """Refuse to train when more examples than `allow_bad` could not be labelled exactly (or than what
        the bad records left out already took of it)."""
        allowed = allow_bad - len(self.bad_records)
        if len(self.bad) > allowed:
            source, why = self.bad[0]
            what = (
                "have assistant text that cannot be located exactly among the tokens"
                if not self.refused
                else "are refused by the model's chat template"
                if self.refused == len(self.bad)
                else f"are bad ({self._bad_kinds()})"
            )
            # "(allowed: 0)" alone, to a user who had passed --allow-bad 1, did not say where the 1 had gone
            records = len(self.bad_records)
            taken = f": --allow-bad {allow_bad} less the {records} bad record(s) left out" if records else ""
            raise VicunaError(
                f"{len(self.bad)} example(s) {what} (allowed: {allowed}{taken}); the first is {source}: {why}. See "
                "them with `vicuna train inspect`, fix the data or the template, or pass --allow-bad N to leave "
                "out up to N of them"
            )


def split_turns(messages: Sequence[Message], fits: Callable[[list[Message]], bool]) -> list[list[Message]]:
    """Split a conversation at turn boundaries into pieces that fit; each piece keeps the system turn."""
    head = list(messages[:1]) if messages[0].role == "system" else []
    turns = list(messages[len(head) :])
    pieces: list[list[Message]] = []
    current: list[Message] = []
    for i in range(0, len(turns), 2):
        pair = turns[i : i + 2]
        if current and not fits(head + current + pair):
            pieces.append(head + current)
            current = []
        current += pair
    return [*pieces, head + current]


def prepare(
    conversations: Sequence[Conversation],
    encoder: Encoder,
    *,
    max_length: int,
    split_long: bool = False,
    progress: bool = False,
) -> Prepared:
    """Tokenize every conversation; long ones are split at turn boundaries (`split_long`) or truncated."""
    from rich.progress import track

    def fits(messages: list[Message]) -> bool:
        return encoder.length(messages) <= max_length

    out = Prepared(max_length)
    has_system = [
        encoder.template.system is not None or c.messages[0].role == "system" for c in conversations
    ]
    if any(has_system) and encoder.leaves_out_system():
        out.system_left_out = sum(has_system)
    # out of a terminal a transient bar draws nothing but leaves an empty line behind
    shown = progress and sys.stdout.isatty()
    for conv in track(conversations, description="tokenizing", disable=not shown, transient=True):
        pieces = [list(conv.messages)]
        if conv.trained and not any(conv.trained):  # left out whole, however it would be split
            out.untrained += 1
            continue
        try:
            if split_long and not fits(pieces[0]):
                pieces = split_turns(conv.messages, fits)
        except SpanError as err:
            out.add_bad(conv.source, err)
            continue
        replies = conv.trained or (True,) * sum(m.role == "assistant" for m in conv.messages)
        for k, messages in enumerate(pieces):
            source = conv.source if len(pieces) == 1 else f"{conv.source} part {k + 1}"
            n = sum(m.role == "assistant" for m in messages)
            trained, replies = replies[:n], replies[n:]
            if not any(trained):  # nothing to learn from: left out, as a truncation with no reply left
                out.untrained += 1
                continue
            try:
                ids, labels = encoder.encode(messages, trained)
            except SpanError as err:
                out.add_bad(source, err)
                continue
            truncated = len(ids) > max_length
            if truncated:
                ids, labels = ids[:max_length], labels[:max_length]
                out.truncated += 1
                if all(label == IGNORE for label in labels):
                    out.dropped.append(source)
                    continue
            out.examples.append(Example(source, ids, labels, truncated))
    return out
