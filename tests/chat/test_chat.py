"""The terminal chat: commands, history, context trimming, Ctrl-C, and the piped mode."""

from __future__ import annotations

import io as io_module
import json
import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest

from vicuna import chat as chat_module
from vicuna.chat import COMMANDS, END_MARK, HELP, TerminalIO, finished_blocks, run_chat, trimmed
from vicuna.cli import main as cli
from vicuna.config import ModelSettings, SamplingParams
from vicuna.conversation import Message, fit_history
from vicuna.engine.events import Finished, TextChunk
from vicuna.engine.loader import load_engine
from vicuna.errors import ContextTooLongError, VicunaError


class ScriptedIO:
    """Feeds lines as the user; records what was shown. `interrupt_on`: Ctrl-C at that event of each reply;
    `stopped_reply`: Ctrl-C before the first word of that reply (1: the first)."""

    interactive = True

    def __init__(self, lines, interrupt_on=None, stopped_reply=None):
        self.lines, self.shown, self.notes, self.interrupt_on = list(lines), [], [], interrupt_on
        self.stopped_reply, self.replies = stopped_reply, 0

    def read(self):
        return self.lines.pop(0) if self.lines else None

    def info(self, text):
        self.notes.append(text)

    def no_reply(self):
        self.shown.append(None)

    def show_reply(self, events):
        self.replies += 1
        if self.replies == self.stopped_reply:
            raise KeyboardInterrupt
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


def test_commands_typed_with_a_chinese_input_method_are_commands(tmp_path):
    """In its Chinese mode an input method types "！！" (full width) and, in full-width mode, full-width
    letters and an ideographic space: "！！exit" went to the model as a message, as did every command."""
    saved = tmp_path / "对话.json"
    engine = EchoEngine()
    io = ScriptedIO(
        ["你好", f"！！save\u3000{saved}", "！！regen", "！！exti", "！！好", "！！ｅｘｉｔ", "never read"]
    )
    run_chat(engine, io, PARAMS)
    assert [m["content"] for m in json.loads(saved.read_text(encoding="utf-8"))] == [
        "你好",
        "reply to 1 messages",
    ]
    assert [len(m) for m in engine.seen] == [1, 1, 3]  # the message, !!regen, then "！！好" is a message
    assert any(note.startswith("unknown command !!exti") for note in io.notes)
    assert io.lines == ["never read"]


def test_an_unknown_command_is_refused_with_the_list_not_sent_to_the_model():
    engine = EchoEngine()
    io = ScriptedIO(["!!rest", "!!help", "!!! wow", "hi"])
    run_chat(engine, io, PARAMS)
    assert io.notes == [f"unknown command !!rest. {HELP}", COMMANDS]
    # !!help says what each command does, where the line the chat begins with only names them
    named = {word.rstrip(".") for word in HELP.split() if word.startswith("!!")}
    assert {line.split()[0] for line in COMMANDS.splitlines() if line.startswith("!!")} == named
    assert [m[-1].content for m in engine.seen] == ["!!! wow", "hi"]


def test_commands_that_cannot_be_done_and_a_message_that_is_not_text_are_said_not_sent():
    """!!regen before any message, !!save and !!load without a file, and a line read from Latin-1 bytes (a
    terminal set to ISO-8859-1: surrogate escapes that no tokenizer takes, nor GBK) each get a note, and
    the chat goes on to the next message."""
    engine = EchoEngine()
    latin1 = "café au lait".encode("latin-1").decode("utf-8", "surrogateescape")
    io = ScriptedIO(["!!regen", "!!save", "!!load  ", latin1, "hi"])
    run_chat(engine, io, PARAMS)
    assert io.notes == [
        "(nothing to regenerate)",
        "usage: !!save FILE",
        "usage: !!load FILE",
        "error: the message is not UTF-8 text: set the terminal to UTF-8, or convert what is piped in to UTF-8; "
        "this message goes unanswered",
    ]
    assert [m[-1].content for m in engine.seen] == ["hi"] and len(engine.seen[0]) == 1


def test_litgpt_s_way_out_of_its_chat_is_answered_with_the_commands_not_sent_to_the_model():
    """LitGPT's chat ends at !quit or !exit: typed here, it was sent to the model as a message."""
    engine = EchoEngine()
    io = ScriptedIO(["!quit", "!EXIT ", "!exit now", "!!exit", "never read"])
    run_chat(engine, io, PARAMS)
    assert io.notes == [f"unknown command !quit. {HELP}", f"unknown command !EXIT. {HELP}"]
    assert [m[-1].content for m in engine.seen] == ["!exit now"]  # a message that only begins so is one
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
    assert any("oldest exchange(s) left out of the prompt" in n for n in io.notes)
    assert all(
        len(engine.encode_chat(m)) + PARAMS.max_new_tokens <= engine.context_window for m in engine.seen
    )
    kept, dropped, _ = fit_history(
        engine.encode_chat, engine.context_window, [Message("system", "s")] + engine.seen[-1], 10
    )
    assert kept[0].role == "system" and dropped == 0


def test_exchanges_left_out_of_the_prompt_stay_in_the_conversation_that_is_saved(tmp_path):
    engine, saved = EchoEngine(), tmp_path / "long.json"
    words = [f"{i} " + "word " * 15 for i in range(5)]
    run_chat(engine, ScriptedIO([*words, "!!remove", f"!!save {saved}"]), PARAMS)
    # the prompts: what fits (18 tokens a message, 6 a reply, 50 left by the reply); where it no longer
    # does, what takes at most 3/4 of that (37): the last message alone, and then its reply and the next
    assert [[m.content.split()[0] for m in prompt] for prompt in engine.seen] == [
        ["0"],
        ["0", "reply", "1"],
        ["2"],
        ["2", "reply", "3"],
        ["4"],
    ]
    users = [m["content"] for m in json.loads(saved.read_text()) if m["role"] == "user"]
    assert users == words[:4]  # the whole conversation, less the exchange removed


class SystemEchoEngine(EchoEngine):
    context_window = 200  # a message of 3 words is 5 tokens; a reply, 6


def test_exchanges_left_out_stay_out_so_that_each_prompt_begins_with_the_last_one(tmp_path):
    """The engine reuses the cache of the last prompt and reply where the next prompt begins with them:
    leaving out one more exchange on each turn, every prompt would be computed whole."""
    engine = SystemEchoEngine()
    system = write_messages(tmp_path / "system.json", ("system", "be brief"), ("user", "hi"))
    run_chat(
        engine, ScriptedIO([f"!!load {system}", "!!regen", *(f"{i} more words" for i in range(40))]), PARAMS
    )
    prompts = engine.seen
    assert all(p[0] == Message("system", "be brief") for p in prompts)  # never left out
    assert all(len(engine.encode_chat(p)) + PARAMS.max_new_tokens <= engine.context_window for p in prompts)
    # the prompts that do not begin with the last one and its reply: where more exchanges were left out
    anew = [i for i in range(1, len(prompts)) if prompts[i][: len(prompts[i - 1])] != prompts[i - 1]]
    assert len(anew) >= 3  # the conversation outgrew the window several times
    assert all(b - a >= 4 for a, b in pairwise(anew))  # and each time, the next prompts fit without more


def test_exchanges_left_out_are_said_when_more_go_not_before_every_reply():
    """Once a conversation outgrew the window, the same note came before every reply of the hours after."""
    engine, io = SystemEchoEngine(), ScriptedIO([f"{i} more words" for i in range(60)])
    run_chat(engine, io, PARAMS)
    said = [int(n.split()[1]) for n in io.notes if "left out of the prompt" in n]
    assert len(said) >= 3 and said == sorted(set(said))  # each time more go, and only then


def test_exchanges_left_out_are_not_said_again_after_a_reply_stopped_before_it_began():
    """Ctrl-C before the first word of the reply whose prompt left out exchanges kept the count of those
    left out as it was: the same note came again before the next message's reply."""
    engine = EchoEngine()
    io = ScriptedIO([f"{i} " + "word " * 15 for i in range(4)], stopped_reply=3)
    run_chat(engine, io, PARAMS)
    # the third prompt (its reply never drawn) and the fourth leave out the first two exchanges (see
    # the test above)
    assert [[m.content.split()[0] for m in prompt] for prompt in engine.seen] == [
        ["0"],
        ["0", "reply", "1"],
        ["3"],
    ]
    assert [n for n in io.notes if "left out of the prompt" in n] == [
        "(the 2 oldest exchange(s) left out of the prompt to fit the context window)"
    ]


def test_reset_and_load_start_again_with_no_exchange_left_out(tmp_path):
    engine = SystemEchoEngine()
    short = write_messages(tmp_path / "short.json", ("user", "a"), ("assistant", "b"), ("user", "c"))
    many = [f"{i} more words" for i in range(25)]  # outgrows the window: exchanges are left out
    few = [f"{i} more words" for i in range(8)]  # fits whole
    lines = [*many, f"!!load {short}", "!!regen", *few, *many, "!!reset", *few]
    run_chat(engine, ScriptedIO(lines), PARAMS)
    sent = [len(prompt) for prompt in engine.seen]
    assert sent[len(many) - 1] < 2 * len(many) - 1
    assert sent[len(many) + len(few)] == 3 + 2 * len(few)  # all of it, after !!load
    assert sent[-1] == 2 * len(few) - 1  # all of it, after !!reset


def test_ctrl_c_stops_the_reply_not_the_chat():
    engine = EchoEngine()
    io = ScriptedIO(["first", "second"], interrupt_on=2)
    run_chat(engine, io, PARAMS)
    assert len(engine.seen) == 2  # the chat went on to the second message
    assert any("reply stopped; what it wrote stays in the conversation" in n for n in io.notes)


