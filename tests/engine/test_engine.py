"""The engine's event stream on a tiny model: parity with transformers, stops, cancel, limits."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.tiny_models import plain_engine
from vicuna.config import ModelSettings, SamplingParams
from vicuna.conversation import Message
from vicuna.engine.detok import IncrementalDecoder
from vicuna.engine.events import Finished, TextChunk
from vicuna.engine.loader import load_engine
from vicuna.errors import ContextTooLongError, VicunaError


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return load_engine(ModelSettings(model_path=str(tiny_llama_dir), dtype="float32"), progress=False)


def run(engine, prompt_ids, **kw):
    events = list(engine.generate(prompt_ids, SamplingParams(**kw)))
    assert isinstance(events[-1], Finished) and all(isinstance(e, TextChunk) for e in events[:-1])
    return "".join(e.text for e in events[:-1]), [t for e in events[:-1] for t in e.token_ids], events[-1]


def test_greedy_matches_transformers_generate(engine):
    prompt = engine.encode("Hello world! How are")
    text, ids, done = run(engine, prompt, temperature=0, max_new_tokens=24, ignore_eos=True)
    with torch.inference_mode():
        ref = engine.model.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24, eos_token_id=None
        )[0, len(prompt) :].tolist()
    assert ids == ref
    assert text == engine.tokenizer.decode(ref, skip_special_tokens=True)
    assert done.reason == "length" and done.completion_tokens == 24 and done.prompt_tokens == len(prompt)
    assert done.ttft_s > 0 and done.decode_tokens_per_s > 0


def test_stop_string_across_tokens_is_never_shown(engine):
    prompt = engine.encode("The capital of")
    full, ids, _ = run(engine, prompt, temperature=0, max_new_tokens=30, ignore_eos=True)
    pieces = [engine.tokenizer.decode(ids[: i + 1], skip_special_tokens=True) for i in range(len(ids))]
    # a stop string that starts inside one token's text and ends inside a later one
    boundary = next(len(p) for p in pieces if len(p) >= 6)
    stop = full[boundary - 2 : boundary + 3]
    assert len(stop) == 5
    text, stopped, done = run(engine, prompt, temperature=0, max_new_tokens=30, ignore_eos=True, stop=[stop])
    assert stop not in text
    assert text == full[: full.index(stop)]
    assert done.reason == "stop" and done.stop_text == stop
    # the reply ends with the token that completes the stop string: none is generated after it
    decode = engine.tokenizer.decode
    assert stopped == ids[: len(stopped)] and done.completion_tokens == len(stopped)
    assert stop in decode(stopped, skip_special_tokens=True) and stop not in decode(stopped[:-1])


def test_a_stop_string_before_min_new_tokens_does_not_end_the_reply(engine):
    """As vLLM's min_tokens: a stop string that ends within the reply's first min_new_tokens - 1 tokens is
    text, not the reply's end (it cut a reply of min_tokens 4 at its first token); one ending later is."""
    prompt = engine.encode("The capital of France is")
    greedy = dict(temperature=0, max_new_tokens=24, ignore_eos=True)
    pieces = [e.text for e in list(engine.generate(prompt, SamplingParams(**greedy)))[:-1]]
    stop = pieces[1]
    assert stop and stop in pieces[0] + pieces[1]
    text, _, done = run(engine, prompt, **greedy, stop=[stop])
    assert done.reason == "stop" and done.completion_tokens <= 2
    text, _, done = run(engine, prompt, **greedy, stop=[stop], min_new_tokens=4)
    quiet = len("".join(pieces[:3]))  # the text of the first min_new_tokens - 1 tokens
    so_far = ""
    for piece in pieces:
        so_far += piece
        if (at := so_far.find(stop, max(quiet - len(stop) + 1, 0))) != -1:
            break
    assert done.completion_tokens >= 4
    assert text == so_far[:at] and done.reason == "stop"


