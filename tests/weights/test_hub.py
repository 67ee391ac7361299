"""`vicuna download`: the file selection on fake file lists, and whole downloads from a fake Hub on 127.0.0.1
(the few API routes huggingface_hub uses), reached through HF_ENDPOINT."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest

from vicuna.cli import main
from vicuna.errors import VicunaError
from vicuna.weights.hub import select_files

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_safetensors_win_over_pickled_copies():
    files = [
        ".gitattributes",
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
        "original/consolidated.00.pth",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert select_files(files) == [
        ".gitattributes",
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]


def test_bin_only_repos_keep_their_weights():
    files = [
        "config.json",
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model.bin.index.json",
        "tokenizer.model",
    ]
    assert select_files(files) == files


def test_include_patterns():
    files = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.model", "README.md"]
    assert select_files(files, ["*.json", "tokenizer.*"]) == ["config.json", "tokenizer.model"]
    # asking for the .bin copy alone gets it: the rule only drops duplicates within the selection
    assert select_files(files, ["*.bin"]) == ["pytorch_model.bin"]
    assert select_files(files, ["*.safetensors", "*.bin"]) == ["model.safetensors"]
    assert select_files(files, ["*.gguf"]) == []


def _lfs(data: bytes) -> bool:
    return not data.startswith(b"{")  # JSON files are plain git blobs, the rest is LFS, as on the Hub


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repos = repos
        self.corrupt: set[str] = set()  # files served with wrong bytes
        self.forbidden: set[str] = set()  # files answered with a plain 403 (no Hub error code)
        self.gated: set[str] = set()  # repos whose terms the token has not accepted
        self.down: set[str] = set()  # repos answered 503 (the Hub under maintenance, a mirror's outage)
        self.stalled: set[str] = set()  # repos whose file list is not answered for 5 s, then hung up
        self.drops: dict[str, int] = {}  # file -> how many more bodies to cut short after drop_at bytes
        self.drop_at = 30_000
        self.redirects: dict[str, str] = {}  # file -> where its GET is sent (the Hub's CDN, for LFS files)
        self.ranges: list[tuple[str, str | None]] = []  # (file, Range header) of each file's GET
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def downloads(self) -> list[str]:
        return sorted(
            p.split(f"/resolve/{COMMIT}/", 1)[1] for m, p, _ in self.log if m == "GET" and "/resolve/" in p
        )


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _route(self, head: bool) -> None:
        hub: FakeHub = self.server
        path = unquote(urlsplit(self.path).path)
        hub.log.append((self.command, path, self.headers.get("Authorization")))
        parts = path.strip("/").split("/")
        api = parts[0] == "api"
        repo_id = "/".join(parts[2:4] if api else parts[0:2])
        if repo_id not in hub.repos:
            return self._send(
                404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head
            )
        if repo_id in hub.down:
            body = b'{"error": "The Hub is under maintenance.\\nTry again in a few minutes."}'
            return self._send(503, body, {"Content-Type": "application/json", "X-Request-Id": "req-1"}, head)
        if repo_id in hub.gated:
            return self._send(403, b'{"error": "Access restricted"}', {"X-Error-Code": "GatedRepo"}, head)
        files = hub.repos[repo_id]
        if api and parts[4:6] == ["revision", "nosuch"]:
            return self._send(404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"}, head)
        if api and parts[4:5] in ([], ["revision"]):  # repo_info
            body = {"id": repo_id, "sha": COMMIT, "siblings": [{"rfilename": n} for n in files]}
            return self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
        if api and parts[4:5] == ["tree"] and repo_id in hub.stalled:  # an overloaded mirror's
            time.sleep(5)
            self.close_connection = True
            return None
        if api and parts[4:5] == ["tree"]:  # list_repo_tree, recursive, one page
            entries = []
            for name, data in files.items():
                entry = {
                    "type": "file",
                    "path": name,
                    "size": len(data),
                    "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
                }
                if _lfs(data):
                    entry["lfs"] = {
                        "oid": hashlib.sha256(data).hexdigest(),
                        "size": len(data),
                        "pointerSize": 130,
                    }
                entries.append(entry)
            return self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head)
        if parts[2] == "resolve" and parts[3] == COMMIT:
            name = "/".join(parts[4:])
            data = files[name]
            etag = hashlib.sha256(data).hexdigest() if _lfs(data) else hashlib.sha1(data).hexdigest()
            if name in hub.forbidden:
                return self._send(403, b"Forbidden", {}, head)
            if name in hub.redirects:
                return self._send(302, b"", {"Location": hub.redirects[name]}, head)
            if name in hub.corrupt:
                data = bytes(len(data))
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'}
            rng = self.headers.get("Range")
            if head:
                return self._send(200, data, headers, head)
            hub.ranges.append((name, rng))
            start = int(m[1]) if (m := re.fullmatch(r"bytes=(\d+)-", rng or "")) else 0
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            if hub.drops.get(name, 0) > 0 and len(data) - start > hub.drop_at:
                hub.drops[name] -= 1
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start : start + hub.drop_at])
                self.close_connection = True  # the body ends early: a dropped connection
                return None
            return self._send(206 if start else 200, data[start:], headers)
        return self._send(404, b"{}", {}, head)

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)


REPO = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": bytes(range(256)) * 400,
    "pytorch_model.bin": b"PK" + bytes(5000),
    "tokenizer.model": b"\x0a\x0bspm" * 300,
    "sub/extra.txt": b"nested file",
}


@pytest.fixture
def hub(monkeypatch):
    # huggingface_hub reads HF_HUB_DISABLE_PROGRESS_BARS once, when imported: imported first under the "1"
    # below, it kept every later test's bars (transformers' "Loading weights") off in this process
    import huggingface_hub.constants  # noqa: F401

    srv = FakeHub({"org/tiny": dict(REPO)})
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield srv
    srv.shutdown()
    srv.server_close()


def test_download_from_hf_endpoint_fetches_only_safetensors(hub, tmp_path):
    target = tmp_path / "tiny"
    assert main(["download", "org/tiny", "--dir", str(target)]) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.model", "sub/extra.txt"):
        assert (target / name).read_bytes() == REPO[name], name
    assert not (target / "pytorch_model.bin").exists()
    assert hub.downloads() == ["config.json", "model.safetensors", "sub/extra.txt", "tokenizer.model"]
    # HF_TOKEN reached every request about the repo
    assert {auth for _, path, auth in hub.log if "org/tiny" in path} == {"Bearer hf_test_token"}

    from vicuna.weights.manifest import verify_manifest

    assert verify_manifest(target) == []

    # a second run finds everything in place and fetches nothing again
    hub.log.clear()
    assert main(["download", "org/tiny", "--dir", str(target)]) == 0
    assert hub.downloads() == []


def test_each_weight_file_is_read_once_for_its_hash(hub, tmp_path, monkeypatch):
    """The Hub's sha256 check read each weight file, then the manifest read it again for the same sha256: a
    second full read of the model (26 GB for 13B, from disk where RAM cannot cache it)."""
    from vicuna.weights import manifest

    hashed, real_sha256 = [], manifest.sha256_of
    monkeypatch.setattr(
        manifest, "sha256_of", lambda path, *a: hashed.append(path.name) or real_sha256(path, *a)
    )
    target = tmp_path / "tiny"
    assert main(["download", "org/tiny", "--dir", str(target)]) == 0
    assert hashed == ["config.json"]  # the one git blob, checked by its sha1
    assert manifest.verify_manifest(target, progress=False) == []


def test_an_interrupted_download_resumes_where_it_stopped(hub, tmp_path, monkeypatch, capsys):
    """huggingface_hub 2 downloads into a file named for its process, deleted on Ctrl-C: a rerun after an
    interruption fetched every unfinished file from its first byte, and on a flaky network a 10 GB shard
    might never be got. The bytes fetched are kept in `FILE.part` and the rerun asks for the rest."""
    from vicuna.weights import meta_download

    def ctrl_c(seconds):  # pressed while the dropped connection's retry waits
        raise KeyboardInterrupt

    hub.drops = {"model.safetensors": 1}
    target = tmp_path / "tiny"
    with monkeypatch.context() as patch:
        patch.setattr(meta_download.time, "sleep", ctrl_c)
        assert main(["download", "org/tiny", "--dir", str(target)]) == 130
    assert "interrupted; run the same command again" in capsys.readouterr().err
    assert (target / "model.safetensors.part").stat().st_size == hub.drop_at
    assert not (target / "model.safetensors").exists() and not (target / "SHA256SUMS").exists()
    hub.ranges.clear()
    assert main(["download", "org/tiny", "--dir", str(target)]) == 0
    assert ("model.safetensors", f"bytes={hub.drop_at}-") in hub.ranges
    assert "model.safetensors" not in [name for name, rng in hub.ranges if rng is None]
    assert (target / "model.safetensors").read_bytes() == REPO["model.safetensors"]
    assert not list(target.rglob("*.part"))
    from vicuna.weights.manifest import verify_manifest

    assert verify_manifest(target, progress=False) == []


def test_a_download_s_standard_output_is_the_folder_it_wrote_and_nothing_else(hub, tmp_path):
    """`folder=$(vicuna download OWNER/NAME)` in a script: the file count, a note on files deleted, went to
    standard output with the result; they are said on stderr, as the bars are."""
    import os
    import subprocess
    import sys

    target = tmp_path / "tiny"
    stale = target / ".cache" / "huggingface" / "download" / "x.incomplete"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    command = [sys.executable, "-m", "vicuna", "download", "org/tiny", "--dir", str(target)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=os.environ)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"done: {target}\n"
    assert f"org/tiny@{COMMIT[:10]}: 4 files" in done.stderr and "deleted 1 unfinished files" in done.stderr


def test_an_older_vicunas_unfinished_files_are_deleted_before_the_download(
    hub, tmp_path, monkeypatch, capsys
):
    """An older vicuna downloaded with huggingface_hub, which left a killed run's bytes in
    `.cache/huggingface/download/*.incomplete`; today's download fetches into `FILE.part` and never reads
    them. They were deleted only after a successful download, so a disk they filled was refused by the
    free-disk check ("needs ... of free disk") instead of cleaned. Now deleted first, and only they."""
    import shutil

    target = tmp_path / "tiny"
    cache = target / ".cache" / "huggingface" / "download"
    (cache / "sub").mkdir(parents=True)
    stale = [cache / "Yt3Ss1iN.a1b2c3.incomplete", cache / "sub" / "x.d4e5.incomplete"]
    for path in stale:
        path.write_bytes(b"\0" * 60_000)
    kept = [cache / "model.safetensors.metadata", target / "notes.incomplete"]
    for path in kept:
        path.write_text("mine")
    real = shutil.disk_usage

    def full(folder):  # a full disk: its only room is what the stale files held, once deleted
        return real(folder)._replace(free=sum(60_000 for path in stale if not path.exists()))

    monkeypatch.setattr(shutil, "disk_usage", full)
    assert sum(map(len, REPO.values())) - len(REPO["pytorch_model.bin"]) < 120_000  # what is fetched fits

    assert main(["download", "org/tiny", "--dir", str(target)]) == 0
    assert not any(path.exists() for path in stale)
    assert all(path.read_text() == "mine" for path in kept)
    assert (
        f"deleted 2 unfinished files of an earlier download (120.0 kB) from {target}"
        in capsys.readouterr().err
    )


def test_the_token_hf_auth_login_saved_reaches_the_files(hub, tmp_path, monkeypatch):
    """Without HF_TOKEN, the token `hf auth login` saved is sent, as huggingface_hub's own requests send it."""
    from huggingface_hub import constants

    (tmp_path / "token").write_text("hf_saved_token")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.delenv("HF_TOKEN")
    assert main(["download", "org/tiny", "--dir", str(tmp_path / "tiny")]) == 0
    assert {auth for _, path, auth in hub.log if "/resolve/" in path} == {"Bearer hf_saved_token"}


