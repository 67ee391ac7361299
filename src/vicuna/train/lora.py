"""`vicuna lora merge`: fold a LoRA adapter into its base model and write a normal checkpoint."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from vicuna.config import DTYPES
from vicuna.engine.loader import RECORDED_TEMPLATE
from vicuna.errors import ModelLoadError, VicunaError

# peft's names: base_model.model.<the base's module>.lora_A.weight
LORA_WEIGHT = re.compile(
    r"base_model\.model\.(?P<module>.+)\.(?P<kind>lora_(?:embedding_)?[AB])(?:\.weight)?"
)
# LoRA's matrices -> (the axis of their shape, the base module's size it must equal, what that size is)
LORA_AXES = {
    "lora_A": (1, "in_features", "inputs"),
    "lora_B": (0, "out_features", "outputs"),
    "lora_embedding_A": (1, "num_embeddings", "rows"),
    "lora_embedding_B": (0, "embedding_dim", "columns"),
}
OTHER_BASE = "the adapter was trained on another model: merge it into its own base"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("merge", help="merge an adapter into its base model")
    p.add_argument(
        "--base",
        help="the base model: HF-format folder, .gguf file or Hub repo OWNER/NAME (default: the one the "
        "adapter records, its base_model_name_or_path)",
    )
    p.add_argument(
        "--adapter", required=True, type=Path, help="the adapter folder (from `vicuna train --lora`)"
    )
    p.add_argument(
        "--output", required=True, type=Path, help="the merged checkpoint's folder (must not exist)"
    )
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: the base model's own dtype")
    p.add_argument("--no-progress", action="store_true", help="do not draw progress bars")


def merge(
    base: str | None, adapter: Path, output: Path, dtype: str = "auto", *, progress: bool = True
) -> Path:
    """Base + adapter -> one checkpoint with the tokenizer and template record; written to a temporary
    folder and renamed into place when complete. `base` None: the one the adapter records. `progress`:
    draw the bars of loading, saving and hashing the weights on a terminal."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from vicuna.engine.loader import (
        check_tokenizer,
        litgpt_files,
        load_tokenizer,
        read_config,
        resolve_model_path,
    )
    from vicuna.shell import quote
    from vicuna.train.trainer import quiet_peft
    from vicuna.weights.disk import as_new_files, disk_full, ensure_free_space, free_bytes, one_writer, size
    from vicuna.weights.manifest import redraws, transformers_bar, write_manifest

    if not (adapter / "adapter_config.json").is_file():
        # LitGPT's merge_lora takes OUT_DIR/final; vicuna train --lora writes the adapter into OUT_DIR itself
        inside = (
            f"; vicuna train --lora writes the adapter into --output-dir itself: --adapter {quote(str(adapter.parent))}"
            if (adapter.parent / "adapter_config.json").is_file()
            else litgpt_files(adapter)
        )
        raise VicunaError(f"{adapter}: no adapter_config.json; expected a LoRA adapter folder{inside}")
    if output.exists():
        raise VicunaError(f"{output}: already exists; choose a new --output")
    settings = adapter_settings(adapter)
    folder = resolve_model_path(base) if base is not None else recorded_base(adapter, settings)
    warn_if_other_base(adapter, settings, folder)
    for field in ("r", "lora_alpha"):  # peft compared "8" with 0: a TypeError, with a traceback
        value = settings.get(field)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
        ):
            raise VicunaError(
                f"{adapter / 'adapter_config.json'}: {field} is {value!r}; expected a number above 0"
            )
    has_tokenizer = any(
        (adapter / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    )
    tokenizer = load_tokenizer(adapter if has_tokenizer else folder)
    try:  # the merged model keeps the base's config: this is the check chat will run on it
        check_tokenizer(tokenizer, read_config(folder), adapter if has_tokenizer else folder)
    except ModelLoadError as err:
        raise ModelLoadError(f"{adapter} does not fit {folder}: {err}; {OTHER_BASE}") from None
    bars = progress and redraws(sys.stderr)  # in a log: not lines redrawn with carriage returns
    try:
        with transformers_bar(bars):
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype if dtype == "auto" else getattr(torch, dtype)
            )
    except (OSError, RuntimeError, ValueError) as err:
        raise ModelLoadError(f"{folder}: cannot load the weights ({type(err).__name__}: {err})") from None
    check_adapter_fits(adapter, model, folder)
    try:
        with quiet_peft():
            model = PeftModel.from_pretrained(model, adapter)
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise ModelLoadError(
            f"{adapter} on {folder}: cannot apply the adapter ({type(err).__name__}: {err})"
        ) from None
    merged = model.merge_and_unload()
    tmp = output.with_name(output.name + ".partial")
    # one merge at a time into `tmp`: of two at once, each removed and wrote the other's files, and one's
    # manifest could list what the other was still writing
    with one_writer(output, tmp):
        if output.exists():  # the other merge, finished meanwhile
            raise VicunaError(f"{output}: already exists; choose a new --output")
        shutil.rmtree(tmp, ignore_errors=True)
        needed = sum({t.data_ptr(): t.nbytes for t in merged.state_dict().values()}.values())  # tied: once
        ensure_free_space(output.parent, needed, f"merging into {output}")
        try:
            with transformers_bar(bars):
                merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            for source in (adapter, folder):  # the template the adapter was trained with, else the base's
                if (source / RECORDED_TEMPLATE).is_file():
                    shutil.copyfile(source / RECORDED_TEMPLATE, tmp / RECORDED_TEMPLATE)
                    break
            write_manifest(tmp, progress=bars)
            as_new_files(tmp)
            tmp.rename(output)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)  # Ctrl-C too: a merge starts again from nothing
            if not (isinstance(err, Exception) and (full := disk_full(err))):
                raise
            # safetensors says a full disk with its own error, not an OSError: it came out as a traceback
            raise VicunaError(
                f"{output}: the merged model could not be written ({full}; it needs {size(needed)}, and "
                f"{size(free_bytes(output.parent))} is free on that disk): free some space or choose "
                "another --output, then run the same command again"
            ) from None
    return output


