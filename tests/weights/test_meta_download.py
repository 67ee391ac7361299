"""`vicuna download-llama` against a local server (127.0.0.1) that speaks Meta's presigned-URL layout (LLaMA 1's
or LLaMA 2's), honours or ignores Range requests, and drops connections part-way through a body."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from vicuna.cli import main
from vicuna.errors import VicunaError
from vicuna.weights.meta_download import parse_checklist, parse_sizes, verified_md5s

LLAMA_2 = (("llama-2-7b-chat", 1), ("llama-2-13b", 2))


def make_release(seed: int = 0, models=(("7B", 1), ("13B", 2))) -> dict[str, bytes]:
    """Tokenizer and `models` (folder, shards; by default LLaMA 1's 7B and 13B) with checklists, filled with
    reproducible bytes; LLaMA 2's release also has its license files."""
    rnd = __import__("random").Random(seed)
    files = {"tokenizer.model": rnd.randbytes(3000)}
    files["tokenizer_checklist.chk"] = (
        f"{hashlib.md5(files['tokenizer.model']).hexdigest()}  tokenizer.model\n".encode()
    )
    if models[0][0].startswith("llama-2-"):
        files |= {"LICENSE": b"LLAMA 2 COMMUNITY LICENSE AGREEMENT\n", "USE_POLICY.md": b"# Use Policy\n"}
    for size, shards in models:
        own = {f"{size}/params.json": b'{"dim": 64, "n_layers": 2, "n_heads": 4}'}
        own.update({f"{size}/consolidated.{i:02d}.pth": rnd.randbytes(200_000 + i) for i in range(shards)})
        listed = "".join(f"{hashlib.md5(d).hexdigest()}  {Path(n).name}\n" for n, d in own.items())
        files.update(own)
        files[f"{size}/checklist.chk"] = listed.encode()
    return files


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = files
        self.honor_range = True
        self.drops: dict[str, int] = {}  # path -> how many more body responses to cut short
        self.drop_at = 50_000
        self.missing_status = 404  # S3 answers 403 for a key that a presigned URL cannot list
        self.content_range_on_416 = True  # the file's size, which not every server sends with a 416
        self.log: list[tuple[str, str | None, int]] = []  # (path, Range header, status)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/*?sig=ok"

    def gets(self, path: str) -> list[tuple[str | None, int]]:
        """The body requests for `path` (the one-byte size probes left out)."""
        return [(rng, status) for p, rng, status in self.log if p == path and rng != "bytes=0-0"]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        server: Server = self.server
        url = urlsplit(self.path)
        path = url.path.lstrip("/")
        rng = self.headers.get("Range")
        if url.query != "sig=ok":
            server.log.append((path, rng, 403))
            return self._answer(403, b"AccessDenied")
        if path not in server.files:
            server.log.append((path, rng, server.missing_status))
            return self._answer(server.missing_status, b"NoSuchKey")
        data = server.files[path]
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if not (match and server.honor_range):
            status, start, end = 200, 0, len(data) - 1
        else:
            start = int(match[1])
            end = min(int(match[2]), len(data) - 1) if match[2] else len(data) - 1
            if start >= len(data):
                server.log.append((path, rng, 416))
                size = {"Content-Range": f"bytes */{len(data)}"} if server.content_range_on_416 else {}
                return self._answer(416, b"", size)
            status = 206
        server.log.append((path, rng, status))
        body = data[start : end + 1]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if server.drops.get(path, 0) > 0 and len(body) > server.drop_at and rng != "bytes=0-0":
            server.drops[path] -= 1
            self.wfile.write(body[: server.drop_at])
            self.wfile.flush()
            self.close_connection = True  # the client sees the body end early
            return
        self.wfile.write(body)


@contextlib.contextmanager
def serving(files: dict[str, bytes]) -> Iterator[Server]:
    srv = Server(files)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def server():
    with serving(make_release()) as srv:
        yield srv


def run(server: Server, target: Path, sizes: str = "7B", *extra: str) -> int:
    argv = ["download-llama", "--url", server.url, "--model-size", sizes, "--dir", str(target)]
    return main([*argv, "--backoff", "0.01", *extra])


def assert_identical(server: Server, target: Path, sizes: tuple[str, ...]) -> None:
    wanted = {n for n in server.files if "/" not in n or n.split("/")[0] in sizes}
    got = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    assert got - {p for p in got if p.rsplit("/", 1)[-1].startswith(".")} == wanted  # no .part files left
    for name in wanted:
        assert (target / name).read_bytes() == server.files[name], name


def test_dropped_connections_resume_with_range(server, tmp_path):
    server.drops = {"13B/consolidated.01.pth": 3, "tokenizer.model": 0}
    server.drop_at = 40_000
    assert run(server, tmp_path / "llama", "7B,13B") == 0
    assert_identical(server, tmp_path / "llama", ("7B", "13B"))
    ranges = [rng for rng, _ in server.gets("13B/consolidated.01.pth")]
    # each retry asks for the bytes after the ones already on disk
    assert ranges == [None, "bytes=40000-", "bytes=80000-", "bytes=120000-"]
    assert [status for _, status in server.gets("13B/consolidated.01.pth")] == [200, 206, 206, 206]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.honor_range = False
    server.drops = {"7B/consolidated.00.pth": 1}
    assert run(server, tmp_path / "llama") == 0
    assert_identical(server, tmp_path / "llama", ("7B",))
    assert server.gets("7B/consolidated.00.pth") == [(None, 200), ("bytes=50000-", 200)]


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    target = tmp_path / "llama"
    data = server.files["7B/consolidated.00.pth"]
    (target / "7B").mkdir(parents=True)
    (target / "7B/consolidated.00.pth.part").write_bytes(data[:123_456])
    assert run(server, target) == 0
    assert_identical(server, target, ("7B",))
    assert server.gets("7B/consolidated.00.pth") == [("bytes=123456-", 206)]


def test_complete_partial_file_is_not_fetched_again(server, tmp_path):
    server.content_range_on_416 = False  # a 416 would not say that the part already has every byte
    target = tmp_path / "llama"
    (target / "7B").mkdir(parents=True)  # interrupted during the md5 check, before the rename
    (target / "7B/consolidated.00.pth.part").write_bytes(server.files["7B/consolidated.00.pth"])
    assert run(server, target) == 0
    assert_identical(server, target, ("7B",))
    assert server.gets("7B/consolidated.00.pth") == []


def test_rerun_skips_verified_files_and_redownloads_corrupt_ones(server, tmp_path):
    target = tmp_path / "llama"
    assert run(server, target) == 0
    server.log.clear()
    assert run(server, target) == 0
    assert server.log == []  # everything verified from disk, nothing fetched

    shard = target / "7B/consolidated.00.pth"
    shard.write_bytes(b"x" * 10 + shard.read_bytes()[10:])
    assert run(server, target) == 0
    assert_identical(server, target, ("7B",))
    assert server.gets("7B/consolidated.00.pth") == [(None, 200)]
    assert {p for p, _, _ in server.log} == {"7B/consolidated.00.pth"}


def test_standard_output_holds_only_the_folder_downloaded_notes_and_bars_go_to_stderr(server, tmp_path):
    """`vicuna download-llama ... | tee` or `$(...)`: the bars, and each file's "verified, skipping", were
    drawn on standard output, before the result."""
    import os
    import subprocess
    import sys

    target = tmp_path / "llama"
    assert run(server, target) == 0
    command = [sys.executable, "-m", "vicuna", "download-llama", "--url", server.url, "--dir", str(target)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=os.environ)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"done: {target}\n"
    assert "7B/consolidated.00.pth: verified before, skipping" in done.stderr


def test_a_rerun_reads_no_file_that_was_verified_and_has_not_changed(server, tmp_path, monkeypatch):
    """After an interruption in the last file, every finished one was md5-hashed again before the run went on
    (26 GB read for 13B): the files' notes in `.vicuna-md5.json` are trusted while size and mtime hold."""
    from vicuna.weights import meta_download

    target = tmp_path / "llama"
    server.drops, server.drop_at = {"13B/consolidated.01.pth": 1}, 40_000
    assert run(server, target, "7B,13B", "--retries", "0") == 2  # the last file is cut short
    hashed: list[str] = []
    real_md5 = meta_download.md5_of
    monkeypatch.setattr(
        meta_download, "md5_of", lambda path, *a: hashed.append(path.name) or real_md5(path, *a)
    )
    assert run(server, target, "7B,13B") == 0
    assert hashed == ["consolidated.01.pth.part"]  # only the file finished now
    assert_identical(server, target, ("7B", "13B"))


def test_corrupt_partial_file_is_downloaded_again_from_the_start(server, tmp_path):
    target = tmp_path / "llama"
    (target / "7B").mkdir(parents=True)
    (target / "7B/consolidated.00.pth.part").write_bytes(b"\0" * 1000)  # wrong bytes: md5 fails after resume
    assert run(server, target) == 0
    assert_identical(server, target, ("7B",))
    assert server.gets("7B/consolidated.00.pth") == [("bytes=1000-", 206), (None, 200)]


def test_md5_mismatch_from_the_server_is_an_error(server, tmp_path, capsys):
    server.files["7B/params.json"] = b'{"dim": 4096}'  # not what the checklist says
    assert run(server, tmp_path / "llama") == 2
    err = capsys.readouterr().err
    assert "7B/params.json" in err and "md5" in err and "checklist" in err
    assert not (tmp_path / "llama/7B/params.json").exists()
    assert not (tmp_path / "llama/7B/params.json.part").exists()


def test_expired_url_gives_a_clear_error(server, tmp_path, capsys):
    url = server.url.replace("sig=ok", "sig=old")
    assert main(["download-llama", "--url", url, "--dir", str(tmp_path / "llama")]) == 2
    err = capsys.readouterr().err
    assert "HTTP 403 for tokenizer_checklist.chk" in err and "expired" in err
    assert "request a new one from Meta and run again with it, the files already here are kept" in err


def test_llama_2_layout(tmp_path):
    with serving(make_release(models=LLAMA_2)) as server:
        assert run(server, tmp_path / "llama", "llama-2-7b-chat,LLaMA-2-13B") == 0
        assert_identical(server, tmp_path / "llama", ("llama-2-7b-chat", "llama-2-13b"))
        assert [rng for rng, _ in server.gets("llama-2-13b/consolidated.01.pth")] == [None]


def test_a_model_the_url_does_not_serve_names_both_layouts(tmp_path, capsys):
    with serving(make_release(models=LLAMA_2)) as server:
        server.missing_status = 403  # as S3 answers for a path that does not exist
        assert run(server, tmp_path / "llama", "13B") == 2
    err = capsys.readouterr().err
    assert "HTTP 403 for 13B/checklist.chk" in err and "expired" in err
    assert "or there is no 13B/checklist.chk under this URL" in err
    assert "a LLaMA 1 URL serves 7B, 13B, 30B, 65B; a LLaMA 2 URL serves llama-2-7b, llama-2-7b-chat" in err


def test_model_names():
    assert parse_sizes("7b, 13B,7B") == ["7B", "13B"]
    assert parse_sizes("llama-2-70B-chat,llama-2-7b") == ["llama-2-70b-chat", "llama-2-7b"]
    for text, guess in (("70B", "llama-2-70b"), ("7B-chat", "llama-2-7b-chat"), ("33B", None)):
        with pytest.raises(VicunaError, match=f"unknown model {text}") as err:
            parse_sizes(text)
        assert (
            (f"did you mean {guess}?" in str(err.value)) if guess else ("did you mean" not in str(err.value))
        )
        assert "LLaMA 2's llama-2-7b, llama-2-7b-chat, llama-2-13b" in str(err.value)
    with pytest.raises(VicunaError, match="mixes LLaMA 1 and LLaMA 2"):
        parse_sizes("7B,llama-2-7b")


def test_verified_files_are_recorded_for_convert(server, tmp_path):
    target = tmp_path / "llama"
    assert run(server, target, "13B") == 0
    sums = parse_checklist(target / "13B/checklist.chk")
    assert verified_md5s(target / "13B") == sums
    shard = target / "13B/consolidated.01.pth"
    shard.write_bytes(shard.read_bytes())  # rewritten: a new mtime
    assert verified_md5s(target / "13B") == {k: v for k, v in sums.items() if k != "consolidated.01.pth"}
    assert run(server, target, "13B") == 0  # verified again, and recorded again
    assert verified_md5s(target / "13B") == sums


def test_gives_up_after_the_retries(server, tmp_path, capsys):
    server.drops = {"7B/consolidated.00.pth": 100}
    server.drop_at = 0  # headers only, then the connection closes: no progress at all
    assert run(server, tmp_path / "llama", "7B", "--retries", "2") == 2
    assert "failed 3 times in a row" in capsys.readouterr().err
    assert len(server.gets("7B/consolidated.00.pth")) == 3


def test_gives_up_without_retries_in_plain_words(server, tmp_path, capsys):
    server.drops = {"7B/consolidated.00.pth": 100}
    server.drop_at = 0
    assert run(server, tmp_path / "llama", "7B", "--retries", "0") == 2
    assert "downloading 7B/consolidated.00.pth failed once; last:" in capsys.readouterr().err  # not "1 times"


def test_refuses_when_the_disk_is_too_small(server, tmp_path, capsys, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=100))
    assert run(server, tmp_path / "llama") == 2
    err = capsys.readouterr().err
    assert "downloading LLaMA 7B needs" in err and "B of free disk" in err
    assert server.gets("7B/consolidated.00.pth") == []