def test_stop_token_id_ends_the_reply(engine):
    prompt = engine.encode("Hello")
    _, ids, _ = run(engine, prompt, temperature=0, max_new_tokens=10, ignore_eos=True)
    _, stopped, done = run(
        engine, prompt, temperature=0, max_new_tokens=10, ignore_eos=True, stop_token_ids=[ids[3]]
    )
    assert stopped == ids[: ids.index(ids[3])]
    assert done.reason == "stop" and done.completion_tokens == len(stopped) + 1
    # with logprobs, the stop token's comes with the finish (it is sampled like the others)
    *chunks, done = engine.generate(
        prompt,
        SamplingParams(
            temperature=0, max_new_tokens=10, ignore_eos=True, stop_token_ids=[ids[3]], logprobs=0
        ),
    )
    assert [lp.token_id for c in chunks for lp in c.logprobs] == stopped
    assert [lp.token_id for lp in done.stop_logprobs] == [ids[3]] and done.stop_logprobs[0].logprob < 0


def test_ignore_eos_generates_past_the_end_token(engine):
    prompt = engine.encode("Hello")
    eos = engine.tokenizer.eos_token_id
    _, ids, done = run(engine, prompt, temperature=0, max_new_tokens=4, logit_bias=[(eos, 100.0)])
    assert ids == [] and (done.reason, done.completion_tokens) == ("stop", 1)
    _, ids, done = run(
        engine, prompt, temperature=0, max_new_tokens=4, logit_bias=[(eos, 100.0)], ignore_eos=True
    )
    assert ids == [eos] * 4 and (done.reason, done.completion_tokens) == ("length", 4)


def test_seeded_sampling_is_reproducible(engine):
    prompt = engine.encode("Hello")
    a = run(engine, prompt, temperature=1.0, seed=3, max_new_tokens=16, ignore_eos=True)[1]
    b = run(engine, prompt, temperature=1.0, seed=3, max_new_tokens=16, ignore_eos=True)[1]
    assert a == b


def test_cancel_ends_with_cancelled(engine):
    cancel = threading.Event()
    events = engine.generate(
        engine.encode("Hello"), SamplingParams(max_new_tokens=50, ignore_eos=True), cancel=cancel
    )
    first = next(events)
    assert isinstance(first, TextChunk)
    cancel.set()
    rest = list(events)
    assert rest[-1].reason == "cancelled" and rest[-1].completion_tokens < 50


def test_prompt_beyond_the_context_window_is_a_clear_error(engine):
    with pytest.raises(ContextTooLongError, match=r"200 tokens and 100 new tokens .* 256 tokens"):
        engine.generate([5] * 200, SamplingParams(max_new_tokens=100))


