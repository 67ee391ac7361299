"""`vicuna bench`: the statistics and ratios are computed from the right numbers, the outputs have the
documented shape, and each benchmark runs end to end on a tiny model. Speed is never asserted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from vicuna.bench import add_arguments, serve
from vicuna.bench.latency import Timing, add_latency_rows, run_label
from vicuna.bench.memory import (
    add_memory_rows,
    largest_tensor_bytes,
    meta_bytes,
    meta_params,
    run_child,
    run_job,
    write_delta,
    write_meta_checkpoint,
)
from vicuna.bench.report import (
    REPORT_KEYS,
    ROW_KEYS,
    Report,
    Row,
    median,
    minor_tick_label,
    percentile,
    print_table,
    ratio,
    ratio_chart,
    write_json,
    write_plot,
)
from vicuna.bench.serve import (
    API_PAIRS,
    MIN_CONTENT_READS,
    StreamResult,
    Wave,
    add_serve_rows,
    model_names,
    sse_payloads,
    stream_one,
    summarize_wave,
)
from vicuna.cli import main as cli
from vicuna.errors import VicunaError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rows_by(report: Report, group: str, metric: str, baseline: str) -> Row:
    [row] = [r for r in report.rows if (r.group, r.metric, r.baseline) == (group, metric, baseline)]
    return row


# --- statistics and ratios ---------------------------------------------------------------------


def test_median_and_percentile():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    values = [float(x) for x in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 3.0], 0) == 1.0 and percentile([1.0, 3.0], 100) == 3.0
    with pytest.raises(ValueError):
        median([])
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_row_ratio_is_value_over_baseline_and_target_direction_is_respected():
    assert ratio(6.0, 3.0) == 2.0 and ratio(1.0, 0.0) is None
    faster = Row("g", "decode", "tok/s", 62.0, "HF generate", 31.0, target=2.0)
    assert faster.ratio == 2.0 and faster.met is True
    slower = Row("g", "decode", "tok/s", 50.0, "HF generate", 31.0, target=2.0)
    assert slower.met is False
    smaller = Row("g", "weights", "MiB", 50.0, "bfloat16", 100.0, target=0.55, target_op="<=")
    assert smaller.ratio == 0.5 and smaller.met is True
    assert Row("g", "m", "s", 1.0, "b", 2.0).met is None  # no target
    assert Row("g", "m", "s", 1.0, "b", 0.0, target=1.0).met is None  # nothing to compare with


def test_json_has_the_documented_keys_and_the_plot_is_a_png(tmp_path, capsys):
    report = Report("latency", settings={"runs": 3}, machine={"cpu": "test cpu", "cores": 2})
    report.add("short prompt", "decode", "tok/s", 60.0, "HF generate", 30.0, target=2.0)
    report.add("short prompt", "weight memory", "MiB", 40.0, "bfloat16", 100.0, target=0.55, target_op="<=")
    report.add("short prompt", "time to first token", "ms", 10.0, "HF generate", 0.0)  # no ratio: not drawn
    (tmp_path / "out").mkdir()
    write_json(report, tmp_path / "out" / "r.json")
    data = json.loads((tmp_path / "out" / "r.json").read_text())
    assert tuple(data) == REPORT_KEYS and data["schema"] == 1 and data["benchmark"] == "latency"
    assert all(tuple(row) == ROW_KEYS for row in data["rows"])
    assert data["rows"][0]["ratio"] == 2.0 and data["rows"][0]["met"] is True
    assert data["rows"][1]["ratio"] == 0.4 and data["rows"][1]["target_op"] == "<="
    assert data["rows"][2]["ratio"] is None
    write_plot(report, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes().startswith(PNG_MAGIC)
    assert not list(tmp_path.glob(".*.tmp")) and not list((tmp_path / "out").glob(".*"))
    print_table(report)
    out = capsys.readouterr().out
    assert "2x" in out and "0.4x" in out and "test cpu" in out


def test_a_narrow_terminal_folds_the_table_s_words_instead_of_cutting_them(capsys, monkeypatch):
    """At 60 columns (a large font, a screen magnifier) the metrics were cut to "dec…" and "int…" and the
    baselines to "genera…"; at 40 the metric and baseline columns were left out altogether."""
    report = Report("latency", settings={}, machine={"cpu": "test cpu"})
    report.add("short prompt (163 tokens)", "time to first token", "ms", 2.26, "HF generate", 26.2)
    report.add(
        "short prompt (163 tokens)", "decode", "tok/s", 261.0, "bandwidth ceiling", 31513.0, target=0.6
    )
    report.add("short prompt (163 tokens)", "inter-token latency", "ms", 0.0525, "HF generate", 14.2)
    monkeypatch.setenv("COLUMNS", "60")
    print_table(report)
    out = capsys.readouterr().out
    assert "…" not in out and "  decode " in out and " bandwidth " in out and ">= 0.6x" in out
    monkeypatch.setenv("COLUMNS", "40")
    print_table(report)
    out = capsys.readouterr().out
    assert "…" not in out and "metri" in out and "basel" in out


def test_the_table_says_which_targets_are_met_without_colours(capsys):
    """Green and red are all a terminal showed; piped or saved to a file, the table has no colours."""
    report = Report("serve", settings={}, machine={"cpu": "test cpu"})
    report.add("1 stream", "API decode", "tok/s", 27.3, "engine directly", 56.7, target=0.95)
    report.add("16 streams", "aggregate", "tok/s", 900.0, "1 stream", 100.0, target=6.0)
    report.add("16 streams", "TTFT p50", "ms", 50.0, "1 stream", 25.0)
    print_table(report)
    out = capsys.readouterr().out
    assert "\x1b[" not in out  # not a terminal: no colour codes
    [api] = [line for line in out.splitlines() if "API decode" in line]
    [aggregate] = [line for line in out.splitlines() if "aggregate" in line]
    [ttft] = [line for line in out.splitlines() if "TTFT p50" in line]
    assert ">= 0.95x missed" in api and ">= 6x met" in aggregate
    assert "met" not in ttft and "missed" not in ttft  # no target, no verdict
    assert "ratio: value / baseline" in out


def test_outputs_go_only_into_existing_folders_and_the_chart_only_into_a_png(tmp_path):
    report = Report("latency", settings={})
    report.add("g", "decode", "tok/s", 60.0, "HF generate", 30.0)
    with pytest.raises(VicunaError, match="does not exist"):
        write_json(report, tmp_path / "missing" / "r.json")
    with pytest.raises(VicunaError, match="does not exist"):
        write_plot(report, tmp_path / "missing" / "r.png")
    with pytest.raises(VicunaError, match=r"name it \*\.png"):
        write_plot(report, tmp_path / "r.txt")
    assert not (tmp_path / "missing").exists() and not (tmp_path / "r.txt").exists()


@pytest.mark.skipif(not Path("/dev/fd").is_dir(), reason="no /dev/fd (Windows)")
def test_the_json_goes_into_a_pipe_named_as_its_file():
    """`--json /dev/stdout | jq`, `--json >(jq .)`: the pipe's folder (/dev/fd) takes no temporary file, so
    the run was refused with "cannot write into /dev/fd"; and a pipe renamed over is lost to its reader."""
    report = Report("latency", settings={})
    report.add("g", "decode", "tok/s", 60.0, "HF generate", 30.0)
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, encoding="utf-8") as pipe:
        try:
            write_json(report, Path(f"/dev/fd/{write_end}"))
        finally:
            os.close(write_end)
        assert json.load(pipe)["rows"][0]["value"] == 60.0


@pytest.mark.skipif(not Path("/dev/fd").is_dir(), reason="no /dev/fd (Windows)")
def test_json_sent_to_standard_output_is_all_it_holds_the_table_goes_to_stderr():
    """`vicuna bench latency --json /dev/stdout | jq .`: the table came first on standard output."""
    code = textwrap.dedent(
        """
        from pathlib import Path
        from vicuna.bench.report import Report, emit

        report = Report("latency", settings={})
        report.add("g", "decode", "tok/s", 60.0, "HF generate", 30.0)
        emit(report, json_path=Path("/dev/fd/1"), plot_path=None)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"][0]["value"] == 60.0
    assert "vicuna bench latency" in done.stderr and "wrote /dev/fd/1" in done.stderr


