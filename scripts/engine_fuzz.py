"""Differential fuzz of the engine on the tests' tiny LLaMA: random prompts (token ids and text) and random
settings (temperature, top-k/p, min-p, penalties, logit_bias, min tokens, stop strings and ids, seeds,
logprobs), each reply compared with what should equal it:

- greedy: the engine's fast path against transformers' generate (repetition penalty, min tokens, EOS,
  logit_bias as sequence_bias), token by token; a mismatch prints the reference's logit margin there;
- batch: each request alone (cache dropped first), again with the engine's kept cache, and inside a
  Batcher with the others (several lengths and settings, some sharing a prefix or the same prompt,
  arriving at different steps or all at once, a KV budget that preempts): the same tokens, text, end and
  logprobs; a reply's streamed text against the decode of its tokens cut at its first stop string
  (skipped where byte tokens make invalid UTF-8, which the tokenizer's decode replaces byte by byte), and
  its logprobs against a forward pass over prompt + reply.

In float32 every comparison is exact (logprobs within 1e-3; 1e-2 with --load-8bit, whose products round the
int8 weights' scales elsewhere than transformers' forward); in bfloat16 the tiny model's nearly flat logits
tie often (greedy against transformers: 47 of 150 differ, each at a margin under 0.004) and the logprob
tolerance is 0.1. One run of 100 batch cases takes ~15 s on 2 cores. Usage (from the repository root, PYTHONPATH=src):
    python scripts/engine_fuzz.py greedy|batch [CASES] [SEED] [--dtype bfloat16] [--plain] [--no-kernel] [--load-8bit]
--plain batches through transformers (the padded-cache path), --no-kernel runs PyTorch's operations.
"""

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.tiny_models import CORPUS, write_tiny_llama  # noqa: E402

from vicuna.config import ModelSettings, SamplingParams  # noqa: E402
from vicuna.engine.batching import Batcher  # noqa: E402
from vicuna.engine.events import Finished  # noqa: E402
from vicuna.engine.loader import load_engine  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("kind", choices=["greedy", "batch"])
parser.add_argument("cases", type=int, nargs="?", default=100)
parser.add_argument("seed", type=int, nargs="?", default=0)
parser.add_argument("--dtype", default="float32")
parser.add_argument("--plain", action="store_true")
parser.add_argument("--no-kernel", action="store_true")
parser.add_argument("--load-8bit", action="store_true")
args = parser.parse_args()
if args.no_kernel:
    from vicuna.engine import kernel

    kernel.load = lambda progress=True: None
model_dir = write_tiny_llama(Path(tempfile.mkdtemp()) / "tiny", max_position_embeddings=1024)
engine = load_engine(
    ModelSettings(model_path=str(model_dir), dtype=args.dtype, load_8bit=args.load_8bit), progress=False
)
if args.plain:
    from vicuna.engine.engine import Engine

    engine = Engine(
        model=engine.model,
        tokenizer=engine.tokenizer,
        template=engine.template,
        model_name="x",
        fast_path=False,
    )
V, WINDOW, tok, exact = (
    engine.model.config.vocab_size,
    engine.context_window,
    engine.tokenizer,
    args.dtype == "float32",
)
BYTES = range(3, 259)  # the SentencePiece vocabulary's byte tokens <0x00>..<0xFF>
rng = random.Random(args.seed)
counts = dict(mismatches=0, stream_checked=0, stream_skipped=0, requests=0)


def report(kind, case, detail):
    counts["mismatches"] += 1
    print("MISMATCH", kind, repr(case)[:800], "::", repr(detail)[:800], flush=True)


def random_prompt(most):
    if rng.random() < 0.5:
        first = [1] if rng.random() < 0.7 else []
        return first + [rng.randrange(3, V) for _ in range(rng.randint(1, most))]
    pieces = (rng.choice(CORPUS)[rng.randrange(20) :][: rng.randint(1, 60)] for _ in range(rng.randint(1, 8)))
    return engine.encode("".join(pieces))[:most]


