"""The terminal chat: commands, history, context trimming, Ctrl-C, and the piped mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vicuna.chat import fit_history, run_chat
from vicuna.config import ModelSettings, SamplingParams
from vicuna.conversation import Message
from vicuna.engine.events import Finished, TextChunk
from vicuna.engine.loader import load_engine


class ScriptedIO:
    """Feeds lines as the user; records what was shown."""

    def __init__(self, lines, interrupt_on=None):
        self.lines, self.shown, self.notes, self.interrupt_on = list(lines), [], [], interrupt_on

    def read(self):
        return self.lines.pop(0) if self.lines else None

    def info(self, text):
        self.notes.append(text)

    def show_reply(self, events):
        text, done = "", None
        for i, event in enumerate(events):
            if self.interrupt_on is not None and i == self.interrupt_on:
                raise KeyboardInterrupt
            if isinstance(event, TextChunk):
                text += event.text
            else:
                done = event
        self.shown.append(text)
        return text, done


class EchoEngine:
    """Replies with how many messages it was given, so the history is visible in the replies."""

    context_window = 60

    def __init__(self):
        self.seen = []

    def encode_chat(self, messages):
        return [0] * sum(len(m.content.split()) + 2 for m in messages)

    def chat(self, messages, params, cancel=None):
        self.seen.append(list(messages))
        reply = f"reply to {len(messages)} messages"
        for word in reply.split(" "):
            if cancel is not None and cancel.is_set():
                break
            yield TextChunk(word + " ", (1,))
        yield Finished("stop", 1, 1, 0.1, 10.0, 0.2)


PARAMS = SamplingParams(max_new_tokens=10)


def test_history_commands(tmp_path):
    saved = tmp_path / "conv.json"
    engine = EchoEngine()
    io = ScriptedIO(
        [
            "hi",
            "again",
            "!!remove",
            "again",
            "!!regen",
            f"!!save {saved}",
            "!!reset",
            "fresh",
            f"!!load {saved}",
            "more",
            "!!exit",
            "never read",
        ]
    )
    run_chat(engine, io, PARAMS)
    assert [len(m) for m in engine.seen] == [1, 3, 3, 3, 1, 5]
    assert engine.seen[3] == engine.seen[2]  # !!regen asks again for the same reply
    assert [m["role"] for m in json.loads(saved.read_text())] == ["user", "assistant"] * 2
    assert io.lines == ["never read"]


def test_no_history_sends_each_message_alone():
    engine = EchoEngine()
    run_chat(engine, ScriptedIO(["a", "b", "c"]), PARAMS, history=False)
    assert [len(m) for m in engine.seen] == [1, 1, 1]


def test_oldest_turns_are_dropped_to_fit_with_a_notice():
    engine = EchoEngine()
    long = "word " * 15
    io = ScriptedIO([long, long, long])
    run_chat(engine, io, PARAMS)
    assert any("dropped the" in n for n in io.notes)
    assert all(
        len(engine.encode_chat(m)) + PARAMS.max_new_tokens <= engine.context_window for m in engine.seen
    )
    kept, dropped = fit_history(engine, [Message("system", "s")] + engine.seen[-1], PARAMS.max_new_tokens)
    assert kept[0].role == "system" and dropped == 0


def test_ctrl_c_stops_the_reply_not_the_chat():
    engine = EchoEngine()
    io = ScriptedIO(["first", "second"], interrupt_on=2)
    run_chat(engine, io, PARAMS)
    assert len(engine.seen) == 2  # the chat went on to the second message
    assert any("reply stopped" in n for n in io.notes)


def test_tiny_model_chat_with_real_engine(tiny_llama_dir):
    engine = load_engine(ModelSettings(model_path=str(tiny_llama_dir), dtype="float32"), progress=False)
    io = ScriptedIO(["Hello!", "你好"])
    run_chat(engine, io, SamplingParams(temperature=0, max_new_tokens=6), debug=True)
    assert len(io.shown) == 2  # a random model writes random bytes: no check on the text
    assert any("tok/s" in n for n in io.notes)


@pytest.mark.slow
def test_piped_chat_with_the_builtin_model():
    proc = subprocess.run(
        [sys.executable, "-m", "vicuna", "chat", "--temperature", "0", "--max-new-tokens", "40"],
        input="What is the capital of France? Answer in one sentence.\n",
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "The capital of France is Paris."


def test_out_of_memory_leaves_the_message_unanswered_and_the_chat_goes_on(monkeypatch):
    import torch

    class OutOfMemoryOnce(EchoEngine):
        def chat(self, messages, params, cancel=None):
            if not self.seen:
                self.seen.append(list(messages))
                yield TextChunk("half ", (1,))
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            yield from super().chat(messages, params, cancel)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    engine, io = OutOfMemoryOnce(), ScriptedIO(["a long question", "a short one"])
    run_chat(engine, io, PARAMS)
    assert any("out of memory" in n and "--load-8bit" in n for n in io.notes)
    assert [m.content for m in engine.seen[1]] == ["a short one"]  # the unanswered message was dropped
    assert io.shown == ["reply to 1 messages "]
