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