def random_params(most_tokens):
    n = rng.randint(0, min(40, most_tokens))
    kw = dict(
        max_new_tokens=n, seed=rng.randrange(2**32), temperature=rng.choice([0, 0, 0.3, 0.7, 1.0, 1.5, 1e-6])
    )
    maybe = {
        "top_k": lambda: rng.choice([1, 2, 5, 50, 1000]),
        "top_p": lambda: rng.choice([0.1, 0.5, 0.9, 1.0]),
        "min_p": lambda: rng.choice([0.0, 0.05, 0.5, 1.0]),
        "repetition_penalty": lambda: rng.choice([0.5, 1.1, 1.5, 2.0]),
        "presence_penalty": lambda: rng.uniform(-2, 2),
        "frequency_penalty": lambda: rng.uniform(-2, 2),
        "logit_bias": lambda: tuple(
            (rng.randrange(V), rng.uniform(-100, 100)) for _ in range(rng.randint(1, 4))
        ),
        "min_new_tokens": lambda: rng.randint(0, n),
        "stop_token_ids": lambda: tuple(rng.randrange(V) for _ in range(rng.randint(1, 3))),
        "stop": lambda: tuple(
            rng.choice(["a", "e ", "\n", "。", "the", "is", "Tok", "!", "  "]) for _ in range(3)
        ),
        "ignore_eos": lambda: True,
        "logprobs": lambda: rng.randint(0, 5),
    }
    kw.update({name: draw() for name, draw in maybe.items() if rng.random() < 0.3})
    if rng.random() < 0.5:  # no byte tokens: the reply's text is valid UTF-8, so the stream check applies
        kw["logit_bias"] = (*kw.get("logit_bias", ()), *((i, -100.0) for i in BYTES))
    return SamplingParams(**kw)


def collect(events):
    events = list(events)
    assert isinstance(events[-1], Finished), events[-1]
    chunks, end = events[:-1], events[-1]
    ids = [t for c in chunks for t in c.token_ids]
    logprobs = [lp for c in chunks if c.logprobs for lp in c.logprobs]
    text = "".join(c.text for c in chunks)
    return dict(
        text=text,
        ids=ids,
        logprobs=logprobs,
        key=(text, ids, end.reason, end.completion_tokens, end.stop_text),
    )


def check_greedy():
    prompt = random_prompt(400)
    n = rng.randint(1, 60)
    if rng.random() < 0.5:
        engine.forget()
    penalty, eos = rng.choice([1.0, 1.0, 1.3, 0.7]), rng.random() < 0.5
    least = rng.choice([0, n, rng.randint(0, n)]) if eos else 0
    bias = tuple((rng.randrange(V), rng.choice([-100.0, 5.0, 100.0])) for _ in range(rng.randint(0, 2)))
    params = SamplingParams(
        temperature=0,
        max_new_tokens=n,
        ignore_eos=not eos,
        repetition_penalty=penalty,
        min_new_tokens=least,
        logit_bias=bias,
    )
    events = list(engine.generate(prompt, params))
    ours = collect(events)["ids"] + ([2] if events[-1].reason == "stop" else [])
    kw = dict(min_new_tokens=least, eos_token_id=2) if eos else dict(min_new_tokens=n, eos_token_id=None)
    if bias:
        kw["sequence_bias"] = {
            (i,): b for i, b in reversed(bias)
        }  # the last value of an id, as ours adds them
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        ref = engine.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            repetition_penalty=penalty,
            **kw,
        )[0, len(prompt) :].tolist()
    if ours != ref:
        k = next(
            (i for i, (a, b) in enumerate(zip(ours, ref, strict=False)) if a != b), min(len(ours), len(ref))
        )
        margin = None
        if k < min(len(ours), len(ref)):
            with torch.inference_mode():
                logits = engine.model(torch.tensor([prompt + ref[:k]])).logits[0, -1].float()
            margin = float(logits[ref[k]] - logits[ours[k]])
        report(
            "greedy", (prompt, params), dict(at=k, ours=ours[k : k + 3], ref=ref[k : k + 3], margin=margin)
        )


