"""`vicuna train ...` fine-tunes a model; `vicuna train inspect ...` shows which tokens carry the loss."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from vicuna.config import DTYPES, utf8_text
from vicuna.conversation import template_name
from vicuna.errors import Terminated, VicunaError
from vicuna.train.data import IGNORE
from vicuna.train.trainer import FUSED_LORA_TARGET, LORA_TARGET, SCHEDULERS


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and data")
    g.add_argument(
        "--model-path",
        help="HF-format folder, .gguf file or Hub repo OWNER/NAME (default: the built-in model)",
    )
    g.add_argument(
        "--data",
        type=Path,
        help="ShareGPT JSON list or OpenAI-style JSONL ({'messages': [...]}); Alpaca's "
        "{'instruction', 'input', 'output'} records too; required",
    )
    g.add_argument(
        "--conv-template",
        type=template_name,
        help="prompt template (default: the model's own, see `vicuna template list`)",
    )
    g.add_argument("--conv-system-msg", type=utf8_text, help="system prompt for conversations that have none")
    g.add_argument(
        "--max-length", type=int, help="tokens per example (default: 2048, or the model's context if shorter)"
    )
    g.add_argument(
        "--split-long",
        action="store_true",
        help="split longer conversations at turn boundaries (default: truncate)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "For example `vicuna train --data chats.json --output-dir my-model --lora`; `vicuna train inspect "
        "--data chats.json` first shows which tokens of each example carry the loss."
    )
    # in brackets: the usage showed `inspect ...` as if `vicuna train` needed it to train
    sub = parser.add_subparsers(dest="action", metavar="[inspect]")
    inspect = sub.add_parser(
        "inspect", help="show which tokens carry loss, and count bad and truncated examples"
    )
    _add_data_arguments(inspect)
    inspect.add_argument("-n", type=int, default=3, help="examples to show (default: 3)")
    inspect.add_argument(
        "--json", type=Path, metavar="OUT", help="write {'input_ids', 'labels'} per example (JSONL) here"
    )

    _add_data_arguments(parser)
    parser.add_argument(
        "--output-dir", type=Path, help="where checkpoints and the final model go; required to train"
    )
    parser.add_argument(
        "--allow-bad", type=int, default=0, metavar="N", help="train even if up to N examples are bad"
    )
    parser.add_argument("--no-progress", action="store_true", help="do not draw progress bars")
    g = parser.add_argument_group("schedule")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=3.0, help="passes over the data (default: 3)")
    length.add_argument(
        "--max-steps", type=int, default=-1, help="optimizer steps (default: --epochs decides)"
    )
    g.add_argument(
        "--lr", type=float, help="peak learning rate (default: 2e-5; with --lora or --qlora: 2e-4)"
    )
    g.add_argument("--batch-size", type=int, default=1, help="examples per device per step (default: 1)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    g.add_argument(
        "--warmup-ratio", type=float, default=0.03, help="share of steps to warm up (default: 0.03)"
    )
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's weight decay")
    g.add_argument(
        "--lr-scheduler", choices=SCHEDULERS, default="cosine", help="the learning rate after warmup"
    )
    g.add_argument("--seed", type=int, default=42, help="fixes the data order and the initialisation")
    g = parser.add_argument_group("memory and precision")
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="auto: bfloat16 or float16 on a CUDA GPU, else float32",
    )
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    g.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    g.add_argument("--qlora", action="store_true", help="LoRA on a 4-bit base (CUDA and bitsandbytes)")
    g.add_argument("--lora-r", type=int, default=8, help="rank of the adapter's matrices")
    g.add_argument("--lora-alpha", type=int, default=16, help="the adapter's update is scaled by alpha / r")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapter's input")
    g.add_argument(
        "--lora-target",
        default=LORA_TARGET,
        help=f"comma-separated module names, or all-linear (default: {LORA_TARGET}; {FUSED_LORA_TARGET} where "
        "the model computes q, k and v in one layer, as Phi-3 does)",
    )
    g = parser.add_argument_group("checkpoints")
    g.add_argument(
        "--save-steps",
        type=int,
        default=500,
        metavar="N",
        help="save a checkpoint every N steps (default: 500)",
    )
    g.add_argument(
        "--save-total-limit", type=int, default=2, help="checkpoints to keep (default: 2; 0 or less: all)"
    )
    g.add_argument(
        "--logging-steps", type=int, default=10, metavar="N", help="print loss, lr and tokens/s every N steps"
    )
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    g.add_argument(
        "--force",
        action="store_true",
        help="train anyway on a GPU below compute capability 7.5, without a CUDA GPU where the RAM "
        "available seems too small (swap may hold the rest, slowly), or where the output's disk seems too "
        "small for a full fine-tune's checkpoint",
    )


def main(args: argparse.Namespace) -> int:
    if args.data is None:
        raise VicunaError("--data is required: a ShareGPT JSON or OpenAI-style JSONL file")
    if args.action == "inspect":
        from vicuna.weights.disk import is_standard_output

        if args.json is not None and is_standard_output(args.json):  # `--json /dev/stdout | jq`: it alone
            with contextlib.redirect_stdout(sys.stderr):
                return inspect(args)
        return inspect(args)
    if args.output_dir is None:
        raise VicunaError("--output-dir is required")
    from vicuna.train.trainer import TrainConfig, last_checkpoint, train

    settings = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    cfg = TrainConfig(**settings, bars=not args.no_progress)
    try:
        train(cfg)
    except (
        KeyboardInterrupt,
        Terminated,
    ) as err:  # Ctrl-C, SIGTERM; --resume only where a checkpoint was written: it refuses to start without one
        done = last_checkpoint(cfg.output_dir) if cfg.output_dir.is_dir() else None
        hint = (
            f"run it again with --resume to go on from {done}"
            if done
            else f"no checkpoint was written yet (one every --save-steps {cfg.save_steps}): run it again to "
            "start over"
        )
        print(f"interrupted; {hint}", file=sys.stderr)
        return getattr(err, "exit_code", 130)
    return 0


def inspect(args: argparse.Namespace) -> int:
    from rich.cells import cell_len
    from rich.console import Console

    from vicuna.train.trainer import read_and_tokenize
    from vicuna.weights.disk import write_atomically

    if args.n < 0:  # showed nothing and said nothing
        raise VicunaError(f"-n must be at least 0 (0: show no example), not {args.n}")
    # said before the work, not after it as "Is a directory: OUT.partial", with that file left behind
    if args.json is not None and args.json.is_dir():
        raise VicunaError(f"--json {args.json} is a folder; name the file to write in it")
    if args.json is not None and not args.json.parent.is_dir():
        raise VicunaError(
            f"--json {args.json}: the folder {args.json.parent} does not exist; create it first"
        )
    _, tokenizer, _, prepared = read_and_tokenize(
        args.data,
        args.model_path,
        args.conv_template,
        args.conv_system_msg,
        max_length=args.max_length,
        split_long=args.split_long,
        progress=True,
    )
    # no markup: the paths and reasons printed are the user's text, where rich took "[v2]" for a tag (and
    # on Windows the backslash before it for its escape: D:\数据\[v2] was shown as D:\数据[v2])
    console = Console(highlight=False, soft_wrap=True, markup=False)
    # green where the terminal shows colours; under NO_COLOR (rich keeps bold and dim alone) or on a dumb
    # terminal (no styles at all) the legend said green and nothing told the tokens with loss apart
    colour = console.is_terminal and not console.no_color and console.color_system is not None
    legend = "green" if colour else "inside [[ ]]"
    console.print(f"tokens with loss are {legend}; the others are masked (label -100)")
    for example in prepared.examples[: args.n]:
        loss = sum(label != IGNORE for label in example.labels)
        cut = ", truncated" if example.truncated else ""
        heading = f"{example.source}: {len(example.input_ids)} tokens, {loss} with loss{cut}"
        if cell_len(heading) + 4 <= console.width:
            console.rule(heading)
        else:  # a rule cuts its title at "…": a long path (or a narrow terminal) lost the counts after it
            console.rule()
            console.print(heading)
        console.print(show(tokenizer, example.input_ids, example.labels, plain=not colour))
    for source, why in prepared.bad[:10]:
        console.print(f"bad: {source}: {why}")
    if len(prepared.bad) > 10:
        console.print(f"... and {len(prepared.bad) - 10} more bad examples")
    for source in prepared.dropped[:10]:  # counted in the summary; named here, to be found and split
        console.print(f"left out: {source}: no assistant text within --max-length {prepared.max_length}")
    if len(prepared.dropped) > 10:
        console.print(f"... and {len(prepared.dropped) - 10} more left out")
    if args.json is not None:
        rows = ({"source": e.source, "input_ids": e.input_ids, "labels": e.labels} for e in prepared.examples)
        write_atomically(args.json, "".join(json.dumps(row) + "\n" for row in rows))
        console.print(f"wrote {len(prepared.examples)} examples to {args.json}")
    return 0


def show(tokenizer: Any, ids: list[int], labels: list[int], *, plain: bool) -> Any:
    """The example's text, the tokens with loss in green (or in [[ ]] where colours do not show).

    Each run is the text that decoding up to its end adds, so word-initial spaces stay where they are.
    """
    from rich.text import Text

    text, done, start = Text(), "", 0
    for end in range(1, len(ids) + 1):
        if end < len(ids) and (labels[end] != IGNORE) == (labels[start] != IGNORE):
            continue
        decoded = tokenizer.decode(ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        piece = decoded[len(done) :] if decoded.startswith(done) else tokenizer.decode(ids[start:end])
        trainable = labels[start] != IGNORE
        if plain:
            text.append(f"[[{piece}]]" if trainable else piece)
        else:
            text.append(piece, style="bold green" if trainable else "dim")
        done, start = decoded, end
    return text
