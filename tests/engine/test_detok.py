"""Streaming text: whole characters only, pieces that add up to the full decode, stop strings held back."""

from __future__ import annotations

import random

import pytest

from vicuna.engine.detok import IncrementalDecoder, StopMatcher, TokenBytes

TEXT = "Hello 世界! 你好，今天天气很好。龍🐉 emoji and 中文 mixed."


def stream(tokenizer, ids):
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.add(i) for i in ids]
    pieces.append(decoder.flush())
    return pieces


@pytest.fixture(scope="module")
def sp_tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_sentencepiece_byte_fallback_streams_whole_characters(sp_tokenizer):
    ids = sp_tokenizer(TEXT, add_special_tokens=False).input_ids
    tokens = sp_tokenizer.convert_ids_to_tokens(ids)
    assert any(t.startswith("<0x") for t in tokens), "the text should need byte-fallback tokens"
    pieces = stream(sp_tokenizer, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == sp_tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("prompt", ["The capital of France is", "今天天气", "USER: Hi ASSISTANT:"])
def test_a_reply_continues_its_prompt_with_the_space_sentencepiece_gives_its_first_word(sp_tokenizer, prompt):
    # LLaMA's tokenizer decodes "▁Paris" alone as "Paris": a completion read "isParis"
    prompt_ids = sp_tokenizer(prompt).input_ids  # with BOS, as a prompt is
    ids = sp_tokenizer(f"{prompt} Paris is 很好", add_special_tokens=False).input_ids[len(prompt_ids) - 1 :]
    decoder = IncrementalDecoder(sp_tokenizer, prompt_ids)
    reply = "".join([*(decoder.add(i) for i in ids), decoder.flush()])
    assert sp_tokenizer.decode(prompt_ids, skip_special_tokens=True) + reply == f"{prompt} Paris is 很好"


def test_a_reply_that_ends_a_character_its_prompt_began_gives_what_follows(sp_tokenizer):
    ids = sp_tokenizer("🐉好", add_special_tokens=False).input_ids
    first_byte = sp_tokenizer.convert_ids_to_tokens(ids).index("<0xF0>")  # of 🐉, in byte-fallback tokens
    decoder = IncrementalDecoder(sp_tokenizer, ids[: first_byte + 1])  # the prompt ends inside 🐉
    assert "".join([*(decoder.add(i) for i in ids[first_byte + 1 :]), decoder.flush()]) == "好"


@pytest.mark.parametrize("reply", ["👋好", "龍🐉 ok", "é"])
def test_a_reply_after_a_prompt_that_ends_in_byte_tokens_is_whole_characters(sp_tokenizer, reply):
    # a completion of "我喜欢🐉": the window began at 🐉's last byte token, with which ByteFallback decoded the
    # reply's own byte tokens as U+FFFD ("����好")
    prompt_ids = sp_tokenizer("我喜欢🐉").input_ids
    assert sp_tokenizer.convert_ids_to_tokens(prompt_ids)[-1] == "<0x89>"
    ids = sp_tokenizer(f"我喜欢🐉{reply}", add_special_tokens=False).input_ids[len(prompt_ids) - 1 :]
    decoder = IncrementalDecoder(sp_tokenizer, prompt_ids)
    assert "".join([*(decoder.add(i) for i in ids), decoder.flush()]) == reply


def test_byte_level_bpe_streams_whole_characters():
    tokenizer = byte_per_token_tokenizer()  # every UTF-8 byte its own token, the hardest case
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    assert len(ids) == len(TEXT.encode())
    pieces = stream(tokenizer, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == TEXT


def byte_per_token_tokenizer():
    """A byte-level BPE with no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    raw = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=raw)


def test_each_token_s_own_bytes_byte_level_bpe():
    tokenizer = byte_per_token_tokenizer()
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    token_bytes = TokenBytes(tokenizer)
    assert [token_bytes(i) for i in ids] == [
        bytes([b]) for b in TEXT.encode()
    ]  # every one of the 256 spellings
    split = ids[TEXT.encode().index("世".encode())]  # the first byte of a 3-byte character
    assert token_bytes.text(split) == "\\xe4"


def test_each_token_s_own_bytes_sentencepiece(sp_tokenizer):
    ids = sp_tokenizer(TEXT, add_special_tokens=False).input_ids
    token_bytes = TokenBytes(sp_tokenizer)
    assert b"".join(token_bytes(i) for i in ids).decode() == " " + TEXT  # the word-boundary mark is a space
    tokens = sp_tokenizer.convert_ids_to_tokens(ids)
    byte_token = ids[next(i for i, t in enumerate(tokens) if t.startswith("<0x"))]
    assert len(token_bytes(byte_token)) == 1 and token_bytes.text(byte_token).startswith("\\x")


def test_a_character_cut_by_the_token_limit_is_dropped_not_broken():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(
        models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[])
    )
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw)
    ids = tokenizer("ok 👌", add_special_tokens=False).input_ids
    pieces = stream(tokenizer, ids[:-2])  # the emoji's last two bytes never come
    assert "".join(pieces) == "ok " and all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("text", ["ok 👌", "你好👋🏽", "家族👨\u200d👩\u200d👧"])
def test_a_character_cut_in_sentencepiece_byte_tokens_is_dropped_not_broken(sp_tokenizer, text):
    # its byte tokens decode as one U+FFFD for each byte: with two or three of an emoji's four bytes the
    # reply (or a Ctrl-C's) ended in U+FFFD, in the chat's saved conversation too
    ids, token_bytes = sp_tokenizer(text, add_special_tokens=False).input_ids, TokenBytes(sp_tokenizer)
    for cut in range(1, len(ids) + 1):
        whole = b"".join(token_bytes(i) for i in ids[:cut]).decode("utf-8", errors="ignore")
        assert "".join(stream(sp_tokenizer, ids[:cut])) == whole.lstrip(" ")  # the whole characters


@pytest.mark.parametrize("seed", range(20))
def test_stop_strings_across_any_split(seed):
    rng = random.Random(seed)
    text = "The answer is 42.\nUSER: next question ### end"
    stop = rng.choice(["\nUSER:", "###", "42.", "question"])
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 12)))
    parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    matcher = StopMatcher([stop, "never appears"])
    shown = ""
    for part in parts:
        piece = matcher.push(part)
        assert stop not in shown + piece
        shown += piece
        if matcher.matched:
            break
    shown += matcher.flush()
    assert matcher.matched == stop
    assert shown == text[: text.index(stop)]


@pytest.mark.parametrize("seed", range(10))
def test_only_what_may_begin_a_stop_is_held_back(seed):
    # many stop strings over a small alphabet: the text held back is exactly the longest end of the text so
    # far that some stop string begins with, however often its characters repeat ("aab" after "xaaa")
    rng = random.Random(seed)
    stops = ["".join(rng.choices("ab\n", k=rng.randint(2, 6))) for _ in range(24)]
    matcher, text, shown = StopMatcher(stops), "", ""
    while matcher.matched is None and len(text) < 200:
        part = "".join(rng.choices("ab\nx", k=rng.randint(1, 4)))
        text += part
        shown += matcher.push(part)
        if matcher.matched is None:
            held = max(
                (
                    n
                    for n in range(len(text) + 1)
                    for s in stops
                    if n < len(s) and s.startswith(text[len(text) - n :])
                ),
                default=0,
            )
            assert shown == text[: len(text) - held]
    if matcher.matched is not None:
        at = min(text.find(s) for s in stops if s in text)
        assert shown == text[:at] and text[at:].startswith(matcher.matched)


def test_text_holding_two_stop_strings_is_cut_at_the_first():
    matcher = StopMatcher(["\nUSER:", "###"])  # a request's stop and a template's, in one piece of text
    assert matcher.push("Paris.### Human: hi\nUSER: more") == "Paris."
    assert matcher.matched == "###"


def test_no_stop_string_ends_in_quiet_text_but_one_that_ends_after_it_does():
    # quiet: the text of a reply still shorter than its min_new_tokens (vLLM's min_tokens)
    matcher = StopMatcher(["ab"])
    assert matcher.push("ab", quiet=True) == "ab" and matcher.matched is None
    assert matcher.push("xab") == "x" and matcher.matched == "ab"
    straddling = StopMatcher(["ab", "c"])
    assert straddling.push("xc", quiet=True) + straddling.push("a", quiet=True) == "xc"
    assert straddling.push("b") == "" and straddling.matched == "ab"


@pytest.mark.parametrize("seed", range(20))
def test_a_stop_is_matched_where_it_first_ends_after_the_quiet_text(seed):
    rng = random.Random(seed)
    stops = ["".join(rng.choices("ab", k=rng.randint(1, 3))) for _ in range(3)]
    parts = ["".join(rng.choices("abx", k=rng.randint(1, 3))) for _ in range(12)]
    quiet = rng.randint(0, len(parts))
    quiet_len = len("".join(parts[:quiet]))
    matcher, shown, text, want = StopMatcher(stops), "", "", None
    for i, part in enumerate(parts):
        text += part
        shown += matcher.push(part, quiet=i < quiet)
        ends = [text.find(s, max(quiet_len - len(s) + 1, 0)) for s in stops]
        if i >= quiet and max(ends) != -1:
            want = min(at for at in ends if at != -1)
            break
    shown += matcher.flush()
    assert (matcher.matched is not None) == (want is not None)
    assert shown == (text if want is None else text[:want])


def test_text_that_only_looks_like_a_stop_is_released():
    matcher = StopMatcher(["</s>"])
    assert matcher.push("a </") == "a "
    assert matcher.push("b>") == "</b>"
    assert matcher.push("<") == ""
    assert matcher.flush() == "<"
    assert matcher.matched is None
