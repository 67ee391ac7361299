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
    assert req.messages == [Message("system", "be brief"), Message("user", "a\nb")]


@pytest.mark.parametrize(
    "field,value",
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "auto"),
        ("functions", [{"name": "f"}]),
        ("parallel_tool_calls", True),
        ("audio", {"voice": "x"}),
    ],
)
def test_unsupported_fields_are_refused_by_name(field, value):
    err = refused(
        p.ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}], field: value}
    )
    assert err.param == field and field in err.message


def test_null_or_empty_unknown_fields_ask_for_nothing():
    assert chat(tools=None, logit_bias=None).n is None
    # LangChain's completions model (langchain_openai.OpenAI) sends an empty logit_bias every time
    body = {"model": "m", "prompt": "hi", "logit_bias": {}}
    assert p.parse_request(p.CompletionRequest, body).prompts() == ["hi"]
    assert p.parse_request(p.CompletionRequest, body).sampling_params(max_new_tokens=1).logit_bias == ()


def test_logit_bias_maps_token_ids_to_biases_and_names_a_bad_one():
    padded = "0" * 5000 + "7"  # 12 digits at most once its zeros are gone: int() refused it (a 500)
    request = chat(logit_bias={"17": -100, "0042": 2.5, padded: 1, "000": 3})
    assert request.sampling_params(max_new_tokens=1).logit_bias == (
        (17, -100.0),
        (42, 2.5),
        (7, 1.0),
        (0, 3.0),  # all zeros: token 0
    )
    assert request.bias_ids() == [17, 42, 7, 0]
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for bias, says in (
        ({"a": 1}, "token ids as keys"),
        ({"-1": 1}, "token ids"),
        ({"1": 101}, "[-100, 100]"),
        ({"9" * 5000: 1}, "(5000 digits) is in no model's vocabulary"),  # was a 500: int() refuses it
    ):
        err = refused(p.ChatCompletionRequest, body | {"logit_bias": bias})
        assert err.param == "logit_bias" and says in err.message, err.message


def test_web_search_options_asks_for_a_search_even_when_empty():
    """OpenAI searches the web, with its defaults, for `"web_search_options": {}`: it was dropped as a
    field asking for nothing, and the reply came without any search, as if made with one."""
    assert chat(web_search_options=None).n is None
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "web_search_options": {}}
    err = refused(p.ChatCompletionRequest, body)
    assert err.param == "web_search_options" and "web search is not supported" in err.message


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", ""]}, "stop"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"stop": [str(i) for i in range(p.MAX_STOP + 1)]}, "stop"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs
        ({"response_format": {"type": "json_object"}}, "response_format.type"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"model": 3}, "model"),
    ],
)
def test_invalid_values_name_the_field(fields, param):
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]} | fields
    err = refused(p.ChatCompletionRequest, body)
    assert err.param == param, err.message


def test_usage_is_streamed_only_when_asked_for():
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage
    assert not chat(stream=True, stream_options={"include_usage": False}).include_usage
    assert not chat(stream=True, stream_options={}).include_usage
    assert not chat(stream=True).include_usage


def test_missing_fields_and_non_objects():
    assert refused(p.ChatCompletionRequest, {"model": "m"}).param == "messages"
    assert refused(p.ChatCompletionRequest, [1, 2]).param is None


def test_min_tokens_above_max_tokens():
    with pytest.raises(p.InvalidRequest) as info:
        chat(min_tokens=50).sampling_params(max_new_tokens=10)
    assert info.value.param == "min_tokens"
    assert chat(min_tokens=10).sampling_params(max_new_tokens=10).min_new_tokens == 10  # as many: taken