def test_minor_ticks_are_labelled_only_where_they_have_room():
    assert [minor_tick_label(v, 0.5) for v in (0.7, 0.8, 0.9, 2.0)] == ["0.7x", "0.8x", "0.9x", "2x"]
    assert [minor_tick_label(v, 1.0) for v in (0.2, 0.3, 0.4, 5.0, 7.0)] == ["0.2x", "0.3x", "", "5x", ""]
    assert [minor_tick_label(v, 2.0) for v in (0.2, 0.3, 5.0, 50.0)] == ["0.2x", "", "5x", "50x"]
    assert minor_tick_label(0.2, 3.5) == minor_tick_label(5.0, 3.5) == ""


def overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize(
    "ratios",
    [
        [(83 / 2755, None), (0.12, None), (136, None), (0.5, 0.55), (1.54, None)],  # four decades
        [(2.0, 2.0), (0.68, 0.7), (0.341, None), (0.5, 0.55), (3, None)],  # one
        [(0.95, 0.95), (1.3, None), (0.8, None)],  # less than one
    ],
)
def test_the_chart_s_labels_do_not_run_into_each_other_or_into_the_targets(ratios):
    import matplotlib.pyplot as plt

    report = Report("memory", settings={}, machine={"cpu": "test cpu"})
    for i, (value, target) in enumerate(ratios):
        report.add("group", f"metric {i}", "x", value, "baseline", 1.0, target=target, target_op="<=")
    fig = ratio_chart(report)
    try:
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        ticks = [t for t in ax.get_xticklabels() + ax.get_xticklabels(minor=True) if t.get_text()]
        low, high = ax.get_xlim()
        shown = [t.get_window_extent(renderer) for t in ticks if low <= t.get_position()[0] <= high]
        assert len(shown) >= 2
        assert not [(a, b) for i, a in enumerate(shown) for b in shown[i + 1 :] if overlaps(a, b)]
        labels = [t.get_window_extent(renderer) for t in ax.texts]
        targets = [line.get_window_extent(renderer) for line in ax.lines if line.get_marker() == "|"]
        assert len(labels) == len(ratios) and targets
        assert not [(a, b) for a in labels for b in targets if overlaps(a, b)]
    finally:
        plt.close(fig)


# --- each benchmark's rows from given measurements ---------------------------------------------


def timing(decode: float, ttft: float = 0.1, total: float = 1.0, itl: float = 0.01) -> Timing:
    return Timing(ttft_s=ttft, decode_tokens_per_s=decode, itl_s=itl, total_s=total, tokens=8)


def test_latency_rows_are_medians_of_each_runner_against_its_baseline():
    timings = {
        "short": {
            "engine": [timing(60, ttft=0.2), timing(64, ttft=0.1), timing(10, ttft=0.3)],  # median 60, 0.2
            "hf": [timing(30, total=2.0), timing(31, total=4.0), timing(29, total=3.0)],  # median 30, 3.0
            "unquantized": [timing(50), timing(80), timing(70)],  # median 70
        }
    }
    report = Report("latency", settings={})
    add_latency_rows(
        report, timings, {"short": [1] * 12}, ceiling_tokens_per_s=100.0, ceiling_target=0.6, new_tokens=8
    )
    group = "short prompt (12 tokens)"
    vs_hf = rows_by(report, group, "decode", "HF generate")
    assert (vs_hf.value, vs_hf.baseline_value, vs_hf.ratio, vs_hf.target) == (60, 30, 2.0, 2.0)
    ceiling = rows_by(report, group, "decode", "bandwidth ceiling")
    assert (ceiling.baseline_value, ceiling.ratio, ceiling.met) == (100.0, 0.6, True)
    ttft = rows_by(report, group, "time to first token", "HF generate")
    assert ttft.value == pytest.approx(200.0) and ttft.unit == "ms"
    reply = rows_by(report, group, "reply time (8 tokens)", "HF generate")
    assert (reply.value, reply.baseline_value) == (1.0, 3.0)
    eight_bit = rows_by(report, group, "8-bit decode", "unquantized")
    assert eight_bit.ratio == pytest.approx(60 / 70) and eight_bit.met is False


def test_the_progress_names_warm_up_rounds_apart_from_measured_runs():
    labels = [run_label(i, warmup=2, runs=3) for i in range(5)]
    assert labels == ["warm-up 1/2", "warm-up 2/2", "run 1/3", "run 2/3", "run 3/3"]