def test_ctrl_c_ends_a_chat_whose_messages_are_piped_in():
    """`vicuna chat < questions.txt`: each Ctrl-C stopped a reply only, and the chat went on to the next
    message (saying "!!regen answers again"), however often it was pressed."""
    engine = EchoEngine()
    io = ScriptedIO(["first", "second"], interrupt_on=2)
    io.interactive = False
    with pytest.raises(KeyboardInterrupt):
        run_chat(engine, io, PARAMS)
    assert len(engine.seen) == 1 and io.lines == ["second"]


def test_a_reply_stopped_before_it_wrote_anything_leaves_the_conversation_as_it_was():
    """Ctrl-C before the first word kept an empty reply: sent to the model with every later prompt, and
    after !!regen it took the place of the reply that was there."""
    for second in ["!!regen", "a question taken back"]:
        engine = EchoEngine()
        io = ScriptedIO(["hi", second, "again"], stopped_reply=2)
        run_chat(engine, io, PARAMS)
        assert (
            "\n(reply stopped before it began; the conversation is as it was before the message)" in io.notes
        )
        assert [m.content for m in engine.seen[-1]] == ["hi", "reply to 1 messages", "again"]


class CtrlCIO(ScriptedIO):
    """Presses Ctrl-C (a SIGINT to this process, as the terminal sends it) at the second event of each reply."""

    def show_reply(self, events):
        import signal

        def pressing():
            for i, event in enumerate(events):
                if i == 1:
                    os.kill(os.getpid(), signal.SIGINT)
                yield event

        return super().show_reply(pressing())


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt here too, as at a terminal (a background job may have it ignored)."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_the_turn_after_ctrl_c_reuses_the_cache_of_the_stopped_reply(
    tiny_llama_dir, prefill_starts, ctrl_c_raises
):
    """Ctrl-C raised KeyboardInterrupt wherever the main thread was (most often inside the engine's step):
    the engine's reply ended with no cache to hand back, and the next message's prompt, the whole
    conversation again, was computed from its first token (minutes, for a long conversation on the CPU)."""
    engine = load_engine(ModelSettings(model_path=str(tiny_llama_dir), dtype="float32"), progress=False)
    io = CtrlCIO(["Tell me a story.", "And then?", "!!regen"])
    run_chat(engine, io, SamplingParams(temperature=0, max_new_tokens=40))
    assert sum("reply stopped" in n for n in io.notes) == 3
    assert len(prefill_starts) == 3 and all(start > 0 for start in prefill_starts[1:]), prefill_starts


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


def test_a_message_piped_in_gbk_is_refused_with_what_to_do_and_the_chat_goes_on(tiny_llama_dir):
    """A GBK file piped in (or a terminal set to GBK) sent bytes that are not UTF-8: the chat ended with a
    tokenizer's TypeError (or a UnicodeDecodeError in a strict locale) instead of saying what is wrong."""
    proc = subprocess.run(
        [sys.executable, "-m", "vicuna", "chat", "--model-path", str(tiny_llama_dir), "--dtype", "float32"]
        + ["--temperature", "0", "--max-new-tokens", "3", "--debug"],
        input="你好\n".encode("gbk") + "你好\n".encode(),
        capture_output=True,
        timeout=300,
        env=os.environ | {"PYTHONWARNINGS": "ignore"},
    )
    err = proc.stderr.decode()
    assert proc.returncode == 1, err  # the chat goes on, and then says that a message went unanswered
    assert "error: the message is not UTF-8 text; it reads as GBK" in err
    assert "iconv -f GB18030 -t UTF-8" in err and "this message goes unanswered" in err
    assert err.count("tok/s") == 1  # the UTF-8 line after it is answered


def chat_command(model_dir: Path) -> list[str]:
    """`vicuna chat` of a tiny model, run as a program."""
    return [sys.executable, "-m", "vicuna", "chat", "--model-path", str(model_dir), "--dtype", "float32"]


def test_a_chat_whose_standard_input_ends_before_a_first_message_says_so_and_ends_well(tiny_llama_dir):
    """`docker run IMAGE vicuna chat` (without -it) loaded the model and ended without a word. The same
    command pre-loads the model in an image build: it still ends with 0, the notice on stderr."""
    command = chat_command(tiny_llama_dir)
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    nothing = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, env=env
    )
    assert nothing.returncode == 0, nothing.stderr
    notice = "notice: no message: standard input ended before the first one (to chat, run it on a terminal"
    assert nothing.stderr.splitlines()[-1].startswith(notice) and nothing.stdout == ""
    empty_line = subprocess.run(command, input="\n", capture_output=True, text=True, timeout=300, env=env)
    assert empty_line.returncode == 0 and "notice: no message" not in empty_line.stderr  # a line was read


def test_a_piped_chat_that_left_a_message_unanswered_or_a_command_undone_exits_1_after_the_rest(
    tiny_llama_dir, tmp_path
):
    """`answers=$(vicuna chat < questions.txt)` under `set -e`: a message refused (too long, not UTF-8) or
    a `!!save` that wrote nothing was said on stderr, and the command still exited 0, so the script went on
    with an answer missing. Each is still said, the other messages are still answered, and the status is 1."""
    command = chat_command(tiny_llama_dir)
    command += ["--temperature", "0", "--max-new-tokens", "3", "--debug"]
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    unsaved = tmp_path / "no-such-folder" / "chat.json"
    lines = ["Hello", f"!!save {unsaved}", "!!exti", "Bye", f"!!save {tmp_path / 'chat.json'}", "!!help", ""]
    done = subprocess.run(
        command, input="\n".join(lines), capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert done.returncode == 1, done.stderr
    assert "error: cannot save to" in done.stderr and "unknown command !!exti" in done.stderr
    assert done.stderr.count("tok/s") == 2  # both messages answered, and the conversation saved after
    assert (tmp_path / "chat.json").is_file()
    # a blank line, and !!help, fail nothing
    done = subprocess.run(
        command, input="Hello\n\n!!help\n", capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr


def test_out_of_memory_leaves_the_message_unanswered_and_the_chat_goes_on(monkeypatch, gpu_out_of_memory):
    import torch

    class OutOfMemoryOnce(EchoEngine):
        def chat(self, messages, params, cancel=None):
            if not self.seen:
                self.seen.append(list(messages))
                yield TextChunk("half ", (1,))
                raise gpu_out_of_memory()
            yield from super().chat(messages, params, cancel)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    engine, io = OutOfMemoryOnce(), ScriptedIO(["a long question", "a short one"])
    run_chat(engine, io, PARAMS)
    assert any("out of memory" in n and "--load-8bit" in n for n in io.notes)
    assert [m.content for m in engine.seen[1]] == ["a short one"]  # the unanswered message was dropped
    assert io.shown == ["reply to 1 messages"]  # trailing whitespace is not shown


def write_messages(path, *roles_and_texts):
    path.write_text(json.dumps([{"role": r, "content": c} for r, c in roles_and_texts]), encoding="utf-8")
    return path


def test_save_keeps_the_system_prompt_of_conv_system_msg(tiny_llama_dir, tmp_path, monkeypatch):
    """The flag's system prompt lives in the template, not in the conversation: !!save wrote the messages
    alone, and a chat that loaded them without the flag had lost it (FastChat's !!save keeps it)."""
    saved, loaded = tmp_path / "pirate.json", tmp_path / "own.json"
    write_messages(loaded, ("system", "Be brief."), ("user", "hi"))
    lines = f"hi\n!!save {saved}\n!!load {loaded}\n!!save {loaded}\n"
    monkeypatch.setattr(sys, "stdin", io_module.StringIO(lines))
    flags = ["--model-path", str(tiny_llama_dir), "--dtype", "float32", "--max-new-tokens", "3"]
    assert cli(["chat", *flags, "--conv-system-msg", "You are a pirate."]) == 0
    assert json.loads(saved.read_text(encoding="utf-8"))[:2] == [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "hi"},
    ]
    assert json.loads(loaded.read_text(encoding="utf-8"))[0]["content"] == "Be brief."  # its own is kept
    engine = EchoEngine()
    run_chat(engine, ScriptedIO([f"!!load {saved}", "more"]), PARAMS)  # a chat without the flag
    assert engine.seen[0][0] == Message("system", "You are a pirate.")


def test_save_of_an_empty_conversation_writes_no_file_that_load_would_refuse(tmp_path):
    path = tmp_path / "empty.json"
    io = ScriptedIO([f"!!save {path}", "hi", "!!reset", f"!!save {path}"])
    run_chat(EchoEngine(), io, PARAMS)
    assert not path.exists()
    assert io.notes.count("(nothing to save yet: the conversation is empty)") == 2


def test_a_saved_conversation_is_readable_by_its_owner_only_and_one_saved_over_keeps_its_permissions(
    tmp_path,
):
    """!!save wrote a new file as the umask has it (0o644: readable by every user of a shared machine), and
    replaced one its owner had made private (chmod 600) with such a file, where the typed messages alone,
    in chat_history, are 0o600."""
    old = os.umask(0o022)  # a machine's usual
    try:
        new, private, shared = tmp_path / "new.json", tmp_path / "private.json", tmp_path / "shared.json"
        for path, mode in ((private, 0o600), (shared, 0o644)):
            path.write_text("[]", encoding="utf-8")
            path.chmod(mode)
        run_chat(
            EchoEngine(), ScriptedIO(["my secret", *(f"!!save {p}" for p in (new, private, shared))]), PARAMS
        )
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in (new, private, shared)} == {
        "new.json": 0o600,
        "private.json": 0o600,
        "shared.json": 0o644,  # one its owner shares stays shared
    }
    assert json.loads(private.read_text(encoding="utf-8"))[0]["content"] == "my secret"


