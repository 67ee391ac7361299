"""`vicuna bench latency`: time to first token, inter-token latency, decode tokens/s and whole-reply time of
the engine, each beside Hugging Face `model.generate` (the path FastChat's CLI and worker take) run on the
same prompt, dtype and reply length in the same process, and beside the memory-bandwidth ceiling.

Runs of the engine and of the baselines alternate, so that a neighbour's load on a shared machine hits
both alike; each figure is the median of the runs after the warm-up runs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from vicuna.bench.report import Report, check_reply_fits, median, model_info
from vicuna.config import ModelSettings, SamplingParams
from vicuna.engine.events import decode_rate
from vicuna.errors import ContextTooLongError, VicunaError

# Long enough to tile a ~500-token prompt; ordinary prose so that tokenizers split it typically.
PARAGRAPH = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Europe tried to "
    "build a machine that a person could ride without a horse. The first designs had no pedals; riders "
    "pushed against the ground with their feet. Later models added cranks to the front wheel, then a chain "
    "to the rear wheel, and finally air-filled tyres that made long journeys comfortable. "
)
SHORT_QUESTION = "Write a short story about a lighthouse keeper who finds a message in a bottle."
LONG_QUESTION = "Summarize the text above in three sentences."
FOLLOW_UP = "Thank you. Now say it again in one sentence."  # the next turn of the same chat
NEXT_TURN_TOKENS = 2  # the next turn is timed to its first tokens
# The long prompt's least length (--long-tokens): well beyond the short one (46 tokens, built-in model)
MIN_LONG_TOKENS = 100
PROMPT_KINDS = ("short", "long")
CPU_CEILING_TARGET, GPU_CEILING_TARGET = 0.6, 0.7


@dataclass(frozen=True)
class Timing:
    """One reply's figures, defined the same way for every runner: TTFT from the call to the first sampled
    token; decode rate over the tokens after the first; inter-token latency is the median gap."""

    ttft_s: float
    decode_tokens_per_s: float
    itl_s: float
    total_s: float
    tokens: int


def gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def greedy(new_tokens: int) -> SamplingParams:
    """Greedy decoding of exactly `new_tokens` tokens (an early EOS would shorten some runs)."""
    return SamplingParams(
        temperature=0.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, ignore_eos=True
    )


def time_engine(engine: Any, prompt_ids: list[int], new_tokens: int, next_turn: bool = False) -> Timing:
    """The engine's own account (its `Finished` event), plus the gaps between streamed tokens. The whole
    prompt is computed, as HF generate computes it, unless it is the `next_turn` of the chat the engine
    last generated for (whose cache the engine keeps)."""
    from vicuna.engine.events import Finished, TextChunk

    stamps: list[float] = []
    finished = None
    if not next_turn:
        engine.forget()
    for event in engine.generate(prompt_ids, greedy(new_tokens)):
        if isinstance(event, TextChunk) and event.token_ids:
            stamps.append(time.perf_counter())
        elif isinstance(event, Finished):
            finished = event
    if finished is None or finished.completion_tokens != new_tokens:
        got = finished.completion_tokens if finished else 0
        raise RuntimeError(f"the engine produced {got} tokens, {new_tokens} were asked for")
    return Timing(
        ttft_s=finished.ttft_s,
        decode_tokens_per_s=finished.decode_tokens_per_s,
        itl_s=median(gaps(stamps)) if len(stamps) > 1 else 0.0,
        total_s=finished.total_s,
        tokens=finished.completion_tokens,
    )


def time_hf_generate(
    model: Any, prompt_ids: list[int], new_tokens: int, pad_id: int | None, threads: int | None = None
) -> Timing:
    """`model.generate` greedy with `min_new_tokens` forcing the length; a streamer stamps each token.

    With `threads`, PyTorch's thread count during the call, set back after it: the engine's kernel sizes
    its OpenMP team on the calling thread (`kernel.Team`), which is PyTorch's too, so HF generate would
    otherwise run with whatever team the engine's last reply left (one thread of two after each reply's
    trial of one fewer), not with the threads FastChat's process has."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.calls = 0

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls > 1:  # generate passes the prompt first, then each new token
                self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    stamps = Stamps()
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad_id,
            streamer=stamps,
        )
    end = time.perf_counter()
    torch.set_num_threads(before)
    tokens = out.shape[1] - ids.shape[1]
    if tokens != new_tokens or not stamps.times:
        raise RuntimeError(f"HF generate produced {tokens} tokens, {new_tokens} were asked for")
    first = stamps.times[0]
    return Timing(
        ttft_s=first - start,
        decode_tokens_per_s=decode_rate(tokens, first, end),
        itl_s=median(gaps(stamps.times)) if tokens > 1 else 0.0,
        total_s=end - start,
        tokens=tokens,
    )


