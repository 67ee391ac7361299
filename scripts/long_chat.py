"""Time to first token of each turn of a terminal chat that has outgrown the context window: the built-in
model on the CPU, its window capped at 2,048 tokens, 26 messages of ~115 tokens with 32-token greedy
replies, through `vicuna.chat.run_chat`. Once exchanges must be left out of the prompt, `fit_history`
keeps out those the last prompt left out (sticky), with slack, so each prompt begins as the last one did
and the engine computes only the new exchange. The baseline, alternated with it in the same run, forgets
them each turn (`left_out=0`): the exchanges left out then change from turn to turn, and each prompt is
computed whole, as before session 19.

Usage: PYTHONPATH=src python scripts/long_chat.py
"""

import statistics
import time

from vicuna import chat
from vicuna.config import ModelSettings, SamplingParams
from vicuna.conversation import fit_history
from vicuna.engine.events import TextChunk
from vicuna.engine.loader import load_engine

TOPICS = "rivers mountains bread bees trains clocks glass salt owls tea bridges maps paper wind copper moss"
TOPICS += " kites ink whales chess soap lamps coral silk dunes frost"
CLASS = (
    "I am writing notes for a small evening class for adults. Each week we pick one everyday thing and "
    "look at it from many sides: where it comes from, how it is made or how it lives, what old stories say "
    "about it, and what a curious person could notice about it on a walk or at home. The class is relaxed, "
    "people bring tea, and nobody needs to know anything in advance. "
)
MESSAGES = [
    f"{CLASS}This week it is {topic}. Give me one short fact about {topic} to start the conversation, in "
    "one or two sentences."
    for topic in TOPICS.split()
]
LAST = 12  # the turns compared: all of them after the conversation outgrew the window


class Script:
    """Types MESSAGES one by one and keeps each reply's Finished event."""

    interactive = True  # as typed: a reply would stop at Ctrl-C

    def __init__(self) -> None:
        self.lines, self.finished, self.notes = list(MESSAGES), [], []

    def read(self) -> str | None:
        return self.lines.pop(0) if self.lines else None

    def info(self, text: str) -> None:
        self.notes.append(text)

    def no_reply(self) -> None:
        """A message left unanswered (chat.ChatIO): no reply to time."""

    def show_reply(self, events):
        text, done = "", None
        for event in events:
            if isinstance(event, TextChunk):
                text += event.text
            else:
                done = event
        self.finished.append(done)
        return text, done


def forgetting(encode, window, messages, max_new_tokens, left_out=0):
    return fit_history(encode, window, messages, max_new_tokens, 0)


engine = load_engine(ModelSettings(), progress=False)
engine.context_window = 2048
params = SamplingParams(temperature=0, max_new_tokens=32)
ttfts: dict[str, list[float]] = {"sticky": [], "forgetting": []}
for name in ("forgetting", "sticky", "sticky", "forgetting"):
    chat.fit_history = forgetting if name == "forgetting" else fit_history
    engine.forget()
    script = Script()
    start = time.perf_counter()
    chat.run_chat(engine, script, params)
    ttft = [done.ttft_s for done in script.finished]
    left_out = sum("left out" in note for note in script.notes)
    print(
        f"{name}: {len(ttft)} turns in {time.perf_counter() - start:.0f} s, exchanges left out on {left_out}; "
        f"prompt tokens {[done.prompt_tokens for done in script.finished]}",
        flush=True,
    )
    print(f"  TTFT ms {[round(t * 1000) for t in ttft]}", flush=True)
    ttfts[name] += ttft[-LAST:]
chat.fit_history = fit_history

for how in (statistics.median, statistics.mean):
    sticky, forgot = how(ttfts["sticky"]), how(ttfts["forgetting"])
    print(
        f"{how.__name__} TTFT of the last {LAST} turns (both runs): sticky {sticky * 1000:.0f} ms, "
        f"forgetting {forgot * 1000:.0f} ms: {forgot / sticky:.1f}x faster"
    )