def test_the_next_turn_row_compares_the_engine_reusing_its_cache_with_hf_recomputing():
    timings = {
        "long": {
            "engine": [timing(60)],
            "hf": [timing(30)],
            "engine next turn": [timing(0, ttft=0.05), timing(0, ttft=0.04), timing(0, ttft=0.5)],
            "hf next turn": [timing(0, ttft=2.0), timing(0, ttft=3.0), timing(0, ttft=2.5)],
        }
    }
    report = Report("latency", settings={})
    add_latency_rows(
        report,
        timings,
        {"long": [1] * 500},
        ceiling_tokens_per_s=100.0,
        ceiling_target=0.6,
        new_tokens=8,
        next_turn_tokens={"long": 640},
    )
    row = rows_by(report, "long prompt (500 tokens)", "next turn's TTFT (640 tokens)", "HF generate")
    assert (row.value, row.baseline_value) == (
        pytest.approx(50.0),
        pytest.approx(2500.0),
    ) and row.unit == "ms"


def wave(n: int, rate: float, p50: float, p99: float, decode: float | None = 50.0) -> Wave:
    return Wave(n, 1.0, int(rate), rate, p50, p99, decode)


def test_serve_rows_compare_concurrency_with_one_stream_and_the_api_with_the_engine():
    # each API wave was sent right after the engine reply of the same index: the pair ratios are 1.0,
    # 0.857 and 0.976, so the median pair is (80, 82), where a ratio of medians would say 60 / 70
    waves = {
        1: [
            wave(1, 40, 0.1, 0.1, decode=40),
            wave(1, 50, 0.3, 0.3, decode=60),
            wave(1, 60, 0.2, 0.2, decode=80),
        ],
        16: [wave(16, 300, 0.5, 2.0)],
    }
    direct = [
        StreamResult(0.1, 2.0, 100, 40.0),
        StreamResult(0.1, 2.0, 100, 70.0),
        StreamResult(0.4, 2.5, 100, 82.0),
    ]
    report = Report("serve", settings={})
    add_serve_rows(report, direct, waves)
    agg = rows_by(report, "16 streams", "aggregate", "1 stream")
    assert (agg.value, agg.baseline_value, agg.ratio, agg.target, agg.met) == (300, 50, 6.0, 6.0, True)
    api = rows_by(report, "1 stream", "API decode", "engine directly")
    assert (api.value, api.baseline_value, api.target) == (80, 82, 0.95) and api.met
    # the other rows of the group come from the same pair (the third), not from their own median pairs
    # (tokens/s 50/50 of the second, TTFT 100/100 of the first)
    tokens = rows_by(report, "1 stream", "API tokens/s", "engine directly")
    assert (tokens.value, tokens.baseline_value) == (60, 40.0)
    ttft = rows_by(report, "1 stream", "API TTFT", "engine directly")
    assert (ttft.value, ttft.baseline_value) == pytest.approx((200.0, 400.0))
    p99 = rows_by(report, "16 streams", "TTFT p99", "1 stream")
    assert (p99.value, p99.baseline_value) == pytest.approx((2000.0, 200.0))
    with pytest.raises(ValueError):  # a wave without its engine reply is not a pair
        add_serve_rows(Report("serve", settings={}), direct[:2], waves)


def test_without_api_decode_rates_the_pair_is_the_median_by_tokens_per_s_and_has_no_decode_row():
    # the replies' text came in too few reads for a decode rate: the tokens/s ratios 0.8, 1.0 and 1.5
    waves = {1: [wave(1, 40, 0.1, 0.1, None), wave(1, 50, 0.3, 0.3, None), wave(1, 60, 0.2, 0.2, None)]}
    direct = [
        StreamResult(0.1, 2.0, 100, 40.0),
        StreamResult(0.2, 2.0, 100, 70.0),
        StreamResult(0.4, 2.5, 100, 82.0),
    ]
    report = Report("serve", settings={})
    add_serve_rows(report, direct, waves)
    assert not [r for r in report.rows if r.metric == "API decode"]
    tokens = rows_by(report, "1 stream", "API tokens/s", "engine directly")
    ttft = rows_by(report, "1 stream", "API TTFT", "engine directly")
    assert (tokens.value, tokens.baseline_value) == (50, 50.0)
    assert (ttft.value, ttft.baseline_value) == pytest.approx((300.0, 200.0))


def test_summarize_wave_and_sse_parsing():
    results = [StreamResult(0.1 * i, 2.0, 10, 5.0) for i in range(1, 5)]  # TTFT 0.1 .. 0.4
    summary = summarize_wave(4, results, wall_s=2.0)
    assert (summary.tokens, summary.tokens_per_s) == (40, 20.0)
    assert summary.ttft_p50_s == pytest.approx(0.25) and summary.ttft_p99_s == pytest.approx(0.397)
    untimed = [
        StreamResult(0.1, 2.0, 10, None),
        StreamResult(0.1, 2.0, 10, 6.0),
        StreamResult(0.1, 2.0, 10, 4.0),
    ]
    assert summarize_wave(3, untimed, wall_s=2.0).decode_p50_tokens_per_s == 5.0  # of the timed replies
    assert summarize_wave(1, untimed[:1], wall_s=2.0).decode_p50_tokens_per_s is None
    lines = [": comment", 'data: {"a": 1}', "", 'data:{"b": 2}', "data: [DONE]", 'data: {"c": 3}']
    assert list(sse_payloads(lines)) == [{"a": 1}, {"b": 2}]


def answered(
    response: bytes | list[bytes], api_key: str | None = None, heads: list | None = None
) -> StreamResult:
    """`stream_one` against a server that reads the request's head (kept in `heads`) and sends `response`:
    bytes in pieces of 40 (events split across reads), or a list of writes a few ms apart."""
    writes = (
        response
        if isinstance(response, list)
        else [response[i : i + 40] for i in range(0, len(response), 40)]
    )

    async def main() -> StreamResult:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            if heads is not None:
                heads.append(head.decode())
            for data in writes:
                writer.write(data)
                await writer.drain()
                await asyncio.sleep(0.005 if isinstance(response, list) else 0.001)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            return await stream_one(url, {"stream": True}, api_key=api_key)

    return asyncio.run(main())


def chunk(event: dict | str) -> bytes:
    """One server-sent event as one HTTP chunk."""
    data = f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n"
    return f"{len(data):x}\r\n{data}\r\n".encode()


STREAM_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def streamed(texts: list[str]) -> list[bytes]:
    """A chat completion stream: a role chunk, one chunk per text, the usage, [DONE], the last chunk."""
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    events += [{"choices": [{"index": 0, "delta": {"content": t}}]} for t in texts]
    events += [{"choices": [], "usage": {"completion_tokens": len(texts)}}, "[DONE]"]
    return [chunk(e) for e in events] + [b"0\r\n\r\n"]


