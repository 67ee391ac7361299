"""Training data: records are checked with errors that name them, and the loss mask covers exactly the
assistant replies and their end-of-turn marker."""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass

import pytest

from vicuna.cli import main as cli
from vicuna.conversation import Message, Segment, get_template
from vicuna.errors import VicunaError
from vicuna.train.data import IGNORE, Encoder, load_conversations, prepare, split_turns

CONVERSATION = {
    "id": "c1",
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hello!"},
        {"from": "gpt", "value": "Hi! How are you today?"},
        {"from": "human", "value": "The capital of France?"},
        {"from": "gpt", "value": "Paris."},
    ],
}

# The exact text each format was trained on, written out by hand (not by vicuna.conversation):
# (text, carries loss). Loss: each reply plus its end-of-turn marker, nothing else.
EXPECTED = {
    "vicuna_v1.1": [
        ("Be brief. USER: Hello! ASSISTANT:", False),
        (" Hi! How are you today?</s>", True),
        ("USER: The capital of France? ASSISTANT:", False),
        (" Paris.</s>", True),
    ],
    "llama-2": [
        ("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHello! [/INST]", False),
        (" Hi! How are you today? </s>", True),
        ("<s>[INST] The capital of France? [/INST]", False),
        (" Paris. </s>", True),
    ],
    "chatml": [
        (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),
        ("Hi! How are you today?<|im_end|>", True),
        ("\n<|im_start|>user\nThe capital of France?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Paris.<|im_end|>", True),
    ],
}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def expected_labels(tokenizer, pieces):
    """Labels by counting the tokens of each prefix of the hand-written text (BOS first, as LLaMA does)."""

    def count(text):
        return 1 + len(tokenizer(text, add_special_tokens=False).input_ids)

    text = "".join(t for t, _ in pieces)
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids]
    labels, done = [IGNORE] * len(ids), ""
    for piece, trainable in pieces:
        start, end = count(done), count(done + piece)
        if trainable:
            labels[start:end] = ids[start:end]
        done += piece
    return ids, labels


@pytest.mark.parametrize("name", ["vicuna_v1.1", "llama-2", "chatml"])
def test_inspected_masks_are_exactly_the_replies_and_end_markers(
    name, tiny_llama_dir, tokenizer, tmp_path, capsys
):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([CONVERSATION]), encoding="utf-8")
    out = tmp_path / "examples.jsonl"
    args = [
        "train",
        "inspect",
        "--data",
        str(data),
        "--model-path",
        str(tiny_llama_dir),
        "--conv-template",
        name,
    ]
    assert cli([*args, "--json", str(out)]) == 0
    shown = capsys.readouterr().out
    [example] = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]

    ids, labels = expected_labels(tokenizer, EXPECTED[name])
    assert example["input_ids"] == ids
    assert example["labels"] == labels
    # each run of loss tokens decodes to one reply with its end marker
    runs, run = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            run.append(token)
        elif run:
            runs, run = [*runs, run], []
    runs += [run] if run else []
    replies = [t for t, trainable in EXPECTED[name] if trainable]
    assert [tokenizer.decode(r).strip() for r in runs] == [r.strip() for r in replies]
    assert "0 bad" in shown and "0 truncated" in shown
    if name == "vicuna_v1.1":  # not a terminal: the loss tokens are shown inside [[ ]]
        assert "ASSISTANT:[[ Hi! How are you today?</s>]]USER:" in shown


@pytest.mark.parametrize("name", ["vicuna_v1.1", "vicuna_v0", "llama-2", "llama-3", "chatml"])
def test_offsets_and_prefix_tokenization_agree(name, tokenizer, tmp_path):
    """The path for tokenizers without offsets (prefix tokenization) labels the same tokens."""
    [conv] = read_records(tmp_path, [CONVERSATION])
    with_offsets = Encoder(tokenizer, get_template(name), use_offsets=True).encode(conv.messages)
    by_prefix = Encoder(tokenizer, get_template(name), use_offsets=False).encode(conv.messages)
    assert with_offsets == by_prefix
    assert any(label != IGNORE for label in with_offsets[1])


def read_records(tmp_path, records):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return load_conversations(path)


def test_sharegpt_and_openai_jsonl_read_the_same(tmp_path):
    jsonl = tmp_path / "data.jsonl"
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    messages = [{"role": role[t["from"]], "content": t["value"]} for t in CONVERSATION["conversations"]]
    # a trailing user turn has nothing to learn from and is dropped
    jsonl.write_text("\n" + json.dumps({"messages": [*messages, {"role": "user", "content": "Bye"}]}) + "\n")
    [from_jsonl] = load_conversations(jsonl)
    [from_json] = read_records(tmp_path, [CONVERSATION])
    assert from_jsonl.messages == from_json.messages
    assert from_jsonl.source == f"{jsonl}:2"
    assert from_json.source.endswith("[0] (id 'c1')")
    # ShareGPT turns whose roles are named as OpenAI names them (as many Chinese datasets do)
    named = [{"from": role[t["from"]], "value": t["value"]} for t in CONVERSATION["conversations"]]
    [from_named] = read_records(tmp_path, [{**CONVERSATION, "conversations": named}])
    assert from_named.messages == from_json.messages


