"""A long prompt arriving while a reply streams (vicuna.engine.batching.PREFILL_PIECE): the running reply's
longest pause between two tokens, and the long prompt's time to first token, with the prompt computed in
pieces and whole (PREFILL_PIECE beyond its length), alternated. Built-in model, the engine's default dtype.

Usage: python scripts/prefill_pieces.py [PROMPT_TOKENS] [PAIRS]     (defaults: 3000 tokens, 3 pairs)
"""

import sys
import threading
import time

from vicuna.config import ModelSettings, SamplingParams
from vicuna.engine import batching
from vicuna.engine.events import TextChunk
from vicuna.engine.loader import load_engine

tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
pairs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
engine = load_engine(ModelSettings(), progress=False)
paragraph = "The quick brown fox jumps over the lazy dog while the river runs past the old mill. "
long_ids = engine.encode(paragraph * (tokens // 10))[:tokens]
print(
    f"a {len(long_ids)}-token prompt arrives while one reply streams ({engine.dtype}, PREFILL_PIECE {batching.PREFILL_PIECE})"
)
for piece in [batching.PREFILL_PIECE, 10**9] * pairs:
    saved, batching.PREFILL_PIECE = batching.PREFILL_PIECE, piece
    batcher = batching.Batcher(engine, max_batch_size=4)
    times: list[float] = []

    def stream(batcher: batching.Batcher = batcher, times: list[float] = times) -> None:
        params = SamplingParams(temperature=0, max_new_tokens=600, ignore_eos=True)
        for event in batcher.generate(engine.encode("Tell me a long story."), params):
            if isinstance(event, TextChunk) and event.token_ids:
                times.append(time.perf_counter())

    thread = threading.Thread(target=stream)
    thread.start()
    while len(times) < 20:
        time.sleep(0.01)
    start, first = time.perf_counter(), None
    for event in batcher.generate(long_ids, SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)):
        if first is None and isinstance(event, TextChunk) and event.token_ids:
            first = time.perf_counter() - start
    thread.join()
    batcher.close()
    batching.PREFILL_PIECE = saved
    pause = max(b - a for a, b in zip(times, times[1:], strict=False))
    name = f"pieces of {piece}" if piece < 10**9 else "whole"
    print(
        f"{name:>16}: long prompt's first token {first * 1e3:6.0f} ms; running reply's longest pause {pause * 1e3:6.0f} ms"
    )
