"""sha256 manifests: every output folder gets a `SHA256SUMS` file (the format `sha256sum -c` reads), written
last; `vicuna verify DIR` rechecks it and names each file that is missing or differs."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from vicuna.errors import VicunaError
from vicuna.weights.disk import write_atomically

MANIFEST_NAME = "SHA256SUMS"
_CHUNK = 8 << 20
# Files that change what a model loads as: weights, indexes, config and tokenizer. Others (a README, notes)
# may be added to a verified folder.
LOADED_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".json", ".model")


def redraws(stream: TextIO | None) -> bool:
    """Whether `stream` is a terminal that can redraw a line, where transformers' bars (tqdm's, redrawn with
    carriage returns) are drawn. Not a log, nor a dumb terminal (TERM=dumb: Emacs' M-x shell, in which
    Emacspeak reads out each redraw and a carriage return is shown as ^M): rich's bars draw none there either.
    Nor no stream at all: under pythonw (Windows, no console) sys.stderr is None, and a notebook's or an
    IDE's stand-in may have no isatty, or be closed; `load_engine` failed there with an AttributeError."""
    try:
        terminal = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
    except ValueError:  # closed
        return False
    return terminal and os.environ.get("TERM", "").lower() not in ("dumb", "unknown")  # as rich's


@contextmanager
def transformers_bar(shown: bool) -> Iterator[None]:
    """transformers' progress bars (its "Loading weights" bar) off within unless `shown`; as they were after."""
    from transformers.utils import logging as transformers_logging

    was = transformers_logging.is_progress_bar_enabled()
    if not shown:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            transformers_logging.enable_progress_bar()


@contextmanager
def progress_bar(
    description: str, total: int, *, enabled: bool = True, done: int = 0
) -> Iterator[Callable[[int], None]]:
    """A rich progress bar of bytes on stderr; yields `advance(n)`. With enabled=False nothing is drawn.
    `done`: what an earlier run finished, shown as done but not counted in the rate."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as bar:
        task = bar.add_task(description, total=total, completed=done)
        yield lambda n: bar.advance(task, n)


def _listed_files(folder: Path) -> list[str]:
    """Every regular file under `folder` as a relative POSIX path, except the manifest and hidden paths
    (huggingface_hub keeps its own bookkeeping under `.cache/`, which changes on its own)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            rel = (Path(root) / name).relative_to(folder).as_posix()
            if not name.startswith(".") and rel != MANIFEST_NAME:
                found.append(rel)
    return found


