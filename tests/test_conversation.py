"""Templates render exactly what each model family was trained on, and mark assistant spans."""

from __future__ import annotations

import json
import re

import pytest

from vicuna.cli import main as cli
from vicuna.conversation import (
    VICUNA_SYSTEM,
    HFTemplate,
    Message,
    MessagesError,
    Segment,
    check_alternating,
    choose_template_name,
    fit_history,
    get_template,
    parse_messages,
    render,
    with_system,
)
from vicuna.errors import VicunaError

CHAT = [Message("user", "Hello!"), Message("assistant", "Hi!"), Message("user", "你好")]
DONE = [*CHAT, Message("assistant", "你好！")]


def test_vicuna_v11_is_exactly_the_trained_format():
    assert render(get_template("vicuna_v1.1"), CHAT) == (
        f"{VICUNA_SYSTEM} USER: Hello! ASSISTANT: Hi!</s>USER: 你好 ASSISTANT:"
    )


def test_vicuna_v0():
    assert render(get_template("vicuna_v0"), CHAT[:1]) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions.\n### Human: Hello!\n### Assistant:"
    )
    assert render(get_template("vicuna_v0"), CHAT).endswith(
        "### Human: Hello!\n### Assistant: Hi!\n### Human: 你好\n### Assistant:"
    )


def test_llama2_with_and_without_system():
    t = get_template("llama-2")
    assert render(t, CHAT) == "[INST] Hello! [/INST] Hi! </s><s>[INST] 你好 [/INST]"
    assert render(with_system(t, "Be brief."), CHAT[:1]) == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHello! [/INST]"
    )


def test_llama2_wraps_an_empty_system_prompt_as_meta_does_and_only_none_has_no_block():
    """An explicitly empty system message lost its `<<SYS>>` block, which Meta's reference code and the HF
    chat template both give it (`B_SYS + "" + E_SYS`); only a conversation without one has none."""
    t, hello = get_template("llama-2"), CHAT[:1]
    empty = "[INST] <<SYS>>\n\n<</SYS>>\n\nHello! [/INST]"
    assert render(t, [Message("system", ""), *hello]) == empty
    assert render(with_system(t, ""), hello) == empty  # `--conv-system-msg ""`: as `hf` has it
    assert render(t, hello) == "[INST] Hello! [/INST]"  # no system message: the default, none
    assert render(with_system(t, "S"), [Message("system", ""), *hello]) == empty  # the message's own
    trained = t.segments([Message("system", ""), *DONE[:2]], add_generation_prompt=False)
    assert [(s.text, s.trainable) for s in trained] == [(empty, False), (" Hi! </s>", True)]


def test_chatml_gives_an_empty_system_prompt_a_system_turn_and_none_without_one():
    """As the models' own ChatML templates (Qwen's, SmolLM2's) render `{"role": "system", "content": ""}`."""
    t, hello = get_template("chatml"), CHAT[:1]
    asked = "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    empty = "<|im_start|>system\n<|im_end|>\n" + asked
    assert render(t, [Message("system", ""), *hello]) == empty
    assert render(with_system(t, ""), hello) == empty  # `--conv-system-msg ""`
    assert render(t, hello) == asked  # no system message: none


def test_llama2_strips_each_turn_as_meta_reference_does():
    # Meta's chat_completion: f"[INST] {(B_SYS + system + E_SYS + user).strip()} [/INST] {answer.strip()} "
    untidy = [Message("user", "Hello!\n"), Message("assistant", " Hi! "), Message("user", " 你好")]
    t = get_template("llama-2")
    assert render(t, untidy) == "[INST] Hello! [/INST] Hi! </s><s>[INST] 你好 [/INST]"
    assert render(with_system(t, "S"), untidy[:1]) == "[INST] <<SYS>>\nS\n<</SYS>>\n\nHello! [/INST]"


def test_llama2_gives_the_system_prompt_in_the_first_turn_only():
    assert render(with_system(get_template("llama-2"), "S"), CHAT) == (
        "[INST] <<SYS>>\nS\n<</SYS>>\n\nHello! [/INST] Hi! </s><s>[INST] 你好 [/INST]"
    )


def test_chatml():
    msgs = [Message("system", "S"), *CHAT]
    assert render(get_template("chatml"), msgs) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\nHi!<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("name", ["vicuna_v1.1", "vicuna_v0", "llama-2", "llama-3", "chatml"])
