"""`vicuna get NAME`: the whole path from nothing to a working Vicuna in one command: download the base and
the delta (or a merged release), merge them, verify the sha256 manifest, and run a one-prompt smoke chat that
must end on EOS (a wrong BOS/EOS setup makes a model "never stop").

Every step leaves a folder that says it is done (a downloaded or merged folder with its `SHA256SUMS`, written
last), so a re-run after an interruption skips finished steps and resumes the unfinished one. The model is
made or downloaded in `NAME.partial`, renamed to `NAME` once it is complete and checked. A merged model
records what it was merged from (`RECORD_NAME`), so a re-run with another base or delta is refused rather
than answered with the old merge; that record, which a base or delta cannot have, is what says a merge is done.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from vicuna.errors import VicunaError
from vicuna.shell import quote

SMOKE_QUESTION = "What is the capital of France? Answer in one word."


@dataclass(frozen=True)
class Recipe:
    """Either a base and a delta to merge (LLaMA's license kept Vicuna v0/v1.1 to deltas), or a merged release."""

    base: str | None = None
    delta: str | None = None
    merged: str | None = None


RECIPES: dict[str, Recipe] = {
    "vicuna-7b-v1.1": Recipe(base="yahma/llama-7b-hf", delta="lmsys/vicuna-7b-delta-v1.1"),
    "vicuna-13b-v1.1": Recipe(base="yahma/llama-13b-hf", delta="lmsys/vicuna-13b-delta-v1.1"),
    "vicuna-7b-v1.5": Recipe(merged="lmsys/vicuna-7b-v1.5"),
    "vicuna-13b-v1.5": Recipe(merged="lmsys/vicuna-13b-v1.5"),
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
RECORD_NAME = ".vicuna-get.json"  # hidden: not in the manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name", metavar="NAME", help=f"one of {', '.join(RECIPES)}; any other name needs --base and --delta"
    )
    parser.add_argument(
        "--dir",
        type=Path,
        help="working folder: downloads go to DIR/downloads, the model to DIR/NAME (default: $VICUNA_HOME/models)",
    )
    parser.add_argument(
        "--base", help="the base model instead of the recipe's: a local folder or a Hub repo id"
    )
    parser.add_argument(
        "--delta", help="the delta weights instead of the recipe's: a local folder or a Hub repo id"
    )
    parser.add_argument("--no-smoke-test", action="store_true", help="skip the one-prompt chat at the end")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="draw no progress bars (downloading, checking hashes, merging, verifying, loading the model for "
        "the smoke chat); each step's line and the download's file count are still printed",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        help="the smoke chat must end on EOS within this many tokens",
    )


def main(args: argparse.Namespace) -> int:
    from vicuna.config import vicuna_home

    model = get(
        args.name,
        args.dir or vicuna_home() / "models",
        base=args.base,
        delta=args.delta,
        smoke_test=not args.no_smoke_test,
        max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress,
    )
    # standard output holds this alone (each step was said on stderr)
    print(f"\nready: {model}\nchat with it:\n  vicuna chat --model-path {quote(str(model))}")
    return 0


@dataclass(frozen=True)
class Source:
    """A model folder to use as it is, or a Hub repo to download into `folder` first."""

    role: str
    folder: Path
    repo_id: str | None = None

    @property
    def done(self) -> bool:
        from vicuna.weights.manifest import MANIFEST_NAME

        return self.repo_id is None or (self.folder / MANIFEST_NAME).is_file()


def resolve_source(spec: str, role: str, workdir: Path) -> Source:
    """A local folder when one exists at `spec`, else a Hub repo id (`owner/name`) downloaded under `workdir`."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise VicunaError(f"--{role} {spec} is a file; expected a model folder or a Hub repo id")
        return Source(role, path)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        raise VicunaError(f"--{role} {spec} is neither an existing folder nor a Hub repo id like owner/name")
    return Source(role, workdir / "downloads" / spec.replace("/", "--"), spec)


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in weight_files(folder))


def merge_record(sources: list[Source]) -> dict[str, object]:
    """What a merge was made from: each Hub repo by its id (its download may be deleted after the merge), each
    local folder by its path and its weight files' sizes and times (a folder whose weights were replaced)."""
    from vicuna.weights.checkpoint import file_fingerprint

    return {
        s.role: s.repo_id
        or {"folder": str(s.folder.resolve()), "weights": file_fingerprint(weight_files(s.folder))}
        for s in sources
    }