def test_load_reads_a_conversation_saved_by_fastchat(tmp_path):
    """FastChat's !!save writes its template's fields, turns as [role name, text] pairs: vicuna refused
    them as "expected a non-empty JSON list of messages"."""
    vicuna, one_shot = tmp_path / "vicuna.json", tmp_path / "one_shot.json"
    system = "A chat between a curious user and an artificial intelligence assistant."
    vicuna.write_text(
        json.dumps(
            {
                "template_name": "vicuna_v1.1",
                "system_message": system,
                "roles": ["USER", "ASSISTANT"],
                "messages": [["USER", "Hello"], ["ASSISTANT", "Hi! How can I help?"]],
                "offset": 0,
            }
        )
    )
    one_shot.write_text(
        json.dumps(
            {
                "template_name": "one_shot",
                "system_message": "",
                "roles": ["Human", "Assistant"],
                "messages": [
                    ["Human", "example"],
                    ["Assistant", "answer"],
                    ["Human", "Hi"],
                    ["Assistant", None],
                ],
                "offset": 2,
            }
        )
    )
    engine = EchoEngine()
    io = ScriptedIO([f"!!load {vicuna}", "more", f"!!load {one_shot}", "!!regen"])
    run_chat(engine, io, PARAMS)
    assert engine.seen == [
        [Message("system", system), Message("user", "Hello"), Message("assistant", "Hi! How can I help?")]
        + [Message("user", "more")],
        [Message("user", "Hi")],  # the template's example turns are not the conversation
    ]


def test_load_reads_the_system_prompt_of_a_fastchat_file_from_before_mid_2023(tmp_path):
    # FastChat's Conversation named the field "system" before it was "system_message"
    old = tmp_path / "old.json"
    turns = [["USER", "Hello"], ["ASSISTANT", "Hi!"]]
    old.write_text(json.dumps({"system": "Be brief.", "roles": ["USER", "ASSISTANT"], "messages": turns}))
    engine = EchoEngine()
    run_chat(engine, ScriptedIO([f"!!load {old}", "more"]), PARAMS)
    assert engine.seen[0][0] == Message("system", "Be brief.")


def test_load_refuses_a_conversation_the_chat_cannot_continue_and_keeps_the_current_one(tmp_path):
    starts_with_reply = write_messages(tmp_path / "a.json", ("assistant", "Hi"), ("user", "Hello"))
    two_users = write_messages(tmp_path / "b.json", ("user", "a"), ("user", "b"))
    engine = EchoEngine()
    io = ScriptedIO(["first", f"!!load {starts_with_reply}", f"!!load {two_users}", "second"])
    run_chat(engine, io, PARAMS)
    assert [n for n in io.notes if n.startswith("error")] == [
        f"error: cannot load {starts_with_reply}: {starts_with_reply}[0]: expected a user message, got an "
        "assistant one (after an optional system message, user and assistant turns alternate); the "
        "conversation is unchanged",
        f"error: cannot load {two_users}: {two_users}[1]: expected an assistant message, got a user one "
        "(after an optional system message, user and assistant turns alternate); the conversation is "
        "unchanged",
    ]
    assert [m.content for m in engine.seen[1]] == ["first", "reply to 1 messages", "second"]


def test_a_loaded_conversation_ending_on_a_user_message(tmp_path):
    pending = write_messages(tmp_path / "c.json", ("system", "S"), ("user", "Hi"))
    engine = EchoEngine()
    run_chat(engine, ScriptedIO([f"!!load {pending}", "!!regen"]), PARAMS)
    assert engine.seen == [[Message("system", "S"), Message("user", "Hi")]]  # !!regen answers it

    engine, io = EchoEngine(), ScriptedIO([f"!!load {pending}", "more", "!!remove", "!!remove"])
    run_chat(engine, io, PARAMS)
    assert any("!!regen answers it" in n for n in io.notes)
    assert engine.seen == [[Message("system", "S"), Message("user", "Hi\n\nmore")]]  # one turn
    assert io.notes[-2:] == ["(last exchange removed)", "(nothing to remove)"]  # the system message stays


def test_an_error_in_one_message_leaves_it_unanswered_and_the_chat_goes_on():
    class Refusing(EchoEngine):
        def encode_chat(self, messages):
            if any("bad" in m.content for m in messages):
                raise VicunaError("messages[0]: the template refuses this")
            return super().encode_chat(messages)

    engine, io = Refusing(), ScriptedIO(["hi", "bad one", "!!regen", "again"])
    run_chat(engine, io, PARAMS)
    assert "error: messages[0]: the template refuses this; this message goes unanswered" in io.notes
    assert [len(m) for m in engine.seen] == [1, 1, 3]  # hi, !!regen of hi, again after hi's reply
    assert [m.content for m in engine.seen[-1]] == ["hi", "reply to 1 messages", "again"]


def test_too_long_a_message_is_refused_and_the_history_is_kept():
    class Strict(EchoEngine):
        def chat(self, messages, params, cancel=None):
            prompt = len(self.encode_chat(messages))
            if prompt + params.max_new_tokens > self.context_window:
                raise ContextTooLongError(prompt, params.max_new_tokens, self.context_window)
            return super().chat(messages, params, cancel)

    engine, io = Strict(), ScriptedIO(["hi", "word " * 60, "again"])
    run_chat(engine, io, PARAMS)
    assert io.notes == [
        "error: the message makes a prompt of 62 tokens, which leaves no room for a reply in the model's "
        "context window of 60 tokens: shorten it; this message goes unanswered"
    ]  # no note that "hi" was left out of a prompt: none was sent, and the next one keeps it
    assert [m.content for m in engine.seen[-1]] == ["hi", "reply to 1 messages", "again"]


def test_a_loaded_message_too_long_to_answer_is_refused_with_what_drops_it(tmp_path):
    """A loaded conversation ending on a user message too long for the window: each new message joined it
    and was refused with "shorten it", which no shorter message could do, and !!regen was refused so too."""
    long = write_messages(tmp_path / "long.json", ("user", "word " * 60))
    engine, io = EchoEngine(), ScriptedIO([f"!!load {long}", "hi", "!!regen", "!!remove", "hi"])
    run_chat(engine, io, PARAMS)
    errors = [n for n in io.notes if n.startswith("error")]
    assert errors == [
        "error: the message makes a prompt of 63 tokens, which leaves no room for a reply in the model's "
        "context window of 60 tokens: it joins the unanswered message that ends the loaded conversation, "
        "which !!remove drops; this message goes unanswered",
        "error: the message makes a prompt of 62 tokens, which leaves no room for a reply in the model's "
        "context window of 60 tokens: !!remove drops it; this message goes unanswered",
    ]
    assert engine.seen == [[Message("user", "hi")]]  # answered once the loaded message is dropped


def test_a_message_that_leaves_less_room_than_max_new_tokens_is_answered_in_the_room_left():
    class Recording(EchoEngine):
        def chat(self, messages, params, cancel=None):
            self.params = params
            return super().chat(messages, params, cancel)

    engine, io = Recording(), ScriptedIO(["hi", "word " * 52])  # 54 of the 60 tokens: room for 6
    run_chat(engine, io, PARAMS)
    assert [m.content for m in engine.seen[-1]] == ["word " * 52]  # the older exchange made room first
    assert engine.params.max_new_tokens == 6 and io.shown[-1] == "reply to 1 messages"
    assert (
        "(the message leaves room in the context window for a reply of 6 tokens, not --max-new-tokens 10)"
        in (io.notes)
    )


class SpacedEngine(EchoEngine):
    """Replies as a byte-level BPE model does after "ASSISTANT:": a leading space, and a newline at the end."""

    def chat(self, messages, params, cancel=None):
        self.seen.append(list(messages))
        for text in ["", " ", " The", " capital", " \n", "is", " Paris.", "\n", " "]:
            yield TextChunk(text, (1,))
        yield Finished("stop", 1, 1, 0.1, 10.0, 0.2)


def test_replies_are_shown_and_kept_without_surrounding_whitespace():
    engine, io = SpacedEngine(), ScriptedIO(["Capital of France?", "Sure?"])
    run_chat(engine, io, PARAMS)
    assert io.shown == ["The capital \nis Paris."] * 2
    assert engine.seen[1][1] == Message("assistant", "The capital \nis Paris.")


def test_rich_shows_a_reply_longer_than_the_screen_as_it_streams():
    """rich's Live redraws only a screenful, cut with "..." until the reply ends; the blocks that are done
    are printed for good, so the reply goes on down the screen as it streams."""
    from rich.console import Console

    screen = io_module.StringIO()
    terminal = TerminalIO("rich", multiline=False, interactive=True)
    terminal.console = Console(file=screen, force_terminal=True, width=40, height=10)
    paragraphs = [f"Paragraph {i} of the reply." for i in range(30)]
    seen_before_the_end = []

    def events():
        for i, paragraph in enumerate(paragraphs):
            yield TextChunk(("\n\n" if i else "") + paragraph, (1,))
        seen_before_the_end.append(screen.getvalue())
        yield Finished("stop", 1, 1, 0.1, 10.0, 0.2)

    text, done = terminal.show_reply(events())
    assert text == "\n\n".join(paragraphs) and done is not None
    assert all(p in seen_before_the_end[0] for p in paragraphs[:-1])
    assert paragraphs[-1] in screen.getvalue()


