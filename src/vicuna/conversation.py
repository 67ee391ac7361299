"""Chat messages and prompt templates: one small template per model family, with its stop strings.

A template turns a list of messages into the exact prompt text a model was trained on. It renders
`Segment`s rather than one string so that training can put the loss on assistant text alone: the
segments marked `trainable` are each assistant reply and its end-of-turn marker, located by the
template's own rendering, never by splitting strings afterwards. No torch here.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

from vicuna.errors import VicunaError

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_V0_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class Message:
    role: Role
    content: str

    def __post_init__(self) -> None:
        # checked here for Python callers, whose type hints nothing enforces: a role of "Assistant" or
        # FastChat's "human" was rendered as a user turn without a word, and content None failed in the
        # tokenizer
        if self.role not in ROLES:
            raise MessagesError(f"role: expected one of {', '.join(ROLES)}, got {self.role!r}", "role")
        if not isinstance(self.content, str):
            raise MessagesError(f"content: expected a string, got {type(self.content).__name__}", "content")


@dataclass(frozen=True)
class Segment:
    """A piece of the rendered prompt; `trainable` marks assistant text plus its end-of-turn marker."""

    text: str
    trainable: bool = False


class Template(Protocol):
    """A prompt template. Its fields are read-only properties: the templates here are frozen dataclasses, and
    to type checkers plain attributes of a protocol ask for settable ones (none of them was a Template)."""

    @property
    def name(self) -> str: ...

    # the system prompt of messages without one ("" an empty one; None, `hf`, `llama-2`, `llama-3` and
    # `chatml` only: none, so the chat template's own default, or no system block)
    @property
    def system(self) -> str | None: ...

    @property
    def stop(self) -> tuple[str, ...]: ...  # text that ends an assistant turn

    # whether the tokenizer adds its special tokens (BOS) to the rendered text, as it does to the
    # built-in templates' text; a chat template's text holds them itself (`apply_chat_template`)
    @property
    def add_special_tokens(self) -> bool: ...

    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Segment]: ...


def render(template: Template, messages: Sequence[Message]) -> str:
    """The prompt text for `messages`, ending where the reply begins."""
    return "".join(s.text for s in template.segments(messages))


class MessagesError(VicunaError):
    """Messages a template cannot render as given; `param` names the one at fault (`messages[2]`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def split_system(
    messages: Sequence[Message], default_system: str | None, add_generation_prompt: bool
) -> tuple[str | None, list[Message]]:
    """Take out the system prompt and bring the turns into the alternating order our templates render.

    Leading system messages are the system prompt, even an empty one; without any it is `default_system`
    (None: none). These templates have one place for it, at the start,
    so a system message further on is read as user text; consecutive messages of one role are joined
    with a blank line. The turns must then start with a user turn, and end with a user turn when a
    reply is to be generated, with an assistant turn otherwise.
    """
    head = 0
    while head < len(messages) and messages[head].role == "system":
        head += 1
    system = "\n\n".join(m.content for m in messages[:head]) if head else default_system
    turns: list[Message] = []
    for message in messages[head:]:
        role = "assistant" if message.role == "assistant" else "user"
        if turns and turns[-1].role == role:
            turns[-1] = Message(role, _joined(turns[-1].content, message.content))
        else:
            turns.append(Message(role, message.content))
    if not turns:
        raise MessagesError("messages: at least one user message is needed", "messages")
    if turns[0].role != "user":
        where = f"messages[{head}]"
        raise MessagesError(
            f"{where}: expected a user message, got an assistant message (the conversation starts with "
            "a user turn, after any system messages)",
            where,
        )
    where = f"messages[{len(messages) - 1}]"
    if add_generation_prompt and turns[-1].role != "user":
        raise MessagesError(f"{where}: the last message must be a user message to generate a reply", where)
    if not add_generation_prompt and turns[-1].role != "assistant":
        raise MessagesError(f"{where}: the last message must be an assistant message", where)
    return system, turns


def _joined(first: str, second: str) -> str:
    return f"{first}\n\n{second}" if first and second else first or second


A_ROLE = {"system": "a system", "user": "a user", "assistant": "an assistant"}


def check_alternating(messages: Sequence[Message], source: str = "messages") -> None:
    """The order a chat keeps: an optional system message, then user and assistant turns alternating,
    starting with a user turn (the last may be either)."""
    first = 1 if messages and messages[0].role == "system" else 0
    if len(messages) == first:
        raise MessagesError(f"{source}: at least one user message is needed", source)
    for i, message in enumerate(messages[first:], first):
        expected = "user" if (i - first) % 2 == 0 else "assistant"
        if message.role != expected:
            where = f"{source}[{i}]"
            raise MessagesError(
                f"{where}: expected {A_ROLE[expected]} message, got {A_ROLE[message.role]} "
                "one (after an optional system message, user and assistant turns alternate)",
                where,
            )


def fit_history(
    encode: Callable[[list[Message]], Sequence[int]],
    context_window: int,
    messages: Sequence[Message],
    max_new_tokens: int,
    left_out: int = 0,
) -> tuple[list[Message], int, int]:
    """The prompt for a chat's next reply: `messages` less its oldest exchanges (never a system message,
    nor the last message) for the prompt and `max_new_tokens` to fit the context window. Returns the
    messages kept, how many exchanges went, and the room left for the reply: less than `max_new_tokens`
    where the last message alone leaves less. `encode` gives a prompt's token ids.

    Leaving out is sticky, with slack, so that each prompt begins as the one before did and the engine,
    which keeps the cache of the last prompt and reply, computes only the new exchange: the `left_out`
    oldest exchanges (as many as the chat's last prompt left out) stay out, and no more go while the rest
    fits. When it no longer does, more go, the fewest for the prompt to take at most 3/4 of its room (the
    window less `max_new_tokens`), so that the next turns fit without leaving out more (the fewest that
    fit where the last exchanges alone take more). Leaving out one more exchange on every turn, each
    prompt would begin differently and be computed whole. Found by bisection, each way of leaving out
    encoded once: an hour's conversation is encoded a few times, and once while it fits."""
    system = list(messages[:1]) if messages and messages[0].role == "system" else []
    turns = list(messages[len(system) :])
    most = max(0, (len(turns) - 1) // 2)  # the exchanges before the last message
    start = max(0, min(left_out, most))  # fewer where the conversation has lost exchanges since

    @functools.cache
    def length(dropped: int) -> int:
        return len(encode(system + turns[2 * dropped :]))

    def fewest(enough: Callable[[int], bool]) -> int:  # all but the last message where none is enough
        return start + bisect.bisect_left(range(start, most), True, key=enough)

    room = context_window - max_new_tokens  # for the prompt
    fits = lambda d: length(d) <= room  # noqa: E731
    roomy = lambda d: 4 * length(d) <= 3 * room  # noqa: E731
    dropped = start
    if not fits(start):
        dropped = fewest(roomy)
        if not roomy(dropped):
            dropped = fewest(fits)
    return system + turns[2 * dropped :], dropped, context_window - length(dropped)


@dataclass(frozen=True)
class VicunaV11:
    """Vicuna v1.1-v1.5 (FastChat `vicuna_v1.1`): everything on one line, replies end with `</s>`."""

    name: str = "vicuna_v1.1"
    system: str = VICUNA_SYSTEM
    stop: tuple[str, ...] = ("</s>",)
    add_special_tokens: bool = True

    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Segment]:
        system, turns = split_system(messages, self.system, add_generation_prompt)
        out, prompt = [], system + " "
        for message in turns:
            if message.role == "user":
                prompt += f"USER: {message.content} ASSISTANT:"
            else:
                out += [Segment(prompt), Segment(f" {message.content}</s>", trainable=True)]
                prompt = ""
        return out + [Segment(prompt)] if prompt else out


@dataclass(frozen=True)
class VicunaV0:
    """Vicuna v0 (FastChat `one_shot` without its example): `### Human:` / `### Assistant:`."""

    name: str = "vicuna_v0"
    system: str = VICUNA_V0_SYSTEM
    stop: tuple[str, ...] = ("###",)
    add_special_tokens: bool = True

    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Segment]:
        system, turns = split_system(messages, self.system, add_generation_prompt)
        out, prompt = [], system + "\n###"
        for message in turns:
            if message.role == "user":
                prompt += f" Human: {message.content}\n### Assistant:"
            else:
                out += [Segment(prompt), Segment(f" {message.content}\n###", trainable=True)]
                prompt = ""
        return out + [Segment(prompt)] if prompt else out