def test_trainable_segments_are_exactly_the_replies_and_end_markers(name):
    t = get_template(name)
    segments = t.segments(DONE, add_generation_prompt=False)
    trainable = [s.text for s in segments if s.trainable]
    assert len(trainable) == 2
    for reply, text in zip(["Hi!", "你好！"], trainable, strict=True):
        assert text.strip().startswith(reply)
        assert text.rstrip().endswith(t.stop[0])
    # the prompt for a reply is the rendering up to where that reply starts
    whole = "".join(s.text for s in segments)
    assert whole.startswith(render(t, CHAT).rstrip())


def test_system_message_and_override():
    t = get_template("vicuna_v1.1")
    assert render(t, [Message("system", "SYS"), Message("user", "q")]) == "SYS USER: q ASSISTANT:"
    assert render(with_system(t, "Other."), [Message("user", "q")]) == "Other. USER: q ASSISTANT:"


def test_builtin_templates_join_consecutive_roles_and_read_a_later_system_message_as_user_text():
    t = get_template("vicuna_v1.1")
    assert render(t, [Message("user", "a"), Message("user", "b")]) == (
        f"{VICUNA_SYSTEM} USER: a\n\nb ASSISTANT:"
    )
    # an empty message adds no blank line
    assert render(t, [Message("user", ""), Message("user", "b")]) == f"{VICUNA_SYSTEM} USER: b ASSISTANT:"
    mid_system = [
        Message("system", "S"),
        Message("system", "T"),
        Message("user", "a"),
        Message("assistant", "x"),
        Message("assistant", "y"),
        Message("system", "be brief"),
        Message("user", "b"),
    ]
    assert render(t, mid_system) == "S\n\nT USER: a ASSISTANT: x\n\ny</s>USER: be brief\n\nb ASSISTANT:"
    assert render(get_template("chatml"), [Message("user", "a"), Message("system", "s")]).endswith(
        "<|im_start|>user\na\n\ns<|im_end|>\n<|im_start|>assistant\n"
    )


def test_bad_turn_order_names_the_message():
    t = get_template("vicuna_v1.1")

    def refused(messages) -> MessagesError:
        with pytest.raises(MessagesError) as info:
            render(t, messages)
        return info.value

    err = refused([Message("system", "s"), Message("assistant", "a"), Message("user", "b")])
    assert err.param == "messages[1]" and "expected a user message, got an assistant message" in str(err)
    err = refused([Message("user", "a"), Message("assistant", "b")])
    assert err.param == "messages[1]" and "last message must be a user" in str(err)
    assert refused([Message("system", "s")]).param == "messages"
    with pytest.raises(MessagesError, match="last message must be an assistant"):
        t.segments([Message("user", "a")], add_generation_prompt=False)


def test_the_model_s_own_template_asked_for_where_it_has_none_is_refused():
    with pytest.raises(VicunaError, match="--conv-template hf: this model's tokenizer has no chat template"):
        choose_template_name("hf", has_chat_template=False, model_name="vicuna-7b-v1.5")
    assert choose_template_name("hf", has_chat_template=True, model_name="vicuna-7b-v1.5") == "hf"


def test_chat_turn_order_check_names_the_message():
    check_alternating([Message("system", "s"), Message("user", "a"), Message("assistant", "b")])
    check_alternating([Message("user", "a")])  # a last user message awaits its reply
    with pytest.raises(
        MessagesError, match=r"^c\.json\[1\]: expected an assistant message, got a user one"
    ) as info:
        check_alternating([Message("user", "a"), Message("user", "b")], source="c.json")
    assert info.value.param == "c.json[1]"
    with pytest.raises(MessagesError, match=r"\[0\]: expected a user message, got an assistant one"):
        check_alternating([Message("assistant", "a")])
    with pytest.raises(MessagesError, match="at least one user message"):
        check_alternating([Message("system", "s")])


def words(messages):  # a prompt's token ids: one a word
    return [0] * sum(len(m.content.split()) for m in messages)


def chat_of(*lengths):
    """A system prompt of 1 word, then user and assistant messages of these many words, alternating."""
    roles = ["user", "assistant"] * len(lengths)
    return [Message("system", "s")] + [Message(r, "w " * n) for r, n in zip(roles, lengths, strict=False)]


def test_fit_history_keeps_a_prompt_that_fills_the_room_exactly():
    chat = chat_of(10, 10, 10)
    assert fit_history(words, 31 + 8, chat, 8) == (chat, 0, 8)
    assert fit_history(words, 30 + 8, chat, 8) == ([chat[0], chat[3]], 1, 27)  # a token more: one goes