def test_rich_says_whose_reply_it_is_as_the_plain_style_does():
    """A screen reader or a braille display tells the turns apart by their labels: the plain style writes
    "ASSISTANT: " before a reply, and rich wrote the rendered reply alone under the "USER: " line."""
    from rich.console import Console

    screen = io_module.StringIO()
    terminal = TerminalIO("rich", multiline=False, interactive=True)
    terminal.console = Console(file=screen, force_terminal=True, color_system=None, width=40, height=10)
    events = [TextChunk("**Hi** there.", (1,)), Finished("stop", 1, 1, 0.1, 10.0, 0.2)]
    assert terminal.show_reply(iter(events))[0] == "**Hi** there."
    assert [line for line in screen_after(screen.getvalue()) if line] == ["ASSISTANT:", "Hi there."]


def test_rich_shows_bold_beside_chinese_punctuation_as_bold_not_asterisks():
    """CommonMark leaves `**注意：**这是` as it is (its end follows punctuation and precedes a letter), and
    Chinese replies write it all the time: rich mode showed the asterisks and nothing bold."""
    from rich.console import Console

    from vicuna.chat import markdown_rows

    console = Console(width=60, force_terminal=True, color_system="standard")

    def shown(text):
        segments = [s for row in markdown_rows(console, text) for s in row]
        bold = [s.text for s in segments if s.style and s.style.bold]
        return "".join(s.text for s in segments).rstrip(), bold

    assert shown("**注意：**这是一个测试。") == ("注意：这是一个测试。", ["注意："])
    assert shown("前面**“引用”**后面") == ("前面“引用”后面", ["“引用”"])
    assert shown("1. **第一步：**安装依赖")[1] == ["第一步："]
    assert shown("中文 ** 空格 **") == ("中文 ** 空格 **", [])  # white space beside them: no emphasis
    assert shown("**bold**text, a ** b") == ("boldtext, a ** b", ["bold"])  # English as before


def screen_after(output: str) -> list[str]:
    """The lines a terminal (with endless scrollback) shows after `output` from rich without colours: text,
    newlines, carriage returns, and Live's cursor-up, erase-line and cursor show/hide."""
    import re

    lines, row, col = [""], 0, 0
    for piece in re.split(r"(\x1b\[\?25[lh]|\x1b\[2K|\x1b\[1A|\r|\n)", output):
        if piece == "\n":
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        elif piece == "\r":
            col = 0
        elif piece == "\x1b[2K":
            lines[row] = ""
        elif piece == "\x1b[1A":
            row = max(0, row - 1)
        elif piece and not piece.startswith("\x1b"):
            assert "\x1b" not in piece, piece
            lines[row] = lines[row][:col].ljust(col) + piece + lines[row][col + len(piece) :]
            col += len(piece)
    return [line.rstrip() for line in lines]


@pytest.mark.parametrize("as_the_chat_sends_it", [False, True])
def test_rich_shows_a_code_block_taller_than_the_screen_as_it_streams(as_the_chat_sends_it, monkeypatch):
    """Live crops what is taller than the screen: the rows of an open code block that go past its top are
    printed for good, and the block ends up drawn as a whole, row for row. The chat sends a reply a token
    or so at a time through `trimmed`, so a newline comes with the first token of the next line: when the
    block was two rows shorter than the screen, that line was printed for good as far as it had come, and
    its rest never shown."""
    import re

    from rich.console import Console
    from rich.markdown import Markdown

    monkeypatch.setattr(chat_module, "CODE_ROWS_EVERY_S", 0)  # at each line: the lines come at once here
    screen = io_module.StringIO()
    terminal = TerminalIO("rich", multiline=False, interactive=True)
    terminal.console = Console(file=screen, force_terminal=True, color_system=None, width=40, height=10)
    code = "```python\n" + "".join(f"x_{i} = {i}  # row {i}\n" for i in range(30)) + "```\n"
    reply = "Here it is:\n\n" + code + "\nDone."
    seen_before_the_close = []

    def events():
        pieces = re.findall(r"\n|[^\S\n]*\S+", reply) if as_the_chat_sends_it else reply.splitlines(True)
        for piece in pieces:
            if piece.startswith("```") and piece.strip() == "```":
                seen_before_the_close.append(screen.getvalue())
            yield TextChunk(piece, (1,))
        yield Finished("stop", 1, 1, 0.1, 10.0, 0.2)

    sent = trimmed(events()) if as_the_chat_sends_it else events()
    assert terminal.show_reply(sent)[0] == reply
    assert "x_20 = 20" in seen_before_the_close[0]  # the last screenful waits for a redraw
    block = Console(width=40, color_system=None).render_lines(Markdown(code), pad=False)
    block = ["".join(segment.text for segment in row).rstrip() for row in block]
    shown = screen_after(screen.getvalue())
    start = shown.index(block[1])  # the first row is the block's blank top padding
    assert shown[start - 1 : start - 1 + len(block)] == block
    assert shown.count(block[1]) == 1 and [line for line in shown if line][-1] == "Done."


def test_rich_prints_rows_for_good_however_slowly_the_print_is_written(monkeypatch):
    """Live's own refresh thread redrew the block still streaming between a print's cursor move and its
    write (on a busy machine), and the print's cursor move, made for what had been drawn before, then
    erased rows printed for good: a print slower than Live's redraw period brings that about here."""
    import threading
    import time

    from rich.console import Console
    from rich.live import Live
    from rich.markdown import Markdown

    monkeypatch.setattr(chat_module, "CODE_ROWS_EVERY_S", 0)
    process = Live.process_renderables

    def slow_print(live, renderables):
        renderables = process(live, renderables)
        if threading.current_thread() is threading.main_thread() and any(
            isinstance(r, chat_module.Rows) for r in renderables
        ):
            time.sleep(0.2)  # the cursor is placed, the rows not yet written
        return renderables

    monkeypatch.setattr(Live, "process_renderables", slow_print)
    screen = io_module.StringIO()
    terminal = TerminalIO("rich", multiline=False, interactive=True)
    terminal.console = Console(file=screen, force_terminal=True, color_system=None, width=40, height=6)
    code = "```\n" + "".join(f"row {i}\n" for i in range(12)) + "```\n"
    reply = code + "\nDone."

    def events():
        for line in reply.splitlines(keepends=True):
            yield TextChunk(line, (1,))
        yield Finished("stop", 1, 1, 0.1, 10.0, 0.2)

    assert terminal.show_reply(events())[0] == reply
    block = Console(width=40, color_system=None).render_lines(Markdown(code), pad=False)
    block = ["".join(segment.text for segment in row).rstrip() for row in block]
    shown = screen_after(screen.getvalue())
    start = shown.index(block[1])
    assert shown[start - 1 : start - 1 + len(block)] == block and shown.count(block[1]) == 1
    assert [line for line in shown if line][-1] == "Done."


@pytest.mark.parametrize("closed", [True, False])
def test_rich_renders_an_open_code_block_at_most_every_quarter_second(monkeypatch, closed):
    """Each render of a whole code block holds the reply up (~40 ms for 150 lines): lines that come faster
    than CODE_ROWS_EVERY_S are not each rendered again, and the rows found late (or at the block's end, or
    the reply's) are still drawn, row for row. A line every 0.1 s on a clock of the test's own: a render
    every third line."""
    from types import SimpleNamespace

    from rich.console import Console
    from rich.markdown import Markdown

    ticks = [0]
    monkeypatch.setattr(chat_module, "time", SimpleNamespace(monotonic=lambda: ticks[0] / 10))
    renders = []  # the chat's own renders of the open block (Live's redraws pass their options)
    render = chat_module.markdown_rows
    monkeypatch.setattr(
        chat_module, "markdown_rows", lambda *a: (len(a) == 2 and renders.append(a)) or render(*a)
    )
    screen = io_module.StringIO()
    terminal = TerminalIO("rich", multiline=False, interactive=True)
    terminal.console = Console(file=screen, force_terminal=True, color_system=None, width=40, height=10)
    code = "```\n" + "".join(f"row {i}\n" for i in range(100))
    reply = code + "```\n\nDone." if closed else code.rstrip("\n")

    def events():
        for line in reply.splitlines(keepends=True):
            ticks[0] += 1
            yield TextChunk(line, (1,))
        yield Finished("stop", 1, 1, 0.1, 10.0, 0.2)

    assert terminal.show_reply(events())[0] == reply
    open_renders = [a for a in renders if not a[1].endswith("```\n\n")]  # the block's end prints the rest
    assert len(open_renders) == len(range(0, 100, 3))
    block = Console(width=40, color_system=None).render_lines(Markdown(reply.split("\n\n")[0]), pad=False)
    block = ["".join(segment.text for segment in row).rstrip() for row in block]
    shown = screen_after(screen.getvalue())
    start = shown.index(block[1])  # the first row is the block's blank top padding
    assert shown[start - 1 : start - 1 + len(block)] == block and shown.count(block[1]) == 1


def test_a_markdown_block_is_done_at_a_blank_line_outside_code_and_lists():
    assert finished_blocks("Intro.\n\n```python\ndef f():\n\n    return 1\n") == len("Intro.\n\n")
    assert finished_blocks("Intro.\n\n```\nx\n\ny\n```\n\nAfter") == len("Intro.\n\n```\nx\n\ny\n```\n\n")
    assert finished_blocks("1. One\n\n   more of one\n\n2") == len("1. One\n\n   more of one\n\n")
    assert finished_blocks("Intro.\n\n") == 0  # what comes next may still belong to it


def test_windows_line_ends_are_not_part_of_the_message(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io_module.StringIO("Hello\r\n"))
    assert TerminalIO("simple", multiline=False, interactive=False).read() == "Hello"
    monkeypatch.setattr(sys, "stdin", io_module.StringIO(f"a\r\nb\r\n{END_MARK}\r\n"))
    assert TerminalIO("programmatic", multiline=False, interactive=False).read() == "a\nb"