@dataclass(frozen=True)
class Llama2:
    """Llama 2 chat: `[INST] <<SYS>>...<</SYS>> ... [/INST]`; BOS before each turn pair, `</s>` after.

    As Meta's reference code (and the model's HF chat template) does, each turn's text is stripped of
    whitespace at its ends: a reply that ended in " " before `</s>` comes back as it was trained; and a
    system prompt is wrapped in `<<SYS>>` even when it is empty: only without one is there no block.
    """

    name: str = "llama-2"
    system: str | None = None
    stop: tuple[str, ...] = ("</s>",)
    add_special_tokens: bool = True

    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Segment]:
        system, turns = split_system(messages, self.system, add_generation_prompt)
        out, prompt = [], ""  # the tokenizer adds the first <s>
        for i, message in enumerate(turns):
            if message.role == "user":
                sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if i == 0 and system is not None else ""
                prompt += f"[INST] {(sys_block + message.content).strip()} [/INST]"
            else:
                out += [Segment(prompt), Segment(f" {message.content.strip()} </s>", trainable=True)]
                prompt = "<s>"
        if prompt and prompt != "<s>":
            out.append(Segment(prompt))
        return out


@dataclass(frozen=True)
class ChatML:
    """ChatML (`<|im_start|>role\\n...<|im_end|>`), used by SmolLM2, Qwen and many others. A system
    message is a system turn even when it is empty, as the models' own chat templates render it; only
    without one is there no system turn."""

    name: str = "chatml"
    system: str | None = None
    stop: tuple[str, ...] = ("<|im_end|>",)
    add_special_tokens: bool = True

    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Segment]:
        system, turns = split_system(messages, self.system, add_generation_prompt)
        out, prompt = [], f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
        for message in turns:
            if message.role == "user":
                prompt += f"<|im_start|>user\n{message.content}<|im_end|>\n<|im_start|>assistant\n"
            else:
                out += [Segment(prompt), Segment(f"{message.content}<|im_end|>", trainable=True)]
                prompt = "\n"
        if prompt and prompt != "\n":
            out.append(Segment(prompt))
        return out


