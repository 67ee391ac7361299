"""The app's pieces below the HTTP server: streamed bodies, held-back text and how a failure is answered."""


def test_a_token_chunk_filled_into_its_rendered_template_equals_the_chunk_rendered_whole():
    from vicuna.server.app import _filled, _sse

    def render(text: str) -> str:
        return _sse({"id": "x", "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None}]})

    fill = _filled(render)
    for text in [
        "",
        " hello",
        'say "hi"\\n',
        "back\\\\slash",
        "你好，世界",
        "tab\there\nnew line",
        "\x00vicuna-text\x00",
        "😀",
    ]:
        assert fill(text) == render(text)


def test_a_streamed_reply_held_back_by_the_stream_interval_goes_out_whole_in_few_writes(tiny_engine):
    """With an interval longer than the reply, its first text is sent alone and the rest with the end, in
    one write: the text arrives whole, in a handful of ASGI body messages, not one per token."""
    import asyncio
    import json

    from tests.server.test_api import asgi_post
    from vicuna.config import SamplingParams
    from vicuna.conversation import Message
    from vicuna.engine.events import TextChunk
    from vicuna.server.app import create_app

    app = create_app(tiny_engine, model_name="tiny", stream_interval_ms=3_600_000)
    request = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello world"}],
        "max_tokens": 24,
        "min_tokens": 24,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    scope = asgi_post("/v1/chat/completions", [(b"content-type", b"application/json")])
    messages: list[dict] = []

    async def call() -> None:
        body = [{"type": "http.request", "body": json.dumps(request).encode(), "more_body": False}]

        async def receive() -> dict:
            if body:
                return body.pop()
            await asyncio.Event().wait()  # the client stays

        async def send(message: dict) -> None:
            messages.append(message)

        await app(scope, receive, send)

    try:
        asyncio.run(call())
    finally:
        app.state.batcher.close()
    assert messages[0]["status"] == 200
    writes = [m["body"] for m in messages if m["type"] == "http.response.body" and m.get("body")]
    events = [
        json.loads(line[5:])
        for w in writes
        for line in w.decode().split("\n\n")
        if line.startswith("data: {")
    ]
    text = "".join(c["delta"].get("content", "") for e in events for c in e["choices"])
    params = SamplingParams(temperature=0, max_new_tokens=24, min_new_tokens=24)
    alone = tiny_engine.chat([Message("user", "Hello world")], params)
    assert text == "".join(e.text for e in alone if isinstance(e, TextChunk))
    assert events[-1]["usage"]["completion_tokens"] == 24
    assert len(writes) <= 5  # the role, the first text, the rest with the end, the usage, [DONE]


def test_a_failure_is_told_as_the_app_answers_it():
    """Streamed error events and the metrics of the API and of the web UI use `failure`: a request's own
    fault is a 400 there too, as the app's handler answers it when nothing has been sent yet."""
    from vicuna.errors import ContextTooLongError, ShuttingDownError, VicunaError
    from vicuna.server.app import failure

    assert failure(VicunaError("bad request")).status == 400
    assert failure(ContextTooLongError(300, 100, 256)).body()["error"]["type"] == "invalid_request_error"
    assert failure(ShuttingDownError()).status == 503
    assert failure(RuntimeError("a bug")).status == 500


def scripted_replies(monkeypatch, tokenizer, text: str) -> None:
    """Every reply from now on is the tokens of `text` (then EOS), each with the logprobs the model gives it."""
    import torch

    from vicuna.engine import sampling

    ids = [*tokenizer(text, add_special_tokens=False).input_ids[1:], tokenizer.eos_token_id]  # past "▁"
    sample = sampling.Sampler.__call__

    def scripted(self, logits, history):
        choice, at = sample(self, logits, history), len(history) - self.prompt_len
        if at >= len(ids) or choice.logprob is None:
            return sampling.Choice(ids[min(at, len(ids) - 1)])
        return sampling.Choice(ids[at], float(torch.log_softmax(logits, -1)[ids[at]]), choice.top)

    monkeypatch.setattr(sampling.Sampler, "__call__", scripted)


def test_a_streamed_completion_s_text_offsets_are_the_non_streamed_ones_past_held_back_text(
    tiny_engine, monkeypatch
):
    # stop ["\n\n"] holds back each "\n" until the next token: the streamed offsets of the tokens after
    # one were that "\n"'s, as the text sent so far had it
    import json

    from fastapi.testclient import TestClient

    from vicuna.server.app import create_app

    scripted_replies(monkeypatch, tiny_engine.tokenizer, "一\n你好\n🐉 ok")
    body = {"model": "tiny", "prompt": "你好", "max_tokens": 40, "logprobs": 1, "stop": ["\n\n"]}
    with TestClient(create_app(tiny_engine, model_name="tiny")) as client:
        whole = client.post("/v1/completions", json=body).json()["choices"][0]
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    assert whole["text"] == "一\n你好\n🐉 ok"
    assert "".join(c["choices"][0]["text"] for c in lines) == whole["text"]
    streamed = [c["choices"][0]["logprobs"] for c in lines if c["choices"][0]["logprobs"]]
    assert [t for lp in streamed for t in lp["tokens"]] == whole["logprobs"]["tokens"]
    assert [at for lp in streamed for at in lp["text_offset"]] == whole["logprobs"]["text_offset"]
    for token, at in zip(whole["logprobs"]["tokens"], whole["logprobs"]["text_offset"], strict=True):
        assert "\\x" in token or token == "</s>" or whole["text"][at:].startswith(token)
