"""How often a batched greedy reply differs from the same request run alone (16 requests x 48 tokens, built-in
model). Usage: python scripts/batch_invariance.py float32|bfloat16 [--load-8bit]"""

import sys
import threading

from vicuna.config import ModelSettings, SamplingParams
from vicuna.conversation import Message
from vicuna.engine.batching import Batcher
from vicuna.engine.loader import load_engine

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Explain photosynthesis briefly.",
    "List three prime numbers.",
    "What is 12 times 13?",
    "Name a famous painter.",
    "How do airplanes fly?",
    "Give me a recipe idea.",
    "What is Python?",
    "Describe the moon.",
    "Why is the sky blue?",
    "Tell me a joke.",
    "What is gravity?",
    "Translate 'hello' to French.",
    "What is a black hole?",
    "Suggest a book.",
]
dtype, int8 = sys.argv[1], "--load-8bit" in sys.argv[2:]
engine = load_engine(ModelSettings(dtype=dtype, load_8bit=int8), progress=False)
params = SamplingParams(temperature=0, max_new_tokens=48)


def text(events):
    return "".join(getattr(e, "text", "") for e in events)


alone = [text(engine.chat([Message("user", q)], params)) for q in QUESTIONS]
batcher = Batcher(engine, max_batch_size=16, kv_cache_tokens=16 * 512)
out = [None] * len(QUESTIONS)


def run(i):
    out[i] = text(batcher.chat([Message("user", QUESTIONS[i])], params))


threads = [threading.Thread(target=run, args=(i,)) for i in range(len(QUESTIONS))]
for t in threads:
    t.start()
for t in threads:
    t.join()
batcher.close()
diff = sum(a != b for a, b in zip(alone, out, strict=True))
print(f"{dtype}{' (8-bit)' if int8 else ''}: {diff} of {len(QUESTIONS)} batched replies differ from the same request alone")
