"""`vicuna lora merge`: fold a LoRA adapter into its base model and write a normal checkpoint."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from vicuna.config import DTYPES
from vicuna.engine.loader import RECORDED_TEMPLATE
from vicuna.errors import ModelLoadError, VicunaError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("merge", help="merge an adapter into its base model")
    p.add_argument("--base", required=True, help="the base model's HF-format folder")
    p.add_argument(
        "--adapter", required=True, type=Path, help="the adapter folder (from `vicuna train --lora`)"
    )
    p.add_argument(
        "--output", required=True, type=Path, help="the merged checkpoint's folder (must not exist)"
    )
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: the base model's own dtype")


def merge(base: str, adapter: Path, output: Path, dtype: str = "auto") -> Path:
    """Base + adapter -> one checkpoint with the tokenizer and template record; written to a temporary
    folder and renamed into place when complete."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from vicuna.engine.loader import load_tokenizer, resolve_model_path

    if not (adapter / "adapter_config.json").is_file():
        raise VicunaError(f"{adapter}: no adapter_config.json; expected a LoRA adapter folder")
    if output.exists():
        raise VicunaError(f"{output}: already exists; choose a new --output")
    folder = resolve_model_path(base)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype if dtype == "auto" else getattr(torch, dtype)
        )
        model = PeftModel.from_pretrained(model, adapter)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise ModelLoadError(
            f"{adapter} on {folder}: cannot apply the adapter ({type(err).__name__}: {err})"
        ) from None
    merged = model.merge_and_unload()
    has_tokenizer = any(
        (adapter / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    )
    tokenizer = load_tokenizer(adapter if has_tokenizer else folder)
    tmp = output.with_name(output.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for source in (adapter, folder):  # the template the adapter was trained with, else the base model's
        if (source / RECORDED_TEMPLATE).is_file():
            shutil.copyfile(source / RECORDED_TEMPLATE, tmp / RECORDED_TEMPLATE)
            break
    tmp.rename(output)
    return output


def main(args: argparse.Namespace) -> int:
    out = merge(args.base, args.adapter, args.output, args.dtype)
    print(f"Merged {args.adapter} into {args.base}: {out}")
    return 0
