"""`vicuna bench latency|serve|memory`: measure speed and memory, each figure beside a baseline measured in
the same run, printed as a table and optionally saved as JSON (`--json`) and a chart (`--plot`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vicuna.config import add_model_arguments, model_settings_from_args
from vicuna.errors import VicunaError
from vicuna.weights.manifest import redraws, transformers_bar

DEFAULT_STREAMS = "1,4,16,64"
MEMORY_DTYPES = "float32,bfloat16,float16"
# How long the defaults take with the built-in model on our 2-core CPU VMs (docs/benchmarks.md), and how to
# take less: --help is where a user asks before starting minutes of work.
LATENCY_TIME = (
    "With the defaults the built-in model takes 1-3 minutes on 2 CPU cores, most of it in HF generate; "
    "--prompts short --runs 1 --warmup 0 --new-tokens 32 takes seconds."
)
SERVE_TIME = (
    "With the defaults the built-in model takes about a minute on 2 CPU cores, starting the server "
    "included; --streams 1,4 --new-tokens 32 under half a minute."
)
MEMORY_TIME = (
    "With the defaults the built-in model takes about a minute on 2 CPU cores; --skip-weights or a "
    "smaller --weights-mb less."
)


def _csv(kind: type, allowed: tuple[str, ...] = ()):
    """An argparse type for comma-separated lists, checked item by item."""

    def parse(text: str) -> list:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        bad = [x for x in items if allowed and x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]!r} is not one of {', '.join(allowed)}")
        try:
            return [kind(x) for x in items]
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def _first_api_key() -> str | None:
    keys = [k.strip() for k in os.environ.get("VICUNA_API_KEYS", "").split(",") if k.strip()]
    return keys[0] if keys else None


def _outputs(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("output")
    g.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON (docs/benchmarks.md)")
    g.add_argument("--plot", type=Path, metavar="OUT.png", help="draw the ratios to the baselines")
    g.add_argument("--no-progress", action="store_true", help="do not draw progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vicuna.bench.latency import MIN_LONG_TOKENS, PROMPT_KINDS

    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)

    lat = sub.add_parser(
        "latency",
        help="TTFT, inter-token latency, decode tok/s and reply time vs HF generate",
        description="Time the engine's replies beside Hugging Face model.generate (the path FastChat's CLI "
        "and worker take) on the same checkpoint, dtype, 8-bit or not, prompts and reply length, both "
        "loaded in this process: time to first token, the chat's next turn, decode tok/s (also against "
        "the memory-bandwidth ceiling), inter-token latency and reply time. Runs of the two alternate; "
        "each figure is the median of --runs after --warmup. " + LATENCY_TIME,
    )
    add_model_arguments(lat)
    lat.add_argument("--runs", type=int, default=3, help="measured runs per prompt; the median is shown")
    lat.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (compilation, caches)")
    lat.add_argument("--new-tokens", type=int, default=128, help="tokens in each reply")
    lat.add_argument(
        "--prompts",
        type=_csv(str, PROMPT_KINDS),
        default=list(PROMPT_KINDS),
        help="which prompts: short, long or both (default: short,long)",
    )
    lat.add_argument(
        "--long-tokens",
        type=int,
        default=500,
        help=f"length of the long prompt in tokens, at least {MIN_LONG_TOKENS} (shortened to fit the context "
        "window with the reply and the next turn)",
    )
    _outputs(lat)

    srv = sub.add_parser(
        "serve",
        help="aggregate tok/s and TTFT p50/p99 of `vicuna serve` under load",
        description="Start `vicuna serve` with these model flags (or use --url) and send waves of --streams "
        "concurrent streaming chat requests: each wave's aggregate tok/s and TTFT p50/p99 against one "
        "stream's, and one stream's decode, tok/s and TTFT against the engine called directly in this "
        "process. " + SERVE_TIME,
    )
    add_model_arguments(srv)
    srv.add_argument(
        "--url",
        help="an already running server of the --model-path model (default: start `vicuna serve` here)",
    )
    srv.add_argument(
        "--api-key",
        default=_first_api_key(),
        help="sent as 'Authorization: Bearer KEY' (default: the first of $VICUNA_API_KEYS, the keys "
        "`vicuna serve` requires by default)",
    )
    srv.add_argument(
        "--streams",
        type=_csv(int),
        default=[int(x) for x in DEFAULT_STREAMS.split(",")],
        help=f"concurrent streams to try (default: {DEFAULT_STREAMS})",
    )
    srv.add_argument("--new-tokens", type=int, default=128, help="tokens in each reply")
    srv.add_argument(
        "--runs",
        type=int,
        default=1,
        help="rounds: each times the engine directly and one stream in turn 3 times, then every other level; medians are shown",
    )
    srv.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for the server")
    _outputs(srv)

    mem = sub.add_parser(
        "memory",
        help="weight memory and peak RSS per dtype; convert and delta apply",
        description="Each in a fresh process: load the model in every dtype of --dtypes and in 8-bit "
        "(weight memory and peak RSS, against the first dtype, and bfloat16 for 8-bit), then convert and "
        "delta-apply a generated checkpoint of --weights-mb MB (MB/s and peak RSS against a plain copy of "
        "the same bytes). " + MEMORY_TIME,
    )
    add_model_arguments(mem)
    # it loads every dtype of --dtypes and 8-bit: --dtype and --load-8bit are refused (check_flags), not offered
    for action in mem._actions:
        if action.dest in ("dtype", "load_8bit"):
            action.help = argparse.SUPPRESS
    mem.add_argument(
        "--dtypes",
        type=_csv(str, ("float32", "bfloat16", "float16")),
        default=MEMORY_DTYPES.split(","),
        help=f"dtypes to load (default: {MEMORY_DTYPES}); 8-bit is measured on bfloat16",
    )
    mem.add_argument("--new-tokens", type=int, default=32, help="tokens generated after loading")
    mem.add_argument(
        "--weights-mb",
        type=float,
        default=512,
        help="size of the generated checkpoint for convert and delta apply (MB, float16; at least 1, and "
        "--skip-weights to leave them out)",
    )
    mem.add_argument("--skip-weights", action="store_true", help="skip the convert and delta apply part")
    _outputs(mem)


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that make no sense before anything is loaded, naming the flag."""
    from vicuna.bench.latency import MIN_LONG_TOKENS
    from vicuna.bench.report import check_output_path, check_plotting

    def at_least(flag: str, value: float, least: float) -> None:
        if value < least:
            raise VicunaError(f"{flag} must be at least {least:g}, not {value:g}")

    at_least("--new-tokens", args.new_tokens, 2)
    if args.bench in ("latency", "serve"):
        at_least("--runs", args.runs, 1)
    if args.bench == "latency":
        at_least("--warmup", args.warmup, 0)
        at_least("--long-tokens", args.long_tokens, MIN_LONG_TOKENS)
    elif args.bench == "serve":
        bad = [n for n in args.streams if n < 1]
        if bad:
            raise VicunaError(f"--streams must be at least 1 each, not {bad[0]}")
        if not args.startup_timeout > 0:
            raise VicunaError(f"--startup-timeout must be more than 0 seconds, not {args.startup_timeout:g}")
    elif args.bench == "memory":
        if args.dtype != "auto" or args.load_8bit:
            raise VicunaError(
                "bench memory loads the model in every dtype of --dtypes and in 8-bit on bfloat16: "
                "--dtype and --load-8bit do not apply (choose the dtypes with --dtypes)"
            )
        if not args.skip_weights and args.weights_mb < 1:
            raise VicunaError(
                f"--weights-mb must be at least 1, not {args.weights_mb:g} (--skip-weights leaves convert and "
                "delta apply out)"
            )
    if args.json is not None:
        check_output_path(args.json)
    if args.plot is not None:
        check_output_path(args.plot, suffix=".png")
        check_plotting()