def test_fit_history_leaves_out_enough_for_the_prompt_to_take_at_most_three_quarters_of_its_room():
    chat = chat_of(10, 10, 10, 10, 10, 10, 10, 10, 10)  # 91 tokens; 71, 51, 31 or 11 with 1-4 exchanges out
    kept, dropped, room = fit_history(words, 80 + 10, chat, 10)  # room 80: 3/4 of it is 60
    assert (kept, dropped, room) == ([chat[0], *chat[5:]], 2, 90 - 51)


def test_fit_history_leaves_out_the_fewest_that_fit_where_the_last_exchanges_alone_take_more():
    chat = chat_of(10, 10, 10, 10, 100)  # 141 tokens; 121 or 101 with 1 or 2 exchanges out
    assert fit_history(words, 125 + 10, chat, 10)[1] == 1  # 3/4 of 125 is never reached: 121 fits


def test_fit_history_never_leaves_out_the_last_message():
    """A chat whose last prompt left out more exchanges than it now has (`!!remove`, `!!load`)."""
    chat = chat_of(10, 10, 10)
    assert fit_history(words, 100, chat, 10, left_out=5) == ([chat[0], chat[3]], 1, 100 - 11)


def _fake_chatml(msgs, add_generation_prompt):
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_hf_template_finds_assistant_spans_by_prefix_rendering():
    t = HFTemplate(_fake_chatml, stop=("<|im_end|>",))
    assert render(t, CHAT) == _fake_chatml([{"role": m.role, "content": m.content} for m in CHAT], True)
    trainable = [s.text for s in t.segments(DONE, add_generation_prompt=False) if s.trainable]
    assert trainable == ["Hi!<|im_end|>\n", "你好！<|im_end|>\n"]