def test_programmatic_style_ends_a_reply_to_every_message_even_one_left_unanswered(monkeypatch, capsys):
    """A script sends a message and reads up to the end mark: for a message the chat left unanswered (too
    long, refused by the template, empty) no mark came, and the script waited for ever."""

    class Refusing(EchoEngine):
        def encode_chat(self, messages):
            if any("bad" in m.content for m in messages):
                raise VicunaError("messages[0]: the template refuses this")
            return super().encode_chat(messages)

    sent = ["hi", "a bad one", "", "!!remove", "again"]
    monkeypatch.setattr(sys, "stdin", io_module.StringIO("".join(f"{m}\n{END_MARK}\n" for m in sent)))
    run_chat(Refusing(), TerminalIO("programmatic", multiline=False, interactive=False), PARAMS)
    out, err = capsys.readouterr()
    replies = out.split(f"{END_MARK}\n")
    assert [r.strip() for r in replies] == ["reply to 1 messages", "", "", "reply to 1 messages", ""]
    assert (
        "the template refuses this; this message goes unanswered" in err and "(last exchange removed)" in err
    )


def test_fastchat_s_programmatic_end_of_message_is_refused_with_ours_not_waited_past(monkeypatch):
    # a script written for fastchat.serve.cli --style programmatic: the message went on to the next line
    # and the script waited for a reply; piped at once, the marker went to the model as text
    monkeypatch.setattr(sys, "stdin", io_module.StringIO("你好 __END_OF_A_MESSAGE_47582648__\nnext\n"))
    with pytest.raises(VicunaError, match=f"here a message ends with a line {END_MARK}"):
        TerminalIO("programmatic", multiline=False, interactive=False).read()


@pytest.mark.parametrize("style", ["simple", "programmatic"])
def test_the_byte_order_mark_of_a_file_piped_in_is_not_part_of_the_first_message(monkeypatch, style):
    """Notepad's "UTF-8 with BOM" begins the file with U+FEFF: it went to the model with the first message,
    and a first line '!!load FILE' was a message, not the command."""
    end = f"\n{END_MARK}\n" if style == "programmatic" else "\n"
    monkeypatch.setattr(sys, "stdin", io_module.StringIO(f"\ufeff!!load 对话.json{end}你好{end}"))
    io = TerminalIO(style, multiline=False, interactive=False)
    assert [io.read(), io.read()] == ["!!load 对话.json", "你好"]


def test_max_new_tokens_beyond_the_context_window_is_refused_before_loading(
    tiny_llama_dir, monkeypatch, capsys
):
    import vicuna.engine.loader

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(vicuna.engine.loader, "load_engine", never)
    assert cli(["chat", "--model-path", str(tiny_llama_dir), "--max-new-tokens", "20000"]) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens 20000" in err and "context window of 256 tokens" in err
    assert cli(["chat", "--model-path", str(tiny_llama_dir), "--max-new-tokens", "0"]) == 2  # no reply at all
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err
    # -5 was told "max_new_tokens must be >= 0", and 0 then refused as above
    assert cli(["chat", "--model-path", str(tiny_llama_dir), "--max-new-tokens", "-5"]) == 2
    assert capsys.readouterr().err == "error: --max-new-tokens must be at least 1, not -5\n"


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--temperature", "-1"], "--temperature must be at least 0, not -1"),
        (["--temperature", "nan"], "--temperature must be a number, not nan"),
        (["--temperature", "inf"], "--temperature must be a finite number, not inf"),
        (["--top-p", "-0.5"], "--top-p must be at least 0 and at most 1, not -0.5"),
        (["--top-p", "1.5"], "--top-p must be at least 0 and at most 1, not 1.5"),
        (["--top-k", "-3"], "--top-k must be at least 0, not -3"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be more than 0, not 0"),
        (["--repetition-penalty", "nan"], "--repetition-penalty must be a number, not nan"),
    ],
)
def test_a_bad_sampling_flag_is_refused_naming_the_flag_and_its_value(flags, said, monkeypatch, capsys):
    """SamplingParams' messages name the API's fields ("temperature must be >= 0"), which a chat user
    never typed, and gave nan the same message as -1."""
    import vicuna.engine.loader

    def never(*args, **kwargs):
        raise AssertionError("the model was looked at")

    monkeypatch.setattr(vicuna.engine.loader, "resolve_model_path", never)
    assert cli(["chat", *flags]) == 2
    assert capsys.readouterr().err == f"error: {said}\n"


def test_a_chat_started_with_standard_input_closed_is_refused_before_loading(monkeypatch, capsys):
    """`vicuna chat <&-` (or a supervisor that closes it) loaded the model, then ended with a traceback:
    AttributeError: 'NoneType' object has no attribute 'isatty'."""
    import vicuna.engine.loader

    def never(*args, **kwargs):
        raise AssertionError("the model was looked at")

    monkeypatch.setattr(vicuna.engine.loader, "resolve_model_path", never)
    monkeypatch.setattr(sys, "stdin", None)  # what Python gives a program started with it closed
    assert cli(["chat"]) == 2
    assert capsys.readouterr().err.startswith("error: standard input is closed: the chat reads its messages")


def test_top_p_0_is_greedy_decoding_as_in_the_api(tiny_llama_dir, monkeypatch):
    """The API takes top_p 0 as greedy decoding (the smallest nucleus is the most likely token); the chat
    refused '--top-p 0' as "must be more than 0"."""
    import vicuna.engine.loader

    used = []
    monkeypatch.setattr(vicuna.engine.loader, "load_engine", lambda settings: EchoEngine())
    monkeypatch.setattr(chat_module, "run_chat", lambda engine, io, params, **kwargs: used.append(params))
    flags = ["--top-p", "0", "--temperature", "0.9", "--max-new-tokens", "20"]
    assert cli(["chat", "--model-path", str(tiny_llama_dir), *flags]) == 0
    assert (used[0].temperature, used[0].top_p) == (0.0, 1.0)


def test_max_new_tokens_not_given_fits_a_short_context_window(tiny_llama_dir, monkeypatch, capsys):
    """A plain `vicuna chat` of a model with a 256-token window was refused '--max-new-tokens 512 does not
    fit', a flag the user never typed: not given, it is 512 or half the window."""
    import vicuna.engine.loader

    used = []
    monkeypatch.setattr(vicuna.engine.loader, "load_engine", lambda settings: EchoEngine())
    monkeypatch.setattr(chat_module, "run_chat", lambda engine, io, params, **kwargs: used.append(params))
    assert cli(["chat", "--model-path", str(tiny_llama_dir)]) == 0, capsys.readouterr().err
    assert used[0].max_new_tokens == 128  # of 256
    assert cli(["chat", "--model-path", str(tiny_llama_dir), "--max-new-tokens", "200"]) == 0
    assert used[1].max_new_tokens == 200  # given: as typed
    assert chat_module.reply_budget(None, 4096) == 512


@pytest.mark.parametrize(("flag", "seed"), [("-1", None), ("7", 7)])
def test_seed_minus_one_is_a_new_seed_each_run(tiny_llama_dir, monkeypatch, flag, seed):
    # as llama.cpp's `-s -1` and the API's `seed: -1`: it was taken as a fixed seed
    import vicuna.engine.loader

    used = []
    monkeypatch.setattr(vicuna.engine.loader, "load_engine", lambda settings: EchoEngine())
    monkeypatch.setattr(chat_module, "run_chat", lambda engine, io, params, **kwargs: used.append(params))
    assert cli(["chat", "--model-path", str(tiny_llama_dir), "--seed", flag, "--max-new-tokens", "20"]) == 0
    assert used[0].seed == seed


def test_device_flags_are_refused_before_the_model_is_converted_or_read(monkeypatch, capsys):
    import vicuna.engine.loader

    def never(*args, **kwargs):
        raise AssertionError("the model was looked at")

    monkeypatch.setattr(vicuna.engine.loader, "resolve_model_path", never)
    assert cli(["chat", "--max-gpu-memory", "13"]) == 2
    assert "--max-gpu-memory: cannot read '13'" in capsys.readouterr().err


def test_load_reads_a_conversation_an_editor_saved_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "对话 记录.json"  # Windows Notepad saves UTF-8 with a BOM
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    path.write_text("\ufeff" + json.dumps(messages, ensure_ascii=False), encoding="utf-8")
    engine = EchoEngine()
    io = ScriptedIO([f"!!load {path}", "北京在哪里？"])
    run_chat(engine, io, PARAMS)
    assert f"(loaded 2 messages from {path})" in io.notes
    assert engine.seen[0] == [
        Message("user", "你好"),
        Message("assistant", "你好！"),
        Message("user", "北京在哪里？"),
    ]


def test_load_names_full_width_punctuation_in_a_hand_written_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('[{"role"："user", "content": "你好"}]', encoding="utf-8")
    io = ScriptedIO([f"!!load {path}"])
    run_chat(EchoEngine(), io, PARAMS)
    assert io.notes == [
        f"error: cannot load {path}: not valid JSON (Expecting ':' delimiter: line 1 column 9 (char 8): found "
        "the full-width '：' where JSON needs ':'); the conversation is unchanged"
    ]


