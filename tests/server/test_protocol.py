"""The request schemas: what is accepted, what is refused and how the refusal names the field."""

from __future__ import annotations

import pytest

from vicuna import protocol as p
from vicuna.conversation import Message


def chat(**fields):
    return p.parse_request(
        p.ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def refused(cls, body) -> p.InvalidRequest:
    with pytest.raises(p.InvalidRequest) as info:
        p.parse_request(cls, body)
    return info.value


def test_chat_request_maps_every_sampling_field():
    req = chat(
        temperature=0.5,
        top_p=0.9,
        max_completion_tokens=20,
        max_tokens=99,
        stop="END",
        n=2,
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        top_k=40,
        repetition_penalty=1.1,
        min_tokens=3,
        ignore_eos=True,
        logprobs=True,
        top_logprobs=2,
        user="u",
        response_format={"type": "text"},
    )
    assert req.messages == [Message("user", "hi")]
    assert req.requested_max_tokens() == 20  # max_completion_tokens wins over the older max_tokens
    sp = req.sampling_params(max_new_tokens=20, choice=1, logprobs=req.logprobs_k())
    assert (sp.temperature, sp.top_p, sp.top_k, sp.repetition_penalty) == (0.5, 0.9, 40, 1.1)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.min_new_tokens, sp.max_new_tokens) == (
        0.5,
        -0.5,
        3,
        20,
    )
    assert sp.stop == ("END",) and sp.ignore_eos and sp.logprobs == 2
    assert sp.seed == 8  # each choice its own seed


def test_defaults_follow_openai():
    sp = chat().sampling_params(max_new_tokens=10)
    assert (sp.temperature, sp.top_p, sp.top_k, sp.seed, sp.logprobs) == (1.0, 1.0, 0, None, None)
    assert chat(top_k=-1).sampling_params(max_new_tokens=1).top_k == 0  # vLLM's "no limit"


def test_text_parts_and_developer_role():
    req = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ]
    )
    assert req.messages == [Message("system", "be brief"), Message("user", "ab")]


@pytest.mark.parametrize(
    "field,value",
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "auto"),
        ("functions", [{"name": "f"}]),
        ("logit_bias", {"1": 5}),
        ("parallel_tool_calls", True),
        ("audio", {"voice": "x"}),
    ],
)
def test_unsupported_fields_are_refused_by_name(field, value):
    err = refused(
        p.ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}], field: value}
    )
    assert err.param == field and field in err.message


def test_null_unknown_fields_ask_for_nothing():
    assert chat(tools=None, logit_bias=None).n is None


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", ""]}, "stop"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs
        ({"response_format": {"type": "json_object"}}, "response_format.type"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({"model": 3}, "model"),
    ],
)
def test_invalid_values_name_the_field(fields, param):
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]} | fields
    err = refused(p.ChatCompletionRequest, body)
    assert err.param == param, err.message


def test_missing_fields_and_non_objects():
    assert refused(p.ChatCompletionRequest, {"model": "m"}).param == "messages"
    assert refused(p.ChatCompletionRequest, [1, 2]).param is None


def test_min_tokens_above_max_tokens():
    with pytest.raises(p.InvalidRequest) as info:
        chat(min_tokens=50).sampling_params(max_new_tokens=10)
    assert info.value.param == "min_tokens"


def test_completion_prompts():
    def prompts(value):
        return p.parse_request(p.CompletionRequest, {"model": "m", "prompt": value}).prompts()

    assert prompts("a") == ["a"]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([1, 2, 3]) == [[1, 2, 3]]
    assert prompts([[1], [2, 3]]) == [[1], [2, 3]]
    assert refused(p.CompletionRequest, {"model": "m", "prompt": []}).param == "prompt"
    assert refused(p.CompletionRequest, {"model": "m", "prompt": "a", "suffix": "b"}).param == "suffix"
    assert refused(p.CompletionRequest, {"model": "m", "prompt": "a", "best_of": 3}).param == "best_of"


def test_embedding_request():
    req = p.parse_request(
        p.EmbeddingRequest, {"model": "m", "input": ["a", "b"], "encoding_format": "base64"}
    )
    assert req.inputs() == ["a", "b"] and req.encoding_format == "base64"
    assert refused(p.EmbeddingRequest, {"model": "m", "input": "a", "dimensions": 8}).param == "dimensions"


def test_error_body_shape():
    assert p.error_body("bad", "invalid_request_error", "n") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}
    }