def test_an_mpt_model_s_context_window_is_its_max_seq_len(tiny_llama_dir, tmp_path):
    """MPT names its positions `max_seq_len`: a window of 2048 was taken instead, and a tiny MPT of 64
    failed in transformers (its ALiBi table is that long) on a prompt and reply of more."""
    from transformers import AutoConfig, AutoTokenizer, MptForCausalLM

    from vicuna.train.trainer import fit_max_length

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.save_pretrained(tmp_path)
    config = AutoConfig.for_model(
        "mpt", vocab_size=len(tokenizer), d_model=64, n_heads=4, n_layers=2, max_seq_len=64
    )
    torch.manual_seed(0)
    MptForCausalLM(config).save_pretrained(tmp_path)
    settings = ModelSettings(model_path=str(tmp_path), device="cpu", dtype="float32")
    engine = load_engine(settings, progress=False)
    assert engine.context_window == 64 == fit_max_length(None, config, tmp_path)
    with pytest.raises(ContextTooLongError, match="context window is 64 tokens"):
        engine.generate([5] * 60, SamplingParams(max_new_tokens=20))


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_a_linearly_scaled_model_s_context_window_is_its_scaled_length(tmp_path, kind):
    """Vicuna v1.5-16k's config: Llama 2's 4,096 positions and linear RoPE scaling by 4 for its 16,384. Read
    as 4,096, a prompt that fits its window was refused; here 64 positions scaled by 4 (and by YaRN)."""
    import json

    from tests.tiny_models import write_tiny_llama
    from vicuna.engine.runner import HFRunner
    from vicuna.train.trainer import fit_max_length

    folder = write_tiny_llama(tmp_path / "vicuna-7b-v1.5-16k", max_position_embeddings=64)
    config_file = folder / "config.json"
    raw = json.loads(config_file.read_text())
    raw.pop("rope_parameters", None)  # as the model's config.json of 2023 says it
    raw |= {"rope_scaling": {"factor": 4.0, "type": kind}, "rope_theta": 10000.0}
    config_file.write_text(json.dumps(raw))
    engine = load_engine(ModelSettings(model_path=str(folder), dtype="float32"), progress=False)
    assert engine.context_window == 256 == fit_max_length(None, engine.model.config, folder)
    prompt = torch.randint(3, 300, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    text, ids, done = run(engine, prompt, temperature=0, max_new_tokens=40, ignore_eos=True)
    ref, token, expected = HFRunner(engine.model, engine.device), None, []
    for _ in range(40):
        token = int((ref.prefill(prompt) if token is None else ref.step(token)).argmax())
        expected.append(token)
    assert ids == expected
    with pytest.raises(ContextTooLongError, match="context window is 256 tokens"):
        engine.generate([5] * 240, SamplingParams(max_new_tokens=20))


def test_chat_uses_the_template_and_its_stop_token(engine):
    assert engine.template.name == "vicuna_v1.1"
    ids = engine.encode_chat([Message("user", "Hello!")])
    assert ids[0] == engine.tokenizer.bos_token_id
    assert engine.tokenizer.decode(ids, skip_special_tokens=True).endswith("USER: Hello! ASSISTANT:")
    assert 2 in engine.end_ids  # </s>
    events = list(engine.chat([Message("user", "Hello!")], SamplingParams(temperature=0, max_new_tokens=8)))
    assert isinstance(events[-1], Finished)


@pytest.mark.parametrize("template", ["vicuna_v1.1", "llama-2"])
def test_special_token_text_in_a_message_is_text_not_a_turn_marker(engine, template, monkeypatch):
    from vicuna.conversation import get_template, render

    monkeypatch.setattr(engine, "template", get_template(template))
    tok = engine.tokenizer
    plain = [Message("user", "Hi"), Message("assistant", "Yo"), Message("user", "again")]
    assert engine.encode_chat(plain) == engine.encode(render(engine.template, plain))  # exactly as rendered
    typed = [Message("user", "a</s>USER: b"), Message("assistant", "<s>Yo"), Message("user", "x <s>[INST] y")]
    ids = engine.encode_chat(typed)
    markers = engine.encode_chat([*plain[:2], Message("user", "x")])
    for special in (tok.bos_token_id, tok.eos_token_id):  # only the template's own markers
        assert ids.count(special) == markers.count(special)
    text = tok.decode(ids, skip_special_tokens=True)
    for message in typed:
        assert message.content in text


def test_a_tokenizer_that_appends_eos_does_not_end_the_prompt_with_it(tiny_llama_dir, tmp_path):
    """A tokenizer saved with add_eos_token=True (some fine-tuning setups leave it so) appended EOS to every
    prompt: the reply began after an end of text, where training never put one."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "eos"
    shutil.copytree(tiny_llama_dir, folder)
    AutoTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=True).save_pretrained(folder)
    engine = load_engine(ModelSettings(model_path=str(folder), device="cpu"), progress=False)
    eos = engine.tokenizer.eos_token_id
    assert engine.tokenizer("Hi")["input_ids"][-1] == eos  # what the tokenizer does
    for messages in ([Message("user", "Hello!")], [Message("user", "a </s> b")]):  # plain, and typed text
        ids = engine.encode_chat(messages)
        assert ids[-1] != eos and ids[0] == engine.tokenizer.bos_token_id, messages
    assert engine.encode("Once upon a time")[-1] != eos
    assert engine.encode("the end</s>")[-1] == eos  # the prompt's own text stays


def test_special_token_text_with_a_slow_tokenizer_is_a_clear_error(engine, monkeypatch):
    from vicuna.errors import VicunaError

    class Slow:  # a tokenizer without character offsets
        is_fast = False

        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __call__(self, *args, **kwargs):
            return self.tokenizer(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

    monkeypatch.setattr(engine, "tokenizer", Slow(engine.tokenizer))
    assert engine.encode_chat([Message("user", "Hello")])  # no special text: as ever
    with pytest.raises(VicunaError, match="a message holds '</s>', a special token's text"):
        engine.encode_chat([Message("user", "a </s> b")])


# A chat template without BOS (ChatML, as fine-tunes of LLaMA often carry) and one that writes it itself
# (as Llama 3's does), both on a tokenizer that adds BOS to what it encodes
CHATML_JINJA = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BOS_FIRST_JINJA = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
    " + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


@pytest.mark.parametrize("jinja", [CHATML_JINJA, BOS_FIRST_JINJA], ids=["no-bos", "bos-in-template"])
def test_a_chat_template_prompt_is_what_apply_chat_template_gives(engine, jinja, monkeypatch):
    """The tokenizer added its BOS to a chat template's text, which holds the special tokens it wants: a
    model fine-tuned on ChatML got a BOS its training never had at the start of every prompt."""
    from vicuna.engine.loader import template_for

    tok = engine.tokenizer
    monkeypatch.setattr(tok, "chat_template", jinja)
    monkeypatch.setattr(engine, "template", template_for("hf", tok))
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # the tokenizer adds BOS
    messages = [
        Message("system", "Be brief."),
        Message("user", "Hello!"),
        Message("assistant", "Hi."),
        Message("user", "Again"),
    ]
    expected = tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=True, tokenize=True
    )["input_ids"]
    assert engine.encode_chat(messages) == list(expected)
    assert list(expected).count(tok.bos_token_id) == (jinja == BOS_FIRST_JINJA)
    typed = engine.encode_chat([Message("user", "a <s> b")])  # special-token text in a message: as text
    assert typed.count(tok.bos_token_id) == (jinja == BOS_FIRST_JINJA)


def test_a_reply_ends_at_the_chat_template_s_end_of_turn_token_that_is_not_eos(tiny_llama_dir):
    """A Llama 3 GGUF file keeps one EOS, often <|end_of_text|>, and its chat template ends a turn with
    <|eot_id|>: a reply went on past its turn until --max-new-tokens. The token a chat template writes after
    an assistant's text now ends a reply too."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tests.tiny_models import tiny_llama_config
    from vicuna.engine.engine import Engine
    from vicuna.engine.loader import template_for

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    tok.chat_template = BOS_FIRST_JINJA
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tok))).eval()
    engine = Engine(model=model, tokenizer=tok, template=template_for("hf", tok), model_name="x")
    messages = [Message("user", "Hello!")]
    logits = engine.new_runner()[0].prefill(engine.encode_chat(messages))
    first = int(logits.argmax())  # the model's first token becomes <|eot_id|>'s, and more likely
    with torch.no_grad():
        model.lm_head.weight[eot] = model.lm_head.weight[first] * (2 if logits[first] > 0 else 0.5)
    engine = Engine(model=model, tokenizer=tok, template=template_for("hf", tok), model_name="x")
    assert engine.end_ids == (tok.eos_token_id,)  # </s>: the checkpoint does not say <|eot_id|>
    done = list(engine.chat(messages, SamplingParams(temperature=0, max_new_tokens=8)))[-1]
    assert (done.reason, done.completion_tokens, done.stop_text) == ("stop", 1, "<|eot_id|>")