def measure_bandwidth(device: Any, nbytes: int | None = None, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s: the best of a large tensor's sum (reads `nbytes`), its copy (reads and
    writes `nbytes`) and, where our CPU kernel runs, its product of one row with the tensor as a float32
    matrix (reads `nbytes` at several places at once: on our 2-core EPYC ~1.2x the sum's rate, so without
    it the engine decoded float32 faster than this "ceiling"). The buffer is far larger than any cache,
    so this is what streaming weights can get. On a GPU the buffer is 4 GiB, so that a sum lasts ~1 ms
    and the launch and the wait for it count for little."""
    import torch

    from vicuna.engine import kernel

    if nbytes is None:
        nbytes = (4096 if device.type == "cuda" else 512) * 2**20

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "mps":  # queued as on CUDA: unsynchronized, only the queueing was timed
            torch.mps.synchronize()

    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    ops = [(lambda: x.sum(), nbytes), (lambda: y.copy_(x), 2 * nbytes)]
    if kernel.runs_on(device, torch.float32):
        matrix, row = kernel.Weight(x.view(-1, 4096)), torch.ones(1, 4096)
        ops.append((lambda: matrix(row), nbytes))
    best = 0.0
    for op, moved in ops:
        op()  # first touch: page faults and allocation are not bandwidth
        sync()
        for _ in range(repeats):
            start = time.perf_counter()
            op()
            sync()
            best = max(best, moved / (time.perf_counter() - start))
    return best


def next_turn_room(engine: Any, new_tokens: int) -> int:
    """Tokens the chat's next turn needs beyond its first prompt: the reply (`new_tokens`, with room for it
    to encode to a few more tokens once decoded, as the next turn's prompt encodes it), the template's
    end of that reply and the follow-up question, and the `NEXT_TURN_TOKENS` it is timed to."""
    from vicuna.conversation import Message

    first = [Message(role="user", content=SHORT_QUESTION)]
    turn = [*first, Message(role="assistant", content=""), Message(role="user", content=FOLLOW_UP)]
    follow_up = len(engine.encode_chat(turn)) - len(engine.encode_chat(first))
    return new_tokens + new_tokens // 4 + 8 + follow_up + NEXT_TURN_TOKENS


def long_prompt_budget(engine: Any, long_tokens: int, new_tokens: int) -> int:
    """The long prompt's length: `long_tokens`, or less where the model's context window would not hold
    it, its reply and the chat's next turn. Refused below `MIN_LONG_TOKENS`."""
    if long_tokens < MIN_LONG_TOKENS:
        raise VicunaError(f"--long-tokens must be at least {MIN_LONG_TOKENS}, not {long_tokens}")
    room = engine.context_window - next_turn_room(engine, new_tokens)
    if room < MIN_LONG_TOKENS:
        raise VicunaError(
            f"the model's context window ({engine.context_window} tokens) leaves {max(room, 0)} tokens for "
            f"the long prompt beside a reply of --new-tokens {new_tokens} and the chat's next turn, fewer "
            f"than {MIN_LONG_TOKENS}: use fewer --new-tokens, or --prompts short"
        )
    return min(long_tokens, room)