def check_alone(reply, prompt, params):
    ids, before = reply["ids"], tok.decode(prompt[-4:], skip_special_tokens=True)

    def text(k):  # the text of the reply's first k tokens
        return tok.decode(prompt[-4:] + ids[:k], skip_special_tokens=True)[len(before) :]

    # token by token, the reply ends where a stop string first ends after the text of its first
    # min_new_tokens - 1 tokens (vLLM's min_tokens), and is cut where that stop string begins
    whole, quiet = text(len(ids)), len(text(params.min_new_tokens - 1)) if params.min_new_tokens else 0
    for k in range(max(params.min_new_tokens, 1), len(ids) + 1) if params.stop else ():
        ends = [at for s in params.stop if (at := text(k).find(s, max(quiet - len(s) + 1, 0))) != -1]
        if ends:
            whole = text(k)[: min(ends)]
            break
    if "\ufffd" in whole + before:
        counts["stream_skipped"] += 1
    else:
        counts["stream_checked"] += 1
        if reply["text"] != whole:
            report("stream", (prompt, params), dict(stream=reply["text"], whole=whole))
    if params.logprobs is not None and ids:
        with torch.inference_mode():
            lp = torch.log_softmax(engine.model(torch.tensor([prompt + ids])).logits[0].float(), -1)
        want = [float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(ids)]
        got = [x.logprob for x in reply["logprobs"]]
        bad = [
            (i, g, w)
            for i, (g, w) in enumerate(zip(got, want, strict=False))
            if abs(g - w) > (1e-2 if args.load_8bit else 1e-3 if exact else 0.1)
        ]
        if len(got) != len(want) or bad:
            report("logprobs", (prompt, params), dict(counts=(len(got), len(want)), bad=bad[:3]))


def check_batch(batcher):
    jobs, shared = [], random_prompt(120)
    for _ in range(rng.randint(2, 8)):
        prompt = random_prompt(600)
        if rng.random() < 0.3:  # begins like another
            prompt = (shared[: rng.randint(1, len(shared))] + prompt)[: WINDOW - 60]
        if rng.random() < 0.15:
            prompt = list(shared)
        jobs.append(
            (prompt, random_params(WINDOW - len(prompt)), rng.choice([0, 0, rng.random() * 0.005, 0.03]))
        )
    alone = []
    for prompt, params, _ in jobs:
        engine.forget()
        alone.append(collect(engine.generate(prompt, params)))
        check_alone(alone[-1], prompt, params)
    for (prompt, params, _), first in zip(jobs, alone, strict=False):  # the engine's kept cache: same replies
        again = collect(engine.generate(prompt, params))
        if again["key"] != first["key"]:
            report("engine cache", (prompt, params), dict(off=first["key"], on=again["key"]))
    batched = [None] * len(jobs)

    def send(i):
        time.sleep(jobs[i][2])
        try:
            batched[i] = collect(batcher.generate(*jobs[i][:2]))
        except Exception as error:
            batched[i] = error

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(jobs))]
    release = None
    if rng.random() < 0.5:  # all queued before the scheduler admits any
        busy, release = threading.Event(), threading.Event()
        batcher.call(lambda: (busy.set(), release.wait(60)))
        busy.wait(60)
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while release is not None and batcher.waiting < len(jobs) and time.monotonic() < deadline:
        time.sleep(0.002)
    if release is not None:
        release.set()
    for t in threads:
        t.join(300)
    counts["requests"] += len(jobs)
    for (prompt, params, _), a, b in zip(jobs, alone, batched, strict=False):
        if isinstance(b, Exception):
            report("batch error", (prompt, params), repr(b))
        elif a["key"] != b["key"] and exact:
            report("batch", (prompt, params), dict(alone=a["key"], batched=b["key"]))
        elif a["key"] != b["key"]:
            print("bfloat16: a batched reply differs from alone", flush=True)
        elif exact and a["logprobs"]:
            worst = max(
                abs(x.logprob - y.logprob) for x, y in zip(a["logprobs"], b["logprobs"], strict=False)
            )
            if worst > 1e-3:
                report("batch logprobs", (prompt, params), worst)


began = time.time()
batcher = None
if args.kind == "batch":
    budget = rng.choice([None, WINDOW, 2 * WINDOW, 3 * WINDOW])  # WINDOW: one row at a time
    batcher = Batcher(engine, max_batch_size=rng.choice([3, 4, 8]), kv_cache_tokens=budget)
for _ in range(args.cases):
    check_greedy() if batcher is None else check_batch(batcher)
print(f"{args.dtype} {args.kind}: {args.cases} cases, {counts} in {time.time() - began:.0f} s")
if batcher is not None:
    print(batcher.stats)
    batcher.close()