def test_a_chat_stops_at_the_template_s_stop_strings_and_the_request_s(tiny_llama_dir):
    """vicuna_v0's replies end at "###", which is text, not a token: it is a stop string of every chat."""
    v0 = load_engine(
        ModelSettings(model_path=str(tiny_llama_dir), dtype="float32", conv_template="vicuna_v0"),
        progress=False,
    )
    assert v0.chat_params(SamplingParams(stop=("END",))).stop == ("END", "###")


def test_ignore_eos_in_a_chat_drops_the_template_s_stop_token_when_it_is_eos(engine):
    assert 2 in engine.template_stop_ids and 2 in engine.chat_params(SamplingParams()).stop_token_ids
    assert 2 not in engine.chat_params(SamplingParams(ignore_eos=True)).stop_token_ids
    assert engine.chat_params(SamplingParams(ignore_eos=True, stop_token_ids=(2,))).stop_token_ids == (2,)
    prompt = engine.encode_chat([Message("user", "Hello!")])
    ignored = engine.chat_params(SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))
    assert list(engine.generate(prompt, ignored))[-1].completion_tokens == 6


@pytest.mark.parametrize("on_kernel", [True, False])
def test_llama_runner_matches_transformers_logits(tiny_llama_dir, monkeypatch, on_kernel):
    from vicuna.engine import kernel
    from vicuna.engine.runner import HFRunner, LlamaRunner, LlamaWeights, llama_fast_path_ok

    if not on_kernel:  # PyTorch's operations, as on a GPU or a CPU where the kernel cannot run
        monkeypatch.setattr(kernel, "load", lambda progress=True: None)
    engine = load_engine(ModelSettings(model_path=str(tiny_llama_dir), dtype="float32"), progress=False)
    assert llama_fast_path_ok(engine.model)
    prompt = engine.encode("The capital of France is")
    fast, ref = LlamaRunner(LlamaWeights(engine.model), None), HFRunner(engine.model, engine.device)
    torch.testing.assert_close(fast.prefill(prompt), ref.prefill(prompt), rtol=1e-4, atol=1e-4)
    for token in [5, 17, 300, 2, 42] * 60:  # past the first cache chunk, so the cache grows once
        torch.testing.assert_close(fast.step(token), ref.step(token), rtol=1e-4, atol=1e-4)