def adapter_settings(adapter: Path) -> dict[str, Any]:
    """The fields of the adapter's adapter_config.json, refused where it is not a JSON object."""
    config = adapter / "adapter_config.json"
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VicunaError(f"{config}: not a valid adapter config ({type(err).__name__}: {err})") from None
    if not isinstance(settings, dict):
        raise VicunaError(f"{config}: not a valid adapter config (expected a JSON object of fields)")
    return settings


def recorded_base(adapter: Path, settings: dict[str, Any]) -> Path:
    """The folder of the base model the adapter records: peft's base_model_name_or_path, which `vicuna train
    --lora` sets to the folder it loaded (the .gguf file, as given, for one). Refused, naming it, where it
    is gone: a folder deleted or moved, or the built-in model's copy, which an upgrade replaces."""
    from vicuna.engine.loader import names_hub_repository, resolve_model_path

    config = adapter / "adapter_config.json"
    named = settings.get("base_model_name_or_path")
    if not isinstance(named, str) or not named.strip():
        raise VicunaError(
            f"{config} does not record the base model (base_model_name_or_path); pass --base, the model the "
            "adapter was trained on"
        )
    if not names_hub_repository(named) and not Path(named).expanduser().exists():
        raise VicunaError(
            f"{config} records {named} as the base model, which is not there (deleted or moved; a built-in "
            "model's copy is replaced when its package is upgraded); pass --base, the model the adapter was "
            "trained on"
        )
    try:
        return resolve_model_path(named)
    except ModelLoadError as err:  # a folder that holds no model now; a Hub repository not downloaded
        raise ModelLoadError(
            f"{config} records {named} as the base model, which cannot be loaded ({err}); pass --base, the "
            "model the adapter was trained on"
        ) from None


def warn_if_other_base(adapter: Path, settings: dict[str, Any], folder: Path) -> None:
    """A warning, not an error, when the adapter names another folder as its base: a copy of the same
    model elsewhere is fine, and the checks that follow refuse one that does not fit."""
    named = settings.get("base_model_name_or_path")
    named_folder = Path(named).expanduser() if isinstance(named, str) and named else None
    if named_folder is not None and named_folder.is_dir() and named_folder.resolve() != folder.resolve():
        print(
            f"warning: {adapter / 'adapter_config.json'} names {named} as its base, not {folder}; merging if "
            "the adapter fits",
            file=sys.stderr,
        )


def adapter_shapes(adapter: Path) -> dict[str, tuple[int, ...]]:
    """The shapes of the adapter's weights by name, read without loading the weights."""
    from vicuna.engine.loader import check_weight_file

    for name in ("adapter_model.safetensors", "adapter_model.bin"):  # cut short: a traceback from reading
        if (adapter / name).is_file():
            check_weight_file(adapter / name)
    if (adapter / "adapter_model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(adapter / "adapter_model.safetensors", framework="pt") as f:
            return {
                key: tuple(f.get_slice(key).get_shape())
                for key in f.keys()  # noqa: SIM118 (safe_open handles are not iterable)
            }
    if (adapter / "adapter_model.bin").is_file():
        import torch

        state = torch.load(adapter / "adapter_model.bin", map_location="cpu", weights_only=True, mmap=True)
        return {key: tuple(tensor.shape) for key, tensor in state.items()}
    raise VicunaError(f"{adapter}: no adapter_model.safetensors; expected a LoRA adapter folder")


def check_adapter_fits(adapter: Path, model: Any, folder: Path) -> None:
    """Refuse an adapter whose matrices do not fit the base's layers. peft would stop at a wrong shape
    with a long message, would leave out layers the base lacks with a warning only, and would leave the
    layers of a deeper base as they are without a word."""
    modules = dict(model.named_modules())
    covered: set[str] = set()
    for key, shape in adapter_shapes(adapter).items():
        match = LORA_WEIGHT.fullmatch(key)
        if match is None:
            continue  # not a LoRA matrix (a whole layer saved beside them: peft compares those itself)
        name, (axis, size, what) = match["module"], LORA_AXES[match["kind"]]
        if name not in modules:
            raise VicunaError(
                f"{adapter}: the adapter has weights for {name}, which {folder} lacks; {OTHER_BASE}"
            )
        expected = getattr(modules[name], size, None)
        if expected is not None and shape[axis] != expected:
            raise VicunaError(
                f"{adapter}: {key} has shape {shape}, but {folder}'s "
                f"{name} has {expected} {what}; {OTHER_BASE}"
            )
        covered.add(name)
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("layers_to_transform") is not None or config.get("exclude_modules"):
        return  # trained on some layers only, by choice
    # the same module in every layer: a base deeper than the adapter has layers it would leave alone
    per_layer = {r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in n.split(".")) for n in covered}
    missing = [n for n in modules if n not in covered and any(re.fullmatch(p, n) for p in per_layer)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise VicunaError(
            f"{adapter}: the adapter has no weights for {missing[0]}{more}, which {folder} has; {OTHER_BASE}"
        )


def main(args: argparse.Namespace) -> int:
    from vicuna.engine.loader import adapter_base

    out = merge(args.base, args.adapter, args.output, args.dtype, progress=not args.no_progress)
    print(f"Merged {args.adapter} into {args.base or adapter_base(args.adapter)}: {out}")
    return 0