def test_a_download_into_a_log_draws_no_progress_bars(hub, tmp_path, capsys, monkeypatch):
    """`vicuna download ... > log 2>&1`: huggingface_hub's bars, each a line redrawn with carriage returns."""
    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the module, not its class tqdm
    monkeypatch.setattr(hub_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", None)  # the variable unset, as by users
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    hub_tqdm.enable_progress_bars()
    assert (
        main(["download", "org/tiny", "--dir", str(tmp_path / "tiny")]) == 0
    )  # pytest's stderr: no terminal
    err = capsys.readouterr().err
    assert "Fetching" not in err and "\r" not in err
    assert not hub_tqdm.are_progress_bars_disabled()  # as they were


def test_bars_asked_for_in_a_log_are_drawn_without_a_warning(hub, tmp_path, monkeypatch):
    """HF_HUB_DISABLE_PROGRESS_BARS=0 (bars wanted in the log): huggingface_hub warned on every download
    that it could not turn them off, with the line of its source that warned."""
    from vicuna.weights.hub import bars_shown

    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    assert bars_shown()  # pytest's stderr is no terminal: drawn because asked for
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["download", "org/tiny", "--dir", str(tmp_path / "tiny")]) == 0
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    assert not bars_shown()
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")
    assert not bars_shown()