def _fake_phi3(msgs, add_generation_prompt):
    """Phi-3's template: its EOS ends a conversation rendered without a generation prompt."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in msgs)
    return text + ("<|assistant|>\n" if add_generation_prompt else "<|endoftext|>")


def test_hf_template_finds_the_spans_where_only_a_conversation_s_end_has_eos():
    """Phi-3's template writes its EOS after the last turn only: every conversation of more than one
    exchange was refused as not locatable."""
    t = HFTemplate(_fake_phi3, stop=("<|endoftext|>", "<|end|>"))
    segments = t.segments(DONE, add_generation_prompt=False)
    assert "".join(s.text for s in segments) == _fake_phi3(
        [{"role": m.role, "content": m.content} for m in DONE], False
    )
    trainable = [s.text for s in segments if s.trainable]
    assert trainable == ["Hi!<|end|>\n", "你好！<|end|>\n<|endoftext|>"]


def test_hf_template_system_override_even_an_empty_one_replaces_the_template_default():
    msgs = [{"role": "user", "content": "Hello!"}]
    assert render(HFTemplate(_fake_chatml), CHAT[:1]) == _fake_chatml(msgs, True)  # the template's own
    for system in ("Be brief.", ""):  # `--conv-system-msg ""`: an empty system prompt, as asked
        expected = _fake_chatml([{"role": "system", "content": system}, *msgs], True)
        assert render(with_system(HFTemplate(_fake_chatml), system), CHAT[:1]) == expected


def _dicts(messages):
    return [{"role": m.role, "content": m.content} for m in messages]


def test_hf_template_finds_the_replies_in_the_whole_where_prefixes_are_rendered_anew():
    """A template that renders the start of a conversation differently once it goes on (Mistral v0.3's
    system prompt in the last user turn, Qwen3's dropped <think>) had every conversation of two exchanges
    refused; the replies are now found in the one rendering of the whole, each with its end-of-turn
    marker and without the line break the template writes after it."""

    def numbered(msgs, gen):  # no prefix of the conversation is rendered as the start of the next
        return f"{len(msgs)}:" + _fake_chatml(msgs, gen)

    segments = HFTemplate(numbered, stop=("<|im_end|>",)).segments(DONE, add_generation_prompt=False)
    assert "".join(s.text for s in segments) == numbered(_dicts(DONE), False)
    assert [s.text for s in segments if s.trainable] == ["Hi!<|im_end|>", "你好！<|im_end|>"]
    assert render(HFTemplate(numbered), CHAT).startswith("3:")  # a prompt needs no span: one rendering

    def spaced(msgs, gen):  # Mistral's and Llama 2's: a space between a reply and its EOS
        text = "".join(
            f"[{m['role']}] {m['content']}" + (" </s>" if m["role"] == "assistant" else "") for m in msgs
        )
        return f"{len(msgs)}:{text}" + ("[assistant]" if gen else "")

    segments = HFTemplate(spaced, stop=("</s>",)).segments(DONE, add_generation_prompt=False)
    # the spaces are the model's to write: the one before the reply (as Mistral's) and the one before </s>
    assert [s.text for s in segments if s.trainable] == [" Hi! </s>", " 你好！ </s>"]


def test_hf_template_replies_found_in_the_whole_hold_no_text_of_the_prompt():
    """DeepSeek-R1's template ends the generation prompt with '<think>\\n', which a conversation rendered
    whole has nowhere: what the template writes ahead of a reply is then nothing, not the text after a
    line break of the user's that happens to end like the prompt."""

    def r1(msgs, gen):
        text = "".join(
            f"<|{m['role']}|>{m['content']}" + ("<|end|>" if m["role"] == "assistant" else "") for m in msgs
        )
        return text + ("<|assistant|><think>\n" if gen else "")

    two_lines = [Message("user", "Hello\nthere"), Message("assistant", "Hi!")]
    segments = HFTemplate(r1, stop=("<|end|>",)).segments(two_lines, add_generation_prompt=False)
    assert segments == [Segment("<|user|>Hello\nthere<|assistant|>"), Segment("Hi!<|end|>", trainable=True)]


def test_hf_template_whose_replies_cannot_be_located_is_an_error():
    def numbered(msgs, gen):
        return f"{len(msgs)}:" + _fake_chatml(msgs, gen)

    def echoed(msgs, gen):  # each reply written twice
        return numbered(msgs, gen) + "".join(m["content"] for m in msgs if m["role"] == "assistant")

    def measured(msgs, gen):  # the replies' length heads the conversation
        length = sum(len(m["content"]) for m in msgs if m["role"] == "assistant")
        return f"{length}:" + _fake_chatml(msgs, gen)

    for apply, why in [
        (echoed, "does not write message 1's text in one place"),
        (measured, "renders the other messages differently with message 1's text"),
        (numbered, r"writes no end-of-turn marker \(none known\) after message 1"),
    ]:
        stop = () if apply is numbered else ("<|im_end|>",)
        with pytest.raises(VicunaError, match=why):
            HFTemplate(apply, stop=stop).segments(DONE, add_generation_prompt=False)


def test_hf_template_gets_the_messages_as_they_are():
    calls = []

    def apply(msgs, gen):
        calls.append(msgs)
        return _fake_chatml(msgs, gen)

    t = HFTemplate(apply)
    odd = [Message("user", "a"), Message("user", "b"), Message("system", "s"), Message("user", "c")]
    assert render(t, odd) == _fake_chatml([{"role": m.role, "content": m.content} for m in odd], True)
    assert calls == [[{"role": m.role, "content": m.content} for m in odd]]
    two_replies = [Message("user", "a"), Message("assistant", "x"), Message("assistant", "y")]
    trainable = [s.text for s in t.segments(two_replies, add_generation_prompt=False) if s.trainable]
    assert trainable == ["x<|im_end|>\n", "y<|im_end|>\n"]


def test_a_chat_template_that_refuses_the_messages_is_a_messages_error():
    def alternating_only(msgs, gen):
        raise RuntimeError("Conversation roles must alternate user/assistant/user/assistant/...")

    with pytest.raises(MessagesError, match="roles must alternate") as info:
        render(HFTemplate(alternating_only), [Message("user", "a"), Message("user", "b")])
    assert info.value.param == "messages"


def test_a_chat_template_that_refuses_system_messages_says_so():
    """Gemma 2's template raises 'System role not supported': the error said the template 'cannot render
    these messages', and `vicuna train` counted such conversations as assistant text not locatable."""

    def no_system(msgs, gen):
        if msgs[0]["role"] == "system":
            raise RuntimeError("System role not supported")
        return _fake_chatml(msgs, gen)

    for template, messages in [
        (HFTemplate(no_system), [Message("system", "s"), *CHAT]),
        (
            with_system(HFTemplate(no_system), "Be brief."),
            CHAT,
        ),
    ]:
        with pytest.raises(MessagesError) as info:
            render(template, messages)
        assert str(info.value) == (
            "messages: the model's chat template refuses system messages (System role not supported): leave "
            "them (and --conv-system-msg) out, or put their text into the first user message"
        )
    with pytest.raises(MessagesError, match=r"cannot render these messages \(System role"):  # not the system
        render(HFTemplate(no_system), [Message("system", "s")])


def test_choice_order():
    assert choose_template_name("chatml", has_chat_template=True, model_name="x") == "chatml"
    assert choose_template_name(None, has_chat_template=True, model_name="vicuna-7b-v1.5") == "hf"
    assert (
        choose_template_name(None, has_chat_template=False, model_name="vicuna-13b-delta-v0") == "vicuna_v0"
    )
    assert choose_template_name(None, has_chat_template=False, model_name="vicuna-7b-v1.3") == "vicuna_v1.1"
    assert choose_template_name(None, has_chat_template=False, model_name="llama-7b-hf") == "vicuna_v1.1"
    with pytest.raises(VicunaError, match="unknown template"):
        choose_template_name("nope", has_chat_template=False, model_name="x")


@pytest.mark.parametrize("command", ["chat", "serve", "doctor", "train"])
def test_fastchat_s_template_names_are_refused_as_read_with_the_one_to_use(command, tmp_path, capsys):
    # before the model is looked for (here: a folder that does not exist), not after a minute of loading it
    argv = [command, "--model-path", str(tmp_path / "vicuna-13b"), "--conv-template", "one_shot"]
    with pytest.raises(SystemExit):
        cli(argv)
    err = capsys.readouterr().err
    assert "unknown template 'one_shot'" in err and "FastChat's one_shot is vicuna_v0 here" in err
    with pytest.raises(SystemExit):
        cli(["chat", "--conv-template", "mistral"])
    assert "hf: the model's own chat template" in capsys.readouterr().err


def test_parse_messages_errors_name_the_field():
    assert parse_messages(
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    ) == [Message("user", "a\nb")]  # separate parts, not one word
    with pytest.raises(VicunaError, match=r"messages\[0\]\.role"):
        parse_messages([{"role": "tool", "content": "x"}])
    with pytest.raises(VicunaError, match=r"messages\[0\]\.content"):
        parse_messages([{"role": "user", "content": 3}])
    with pytest.raises(MessagesError) as info:
        parse_messages([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "image"}]}])
    assert info.value.param == "messages[1].content[0]"