def test_fast_and_plain_paths_give_the_same_reply(tiny_llama_dir):
    settings = ModelSettings(model_path=str(tiny_llama_dir), dtype="float32")
    fast = load_engine(settings, progress=False)
    plain = plain_engine(fast)
    prompt = fast.encode("你好，世界")
    a = run(fast, prompt, temperature=0.8, seed=1, max_new_tokens=20, ignore_eos=True)
    b = run(plain, prompt, temperature=0.8, seed=1, max_new_tokens=20, ignore_eos=True)
    assert a[1] == b[1]


def test_a_generation_resumed_on_other_threads_works(engine):
    """Servers (Gradio's worker pool) may call next() on a stream from a different thread each time."""
    events = engine.generate(
        engine.encode("Hello"), SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    )
    collected, errors = [], []

    def pull():
        try:
            collected.append(next(events, None))
        except Exception as err:  # surfaced below
            errors.append(err)

    while not collected or collected[-1] is not None:
        thread = threading.Thread(target=pull)  # a new thread for every step
        thread.start()
        thread.join()
        assert not errors, errors[0]
    collected.pop()
    assert collected[-1].reason == "length" and collected[-1].completion_tokens == 6
    assert torch.is_grad_enabled()  # no inference mode leaked into this thread


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_next_turn_of_a_chat_computes_only_its_new_tokens(tiny_llama_dir, prefill_starts, device):
    settings = ModelSettings(model_path=str(tiny_llama_dir), dtype="float32", device=device)
    engine = load_engine(settings, progress=False)
    starts = prefill_starts
    first = engine.encode("Hello world! How are")
    _, reply, _ = run(engine, first, temperature=0, max_new_tokens=12, ignore_eos=True)
    second = first + reply + engine.encode("And then?")[1:]
    text, ids, _ = run(engine, second, temperature=0, max_new_tokens=12, ignore_eos=True)
    # the first prompt and all of the reply but its last token (never fed back) were cached
    assert starts == [0, len(first) + len(reply) - 1]
    engine.forget()  # the same turn computed from scratch
    assert run(engine, second, temperature=0, max_new_tokens=12, ignore_eos=True)[:2] == (text, ids)
    assert starts[-1] == 0
    other = engine.encode("Something else entirely")
    run(engine, other, temperature=0, max_new_tokens=2)
    cached = second + ids[:-1]  # the last reply token is never fed back
    assert starts[-1] == next(n for n in range(len(other)) if n == len(other) - 1 or cached[n] != other[n])


def test_out_of_memory_mid_reply_gives_back_what_the_reply_held_and_the_next_reply_runs(
    engine, monkeypatch, gpu_out_of_memory
):
    import weakref

    from vicuna.engine.runner import LlamaRunner

    held, freed_at_release = [], []
    release = lambda: freed_at_release.append(held[0]() is None)  # noqa: E731
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU: its cache is given back
    monkeypatch.setattr(torch.cuda, "empty_cache", release)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if "MPS" in str(gpu_out_of_memory()):  # as on a Mac
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
        monkeypatch.setattr(torch.mps, "empty_cache", release)
    step = LlamaRunner.step

    def out_of_memory_once(self, token_id):
        if not held:
            held.append(weakref.ref(self.cache))  # the failed reply's KV cache
            raise gpu_out_of_memory()
        return step(self, token_id)

    monkeypatch.setattr(LlamaRunner, "step", out_of_memory_once)
    prompt = engine.encode("Hello world! How are")
    with pytest.raises(RuntimeError, match="out of memory") as raised:
        run(engine, prompt, temperature=0, max_new_tokens=8)
    # the cache was no longer held when PyTorch's cached blocks were given back, although the error
    # (and its traceback, through the frames that held the cache) is still alive
    assert freed_at_release == [True] and raised.value.__traceback__ is not None
    text, ids, done = run(engine, prompt, temperature=0, max_new_tokens=8, ignore_eos=True)
    assert done.completion_tokens == 8 and len(ids) == 8