def make_prompts(engine: Any, kinds: list[str], long_tokens: int, new_tokens: int) -> dict[str, str]:
    """The user message of each chat prompt: a one-line request, and a ~`long_tokens` text followed by a
    request to summarize it, shortened to fit the model's context window with the reply and the chat's
    next turn (`long_prompt_budget`)."""
    from vicuna.conversation import Message

    prompts = {}
    for kind in kinds:
        if kind == "short":
            prompts[kind] = SHORT_QUESTION
            continue
        budget = long_prompt_budget(engine, long_tokens, new_tokens)
        overhead = len(engine.encode_chat([Message(role="user", content="\n\n" + LONG_QUESTION)]))
        body = engine.encode(PARAGRAPH * (budget // 40 + 2))
        body = body[1:] if body and body[0] == engine.tokenizer.bos_token_id else body
        keep = max(budget - overhead, 1)
        for _ in range(3):  # decoding then encoding text can change its length a little: converge on it
            text = engine.tokenizer.decode(body[:keep], skip_special_tokens=True)
            content = f"{text}\n\n{LONG_QUESTION}"
            ids = engine.encode_chat([Message(role="user", content=content)])
            if len(ids) <= budget:
                break
            keep = max(keep - (len(ids) - budget), 1)
        prompts[kind] = content
    return prompts


def next_turn(engine: Any, question: str, question_ids: list[int], new_tokens: int) -> list[int]:
    """The prompt of a chat's next turn: `question` (encoded as `question_ids`), the engine's greedy reply
    to it, and `FOLLOW_UP`."""
    from vicuna.conversation import Message
    from vicuna.engine.events import TextChunk

    events = engine.generate(question_ids, greedy(new_tokens))
    reply = "".join(e.text for e in events if isinstance(e, TextChunk))
    messages = [
        Message(role="user", content=question),
        Message(role="assistant", content=reply),
        Message(role="user", content=FOLLOW_UP),
    ]
    ids = engine.encode_chat(messages)
    try:
        engine.check_fits(len(ids), NEXT_TURN_TOKENS)
    except ContextTooLongError:
        raise VicunaError(
            f"the chat's next turn ({len(ids)} tokens: a prompt of {len(question_ids)}, its reply of "
            f"--new-tokens {new_tokens} and a follow-up question) does not fit the model's context window "
            f"of {engine.context_window} tokens: use fewer --new-tokens"
        ) from None
    return ids


def check_baseline_fits(engine: Any) -> None:
    """Refuse HF generate's copy of the model where the memory the engine left cannot hold it: the engine's
    load was checked against the whole machine, but this copy comes beside it, at the engine's dtype
    (quantized after loading, with --load-8bit), and on a CPU it would swap or be killed without a word."""
    from vicuna.engine.memory import free_bytes, gib, model_size
    from vicuna.engine.placement import HEADROOM

    needed = int(model_size(engine.model.config).weight_bytes(engine.dtype, False) * HEADROOM)
    available = free_bytes(engine.device)
    if needed > available:
        raise VicunaError(
            f"the baseline, HF generate, loads the model a second time beside the engine: it needs about "
            f"{gib(needed)} at {str(engine.dtype).removeprefix('torch.')}, but {engine.device.type} has "
            f"{gib(available)} left; measure a smaller model (--model-path), or on a machine with more memory"
        )


def load_hf_model(engine: Any, settings: ModelSettings) -> Any:
    """The same checkpoint loaded the plain transformers way, at the engine's dtype (and 8-bit if asked)."""
    from transformers import AutoModelForCausalLM

    from vicuna.engine.loader import resolve_model_path

    check_baseline_fits(engine)
    folder = resolve_model_path(settings.model_path)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=engine.dtype, device_map=str(engine.device))
    model.eval()
    if settings.load_8bit:
        from vicuna.engine.quant import quantize_int8

        quantize_int8(model, engine.device)
    return model


def bench_latency(
    settings: ModelSettings,
    *,
    runs: int = 3,
    warmup: int = 1,
    new_tokens: int = 128,
    prompts: list[str] | None = None,
    long_tokens: int = 500,
    progress: bool = True,
) -> Report:
    """Measure the engine, HF generate and (with 8-bit) the unquantized engine; return the report."""
    import torch

    from vicuna.bench.report import machine_info, progress_bar
    from vicuna.engine.loader import load_engine
    from vicuna.engine.quant import decode_bytes, weight_bytes

    kinds = prompts or list(PROMPT_KINDS)
    for flag, value, least in (("--runs", runs, 1), ("--warmup", warmup, 0), ("--new-tokens", new_tokens, 2)):
        if value < least:
            raise VicunaError(f"{flag} must be at least {least}, not {value}")
    if "long" in kinds and long_tokens < MIN_LONG_TOKENS:
        raise VicunaError(f"--long-tokens must be at least {MIN_LONG_TOKENS}, not {long_tokens}")
    threads = torch.get_num_threads()  # PyTorch's own count, before the engine's kernel sizes its team
    engine = load_engine(settings, progress=progress)
    questions = make_prompts(engine, kinds, long_tokens, new_tokens)  # refused here if they cannot fit
    from vicuna.conversation import Message

    prompt_ids = {k: engine.encode_chat([Message(role="user", content=q)]) for k, q in questions.items()}
    if "long" in kinds and long_prompt_budget(engine, long_tokens, new_tokens) < long_tokens:
        print(
            f"note: the long prompt is shortened to {len(prompt_ids['long'])} tokens (not --long-tokens "
            f"{long_tokens}), to fit the model's context window of {engine.context_window} with its reply "
            "and the chat's next turn",
            file=sys.stderr,
        )
    for ids in prompt_ids.values():  # refused before the baselines are loaded
        check_reply_fits(engine, len(ids), new_tokens)
    # The chat's next turn, right after the engine's reply (whose cache it keeps): the engine computes
    # the new tokens only, HF generate the whole conversation, as FastChat does on every turn.
    turns = {k: next_turn(engine, q, prompt_ids[k], new_tokens) for k, q in questions.items()}
    hf_model = load_hf_model(engine, settings)
    pad_id = engine.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else (engine.end_ids[0] if engine.end_ids else 0)
    runners: dict[str, Callable[[list[int]], Timing]] = {
        "engine": lambda ids: time_engine(engine, ids, new_tokens),
        "hf": lambda ids: time_hf_generate(hf_model, ids, new_tokens, pad_id, threads),
    }
    reference = None
    if settings.load_8bit:  # the same settings unquantized, for the 8-bit ratios
        reference = load_engine(replace(settings, load_8bit=False), progress=progress)
        runners["unquantized"] = lambda ids: time_engine(reference, ids, new_tokens)
    steps = [(name, run, False) for name, run in runners.items()]
    steps.insert(
        1, ("engine next turn", lambda k: time_engine(engine, turns[k], NEXT_TURN_TOKENS, True), True)
    )
    steps.append(
        (
            "hf next turn",
            lambda k: time_hf_generate(hf_model, turns[k], NEXT_TURN_TOKENS, pad_id, threads),
            True,
        )
    )
    timings: dict[str, dict[str, list[Timing]]] = {k: {s[0]: [] for s in steps} for k in prompt_ids}
    with progress_bar(progress) as bar:
        task = bar.add_task("latency", total=(runs + warmup) * len(prompt_ids) * len(steps))
        for i in range(warmup + runs):
            for kind, ids in prompt_ids.items():
                for name, run, by_kind in steps:
                    bar.update(task, description=f"{kind} prompt, {name}, {run_label(i, warmup, runs)}")
                    t = run(kind) if by_kind else run(ids)
                    if i >= warmup:
                        timings[kind][name].append(t)
                    bar.advance(task)
        bar.update(task, description="memory bandwidth")
        torch.set_num_threads(threads)  # every core reads: not the team the engine's last reply left
        bandwidth = measure_bandwidth(engine.device)

    weights, per_token = weight_bytes(engine.model), decode_bytes(engine.model)
    report = Report(
        "latency",
        settings={
            **model_info(engine, settings),
            "runs": runs,
            "warmup": warmup,
            "new_tokens": new_tokens,
            "prompt_tokens": {k: len(v) for k, v in prompt_ids.items()},
            "next_turn_tokens": {k: len(v) for k, v in turns.items()},
            "weight_bytes": weights,
            "decode_bytes": per_token,
            "bandwidth_bytes_per_s": bandwidth,
            "threads": threads,  # HF generate's; the engine's kernel picks its own team, up to this
        },
        machine=machine_info(),
        samples={k: {r: [asdict(t) for t in ts] for r, ts in v.items()} for k, v in timings.items()},
    )
    ceiling_target = GPU_CEILING_TARGET if engine.device.type == "cuda" else CPU_CEILING_TARGET
    add_latency_rows(
        report,
        timings,
        prompt_ids,
        ceiling_tokens_per_s=bandwidth / per_token,
        ceiling_target=ceiling_target,
        new_tokens=new_tokens,
        next_turn_tokens={k: len(v) for k, v in turns.items()},
    )
    if reference is not None:
        report.add(
            "8-bit",
            "weight memory",
            "MiB",
            weights / 2**20,
            "unquantized",
            weight_bytes(reference.model) / 2**20,
            target=0.55,
            target_op="<=",
        )
    return report


def run_label(i: int, warmup: int, runs: int) -> str:
    """What the progress bar calls round `i` (from 0) of `warmup` unmeasured then `runs` measured ones."""
    return f"warm-up {i + 1}/{warmup}" if i < warmup else f"run {i + 1 - warmup}/{runs}"


def medians(ts: list[Timing]) -> dict[str, float]:
    return {
        f: median([getattr(t, f) for t in ts]) for f in ("ttft_s", "decode_tokens_per_s", "itl_s", "total_s")
    }


def add_latency_rows(
    report: Report,
    timings: dict[str, dict[str, list[Timing]]],
    prompt_ids: dict[str, list[int]],
    *,
    ceiling_tokens_per_s: float,
    ceiling_target: float,
    new_tokens: int,
    next_turn_tokens: dict[str, int] | None = None,
) -> None:
    """Turn the per-run timings into rows: medians of the engine beside medians of each baseline."""
    for kind, by_runner in timings.items():
        group = f"{kind} prompt ({len(prompt_ids[kind])} tokens)"
        eng, hf = medians(by_runner["engine"]), medians(by_runner["hf"])
        report.add(group, "time to first token", "ms", eng["ttft_s"] * 1e3, "HF generate", hf["ttft_s"] * 1e3)
        if by_runner.get("engine next turn") and by_runner.get("hf next turn"):
            ours, theirs = medians(by_runner["engine next turn"]), medians(by_runner["hf next turn"])
            tokens = (next_turn_tokens or {}).get(kind, 0)
            report.add(group, f"next turn's TTFT ({tokens} tokens)", "ms", ours["ttft_s"] * 1e3,
                       "HF generate", theirs["ttft_s"] * 1e3)  # fmt: skip
        report.add(
            group,
            "decode",
            "tok/s",
            eng["decode_tokens_per_s"],
            "HF generate",
            hf["decode_tokens_per_s"],
            target=2.0,
        )
        report.add(
            group,
            "decode",
            "tok/s",
            eng["decode_tokens_per_s"],
            "bandwidth ceiling",
            ceiling_tokens_per_s,
            target=ceiling_target,
        )
        report.add(group, "inter-token latency", "ms", eng["itl_s"] * 1e3, "HF generate", hf["itl_s"] * 1e3)
        report.add(
            group, f"reply time ({new_tokens} tokens)", "s", eng["total_s"], "HF generate", hf["total_s"]
        )
        if "unquantized" in by_runner:
            ref = medians(by_runner["unquantized"])
            report.add(
                group,
                "8-bit decode",
                "tok/s",
                eng["decode_tokens_per_s"],
                "unquantized",
                ref["decode_tokens_per_s"],
                target=0.9,
            )