def test_a_save_that_cannot_be_written_is_said_and_the_chat_goes_on(tmp_path):
    missing = tmp_path / "不存在" / "对话.json"
    engine = EchoEngine()
    io = ScriptedIO(
        ["你好", f"!!save {missing}", f"!!save {tmp_path}", "再见", f"!!save {tmp_path / 'ok.json'}"]
    )
    run_chat(engine, io, PARAMS)
    assert [n for n in io.notes if n.startswith("error")] == [
        f"error: cannot save to {missing}: No such file or directory; the conversation is unchanged",
        f"error: cannot save to {tmp_path}: Is a directory; the conversation is unchanged",
    ]
    saved = json.loads((tmp_path / "ok.json").read_text(encoding="utf-8"))
    assert [m["content"] for m in saved] == ["你好", "reply to 1 messages", "再见", "reply to 3 messages"]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_long_message_typed_or_pasted_in_a_terminal_arrives_whole():
    """A terminal's line discipline keeps at most 4095 bytes of a line (1365 Chinese characters) for a
    program that reads it line by line; the chat reads through readline, which has no such limit."""
    import os
    import pty
    import select
    import subprocess
    import sys

    message = "请总结：" + "中华人民共和国的历史悠久，文化灿烂。" * 300  # 16,000 bytes
    script = "from vicuna.chat import TerminalIO; print('got', len(TerminalIO('simple', False, True).read()))"
    master, slave = pty.openpty()
    child = subprocess.Popen([sys.executable, "-c", script], stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    try:
        while b"USER: " not in out:
            assert select.select([master], [], [], 60)[0], out
            out += os.read(master, 65536)
        os.write(master, message.encode() + b"\r")
        while b"got " not in out or b"\n" not in out.rpartition(b"got ")[2]:
            assert select.select([master], [], [], 60)[0], out[-200:]
            out += os.read(master, 65536)
    finally:
        child.kill()
        child.wait()
        os.close(master)
    assert out.rpartition(b"got ")[2].split()[0] == str(len(message)).encode()


class Pty:
    """A Python child on a pseudo-terminal, as a user at a terminal runs it: write keys, wait for text."""

    def __init__(self, script, env=None):
        import pty

        self.master, slave = pty.openpty()
        # Ctrl-C raises KeyboardInterrupt and a closed terminal's SIGHUP ends the chat, as at a terminal, also
        # where this test runs in the background (a shell without job control starts background jobs with
        # SIGINT ignored, nohup ignores SIGHUP, and a child keeps what it was given)
        script = (
            "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "signal.signal(signal.SIGHUP, signal.SIG_DFL)\n" + script
        )
        # a terminal emulator says what it is (readline takes a missing TERM for a dumb terminal)
        env = {"TERM": "xterm"} | dict(os.environ if env is None else env)
        self.child = subprocess.Popen(
            [sys.executable, "-c", script], stdin=slave, stdout=slave, stderr=slave, env=env
        )
        os.close(slave)
        self.out = b""

    def expect(self, text, timeout=60):
        import select

        while text.encode() not in self.out:
            assert select.select([self.master], [], [], timeout)[0], self.out[-300:]
            try:
                self.out += os.read(self.master, 65536)
            except OSError:  # the child has gone
                raise AssertionError(self.out[-300:]) from None
        found = self.out.index(text.encode()) + len(text)
        seen, self.out = self.out[:found], self.out[found:]
        return seen.decode(errors="replace")

    def write(self, keys):
        os.write(self.master, keys.encode())

    def end_with(self, sig) -> int:
        """Send `sig` until the child ends; its exit status. A signal that comes while Python's readline is
        still drawing the prompt is acted on only when the next one interrupts its wait (CPython's readline
        module), as a supervisor sends it again, or SIGKILL: one signal alone hung a busy machine's run."""
        for wait_s in (10, 10, 30):
            self.child.send_signal(sig)
            try:
                return self.child.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        raise AssertionError(f"signal {sig} sent three times did not end the chat")

    def close(self):
        self.child.kill()
        self.child.wait()
        os.close(self.master)


@pytest.fixture
def terminal():
    children = []

    def start(script, env=None):
        children.append(Pty(script, env))
        return children[-1]

    yield start
    for child in children:
        child.close()


READ_TWICE = (
    "from vicuna.chat import TerminalIO\n"
    "io = TerminalIO('simple', False, True)\n"
    "for _ in range(2):\n"
    "    print('got', repr(io.read()))\n"
)


def test_ctrl_c_at_the_prompt_drops_the_line_typed_and_the_chat_goes_on(terminal):
    import signal

    term = terminal(READ_TWICE)
    term.expect("USER: ")
    term.write("half a thought")
    term.expect("half a thought")
    term.child.send_signal(signal.SIGINT)  # what Ctrl-C does at a terminal
    try:
        seen = term.expect("USER: ", timeout=10)
    except AssertionError:
        # A signal that comes while Python's readline is still drawing the last key is acted on only when
        # the next one interrupts its wait (CPython's readline module); a user presses Ctrl-C again.
        term.child.send_signal(signal.SIGINT)
        seen = term.expect("USER: ")
    assert "(Ctrl-D or !!exit ends the chat)" in seen
    term.write("hello\r")
    assert "got 'hello'" in term.expect("USER: ")


def test_ctrl_d_on_a_line_of_its_own_ends_a_multiline_message_not_the_chat(terminal):
    """FastChat's --multiline ends a message with Ctrl-D on an empty line; here Ctrl-D there ended the chat,
    and the lines typed were lost."""
    term = terminal(READ_TWICE.replace("'simple', False", "'simple', True"))
    term.expect("USER: ")
    term.write("line one\r")
    term.expect("...: ")
    term.write("\tline two\r")
    term.expect("...: ")
    term.write("\x04")
    assert "got 'line one\\n\\tline two'" in term.expect("USER: ")
    term.write("\x04")  # on the first line, it still ends the chat
    term.expect("got None")


def test_the_up_arrow_recalls_a_multiline_message_whole(terminal, tmp_path):
    """readline kept each line typed with --multiline as an entry of its own: the up arrow recalled the
    message's last line alone, and its lines one by one after that."""
    pytest.importorskip("readline")
    term = terminal(
        READ_TWICE.replace("'simple', False", "'simple', True"),
        env=os.environ | {"VICUNA_HOME": str(tmp_path)},
    )
    term.expect("USER: ")
    term.write("first line\r")
    term.expect("...: ")
    term.write("second line\r")
    term.expect("...: ")
    term.write("\r")
    assert "got 'first line\\nsecond line'" in term.expect("USER: ")
    term.write("\x1b[A\r")  # the up arrow and Enter: the message recalled, then an empty line sends it
    term.expect("...: ")
    term.write("\r")
    term.expect("got ")
    assert term.expect("\n").strip() == "'first line\\nsecond line'"


def test_triple_quotes_type_a_message_of_several_lines_as_in_ollama(terminal):
    """ollama's chat takes a message of several lines between triple quotes: here the opening quotes went to
    the model as a message of their own, and each line typed after them as one more."""
    term = terminal(READ_TWICE)
    opened = term.expect("USER: ")
    for line in ['"""', "Fix this:", "", "    return 1", 'please."""']:
        term.write(line + "\r")
        term.expect("...: " if line != 'please."""' else "got ")
    assert term.expect("\n").strip() == "'Fix this:\\n\\n    return 1\\nplease.'"
    pasted = '"""A docstring."""\rimport os'  # pasted, it is the message as it is
    if "\x1b[?2004h" in opened:
        pasted = f"\x1b[200~{pasted}\x1b[201~"
    term.write(pasted + "\r")
    term.expect("got ")
    assert term.expect("\n").strip() == '\'"""A docstring."""\\nimport os\''


def test_sigterm_at_the_prompt_ends_the_chat_where_ctrl_c_drops_only_the_line(terminal, tiny_llama_dir):
    """`kill` (or a supervisor's stop) of a chat on a terminal: SIGTERM, raised as Ctrl-C is, was taken for
    Ctrl-C at the prompt; the chat said "(Ctrl-D or !!exit ends the chat)" and went on waiting."""
    import signal

    chat = ["chat", "--model-path", str(tiny_llama_dir), "--dtype", "float32", "--max-new-tokens", "8"]
    term = terminal(f"import sys; from vicuna.cli import main; sys.exit(main({chat!r}))")
    term.expect("USER: ")
    assert term.end_with(signal.SIGTERM) == 128 + signal.SIGTERM
    assert "interrupted" in term.expect("interrupted")


@pytest.mark.parametrize("lc_all", ["C", "zh_CN.UTF-8-not-generated"])
def test_chinese_typed_under_lc_all_c_or_a_missing_locale_is_read_and_edited(terminal, lc_all):
    """Under LC_ALL=C (a common cure for locale warnings), or an LC_ALL the system has not generated,
    readline took the bytes of Chinese for Meta keys: typing 你好 listed file names, the message was empty."""
    pytest.importorskip("readline")
    term = terminal(READ_TWICE, env=os.environ | {"LC_ALL": lc_all})
    term.expect("USER: ")
    term.write("你好吗\x7f")  # and a Backspace, which takes the whole last character
    term.expect("好")
    term.write("\r")
    assert "got '你好'" in term.expect("USER: ")


def test_lines_pasted_at_once_are_one_message(terminal):
    term = terminal(READ_TWICE)
    pasted = "Summarize this:\rThe cat sat.\rThe dog ran."
    if "\x1b[?2004h" in term.expect("USER: "):  # a program that asks for it gets a paste so marked
        pasted = f"\x1b[200~{pasted}\x1b[201~"
    term.write(pasted)
    term.expect("The dog ran.")
    term.write("\r")
    assert "got 'Summarize this:\\nThe cat sat.\\nThe dog ran.'" in term.expect("USER: ")


def test_typed_messages_are_kept_for_the_up_arrow_of_the_next_chat(tmp_path, monkeypatch):
    readline = pytest.importorskip("readline")
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path / "home"))
    readline.clear_history()
    try:
        TerminalIO("simple", multiline=False, interactive=True).remember("first")  # no folder yet
        (tmp_path / "home" / "chat_history").write_text("earlier question\n", encoding="utf-8")  # readline's
        io = TerminalIO("simple", multiline=False, interactive=True)
        assert readline.get_history_item(readline.get_current_history_length()) == "earlier question"
        io.remember("hello again")
        io.remember("a pasted\n\tmessage")
        saved = tmp_path / "home" / "chat_history"
        assert saved.stat().st_mode & 0o777 == 0o600  # what a user typed is theirs to read
        readline.clear_history()
        TerminalIO("simple", multiline=False, interactive=True)
        recalled = [readline.get_history_item(i) for i in range(1, readline.get_current_history_length() + 1)]
        assert recalled == ["earlier question", "hello again", "a pasted\n\tmessage"]
    finally:
        readline.clear_history()