def test_alpaca_records_are_one_exchange_each(tmp_path):
    """LitGPT's JSON data (Alpaca's instruction, input, output) was refused record by record: "expected an
    object with 'conversations' (ShareGPT) or 'messages' (OpenAI style)"."""
    records = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Name the capital of France.", "input": "", "output": "Paris"},
        {"instruction": "Say hi.", "input": None, "output": "Hi!"},  # a table's export: null for none
        {"instruction": "Say bye.", "output": "Bye!"},
    ]
    assert [c.messages for c in read_records(tmp_path, records)] == [
        (Message("user", "Add the numbers.\n\n2 and 3"), Message("assistant", "5")),
        (Message("user", "Name the capital of France."), Message("assistant", "Paris")),
        (Message("user", "Say hi."), Message("assistant", "Hi!")),
        (Message("user", "Say bye."), Message("assistant", "Bye!")),
    ]
    jsonl = tmp_path / "data.jsonl"  # and as JSONL
    jsonl.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    assert [c.messages for c in load_conversations(jsonl)] == [
        c.messages for c in read_records(tmp_path, records)
    ]


def test_a_litgpt_data_module_s_name_for_data_says_to_name_the_file(tmp_path, monkeypatch):
    """`--data JSON --data.json_path d.json` (or `--data Alpaca2k`), as LitGPT takes its data, was told
    "JSON: no such file" alone."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    for name in ("JSON", "Alpaca2k"):
        with pytest.raises(VicunaError, match=f"^{name}: no such file; --data takes the data file itself"):
            load_conversations(Path(name))
    with pytest.raises(
        VicunaError, match=r"^data\.json: no such file$"
    ):  # a file's name: mistyped, or elsewhere
        load_conversations(Path("data.json"))


@pytest.mark.parametrize(
    ("record", "match"),
    [
        (
            {"instruction": "Add.", "input": "2 and 3", "output": 5},
            r"data\.json\[0\]\.output: expected a string",
        ),
        ({"instruction": " ", "output": "5"}, r"data\.json\[0\]\.instruction: empty text"),
        (
            {"instruction": "Add.", "input": ["2", "3"], "output": "5"},
            r"data\.json\[0\]\.input: expected a string",
        ),
        ({"instruction": "Add.", "response": "5"}, r"'instruction' and 'output' \(Alpaca\)"),
    ],
)
def test_a_bad_alpaca_record_names_its_field(tmp_path, record, match):
    with pytest.raises(VicunaError, match=match):
        read_records(tmp_path, [record])


def test_a_system_prompt_beside_the_turns_is_the_system_turn(tmp_path):
    """LLaMA-Factory's ShareGPT files keep the system prompt in a "system" field beside the turns: it is
    the conversation's system turn, not left out in silence for the template's default."""
    [conv] = read_records(tmp_path, [CONVERSATION])
    system, *rest = CONVERSATION["conversations"]
    [beside] = read_records(tmp_path, [{"id": "c1", "conversations": rest, "system": system["value"]}])
    assert beside.messages == conv.messages
    for blank_text in ("", " \n"):  # none: the template's default
        [blank] = read_records(tmp_path, [{"conversations": rest, "system": blank_text}])
        assert blank.messages == conv.messages[1:]
    # a table's export (datasets' to_json, pandas) writes null where a row has no system prompt
    [null] = read_records(tmp_path, [{**CONVERSATION, "system": None}])
    assert null.messages == conv.messages
    with pytest.raises(
        VicunaError, match=r"\[0\] \(id 'c1'\)\.system: the conversation has a system turn too"
    ):
        read_records(tmp_path, [{**CONVERSATION, "system": "Be kind."}])
    with pytest.raises(VicunaError, match=r"\[0\]\.system: expected a string"):
        read_records(tmp_path, [{"messages": [{"role": "user", "content": "Hi"}], "system": ["Be kind."]}])


def test_pretty_printed_lists_and_byte_order_marks_load(tmp_path):
    """A ShareGPT list as people save it: indented, maybe by an editor that writes a byte-order mark."""
    path = tmp_path / "data.json"
    for text in (json.dumps([CONVERSATION], indent=2), "\ufeff" + json.dumps([CONVERSATION], indent=2)):
        path.write_text(text, encoding="utf-8")
        assert [c.source for c in load_conversations(path)] == [f"{path}[0] (id 'c1')"]
    path.write_text("\ufeff" + json.dumps(CONVERSATION) + "\n", encoding="utf-8")  # JSONL
    assert [c.source for c in load_conversations(path)] == [f"{path}:1 (id 'c1')"]
    path.write_text(json.dumps([CONVERSATION], ensure_ascii=False), encoding="utf-16")  # Notepad's "Unicode"
    assert [c.source for c in load_conversations(path)] == [f"{path}[0] (id 'c1')"]


def test_jsonl_lines_end_only_at_line_breaks(tmp_path):
    """JSONL written with `ensure_ascii=False` keeps U+2028, U+2029 and U+0085 in its strings as they are:
    they were taken for line ends, and a valid file was refused as 'not valid JSON' at its first line."""
    path = tmp_path / "data.jsonl"
    reply = {"messages": [{"role": "user", "content": "第一行\u2028第二行\u2029"}]}
    reply["messages"].append({"role": "assistant", "content": "好的\x85ok"})
    lines = [json.dumps(r, ensure_ascii=False) for r in (reply, CONVERSATION, {"id": "x"})]
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    with pytest.raises(VicunaError, match=r"data\.jsonl:3: expected an object"):
        load_conversations(path)
    path.write_text("\r\n".join(lines[:2]) + "\r\n", encoding="utf-8")
    first, _ = load_conversations(path)
    assert [m.content for m in first.messages] == ["第一行\u2028第二行\u2029", "好的\x85ok"]


def test_jsonl_files_joined_with_their_byte_order_marks_load(tmp_path):
    """`cat a.jsonl b.jsonl > all.jsonl`, where b.jsonl was saved with a byte-order mark: its first line
    was refused with Python's advice "Unexpected UTF-8 BOM (decode using utf-8-sig)"."""
    record = json.dumps(CONVERSATION, ensure_ascii=False).encode()
    path = tmp_path / "all.jsonl"
    path.write_bytes(record + b"\n" + codecs.BOM_UTF8 + record + b"\r\n")
    assert [c.source for c in load_conversations(path)] == [f"{path}:1 (id 'c1')", f"{path}:2 (id 'c1')"]