def test_a_wave_runs_with_a_uvloop_older_than_its_run(monkeypatch):
    """uvicorn[standard] takes a uvloop older than 0.18, which has no `run`: `vicuna bench serve` ended in an
    AttributeError where one of those was installed. asyncio's loop runs the wave then."""
    import types

    monkeypatch.setitem(sys.modules, "uvloop", types.ModuleType("uvloop"))  # no `run`, as before 0.18

    async def wave():
        await asyncio.sleep(0)
        return "done"

    assert serve.run(wave()) == "done"


def test_the_stream_client_times_the_content_and_takes_the_usage():
    got = answered(STREAM_HEAD + b"".join(streamed(["Hel", "lo"])))
    assert got.tokens == 2 and 0 < got.ttft_s <= got.total_s and got.content_reads == 2
    # each token's text in a write of its own: a decode rate, over the tokens after the first
    texts = ["a", "b", "c", "d", "e", "f"]
    role, *tokens, usage, done, end = streamed(texts)
    got = answered([STREAM_HEAD + role, *tokens, usage + done + end])
    assert got.content_reads == len(texts) >= MIN_CONTENT_READS and got.decode_tokens_per_s > 0


def test_no_decode_rate_from_text_that_came_in_too_few_reads():
    # the server's stream interval bundles a fast reply's tokens into one or two writes: the gap between
    # them says nothing about decoding (bench serve once printed 529,541 tok/s for a tiny model)
    role, first, *rest, usage, done, end = streamed(["a", "b", "c", "d", "e", "f"])
    got = answered([STREAM_HEAD + role + first, b"".join(rest) + usage + done + end])
    assert got.tokens == 6 and got.content_reads == 2 and got.decode_tokens_per_s is None
    got = answered([STREAM_HEAD + role + first + b"".join(rest) + usage + done + end])
    assert got.content_reads == 1 and got.decode_tokens_per_s is None