def test_completion_prompts():
    def prompts(value):
        return p.parse_request(p.CompletionRequest, {"model": "m", "prompt": value}).prompts()

    assert prompts("a") == ["a"]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([1, 2, 3]) == [[1, 2, 3]]
    assert prompts([[1], [2, 3]]) == [[1], [2, 3]]
    assert refused(p.CompletionRequest, {"model": "m", "prompt": []}).param == "prompt"
    err = refused(p.CompletionRequest, {"model": "m", "prompt": [[1], []]})
    assert err.param == "prompt" and "a token-id prompt must not be empty" in err.message
    assert refused(p.CompletionRequest, {"model": "m", "prompt": "a", "suffix": "b"}).param == "suffix"
    # an empty suffix, as code-editor plugins send it, leaves nothing after the insertion point: a completion
    assert p.parse_request(p.CompletionRequest, {"model": "m", "prompt": "a", "suffix": ""}).prompts() == [
        "a"
    ]
    assert refused(p.CompletionRequest, {"model": "m", "prompt": "a", "best_of": 3}).param == "best_of"
    # best_of is how many candidates the n replies are chosen among: fewer than n was taken, as if 1 was n
    assert p.parse_request(p.CompletionRequest, {"model": "m", "prompt": "a", "best_of": 1, "n": 1}).n == 1
    err = refused(p.CompletionRequest, {"model": "m", "prompt": "a", "best_of": 1, "n": 2})
    assert err.param == "best_of" and err.message.startswith("best_of: 1 is less than n (2)")


def test_embedding_request():
    req = p.parse_request(
        p.EmbeddingRequest, {"model": "m", "input": ["a", "b"], "encoding_format": "base64"}
    )
    assert req.inputs() == ["a", "b"] and req.encoding_format == "base64"
    assert refused(p.EmbeddingRequest, {"model": "m", "input": "a", "dimensions": 8}).param == "dimensions"
    most = ["a"] * p.MAX_EMBEDDING_INPUTS
    assert p.parse_request(p.EmbeddingRequest, {"model": "m", "input": most}).inputs() == most
    assert p.parse_request(p.EmbeddingRequest, {"model": "m", "input": [7] * 5000}).inputs() == [[7] * 5000]
    with pytest.raises(p.InvalidRequest, match="2049 inputs, more than the 2048") as info:
        p.parse_request(p.EmbeddingRequest, {"model": "m", "input": [*most, "b"]}).inputs()
    assert info.value.param == "input"
    for empty in ("", [], [""]):  # "" alone got a 200 and a vector for no text
        with pytest.raises(p.InvalidRequest, match="input: ") as info:
            p.parse_request(p.EmbeddingRequest, {"model": "m", "input": empty}).inputs()
        assert info.value.param == "input"


def test_error_body_shape():
    assert p.error_body("bad", "invalid_request_error", "n") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}
    }


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": 5.0}, "max_tokens"),
        ({"max_completion_tokens": True}, "max_completion_tokens"),
        ({"n": True}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"temperature": "1"}, "temperature"),
        ({"seed": "7"}, "seed"),
        ({"logprobs": 1}, "logprobs"),
        ({"user": 3}, "user"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"response_format": {"type": 1}}, "response_format.type"),
    ],
)
def test_wrong_types_are_refused_as_openai_refuses_them(fields, param):
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]} | fields
    err = refused(p.ChatCompletionRequest, body)
    assert err.param == param and err.message.startswith(f"{param}: "), err.message


def test_an_integer_is_a_number():
    req = chat(temperature=1, top_p=1, presence_penalty=0, repetition_penalty=2)
    sp = req.sampling_params(max_new_tokens=1)
    assert (sp.temperature, sp.top_p, sp.presence_penalty, sp.repetition_penalty) == (1.0, 1.0, 0.0, 2.0)


def test_nan_and_infinity_are_refused_as_not_numbers():
    """Python's JSON reader takes NaN and Infinity: `temperature: NaN` was refused as "should be less than or
    equal to 2", and a repetition_penalty of Infinity was accepted."""
    for fields, param in [
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"presence_penalty": float("-inf")}, "presence_penalty"),
        ({"logit_bias": {"5": float("nan")}}, "logit_bias.5"),
    ]:
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]} | fields
        err = refused(p.ChatCompletionRequest, body)
        assert (err.param, err.message) == (param, f"{param}: Input should be a finite number")