def turns(*pairs):
    return {"id": "x", "conversations": [{"from": f, "value": v} for f, v in pairs]}


@pytest.mark.parametrize(
    ("content", "suffix", "match"),
    [
        (
            [turns(("bot", "a"))],
            "json",
            r"data\.json\[0\] \(id 'x'\)\.conversations\[0\]\.from: unknown role 'bot'",
        ),
        (
            [turns(("human", "a"), ("gpt", "  "))],
            "json",
            r"\[0\] \(id 'x'\)\.conversations\[1\]\.value: empty text",
        ),
        (
            [turns(("human", "a"), ("gpt", "b"), ("system", "c"), ("gpt", "d"))],
            "json",
            r"conversations\[2\]\.from: expected 'human', got 'system'",
        ),
        (
            [turns(("gpt", "a"), ("human", "b"))],
            "json",
            r"conversations\[0\]\.from: expected 'human', got 'gpt'",
        ),
        ([turns(("human", "a"))], "json", r"\.conversations: no 'gpt' turn to learn from"),
        ([turns(("human", "a"), ("gpt", 3))], "json", r"conversations\[1\]\.value: expected a string"),
        ([{"id": "x"}], "json", r"data\.json\[0\]: expected an object with 'conversations'"),
        (
            json.dumps(
                {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
            )
            + '\n{"messages": [{"role": "tool", "content": "b"}]}',
            "jsonl",
            r"data\.jsonl:2\.messages\[0\]\.role",
        ),
        (
            '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}',
            "jsonl",
            r"data\.jsonl:1\.messages\[0\]\.role: expected 'user', got 'assistant'",
        ),
        (
            '{"messages": [{"role": "user", "content": ""}]}',
            "jsonl",
            r"data\.jsonl:1\.messages\[0\]\.content: empty",
        ),
        ("{nope", "jsonl", r"data\.jsonl:1: not valid JSON .*; expected a JSON list of conversations"),
        ("[{", "json", r"data\.json: not valid JSON"),
        (
            '[{"id"："x", "conversations": []}]',
            "json",
            r"data\.json: not valid JSON \(Expecting ':' delimiter: .*: found the full-width '：' where JSON needs ':'\)",
        ),
        (
            json.dumps(CONVERSATION, indent=2),
            "json",
            r"data\.json: one JSON object over several lines; expected a JSON list of conversations "
            r"\(ShareGPT\) or one JSON object per line \(JSONL\)",
        ),
    ],
)
def test_bad_records_name_the_record_and_field(tmp_path, content, suffix, match):
    path = tmp_path / f"data.{suffix}"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    with pytest.raises(VicunaError, match=match):
        load_conversations(path)


def test_turns_in_a_row_from_one_side_are_joined_as_chat_joins_them(tmp_path):
    """A chat log often has two messages in a row from one side: they were refused ('expected gpt, got
    human'), where `vicuna chat` and the API join them with a blank line; training joins them too."""
    path = tmp_path / "data.json"
    log = turns(
        ("human", "你好"), ("human", "在吗？"), ("gpt", "在的。"), ("gpt", "有什么事？"), ("human", "没事")
    )
    path.write_text(json.dumps([log]), encoding="utf-8")
    (conversation,) = load_conversations(path)
    assert [(m.role, m.content) for m in conversation.messages] == [
        ("user", "你好\n\n在吗？"),
        ("assistant", "在的。\n\n有什么事？"),
    ]


def test_every_bad_record_is_named_at_once(tmp_path):
    """A file of many conversations with a few bad ones: the first is explained, and where the others
    are is said too, so that they are fixed in one pass rather than one run each."""
    good = turns(("human", "a"), ("gpt", "b"))
    records = [good] * 30
    records[4] = turns(("gpt", "a"), ("gpt", "b"))
    records[11] = turns(("gpt", "a"), ("human", "b"), ("gpt", "c"))
    records[29] = turns(("human", "a"), ("gpt", ""))
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(VicunaError) as err:
        load_conversations(path)
    assert str(err.value) == (
        f"{path}[4] (id 'x').conversations[0].from: expected 'human', got 'gpt' (after an optional system "
        f"turn, human and gpt turns alternate); 2 more of the 30 records are bad: {path}[11], {path}[29]"
    )
    # beyond the first ten, a count
    path.write_text(json.dumps([turns(("gpt", "a"), ("gpt", "b"))] * 12), encoding="utf-8")
    with pytest.raises(VicunaError) as err:
        load_conversations(path)
    assert str(err.value).endswith(f"are bad: {', '.join(f'{path}[{i}]' for i in range(1, 10))} and 2 more")


def test_bad_data_is_a_one_line_cli_error(tmp_path, capsys):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([CONVERSATION, turns(("human", "a"), ("robot", "b"))]), encoding="utf-8")
    assert cli(["train", "--data", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    assert "data.json[1] (id 'x').conversations[1].from: unknown role 'robot'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@dataclass(frozen=True)
class Glued:
    """A template whose reply starts inside a word ("He" + "llo"): no token boundary at the span's edge."""

    name: str = "glued"
    system: str = ""
    stop: tuple[str, ...] = ("</s>",)
    add_special_tokens: bool = True

    def segments(self, messages, add_generation_prompt=True):
        out = []
        for m in messages:
            out.append(
                Segment(m.content + "</s>", trainable=True) if m.role == "assistant" else Segment(m.content)
            )
        return out


@pytest.mark.parametrize("use_offsets", [True, False])
def test_unlocatable_spans_are_counted_as_bad(tokenizer, use_offsets):
    from vicuna.train.data import Conversation

    good = Conversation("good", (Message("user", "Hello!"), Message("assistant", " Hi!")))
    bad = Conversation("bad", (Message("user", "He"), Message("assistant", "llo world")))
    prepared = prepare([good, bad], Encoder(tokenizer, Glued(), use_offsets=use_offsets), max_length=64)
    assert [e.source for e in prepared.examples] == ["good"]
    [(source, why)] = prepared.bad
    assert source == "bad"
    assert "character" in why
    with pytest.raises(VicunaError, match=r"1 example\(s\) .* the first is bad: .*--allow-bad"):
        prepared.check_bad(0)
    prepared.check_bad(1)


def test_trimmed_offsets_still_find_a_token_across_the_edge():
    """GPT-2-style offsets leave out a token's leading space: "a b" -> (0, 1), (2, 3)."""
    from vicuna.train.data import SpanError, flags_from_offsets

    assert flags_from_offsets([(0, 1), (2, 3)], [(1, 3)], "a b") == [False, True]  # the reply is " b"
    with pytest.raises(SpanError, match="crosses the start"):
        flags_from_offsets([(0, 1), (2, 3)], [(2, 3)], "a b")  # the reply is "b", but the token is " b"
    # byte-fallback tokens of one character share its offsets
    assert flags_from_offsets([(0, 1), (1, 2), (1, 2)], [(1, 2)], "a你") == [False, True, True]


def test_a_reply_that_begins_with_white_space_is_bad_with_the_text_and_what_to_do():
    """Byte-level BPE (Qwen, LLaMA 3, SmolLM2) makes one token of the template's "\n" and the space a reply
    begins with. The example was bad "at characters 156-158 ... 157-183", which named nothing to fix."""
    from vicuna.train.data import SpanError, flags_from_offsets

    text = "<|im_start|>assistant\n  床前明月光，<|im_end|>"
    start = text.index("  床")
    offsets = [(0, 12), (12, 21), (21, start + 1), (start + 1, start + 3), (start + 3, len(text))]
    with pytest.raises(SpanError) as bad:
        flags_from_offsets(offsets, [(start, len(text))], text)
    assert str(bad.value) == (
        "a token ('\\n ') crosses the start of the assistant text at character 22 ('|>assistant\\n'|'  床前明月光，<|im'); "
        "the reply begins with white space, which the tokenizer joins with the template's: strip it"
    )


def test_long_conversations_are_split_at_turns_or_truncated(tokenizer):
    from vicuna.train.data import Conversation

    messages = [Message("system", "Be brief.")]
    for i in range(6):
        messages += [Message("user", f"Hello! {i}"), Message("assistant", f"Hi! How are you today? {i}")]
    conv = Conversation("long", tuple(messages))
    encoder = Encoder(tokenizer, get_template("vicuna_v1.1"))
    whole = len(encoder.encode(messages)[0])
    max_length = whole // 2

    exact = prepare([conv], encoder, max_length=whole)
    assert exact.truncated == 0 and exact.examples[0].truncated is False  # fits exactly: not cut
    truncated = prepare([conv], encoder, max_length=max_length)
    assert truncated.truncated == 1 and len(truncated.examples) == 1
    assert len(truncated.examples[0].input_ids) == max_length

    split = prepare([conv], encoder, max_length=max_length, split_long=True)
    assert split.truncated == 0 and len(split.examples) >= 2
    assert all(len(e.input_ids) <= max_length for e in split.examples)
    assert [e.source for e in split.examples][:2] == ["long part 1", "long part 2"]
    pieces = split_turns(messages, lambda m: encoder.length(m) <= max_length)
    assert all(p[0] == messages[0] for p in pieces)  # every piece keeps the system prompt
    assert [m for p in pieces for m in p[1:]] == messages[1:]  # and together they hold every turn once


def test_a_long_conversation_the_chat_template_refuses_is_a_bad_example_with_split_long(tiny_llama_dir):
    """--split-long measures a conversation by rendering it: one that Gemma 2's template refuses (a system
    message) is a bad example, counted and named as in a run without the flag, and the others are trained."""
    from tests.chat_templates import GEMMA2, family_tokenizer
    from vicuna.engine.loader import template_for
    from vicuna.train.data import Conversation

    tok = family_tokenizer(tiny_llama_dir, GEMMA2)
    encoder = Encoder(tok, template_for("hf", tok))
    exchanges = [
        m for i in range(6) for m in (Message("user", f"Hello! {i}"), Message("assistant", f"Hi! {i}"))
    ]
    convs = [
        Conversation("with system", (Message("system", "Be brief."), *exchanges)),
        Conversation("without", tuple(exchanges)),
    ]
    max_length = len(encoder.encode(exchanges)[0]) // 2
    for split_long in (False, True):
        prepared = prepare(convs, encoder, max_length=max_length, split_long=split_long)
        assert [source for source, _ in prepared.bad] == ["with system"] and prepared.refused == 1
        assert "refuses system messages" in prepared.bad[0][1]
        assert {e.source.split(" part")[0] for e in prepared.examples} == {"without"}
        assert (len(prepared.examples) > 1) == split_long


def test_long_conversations_are_split_after_each_exchange_that_fits_with_the_system_prompt():
    system, (u, a) = Message("system", "s"), (Message("user", "u"), Message("assistant", "a"))
    # pieces of at most 4 messages: the system prompt counts, so one exchange each
    assert split_turns([system, u, a, u, a], lambda m: len(m) <= 4) == [[system, u, a], [system, u, a]]
    # pieces of at most 5: two exchanges, then the third
    assert split_turns([system, u, a, u, a, u, a], lambda m: len(m) <= 5) == [
        [system, u, a, u, a],
        [system, u, a],
    ]
    assert split_turns([u, a, u, a, u, a], lambda m: len(m) <= 2) == [[u, a], [u, a], [u, a]]


def test_a_token_across_the_end_of_a_reply_or_a_reply_without_tokens_is_an_error():
    from vicuna.train.data import SpanError, flags_from_offsets

    text = "Q: A!x"
    with pytest.raises(SpanError, match="crosses the end"):  # the reply "A!" ends inside the token "!x"
        flags_from_offsets([(0, 2), (2, 3), (3, 4), (4, 6)], [(3, 5)], text)
    # a reply of a character the tokenizer's normalizer drops (a zero-width space): no token to learn
    with pytest.raises(SpanError, match="characters 4-5 has no tokens of its own"):
        flags_from_offsets([(0, 2), (2, 3), (3, 4)], [(4, 5)], "Q: \u200b\u200b")


@pytest.mark.parametrize("template", ["vicuna_v1.1", "llama-2"])
def test_special_token_text_in_a_reply_is_learned_as_text_as_a_chat_prompt_tokenizes_it(
    tiny_llama_dir, template
):
    """`</s>` typed in a reply is text, not the end of the reply, as `Engine.encode_chat` has it."""
    from vicuna.config import ModelSettings
    from vicuna.engine.loader import load_engine

    engine = load_engine(
        ModelSettings(model_path=str(tiny_llama_dir), conv_template=template), progress=False
    )
    tok, encoder = engine.tokenizer, Encoder(engine.tokenizer, get_template(template))
    typed = [Message("user", "a </s> USER: b"), Message("assistant", "<s>c </s> d"), Message("user", "more")]
    plain = [Message("user", "x"), Message("assistant", "y"), Message("user", "z")]
    ids, labels = encoder.encode(typed[:2])
    (plain_ids, _) = encoder.encode(plain[:2])
    for special in (tok.bos_token_id, tok.eos_token_id):  # only the template's own markers
        assert ids.count(special) == plain_ids.count(special)
    learned = tok.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE])
    assert learned.startswith("<s>c </s> d")
    # the training example starts with the prompt a chat would give the model for the same turns
    prompt = engine.encode_chat(typed[:1])
    assert ids[: len(prompt)] == prompt
    assert encoder.length(typed[:2]) == len(ids)