@dataclass(frozen=True)
class Llama3:
    """Llama 3 / 3.1 instruct: each turn `<|start_header_id|>ROLE<|end_header_id|>\\n\\n` then its text and
    `<|eot_id|>`; the tokenizer adds `<|begin_of_text|>`. As Meta's reference code does, each turn's text
    is stripped of whitespace at its ends; a system message is a system turn even when it is empty."""

    name: str = "llama-3"
    system: str | None = None
    stop: tuple[str, ...] = ("<|eot_id|>",)
    add_special_tokens: bool = True

    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Segment]:
        def turn(role: str, text: str) -> str:
            return f"<|start_header_id|>{role}<|end_header_id|>\n\n{text.strip()}<|eot_id|>"

        system, turns = split_system(messages, self.system, add_generation_prompt)
        out, prompt = [], turn("system", system) if system is not None else ""
        for message in turns:
            if message.role == "user":
                prompt += turn("user", message.content) + "<|start_header_id|>assistant<|end_header_id|>\n\n"
            else:
                out += [Segment(prompt), Segment(f"{message.content.strip()}<|eot_id|>", trainable=True)]
                prompt = ""
        return out + [Segment(prompt)] if prompt else out


# (messages as OpenAI-style dicts, add_generation_prompt) -> prompt text
ApplyChatTemplate = Callable[[list[dict[str, str]], bool], str]