def test_the_hash_check_s_bar_follows_the_download_s_bars_on_stderr(hub, tmp_path, capsys, monkeypatch):
    """`checking OWNER/NAME` was drawn on standard output, with HF_HUB_DISABLE_PROGRESS_BARS=1 too."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: standard output and error are terminals
    assert main(["download", "org/tiny", "--dir", str(tmp_path / "off")]) == 0  # the fixture's bars off
    out, err = capsys.readouterr()
    assert "checking org/tiny" not in out + err
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    assert main(["download", "org/tiny", "--dir", str(tmp_path / "on")]) == 0
    out, err = capsys.readouterr()
    assert "checking org/tiny" in err and "checking" not in out


def test_a_library_caller_s_load_without_progress_downloads_a_hub_model_quietly(
    hub, tiny_llama_dir, tmp_path, monkeypatch, capsys
):
    """`load_engine(..., progress=False)` with a Hub repository's id: the "downloading it from the Hugging
    Face Hub" line, the file count and the bars were said all the same."""
    from vicuna.config import ModelSettings
    from vicuna.engine.loader import load_engine, resolve_model_path
    from vicuna.weights import hub as hub_module

    monkeypatch.chdir(tmp_path)
    # not VICUNA_HOME moved, with the CPU kernel compiled into it
    monkeypatch.setattr(hub_module, "model_folder", lambda repo_id: tmp_path / repo_id.replace("/", "--"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # bars asked for
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # on a terminal, as rich sees it
    files = {p.name: p.read_bytes() for p in tiny_llama_dir.iterdir() if p.is_file()}
    hub.repos["org/tiny-llama"] = files
    engine = load_engine(ModelSettings(model_path="org/tiny-llama", device="cpu"), progress=False)
    assert engine.model_name == "org/tiny-llama" and hub.downloads() == sorted(files)
    assert capsys.readouterr() == ("", "")
    # with progress, as `vicuna chat --model-path OWNER/NAME` loads it: all of it said, on stderr
    hub.repos["org/tiny-llama-2"] = files
    assert resolve_model_path("org/tiny-llama-2") == tmp_path / "org--tiny-llama-2"
    out, err = capsys.readouterr()
    assert not out
    assert "org/tiny-llama-2: no such folder here; downloading it from the Hugging Face Hub into " in err
    assert f"org/tiny-llama-2@{COMMIT[:10]}: {len(files)} files" in err and "checking org/tiny-llama-2" in err


def test_include_and_revision(hub, tmp_path):
    target = tmp_path / "tiny"
    assert (
        main(["download", "org/tiny", "--revision", "v1", "--include", "*.json", "--dir", str(target)]) == 0
    )
    assert hub.downloads() == ["config.json"]
    assert ("GET", "/api/models/org/tiny/revision/v1", "Bearer hf_test_token") in hub.log


def test_a_gated_repository_or_a_revision_it_lacks_is_said_in_one_line(hub, tmp_path, capsys):
    """meta-llama's repositories are gated: without their terms accepted the Hub refuses the token, and the
    user is told where to accept them, not shown huggingface_hub's traceback. A --revision the repository
    lacks was said in huggingface_hub's four lines ("404 Client Error.", a blank line, the URL, "Invalid rev
    id"), without the revision asked for; it is one line that names it."""
    hub.repos["meta/gated"] = dict(REPO)
    hub.gated.add("meta/gated")
    assert main(["download", "meta/gated", "--dir", str(tmp_path / "gated")]) == 2
    err = capsys.readouterr().err
    assert f"meta/gated is gated: accept its terms on {hub.endpoint} and set HF_TOKEN" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["download", "org/tiny", "--revision", "nosuch", "--dir", str(tmp_path / "tiny")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: org/tiny has no revision 'nosuch' on {hub.endpoint}: --revision takes one of its branches, "
        "tags or commits\n"
    )
    assert not (tmp_path / "gated").exists() and not (tmp_path / "tiny").exists()


def test_hash_mismatch_deletes_the_file_and_says_so(hub, tmp_path, capsys):
    hub.corrupt = {"model.safetensors"}
    target = tmp_path / "tiny"
    assert main(["download", "org/tiny", "--dir", str(target)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "differ from the Hub's hashes" in err
    assert not (target / "model.safetensors").exists()
    hub.corrupt = set()
    assert main(["download", "org/tiny", "--dir", str(target)]) == 0  # the re-run fetches it again
    assert (target / "model.safetensors").read_bytes() == REPO["model.safetensors"]


def test_a_second_download_into_the_folder_one_is_fetching_is_refused(hub, tmp_path, capsys, monkeypatch):
    """Two downloads into one folder at once (two terminals, two first chats with the same --model-path):
    one checked the weights the other was still fetching and failed, saying they differed from the Hub's
    and had been deleted. The second is now refused, naming the folder; the first goes on."""
    target, fetching, go, results = tmp_path / "tiny", threading.Event(), threading.Event(), []
    route = HubHandler._route

    def held(handler, head):  # the first download's weights are held until the second has been tried
        if not head and handler.path.endswith("/model.safetensors"):
            fetching.set()
            go.wait(timeout=60)  # a bound for the test's failure, without the lock: the second waits here
        route(handler, head)

    monkeypatch.setattr(HubHandler, "_route", held)
    first = threading.Thread(
        target=lambda: results.append(main(["download", "org/tiny", "--dir", str(target)]))
    )
    first.start()
    try:
        assert fetching.wait(timeout=60)
        assert main(["download", "org/tiny", "--dir", str(target)]) == 2
        assert f"another vicuna job is writing {target} now" in capsys.readouterr().err
    finally:
        go.set()
        first.join()
    assert results == [0]
    from vicuna.weights.manifest import verify_manifest

    assert verify_manifest(target) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # and no lock file left beside it


def test_an_error_answer_for_a_file_is_reported_as_such(hub, tmp_path, capsys):
    hub.forbidden = {"model.safetensors"}  # e.g. a proxy or mirror that refuses the file
    assert main(["download", "org/tiny", "--dir", str(tmp_path / "tiny")]) == 2
    err = capsys.readouterr().err
    assert f"HTTP 403 for model.safetensors (org/tiny on {hub.endpoint}: a gated or private" in err
    assert "check your connection" not in err


def test_unknown_repo_and_no_matching_files(hub, tmp_path, capsys):
    assert main(["download", "org/missing", "--dir", str(tmp_path / "m")]) == 2
    assert "org/missing was not found on http://127.0.0.1" in capsys.readouterr().err
    # a name without its owner, as `ollama pull llama3` takes it: told how the Hub names models
    assert main(["download", "llama3", "--dir", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.endswith(
        f"llama3 was not found on {hub.endpoint} (a private repo needs HF_TOKEN); the Hub names a model OWNER/NAME "
        "(e.g. Qwen/Qwen2.5-7B-Instruct)\n"
    )
    assert main(["download", "org/tiny", "--include", "*.gguf", "--dir", str(tmp_path / "m")]) == 2
    assert "org/tiny has no file match *.gguf" in capsys.readouterr().err
    # the flag may come before the repo id: it takes one pattern (repeated for more), not what follows
    argv = [
        "download",
        "--include",
        "*.gguf",
        "--include",
        "*.ggml",
        "org/tiny",
        "--dir",
        str(tmp_path / "m"),
    ]
    assert main(argv) == 2
    assert "org/tiny has no file match *.gguf *.ggml" in capsys.readouterr().err


def test_unreachable_endpoint(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert main(["download", "org/tiny", "--dir", str(tmp_path / "m")]) == 2
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err


class ProxyHandler(BaseHTTPRequestHandler):
    """A proxy that wants a password the request does not carry: 407 to each CONNECT (an https endpoint)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_CONNECT(self) -> None:
        self.server.asked.append(self.path)
        self.send_response(407)
        self.send_header("Proxy-Authenticate", 'Basic realm="office"')
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def hub_session_anew():
    """huggingface_hub's HTTP client reads the proxy settings once, made on its first request of the process:
    made anew here for this test's, and again for the next test's, which has none."""
    from huggingface_hub import close_session

    close_session()
    yield
    close_session()


def test_a_proxy_s_refusal_is_said_as_the_proxy_s(hub_session_anew, monkeypatch, tmp_path, capsys):
    """Behind a proxy (HTTPS_PROXY), its '407 Proxy Authentication Required', or its port closed, was said
    as 'cannot reach https://hf-mirror.com ...': the mirror blamed, the proxy unnamed. The proxy is named,
    without the password its URL may hold. Without HF_ENDPOINT, the error says to set it to a mirror."""
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), ProxyHandler)
    proxy.asked = []
    threading.Thread(target=proxy.serve_forever, args=(0.05,), daemon=True).start()
    port = proxy.server_address[1]
    for name in ("NO_PROXY", "no_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example")
    monkeypatch.setenv("HTTPS_PROXY", f"http://bob:s3cret@127.0.0.1:{port}")
    try:
        assert main(["download", "org/tiny", "--dir", str(tmp_path / "m")]) == 2
    finally:
        proxy.shutdown()
        proxy.server_close()
    err = capsys.readouterr().err
    assert proxy.asked and set(proxy.asked) == {"hf-mirror.example:443"}
    assert err == (
        f"error: cannot reach https://hf-mirror.example for org/tiny through the proxy http://127.0.0.1:{port}: "
        "407 Proxy Authentication Required (check the network, the proxy or HF_ENDPOINT)\n"
    )
    # HF_ENDPOINT unset: huggingface.co, out of reach behind the Great Firewall, where a mirror is the way
    from huggingface_hub import constants

    monkeypatch.delenv("HF_ENDPOINT")
    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")  # as read at import without it
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # closed: huggingface.co is not looked up
    assert main(["download", "org/tiny", "--dir", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err == (
        "error: cannot reach https://huggingface.co for org/tiny through the proxy http://127.0.0.1:9: [Errno "
        "111] Connection refused (check the network and the proxy, or set HF_ENDPOINT to a mirror of the Hub)\n"
    )
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # not through the proxy: not said
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")
    assert main(["download", "org/tiny", "--dir", str(tmp_path / "m")]) == 2
    assert "proxy" not in capsys.readouterr().err


@pytest.fixture
def silent_endpoint(monkeypatch):
    """An endpoint that accepts each connection and answers nothing, as an overloaded mirror or a stuck proxy
    does; it hangs up after 5 s, so that a client without a timeout sees a dropped connection instead."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def hold(conn):
        with conn:
            stop.wait(5)

    def accept():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=hold, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
    yield listener.getsockname()[1]
    stop.set()
    listener.close()


def test_an_endpoint_that_never_answers_is_said_after_a_timeout(
    silent_endpoint, tmp_path, capsys, monkeypatch
):
    """huggingface_hub asks for the repository's revision with no timeout: a mirror or proxy that took the
    connection and never answered kept `vicuna download` (and a first `vicuna chat --model-path OWNER/NAME`)
    waiting without a word, for good."""
    from vicuna.weights import hub

    monkeypatch.setattr(hub, "HUB_TIMEOUT_S", 0.5)
    assert main(["download", "org/tiny", "--dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach http://127.0.0.1:{silent_endpoint} for org/tiny: timed out" in err


def test_a_file_list_that_never_comes_is_said_after_a_timeout(hub, tmp_path, capsys, monkeypatch):
    """The revision's request had a timeout, the file list's (huggingface_hub's list_repo_tree takes none)
    waited for as long as the mirror held the connection."""
    from vicuna.weights import hub as hub_module

    monkeypatch.setattr(hub_module, "HUB_TIMEOUT_S", 0.5)
    hub.stalled.add("org/tiny")
    assert main(["download", "org/tiny", "--dir", str(tmp_path / "m")]) == 2
    assert f"cannot reach {hub.endpoint} for org/tiny: timed out" in capsys.readouterr().err


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1, as huggingface_hub read it when imported; its cache moved to an empty folder."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


def test_offline_a_download_says_what_is_missing_and_how_to_bring_it_here(hub, offline, tmp_path, capsys):
    """HF_HUB_OFFLINE=1 (an air-gapped machine): huggingface_hub's own words were 'Cannot reach
    https://huggingface.co/api/models/...: offline mode is enabled. To disable it, please unset ...', not
    which folder lacks what, nor how to get it onto the machine. A copy the Hugging Face cache holds (where
    FastChat's --model-path OWNER/NAME put it) is named too."""
    target = tmp_path / "models" / "org--tiny"
    assert main(["download", "org/tiny", "--dir", str(target)]) == 2
    said = (
        f"error: org/tiny is not downloaded into {target}, and HF_HUB_OFFLINE is set, so nothing is fetched: "
        "where the Hub or a mirror (HF_ENDPOINT) can be reached, `vicuna download org/tiny --dir org--tiny` "
        f"fetches it; copy that folder here as {target}"
    )
    assert capsys.readouterr().err == said + "\n"
    snapshot = offline / "models--org--tiny" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (offline / "models--org--tiny" / "refs").mkdir()
    (offline / "models--org--tiny" / "refs" / "main").write_text(COMMIT)
    assert main(["download", "org/tiny", "--dir", str(target)]) == 2
    assert capsys.readouterr().err == (
        f"{said}; the Hugging Face cache holds a copy of it: --model-path {snapshot}\n"
    )
    assert hub.log == []  # nothing asked of the Hub


def test_offline_a_download_run_again_says_the_folder_holds_it(hub, tmp_path, monkeypatch, capsys):
    """`vicuna download` run again with HF_HUB_OFFLINE=1 on a folder it finished: not 'not downloaded'."""
    from huggingface_hub import constants

    target = tmp_path / "tiny"
    assert main(["download", "org/tiny", "--dir", str(target)]) == 0
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.log.clear()
    capsys.readouterr()
    assert main(["download", "org/tiny", "--dir", str(target)]) == 2
    assert capsys.readouterr().err == (
        f"error: {target} holds a download of org/tiny, and HF_HUB_OFFLINE is set, so the Hub is not asked "
        f"whether it lacks a file: `vicuna verify {target}` checks the files it has\n"
    )
    assert hub.log == []


def test_offline_a_model_copied_in_by_hand_is_used_as_it_is(hub, offline, tmp_path, monkeypatch, capsys):
    """A model folder copied (by USB) to where `--model-path OWNER/NAME` looks, without the SHA256SUMS that
    `vicuna download` writes: with HF_HUB_OFFLINE=1 it was 'Cannot reach ...: offline mode is enabled', the
    model there unused. It is used as it is; one whose download was cut short (a FILE.part) is not."""
    from vicuna.engine.loader import resolve_model_path
    from vicuna.weights import hub as hub_module

    monkeypatch.setattr(hub_module, "model_folder", lambda repo_id: tmp_path / repo_id.replace("/", "--"))
    folder = tmp_path / "org--tiny"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        (folder / name).write_bytes(REPO[name])
    assert resolve_model_path("org/tiny") == folder
    (folder / "model-2.safetensors.part").write_bytes(b"cut short")
    with pytest.raises(VicunaError, match="org/tiny is not downloaded into .*HF_HUB_OFFLINE is set"):
        resolve_model_path("org/tiny")
    assert hub.log == [] and capsys.readouterr() == ("", "")


def test_a_model_copied_in_by_hand_where_the_hub_cannot_be_reached_is_said(tmp_path, monkeypatch):
    """Without HF_HUB_OFFLINE, a model copied in without its SHA256SUMS is checked against the Hub (and only
    what it lacks fetched); where the Hub cannot be reached, the error said 'no such file or folder here' of
    a folder that holds the model, and nothing of how to use it."""
    from vicuna.engine.loader import resolve_model_path
    from vicuna.weights import hub as hub_module

    monkeypatch.setattr(hub_module, "model_folder", lambda repo_id: tmp_path / repo_id.replace("/", "--"))
    folder = tmp_path / "org--tiny"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes(REPO[name])
    with pytest.raises(VicunaError) as raised:  # HF_ENDPOINT: a closed port (conftest)
        resolve_model_path("org/tiny", progress=False)
    assert str(raised.value).endswith(
        f"Connection refused (check the network or HF_ENDPOINT); {folder} holds a copy of it, without the "
        "SHA256SUMS a download writes: with HF_HUB_OFFLINE=1 it is used as it is, unchecked"
    )


def test_a_file_host_that_cannot_be_reached_is_named_and_the_rerun_said(hub, tmp_path, monkeypatch, capsys):
    """The Hub (or a mirror) sends the weights' GET to another host, its CDN: where that one cannot be reached
    (not on a mirror's or a proxy's list), the retries said 'ConnectError: [Errno 111] Connection refused'
    of the file, without which host refused, and gave up without saying the bytes fetched are kept."""
    from vicuna.weights import meta_download

    monkeypatch.setattr(meta_download.time, "sleep", lambda seconds: None)
    hub.redirects["model.safetensors"] = "http://127.0.0.1:9/cdn/model.safetensors"
    assert main(["download", "org/tiny", "--dir", str(tmp_path / "tiny")]) == 2
    err = capsys.readouterr().err
    retry = "model.safetensors: ConnectError from 127.0.0.1:9: [Errno 111] Connection refused; retrying in"
    assert retry in " ".join(err.split())  # the retry line is rich's, wrapped at 80 columns
    assert err.endswith(
        "error: downloading model.safetensors failed 9 times in a row; last: ConnectError from 127.0.0.1:9: "
        "[Errno 111] Connection refused; what was fetched is kept: the same command goes on from there\n"
    )


def test_refuses_when_the_disk_is_too_small(hub, tmp_path, capsys, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    assert main(["download", "org/tiny", "--dir", str(tmp_path / "m")]) == 2
    assert "downloading org/tiny needs" in capsys.readouterr().err
    assert hub.downloads() == []


def test_a_part_file_of_another_revision_is_fetched_again_from_its_first_byte(hub, tmp_path):
    """A `.part` left by an interrupted download of another revision (the repository updated the file
    since) was resumed with this revision's bytes, and the file failed its hash check once whole: deleted,
    the download failed, and the rerun fetched it all again. Each `.part` records the hash of the file it is
    part of; one of another file starts again, and one of this file resumes."""
    import hashlib

    target = tmp_path / "tiny"
    target.mkdir()
    weights = REPO["model.safetensors"]
    (target / "model.safetensors.part").write_bytes(b"y" * (len(weights) // 2))
    (target / ".model.safetensors.part.hash").write_text(hashlib.sha256(b"the older revision").hexdigest())
    assert main(["download", "org/tiny", "--dir", str(target)]) == 0
    assert ("model.safetensors", None) in hub.ranges
    assert [rng for name, rng in hub.ranges if name == "model.safetensors"] == [None]
    assert (target / "model.safetensors").read_bytes() == weights
    assert not list(target.rglob("*.part")) and not list(target.rglob("*.part.hash"))


def test_a_file_of_another_revision_counts_whole_in_the_disk_check(tmp_path):
    """A file already there at another size (the repo updated it since) is fetched again whole, beside it:
    the disk check counted only the difference in size, and the download filled the disk instead."""
    from vicuna.weights.hub import Plan, RemoteFile

    plan = Plan("org/tiny", "model", "0" * 40, (RemoteFile("model.safetensors", 1000, "b" * 40, "c" * 64),))
    (tmp_path / "model.safetensors").write_bytes(b"x" * 900)  # the older revision's
    assert plan.missing_bytes(tmp_path) == 1000
    (tmp_path / "model.safetensors.part").write_bytes(b"x" * 300)  # this revision's, interrupted
    assert plan.missing_bytes(tmp_path) == 700
    (tmp_path / ".model.safetensors.part.hash").write_text("d" * 64)  # no: another revision's
    assert plan.missing_bytes(tmp_path) == 1000
    (tmp_path / ".model.safetensors.part.hash").write_text("c" * 64)  # this one's
    assert plan.missing_bytes(tmp_path) == 700
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    assert plan.missing_bytes(tmp_path) == 0


def test_a_repository_of_gguf_files_as_a_model_path_is_refused_before_any_is_fetched(
    hub, tmp_path, monkeypatch
):
    """`--model-path OWNER/NAME-GGUF` (where Ollama users find a model's GGUF files) downloaded every file
    of the repository, each the model in another quantization (tens of GB), into a folder that was then no
    model to load: 'No such file or directory: config.json'. It is refused first, saying how to fetch one."""
    from vicuna.engine.loader import resolve_model_path
    from vicuna.errors import ModelLoadError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path / "home"))
    hub.repos["org/tiny-GGUF"] = {
        "README.md": b"{}",
        "tiny-Q8_0.gguf": b"GGUF" + bytes(3_000_000),
        "tiny-Q4_K_M.gguf": b"GGUF" + bytes(2_000_000),
        "tiny-Q2_K.gguf": b"GGUF" + bytes(1_000_000),
    }
    folder = tmp_path / "home" / "models" / "org--tiny-GGUF"
    with pytest.raises(ModelLoadError) as info:
        resolve_model_path("org/tiny-GGUF")
    assert str(info.value) == (
        "org/tiny-GGUF: no such file or folder here, and from the Hub: org/tiny-GGUF holds GGUF files (3, "
        "6.0 MB in all), not an HF-format model: fetch the one to run, e.g. `vicuna download org/tiny-GGUF "
        f"--include tiny-Q4_K_M.gguf` (2.0 MB), then --model-path {folder}/tiny-Q4_K_M.gguf"
    )
    assert hub.downloads() == []
    # as said, `vicuna download` fetches that one, where the message says
    assert main(["download", "org/tiny-GGUF", "--include", "tiny-Q4_K_M.gguf"]) == 0
    assert hub.downloads() == ["tiny-Q4_K_M.gguf"]
    assert (folder / "tiny-Q4_K_M.gguf").read_bytes() == hub.repos["org/tiny-GGUF"]["tiny-Q4_K_M.gguf"]
    # named in lower case, as Qwen's own GGUF repositories name their files: still the Q4_K_M file, not the
    # smallest (q2_k, the model at its worst)
    hub.repos["org/low-GGUF"] = {name.lower(): data for name, data in hub.repos["org/tiny-GGUF"].items()}
    with pytest.raises(ModelLoadError, match=r"--include tiny-q4_k_m.gguf` \(2.0 MB\)"):
        resolve_model_path("org/low-GGUF")


def test_a_name_that_is_no_repository_id_is_said_not_a_traceback(hub, tmp_path, monkeypatch, capsys):
    """`vicuna download qwen2.5:7b`, as `ollama pull` takes a model, ended in huggingface_hub's
    HFValidationError traceback; and Ollama's hf.co/OWNER/NAME:TAG is told the repository's id."""
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path))
    assert main(["download", "qwen2.5:7b"]) == 2
    assert capsys.readouterr().err == (
        "error: qwen2.5:7b: not a Hugging Face Hub repository's id, OWNER/NAME (e.g. Qwen/Qwen2.5-7B-Instruct); "
        "a name of Ollama's library (llama3, qwen2.5:7b) is not one\n"
    )
    assert main(["download", "hf.co/org/tiny-GGUF:Q4_K_M"]) == 2
    assert capsys.readouterr().err == (
        "error: hf.co/org/tiny-GGUF:Q4_K_M: a Hugging Face Hub repository is named OWNER/NAME alone "
        "(org/tiny-GGUF), without Ollama's hf.co/ or :TAG; one GGUF file of it is fetched with `vicuna download "
        f"org/tiny-GGUF --include '*[Qq]4_[Kk]_[Mm]*.gguf'`, then run as --model-path {tmp_path}/models/org--tiny-GGUF/FILE.gguf\n"
    )
    assert hub.log == []
    # the pattern finds the file however the repository spells the tag (Qwen's own: ...-q4_k_m.gguf)
    files = [
        "qwen2.5-7b-instruct-q4_k_m.gguf",
        "Llama-3.2-1B-Instruct-Q4_K_M.gguf",
        "x-q8_0.gguf",
        "x-Q4_K_S.gguf",
    ]
    assert select_files(files, ["*[Qq]4_[Kk]_[Mm]*.gguf"]) == files[:2]


def test_another_error_answer_of_the_hub_is_said_in_one_line(hub, tmp_path, capsys):
    """An answer other than not-found, gated or a missing revision (the Hub down for maintenance, a
    mirror's 5xx) printed huggingface_hub's text: "503 Server Error: ... for url: ...", a blank line, the
    server's message, each on lines of their own. It is one line: the repository, the status, its reason
    and the server's first words."""
    hub.down.add("org/tiny")
    assert main(["download", "org/tiny", "--dir", str(tmp_path / "tiny")]) == 2
    assert capsys.readouterr().err == (
        f"error: {hub.endpoint} answered HTTP 503 Service Unavailable for org/tiny: The Hub is under "
        "maintenance.\n"
    )
    assert not (tmp_path / "tiny").exists()


def test_no_progress_draws_no_bar_on_a_terminal_and_still_counts_the_files(
    hub, tmp_path, capsys, monkeypatch
):
    """`vicuna download` had no --no-progress: its bars, the hash check's and the manifest's, were drawn on
    a terminal whatever was asked."""
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # on a terminal, as rich sees it
    assert main(["download", "org/tiny", "--dir", str(tmp_path / "tiny"), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert f"org/tiny@{COMMIT[:10]}: {len(hub.downloads())} files" in err and out.startswith("done: ")
    assert "\r" not in err and "━" not in err and "%|" not in err  # lines, not bars
    assert (tmp_path / "tiny" / "config.json").is_file()