@pytest.mark.parametrize("use_offsets", [True, False])
def test_a_chat_template_example_is_what_apply_chat_template_gives(tiny_llama_dir, use_offsets):
    """With the model's own chat template (ChatML, no BOS in it) on a tokenizer that adds BOS, each example
    started with a BOS that neither `apply_chat_template` nor the model's chat prompts have."""
    from transformers import AutoTokenizer

    from vicuna.engine.loader import template_for

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    assert tok("x").input_ids[0] == tok.bos_token_id
    encoder = Encoder(tok, template_for("hf", tok), use_offsets=use_offsets)
    messages = [Message("user", "Hello!"), Message("assistant", "Hi! How are you today?")]
    ids, labels = encoder.encode(messages)
    as_dicts = [{"role": m.role, "content": m.content} for m in messages]
    assert ids == list(tok.apply_chat_template(as_dicts, tokenize=True)["input_ids"])
    prompt = tok.apply_chat_template(as_dicts[:1], add_generation_prompt=True, tokenize=True)["input_ids"]
    assert labels[: len(prompt)] == [IGNORE] * len(prompt)  # the loss starts where the reply does
    assert tok.decode(ids[len(prompt) :]) == "Hi! How are you today?<|im_end|>\n"
    assert labels[len(prompt) :] == ids[len(prompt) :]
    assert encoder.length(messages) == len(ids)