def check_record(model: Path, record: dict[str, object]) -> None:
    """Refuse a finished merge made from other inputs than this run's (a record that cannot be read: kept)."""
    try:
        previous = json.loads((model / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    changed = [role for role in record if previous.get(role) != record[role]]
    if changed:

        def said(value: object) -> str:
            return value["folder"] if isinstance(value, dict) else str(value)

        what = "; ".join(
            f"the {role} was {said(previous.get(role))}"
            + (" (its weights have changed since)" if said(previous.get(role)) == said(record[role]) else "")
            + f", now {said(record[role])}"
            for role in changed
        )
        raise VicunaError(
            f"{model} was merged from other inputs than this run's ({what}); delete {model} to merge again, "
            "or choose another name or --dir"
        )


def get(
    name: str,
    workdir: Path,
    *,
    base: str | None = None,
    delta: str | None = None,
    smoke_test: bool = True,
    max_new_tokens: int = 64,
    progress: bool = True,
) -> Path:
    """Download, merge, verify and smoke-test `name` into `workdir/name`; finished steps are skipped."""
    from vicuna.weights.disk import ensure_free_space
    from vicuna.weights.manifest import MANIFEST_NAME, verify_manifest

    recipe = RECIPES.get(name)
    if (base or delta) and recipe and recipe.merged:
        raise VicunaError(
            f"{name} is a merged release ({recipe.merged}): --base and --delta do not apply to it"
        )
    base, delta = base or (recipe and recipe.base), delta or (recipe and recipe.delta)
    if not (recipe and recipe.merged) and not (base and delta):
        raise VicunaError(
            f"unknown model {name!r}: choose one of {', '.join(RECIPES)}, or give --base and --delta"
        )
    workdir = Path(workdir).expanduser()
    model = workdir / name
    finished = (model / MANIFEST_NAME).is_file()

    if recipe and recipe.merged:  # fetched into NAME.partial, renamed once complete and checked
        partial = model.with_name(model.name + ".partial")
        if model.is_dir() and not finished:  # an older vicuna's interrupted download, straight into NAME
            if partial.exists():
                raise VicunaError(
                    f"{model} is an unfinished download (it has no {MANIFEST_NAME}) and {partial} another; "
                    f"delete {quote(str(model))} and run again"
                )
            model.replace(partial)  # its files are resumed from, not fetched again
        sources = [Source("model", partial, recipe.merged)]
    else:
        sources = [resolve_source(base, "base", workdir), resolve_source(delta, "delta", workdir)]
        for source in sources:
            if source.folder.resolve() == model.resolve():
                raise VicunaError(
                    f"{model} is the {source.role} itself, where the merge would go; choose another name or --dir"
                )
        # a downloaded base or delta has a manifest too: only get's record of its inputs says a merge is done
        finished = finished and (model / RECORD_NAME).is_file()
    if finished and len(sources) == 2:
        check_record(model, merge_record(sources))
    todo = [s for s in sources if not s.done] if not finished else []

    # One disk check for everything left to do, before the first byte moves.
    from vicuna.weights.hub import (
        download,
        drop_stale_incompletes,
        not_downloaded_offline,
        offline,
        plan_download,
    )

    if todo and offline():  # each one missing said; a merged release copied in is a finished NAME
        raise VicunaError(
            "; ".join(
                not_downloaded_offline(s.repo_id, model if len(sources) == 1 else s.folder) for s in todo
            )
        )
    plans = [(source, plan_download(source.repo_id)) for source in todo]
    for source, _ in plans:  # first, as `download` does: a disk they filled has room once they are gone
        drop_stale_incompletes(source.folder)
    needed = sum(plan.missing_bytes(source.folder) for source, plan in plans)
    if (
        len(sources) == 2 and not finished
    ):  # the merged model has the delta's size (it keeps the delta's dtype)
        delta_plan = [plan for source, plan in plans if source.role == "delta"]
        if delta_plan:
            needed += sum(f.size for f in delta_plan[0].files if f.path.endswith(WEIGHT_SUFFIXES))
        else:
            needed += weight_bytes(sources[1].folder)
        staging = model.with_name(model.name + ".partial")  # an interrupted merge keeps its finished shards
        needed -= weight_bytes(staging) if staging.is_dir() else 0
    ensure_free_space(workdir, needed, f"getting {name}")

    for source, plan in plans:
        print(f"[{name}] downloading the {source.role}: {source.repo_id} -> {source.folder}", file=sys.stderr)
        download(source.repo_id, source.folder, plan=plan, bars=progress)
    if len(sources) == 1 and not finished:
        sources[0].folder.replace(model)

    if len(sources) == 2 and not finished:
        from vicuna.weights.delta import apply_delta

        print(f"[{name}] merging {sources[1].folder} into {sources[0].folder} -> {model}", file=sys.stderr)
        record = json.dumps(merge_record(sources))

        def write_record(folder: Path) -> None:  # before the rename: the model never lies there without it
            (folder / RECORD_NAME).write_text(record, encoding="utf-8")

        apply_delta(sources[0].folder, sources[1].folder, model, progress=progress, extras=write_record)

    print(f"[{name}] verifying {model}", file=sys.stderr)
    problems = verify_manifest(model, progress=progress)
    if problems:
        raise VicunaError(
            f"{model} does not match its {MANIFEST_NAME}: {'; '.join(problems)}; delete {model} and run again"
        )
    if smoke_test:
        print(f"[{name}] smoke chat: {SMOKE_QUESTION}", file=sys.stderr)
        try:
            reply, ending = smoke_chat(model, max_new_tokens=max_new_tokens, progress=progress)
        except VicunaError as err:
            if len(sources) == 1:
                raise
            raise VicunaError(
                f"{err}. The merged model stays in {model}: if the base or delta was wrong, delete it and run "
                "again with the right ones"
            ) from err
        print(f"[{name}] reply: {reply!r} (ended on {ending})", file=sys.stderr)
    # The base and delta fetched for the merge (26 GB for a 7B model) were kept without a word: a user
    # freeing disk did not know that the model no longer needs them, nor that a rerun fetches nothing again.
    fetched = [s.folder for s in sources if s.repo_id and len(sources) == 2 and s.folder.is_dir()]
    if fetched:
        from vicuna.weights.disk import size

        held = sum(p.stat().st_size for folder in fetched for p in folder.rglob("*") if p.is_file())
        print(
            f"[{name}] the downloads merged from ({size(held)}) are not needed by {model}; to free the disk, "
            f"delete {' '.join(quote(str(folder)) for folder in fetched)} (this command run again does not "
            "fetch them while the model is there)",
            file=sys.stderr,
        )
    return model


def smoke_chat(model_dir: Path, *, max_new_tokens: int = 64, progress: bool = True) -> tuple[str, str]:
    """One greedy reply in the template `vicuna chat` will use, and what ended it (EOS, or the template's stop
    text: Vicuna v0's '###', where the v1.1 prompt of old made a v0 model run on and fail the check); raise
    VicunaError when BOS/EOS are misconfigured or the reply does not end within `max_new_tokens` (FastChat's
    "never stops" problem). transformers' bar for loading the weights is drawn only with `progress` on a
    terminal: `get --no-progress` or in a log, it was drawn anyway."""
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vicuna.config import ModelSettings
    from vicuna.conversation import Message, render
    from vicuna.engine.loader import pick_template
    from vicuna.weights.manifest import redraws, transformers_bar

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    where = f"{model_dir}/tokenizer_config.json"
    if eos is None or bos is None or eos == tokenizer.unk_token_id:
        raise VicunaError(
            f"{where}: the tokenizer's BOS/EOS are {tokenizer.bos_token!r}/{tokenizer.eos_token!r} (ids {bos}/{eos}); "
            "LLaMA needs <s> (1) and </s> (2), or replies never stop"
        )
    template = pick_template(ModelSettings(model_path=str(model_dir)), tokenizer, model_dir, model_dir.name)
    prompt = render(template, [Message("user", SMOKE_QUESTION)])
    prompt_ids = tokenizer(prompt, add_special_tokens=template.add_special_tokens).input_ids
    if prompt_ids[0] != bos:
        raise VicunaError(f"{where}: the tokenizer does not start prompts with BOS {tokenizer.bos_token!r}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    _check_memory(model_dir, device)
    with transformers_bar(progress and redraws(sys.stderr)):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    model_eos = model.generation_config.eos_token_id
    model_eos = set(model_eos if isinstance(model_eos, list) else [model_eos])
    if eos not in model_eos:
        raise VicunaError(
            f"{model_dir}: the tokenizer's EOS id is {eos} but the model's eos_token_id is "
            f"{sorted(model_eos, key=str)} (config.json / generation_config.json); generation would never stop"
        )
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids], device=device),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
            **({"stop_strings": list(template.stop), "tokenizer": tokenizer} if template.stop else {}),
        )
    reply = out[0, len(prompt_ids) :].tolist()
    text = tokenizer.decode(reply, skip_special_tokens=True)
    if reply and reply[-1] == eos:
        return text.strip(), "EOS"
    for stop in template.stop:
        if stop in text:
            return text[: text.index(stop)].strip(), repr(stop)
    said = f"EOS {tokenizer.eos_token!r}" + "".join(
        f" or {stop!r}" for stop in template.stop if stop != tokenizer.eos_token
    )
    raise VicunaError(
        f"{model_dir}: the smoke chat did not end on {said} within {max_new_tokens} tokens (reply: "
        f"{text.strip()[:200]!r}); check the tokenizer and the merge (wrong base or delta?)"
    )


def _check_memory(model_dir: Path, device: str) -> None:
    """Refuse a smoke chat that cannot fit rather than get killed: 16-bit weights plus a little headroom."""
    import psutil
    import torch

    from vicuna.weights.disk import GB

    params = weight_bytes(model_dir)  # stored in 16 or 32 bits: loading in 16 bits needs at most this
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else psutil.virtual_memory().available
    if params * 1.1 > free:
        raise VicunaError(
            f"the smoke chat needs about {params * 1.1 / GB:.1f} GB of {device} memory and {free / GB:.1f} GB "
            f"is free; the model in {model_dir} is ready: re-run with --no-smoke-test to skip the chat"
        )
