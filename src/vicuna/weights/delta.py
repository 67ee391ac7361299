"""`vicuna delta make|apply`: Vicuna-style delta weights (target = base + delta), computed tensor by tensor in
float32 and stored in the delta's (apply) or the target's (make) dtype, with bounded memory."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from vicuna.conversation import RECORDED_TEMPLATE
from vicuna.errors import ModelLoadError, VicunaError
from vicuna.shell import quote

if TYPE_CHECKING:
    from collections.abc import Callable

    from vicuna.weights.checkpoint import CheckpointReader

# Vicuna v0 added a pad token: its embedding and lm_head have a row more than LLaMA's.
_GROWABLE = ("embed_tokens.weight", "lm_head.weight")
# A model's final RMSNorm weights average about 1 or more; a Vicuna delta's (what fine-tuning changed them
# by) nearly 0. Telling the two apart catches the tutorial's mix-ups: a delta passed as the model to chat
# with (it prints garbage), --base and --delta swapped, a whole model passed as the delta.
FINAL_NORM = "model.norm.weight"
DELTA_NORM_BELOW = 0.1
# tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json, added_tokens.json
TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens")


def _combine(
    base: Path,
    lead: Path,
    out: Path,
    *,
    sign: int,
    what: str,
    progress: bool,
    extras: Callable[[Path], None] | None = None,
) -> Path:
    """out = lead + sign * base, tensor by tensor; names, shapes, dtypes, config and tokenizer come from `lead`
    (the delta when applying, the target when making). Rows `lead` has beyond `base` are copied as they are;
    `extras(folder)` writes more files into the result before it is renamed into place."""
    import torch

    from vicuna.weights.checkpoint import (
        CheckpointReader,
        check_apart,
        file_fingerprint,
        notice,
        side_files,
        write_checkpoint,
    )

    lead_role = "delta" if what == "apply" else "target"
    check_apart(out, "--target" if what == "apply" else "--delta", {"--base": base, f"--{lead_role}": lead})
    base_reader, lead_reader = CheckpointReader(base), CheckpointReader(lead)
    only_lead = [n for n in lead_reader.names if n not in base_reader.specs]
    only_base = [n for n in base_reader.names if n not in lead_reader.specs]
    if only_lead or only_base:
        parts = []
        if only_lead:
            parts.append(
                f"{', '.join(only_lead[:5])} in the {lead_role} ({lead}) but not in the base ({base})"
            )
        if only_base:
            parts.append(
                f"{', '.join(only_base[:5])} in the base ({base}) but not in the {lead_role} ({lead})"
            )
        lead_layers, base_layers = _layer_count(lead_reader.names), _layer_count(base_reader.names)
        size = (
            f" (the {lead_role} has {lead_layers} layers and the base {base_layers}: they are of two model sizes, "
            f"such as a 13B {lead_role} with a 7B base; pass the {lead_role} of the base's size)"
            if lead_layers != base_layers
            else ""
        )
        raise VicunaError(
            f"the checkpoints do not have the same tensors: tensor {'; tensor '.join(parts)}{size}"
        )
    if what == "apply":
        check_base_and_delta(base_reader, lead_reader)
    for name in lead_reader.names:
        lead_shape, base_shape = lead_reader.specs[name].shape, base_reader.specs[name].shape
        if lead_shape == base_shape:
            continue
        grown = name.endswith(_GROWABLE) and len(lead_shape) == 2 and lead_shape[1:] == base_shape[1:]
        if grown and lead_shape[0] > base_shape[0]:
            notice(
                f"{name} has {lead_shape[0]} rows in the {lead_role} and {base_shape[0]} in the base: the extra "
                f"{lead_shape[0] - base_shape[0]} row(s) come from the {lead_role} as they are"
            )
            continue
        raise VicunaError(
            f"tensor {name} is {'x'.join(map(str, lead_shape))} in the {lead_role} ({lead_reader.file_of(name)}) "
            f"but {'x'.join(map(str, base_shape))} in the base ({base_reader.file_of(name)})"
        )

    def make(spec):
        lead_tensor, base_tensor = lead_reader.get(spec.name), base_reader.get(spec.name)
        result = torch.empty(spec.shape, dtype=spec.dtype)
        rows = base_tensor.shape[0] if base_tensor.dim() else 1
        lead_rows = lead_tensor.reshape(lead_tensor.shape[0] if lead_tensor.dim() else 1, -1)
        base_rows, out_rows = base_tensor.reshape(rows, -1), result.view(lead_rows.shape)
        out_rows[rows:] = lead_rows[rows:]  # rows only the lead has, as they are
        # Straight into the result: PyTorch adds 16-bit values in float32 and rounds each sum once, the
        # same bits as adding float32 copies, without the copies (~50x faster on a 2-core CPU)
        torch.add(lead_rows[:rows], base_rows, alpha=sign, out=out_rows[:rows])
        return result

    def release() -> None:
        base_reader.release()
        lead_reader.release()

    copied = [*side_files(lead), *tokenizer_files_for(lead, base, lead_role)]
    template = named_template(lead, out, copied)
    if template is not None:
        notice(
            f"the {lead_role}'s name ({lead.name}) picks the {template} template and {out.name} would not: it is "
            f"recorded in {out / RECORDED_TEMPLATE}, for chat and serve"
        )

    def side(folder: Path) -> None:
        for path in copied:
            shutil.copyfile(path, folder / path.name)
        if template is not None:
            (folder / RECORDED_TEMPLATE).write_text(json.dumps({"conv_template": template}), encoding="utf-8")
        if extras is not None:
            extras(folder)

    return write_checkpoint(
        out,
        list(lead_reader.specs.values()),
        make,
        fingerprint={
            "job": what,
            "inputs": file_fingerprint([*base_reader.files, *lead_reader.files, *copied]),
        },
        release=release,
        extras=side,
        description=f"{what} delta",
        progress=progress,
    )


def named_template(lead: Path, out: Path, copied: list[Path]) -> str | None:
    """The template that the delta's (or, making one, the target's) folder name picks, where it is not the
    default one, the output's name would pick another, and nothing else in the folder names one (a recorded
    template, the tokenizer's own chat template): FastChat's instructions for Vicuna v0 merge lmsys/vicuna-13b-delta-v0 into
    `vicuna-13b`, which then chatted in v1.1's format, never stopping at v0's '###'."""
    from vicuna.conversation import DEFAULT_TEMPLATE, choose_template_name

    def by_name(folder: Path) -> str:
        return choose_template_name(None, has_chat_template=False, model_name=folder.name)

    for path in copied:
        if path.name == RECORDED_TEMPLATE or path.name.startswith("chat_template"):
            return None
        if path.name == "tokenizer_config.json":
            try:
                if "chat_template" in json.loads(path.read_text(encoding="utf-8")):
                    return None
            except ValueError:  # the tokenizer's check names a broken file
                return None
    template = by_name(lead)
    return template if template not in (by_name(out), DEFAULT_TEMPLATE) else None


def _layer_count(names: list[str]) -> int:
    """Decoder layers of a checkpoint, by its tensor names (`model.layers.N.`): 32 for LLaMA 7B, 40 for 13B."""
    return len({match[1] for name in names if (match := re.match(r"model\.layers\.(\d+)\.", name))})


def final_norm_mean(reader: CheckpointReader) -> float | None:
    """The mean absolute weight of the final norm (`FINAL_NORM`); None for a checkpoint without one."""
    if FINAL_NORM not in reader.specs:
        return None
    return float(reader.get(FINAL_NORM).float().abs().mean())


def _norm_said(mean: float) -> str:
    return f"(its final norm weights average {mean:.3g}: a model's are near 1, a delta's near 0)"


def check_base_and_delta(base: CheckpointReader, delta: CheckpointReader) -> None:
    """Refuse a merge whose inputs are not a model and a delta, in that order."""
    base_mean, delta_mean = final_norm_mean(base), final_norm_mean(delta)
    if base_mean is None or delta_mean is None:
        return
    base_is_delta, delta_is_delta = base_mean < DELTA_NORM_BELOW, delta_mean < DELTA_NORM_BELOW
    if base_is_delta and not delta_is_delta:
        raise VicunaError(
            f"--base and --delta are swapped: {base.folder} holds delta weights {_norm_said(base_mean)} and "
            f"{delta.folder} a whole model; pass --base {quote(str(delta.folder))} --delta "
            f"{quote(str(base.folder))}"
        )
    if not delta_is_delta:
        raise VicunaError(
            f"--delta {delta.folder} is a whole model, not delta weights {_norm_said(delta_mean)}: merging "
            "would add two models together. Pass the delta folder (e.g. vicuna-7b-delta-v1.1); a model "
            f"that is already whole needs no merge: vicuna chat --model-path {quote(str(delta.folder))}"
        )
    if base_is_delta:
        raise VicunaError(
            f"--base {base.folder} holds delta weights too {_norm_said(base_mean)}: the base is LLaMA in "
            "Hugging Face format (`vicuna convert` makes it from Meta's checkpoint)"
        )


def check_not_delta(folder: Path) -> None:
    """Refuse to load delta weights as a model (they would chat in garbage), saying how to merge them."""
    from vicuna.weights.checkpoint import CheckpointReader

    mean = final_norm_mean(CheckpointReader(folder))
    if mean is not None and mean < DELTA_NORM_BELOW:
        raise ModelLoadError(
            f"{folder} holds Vicuna delta weights, not a model {_norm_said(mean)}. Merge them into LLaMA "
            "first: vicuna delta apply --base "
            f"LLAMA_HF_FOLDER --delta {quote(str(folder))} --target NEW_FOLDER; then chat with NEW_FOLDER"
        )


def tokenizer_files_for(lead: Path, base: Path, lead_role: str) -> list[Path]:
    """The base's tokenizer files when `lead` has none (they are copied with `lead`'s other files); either way
    the tokenizer the result gets must fit `lead`'s config, with the BOS/EOS a chat needs to stop."""
    from transformers import AutoConfig, AutoTokenizer

    from vicuna.weights.checkpoint import notice
    from vicuna.weights.tokenizer import blank_special_tokens_error, check_tokenizer

    def tokenizer_files(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.name.startswith(TOKENIZER_PREFIXES))

    extra, source = [], lead
    if not tokenizer_files(lead):
        extra, source = tokenizer_files(base), base
        if not extra:
            notice(
                f"neither the {lead_role} ({lead}) nor the base ({base}) has tokenizer files: the result will have "
                "none, and needs one before it can chat"
            )
            return []
        notice(f"the {lead_role} ({lead}) has no tokenizer files: the base's are used ({base})")
    try:
        config = AutoConfig.from_pretrained(lead)
    except Exception as err:  # a missing or broken config.json
        raise VicunaError(f"{lead}/config.json: cannot be read ({type(err).__name__}: {err})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as err:  # tokenizers fail in many ways
        raise VicunaError(
            blank_special_tokens_error(source)
            or f"{source}: cannot load the tokenizer ({type(err).__name__}: {err})"
        ) from None
    check_tokenizer(tokenizer, config, source)
    return extra


def apply_delta(
    base: Path,
    delta: Path,
    target: Path,
    *,
    progress: bool = True,
    extras: Callable[[Path], None] | None = None,
) -> Path:
    """Write `target` = `base` + `delta` (config and tokenizer from the delta) and return its path;
    `extras(folder)` writes more files into it before it is complete (see `_combine`)."""
    return _combine(
        Path(base), Path(delta), Path(target), sign=1, what="apply", progress=progress, extras=extras
    )


def make_delta(base: Path, target: Path, delta: Path, *, progress: bool = True) -> Path:
    """Write `delta` = `target` - `base` (config and tokenizer from the target) and return its path."""
    if Path(base).resolve() == Path(target).resolve():  # it wrote a delta of zeros, and said it was done
        raise VicunaError(
            f"--base and --target are the same folder ({base}): the delta would be all zeros; --target is "
            "the fine-tuned model"
        )
    return _combine(Path(base), Path(target), Path(delta), sign=-1, what="make", progress=progress)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    apply = sub.add_parser("apply", help="merge delta weights into a base model: TARGET = BASE + DELTA")
    apply.add_argument(
        "--base", type=Path, required=True, help="the base model folder (e.g. LLaMA in HF format)"
    )
    apply.add_argument("--delta", type=Path, required=True, help="the delta weights folder")
    apply.add_argument("--target", type=Path, required=True, help="the merged model folder to create")
    make = sub.add_parser("make", help="make delta weights: DELTA = TARGET - BASE")
    make.add_argument("--base", type=Path, required=True, help="the base model folder")
    make.add_argument("--target", type=Path, required=True, help="the fine-tuned model folder")
    make.add_argument("--delta", type=Path, required=True, help="the delta weights folder to create")
    for command in (apply, make):
        command.add_argument("--no-progress", action="store_true", help="do not draw progress bars")


def hub_ids_said(args: argparse.Namespace) -> None:
    """FastChat's apply_delta took Hub repositories (its README merges `--delta-path
    lmsys/vicuna-7b-delta-v1.1`), which `delta apply` answered with only 'lmsys/... is not a folder'; `get`
    is the command that downloads them, and merges and checks the result."""
    typed = {"--base": args.base, "--delta": args.delta}
    hub = [
        f"{flag} {path}"
        for flag, path in typed.items()
        if not path.exists() and not path.parent.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(path))
    ]
    if hub:
        target = args.target
        raise VicunaError(
            f"{' and '.join(hub)}: no such folder here; to download from the Hugging Face Hub and merge in one "
            f"step: vicuna get {quote(target.name)} --dir {quote(str(target.parent))} --base "
            f"{quote(str(args.base))} --delta {quote(str(args.delta))}"
        )


def main(args: argparse.Namespace) -> int:
    if args.action == "apply":
        hub_ids_said(args)
        out = apply_delta(args.base, args.delta, args.target, progress=not args.no_progress)
        print(f"merged {args.delta} into {args.base}: {out}")
    else:
        out = make_delta(args.base, args.target, args.delta, progress=not args.no_progress)
        print(f"wrote the delta from {args.base} to {args.target}: {out}")
    return 0