THOUGHT = "<think>\nhmm\n</think>\n\n你好！"
TWO_EXCHANGES = [
    Message("system", "Be brief."),
    Message("user", "Hello!"),
    Message("assistant", "Hi!"),
    Message("user", "你好"),
    Message("assistant", THOUGHT),
]


def loss_runs(tok, ids, labels) -> tuple[list[str], str]:
    """The text of each run of tokens with loss, and the text of the tokens without."""
    runs, current, masked = [], [], []
    for token, label in zip([*ids, None], [*labels, IGNORE], strict=True):
        if label != IGNORE:
            current.append(token)
            continue
        if current:
            runs.append(tok.decode(current))
            current = []
        if token is not None:
            masked.append(token)
    return runs, tok.decode(masked)


@pytest.mark.parametrize("use_offsets", [True, False])
@pytest.mark.parametrize(
    ("family", "learned", "prompts"),
    [
        # the system prompt is not in a conversation that ends with a reply: the template's choice
        ("mistral_v03", ["Hi!</s>", f"{THOUGHT}</s>"], "<s>[INST] Hello![/INST][INST] 你好[/INST]"),
        (
            "qwen3",  # the first reply without its <think> block (it has none), the last one with it
            ["Hi!<|im_end|>", f"{THOUGHT}<|im_end|>"],
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
            "\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n\n",
        ),
    ],
)
def test_replies_are_located_where_the_chat_template_renders_a_conversation_s_start_anew(
    tiny_llama_dir, family, learned, prompts, use_offsets
):
    """Mistral v0.3 writes the system prompt into the last user turn only, Qwen3 drops <think> from the
    replies before the last user message: no prefix of a conversation is rendered as the start of the
    whole, and every conversation of two exchanges was refused as bad ("does not render message N as a
    continuation"). The loss is on each reply and its end-of-turn token, in `apply_chat_template`'s ids."""
    from tests import chat_templates
    from vicuna.engine.loader import template_for

    tok = chat_templates.family_tokenizer(tiny_llama_dir, getattr(chat_templates, family.upper()))
    encoder = Encoder(tok, template_for("hf", tok), use_offsets=use_offsets)
    ids, labels = encoder.encode(TWO_EXCHANGES)
    as_dicts = [{"role": m.role, "content": m.content} for m in TWO_EXCHANGES]
    assert ids == list(tok.apply_chat_template(as_dicts, tokenize=True)["input_ids"])
    assert loss_runs(tok, ids, labels) == (learned, prompts)
    assert encoder.length(TWO_EXCHANGES) == len(ids)


