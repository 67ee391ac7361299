"""`vicuna download`: fetch a Hugging Face Hub repository into a plain folder, resumably, and check it.

huggingface_hub does the transfer (resume of partial files, progress bars, `HF_ENDPOINT`, `HF_TOKEN`). We
decide which files to fetch (only safetensors when a repo also has `.bin`/`.pth` copies), refuse up front
when the disk is too small, check every file against the Hub's own hashes (sha256 for LFS files, the git
blob sha1 otherwise), and write a sha256 manifest so that `vicuna verify` can recheck the folder later.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from vicuna.errors import VicunaError

# Pickled PyTorch copies of the weights: skipped when the same selection has safetensors.
PICKLED_WEIGHTS = ("*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("repo_id", help="owner/name on the Hub, e.g. lmsys/vicuna-7b-v1.5")
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


def model_folder(repo_id: str) -> Path:
    """Where a Hub repository is downloaded without --dir: by `vicuna download`, and by a --model-path
    that names it."""
    from vicuna.config import vicuna_home

    return vicuna_home() / "models" / repo_id.replace("/", "--")


def main(args: argparse.Namespace) -> int:
    target = args.dir or model_folder(args.repo_id)
    download(args.repo_id, target, revision=args.revision, include=args.include, repo_type=args.repo_type)
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
        """Bytes still to fetch into `folder` (files already there at their full size count as done)."""
        return sum(f.size for f in self.files if not _same_size(folder / f.path, f.size))


def select_files(paths: list[str], include: list[str] | None = None) -> list[str]:
    """The files to fetch: those matching `include` (all without it), minus pickled weights when the
    selection also has safetensors (same weights, and loading them runs no pickle)."""
    chosen = [p for p in paths if not include or any(fnmatch(p, pattern) for pattern in include)]
    if any(p.endswith(".safetensors") for p in chosen):
        chosen = [p for p in chosen if not any(fnmatch(p, pattern) for pattern in PICKLED_WEIGHTS)]
    return chosen


def _hub_settings() -> dict:
    # Read at call time (huggingface_hub reads HF_ENDPOINT once, at import).
    return {"endpoint": os.environ.get("HF_ENDPOINT") or None, "token": os.environ.get("HF_TOKEN") or None}


@contextmanager
def hub_errors(repo_id: str) -> Iterator[None]:
    """Turn huggingface_hub's and the network's errors into one-line VicunaErrors."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = _hub_settings()["endpoint"] or "https://huggingface.co"
    try:
        yield
    except GatedRepoError as err:
        raise VicunaError(f"{repo_id} is gated: accept its terms on {endpoint} and set HF_TOKEN") from err
    except RepositoryNotFoundError as err:
        raise VicunaError(f"{repo_id} was not found on {endpoint} (a private repo needs HF_TOKEN)") from err
    except RevisionNotFoundError as err:
        raise VicunaError(f"{repo_id} has no such revision: {err}") from err
    except HfHubHTTPError as err:
        raise VicunaError(f"{endpoint} answered an error for {repo_id}: {err}") from err
    except LocalEntryNotFoundError as err:
        if isinstance(err.__cause__, HfHubHTTPError):  # huggingface_hub blames the connection for any answer
            raise VicunaError(f"{endpoint} answered an error for {repo_id}: {err.__cause__}") from err
        raise VicunaError(f"cannot download {repo_id} from {endpoint}: {err}") from err
    except Exception as err:
        # huggingface_hub's HTTP client (httpx or httpx2, depending on its version) raises its own errors
        if type(err).__module__.split(".")[0] not in ("httpx", "httpx2"):
            raise
        raise VicunaError(
            f"cannot reach {endpoint} for {repo_id}: {err} (check the network or HF_ENDPOINT)"
        ) from err


def plan_download(
    repo_id: str, *, revision: str | None = None, include: list[str] | None = None, repo_type: str = "model"
) -> Plan:
    """Resolve the revision to a commit and choose the files, from the repo's file list (no file is fetched)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(**_hub_settings())
    with hub_errors(repo_id):
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
) -> Path:
    """Fetch the chosen files of `repo_id` into `target`, check their hashes, write the sha256 manifest."""
    from huggingface_hub import snapshot_download

    from vicuna.weights.disk import ensure_free_space

    plan = plan or plan_download(repo_id, revision=revision, include=include, repo_type=repo_type)
    target = Path(target)
    ensure_free_space(target, plan.missing_bytes(target), f"downloading {repo_id}")
    print(f"{repo_id}@{plan.commit[:10]}: {len(plan.files)} files, {plan.total_bytes / 1e9:.2f} GB")
    with hub_errors(repo_id), hub_bars(sys.stderr.isatty()):
        snapshot_download(
            repo_id,
            repo_type=plan.repo_type,
            revision=plan.commit,
            local_dir=target,
            allow_patterns=[f.path for f in plan.files],
            **_hub_settings(),
        )
    checked = check_files(plan, target)
    from vicuna.weights.manifest import write_manifest

    write_manifest(target, known=checked)  # the weights' sha256 just computed: not read a second time
    return target


@contextmanager
def hub_bars(shown: bool) -> Iterator[None]:
    """huggingface_hub's bars off within unless `shown`: in a log (`docker logs`, journald) each is one line
    redrawn with carriage returns ten times a second for as long as its file takes. HF_HUB_DISABLE_PROGRESS_BARS
    set either way is left to rule: huggingface_hub warned on each download that =0 kept the bars on."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    turned_off = not (shown or "HF_HUB_DISABLE_PROGRESS_BARS" in os.environ or are_progress_bars_disabled())
    if turned_off:
        disable_progress_bars()
    try:
        yield
    finally:
        if turned_off:
            enable_progress_bars()


def check_files(plan: Plan, folder: Path) -> dict[str, str]:
    """Compare each file with the Hub's hash; delete the bad ones (a re-run fetches them again) and raise.
    Returns the sha256 of the files checked by theirs (LFS files: the weights), for the manifest."""
    from rich.progress import Progress

    bad, sha256s = [], {}
    with Progress(transient=True) as bars:
        task = bars.add_task(f"checking {plan.repo_id}", total=plan.total_bytes)
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
                    bars.advance(task, len(chunk))
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
