"""`vicuna download-llama`: fetch Meta's original LLaMA checkpoint from a presigned URL, resumably.

Layout and protocol are those of Meta's download.sh (and pyllama's downloader): the URL holds a `*` that is
replaced by each file's path; `tokenizer_checklist.chk` and `MODEL/checklist.chk` list md5 sums in `md5sum`
format, MODEL being LLaMA 1's `7B` ... `65B` or LLaMA 2's `llama-2-7b` ... `llama-2-70b-chat`. Each file is
written to `NAME.part`, resumed with HTTP Range requests, checked against its md5 and only then renamed, so an
interrupted or re-run download keeps every verified byte. Each folder's `.vicuna-md5.json` notes what was
verified (here, or by `vicuna convert`), so that neither a rerun nor convert hashes those files again while
they stay unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vicuna.errors import VicunaError
from vicuna.weights.disk import ensure_free_space, one_writer, write_atomically

# Model-parallel shards of each model, by its folder under Meta's presigned URL; a URL serves one release.
LLAMA_1 = {"7B": 1, "13B": 2, "30B": 4, "65B": 8}
LLAMA_2 = {
    "llama-2-7b": 1,
    "llama-2-7b-chat": 1,
    "llama-2-13b": 2,
    "llama-2-13b-chat": 2,
    "llama-2-70b": 8,
    "llama-2-70b-chat": 8,
}
SHARDS = LLAMA_1 | LLAMA_2
# Files LLaMA 2's download.sh fetches besides the checkpoints; no checklist lists them.
LLAMA_2_TERMS = ("LICENSE", "USE_POLICY.md")
LAYOUT = f"a LLaMA 1 URL serves {', '.join(LLAMA_1)}; a LLaMA 2 URL serves {', '.join(LLAMA_2)}"
CHUNK = 1 << 20
VERIFIED_NAME = ".vicuna-md5.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", required=True, help="the presigned URL from Meta's e-mail; '*' stands for each file"
    )
    parser.add_argument(
        "--model-size",
        default="7B",
        help=f"comma-separated models of one release: LLaMA 1's {', '.join(LLAMA_1)} or LLaMA 2's "
        f"{', '.join(LLAMA_2)} (default: 7B)",
    )
    parser.add_argument("--dir", type=Path, help="target folder (default: $VICUNA_HOME/llama)")
    parser.add_argument(
        "--retries", type=int, default=8, help="retries per file after a failure (default: 8)"
    )
    parser.add_argument(
        "--backoff",
        type=float,
        default=1.0,
        help="seconds before the first retry; doubles each time (default: 1)",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not draw progress bars")


def main(args: argparse.Namespace) -> int:
    from vicuna.config import vicuna_home

    target = args.dir or vicuna_home() / "llama"
    sizes = parse_sizes(args.model_size)
    download_llama(
        args.url, sizes, target, retries=args.retries, backoff=args.backoff, progress=not args.no_progress
    )
    print(f"done: {target}")
    return 0


def parse_sizes(text: str) -> list[str]:
    """`--model-size`'s models as their folder names (any case in, Meta's spelling out)."""
    by_lower = {name.lower(): name for name in SHARDS}
    given = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in given if s.lower() not in by_lower]
    if unknown or not given:
        guesses = [f"llama-2-{s.lower()}" for s in unknown if f"llama-2-{s.lower()}" in LLAMA_2]
        hint = f" (did you mean {', '.join(guesses)}?)" if guesses else ""
        raise VicunaError(
            f"--model-size: unknown model {', '.join(unknown) or repr(text)}{hint}; expected LLaMA 1's "
            f"{', '.join(LLAMA_1)} or LLaMA 2's {', '.join(LLAMA_2)}"
        )
    sizes = list(dict.fromkeys(by_lower[s.lower()] for s in given))
    if any(s in LLAMA_1 for s in sizes) and any(s in LLAMA_2 for s in sizes):
        raise VicunaError(
            f"--model-size: {', '.join(sizes)} mixes LLaMA 1 and LLaMA 2, whose presigned URLs differ; "
            "download each release in its own run"
        )
    return sizes


def checkpoint_files(sizes: list[str]) -> list[tuple[str, str]]:
    """(file, the checklist that lists it) for every file of the chosen models, in download order."""
    files = [("tokenizer.model", "tokenizer_checklist.chk")]
    for size in sizes:
        files += [(f"{size}/params.json", f"{size}/checklist.chk")]
        files += [(f"{size}/consolidated.{i:02d}.pth", f"{size}/checklist.chk") for i in range(SHARDS[size])]
    return files


def parse_checklist(path: Path) -> dict[str, str]:
    """`md5sum` output -> {file name as written (relative to the checklist's folder): md5}."""
    sums = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        match = re.fullmatch(r"([0-9a-fA-F]{32}) [ *](.+)", line.strip())
        if not match:
            raise VicunaError(
                f"{path}, line {number}: expected '<md5>  <file>' as md5sum writes, got {line!r}"
            )
        sums[match[2].removeprefix("./")] = match[1].lower()
    return sums


def md5_of(path: Path, advance: Callable[[int], None] = lambda n: None) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            advance(len(chunk))
    return digest.hexdigest()


def md5_file(path: Path, bars) -> str:
    """md5_of with a bar of its own among `bars` (a rich Progress)."""
    task = bars.add_task(f"md5 {path.name}", total=path.stat().st_size)
    digest = md5_of(path, lambda n: bars.advance(task, n))
    bars.remove_task(task)
    return digest


def mark_verified(path: Path, md5: str) -> None:
    """Note in the folder's VERIFIED_NAME that `path`, at its present size and mtime, has md5 `md5`. The
    temporary file is this process's: download-llama and convert may both note files of one folder at once
    (a note lost that way only means hashing that file again)."""
    marker = path.parent / VERIFIED_NAME
    entries = _read_marker(marker)
    stat = path.stat()
    entries[path.name] = [md5, stat.st_size, stat.st_mtime_ns]
    write_atomically(marker, json.dumps(entries, indent=1))


def verified_md5s(folder: Path) -> dict[str, str]:
    """{file name: md5} of the files of `folder` that download-llama or convert verified and that have kept
    the size and mtime they had then: a later writer would have changed the mtime."""
    verified = {}
    for name, entry in _read_marker(Path(folder) / VERIFIED_NAME).items():
        path = Path(folder) / name
        if isinstance(entry, list) and len(entry) == 3 and path.is_file():
            stat = path.stat()
            if entry[1:] == [stat.st_size, stat.st_mtime_ns]:
                verified[name] = entry[0]
    return verified


def _read_marker(marker: Path) -> dict:
    try:
        entries = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or damaged: nothing counts as verified
        return {}
    return entries if isinstance(entries, dict) else {}


class _Retry(Exception):
    """A failure worth retrying: a dropped connection, a timeout, a 5xx answer, a short body."""


def meta_hint(status: int, name: str) -> str:
    """What an error answer from Meta's presigned URL most likely means."""
    return {
        403: " (the presigned URL has probably expired: Meta's links last 24 hours and a number of downloads; "
        "request a new one from Meta and run again with it, the files already here are kept; or there is no "
        f"{name} under this URL: {LAYOUT})",
        404: f" (there is no {name} under this URL: {LAYOUT})",
    }.get(status, "")


class Fetcher:
    """GETs files into `.part` files with resume, retrying dropped connections with exponential backoff;
    `hint(status, name)` says what an error answer means."""

    def __init__(self, client, bars, retries: int, backoff: float, hint=meta_hint) -> None:
        self.client, self.bars, self.retries, self.backoff, self.hint = client, bars, retries, backoff, hint

    @contextmanager
    def _get(self, url: str, name: str, headers: dict[str, str]) -> Iterator:
        import httpx

        try:
            with self.client.stream("GET", url, headers=headers) as response:
                if response.status_code >= 500 or response.status_code == 429:
                    raise _Retry(f"HTTP {response.status_code}")
                if response.status_code >= 400 and response.status_code != 416:
                    hint = self.hint(response.status_code, name)
                    raise VicunaError(f"the server answered HTTP {response.status_code} for {name}{hint}")
                yield response
        except httpx.TransportError as err:  # dropped connection, timeout, body shorter than Content-Length
            # which host: the Hub sends the weights' GET on to its CDN, which a mirror or proxy may not reach
            try:
                url = err.request.url
                host = f" from {url.host}" + (f":{url.port}" if url.port else "")
            except RuntimeError:  # no request: an error raised before one was made
                host = ""
            raise _Retry(f"{type(err).__name__}{host}: {err}") from err

    def _with_retries(self, name: str, attempt) -> object:
        """Run `attempt()` until it succeeds; the failure count restarts whenever an attempt made progress."""
        failures = 0
        while True:
            progressed = [False]
            try:
                return attempt(progressed)
            except _Retry as err:
                failures = 1 if progressed[0] else failures + 1
                if failures > self.retries:
                    times = "once" if failures == 1 else f"{failures} times in a row"
                    raise VicunaError(
                        f"downloading {name} failed {times}; last: {err}; what was fetched is kept: the same "
                        "command goes on from there"
                    ) from None
                delay = self.backoff * 2 ** (failures - 1)
                self.bars.console.print(f"{name}: {err}; retrying in {delay:g} s")
                time.sleep(delay)

    def remote_size(self, url: str, name: str) -> int | None:
        """The file's size from a one-byte ranged GET (presigned URLs are often signed for GET only)."""

        def attempt(_progressed):
            with self._get(url, name, {"Range": "bytes=0-0"}) as response:
                if response.status_code == 206:
                    return _range_total(response)
                length = response.headers.get("content-length", "")
                return int(length) if response.status_code == 200 and length.isdigit() else None

        return self._with_retries(name, attempt)

    def fetch(self, url: str, part: Path, name: str, total: int | None) -> None:
        """Complete `part` from the server: resume from its current size, restart when Range is ignored."""
        part.parent.mkdir(parents=True, exist_ok=True)
        task = self.bars.add_task(name, total=total)

        def attempt(progressed):
            have = part.stat().st_size if part.exists() else 0
            self.bars.update(task, completed=have)
            if have and have == total:  # complete (e.g. interrupted during its md5): nothing to ask for
                return
            with self._get(url, name, {"Range": f"bytes={have}-"} if have else {}) as response:
                # 416: nothing left after `have`, so the part is complete or longer than the file
                if response.status_code == 416:
                    if have and _range_total(response) == have:
                        return
                    part.unlink(missing_ok=True)
                    raise _Retry("the partial file is longer than the server's; starting again")
                start = have if response.status_code == 206 and _range_start(response) == have else 0
                if have and not start:
                    self.bars.console.print(f"{name}: the server ignored the range request; starting again")
                    self.bars.update(task, completed=0)
                try:
                    with part.open("r+b" if start else "wb") as f:
                        f.seek(start)
                        f.truncate()
                        for chunk in response.iter_bytes():  # as it arrives: a drop loses nothing
                            f.write(chunk)
                            progressed[0] = True
                            self.bars.advance(task, len(chunk))
                except OSError as err:  # a full disk, say: not worth a retry
                    from vicuna.weights.disk import disk_full, free_bytes, size

                    have = part.stat().st_size
                    room = (
                        f" ({size(total - have)} of it still to come, {size(free_bytes(part.parent))} free on "
                        "its disk)"
                        if disk_full(err) and total
                        else ""
                    )
                    raise VicunaError(
                        f"writing {part} failed: {err.strerror or err}{room}; the bytes written so far are "
                        "kept: free some space and run the same command again to go on"
                    ) from err
            size = part.stat().st_size
            if total is not None and size != total:
                if size > total:  # not a resumable state: start over, and count it as a failure
                    part.unlink()
                    progressed[0] = False
                raise _Retry(f"got {size} of {total} bytes")

        self._with_retries(name, attempt)
        self.bars.remove_task(task)


def _range_start(response) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("content-range", ""))
    return int(match[1]) if match else None


def _range_total(response) -> int | None:
    match = re.search(r"/(\d+)$", response.headers.get("content-range", ""))
    return int(match[1]) if match else None


def download_llama(
    url: str, sizes: list[str], target: Path, *, retries: int = 8, backoff: float = 1.0, progress: bool = True
) -> Path:
    """Download and md5-check the tokenizer and the checkpoints of `sizes` (folder names, see SHARDS) into
    `target`; skip verified files."""
    import httpx
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    if "*" not in url or not url.startswith(("http://", "https://")):
        raise VicunaError(
            f"--url must be an http(s) address with a '*' where each file's path goes, got {url!r}"
        )
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with (
        one_writer(target, target),  # two runs would write the same .part files
        httpx.Client(follow_redirects=True, timeout=httpx.Timeout(30.0)) as client,
        # on stderr, with the notes printed above them: standard output holds the result alone
        Progress(*columns, TimeRemainingColumn(), console=Console(stderr=True), disable=not progress) as bars,
    ):
        fetcher = Fetcher(client, bars, retries, backoff)
        files = checkpoint_files(sizes)

        # Checklists first: they are small, and name the md5 every other file must have.
        sums: dict[str, str] = {}
        for checklist in dict.fromkeys(chk for _, chk in files):
            path = target / checklist
            if not path.exists():
                part = _part(path)
                fetcher.fetch(url.replace("*", checklist, 1), part, checklist, None)
                try:  # an error page served with 200, or one cut short, must not be kept as the checklist
                    listed = parse_checklist(part)
                    missing = [
                        Path(n).name for n, chk in files if chk == checklist and Path(n).name not in listed
                    ]
                    if missing:  # a connection closed at a line's end, with no size to tell it by
                        raise VicunaError(
                            f"the server's {checklist} has no md5 for {', '.join(missing)} (cut short, or not "
                            "this model's): it was not kept; run the same command again"
                        )
                except VicunaError:
                    part.unlink()
                    raise
                part.replace(path)
            folder = Path(checklist).parent
            sums.update({(folder / name).as_posix(): md5 for name, md5 in parse_checklist(path).items()})
        if any(size in LLAMA_2 for size in sizes):  # small, and listed in no checklist
            for name in LLAMA_2_TERMS:
                if not (target / name).exists():
                    fetcher.fetch(url.replace("*", name, 1), _part(target / name), name, None)
                    _part(target / name).replace(target / name)

        todo = []
        for name, checklist in files:
            if name not in sums:
                raise VicunaError(
                    f"{target / checklist} has no md5 for {Path(name).name}; is it the right checklist?"
                )
            path = target / name
            # verified by an earlier run (or convert) and unchanged since: a rerun after an interrupted last
            # file read every finished one again first (26 GB for 13B) before it went on
            if verified_md5s(path.parent).get(path.name) == sums[name]:
                bars.console.print(f"{name}: verified before, skipping")
                continue
            if path.exists():
                if md5_file(path, bars) == sums[name]:
                    bars.console.print(f"{name}: verified, skipping")
                    mark_verified(path, sums[name])
                    continue
                bars.console.print(f"{name}: md5 mismatch, downloading it again")
                path.unlink()
            todo.append(name)

        totals = {name: fetcher.remote_size(url.replace("*", name, 1), name) for name in todo}
        have = {
            name: _part(target / name).stat().st_size if _part(target / name).exists() else 0 for name in todo
        }
        needed = sum(max((totals[name] or 0) - have[name], 0) for name in todo)
        ensure_free_space(target, needed, f"downloading LLaMA {', '.join(sizes)}")

        for name in todo:
            part = _part(target / name)
            for fresh in (False, True):  # a bad md5 after a resume may come from old bytes: retry once from 0
                if fresh:
                    part.unlink()
                fetcher.fetch(url.replace("*", name, 1), part, name, totals[name])
                got = md5_file(part, bars)
                if got == sums[name]:
                    break
                bars.console.print(f"{name}: md5 {got} does not match the checklist's {sums[name]}")
            else:
                part.unlink()
                raise VicunaError(
                    f"{name}: md5 {got} does not match {sums[name]} from the checklist, twice in a row; "
                    "the server sends a different file than the checklist describes"
                )
            part.replace(target / name)
            mark_verified(target / name, sums[name])
    return target


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")