def sha256_of(path: Path, advance: Callable[[int], None] = lambda n: None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            advance(len(chunk))
    return digest.hexdigest()


def _check_folder(folder: Path) -> Path:
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    if not folder.is_dir() and staging.is_dir():  # `vicuna verify OUT` after an interrupted convert or merge
        raise VicunaError(unfinished_job(folder))
    if not folder.exists():  # a mistyped path was called "not a folder", as if it were a file
        raise VicunaError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise VicunaError(f"{folder} is not a folder")
    return folder


def write_manifest(folder: Path, *, progress: bool = True, known: Mapping[str, str] | None = None) -> Path:
    """Hash every file in `folder` into `folder/SHA256SUMS` (written under a temporary name, then renamed).
    `known`: digests of files already hashed (relative path: sha256 hex), which are not read again."""
    folder = _check_folder(folder)
    files = _listed_files(folder)
    known = dict(known or {})
    total = sum((folder / rel).stat().st_size for rel in files if rel not in known)
    with progress_bar(f"sha256 {folder.name}", total, enabled=progress) as advance:
        digests = {rel: known.get(rel) or sha256_of(folder / rel, advance) for rel in files}
    lines = [f"{digest}  {rel}\n" for rel, digest in digests.items()]
    write_atomically(folder / MANIFEST_NAME, "".join(lines))
    return folder / MANIFEST_NAME


def unfinished_job(folder: Path, then: str = "") -> str | None:
    """Where `folder` is made by a job cut short (a conversion, a merge, `get`'s download), which works in
    NAME.partial and renames it to NAME once complete, with the manifest written last: what to do, to finish
    it and then `then` (verify, use) the result. None where `folder` is neither NAME nor NAME.partial of one."""
    again = "run the same command (convert, delta apply, get) again to finish it"
    staging = folder.with_name(folder.name + ".partial")
    if not folder.is_dir() and staging.is_dir():
        return f"{folder} does not exist yet: {staging} holds the interrupted job that makes it; {again}"
    if folder.name.endswith(".partial") and folder.is_dir() and not (folder / MANIFEST_NAME).is_file():
        finished = folder.with_name(folder.name.removesuffix(".partial"))
        return (
            f"{folder} is an unfinished job's folder, which gets its {MANIFEST_NAME} last: {again}, then "
            f"{then} {finished}"
        )
    return None


def read_manifest(folder: Path) -> dict[str, str]:
    """The manifest of `folder` as {relative path: sha256 hex}."""
    folder = _check_folder(folder)
    manifest = folder / MANIFEST_NAME
    if said := unfinished_job(folder, "verify"):
        raise VicunaError(said)
    if not manifest.is_file():
        raise VicunaError(f"{manifest} does not exist: this folder has no sha256 manifest to check against")
    try:
        text = manifest.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise VicunaError(
            f"{manifest}: not UTF-8 text ({err}); expected lines of '<sha256>  <file>'"
        ) from None
    entries = {}
    for number, line in enumerate(text.splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not line.strip():
            continue
        if not sep or len(digest) != 64 or not rel:
            raise VicunaError(f"{manifest} line {number} is not '<sha256>  <file>': {line!r}")
        if Path(rel).is_absolute() or ".." in Path(rel).parts:  # it hashed that file, and said it changed
            raise VicunaError(f"{manifest} line {number} names a file outside {folder}: {rel!r}")
        entries[rel] = digest.lower()
    return entries


def _in_training_checkpoint(folder: Path, rel: str) -> bool:
    """Whether `rel` lies in a training run's checkpoint (`vicuna train`'s checkpoint-N, beside the model it
    wrote): a state to resume from, of its own, not a file a loader of `folder` reads."""
    top = rel.split("/")[0]
    return top != rel and (folder / top / "trainer_state.json").is_file()


def verify_manifest(folder: Path, *, progress: bool = True) -> list[str]:
    """Recheck `folder` against its manifest: one line per missing or changed file, and per file a loader
    would read that the manifest does not list (empty: all match).
    Raises VicunaError when the folder or its manifest does not exist."""
    folder = Path(folder)
    entries = read_manifest(folder)
    problems = [f"missing: {folder / rel}" for rel in entries if not (folder / rel).is_file()]
    problems += [
        f"not in the manifest: {folder / rel} (a loader would read it)"
        for rel in _listed_files(folder)
        if rel not in entries and rel.endswith(LOADED_SUFFIXES) and not _in_training_checkpoint(folder, rel)
    ]
    present = [rel for rel in entries if (folder / rel).is_file()]
    total = sum((folder / rel).stat().st_size for rel in present)
    with progress_bar(f"verify {folder.name}", total, enabled=progress) as advance:
        for rel in present:
            found = sha256_of(folder / rel, advance)
            if found != entries[rel]:
                problems.append(f"changed: {folder / rel} (sha256 {found}, manifest says {entries[rel]})")
    return problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, metavar="DIR", help=f"a folder with a {MANIFEST_NAME} manifest")
    parser.add_argument("--no-progress", action="store_true", help="do not draw progress bars")


def main(args: argparse.Namespace) -> int:
    problems = verify_manifest(args.folder, progress=not args.no_progress)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} file(s) do not match {args.folder / MANIFEST_NAME}", file=sys.stderr)
        return 1
    print(f"ok: {len(read_manifest(args.folder))} files match {args.folder / MANIFEST_NAME}")
    return 0