def test_a_system_prompt_the_chat_template_leaves_out_of_training_is_counted(tiny_llama_dir):
    """Mistral v0.3's template writes the system prompt into the last user turn when that ends the messages:
    a conversation that ends with a reply is rendered without it, and a run trained on data whose every
    conversation has one saw none of them, without a word."""
    from tests.chat_templates import MISTRAL_V03, QWEN3, family_tokenizer
    from vicuna.conversation import with_system
    from vicuna.engine.loader import template_for
    from vicuna.train.data import Conversation

    convs = [Conversation("a", tuple(TWO_EXCHANGES)), Conversation("b", tuple(TWO_EXCHANGES[1:]))]
    for chat_template, system, left_out in [
        (MISTRAL_V03, None, 1),
        (MISTRAL_V03, "Be kind.", 2),
        (QWEN3, None, 0),
    ]:
        tok = family_tokenizer(tiny_llama_dir, chat_template)
        encoder = Encoder(tok, with_system(template_for("hf", tok), system))
        prepared = prepare(convs, encoder, max_length=256)
        assert (len(prepared.examples), prepared.system_left_out) == (2, left_out)
        said = f"; {left_out} trained without their system prompt, which the chat template leaves out of a"
        assert (said in prepared.summary()) == bool(left_out)


def test_the_progress_bar_leaves_nothing_in_piped_output(tokenizer, capsys):
    """Out of a terminal there is no bar to draw: `vicuna train inspect > FILE` starts with its summary,
    not with the empty line a transient bar leaves behind."""
    from vicuna.train.data import Conversation

    conv = Conversation("c", (Message("user", "Hello!"), Message("assistant", "Hi!")))
    prepare([conv], Encoder(tokenizer, get_template("vicuna_v1.1")), max_length=64, progress=True)
    assert capsys.readouterr().out == ""