def test_a_chat_left_open_keeps_no_more_messages_for_the_up_arrow_than_the_file(tmp_path, monkeypatch):
    """readline's own list grew by every message of a chat left open (set_history_length bounds only the
    files readline writes itself, which the chat does not use), and began with all of a longer file."""
    readline = pytest.importorskip("readline")
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path))
    monkeypatch.setattr(chat_module, "HISTORY_LINES", 20)
    (tmp_path / "chat_history").write_text("".join(f"old {i}\n" for i in range(30)), encoding="utf-8")
    readline.clear_history()
    try:
        io = TerminalIO("simple", multiline=False, interactive=True)
        assert readline.get_current_history_length() == 20
        assert readline.get_history_item(1) == "old 10"
        for i in range(50):
            io.remember(f"message {i}")
        recalled = [readline.get_history_item(i) for i in range(1, readline.get_current_history_length() + 1)]
        assert recalled == [f"message {i}" for i in range(30, 50)]  # what the next chat's up arrow recalls
        assert (tmp_path / "chat_history").read_text(encoding="utf-8").splitlines() == recalled
    finally:
        readline.clear_history()


def test_a_history_file_that_libedit_wrote_is_read_as_the_messages_typed(tmp_path, monkeypatch):
    """Versions before wrote the file with readline's write_history_file: on macOS (libedit) a header line,
    and vis(3)'s escapes. Read as lines, the up arrow recalled '_HiStOrY_V2_' and 'hello\\040world'."""
    readline = pytest.importorskip("readline")
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path))
    saved = tmp_path / "chat_history"
    saved.write_text(
        # vis(3)'s escapes: octal for a space, ^ for a control character, M- for a byte beyond ASCII
        "_HiStOrY_V2_\nhello\\040world\nC:\\\\temp\\^Jtwo\\^Ilines\n\\M-d\\M-=\\240\\M-e\\M-%\\M-=\n",
        encoding="utf-8",
    )
    readline.clear_history()
    try:
        io = TerminalIO("simple", multiline=False, interactive=True)
        recalled = [readline.get_history_item(i) for i in range(1, readline.get_current_history_length() + 1)]
        assert recalled == ["hello world", "C:\\temp\ntwo\tlines", "你好"]
        io.remember("next")  # the file goes on in this chat's own way
        assert saved.read_bytes() == "hello world\nC:\\temp\r\ntwo\tlines\n你好\nnext\n".encode()
    finally:
        readline.clear_history()


def test_a_pasted_message_is_kept_whole_for_the_up_arrow_even_when_the_terminal_is_closed(
    terminal, tmp_path, monkeypatch
):
    """readline's history file kept a message of several lines as so many entries (the next chat's up arrow
    recalled its last line alone), and the file was written only when the chat ended of itself: closing
    the terminal window (SIGHUP) lost all that was typed in it."""
    import signal

    readline = pytest.importorskip("readline")
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path))
    term = terminal(READ_TWICE, env=os.environ | {"VICUNA_HOME": str(tmp_path)})
    pasted = "Fix this:\rdef f():\r\r\treturn 1"
    if "\x1b[?2004h" in term.expect("USER: "):
        pasted = f"\x1b[200~{pasted}\x1b[201~"
    term.write(pasted + "\r")
    term.expect("got 'Fix this:")
    term.expect("USER: ")
    term.end_with(signal.SIGHUP)
    readline.clear_history()
    try:
        TerminalIO("simple", multiline=False, interactive=True)
        assert readline.get_current_history_length() == 1
        assert readline.get_history_item(1) == "Fix this:\ndef f():\n\n\treturn 1"
    finally:
        readline.clear_history()


def test_two_chats_at_once_both_keep_what_was_typed_in_them(terminal, tmp_path):
    """Each chat wrote the file whole from what it had read at its start: of two chats open at once (two
    terminals), the one that wrote last left none of the other's messages."""
    pytest.importorskip("readline")
    left, right = (terminal(READ_TWICE, env=os.environ | {"VICUNA_HOME": str(tmp_path)}) for _ in range(2))
    for term, typed in [(left, "typed on the left"), (right, "typed on the right"), (left, "left again")]:
        term.expect("USER: ")
        term.write(typed + "\r")
        term.expect("got ")
    left.child.wait(timeout=60)  # it reads twice, then ends
    assert (tmp_path / "chat_history").read_text().splitlines() == [
        "typed on the left",
        "typed on the right",
        "left again",
    ]


def test_two_chats_saving_at_the_same_instant_both_keep_their_message(tmp_path):
    """Each read the file, added its message and renamed its copy over it: where the other chat saved
    between the read and the rename, its message was lost."""
    import threading

    first, second = (TerminalIO("simple", multiline=False, interactive=False) for _ in range(2))
    first.history = second.history = tmp_path / "chat_history"
    first.save_history("earlier")  # the file made private as it is made
    other = threading.Thread(target=second.save_history, args=("typed in the other chat",))
    read = first.saved_history

    def read_then_let_the_other_save() -> list[str]:
        entries = read()
        other.start()
        other.join(timeout=2)  # with the lock, it waits for this save to end
        return entries

    first.saved_history = read_then_let_the_other_save
    first.save_history("typed in this chat")
    other.join()
    assert first.history.read_text(encoding="utf-8").splitlines() == [
        "earlier",
        "typed in this chat",
        "typed in the other chat",
    ]
    assert first.history.stat().st_mode & 0o777 == 0o600


def test_a_history_on_a_share_that_keeps_no_locks_is_still_saved(tmp_path, monkeypatch):
    """NFS without a lock daemon answers flock with ENOLCK: the chat saved nothing there, or ended on it."""
    import errno

    import vicuna.chat

    def no_locks(handle, wait=True):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(vicuna.chat, "locked", no_locks)
    io = TerminalIO("simple", multiline=False, interactive=False)
    io.history = tmp_path / "chat_history"
    io.save_history("typed on NFS")
    assert io.history.read_text(encoding="utf-8").splitlines() == ["typed on NFS"]


def test_a_history_linked_to_dev_null_keeps_nothing_and_a_linked_file_keeps_its_link(tmp_path, monkeypatch):
    """`ln -sf /dev/null FILE`, the usual way to keep no history (bash's, Python's), was undone by the first
    message typed: the file renamed over the link kept every message from then on."""
    readline = pytest.importorskip("readline")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("VICUNA_HOME", str(home))
    (home / "chat_history").symlink_to(os.devnull)
    readline.clear_history()
    try:
        io = TerminalIO("simple", multiline=False, interactive=True)
        io.remember("my secret")
        assert (home / "chat_history").is_symlink() and not list(home.iterdir())[1:]
        assert readline.get_history_item(1) == "my secret"  # the up arrow still has it in this chat
        (home / "chat_history").unlink()
        (home / "chat_history").symlink_to(tmp_path / "dotfiles" / "vicuna_history")  # kept elsewhere
        (tmp_path / "dotfiles").mkdir()
        io.remember("kept")
        assert (home / "chat_history").is_symlink()
        assert (tmp_path / "dotfiles" / "vicuna_history").read_text(encoding="utf-8") == "kept\n"
    finally:
        readline.clear_history()


@pytest.mark.parametrize("fails", ["create", "write", "read"])
def test_a_history_that_cannot_be_saved_is_said_once_and_the_chat_goes_on(
    tmp_path, monkeypatch, capsys, fails
):
    """A read-only $VICUNA_HOME (a container's, a shared one) or a full disk lost every message typed for the
    next chat's up arrow without a word; it is said once, and what was typed stays for this chat."""
    import errno

    readline = pytest.importorskip("readline")
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path))
    if fails == "create":

        def denied(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

        monkeypatch.setattr(os, "open", denied)
    elif fails == "write":

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "replace", full)
    readline.clear_history()
    try:
        io = TerminalIO("simple", multiline=False, interactive=True)
        if fails == "read":  # another user's file, in a $VICUNA_HOME shared by a team

            def denied_read():
                raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "chat_history"))

            monkeypatch.setattr(io, "saved_history", denied_read)
        io.remember("one")
        io.remember("two")
        cause = "No space left on device" if fails == "write" else "Permission denied"
        assert capsys.readouterr().out == (
            f"notice: the messages typed are not saved in {tmp_path / 'chat_history'} ({cause}); the up arrow "
            "has them in this chat only\n"
        )
        assert [readline.get_history_item(i) for i in (1, 2)] == ["one", "two"]
        # no temporary file left; the lock beside the history stays, as it does after a save
        assert {p.name for p in tmp_path.iterdir()} <= {".chat_history.lock"}
    finally:
        readline.clear_history()


def test_without_a_home_folder_the_chat_goes_on_without_saved_history(monkeypatch):
    # the model is loaded by then: the up arrow's history is not worth refusing the chat for
    readline = pytest.importorskip("readline")

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("VICUNA_HOME")
    monkeypatch.setattr(Path, "home", no_home)
    io = TerminalIO("simple", multiline=False, interactive=True)
    assert io.history is None
    io.remember("hello")  # for the up arrow of this chat, with nothing to save it to, and no error
    assert readline.get_history_item(readline.get_current_history_length()) == "hello"