def test_a_long_prompt_is_computed_in_the_server_s_pieces(engine, monkeypatch):
    """Alone as in the server's batch, so that a greedy reply is the same both ways (bf16 rounds the two
    ways of computing a prompt differently)."""
    from vicuna.engine import engine as engine_module
    from vicuna.engine.runner import LlamaRunner

    monkeypatch.setattr(engine_module, "PREFILL_PIECE", 16)
    starts = []
    prefill = LlamaRunner.prefill
    monkeypatch.setattr(
        LlamaRunner, "prefill", lambda self, ids, start=0: starts.append(start) or prefill(self, ids, start)
    )
    prompt = engine.encode("Hello world! " * 12)
    assert len(prompt) > 40
    engine.forget()  # no cache of an earlier reply: the prompt from its first token
    _, ids, _ = run(engine, prompt, temperature=0, max_new_tokens=5, ignore_eos=True)
    assert starts == list(range(0, len(prompt), 16))
    monkeypatch.setattr(engine_module, "PREFILL_PIECE", 10_000)
    engine.forget()
    pieces = len(starts)
    whole = run(engine, prompt, temperature=0, max_new_tokens=5, ignore_eos=True)[1]
    assert len(starts) == pieces + 1
    assert starts[-1] == 0 and whole == ids  # computed whole, the same reply in float32