def test_the_stream_client_sends_the_api_key_and_explains_a_401():
    heads: list[str] = []
    answered(STREAM_HEAD + b"".join(streamed(["a"])), api_key="k-123", heads=heads)
    assert "Authorization: Bearer k-123\r\n" in heads[0]
    answered(STREAM_HEAD + b"".join(streamed(["a"])), heads=heads)
    assert "Authorization" not in heads[1]
    with pytest.raises(
        VicunaError, match=r"answered 401 \(no API key, or not one it takes\): pass its key with --api-key"
    ):
        answered(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\n{}")


def test_the_stream_client_reports_an_error_answer_and_a_cut_stream():
    with pytest.raises(VicunaError, match="answered 404: no such model"):
        answered(b"HTTP/1.1 404 Not Found\r\nContent-Length: 13\r\n\r\nno such model")
    with pytest.raises(VicunaError, match="closed before the answer ended"):
        answered(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\ndata: ")
    with pytest.raises(VicunaError, match="not a chat completion chunk"):
        answered(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\ndata: {oops}\n\n")
    with pytest.raises(VicunaError, match="without content or without usage"):
        answered(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\ndata: [DONE]\n\n")


def test_memory_rows_take_float32_bfloat16_and_the_copy_as_baselines():
    mib = 2**20
    load = {
        "float32": {"weight_bytes": 400 * mib, "peak_rss": 1000 * mib},
        "bfloat16": {"weight_bytes": 200 * mib, "peak_rss": 800 * mib},
        "bfloat16 + 8-bit": {"weight_bytes": 104 * mib, "peak_rss": 900 * mib},
    }
    weights = {
        "convert": {"bytes": 500 * 10**6, "seconds": 10.0, "peak_rss": 600 * mib, "idle_rss": 400 * mib},
        "convert copy": {"bytes": 500 * 10**6, "seconds": 1.0, "peak_rss": 450 * mib, "idle_rss": 400 * mib},
    }
    report = Report("memory", settings={})
    add_memory_rows(report, {"load": load, "weights": weights}, ["float32", "bfloat16"])
    bf16 = rows_by(report, "load bfloat16", "weight memory", "float32")
    assert bf16.ratio == 0.5 and bf16.target is None
    q = rows_by(report, "load bfloat16 + 8-bit", "weight memory", "bfloat16")
    assert q.ratio == pytest.approx(0.52) and q.met is True
    group = "convert (500 MB checkpoint)"
    rate = rows_by(report, group, "throughput", "file copy")
    assert (rate.value, rate.baseline_value, rate.ratio) == (50.0, 500.0, 0.1)
    assert rows_by(report, group, "peak RSS", "file copy").ratio == pytest.approx(600 / 450)
    held = rows_by(report, group, "peak RSS above idle", "checkpoint size")
    assert held.value == 200.0 and held.baseline_value == pytest.approx(500 * 10**6 / mib)
    assert (held.target, held.target_op, held.met) == (0.75, "<=", True)
    assert not [r for r in report.rows if r.group.startswith("delta")]  # not measured: no rows


# --- the benchmarks themselves, on tiny models ------------------------------------------------


def test_bench_latency_runs_on_a_tiny_model_with_8_bit(tiny_llama_dir, tmp_path, capsys):
    out, png = tmp_path / "lat.json", tmp_path / "lat.png"
    argv = [
        "bench",
        "latency",
        "--model-path",
        str(tiny_llama_dir),
        "--load-8bit",
        "--runs",
        "1",
        "--warmup",
        "0",
    ]
    argv += [
        "--new-tokens",
        "3",
        "--long-tokens",
        "100000",  # more than the tiny model's context: shortened to fit with the reply and the next turn
        "--json",
        str(out),
        "--plot",
        str(png),
        "--no-progress",
    ]
    assert cli(argv) == 0
    data = json.loads(out.read_text())
    assert tuple(data) == REPORT_KEYS and data["benchmark"] == "latency"
    assert data["machine"]["load_average_before"] >= 0  # what else ran when it was measured
    assert set(data["samples"]) == {"short", "long"}
    for kind, runners in data["samples"].items():
        assert set(runners) == {"engine", "engine next turn", "hf", "hf next turn", "unquantized"}
        for name, runs in runners.items():  # the next turn is timed to its first two tokens
            assert len(runs) == 1 and runs[0]["tokens"] == (2 if "next turn" in name else 3)
        eng, hf = runners["engine"][0], runners["hf"][0]
        group = f"{kind} prompt ({data['settings']['prompt_tokens'][kind]} tokens)"
        [row] = [
            r
            for r in data["rows"]
            if r["group"] == group and r["baseline"] == "HF generate" and r["metric"] == "decode"
        ]
        assert (
            row["value"] == eng["decode_tokens_per_s"] and row["baseline_value"] == hf["decode_tokens_per_s"]
        )
        assert math.isclose(row["ratio"], eng["decode_tokens_per_s"] / hf["decode_tokens_per_s"])
        [ceiling] = [r for r in data["rows"] if r["group"] == group and r["baseline"] == "bandwidth ceiling"]
        s = data["settings"]
        assert math.isclose(ceiling["baseline_value"], s["bandwidth_bytes_per_s"] / s["decode_bytes"])
    s = data["settings"]
    # the long prompt was shortened so that it, and the chat's next turn after its reply, fit the context
    assert s["prompt_tokens"]["short"] < s["prompt_tokens"]["long"] <= 256 - 3
    assert s["next_turn_tokens"]["long"] + 2 <= 256
    err = capsys.readouterr().err
    assert f"the long prompt is shortened to {s['prompt_tokens']['long']} tokens" in err
    assert "Loading weights" not in err and "it/s" not in err  # no progress bar, transformers' included
    assert [r for r in data["rows"] if r["metric"] == "weight memory"][0]["ratio"] < 1
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_hf_generate_and_the_ceiling_run_with_pytorch_s_threads_not_the_engine_s_team(
    tiny_llama_dir, monkeypatch
):
    """The engine's kernel sizes its OpenMP team on the calling thread, PyTorch's too: after a reply it may
    have left one thread of two, which HF generate and the bandwidth measurement, run next in the same
    thread, would have inherited."""
    from vicuna.bench import latency
    from vicuna.config import ModelSettings

    time_engine, load_hf_model = latency.time_engine, latency.load_hf_model
    seen: list[int] = []

    engine_seen: list[int] = []

    def engine_leaving_one_thread(*args, **kwargs):
        engine_seen.append(torch.get_num_threads())
        timing = time_engine(*args, **kwargs)
        torch.set_num_threads(1)  # as kernel.Team does while it tries one thread fewer
        return timing

    def counting_hf_model(*args):
        model = load_hf_model(*args)
        generate = model.generate

        def counted(*a, **kw):
            seen.append(torch.get_num_threads())
            return generate(*a, **kw)

        model.generate = counted
        return model

    def counting_bandwidth(device):
        seen.append(torch.get_num_threads())
        return 10**9

    monkeypatch.setattr(latency, "time_engine", engine_leaving_one_thread)
    monkeypatch.setattr(latency, "load_hf_model", counting_hf_model)
    monkeypatch.setattr(latency, "measure_bandwidth", counting_bandwidth)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        report = latency.bench_latency(
            ModelSettings(model_path=str(tiny_llama_dir)),
            runs=2,
            warmup=0,
            new_tokens=3,
            prompts=["short"],
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    assert seen == [2, 2, 2, 2, 2]  # each run's reply and next turn, then the bandwidth ceiling's reads
    assert engine_seen[1:] == [1, 1, 1]  # the engine's own choice is given back to it after HF's runs
    assert report.settings["threads"] == 2


def test_progress_goes_to_stderr_as_lines_where_no_bar_can_be_drawn(tiny_llama_dir, tmp_path, capsys):
    """`vicuna bench latency > table.txt`: the table in the file, each step on stderr (here no terminal)."""
    argv = ["bench", "latency", "--model-path", str(tiny_llama_dir), "--prompts", "short", "--runs", "1"]
    assert cli([*argv, "--warmup", "1", "--new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert "short prompt, engine, warm-up 1/1 ..." in err and "short prompt, hf next turn, run 1/1 ..." in err
    assert "memory bandwidth ..." in err
    assert "warm-up" not in out and "run 1/1" not in out and "vicuna bench latency" in out  # the table alone
    assert cli([*argv, "--warmup", "0", "--new-tokens", "3", "--no-progress"]) == 0
    assert " ..." not in capsys.readouterr().err


def test_progress_on_a_dumb_terminal_is_lines_too(monkeypatch, capsys):
    """On a dumb terminal (TERM=dumb) rich redraws no bar, and a transient one leaves nothing: minutes of
    benchmark passed without a word."""
    from vicuna.bench.report import progress_bar

    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: standard error is a terminal
    monkeypatch.setenv("TERM", "dumb")
    with progress_bar(True) as bar:
        task = bar.add_task("starting", total=2)
        bar.update(task, description="short prompt, engine, run 1/1")
        bar.update(task, advance=1)
    err = capsys.readouterr().err
    assert "short prompt, engine, run 1/1 ...\n" in err and "\r" not in err


def test_a_reply_too_long_for_the_context_is_refused_before_the_baselines_load(
    tiny_llama_dir, monkeypatch, capsys
):
    from vicuna.bench import latency

    loaded = []
    monkeypatch.setattr(latency, "load_hf_model", lambda *a: loaded.append(a))
    argv = ["bench", "latency", "--model-path", str(tiny_llama_dir), "--prompts", "short", "--new-tokens"]
    assert cli([*argv, "250", "--no-progress"]) == 2  # the tiny model's context window is 256 tokens
    err = capsys.readouterr().err
    assert (
        "new tokens were asked for" in err and "context window is 256 tokens: use fewer --new-tokens" in err
    )
    assert loaded == []


def test_a_baseline_that_would_not_fit_beside_the_engine_is_refused_before_it_loads(
    tiny_llama_dir, monkeypatch, capsys
):
    import transformers

    from vicuna.engine import memory

    loaded = []
    from_pretrained = transformers.AutoModelForCausalLM.from_pretrained

    def counted(*args, **kwargs):
        loaded.append(args)
        return from_pretrained(*args, **kwargs)

    monkeypatch.setattr(memory, "free_bytes", lambda device: 2**10)  # 1 KiB left after the engine's load
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", counted)
    argv = ["bench", "latency", "--model-path", str(tiny_llama_dir), "--prompts", "short", "--new-tokens"]
    assert cli([*argv, "3", "--runs", "1", "--warmup", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "HF generate, loads the model a second time beside the engine" in err and "1 KiB left" in err
    assert len(loaded) == 1  # the engine's model only


def test_bench_serve_refuses_a_reply_too_long_for_the_context_before_starting_a_server(
    tiny_llama_dir, monkeypatch, capsys
):
    started = []
    monkeypatch.setattr(serve, "started_server", lambda *a: started.append(a))
    argv = ["bench", "serve", "--model-path", str(tiny_llama_dir), "--new-tokens", "250", "--no-progress"]
    assert cli(argv) == 2  # the tiny model's context window is 256 tokens
    assert "context window is 256 tokens: use fewer --new-tokens" in capsys.readouterr().err
    assert started == []


def test_bench_refuses_bad_flags(capsys):
    with pytest.raises(SystemExit):
        cli(["bench", "latency", "--prompts", "medium"])
    assert "not one of short, long" in capsys.readouterr().err
    assert cli(["bench", "latency", "--new-tokens", "1"]) == 2
    assert "--new-tokens" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["latency", "--runs", "0"], "error: --runs must be at least 1, not 0\n"),
        (["latency", "--warmup", "-1"], "error: --warmup must be at least 0, not -1\n"),
        (["latency", "--long-tokens", "5"], "error: --long-tokens must be at least 100, not 5\n"),
        (["serve", "--runs", "0"], "error: --runs must be at least 1, not 0\n"),
        (["serve", "--streams", "1,0"], "error: --streams must be at least 1 each, not 0\n"),
        (
            ["serve", "--startup-timeout", "0"],
            "error: --startup-timeout must be more than 0 seconds, not 0\n",
        ),
        (
            ["memory", "--weights-mb", "-5"],
            "error: --weights-mb must be at least 1, not -5 (--skip-weights leaves",
        ),
        (
            ["memory", "--weights-mb", "0"],
            "error: --weights-mb must be at least 1, not 0 (--skip-weights leaves",
        ),
        (
            ["memory", "--dtype", "float16"],
            "--dtype and --load-8bit do not apply (choose the dtypes with --dtypes)",
        ),
        (["memory", "--load-8bit"], "--dtype and --load-8bit do not apply"),
        (["serve", "--plot", "chart.txt"], "error: chart.txt: the chart is written as PNG; name it *.png\n"),
    ],
)
def test_bench_refuses_a_bad_flag_by_its_name_before_loading_anything(argv, message, capsys):
    assert cli(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "bench, said",
    [
        ("latency", ["HF generate", "FastChat", "median of --runs", "minutes", "--prompts short"]),
        ("serve", ["--streams", "one stream", "engine called directly", "minute", "--new-tokens 32"]),
        ("memory", ["peak RSS", "--dtypes", "plain copy", "minute", "--skip-weights"]),
    ],
)
def test_each_benchmark_s_help_says_what_it_measures_against_what_and_how_long_it_takes(bench, said, capsys):
    with pytest.raises(SystemExit):
        cli(["bench", bench, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # unwrapped
    described = out[: out.index("options:")]  # before the flags: the command's own description
    assert [s for s in said if s not in described] == []


def test_bench_memory_s_help_does_not_offer_the_flags_it_refuses(capsys):
    def help_of(bench: str) -> str:
        with pytest.raises(SystemExit):
            cli(["bench", bench, "--help"])
        return capsys.readouterr().out

    memory, latency = help_of("memory"), help_of("latency")
    assert "--dtype " not in memory and "--load-8bit" not in memory and "--dtypes DTYPES" in memory
    assert "--dtype " in latency and "--load-8bit" in latency


@pytest.mark.parametrize("flag, name", [("--json", "x.json"), ("--plot", "x.png")])
def test_bench_writes_no_output_into_a_missing_folder(flag, name, tmp_path, capsys):
    missing = tmp_path / "no" / "such"
    assert cli(["bench", "memory", "--skip-weights", flag, str(missing / name)]) == 2
    assert f"the folder {missing} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("flag, name", [("--json", "x.json"), ("--plot", "x.png")])
def test_bench_refuses_an_output_that_is_a_folder_before_loading_anything(flag, name, tmp_path, capsys):
    folder = tmp_path / name
    folder.mkdir()
    assert cli(["bench", "memory", "--skip-weights", flag, str(folder)]) == 2
    assert f"{folder} is a folder; name the file to write in it" in capsys.readouterr().err


def test_bench_memory_without_room_for_its_checkpoints_is_refused_before_loading_anything(
    tmp_path, monkeypatch, capsys
):
    """Its generated checkpoint (512 MB by default) is kept in $TMPDIR six times over: a container's small
    /tmp filled only after minutes of loading the model, with a traceback from a child process."""
    import shutil
    import tempfile

    from vicuna.bench import memory
    from vicuna.weights.disk import size as disk_size

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1_000_000))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(memory, "run_child", lambda job: pytest.fail("a measurement ran"))
    assert cli(["bench", "memory", "--weights-mb", "100"]) == 2
    shape = memory.meta_params(100)[0]
    err = capsys.readouterr().err
    assert (
        f"error: bench memory's generated checkpoints (--weights-mb 100) needs "
        f"{disk_size(6 * memory.meta_bytes(shape))} of free disk in {tmp_path}, but only 1.0 MB is available"
    ) in err
    assert err.endswith(
        "or choose another folder (TMPDIR), or pass a smaller --weights-mb, or --skip-weights\n"
    )


@pytest.mark.skipif(
    not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no one can create files"
)
def test_bench_refuses_an_output_in_a_folder_it_cannot_write_before_loading_anything(capsys):
    assert cli(["bench", "memory", "--skip-weights", "--json", "/proc/x.json"]) == 2
    assert "error: /proc/x.json: cannot write into /proc (" in capsys.readouterr().err


def test_bench_refuses_plot_without_matplotlib_before_loading_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert cli(["bench", "memory", "--skip-weights", "--plot", str(tmp_path / "x.png")]) == 2
    assert "error: --plot: matplotlib cannot draw the chart (" in capsys.readouterr().err


def test_bench_refuses_plot_where_mplbackend_names_no_backend_before_loading_anything(tmp_path):
    # matplotlib reads $MPLBACKEND when it is first imported: in a process of its own
    argv = ["bench", "memory", "--skip-weights", "--model-path", str(tmp_path / "none"), "--plot"]
    done = subprocess.run(
        [sys.executable, "-m", "vicuna", *argv, str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        env={**os.environ, "MPLBACKEND": "nosuch"},
    )
    assert done.returncode == 2
    assert "error: --plot: matplotlib cannot draw the chart (" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "x.png").exists()


def test_the_api_key_defaults_to_the_first_of_the_server_s_keys(monkeypatch):
    def parsed(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return parser.parse_args(["serve", *argv])

    monkeypatch.setenv("VICUNA_API_KEYS", " k1 ,k2")  # as `vicuna serve --api-keys` reads them
    assert parsed().api_key == "k1" and parsed("--api-key", "k2").api_key == "k2"
    monkeypatch.delenv("VICUNA_API_KEYS")
    assert parsed().api_key is None


@pytest.fixture
def fake_server():
    """Start an HTTP server whose /v1/models lists a model (and its aliases, given a list), behind a key if
    given; returns its URL. It answers no POST."""
    servers = []

    def start(model: str | list[str], key: str | None = None) -> str:
        names = [model] if isinstance(model, str) else model

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if key and self.headers.get("Authorization") != f"Bearer {key}":
                    status, body = 401, {"error": {"message": "incorrect API key provided"}}
                elif self.path == "/v1/models":
                    status, body = (
                        200,
                        {"object": "list", "data": [{"id": n, "object": "model"} for n in names]},
                    )
                else:
                    status, body = 404, {"error": {"message": "not found"}}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_bench_serve_refuses_a_server_of_another_model(tiny_llama_dir, fake_server, capsys):
    url = fake_server("SmolLM2-135M-Instruct")
    argv = ["bench", "serve", "--url", f"{url}/v1", "--model-path", str(tiny_llama_dir), "--streams", "1"]
    assert cli([*argv, "--new-tokens", "8", "--runs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{url} serves 'SmolLM2-135M-Instruct', but the baseline" in err
    assert f"loads {tiny_llama_dir.name!r} (--model-path {tiny_llama_dir})" in err


def test_bench_serve_takes_a_server_that_lists_the_model_s_name_among_its_aliases(
    tiny_llama_dir, fake_server, capsys
):
    """`vicuna serve --model-name vicuna-7b,NAME`: the same model under another name, NAME as an alias."""
    url = fake_server(["vicuna-7b", tiny_llama_dir.name])
    argv = ["bench", "serve", "--url", url, "--model-path", str(tiny_llama_dir), "--streams", "1"]
    assert cli([*argv, "--new-tokens", "8", "--runs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "but the baseline" not in err
    assert "/v1/chat/completions: answered 501" in err  # it went on to send requests (this server takes none)


def test_a_server_of_the_model_under_another_name_is_told_how_to_list_it(tiny_llama_dir, fake_server, capsys):
    url = fake_server(["vicuna-7b", "gpt-3.5-turbo"])
    argv = ["bench", "serve", "--url", url, "--model-path", str(tiny_llama_dir), "--streams", "1"]
    assert cli([*argv, "--new-tokens", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{url} serves 'vicuna-7b' and 'gpt-3.5-turbo', but the baseline" in err
    assert f"--model-name NAME,{tiny_llama_dir.name}" in err


def test_the_served_model_is_asked_for_with_the_key_and_a_401_says_so(fake_server):
    url = fake_server("vicuna-7b", key="k1")
    assert model_names(url, "k1") == ["vicuna-7b"]
    with pytest.raises(
        VicunaError, match="answered 401: the server wants an API key; pass its key with --api-key"
    ):
        model_names(url)
    with pytest.raises(VicunaError, match="answered 401: the server refused the API key; pass"):
        model_names(url, "k2")


def test_an_address_that_is_not_an_openai_api_is_said_in_one_line(fake_server):
    url = fake_server("vicuna-7b") + "/elsewhere"  # its /v1/models is not found
    with pytest.raises(VicunaError) as refused:
        model_names(url)
    message = str(refused.value)
    assert message.startswith(f"{url}/v1/models answered 404 without a list of models: is it the address")
    assert "\n" not in message


@pytest.mark.parametrize("body", [{"data": "x"}, {"data": [{}]}, {"data": [{"id": 5}]}, [1, 2]])
def test_a_models_list_of_another_shape_is_said_in_one_line(monkeypatch, body):
    import httpx

    monkeypatch.setattr(httpx, "get", lambda *args, **kwargs: httpx.Response(200, json=body))
    with pytest.raises(VicunaError, match=r"answered 200 without a list of models: is it the address"):
        model_names("http://127.0.0.1:9")


def test_a_server_that_does_not_answer_in_time_is_reported_with_what_it_printed(monkeypatch):
    from vicuna.config import ModelSettings

    def command(code: str) -> None:
        monkeypatch.setattr(serve, "serve_command", lambda settings, port: [sys.executable, "-c", code])

    command("import time; time.sleep(60)")
    silent = r"within 0\.5s \(--startup-timeout\); it printed nothing yet$"
    with pytest.raises(VicunaError, match=silent), serve.started_server(ModelSettings(), timeout=0.5):
        pass
    command("print('loading the model', flush=True); import time; time.sleep(60)")
    talking = r"within 1s \(--startup-timeout\); its output:\nloading the model$"
    with pytest.raises(VicunaError, match=talking), serve.started_server(ModelSettings(), timeout=1):
        pass


def test_a_measurement_refused_in_its_child_is_said_in_a_line_not_a_traceback(tmp_path):
    """`bench memory --device cuda` without a GPU, or a --model-path with no model: the child's refusal."""
    job = {"kind": "load", "settings": {"model_path": str(tmp_path / "nothing")}, "new_tokens": 2}
    with pytest.raises(VicunaError) as refused:
        run_child(job)
    said = str(refused.value)
    assert said.startswith("the load measurement: ") and str(tmp_path / "nothing") in said
    assert "Traceback" not in said and "\n" not in said


def test_convert_delta_and_copy_jobs_on_a_generated_checkpoint(tmp_path):
    meta = write_meta_checkpoint(tmp_path / "meta", weights_mb=1)
    pth_bytes = (meta / "consolidated.00.pth").stat().st_size
    converted = run_job({"kind": "convert", "meta_dir": str(meta), "out_dir": str(tmp_path / "hf")})
    # the same float16 tensors, without the .pth container's overhead
    assert 0.9 * pth_bytes < converted["bytes"] <= pth_bytes and converted["seconds"] > 0
    tensors = meta_bytes(meta_params(1)[0])
    assert tensors <= converted["bytes"] < tensors * 1.01  # the size labelled is the size written
    delta = write_delta(tmp_path / "hf", tmp_path / "delta")
    merged = run_job(
        {
            "kind": "delta",
            "base": str(tmp_path / "hf"),
            "delta": str(delta),
            "target": str(tmp_path / "merged"),
        }
    )
    assert merged["bytes"] == converted["bytes"]
    assert (tmp_path / "merged" / "config.json").is_file()
    copied = run_job(
        {"kind": "copy", "files": [str(meta / "consolidated.00.pth")], "out_dir": str(tmp_path / "c")}
    )
    assert copied["bytes"] == pth_bytes and copied["peak_rss"] >= copied["idle_rss"] > 0


def test_the_generated_checkpoint_has_the_size_asked_for_and_llama_s_proportions():
    for mb in (1, 40, 128, 512):
        params = meta_params(mb)[0]
        assert 0.85 * mb * 10**6 < meta_bytes(params) < 1.15 * mb * 10**6
    # LLaMA-7B's largest tensor (its 32000 x 4096 embedding table) is 1.9% of it: a job that holds a few
    # tensors at once must not look as if it held the model (a 32000-row table was 42% of 157 MB)
    assert largest_tensor_bytes(meta_params(512)[0]) < 0.025 * meta_bytes(meta_params(512)[0])
    assert largest_tensor_bytes(meta_params(128)[0]) < 0.06 * meta_bytes(meta_params(128)[0])


def test_convert_and_delta_apply_hold_less_than_three_quarters_of_the_checkpoint(tmp_path):
    """The bench's own measurement (peak RSS above the child's RSS after its imports) on its smallest
    checkpoint of LLaMA's width class, against README's claim and the convert and delta tests' bound."""
    meta = write_meta_checkpoint(tmp_path / "meta", weights_mb=100)
    converted = run_child({"kind": "convert", "meta_dir": str(meta), "out_dir": str(tmp_path / "hf")})
    delta = write_delta(tmp_path / "hf", tmp_path / "delta")
    job = {
        "kind": "delta",
        "base": str(tmp_path / "hf"),
        "delta": str(delta),
        "target": str(tmp_path / "out"),
    }
    merged = run_child(job)
    for got in (converted, merged):
        assert got["bytes"] > 100 * 10**6
        assert got["peak_rss"] - got["idle_rss"] < 0.75 * got["bytes"], got


def test_a_load_measurement_runs_in_its_own_process_with_its_own_peak_rss(tiny_llama_dir):
    from dataclasses import asdict

    import torch
    from transformers import AutoModelForCausalLM

    from vicuna.config import ModelSettings

    # A forked child inherits getrusage's high-water mark from its parent: the figure must be the child's own.
    ballast = torch.ones(512 * 2**20 // 4)  # 512 MiB resident here while the child runs
    settings = ModelSettings(model_path=str(tiny_llama_dir), dtype="bfloat16")
    got = run_child({"kind": "load", "settings": asdict(settings), "new_tokens": 2})
    assert ballast[-1] == 1
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama_dir).parameters())
    assert got["weight_bytes"] == 2 * params  # every parameter in bfloat16
    assert got["peak_rss"] >= got["loaded_rss"] > got["idle_rss"] > 0
    assert got["peak_rss"] - got["idle_rss"] < 256 * 2**20  # a tiny model, not the parent's 512 MiB


def test_bench_serve_runs_against_vicuna_serve(tiny_llama_dir, tmp_path):
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--model-path", str(tiny_llama_dir), "--streams", "1,3", "--new-tokens", "8"]
    argv += ["--startup-timeout", "120", "--json", str(out), "--no-progress"]
    assert cli(argv) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "serve" and data["settings"]["streams"] == [1, 3]
    [wave3] = data["samples"]["waves"]["3"]
    assert wave3["streams"] == 3 and wave3["tokens"] == 3 * 8  # min_tokens/ignore_eos held each reply to 8
    [agg] = [r for r in data["rows"] if r["group"] == "3 streams" and r["metric"] == "aggregate"]
    ones, direct = data["samples"]["waves"]["1"], data["samples"]["engine_direct"]
    assert len(ones) == len(direct) == API_PAIRS  # engine directly and one stream in turn, in one run
    assert agg["value"] == wave3["tokens_per_s"]
    assert agg["baseline_value"] == pytest.approx(median([w["tokens_per_s"] for w in ones]))


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM cannot be sent to a process on Windows")
def test_sigterm_stops_the_server_bench_serve_started(tiny_llama_dir):
    import psutil

    argv = ["bench", "serve", "--model-path", str(tiny_llama_dir), "--new-tokens", "4", "--runs", "1000"]
    bench = subprocess.Popen(
        [sys.executable, "-m", "vicuna", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    server = None
    try:
        while server is None and bench.poll() is None:  # until its `vicuna serve` listens
            for child in psutil.Process(bench.pid).children():
                with contextlib.suppress(psutil.Error):  # a short-lived child may be gone already
                    sockets = getattr(child, "net_connections", None) or child.connections  # psutil < 6
                    if any(c.status == psutil.CONN_LISTEN for c in sockets()):
                        server = child
        assert server is not None, "bench serve ended before it started a server"
        bench.terminate()  # SIGTERM, as `kill` and `timeout` send
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        server.wait(timeout=5)  # gone with it, not left running on its own
    finally:
        bench.kill()
        if server is not None:  # where the test failed: not left running after it
            with contextlib.suppress(psutil.Error):
                server.kill()


def test_bandwidth_is_measured_with_and_without_our_kernel(monkeypatch):
    from vicuna.bench.latency import measure_bandwidth
    from vicuna.engine import kernel

    device = torch.device("cpu")
    with_kernel = measure_bandwidth(device, nbytes=16 * 2**20, repeats=1)
    monkeypatch.setattr(kernel, "runs_on", lambda *_: False)
    assert with_kernel > 0 and measure_bandwidth(device, nbytes=16 * 2**20, repeats=1) > 0


def test_bandwidth_on_apples_gpu_waits_for_each_operation(monkeypatch):
    """On Apple's GPU (mps) operations are queued, as on CUDA, but only CUDA was synchronized: the sum and
    the copy were timed as they were queued, and the bandwidth, and with it the decode ceiling that
    `bench latency` compares tokens/s with, came out far too high. Stood in for by the CPU here."""
    from vicuna.bench.latency import measure_bandwidth

    ones = torch.ones
    monkeypatch.setattr(torch, "ones", lambda *size, device=None, **kw: ones(*size, **kw))  # on the CPU
    waits = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waits.append(1))
    assert measure_bandwidth(torch.device("mps"), nbytes=2**20, repeats=2) > 0
    assert len(waits) == 2 * (1 + 2)  # the sum and the copy: after the first touch and after each timed run


def test_a_busy_machine_is_said_before_the_benchmark(monkeypatch, capsys):
    import os

    from vicuna.bench import busy_cores

    monkeypatch.setattr(os, "getloadavg", lambda: (1.73, 1.0, 1.0))
    assert busy_cores() == 1.73
    assert "1-minute load average 1.73" in capsys.readouterr().err
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert busy_cores() == 0.1 and capsys.readouterr().err == ""