@pytest.mark.parametrize("readline", [True, False])
def test_ctrl_d_ends_the_chat_on_a_line_of_its_own(terminal, readline):
    """The shell's prompt comes on the next line, not after "USER: ", and no blank line before it: in
    bracketed-paste mode readline ends the line itself; without readline the chat does."""
    import re

    term = terminal(("" if readline else "import sys; sys.modules['readline'] = None\n") + READ_TWICE)
    term.expect("USER: ")
    term.write("\x04")
    shown = re.sub(r"\x1b\[[?0-9;]*[a-zA-Z]", "", term.expect("got None")).replace("\r", "")
    assert shown == "\ngot None"


def test_rich_style_on_a_dumb_terminal_streams_as_plain_text(terminal, monkeypatch):
    monkeypatch.setenv("TERM", "dumb")
    term = terminal(
        "from vicuna.chat import TerminalIO\nprint('style', TerminalIO('rich', False, True).style)"
    )
    seen = term.expect("style simple")
    assert "this terminal (TERM=dumb) cannot redraw a reply: --style simple" in seen


def test_a_dumb_terminal_gets_no_escape_sequence_before_each_prompt(terminal):
    """readline's bracketed-paste mode, turned on for every terminal, printed "\\e[?2004h" before each
    "USER: ", which a dumb terminal (Emacs' M-x shell, TERM=dumb) shows as "^[[?2004h" and a screen reader
    reads out; readline itself turns the mode off there, as where TERM is not set."""
    pytest.importorskip("readline")
    shown = READ_TWICE.replace("for _", "print('paste', io.bracketed_paste)\nfor _")
    term = terminal(shown, env=os.environ | {"TERM": "dumb"})
    seen = term.expect("USER: ")
    assert "paste False" in seen and "\x1b" not in seen
    term.write("hello\r")
    assert "\x1b" not in term.expect("USER: ")


def test_with_output_piped_pastes_are_not_said_to_be_one_message(monkeypatch):
    """`vicuna chat | tee chat.log`: Python's input() reads through readline only when standard output is a
    terminal too, so there a paste is not one message, and Ctrl-D leaves readline no line to end."""
    pytest.importorskip("readline")
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setattr(sys, "stdout", io_module.StringIO())
    assert not TerminalIO("simple", multiline=False, interactive=True).bracketed_paste


def test_rich_style_with_output_piped_streams_as_plain_text(monkeypatch, capsys):
    """`vicuna chat --style rich | tee chat.log`: rich's live view draws nothing into a pipe until it
    stops, so a reply showed only at its end, and the next "USER: " followed its last row."""
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.setattr(sys, "stdout", io_module.StringIO())
    assert TerminalIO("rich", multiline=False, interactive=True).style == "simple"
    assert "output that is not a terminal cannot redraw a reply: --style simple" in capsys.readouterr().err


def test_pyreadline3_on_windows_leaves_the_chat_its_own_line_editing(monkeypatch, tmp_path):
    """Windows' Python has no readline module; `import readline` there finds pyreadline3's (installed with
    many tools), which has no set_auto_history: the chat ended with an AttributeError before its first
    prompt. Its line editing is left to itself, without the chat's history and bracketed paste."""
    import types

    pyreadline3 = types.ModuleType(
        "readline", "Importing this module enables command line editing using pyreadline3"
    )
    for name in ("parse_and_bind", "add_history", "get_history_item", "get_current_history_length"):
        setattr(pyreadline3, name, lambda *args: None)
    pyreadline3.set_history_length = lambda length: None
    monkeypatch.setitem(sys.modules, "readline", pyreadline3)
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path))
    io = TerminalIO("simple", multiline=False, interactive=True)
    assert io.readline is None and not io.bracketed_paste
    io.remember("你好")  # nothing to remember it with, and no error
    assert not (tmp_path / chat_module.HISTORY_FILE).exists()


@pytest.mark.parametrize("style", ["simple", "programmatic"])
def test_a_pipe_on_windows_is_read_as_utf8_and_a_line_that_is_not_in_the_code_page(monkeypatch, style):
    """Windows' Python reads a pipe in the ANSI code page (cp936 on a Chinese Windows), but a file Notepad
    saved, PowerShell 7 and Git Bash send UTF-8: "你好" went to the model as "浣犲ソ", and the byte-order
    mark was never taken off. cmd's `echo 你好 |` sends GBK, which is still read."""
    end = f"\n{END_MARK}\n" if style == "programmatic" else "\n"
    piped = f"\ufeff你好{end}".encode() + f"再见{end}".encode("gbk") + f"Emoji 😀 ok{end}".encode()
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(sys, "stdin", io_module.TextIOWrapper(io_module.BytesIO(piped), encoding="cp936"))
    io = TerminalIO(style, multiline=False, interactive=False, code_page=chat_module.utf8_stdin())
    assert [io.read(), io.read(), io.read(), io.read()] == ["你好", "再见", "Emoji 😀 ok", None]


@pytest.mark.parametrize(("locale_encoding", "other"), [("gb18030", "再见"), ("iso8859-1", "café")])
def test_a_pipe_under_a_locale_that_is_not_utf8_is_read_as_utf8_and_a_line_that_is_not_in_the_locale_s(
    monkeypatch, locale_encoding, other
):
    """On a Linux server whose LANG is zh_CN.GBK or zh_CN.GB18030 (or en_US.ISO-8859-1), Python reads a
    pipe in that encoding: a UTF-8 file's "你好" went to the model as "浣犲ソ" (as "ä½ å¥½") without a word."""
    piped = "你好\n".encode() + f"{other}\n".encode(locale_encoding)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(
        sys, "stdin", io_module.TextIOWrapper(io_module.BytesIO(piped), encoding=locale_encoding)
    )
    io = TerminalIO("simple", multiline=False, interactive=False, code_page=chat_module.utf8_stdin())
    assert [io.read(), io.read(), io.read()] == ["你好", other, None]


def test_a_message_piped_in_between_triple_quotes_is_one_message_as_typed(monkeypatch):
    '''A here-doc with a message of several lines between """ lines, as typed at the prompt: each line
    was answered on its own, the quotes too.'''
    piped = '"""\nFix this:\n\n    return 1\nplease."""\nnext\n"""unclosed\nat the end\n'
    monkeypatch.setattr(sys, "stdin", io_module.StringIO(piped))
    io = TerminalIO("simple", multiline=False, interactive=False)
    assert [io.read() for _ in range(4)] == [
        "Fix this:\n\n    return 1\nplease.",
        "next",
        "unclosed\nat the end",
        None,
    ]


def test_with_multiline_a_message_piped_in_is_its_lines_up_to_an_empty_one(monkeypatch):
    """A here-doc written for FastChat's --multiline (messages of several lines, an empty line after each):
    the flag was left to the terminal, and each line was answered as a message of its own."""
    piped = "Fix this:\n    return 1\n\n!!save out.json\n\n\nlast\nwords\n"
    monkeypatch.setattr(sys, "stdin", io_module.StringIO(piped))
    io = TerminalIO("simple", multiline=True, interactive=False)
    assert [io.read() for _ in range(5)] == [
        "Fix this:\n    return 1",
        "!!save out.json",
        "",
        "last\nwords",
        None,
    ]
    monkeypatch.setattr(sys, "stdin", io_module.StringIO(piped))
    io = TerminalIO("simple", multiline=False, interactive=False)  # without it, a line is a message
    assert [io.read() for _ in range(3)] == ["Fix this:", "    return 1", ""]


def test_a_pipe_elsewhere_is_read_in_its_encoding_and_what_is_not_utf8_is_left_to_be_said(monkeypatch):
    piped = "你好\n".encode() + "再见\n".encode("gbk")
    monkeypatch.setattr(sys, "stdin", io_module.TextIOWrapper(io_module.BytesIO(piped), encoding="utf-8"))
    io = TerminalIO("simple", multiline=False, interactive=False, code_page=chat_module.utf8_stdin())
    first, second = io.read(), io.read()
    assert first == "你好" and chat_module.not_utf8(second).endswith("`iconv -f GB18030 -t UTF-8`")


def test_on_windows_the_chat_says_ctrl_z_then_enter_where_it_said_ctrl_d(monkeypatch, capsys):
    """Windows' console ends the input with Ctrl-Z and Enter; the Ctrl-D the chat named there types ^D,
    which Enter sent to the model as a message."""
    import builtins

    from vicuna.cli import command_parser

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setitem(sys.modules, "readline", None)  # Windows' Python has none
    keys = iter([KeyboardInterrupt, EOFError])

    def typed(prompt):
        raise next(keys)

    monkeypatch.setattr(builtins, "input", typed)
    assert TerminalIO("simple", multiline=False, interactive=True).read() is None
    assert "(Ctrl-Z then Enter or !!exit ends the chat)" in capsys.readouterr().out
    io = ScriptedIO(["!!help"])
    run_chat(EchoEngine(), io, PARAMS)
    assert "end the chat (Ctrl-Z then Enter at the prompt too)" in io.notes[0]
    assert "Ctrl-D" not in io.notes[0]
    assert "or Ctrl-Z then Enter on a line of its own" in " ".join(
        command_parser("chat").format_help().split()
    )


def test_save_and_load_take_a_path_in_quotes_as_explorer_s_copy_as_path_gives_it(tmp_path):
    """Windows Explorer's "Copy as path" puts double quotes around the path (and a shell's habit types them
    around one with spaces): they were taken as part of the name."""
    path = tmp_path / "我的 对话.json"
    io = ScriptedIO(["hi", f'!!save "{path}"', "!!reset", f"!!load  '{path}' "])
    run_chat(EchoEngine(), io, PARAMS)
    assert io.notes == [
        f"(saved 2 messages to {path})",
        "(conversation cleared)",
        f"(loaded 2 messages from {path})",
    ]