@dataclass(frozen=True)
class HFTemplate:
    """The model's own chat template (Jinja, from its tokenizer), through a function that renders it.

    Messages go to the template as they are: it decides which orders of roles it accepts, and one it
    refuses is a `MessagesError` with the template's own words. For training, assistant spans are found
    by rendering each prefix of the conversation: the text a turn adds after the generation prompt is
    that turn. Some templates render a conversation's start differently once it goes on (Mistral v0.3
    writes the system prompt into the last user turn only; Qwen3 drops the <think> part of replies
    before the last user message): their spans are found in the one rendering of the whole (`_in_whole`).
    """

    apply: ApplyChatTemplate
    stop: tuple[str, ...] = ()
    name: str = "hf"
    system: str | None = None  # None keeps the template's own default system prompt
    add_special_tokens: bool = False

    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Segment]:
        if not messages:
            raise MessagesError("messages: at least one message is needed", "messages")
        msgs = [{"role": m.role, "content": m.content} for m in messages]
        if self.system is not None and messages[0].role != "system":
            msgs.insert(0, {"role": "system", "content": self.system})
        if add_generation_prompt:  # a prompt to reply to: no assistant span to locate
            return [Segment(self._apply(msgs, True))]
        return self._by_prefixes(msgs) or self._in_whole(msgs)

    def _by_prefixes(self, msgs: list[dict[str, str]]) -> list[Segment] | None:
        """Each reply is what its turn adds to the generation prompt; None where a prefix of the
        conversation is not rendered as the start of the next one."""
        out: list[Segment] = []
        done = ""
        for i in range(1, len(msgs)):
            if msgs[i]["role"] != "assistant":
                continue
            prompt = self._apply(msgs[:i], True)
            full = self._apply(msgs[: i + 1], False)
            closing = self._closing(done, prompt)
            if closing:  # the last reply's span, less what ends a whole conversation only
                out[-1], done = Segment(out[-1].text[: -len(closing)], trainable=True), done[: -len(closing)]
            if not prompt.startswith(done) or not full.startswith(prompt):
                return None
            out += [Segment(prompt[len(done) :]), Segment(full[len(prompt) :], trainable=True)]
            done = full
        rest = self._apply(msgs, False)
        if not rest.startswith(done):
            return None
        if rest[len(done) :]:
            out.append(Segment(rest[len(done) :]))
        return out

    def _in_whole(self, msgs: list[dict[str, str]]) -> list[Segment]:
        """The replies located in the one rendering of the whole conversation, which is what is tokenized.

        A reply's place is where the template writes a mark given as its text: everything before the
        mark (less what the template writes ahead of a reply, Qwen3's `<think>` block) and everything
        after it must be rendered as with the real text, so that what the text changes lies inside the
        reply's span. The span ends with the end-of-turn marker (a `stop`) the template writes after it,
        which the model writes too; the line break after that marker is the template's own text.
        """
        whole = self._apply(msgs, False)
        mark = next(m for n in range(len(whole) + 1) if (m := f"vicuna-reply-{n}") not in whole)
        out: list[Segment] = []
        done = 0
        for i, message in enumerate(msgs):
            if message["role"] != "assistant":
                continue
            marked = self._apply([*msgs[:i], {**message, "content": mark}, *msgs[i + 1 :]], False)
            at, after = marked.find(mark), len(marked) - marked.find(mark) - len(mark)
            lead = self._lead(msgs[:i], mark)
            start = at - len(lead) if marked[:at].endswith(lead) else at
            end = len(whole) - after
            if marked.count(mark) != 1 or not done <= start <= end:
                raise VicunaError(f"the model's chat template does not write message {i}'s text in one place")
            if whole[:start] != marked[:start] or whole[end:] != marked[len(marked) - after :]:
                raise VicunaError(
                    f"the model's chat template renders the other messages differently with message {i}'s "
                    "text, so the text cannot be located"
                )
            # the longest stop first; white space before it is the model's to write too (" </s>")
            stops = "|".join(re.escape(s) for s in sorted(self.stop, key=len, reverse=True))
            stop = re.compile(rf"\s*(?:{stops})").match(whole, end) if stops else None
            if stop is None:
                raise VicunaError(
                    f"the model's chat template writes no end-of-turn marker ({', '.join(self.stop) or 'none known'}) "
                    f"after message {i}, so where its reply ends cannot be located"
                )
            out += [Segment(whole[done:start]), Segment(whole[start : stop.end()], trainable=True)]
            done = stop.end()
        if whole[done:]:
            out.append(Segment(whole[done:]))
        return [s for s in out if s.text or s.trainable]

    def _lead(self, before: list[dict[str, str]], mark: str) -> str:
        """What the template writes between the generation prompt after `before` and a reply (`mark`):
        text the model writes before its reply's text, such as Qwen3's empty `<think>` block or the
        space Mistral puts before a reply, which a tokenizer joins with the reply's first word."""
        prompt = self._apply(before, True)
        text = self._apply([*before, {"role": "assistant", "content": mark}], False)
        text = text[: max(text.find(mark), 0)]
        if text.startswith(prompt):
            return text[len(prompt) :]
        # Mistral's prompt holds the system prompt in its last turn, where `text` has none: what each writes
        # after the last message, less the prompt's, is the lead
        last = before[-1]["content"].strip() if before else ""  # as a template that trims writes it
        if not last or last not in prompt or last not in text:
            return ""
        after, prompt_after = text[text.rfind(last) + len(last) :], prompt[prompt.rfind(last) + len(last) :]
        return after.removeprefix(prompt_after) if after.startswith(prompt_after) else ""

    def _closing(self, done: str, prompt: str) -> str:
        """The stop text (EOS) that `done`, a conversation rendered to its last reply, ends with where the
        conversation goes on in `prompt` without it: Phi-3's template writes its EOS after the last turn
        only (`{% else %}{{ eos_token }}`), and every conversation of more than one exchange was refused."""
        if prompt.startswith(done):
            return ""
        return next((s for s in self.stop if done.endswith(s) and prompt.startswith(done[: -len(s)])), "")

    def _apply(self, msgs: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self.apply(msgs, add_generation_prompt)
        except Exception as err:  # Jinja's `raise_exception`, or a template that fails on these messages
            said = f"the model's chat template cannot render these messages ({err})"
            if self._renders_without_system(msgs, add_generation_prompt):
                said = (
                    f"the model's chat template refuses system messages ({err}): leave them (and "
                    "--conv-system-msg) out, or put their text into the first user message"
                )
            raise MessagesError(f"messages: {said}", "messages") from None

    def _renders_without_system(self, msgs: list[dict[str, str]], add_generation_prompt: bool) -> bool:
        """Whether messages the template refused render without their system messages: then the system
        role is what it refuses (Gemma 2's 'System role not supported'), however it words it."""
        others = [m for m in msgs if m["role"] != "system"]
        if not others or len(others) == len(msgs):
            return False
        try:
            self.apply(others, add_generation_prompt)
        except Exception:
            return False
        return True


BUILTIN_TEMPLATES: dict[str, Template] = {
    t.name: t for t in (VicunaV11(), VicunaV0(), Llama2(), Llama3(), ChatML())
}
TEMPLATE_NAMES: tuple[str, ...] = (*BUILTIN_TEMPLATES, "hf")


def unknown_template(name: str) -> str:
    """The refusal of a template name, with what to use instead of the FastChat names users bring."""
    said = f"unknown template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}"
    if name in ("one_shot", "zero_shot"):  # FastChat's '### Human:' templates
        example = ", without one_shot's example exchange" if name == "one_shot" else ""
        return f"{said} (FastChat's {name} is vicuna_v0 here{example})"
    return (
        f"{said} (hf: the model's own chat template, which a model that has one gets without --conv-template)"
    )


def template_name(value: str) -> str:
    """`--conv-template`'s value, checked as the flag is read: an unknown name was said only once the model
    had loaded (and the CPU's dtype been timed), a minute for a 13B model."""
    if value not in TEMPLATE_NAMES:
        raise argparse.ArgumentTypeError(unknown_template(value))
    return value


def get_template(name: str) -> Template:
    """A built-in template by name (`hf` needs a tokenizer: see the engine's loader)."""
    if name not in BUILTIN_TEMPLATES:
        raise VicunaError(unknown_template(name))
    return BUILTIN_TEMPLATES[name]


def with_system(template: Template, system: str | None) -> Template:
    """The template with its default system prompt replaced (`--conv-system-msg`)."""
    return template if system is None else replace(template, system=system)  # type: ignore[type-var]


# A model folder's chosen template: {"conv_template": NAME, "conv_system_msg": TEXT (when not the template's
# default)}, written by `vicuna train`, and by a merge whose delta's name chose another template than the
# merged folder's would; `vicuna chat` and `serve` read it.
RECORDED_TEMPLATE = "vicuna.json"
DEFAULT_TEMPLATE = "vicuna_v1.1"  # a model that neither its tokenizer nor its name says more of


def choose_template_name(
    requested: str | None, *, has_chat_template: bool, model_name: str, special_tokens: Collection[str] = ()
) -> str:
    """`--conv-template` wins; else the model's own chat template; else by the model's name or its tokenizer's
    special tokens; else vicuna_v1.1."""
    if requested:
        if requested not in TEMPLATE_NAMES:
            raise VicunaError(unknown_template(requested))
        if requested == "hf" and not has_chat_template:
            raise VicunaError("--conv-template hf: this model's tokenizer has no chat template")
        return requested
    if has_chat_template:
        return "hf"
    name = model_name.lower().rsplit("/", 1)[-1]  # a Hub repository's name, not its owner's
    if "vicuna" in name and _has_word(name, "v0"):
        return "vicuna_v0"
    if _has_word(name, "llama[-_]?2") and _has_word(name, "chat"):  # Llama-2-7b-chat-hf, llama2_7b_chat
        return "llama-2"
    # A Llama 3 tokenizer without its chat template (an old conversion, a GGUF file without one): with
    # vicuna_v1.1, replies stopped only at a `</s>` that Llama 3 never writes.
    if {"<|start_header_id|>", "<|eot_id|>"} <= set(special_tokens) or (
        _has_word(name, r"llama[-_]?3(\.[0-9])?") and _has_word(name, "instruct")
    ):
        return "llama-3"
    return DEFAULT_TEMPLATE


def _has_word(name: str, word: str) -> bool:
    """Whether `word` (a regex) stands in a model's name as a word of its own, between separators: as a
    substring `v0` was found in a Vicuna v1.5 fine-tune's `-v0.1` (and in `rev0`), which then got
    Vicuna v0's template. A dot and a digit after it are a longer version (`v0.1`), not this one."""
    return re.search(rf"(?<![a-z0-9]){word}(?![a-z0-9]|\.[0-9])", name) is not None


def parse_messages(data: object, source: str = "messages") -> list[Message]:
    """OpenAI-style messages (`[{"role": ..., "content": ...}]`) with errors that name the bad field.

    `content` may be a string or a list of text parts (`{"type": "text", "text": ...}`), which are
    joined by line breaks (as vLLM joins them): glued, the last word of one part and the first of
    the next ran into one word.
    """
    if not isinstance(data, list) or not data:
        raise MessagesError(f"{source}: expected a non-empty JSON list of messages", source)
    out = []
    for i, item in enumerate(data):
        where = f"{source}[{i}]"
        if not isinstance(item, dict):
            raise MessagesError(f"{where}: expected an object with 'role' and 'content'", where)
        role = item.get("role")
        if role not in ROLES:
            raise MessagesError(
                f"{where}.role: expected one of {', '.join(ROLES)}, got {role!r}", f"{where}.role"
            )
        for key in ("tool_calls", "function_call"):  # null or [] ask for nothing
            if item.get(key):  # dropped, the turn read as if the assistant had only said its content
                raise MessagesError(
                    f"{where}.{key}: tool calling is not supported (a message can hold only text)",
                    f"{where}.{key}",
                )
        content = item.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":  # say which: an image part and a malformed one read alike
                    what = f"a part of type {kind!r}" if isinstance(kind, str) else "an object with a 'type'"
                    raise MessagesError(f"{at}: only text parts are supported, not {what}", at)
                if not isinstance(part.get("text"), str):
                    raise MessagesError(f"{at}.text: expected a string", f"{at}.text")
                parts.append(part["text"])
            content = "\n".join(parts)
        if not isinstance(content, str):
            raise MessagesError(
                f"{where}.content: expected a string or a list of text parts", f"{where}.content"
            )
        out.append(Message(role, content))
    return out


# --- `vicuna template list | render` -------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vicuna.config import utf8_text  # config imports this module

    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="list the templates with their stop strings")
    p = sub.add_parser("render", help="print the exact prompt for the next assistant reply")
    p.add_argument("name", choices=TEMPLATE_NAMES, help="the template (hf: the --model-path model's own)")
    p.add_argument("--messages", required=True, type=Path, help="a JSON file of OpenAI-style messages")
    p.add_argument("--conv-system-msg", type=utf8_text, help="replace the template's system prompt")
    p.add_argument("--model-path", help="for `hf`: the model whose tokenizer holds the chat template")


def main(args: argparse.Namespace) -> int:
    if args.action == "list":
        for name, template in BUILTIN_TEMPLATES.items():
            print(f"{name:12} stop={list(template.stop)}")
        print(f"{'hf':12} the model's own chat template (from its tokenizer)")
        return 0
    from vicuna.textfile import read_json

    messages = parse_messages(read_json(args.messages), source=str(args.messages))
    if args.name == "hf":
        from vicuna.engine.loader import load_tokenizer, template_for

        tokenizer = load_tokenizer(args.model_path)
        if not getattr(tokenizer, "chat_template", None):  # said as the messages' fault, by transformers
            raise VicunaError(
                f"{args.model_path}: its tokenizer has no chat template for `hf` to render; choose one of "
                "the others (`vicuna template list`)"
            )
        template = template_for("hf", tokenizer)
    else:
        template = get_template(args.name)
    print(render(with_system(template, args.conv_system_msg), messages), end="")
    return 0
