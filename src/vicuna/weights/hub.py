"""`vicuna download`: fetch a Hugging Face Hub repository into a plain folder, resumably, and check it.

huggingface_hub resolves the revision and lists the files (with `HF_ENDPOINT` and `HF_TOKEN`); each file is
then fetched from the Hub's `resolve` URL into `FILE.part`, resumed with HTTP Range requests after a dropped
connection or an interrupted run, and renamed once complete. We decide which files to fetch (only safetensors
when a repo also has `.bin`/`.pth` copies), refuse up front when the disk is too small, check every file
against the Hub's own hashes (sha256 for LFS files, the git blob sha1 otherwise), and write a sha256 manifest
so that `vicuna verify` can recheck the folder later.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import quote

from vicuna.errors import VicunaError

# Pickled PyTorch copies of the weights: skipped when the same selection has safetensors.
PICKLED_WEIGHTS = ("*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt")
# Ollama's names for a model of the Hub: [hf.co/]OWNER/NAME[:TAG], the tag a quantization (Q4_K_M)
OLLAMA_HUB_NAME = re.compile(r"(?:(?:hf\.co|huggingface\.co)/)?(\w[\w.-]*/\w[\w.-]*)(?::([\w.-]+))?")
# Seconds a request to the Hub may wait to connect or for its next bytes: huggingface_hub waits forever for
# an endpoint or a proxy that accepts the connection and never answers (an overloaded mirror)
HUB_TIMEOUT_S = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "repo_id", metavar="OWNER/NAME", help="the repository on the Hub, e.g. lmsys/vicuna-7b-v1.5"
    )
    parser.add_argument("--revision", help="branch, tag or commit (default: main)")
    parser.add_argument("--dir", type=Path, help="target folder (default: $VICUNA_HOME/models/OWNER--NAME)")
    parser.add_argument(
        "--include",
        action="append",  # one pattern each: a list after the flag would take the repo id written after it
        metavar="PATTERN",
        help="only files matching this glob pattern; repeat for more, e.g. --include '*.json' --include "
        "tokenizer.model",
    )
    parser.add_argument(
        "--repo-type", choices=("model", "dataset"), default="model", help="the repository's kind"
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="draw no progress bars (downloading, checking hashes, writing the manifest); the line that "
        "counts the files is still printed",
    )


def model_folder(repo_id: str) -> Path:
    """Where a Hub repository is downloaded without --dir: by `vicuna download`, and by a --model-path
    that names it."""
    from vicuna.config import vicuna_home

    return vicuna_home() / "models" / repo_id.replace("/", "--")


def ollama_hub_name(name: str) -> str | None:
    """What to type instead of `name` where it is Ollama's name for a Hub repository's model
    (`hf.co/OWNER/NAME:Q4_K_M`), which neither the Hub nor vicuna takes; None for another name."""
    named = OLLAMA_HUB_NAME.fullmatch(name)
    if not named or not (named[2] or named[0] != named[1]):
        return None
    from vicuna.shell import quote as shell_quote

    # the tag in either case: Ollama's tags are, and Qwen's own repositories name files ...-q4_k_m.gguf
    tag = "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in named[2] or "")
    pattern = f"*{tag}*.gguf" if named[2] else "FILE.gguf"
    return (
        f"a Hugging Face Hub repository is named OWNER/NAME alone ({named[1]}), without Ollama's hf.co/ or "
        f":TAG; one GGUF file of it is fetched with `vicuna download {named[1]} --include "
        f"{shell_quote(pattern)}`, then run as --model-path {model_folder(named[1])}/FILE.gguf"
    )


def download_command(folder: Path) -> str:
    """The `vicuna download` that fetches what `folder` lacks: its repo id read from the folder's name where
    that is OWNER--NAME, as `download` and `get` name the folders they download into; REPO_ID otherwise."""
    from vicuna.shell import quote as shell_quote

    owner, sep, name = Path(folder).name.partition("--")
    repo_id = f"{owner}/{name}" if sep and re.fullmatch(r"[\w.]+(-[\w.]+)*", f"{owner}-{name}") else "REPO_ID"
    command = f"vicuna download {repo_id}"
    if repo_id != "REPO_ID" and Path(folder).resolve() == model_folder(repo_id).resolve():
        return command
    return f"{command} --dir {shell_quote(str(folder))}"


def main(args: argparse.Namespace) -> int:
    target = args.dir or model_folder(args.repo_id)
    download(
        args.repo_id,
        target,
        revision=args.revision,
        include=args.include,
        repo_type=args.repo_type,
        bars=not args.no_progress,
    )
    print(f"done: {target}")
    return 0


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    blob_id: str  # git blob sha1
    sha256: str | None  # LFS files only


@dataclass(frozen=True)
class Plan:
    """What one download will fetch: the repo pinned to a commit, and the chosen files."""

    repo_id: str
    repo_type: str
    commit: str
    files: tuple[RemoteFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def missing_bytes(self, folder: Path) -> int:
        """Bytes still to fetch into `folder`: files already there at their full size count as done, and the
        `.part` of an interrupted one as far as it goes."""
        return sum(max(f.size - _part_size(folder / f.path, f), 0) for f in self.files)


def select_files(paths: list[str], include: list[str] | None = None) -> list[str]:
    """The files to fetch: those matching `include` (all without it), minus pickled weights when the
    selection also has safetensors (same weights, and loading them runs no pickle)."""
    chosen = [p for p in paths if not include or any(fnmatch(p, pattern) for pattern in include)]
    if any(p.endswith(".safetensors") for p in chosen):
        chosen = [p for p in chosen if not any(fnmatch(p, pattern) for pattern in PICKLED_WEIGHTS)]
    return chosen


def offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, as huggingface_hub read it: it then refuses
    every request to the Hub."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def not_downloaded_offline(repo_id: str, target: Path) -> str:
    """What to do where HF_HUB_OFFLINE keeps `repo_id`, which `target` lacks, from being downloaded: fetch it
    on a machine that reaches the Hub and copy the folder here. A copy transformers or huggingface-cli left in
    the Hugging Face cache (FastChat's --model-path OWNER/NAME downloads there) is named too."""
    from huggingface_hub import try_to_load_from_cache

    from vicuna.shell import quote as shell_quote

    said = (
        f"{repo_id} is not downloaded into {target}, and HF_HUB_OFFLINE is set, so nothing is fetched: where "
        f"the Hub or a mirror (HF_ENDPOINT) can be reached, `vicuna download {repo_id} --dir {shell_quote(target.name)}` "
        f"fetches it; copy that folder here as {target}"
    )
    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        said += f"; the Hugging Face cache holds a copy of it: --model-path {Path(cached).parent}"
    return said


def _hub_settings() -> dict:
    # Read at call time (huggingface_hub reads HF_ENDPOINT once, at import).
    return {"endpoint": os.environ.get("HF_ENDPOINT") or None, "token": os.environ.get("HF_TOKEN") or None}


@contextmanager
def hub_errors(repo_id: str, revision: str | None = None, target: Path | None = None) -> Iterator[None]:
    """Turn huggingface_hub's and the network's errors, as planning a download into `target` (by default
    the --model-path folder) meets them, into one-line VicunaErrors (the files' own transfer says its errors
    in `fetch_files`)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = _hub_settings()["endpoint"] or "https://huggingface.co"
    try:
        yield
    except OfflineModeIsEnabled:  # its text named the URL and said to unset the variable, not what is missing
        from vicuna.shell import quote as shell_quote
        from vicuna.weights.manifest import MANIFEST_NAME

        target = Path(target or model_folder(repo_id))
        if (target / MANIFEST_NAME).is_file():  # `vicuna download` run again: nothing to bring
            raise VicunaError(
                f"{target} holds a download of {repo_id}, and HF_HUB_OFFLINE is set, so the Hub is not asked "
                f"whether it lacks a file: `vicuna verify {shell_quote(str(target))}` checks the files it has"
            ) from None
        raise VicunaError(not_downloaded_offline(repo_id, target)) from None
    except HFValidationError:  # `vicuna download qwen2.5:7b` (Ollama's names) ended in a traceback
        raise VicunaError(
            f"{repo_id}: "
            + (
                ollama_hub_name(repo_id)
                or "not a Hugging Face Hub repository's id, OWNER/NAME (e.g. Qwen/Qwen2.5-7B-Instruct); a "
                "name of Ollama's library (llama3, qwen2.5:7b) is not one"
            )
        ) from None
    except GatedRepoError as err:
        raise VicunaError(f"{repo_id} is gated: accept its terms on {endpoint} and set HF_TOKEN") from err
    except RepositoryNotFoundError as err:
        # `vicuna download llama3`, as `ollama pull llama3`: a name of the Hub's too (an owner's alone)
        ollama = (
            "" if "/" in repo_id else "; the Hub names a model OWNER/NAME (e.g. Qwen/Qwen2.5-7B-Instruct)"
        )
        raise VicunaError(
            f"{repo_id} was not found on {endpoint} (a private repo needs HF_TOKEN){ollama}"
        ) from err
    except RevisionNotFoundError as err:  # its text: "404 Client Error.", a blank line, the URL, the server's
        raise VicunaError(
            f"{repo_id} has no revision {revision or 'main'!r} on {endpoint}: --revision takes one of its "
            "branches, tags or commits"
        ) from err
    except HfHubHTTPError as err:
        # its text runs to five lines (the status and URL, a link to MDN, a blank line, the server's own
        # message, itself often two); one line says what a user needs: which status, and the server's why
        response = err.response
        reason = getattr(response, "reason_phrase", None) or getattr(response, "reason", None) or ""
        said = (err.server_message or "").strip().split("\n")[0][:200]
        raise VicunaError(
            f"{endpoint} answered HTTP {response.status_code} {reason}".rstrip()
            + f" for {repo_id}"
            + (f": {said}" if said else "")
        ) from err
    except Exception as err:
        # huggingface_hub's HTTP client (httpx or httpx2, depending on its version) raises its own errors
        if type(err).__module__.split(".")[0] not in ("httpx", "httpx2"):
            raise
        proxy = proxy_for(endpoint)
        via = f" through the proxy {proxy}" if proxy else ""
        if _hub_settings()["endpoint"]:
            check = f"check the network{', the proxy' if proxy else ''} or HF_ENDPOINT"
        else:  # huggingface.co itself out of reach (behind the Great Firewall): a mirror is what to set
            check = f"check the network{' and the proxy' if proxy else ''}, or set HF_ENDPOINT to a mirror of the Hub"
        raise VicunaError(f"cannot reach {endpoint} for {repo_id}{via}: {err} ({check})") from err


def proxy_for(url: str) -> str | None:
    """The proxy the environment sends requests for `url` through, as httpx reads it (HTTPS_PROXY,
    HTTP_PROXY, ALL_PROXY, NO_PROXY), without the user and password it may hold; None for none. Said where
    the Hub cannot be reached: a proxy's 'Connection refused' or '407 Proxy Authentication Required' read as
    the Hub's own."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies_environment, proxy_bypass_environment

    proxies = getproxies_environment()
    parts = urlsplit(url)
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or proxy_bypass_environment(parts.hostname or "", proxies):
        return None
    named = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return f"{named.scheme}://{named.hostname}" + (f":{named.port}" if named.port else "")


def bounded(request: object) -> None:
    """A request hook for huggingface_hub's shared client: each of its requests waits HUB_TIMEOUT_S at most
    to connect or for its next bytes. It asks with no timeout (list_repo_tree takes none: the file list
    waited for as long as a mirror held the connection)."""
    request.extensions["timeout"] = dict.fromkeys(("connect", "read", "write", "pool"), HUB_TIMEOUT_S)


def plan_download(
    repo_id: str,
    *,
    revision: str | None = None,
    include: list[str] | None = None,
    repo_type: str = "model",
    target: Path | None = None,
) -> Plan:
    """Resolve the revision to a commit and choose the files, from the repo's file list (no file is fetched).
    `target`: the folder the download is for, which an error names."""
    from huggingface_hub import HfApi, get_session
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(**_hub_settings())
    hooks = get_session().event_hooks["request"]
    if bounded not in hooks:
        hooks.append(bounded)
    with hub_errors(repo_id, revision, target):
        commit = api.repo_info(repo_id, repo_type=repo_type, revision=revision).sha
        tree = [
            e
            for e in api.list_repo_tree(repo_id, recursive=True, revision=commit, repo_type=repo_type)
            if isinstance(e, RepoFile)
        ]
    by_path = {e.path: e for e in tree}
    chosen = select_files(sorted(by_path), include)
    if not chosen:
        wanted = f" match {' '.join(include)}" if include else "s"
        raise VicunaError(f"{repo_id} has no file{wanted}; it has: {', '.join(sorted(by_path)) or 'nothing'}")
    files = tuple(
        RemoteFile(p, by_path[p].size, by_path[p].blob_id, by_path[p].lfs.sha256 if by_path[p].lfs else None)
        for p in chosen
    )
    return Plan(repo_id, repo_type, commit, files)


def download(
    repo_id: str,
    target: Path,
    *,
    revision: str | None = None,
    include: list[str] | None = None,
    repo_type: str = "model",
    plan: Plan | None = None,
    wait: bool = False,
    progress: bool = True,
    bars: bool = True,
) -> Path:
    """Fetch the chosen files of `repo_id` into `target`, check their hashes, write the sha256 manifest. One
    download at a time into a folder: of two at once (two terminals, two first chats with the same
    --model-path), one checked a file the other was still fetching and failed, calling it a file that
    differs from the Hub's and was deleted. A second `vicuna download` is refused (its user ran it, and
    learns that another is running); with `wait` (a --model-path's first start, which only needs the
    model), it waits for the other and uses what it downloaded, not read again when complete; and a
    repository of GGUF files is refused before any is fetched (`refuse_gguf_files`). `progress`: the line that
    counts the files, and the bars (where `bars_shown`); off for a library's caller who asked for quiet
    (`load_engine(..., progress=False)`). `bars`: False for the bars alone (`--no-progress`, which drew them
    on a terminal). Warnings and errors are said either way."""
    from vicuna.weights.disk import ensure_free_space, one_writer, size

    plan = plan or plan_download(
        repo_id, revision=revision, include=include, repo_type=repo_type, target=Path(target)
    )
    if wait:
        refuse_gguf_files(plan, Path(target))
    target = Path(target)
    with one_writer(target, target, wait_as="downloading" if wait else None) as waited:
        if waited and downloaded(plan, target):
            return target
        drop_stale_incompletes(target)  # first: a disk they filled has room once they are gone
        ensure_free_space(target, plan.missing_bytes(target), f"downloading {repo_id}")
        if progress:
            print(
                f"{repo_id}@{plan.commit[:10]}: {len(plan.files)} files, {size(plan.total_bytes)}",
                file=sys.stderr,
            )
        bars = progress and bars and bars_shown()
        fetch_files(plan, target, bars=bars)
        checked = check_files(plan, target, bars=bars)
        from vicuna.weights.manifest import write_manifest

        # the weights' sha256 just computed: not read a second time; the rest's bar drawn as the others
        write_manifest(target, known=checked, progress=bars)
    return target


def refuse_gguf_files(plan: Plan, target: Path) -> None:
    """Refuse, as a --model-path, a repository that holds GGUF files and no config.json: each file is the
    model in one quantization (OWNER/NAME-GGUF repositories hold a dozen, tens of GB), one of which is run,
    and the folder they were all downloaded into was then no model to load ('No such file or directory:
    config.json')."""
    ggufs = [f for f in plan.files if f.path.endswith(".gguf")]
    if not ggufs or any(f.path == "config.json" for f in plan.files):
        return
    # Q4_K_M in any case: Qwen's own repositories name their files qwen2.5-7b-instruct-q4_k_m.gguf
    one = next((f for f in ggufs if "q4_k_m" in f.path.lower()), min(ggufs, key=lambda f: f.size))
    from vicuna.shell import quote as shell_quote
    from vicuna.weights.disk import size

    raise VicunaError(
        f"{plan.repo_id} holds GGUF files ({len(ggufs)}, {size(sum(f.size for f in ggufs))} in all), not an "
        f"HF-format model: fetch the one to run, e.g. `vicuna download {plan.repo_id} --include "
        f"{shell_quote(one.path)}` ({size(one.size)}), then --model-path {shell_quote(str(target / one.path))}"
    )


def downloaded(plan: Plan, target: Path) -> bool:
    """Whether `target` holds the plan's files as a finished download leaves them: each at its size, in the
    manifest written last (the weights with the Hub's sha256)."""
    from vicuna.weights.manifest import read_manifest

    try:
        listed = read_manifest(target)
    except VicunaError:  # none yet: the other download was stopped
        return False
    return all(
        _same_size(target / f.path, f.size)
        and f.path in listed
        and listed[f.path] == (f.sha256 or listed[f.path])
        for f in plan.files
    )


def drop_stale_incompletes(target: Path) -> None:
    """Delete what an older vicuna's interrupted download left in `target`: it used huggingface_hub, which
    writes each file to `.cache/huggingface/download/*.incomplete`, left for good by a kill. Today's download
    never reads them (it resumes from `FILE.part`), and they may hold gigabytes: deleted before the free-disk
    check, which refused a disk they filled (counted as space to be freed, they would still fill it while the
    download needed the room)."""
    from vicuna.weights.disk import size

    stale = list((target / ".cache" / "huggingface" / "download").rglob("*.incomplete"))
    freed = 0
    for path in stale:
        if path.is_file():
            freed += path.stat().st_size
            path.unlink()
    if freed:
        print(
            f"deleted {len(stale)} unfinished files of an earlier download ({size(freed)}) from {target}",
            file=sys.stderr,
        )


def bars_shown() -> bool:
    """Progress bars on a terminal, not in a log (each would be a line redrawn with carriage returns);
    HF_HUB_DISABLE_PROGRESS_BARS, set either way, rules."""
    setting = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    if setting is None:
        from vicuna.weights.manifest import redraws

        return redraws(sys.stderr)
    return setting.strip().lower() not in ("1", "true", "yes", "on")


def fetch_files(plan: Plan, target: Path, *, bars: bool) -> None:
    """Fetch the plan's files that `target` lacks, each into `FILE.part` resumed with HTTP Range requests and
    renamed once complete. huggingface_hub 2 downloads into a file named for the process, deleted when it is
    interrupted (Ctrl-C) or left behind for good (a kill, a power cut): a rerun fetched every unfinished file
    from its first byte, which on a flaky network a 10 GB shard might never get past. `bars`: draw them."""
    import httpx
    from huggingface_hub import get_token
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from vicuna.weights.meta_download import Fetcher

    settings = _hub_settings()
    endpoint = (settings["endpoint"] or "https://huggingface.co").rstrip("/")
    kind = "" if plan.repo_type == "model" else f"{plan.repo_type}s/"
    token = settings["token"] or get_token()  # HF_TOKEN, else the one `hf auth login` saved
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def hint(status: int, name: str) -> str:
        where = f"{plan.repo_id} on {endpoint}"
        if status in (401, 403):
            return (
                f" ({where}: a gated or private repository needs its terms accepted there and HF_TOKEN set)"
            )
        return f" (not in {where} at {plan.commit[:10]})" if status == 404 else f" ({where})"

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with (
        httpx.Client(follow_redirects=True, timeout=httpx.Timeout(HUB_TIMEOUT_S), headers=headers) as client,
        Progress(*columns, console=Console(stderr=True), disable=not bars) as shown,
    ):
        fetcher = Fetcher(client, shown, retries=8, backoff=1.0, hint=hint)
        for f in plan.files:
            path = target / f.path
            if _same_size(path, f.size):
                continue
            part, record = _part(path)
            if not _part_is_of(path, f):  # another revision's: resumed, it failed its hash check once fetched
                part.unlink(missing_ok=True)
            part.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(_hash_of(f), encoding="utf-8")
            url = f"{endpoint}/{kind}{plan.repo_id}/resolve/{plan.commit}/{quote(f.path)}"
            fetcher.fetch(url, part, f.path, f.size)
            part.replace(path)
            record.unlink(missing_ok=True)


def check_files(plan: Plan, folder: Path, *, bars: bool) -> dict[str, str]:
    """Compare each file with the Hub's hash; delete the bad ones (a re-run fetches them again) and raise.
    Returns the sha256 of the files checked by theirs (LFS files: the weights), for the manifest. Its bar is
    drawn where the download's are (`bars`), on stderr: it was drawn on standard output, bars off or on."""
    from rich.console import Console
    from rich.progress import Progress

    bad, sha256s = [], {}
    with Progress(transient=True, console=Console(stderr=True), disable=not bars) as shown:
        task = shown.add_task(f"checking {plan.repo_id}", total=plan.total_bytes)
        for f in plan.files:
            path = folder / f.path
            if not path.is_file():
                bad.append(f"{f.path} (missing)")
                continue
            if f.sha256:
                digest, expected = hashlib.sha256(), f.sha256
            else:
                digest, expected = hashlib.sha1(f"blob {path.stat().st_size}\0".encode()), f.blob_id
            with path.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
                    shown.advance(task, len(chunk))
            if digest.hexdigest() != expected:
                path.unlink()
                bad.append(f"{f.path} (hash {digest.hexdigest()[:12]}..., expected {expected[:12]}...)")
            elif f.sha256:
                sha256s[f.path] = expected
    if bad:
        raise VicunaError(
            f"{plan.repo_id}: {len(bad)} files differ from the Hub's hashes and were deleted: {'; '.join(bad)}; "
            "run the command again to download them again"
        )
    return sha256s


def _same_size(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def _part_size(path: Path, f: RemoteFile) -> int:
    """Bytes of `path` already here: all of it at its full size, else what its `.part` holds where it is of
    this revision's file (a file of another size, from another revision, is fetched again whole into the
    `.part`, beside it)."""
    if _same_size(path, f.size):
        return f.size
    part, _ = _part(path)
    return part.stat().st_size if part.is_file() and _part_is_of(path, f) else 0


def _part(path: Path) -> tuple[Path, Path]:
    """`path`'s `.part` file, and the hidden record beside it of the hash of the file it is part of."""
    return path.with_name(path.name + ".part"), path.with_name(f".{path.name}.part.hash")


def _hash_of(f: RemoteFile) -> str:
    return f.sha256 or f.blob_id


def _part_is_of(path: Path, f: RemoteFile) -> bool:
    """Whether `path`'s `.part` may be resumed as part of `f`: it records `f`'s hash, or nothing (left by a
    vicuna that recorded none, resumed as it was then). A `.part` of another revision's file, resumed, was
    completed with this one's bytes and failed its hash check only once the whole file was fetched."""
    try:
        return _part(path)[1].read_text(encoding="utf-8") == _hash_of(f)
    except FileNotFoundError:
        return True
    except (OSError, UnicodeDecodeError):
        return False