def test_a_reply_leaves_the_callers_pytorch_threads_as_they_were(engine, monkeypatch):
    """The kernel's team sizes OpenMP's threads on the calling thread, which are PyTorch's too: after a
    reply whose team gave up a thread (a busy core), a notebook's own PyTorch work ran on one core."""
    from vicuna.engine import kernel
    from vicuna.engine.runner import LlamaRunner

    if engine.team() is None:
        pytest.skip("the CPU kernel is not built here")
    monkeypatch.setattr(kernel.Team, "timed", lambda team, seconds, rows: team._use(1))  # a busy core
    seen = []
    step = LlamaRunner.step
    monkeypatch.setattr(LlamaRunner, "step", lambda *a: seen.append(torch.get_num_threads()) or step(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run(engine, engine.encode("Hello"), temperature=0, max_new_tokens=6, ignore_eos=True)
        assert seen[1:] == [1] * 4  # the team's one thread decodes
        assert torch.get_num_threads() == 2  # and the caller has its two back
    finally:
        torch.set_num_threads(before)


def test_openai_style_dicts_given_to_chat_are_told_how_to_become_messages(engine):
    with pytest.raises(
        TypeError, match=r"Message\(role, content\); .* with vicuna.conversation.parse_messages"
    ):
        engine.chat([{"role": "user", "content": "Hi"}], SamplingParams())


@pytest.mark.parametrize("top", [-1, 10**6, 2.0])
def test_score_s_top_out_of_range_is_a_clear_error(engine, top):
    with pytest.raises(VicunaError, match=r"top must be an int from 0 to the vocabulary's \d+ tokens"):
        engine.score(engine.encode("Hello world"), top)


@pytest.mark.parametrize("cancel", [True, threading.Event])
def test_a_cancel_that_is_no_event_is_a_clear_error(engine, cancel):
    with pytest.raises(TypeError, match=r"cancel must be a threading.Event\(\)"):
        engine.chat([Message("user", "Hi")], SamplingParams(max_new_tokens=2), cancel=cancel)


def test_one_message_given_to_chat_is_told_to_be_a_list(engine):
    with pytest.raises(
        TypeError, match=r"a list of Message: engine.chat\(\[Message\(role, content\)\], params\)"
    ):
        engine.chat(Message("user", "Hi"), SamplingParams())


@pytest.mark.parametrize("call", ["chat", "generate"])
def test_settings_given_as_a_dict_are_told_to_be_sampling_params(engine, call):
    with pytest.raises(TypeError, match=r"SamplingParams\(\*\*d\)"):
        if call == "chat":
            engine.chat([Message("user", "Hi")], {"temperature": 0})
        else:
            engine.generate(engine.encode("Hi"), {"temperature": 0})


@pytest.mark.slow
def test_the_readme_s_python_example_runs_as_shown(capsys):
    """The README's one example of the engine from Python, run as written (the built-in model)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out  # on our CPUs "The capital of France is Paris.\n[8 tokens, stop]\n"
    assert re.fullmatch(r"[^\n]*Paris[^\n]*\n\[\d+ tokens, stop\]\n", out), out


def test_text_or_no_tokens_for_a_prompt_are_said_before_the_runner_fails(engine):
    for call in (lambda ids: engine.generate(ids, SamplingParams()), lambda ids: engine.score(ids, 1)):
        with pytest.raises(TypeError, match=r"token ids, not text: engine.encode\(text\) gives them"):
            call("Hello")
        with pytest.raises(VicunaError, match="the prompt is empty: at least one token is needed"):
            call([])
        with pytest.raises(TypeError, match=r"one sequence of token ids"):
            call(torch.tensor([engine.encode("Hello")]))  # a tokenizer's return_tensors="pt" batch of one


def test_token_ids_as_a_tuple_or_a_tensor_give_the_list_s_reply(engine):
    ids = engine.encode("Hello world")
    reply = run(engine, ids, temperature=0, max_new_tokens=5, ignore_eos=True)[1]
    scores = [t.logprob for t in engine.score(ids, 0)]
    for same in (tuple(ids), torch.tensor(ids)):
        assert run(engine, same, temperature=0, max_new_tokens=5, ignore_eos=True)[1] == reply
        assert [t.logprob for t in engine.score(same, 0)] == scores


class HeldBack(IncrementalDecoder):
    """A detokenizer that shows no text until the reply ends, as one does for a run of tokens that each end
    inside a character (byte-level BPE's space + a lead byte): all of it comes out of `flush`."""

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        return ""


def test_a_stop_string_completed_by_the_held_back_text_at_the_end_stops_the_reply(engine, monkeypatch):
    """A stop string whose text comes only from the detokenizer's leftover at the reply's end (its last
    tokens each ending inside a character) ends the reply "stop", its text cut before the stop string, as
    one seen token by token does; not "length" with the stop string shown."""
    from vicuna.engine import engine as engine_module

    prompt = engine.encode("The capital of France is")
    greedy = dict(temperature=0, max_new_tokens=8, ignore_eos=True)
    full, ids, _ = run(engine, prompt, **greedy)
    stop = engine.tokenizer.decode(ids[3:5], skip_special_tokens=True).strip()
    assert stop and full.index(stop) > 0
    monkeypatch.setattr(engine_module, "IncrementalDecoder", HeldBack)
    text, _, done = run(engine, prompt, **greedy, stop=[stop])
    assert (done.reason, done.stop_text, done.completion_tokens) == ("stop", stop, 8)
    assert text == full[: full.index(stop)]


def test_a_reply_cancelled_before_min_new_tokens_is_not_stopped_by_its_held_back_text(engine, monkeypatch):
    """The detokenizer's leftover text at the end of a reply cancelled within its first min_new_tokens
    tokens was matched against the stop strings as if past min_new_tokens: the reply ended "stop", cut
    at a stop string that min_tokens holds back, rather than "cancelled" with its text whole."""
    from vicuna.engine import engine as engine_module

    prompt = engine.encode("The capital of France is")
    greedy = dict(temperature=0, max_new_tokens=24, ignore_eos=True)
    full, ids, _ = run(engine, prompt, **greedy)
    stop = engine.tokenizer.decode(ids[:3], skip_special_tokens=True).strip()
    assert stop
    monkeypatch.setattr(engine_module, "IncrementalDecoder", HeldBack)
    cancel, chunks = threading.Event(), []
    params = SamplingParams(**greedy, stop=[stop], min_new_tokens=10)
    for event in engine.generate(prompt, params, cancel=cancel):
        chunks.append(event)
        if len(chunks) == 3:
            cancel.set()
    *texts, done = chunks
    assert done.reason == "cancelled" and done.completion_tokens == 3
    text = "".join(t.text for t in texts)
    assert stop in text and text == engine.tokenizer.decode(ids[:3], skip_special_tokens=True)