@pytest.mark.parametrize(
    "part,param,says",
    [  # the image's own type named; a text part without its text was told "only text parts are supported"
        ({"type": "image_url", "image_url": {"url": "x"}}, "content[0]", "not a part of type 'image_url'"),
        ("hello", "content[0]", "not an object with a 'type'"),
        ({"type": "text", "text": 5}, "content[0].text", "expected a string"),
        ({"type": "text"}, "content[0].text", "expected a string"),
    ],
)
def test_a_content_part_error_says_what_is_wrong_with_it(part, param, says):
    with pytest.raises(MessagesError) as info:
        parse_messages([{"role": "user", "content": [part]}])
    assert info.value.param == f"messages[0].{param}" and says in str(info.value), str(info.value)


def test_template_cli_list_and_render(tmp_path, capsys):
    assert cli(["template", "list"]) == 0
    assert "vicuna_v1.1" in capsys.readouterr().out
    f = tmp_path / "m.json"
    f.write_text(json.dumps([{"role": "user", "content": "Hello!"}]), encoding="utf-8")
    assert cli(["template", "render", "vicuna_v1.1", "--messages", str(f)]) == 0
    assert capsys.readouterr().out == f"{VICUNA_SYSTEM} USER: Hello! ASSISTANT:"
    f.write_text("[{", encoding="utf-8")
    assert cli(["template", "render", "chatml", "--messages", str(f)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_template_render_hf_of_a_model_without_a_chat_template_says_so(tiny_llama_dir, tmp_path, capsys):
    """It blamed the messages: "messages: the model's chat template cannot render these messages"."""
    f = tmp_path / "m.json"
    f.write_text(json.dumps([{"role": "user", "content": "Hello!"}]), encoding="utf-8")
    assert cli(["template", "render", "hf", "--messages", str(f), "--model-path", str(tiny_llama_dir)]) == 2
    err = capsys.readouterr().err
    assert f"error: {tiny_llama_dir}: its tokenizer has no chat template for `hf` to render" in err


@pytest.mark.parametrize(
    "model_name, expected",
    [
        ("vicuna-13b-delta-v0", "vicuna_v0"),
        ("vicuna_7b_v0", "vicuna_v0"),
        ("vicuna-7b-v0.Q4_0-0123456789ab", "vicuna_v0"),  # a GGUF file's converted copy
        ("vicuna-13b-v1.5-gptq-v0.1", "vicuna_v1.1"),
        ("vicuna-7b-v1.5-rev0", "vicuna_v1.1"),
        ("vicuna-fans/vicuna-7b-v1.3", "vicuna_v1.1"),
        ("vicuna-org/Mistral-7B-Instruct-v0.2", "vicuna_v1.1"),
        ("Mistral-7B-Instruct-v0.2", "vicuna_v1.1"),
        ("zephyr-7b-v0", "vicuna_v1.1"),  # a v0 of a model that is not Vicuna
        ("vicuna-fans/zephyr-7b-v0", "vicuna_v1.1"),  # nor is it by its owner's name
    ],
)
def test_vicuna_v0_is_picked_by_a_v0_version_not_by_v0_anywhere_in_the_name(model_name, expected):
    """`"vicuna" in name and "v0" in name` gave a Vicuna v1.x fine-tune versioned v0.1 (or a Hub repository
    whose owner's name holds vicuna) the `### Human:` template it was never trained on."""
    assert choose_template_name(None, has_chat_template=False, model_name=model_name) == expected


@pytest.mark.parametrize(
    "model_name, expected",
    [
        ("Llama2-7b-chat", "llama-2"),
        ("llama-2-13b-chat-hf", "llama-2"),
        ("meta-llama/Llama-2-7b-chat-hf", "llama-2"),
        ("llama2_7b_chat", "llama-2"),
        ("Llama-2-7B-Chat.Q4_K_M-0123456789ab", "llama-2"),  # a GGUF file's converted copy
        ("llama-2-7b-hf", "vicuna_v1.1"),
        ("openchat-llama-2-13b", "vicuna_v1.1"),  # its own format, not Llama 2 chat's
        ("llama-2-7b-chatml", "vicuna_v1.1"),
    ],
)
def test_llama_2_chat_is_picked_by_its_common_spellings(model_name, expected):
    """Only `llama-2` with a hyphen was looked for: Llama2-7b-chat and llama2_7b_chat, without a chat
    template, got vicuna_v1.1's `USER: ... ASSISTANT:` and their replies ran on; and `chat` was any
    substring (openchat, chatml)."""
    assert choose_template_name(None, has_chat_template=False, model_name=model_name) == expected


def test_llama_3_is_exactly_the_published_format():
    msgs = [Message("system", "S"), CHAT[0], Message("assistant", " Hi!\n"), Message("user", " 你好\n")]
    assert render(get_template("llama-3"), msgs) == (
        "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n你好<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert get_template("llama-3").stop == ("<|eot_id|>",)


@pytest.mark.parametrize(
    "model_name, special_tokens, expected",
    [
        ("Meta-Llama-3-8B-Instruct", (), "llama-3"),
        ("meta-llama/Llama-3.1-8B-Instruct", (), "llama-3"),
        ("llama3_8b_instruct", (), "llama-3"),
        ("Meta-Llama-3.1-8B-Instruct.Q4_K_M-0123456789ab", (), "llama-3"),  # a GGUF file's converted copy
        (
            "my-model",
            ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            "llama-3",
        ),
        ("Meta-Llama-3-8B", (), "vicuna_v1.1"),  # a base model, named so, with another tokenizer
        ("my-model", ("<|eot_id|>",), "vicuna_v1.1"),
    ],
)
def test_a_llama_3_model_without_a_chat_template_gets_llama_3(model_name, special_tokens, expected):
    """A Llama 3 model whose tokenizer has no chat template (an old conversion, a GGUF file without one) got
    vicuna_v1.1, and its replies stopped only at a literal `</s>`, which Llama 3 never writes."""
    chosen = choose_template_name(
        None, has_chat_template=False, model_name=model_name, special_tokens=special_tokens
    )
    assert chosen == expected


@pytest.mark.parametrize(
    ("role", "content", "error"),
    [
        ("Assistant", "Hi!", "role: expected one of system, user, assistant, got 'Assistant'"),
        ("human", "Hi!", "role: expected one of system, user, assistant, got 'human'"),
        ("user", None, "content: expected a string, got NoneType"),
    ],
)
def test_a_message_made_in_python_with_a_role_no_template_knows_is_refused(role, content, error):
    """Type hints check nothing at run time: Message("Assistant", ...) was rendered as a user turn."""
    with pytest.raises(MessagesError, match=re.escape(error)):
        Message(role, content)