def test_a_value_of_no_member_of_a_union_names_the_field_not_the_member():
    err = refused(
        p.ChatCompletionRequest,
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a", 1]},
    )
    assert (err.param, err.message) == ("stop", "stop: expected a string or a list of strings")
    err = refused(p.CompletionRequest, {"model": "m", "prompt": [1.5]})
    assert err.param == "prompt" and "a list of token ids" in err.message
    assert refused(p.EmbeddingRequest, {"model": "m", "input": {"a": 1}}).param == "input"


def test_seed_is_a_64_bit_integer():
    for seed in (-(2**63), 2**63 - 1):
        sp = chat(seed=seed, n=16).sampling_params(max_new_tokens=1, choice=15)
        assert -(2**63) <= sp.seed <= 2**64 - 1  # what torch.Generator.manual_seed takes
    for seed in (2**63, -(2**63) - 1, 36893488147419103232):
        err = refused(
            p.ChatCompletionRequest,
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": seed},
        )
        assert err.param == "seed", err.message


def test_seed_minus_one_asks_for_a_new_seed_each_request():
    # as llama.cpp's server and text-generation-webui take it (SillyTavern sends it): "regenerate" repeated
    assert chat(seed=-1, n=2).sampling_params(max_new_tokens=1, choice=1).seed is None
    assert chat(seed=-2).sampling_params(max_new_tokens=1).seed == -2


def test_fields_about_openai_records_are_accepted_and_ignored():
    req = chat(
        store=False,
        metadata={"project": "demo"},
        service_tier="auto",
        user="u",
        prompt_cache_key="k",
        safety_identifier="s",
    )
    assert req.sampling_params(max_new_tokens=5) == chat().sampling_params(max_new_tokens=5)
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    err = refused(p.ChatCompletionRequest, body | {"store": True})
    assert err.param == "store" and "does not store" in err.message
    assert refused(p.ChatCompletionRequest, body | {"metadata": {"a": 1}}).param == "metadata.a"
    assert refused(p.CompletionRequest, {"model": "m", "prompt": "x", "store": False}).param == "store"


def test_many_stop_strings_are_taken_up_to_a_bound():
    # an editor plugin's autocomplete sends dozens (its template's, its own, the language's keywords)
    stops = [f"\n{word}" for word in range(p.MAX_STOP)]
    assert chat(stop=stops).sampling_params(max_new_tokens=5).stop == tuple(stops)
    assert p.MAX_STOP >= 32
    err = refused(
        p.ChatCompletionRequest,
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [*stops, "!"]},
    )
    assert err.param == "stop" and f"at most {p.MAX_STOP}" in err.message


def test_settings_that_ask_for_what_is_done_anyway_are_accepted():
    # chat front-ends and editor plugins send these with their defaults; the reply is the same without them
    assert chat(modalities=["text"]).sampling_params(max_new_tokens=5) == chat().sampling_params(
        max_new_tokens=5
    )
    err = refused(
        p.ChatCompletionRequest,
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "modalities": ["audio"]},
    )
    assert err.param == "modalities" and err.message.endswith(
        'text only; send ["text"] or leave it out, not ["audio"]'
    )


def test_message_errors_name_the_message():
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}, {"role": "user", "content": [{"type": "image_url"}]}],
    }
    err = refused(p.ChatCompletionRequest, body)
    assert err.param == "messages[1].content[0]" and err.message.startswith("messages[1].content[0]: ")


def test_stream_obfuscation_may_be_turned_off_but_not_asked_for():
    """OpenAI's SDKs document `include_obfuscation: false` to save bandwidth: it asks for what this server
    does (it was a 400, "Extra inputs are not permitted"); true asks for padding it never adds."""
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    off = {"include_usage": True, "include_obfuscation": False}
    assert p.parse_request(p.ChatCompletionRequest, body | {"stream_options": off}).include_usage
    prompt = {"model": "m", "prompt": "x", "stream": True, "stream_options": off}
    assert p.parse_request(p.CompletionRequest, prompt).include_usage
    err = refused(p.ChatCompletionRequest, body | {"stream_options": {"include_obfuscation": True}})
    assert err.param == "stream_options.include_obfuscation" and "does not pad" in err.message