def openai_line(*messages, **fields):
    return json.dumps(
        {"messages": [dict(zip(("role", "content", "weight"), m, strict=False)) for m in messages], **fields}
    )


def test_replies_of_weight_0_carry_no_loss(tiny_llama_dir, tokenizer, tmp_path, capsys):
    """OpenAI's fine-tuning format marks a reply kept as context only with `"weight": 0`; it was trained
    on like any other. Its tokens are masked now, and an example whose every reply has weight 0 is left
    out, as a truncated one with no reply left is."""
    path = tmp_path / "data.jsonl"
    lines = [
        openai_line(
            ("user", "Hello!"),
            ("assistant", "Hi! How are you today?", 0),
            ("user", "The capital of France?"),
            ("assistant", "Paris.", 1),
        ),
        openai_line(
            ("user", "Hello!"),
            ("assistant", "Hi! How are you today?"),
            ("user", "The capital of France?"),
            ("assistant", "Paris."),
        ),
        openai_line(("user", "Hello!"), ("assistant", "Hi!", 0)),
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    out = tmp_path / "examples.jsonl"
    args = ["train", "inspect", "--data", str(path), "--model-path", str(tiny_llama_dir), "--json", str(out)]
    assert cli([*args, "--conv-template", "vicuna_v1.1"]) == 0
    shown = capsys.readouterr().out
    weighted, plain = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert weighted["input_ids"] == plain["input_ids"]
    learned = [
        t for t, label in zip(weighted["input_ids"], weighted["labels"], strict=True) if label != IGNORE
    ]
    assert tokenizer.decode(learned) == "Paris.</s>"
    paris = plain["labels"].index(learned[0])
    assert weighted["labels"][paris:] == plain["labels"][paris:]  # the reply of weight 1 as without weights
    assert "2 examples," in shown and "; 1 left out (every reply has weight 0)" in shown
    assert "ASSISTANT: Hi! How are you today?</s>USER:" in shown and "ASSISTANT:[[ Paris.</s>]]" in shown


def test_split_parts_whose_replies_all_have_weight_0_are_left_out(tokenizer):
    from vicuna.train.data import Conversation

    messages = []
    for i in range(4):
        messages += [Message("user", f"Hello! {i}"), Message("assistant", f"Hi! How are you today? {i}")]
    conv = Conversation("c", tuple(messages), (False, False, True, True))
    encoder = Encoder(tokenizer, get_template("vicuna_v1.1"))
    split = prepare([conv], encoder, max_length=len(encoder.encode(messages[:4])[0]), split_long=True)
    assert [e.source for e in split.examples] == ["c part 2"] and split.untrained == 1
    learned = tokenizer.decode([t for t in split.examples[0].labels if t != IGNORE])
    assert learned == "Hi! How are you today? 2</s> Hi! How are you today? 3</s>"


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        (
            (("user", "a"), ("assistant", "b", 0.5)),
            r"data\.jsonl:1 \(id 'w'\)\.messages\[1\]\.weight: expected 0 .* or 1, got 0\.5",
        ),
        ((("user", "a"), ("assistant", "b", True)), r"messages\[1\]\.weight: expected 0 .* got True"),
        ((("user", "a"), ("assistant", "b", "0")), r"messages\[1\]\.weight: expected 0 .* got '0'"),
        (
            (("user", "a", 0), ("assistant", "b")),
            r"messages\[0\]\.weight: only an assistant message has a weight",
        ),
        (
            (("user", "a"), ("assistant", "b", 1), ("assistant", "c", 0)),
            r"messages\[2\]\.weight: 0, after a reply of weight 1; replies in a row are joined",
        ),
    ],
)
def test_a_weight_other_than_0_or_1_names_the_record_and_field(tmp_path, messages, match):
    path = tmp_path / "data.jsonl"
    path.write_text(openai_line(*messages, id="w"), encoding="utf-8")
    with pytest.raises(VicunaError, match=match):
        load_conversations(path)