def main(args: argparse.Namespace) -> int:
    from vicuna.bench.report import emit

    check_flags(args)
    settings = model_settings_from_args(args)
    progress = not args.no_progress
    load = busy_cores()
    # transformers' bars (loading weights) as ours; on SIGTERM (vicuna.cli) a server or a measuring child
    # started here goes with it
    with transformers_bar(progress and redraws(sys.stderr)):
        if args.bench == "latency":
            from vicuna.bench.latency import bench_latency

            report = bench_latency(
                settings,
                runs=args.runs,
                warmup=args.warmup,
                new_tokens=args.new_tokens,
                prompts=args.prompts,
                long_tokens=args.long_tokens,
                progress=progress,
            )
        elif args.bench == "serve":
            from vicuna.bench.serve import bench_serve

            report = bench_serve(
                settings,
                url=args.url,
                api_key=args.api_key,
                streams=args.streams,
                new_tokens=args.new_tokens,
                runs=args.runs,
                startup_timeout=args.startup_timeout,
                progress=progress,
            )
        else:
            from vicuna.bench.memory import bench_memory

            report = bench_memory(
                settings,
                dtypes=args.dtypes,
                new_tokens=args.new_tokens,
                weights_mb=None if args.skip_weights else args.weights_mb,
                progress=progress,
            )
    report.machine["load_average_before"] = load
    emit(report, json_path=args.json, plot_path=args.plot)
    return 0


def busy_cores() -> float | None:
    """The 1-minute load average before the benchmark starts (None where the system has none), with a
    notice when other programs keep cores busy: the figures then say as much about them as about vicuna
    (with one of 2 cores busy, decoding ran 2-3x slower)."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # Windows
        return None
    if load >= 0.5:
        print(
            f"notice: other programs are using the CPU (1-minute load average {load:.2f} on {os.cpu_count()} "
            "cores): the figures will be lower and noisier than on an idle machine",
            file=sys.stderr,
        )
    return round(load, 2)