def test_disk_full_during_a_download_keeps_the_part_and_says_where(server, tmp_path, capsys, monkeypatch):
    import errno
    import pathlib

    real_open = pathlib.Path.open

    def open_on_a_filling_disk(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if path.name == "consolidated.00.pth.part":
            write, room = handle.write, [60_000]

            def write_until_full(data):
                if len(data) > room[0]:
                    raise OSError(errno.ENOSPC, "No space left on device")
                room[0] -= len(data)
                return write(data)

            handle.write = write_until_full
        return handle

    target = tmp_path / "llama"
    with monkeypatch.context() as patch:
        patch.setattr(pathlib.Path, "open", open_on_a_filling_disk)
        assert run(server, target) == 2
    err = capsys.readouterr().err
    part = target / "7B/consolidated.00.pth.part"
    kept = part.stat().st_size
    # how much more the file needs, against what is free: "free some space" said not how much
    from vicuna.weights.disk import free_bytes, size

    still = size(len(server.files["7B/consolidated.00.pth"]) - kept)
    assert f"writing {part} failed: No space left on device ({still} of it still to come, " in err
    assert f"{size(free_bytes(part.parent))} free on its disk)" in err and "run the same command again" in err
    assert 0 < kept <= 60_000
    assert run(server, target) == 0  # space freed: the run goes on from the kept bytes
    assert_identical(server, target, ("7B",))
    assert server.gets("7B/consolidated.00.pth")[-1] == (f"bytes={kept}-", 206)


def test_bad_arguments(tmp_path, capsys):
    assert main(["download-llama", "--url", "https://x/y?sig=1", "--dir", str(tmp_path)]) == 2
    assert "'*'" in capsys.readouterr().err
    assert (
        main(["download-llama", "--url", "https://x/*", "--model-size", "7B,8B", "--dir", str(tmp_path)]) == 2
    )
    assert "unknown model 8B" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_a_second_run_into_the_same_folder_is_refused(server, tmp_path, capsys):
    from vicuna.weights.disk import one_writer

    target = tmp_path / "my llama"
    with one_writer(target, target):  # as a first run, still downloading, holds it
        assert run(server, target) == 2
    assert f"another vicuna job is writing {target} now; wait for it" in capsys.readouterr().err
    assert server.log == []
    assert run(server, target) == 0  # once the first run has ended
    assert_identical(server, target, ("7B",))


def test_error_page_instead_of_a_checklist_is_not_kept(server, tmp_path, capsys):
    server.files["7B/checklist.chk"] = b"<html><body>Service Unavailable</body></html>"
    assert run(server, tmp_path / "llama") == 2
    assert "checklist.chk.part, line 1: expected '<md5>  <file>'" in capsys.readouterr().err
    assert not list((tmp_path / "llama" / "7B").iterdir())

    # one cut short at a line's end (no Content-Length to tell it by) is not kept either
    server.files["7B/checklist.chk"] = make_release()["7B/checklist.chk"].split(b"\n", 1)[0] + b"\n"
    assert run(server, tmp_path / "llama") == 2
    assert "the server's 7B/checklist.chk has no md5 for consolidated.00.pth" in capsys.readouterr().err
    assert not list((tmp_path / "llama" / "7B").iterdir())


def test_two_processes_noting_verified_files_at_once_do_not_take_each_other_s_file(tmp_path, monkeypatch):
    """download-llama and convert both note md5 checks in `.vicuna-md5.json`: written through one shared
    temporary name, the second process renamed the first's file away and the first's rename failed
    (FileNotFoundError: a traceback from download-llama)."""
    from vicuna.weights import meta_download

    for name in ("a.pth", "b.pth"):
        (tmp_path / name).write_bytes(name.encode())
    real_replace, real_getpid, meanwhile = os.replace, os.getpid, []

    def another_process_notes_b_meanwhile(src, dst):
        if not meanwhile:
            meanwhile.append(True)
            monkeypatch.setattr(os, "getpid", lambda: real_getpid() + 1)
            meta_download.mark_verified(tmp_path / "b.pth", "b" * 32)
            monkeypatch.setattr(os, "getpid", real_getpid)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", another_process_notes_b_meanwhile)
    meta_download.mark_verified(tmp_path / "a.pth", "a" * 32)
    assert verified_md5s(tmp_path)["a.pth"] == "a" * 32  # b's note may be lost: b is hashed again, no more
    assert [p.name for p in tmp_path.glob(".*")] == [".vicuna-md5.json"]