def test_weights_written_as_whole_floats_are_0_and_1(tmp_path):
    """pandas' to_json and JavaScript tools write a weight column as 0.0 and 1.0; they were refused
    ("expected 0 ... or 1, got 1.0"), while 0.5 stays refused (above)."""
    path = tmp_path / "data.jsonl"
    turns = (("user", "a"), ("assistant", "b", 0.0), ("user", "c"), ("assistant", "d", 1.0))
    path.write_text(openai_line(*turns), encoding="utf-8")
    [conversation] = load_conversations(path)
    assert conversation.trained == (False, True)


@pytest.mark.parametrize(
    ("env", "legend"),
    [({}, "green"), ({"NO_COLOR": "1"}, "inside [[ ]]"), ({"TERM": "dumb"}, "inside [[ ]]")],
)
def test_inspect_marks_the_tokens_with_loss_in_brackets_where_colours_do_not_show(
    env, legend, tiny_llama_dir, tmp_path, capsys, monkeypatch
):
    """On a terminal the tokens with loss were told apart by colour alone: under NO_COLOR (bold and dim
    left) or TERM=dumb (no styles), and to a screen reader, the legend said green and nothing was."""
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich takes pytest's captured output for a terminal
    monkeypatch.setenv("TERM", "xterm-256color")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([CONVERSATION]), encoding="utf-8")
    assert cli(["train", "inspect", "--data", str(data), "--model-path", str(tiny_llama_dir)]) == 0
    shown = capsys.readouterr().out
    assert f"tokens with loss are {legend};" in shown
    assert ("[[ Hi! How are you today?</s>]]" in shown) == (legend != "green")


def test_inspect_shows_each_example_s_counts_whole_after_a_long_path(
    tiny_llama_dir, tmp_path, capsys, monkeypatch
):
    """Each example's heading was a rule's title, which rich cuts at "…" to fit the width: after a long path
    (or in a narrow terminal) "data.json[0]: 114 t…" lost the tokens with loss and "truncated"."""
    monkeypatch.setenv("COLUMNS", "60")
    folder = tmp_path / ("a-folder-with-a-long-name-" * 2)
    folder.mkdir()
    data = folder / "data.json"
    data.write_text(json.dumps([CONVERSATION]), encoding="utf-8")
    assert cli(["train", "inspect", "--data", str(data), "--model-path", str(tiny_llama_dir)]) == 0
    shown = capsys.readouterr().out
    assert re.search(rf"{re.escape(str(data))}\[0\] \(id 'c1'\): \d+ tokens, \d+ with loss", shown), shown


def test_inspect_shows_the_data_s_path_with_brackets_in_it_as_it_is(tiny_llama_dir, tmp_path, capsys):
    """rich took "[v2]" in the data's path for markup and left it out (on Windows it took the backslash
    before it for its escape), in each example's heading and in "wrote N examples to"."""
    folder = tmp_path / "数据[v2]"
    folder.mkdir()
    data, out = folder / "data.json", folder / "examples.jsonl"
    data.write_text(json.dumps([CONVERSATION]), encoding="utf-8")
    args = ["train", "inspect", "--data", str(data), "--model-path", str(tiny_llama_dir), "--json", str(out)]
    assert cli(args) == 0
    shown = capsys.readouterr().out
    assert f"{data}" in shown and f"wrote 1 examples to {out}" in shown


def test_inspect_names_the_examples_truncation_left_without_a_reply(tiny_llama_dir, tmp_path, capsys):
    """An example whose replies all lie past --max-length is left out: the summary counted it, but no
    line said which one, so a user could not find the conversation to shorten or split."""
    long = {
        "id": "long",
        "conversations": [{"from": "human", "value": "word " * 200}, {"from": "gpt", "value": "ok"}],
    }
    data = tmp_path / "data.json"
    data.write_text(json.dumps([CONVERSATION, long]), encoding="utf-8")
    args = [
        "train",
        "inspect",
        "--data",
        str(data),
        "--model-path",
        str(tiny_llama_dir),
        "--max-length",
        "100",
    ]
    assert cli(args) == 0
    shown = capsys.readouterr().out
    assert "1 truncated to --max-length 100, 1 of them left out (no assistant text left)" in shown
    assert f"left out: {data}[1] (id 'long'): no assistant text within --max-length 100" in shown
