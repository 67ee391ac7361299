"""The `vicuna` command itself: dispatch and the process settings it makes before any command runs."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import textwrap

import pytest

from vicuna.cli import SPIN_COUNT
from vicuna.fastchat_flags import UNSUPPORTED


def test_openmp_spinning_is_shortened_before_torch_loads_unless_the_user_chose():
    code = "import os, sys; from vicuna.cli import main; main(['template', 'list']); print(os.environ['GOMP_SPINCOUNT'], 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == [SPIN_COUNT, "False"]  # set, and torch not loaded before
    env["GOMP_SPINCOUNT"] = "123"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2] == "123"


def test_no_help_imports_torch_transformers_or_a_web_framework():
    """`vicuna COMMAND --help` is read in a second: `vicuna serve --help` imported FastAPI (~1 s on 2 busy
    cores) for one default. Each command's help in turn, in one fresh process: the first to bring one in
    is named."""
    code = textwrap.dedent(
        """
        import contextlib, io, sys
        from vicuna.cli import COMMANDS, main

        heavy = ("torch", "transformers", "fastapi", "starlette", "gradio", "uvicorn")
        for name in ["", *COMMANDS]:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
                main([name, "--help"] if name else ["--help"])
            print(name or "vicuna", sorted(m for m in heavy if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert [line for line in out.splitlines() if not line.endswith(" []")] == []
    assert len(out.splitlines()) > 10


def program(body: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`body`, then the `vicuna` program with `argv`, in a fresh process."""
    code = f"import sys\n{textwrap.dedent(body)}\nsys.argv = {['vicuna', *argv]!r}\nfrom vicuna.cli import run\nrun()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_program_ends_without_python_s_teardown_but_with_its_atexit_functions_and_output():
    """The teardown of an interpreter that loaded PyTorch and transformers took seconds after the command
    was done (finalizing the objects of its modules one by one): it is skipped, and what the exit owes is
    still done, the atexit functions first, then what is left of the output, with the command's status."""
    body = """
        import atexit

        class Finalized:
            def __del__(self):
                print("finalized", flush=True)

        kept = Finalized()  # a module's object: finalized only by the teardown
        atexit.register(print, "atexit ran")
        print("before", end="")  # in stdout's buffer until the exit
        """
    done = program(body, ["template", "list"])
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("beforevicuna_v1.1")
    assert done.stdout.endswith("\natexit ran\n")
    assert "finalized" not in done.stdout
    done = program(body, ["verify", "no-such-folder"])
    assert (done.returncode, done.stderr) == (2, "error: no-such-folder: no such folder\n")
    assert done.stdout == "beforeatexit ran\n"


def test_the_program_waits_for_a_thread_that_is_not_a_daemon():
    body = """
        import threading, time

        threading.Thread(target=lambda: (time.sleep(0.5), print("thread done", flush=True))).start()
        """
    done = program(body, ["template", "list"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("thread done\n")


def test_text_the_output_encoding_lacks_is_replaced_not_a_crash(tmp_path):
    # Windows writes output that goes to a file or a pipe in its ANSI code page (cp1252 in the West)
    (tmp_path / "m.json").write_text('[{"role": "user", "content": "你好"}]', encoding="utf-8")
    command = [sys.executable, "-m", "vicuna", "template", "render", "vicuna_v1.1", "--messages", "m.json"]
    env = os.environ | {"PYTHONIOENCODING": "cp1252"}
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True)
    assert (out.returncode, out.stderr) == (0, b"")
    assert out.stdout.endswith(b"USER: ?? ASSISTANT:")


def test_vicuna_without_a_command_shows_the_help_on_stderr_and_fails_as_a_usage_error():
    """A script's `vicuna $COMMAND` with the variable empty printed the help and exited 0, as if done."""
    done = subprocess.run([sys.executable, "-m", "vicuna"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("usage: vicuna ") and "chat with a model in the terminal" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "vicuna", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: vicuna ")  # asked for: a success


@pytest.mark.skipif(sys.platform == "win32", reason="Windows says a closed pipe with EINVAL, not EPIPE")
def test_output_whose_reader_has_gone_ends_the_command_quietly_as_sigpipe_does():
    """`vicuna chat | head -c 10`, `vicuna template list | head -1`: once the reader is gone, the command
    said "error: Broken pipe" and failed with 1, as if something had gone wrong; now as `yes | head -1`."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first line is written
    try:
        done = subprocess.run(
            [sys.executable, "-m", "vicuna", "template", "list"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


def test_system_errors_are_one_line_not_a_traceback(monkeypatch, capsys):
    import errno

    import vicuna.weights.convert as convert
    from vicuna.cli import main

    def read_only(args):
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out.partial")

    monkeypatch.setattr(convert, "main", read_only)
    assert main(["convert", "in", "out"]) == 1
    assert capsys.readouterr().err == "error: Read-only file system: /mnt/ro/out.partial\n"


def test_a_denied_permission_names_whose_folder_it_is_and_a_full_disk_what_is_free(
    tmp_path, monkeypatch, capsys
):
    """On a shared machine the folder that refused a write is often another user's (a team's models folder):
    the error said only "Permission denied: PATH", not whose the folder was, nor with which permissions."""
    import errno
    import shutil

    import vicuna.weights.convert as convert
    from vicuna.cli import main

    pwd = pytest.importorskip("pwd")  # Windows: no owning user to name
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o555)
    if os.geteuid() == 0:
        os.chown(shared, 65534, 65534)
    owner, me = pwd.getpwuid(shared.stat().st_uid).pw_name, pwd.getpwuid(os.geteuid()).pw_name
    failed = [OSError(errno.EACCES, "Permission denied", str(shared / "out.partial"))]

    def fails(args):
        raise failed[0]

    monkeypatch.setattr(convert, "main", fails)
    assert main(["convert", "in", "out"]) == 1
    assert capsys.readouterr().err == (
        f"error: Permission denied: {shared / 'out.partial'} ({shared} is {owner}'s, mode 0555; vicuna runs as "
        f"{me})\n"
    )
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=12_300_000))
    failed[0] = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out.partial" / "a.bin"))
    assert main(["convert", "in", "out"]) == 1
    assert capsys.readouterr().err == (
        f"error: No space left on device: {tmp_path / 'out.partial' / 'a.bin'} (12.3 MB free on its disk)\n"
    )


def test_ctrl_c_says_how_to_go_on_for_the_jobs_that_resume(monkeypatch, capsys):
    import vicuna.weights.convert as convert
    from vicuna.cli import main

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "main", interrupted)
    assert main(["convert", "in", "out"]) == 130
    assert (
        capsys.readouterr().err.strip()
        == "interrupted; run the same command again to go on from where it stopped"
    )


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM cannot be sent to a process on Windows")
@pytest.mark.parametrize("sent", ["SIGTERM", "SIGBREAK"])
def test_a_stop_signal_ends_a_command_as_ctrl_c_does_cleaning_up_and_saying_how_to_go_on(tmp_path, sent):
    """`docker stop`, `systemctl stop`, `kill` (SIGTERM): the command died at once, its `finally` blocks not
    run and nothing said (and as a container's PID 1 it did not die at all, until SIGKILL came). Windows
    sends no SIGTERM: Ctrl-Break, and the CTRL_BREAK_EVENT a script or a service wrapper stops a console
    program with, come as SIGBREAK, which ended the command at once too. Here SIGUSR1 plays SIGBREAK, which
    only Windows has (without a handler it ends the process too)."""
    cleaned = tmp_path / "cleaned"
    stand_in = "signal.SIGBREAK = signal.SIGUSR1" if sent == "SIGBREAK" else ""
    code = f"""if True:
        import os, signal, sys, time
        {stand_in}
        import vicuna.weights.convert as convert
        from vicuna.cli import main

        def converting(args):
            try:
                os.kill(os.getpid(), signal.{sent})
                time.sleep(60)
            finally:
                open({str(cleaned)!r}, "w").close()

        convert.main = converting
        sys.exit(main(["convert", "in", "out"]))
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip() == "interrupted; run the same command again to go on from where it stopped"
    assert cleaned.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM cannot be sent to a process on Windows")
def test_a_stop_signal_that_comes_while_an_object_is_collected_still_ends_the_command(tmp_path):
    """Python drops what a `__del__` raises: a SIGTERM that came while an object was collected (as during
    a GGUF conversion) was printed as 'Exception ignored in ...__del__' and the command went on."""
    cleaned = tmp_path / "cleaned"
    code = f"""if True:
        import os, signal, sys, time
        import vicuna.weights.convert as convert
        from vicuna.cli import main

        class Collected:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(100_000))  # the handler runs here, inside __del__

        def converting(args):
            try:
                Collected()
                time.sleep(60)
            finally:
                open({str(cleaned)!r}, "w").close()

        convert.main = converting
        sys.exit(main(["convert", "in", "out"]))
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip() == "interrupted; run the same command again to go on from where it stopped"
    assert cleaned.exists()


def test_every_flag_of_every_command_says_what_it_does_and_its_default():
    missing = []
    for parser in _all_parsers():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            flag = f"{parser.prog} {(action.option_strings or [action.dest])[-1]}"
            if not action.help:
                missing.append(f"{flag}: no help")
            elif action.default not in (None, False) or action.default == 0:  # 0 is a default to show
                shown = "default" in formatter._expand_help(action) or action.default is False
                missing += [] if shown else [f"{flag}: default {action.default!r} not shown"]
                if "(default: )" in formatter._expand_help(action):  # an empty default says nothing
                    missing.append(f"{flag}: default shown as nothing")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize(
    ("command", "said"),
    [
        # fastchat.serve.cli spells it with an underscore
        (
            "chat --temperature 0.7 --repetition_penalty 1.2",
            "--repetition_penalty: here it is spelled --repetition-penalty",
        ),
        # the tutorial's apply_delta, with the names FastChat's own docs use: all three at once
        (
            "delta apply --base-model-path llama-13b-hf --target-model-path vicuna-13b --delta-path vicuna-13b-delta-v1.1",
            "--base-model-path: here it is --base; --target-model-path: here it is --target; --delta-path: here "
            "it is --delta",
        ),
        (
            "serve --model lmsys/vicuna-7b-v1.5",
            "--model: here it is --model-path",
        ),  # ambiguous here, not in chat
        ("serve --model-path m --model-names vicuna-7b-v1.5", "--model-names: here it is --model-name"),
        (
            "chat --model-path m --gptq-ckpt m/4bit.pt --gptq-wbits 4 --repetition_penalty 1.2",
            f"--gptq-ckpt: {UNSUPPORTED['--gptq-ckpt']}; --repetition_penalty: here it is spelled --repetition-penalty",
        ),
        ("chat --model-path m --gpus 0,1 --num-gpus 2", "--gpus: choose the GPUs with CUDA_VISIBLE_DEVICES"),
        (
            "serve --controller-address http://localhost:21001",
            "--controller-address: vicuna has no controller",
        ),
        ("download-llama --model_size 13B --folder llama", "--model_size: here it is spelled --model-size"),
        # LitGPT's, as its users type them (a value argparse would otherwise take for train's subcommand)
        (
            "chat llama --precision bf16-true",
            "--precision: here it is --dtype (--precision bf16-true: --dtype bfloat16)",
        ),
        (
            "serve --model-path m --precision=16-true",
            "--precision: here it is --dtype (--precision 16-true: --dtype float16)",
        ),
        ("chat --model-path m --quantize bnb.nf4", "--quantize: here it is --load-8bit (int8 weights"),
        ("train --data d.json --lora --quantize bnb.nf4", "--quantize: here a 4-bit (NF4) base is --qlora"),
        ("train --data JSON --data.json_path d.json", "--data.json_path: here it is --data"),
        ("train --data d.json --train.epochs 1", "--train.epochs: here it is --epochs"),
        ("train --data d.json --optimizer.lr 2e-4", "--optimizer.lr: here it is --lr"),
        (
            "train --data d.json --train.micro_batch_size 2",
            "--train.micro_batch_size: here it is --batch-size",
        ),
        ("train --data d.json --out_dir out/lora", "--out_dir: here it is --output-dir"),
        ("lora merge --base m --adapter a --out_dir merged", "--out_dir: here it is --output"),
        ("download o/n --out_dir checkpoints/o/n", "--out_dir: here it is --dir"),
        (
            "chat --model-path m --prompt hello",
            "--prompt: the question is piped in: echo 'QUESTION' | vicuna",
        ),
        (
            "download --repo_id o/n",
            "--repo_id: the repository is named alone here: vicuna download OWNER/NAME",
        ),
        (
            "train --data d.json --lora --lora_mlp true",
            "--lora_mlp: here the layers are chosen with --lora-target",
        ),
        ("serve --model-path m --devices 2", "--devices: here it is --num-gpus"),
        ("train --data d.json --devices 2", "--devices: several GPUs train under accelerate"),
        (
            "serve --model-path m --max_new_tokens 50",
            "--max_new_tokens: each request to the API sets its own",
        ),
        ("bench latency --max-new-tokens 50", "--max-new-tokens: here it is --new-tokens"),
        (
            "serve --model-path m --temperature 0.8 --top_k 50",
            "--temperature: each request to the API sets its own",
        ),
        ("serve --model-path m --top_p 0.9", "--top_p: each request to the API sets its own"),
        ("chat --model-path m --top_k 50", "--top_k: here it is spelled --top-k"),
        ("serve --model-path m --openai_spec true", "--openai_spec: not needed; vicuna serve always serves"),
        ("chat --model-path m --compile true", "--compile: not needed"),
        # told about decoding, which training does not do
        (
            "train --data d.json --compile",
            "--compile: not supported in training: vicuna train runs the model",
        ),
        ("train inspect --data d.json --compile", "--compile: not supported in training"),
    ],
)
def test_a_fastchat_spelling_is_answered_with_what_to_type_here(command, said, capsys):
    from vicuna.cli import main

    with pytest.raises(SystemExit) as stop:
        main(command.split())
    assert stop.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"vicuna {command.split()[0]}") and f": error: {said}" in last


@pytest.mark.parametrize(
    "command",
    ["train --data d.json --temperature 0.7", "bench latency --top_p 0.9", "delta apply --max-new-tokens 5"],
)
def test_a_sampling_flag_of_a_command_that_serves_no_api_is_not_answered_with_the_api_s_requests(
    command, capsys
):
    """LitGPT's serve flags are answered with what each API request sets, and so were they where no API is
    served: `vicuna train --temperature 0.7` was told of "each request to the API"."""
    from vicuna.cli import main

    with pytest.raises(SystemExit):
        main(command.split())
    last = capsys.readouterr().err.splitlines()[-1]
    assert "unrecognized argument" in last and "API" not in last


def test_a_flag_taken_here_is_never_answered_as_fastchat_s():
    from vicuna.cli import COMMANDS, command_parser
    from vicuna.fastchat_flags import OUTPUT_FLAGS, RENAMED, advice

    # `--model` is taken by `vicuna chat` as argparse takes an abbreviation: another error is not about it
    known = set(command_parser("chat")._option_string_actions)
    assert advice(["--model", "m", "--bogus"], known) is None
    # and every flag the table points to is one that some command takes
    everywhere = set()
    for name in COMMANDS:
        parser = command_parser(name)
        everywhere |= set(parser._option_string_actions)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    everywhere |= set(sub._option_string_actions)
    assert set(RENAMED.values()) | set(OUTPUT_FLAGS) <= everywhere


def test_fastchat_s_module_as_a_command_names_the_vicuna_command(capsys):
    from vicuna.cli import main

    for typed, said in (
        ("cli", "vicuna chat"),
        ("fastchat.serve.cli", "vicuna chat"),
        ("fastchat.model.apply_delta", "vicuna delta apply"),
        ("openai_api_server", "vicuna serve (one process serves the OpenAI API and the web UI"),
    ):
        assert main([typed, "--model-path", "m"]) == 2
        assert capsys.readouterr().err.startswith(f"vicuna: error: {typed} is FastChat's; here it is {said}")


def _all_parsers():
    from vicuna.cli import COMMANDS, command_parser

    for name in COMMANDS:
        parser = command_parser(name)
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from action.choices.values()


def test_model_path_help_names_the_hub_repos_it_takes():
    """--model-path OWNER/NAME is downloaded and loaded (chat, serve, train, bench; doctor once it is
    downloaded), but every command's help said 'HF-format folder or .gguf file' only."""
    from vicuna.engine.loader import names_hub_repository

    assert names_hub_repository("lmsys/vicuna-7b-v1.5")
    helps = {
        parser.prog: parser._option_string_actions["--model-path"].help
        for parser in _all_parsers()
        if "--model-path" in parser._option_string_actions and parser.prog != "vicuna template render"
    }
    assert {"vicuna chat", "vicuna serve", "vicuna doctor", "vicuna train"} <= set(helps)
    assert all("Hub repo OWNER/NAME" in help for help in helps.values()), helps


def test_train_dtype_help_says_auto_is_float32_on_apple_s_gpu(monkeypatch):
    """`vicuna train --dtype auto` is float32 on Apple's GPU (float16 there only when asked for), while
    the help said 'bfloat16 or float16 on a GPU'."""
    import torch

    from vicuna.cli import command_parser
    from vicuna.train.trainer import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert precision("auto")[0] is torch.float32
    help = command_parser("train")._option_string_actions["--dtype"].help
    assert "on a CUDA GPU, else float32" in help


def test_model_name_help_says_a_hub_repo_is_served_by_its_id():
    """`vicuna serve --model-path lmsys/vicuna-7b-v1.5` serves it as lmsys/vicuna-7b-v1.5 (tests/engine:
    test_loader's Hub tests), while the help said the folder's name (lmsys--vicuna-7b-v1.5 there) and nothing
    of a .gguf file, served by its name without .gguf."""
    from vicuna.cli import command_parser

    help = command_parser("serve")._option_string_actions["--model-name"].help
    assert "(default: the model folder's or .gguf file's name, a Hub repo's OWNER/NAME)" in help


def test_allowed_origins_help_says_which_origins_reach_a_private_network():
    """Chrome's private network access is granted to an origin named in --allowed-origins, not to '*'
    (tests/server: test_a_public_site_allowed_by_origin_may_call_a_server_on_a_private_network); the help
    said CORS only, so a hosted front-end's user could not tell that naming its origin was the way."""
    from vicuna.cli import command_parser

    help = command_parser("serve")._option_string_actions["--allowed-origins"].help
    assert "not *" in help and "private network" in help


@pytest.mark.parametrize(
    ("typed", "fixed"),
    [
        (["--model-path", "m.gguf", "What is 2+2?"], "echo 'What is 2+2?' | vicuna chat --model-path m.gguf"),
        (["llama3", "What", "is", "2+2?"], "echo 'What is 2+2?' | vicuna chat --model-path llama3"),
        (["--model-path", "hi", "hi"], "echo hi | vicuna chat --model-path hi"),
    ],
)
def test_a_question_typed_after_the_model_as_ollama_takes_it_is_told_to_be_piped(typed, fixed, capsys):
    """`vicuna chat --model-path M "What is 2+2?"`, as `ollama run M "What is 2+2?"` takes a question, was
    told that the model is named with --model-path: `vicuna chat --model-path M --model-path 'What is 2+2?'`."""
    from vicuna.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["chat", *typed])
    assert stop.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.endswith(f": the chat reads its messages at its prompt or from a pipe (`{fixed}`)")


@pytest.mark.parametrize("command", ["chat", "serve", "doctor"])
def test_a_model_typed_as_ollama_takes_it_is_told_to_go_after_model_path(command, capsys):
    """`vicuna chat llama3`, as `ollama run llama3` takes its model, was answered 'unrecognized arguments:
    llama3' alone."""
    from vicuna.cli import main

    with pytest.raises(SystemExit) as stop:
        main([command, "qwen2.5:7b"])
    assert stop.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == (
        f"vicuna {command}: error: unrecognized argument qwen2.5:7b: the model is named with --model-path "
        f"(`vicuna {command} --model-path qwen2.5:7b`)"
    )
    with pytest.raises(SystemExit):  # a subcommand's (bench latency), among other flags: where it goes
        main(["bench", "latency", "llama3", "--new-tokens", "8"])
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith("(`vicuna bench latency --model-path llama3 --new-tokens 8`)")
    )
    with pytest.raises(SystemExit):  # a value argparse leaves over elsewhere is said as before
        main(["verify", "a", "b"])
    assert capsys.readouterr().err.splitlines()[-1] == "vicuna verify: error: unrecognized arguments: b"
    with pytest.raises(SystemExit):  # with --model-path given, a word left over is no model to move there
        main(["serve", "--model-path", "m", "8000"])
    assert capsys.readouterr().err.splitlines()[-1] == "vicuna serve: error: unrecognized arguments: 8000"


def test_ollama_s_commands_name_what_does_their_work_here(tmp_path, monkeypatch, capsys):
    from vicuna.cli import main

    monkeypatch.setenv("VICUNA_HOME", str(tmp_path))
    models = tmp_path / "models"
    for typed, said in (
        (["run", "llama3"], "run is Ollama's; here: vicuna chat --model-path MODEL (an HF-format folder"),
        (
            ["pull", "llama3"],
            f"pull is Ollama's; here: vicuna download OWNER/NAME (a Hugging Face Hub repository, into {models}/OWNER--NAME)",
        ),
        (["list"], f"list is Ollama's; here: each model downloaded or converted is a folder in {models} "),
        (["ls"], f"ls is Ollama's; here: each model downloaded or converted is a folder in {models} "),
        (
            ["rm", "llama3"],
            f"rm is Ollama's; here: delete the model's folder in {models} (a Hub repository's",
        ),
        (["ps"], "ps is Ollama's; here: a model is loaded for as long as the vicuna chat or vicuna serve"),
    ):
        assert main(typed) == 2
        assert capsys.readouterr().err.startswith(f"vicuna: error: {said}")


def test_a_flag_the_chat_lacks_after_the_model_is_not_told_to_be_piped_as_a_question(capsys):
    """`vicuna chat M --top-p-x 0.9` (a model typed as LitGPT and Ollama take it, then a flag vicuna lacks)
    was told `echo '--top-p-x 0.9' | vicuna chat --model-path M`: the flag piped to the model as a message."""
    from vicuna.cli import main

    for typed, left in (
        (["tiny", "--top-p-x", "0.9"], "tiny --top-p-x 0.9"),
        (["--model-path", "tiny", "hi", "--top-p-x"], "hi --top-p-x"),
    ):
        with pytest.raises(SystemExit) as stop:
            main(["chat", *typed])
        assert stop.value.code == 2
        assert (
            capsys.readouterr().err.splitlines()[-1] == f"vicuna chat: error: unrecognized arguments: {left}"
        )


def test_a_value_that_begins_with_dashes_is_said_to_be_missing_not_an_unknown_flag(capsys):
    """`vicuna chat --conv-system-msg --terse` (argparse takes no value that begins with '--') was told
    "unrecognized argument --terse", as if --terse were a flag mistyped; argparse's own error names the flag
    left without its value."""
    from vicuna.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["chat", "--conv-system-msg", "--terse"])
    assert stop.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == "vicuna chat: error: argument --conv-system-msg: expected one argument"


def test_a_flag_of_train_s_own_typed_after_inspect_is_not_taken_for_a_model(capsys):
    """`vicuna train inspect --data d.json --output-dir out` (train's command with inspect put in) was told
    `unrecognized argument --output-dir: the model is named with --model-path (`vicuna train inspect --data
    d.json --model-path --output-dir out`)`, a command that names --output-dir as the model."""
    from vicuna.cli import main

    for flag in (["--output-dir", "out"], ["--allow-bad", "1"]):
        with pytest.raises(SystemExit) as stop:
            main(["train", "inspect", "--data", "d.json", *flag])
        assert stop.value.code == 2
        last = capsys.readouterr().err.splitlines()[-1]
        assert last == f"vicuna train: error: unrecognized arguments: {' '.join(flag)}"


@pytest.mark.parametrize(
    "typed",
    [
        "train --model-path m --data d.json --epoch-count 2",  # 2 was taken for train's subcommand
        "lora merge --base m --adapter a --out-dir merged",  # --output was said to be missing
    ],
)
def test_a_flag_the_command_lacks_is_named_where_argparse_erred_over_its_value(typed, capsys):
    """A flag that `vicuna train` does not take, with a value, was answered "argument inspect: invalid
    choice: '2' (choose from 'inspect')": its value read as the subcommand; the flag was not named."""
    from vicuna.cli import main

    with pytest.raises(SystemExit) as stop:
        main(typed.split())
    assert stop.value.code == 2
    flag = typed.split()[-2]
    assert capsys.readouterr().err.splitlines()[-1].endswith(f": error: unrecognized argument {flag}")


def test_litgpt_s_commands_name_what_does_their_work_here(capsys):
    from vicuna.cli import main

    for typed, said in (
        (
            ["finetune_lora", "checkpoints/m"],
            "vicuna train --model-path MODEL --data FILE.json --output-dir DIR --lora",
        ),
        (["finetune", "checkpoints/m"], "vicuna train --model-path MODEL --data FILE.json --output-dir DIR"),
        (["merge_lora", "out/final"], "vicuna lora merge --adapter DIR --output MERGED"),
        (["generate", "m", "--prompt", "hi"], "echo PROMPT | vicuna chat --model-path MODEL"),
        (
            ["convert_to_litgpt", "m"],
            "no conversion needed: vicuna runs a Hugging Face-format folder as it is",
        ),
        (["evaluate", "m"], "vicuna serve --model-path MODEL, then lm_eval --model local-completions"),
    ):
        assert main(typed) == 2
        assert capsys.readouterr().err.startswith(f"vicuna: error: {typed[0]} is LitGPT's; here: {said}")


def test_a_flag_taken_for_the_longer_one_it_abbreviates_is_said_so(capsys):
    """`vicuna serve --stream true` (LitGPT's serve takes --stream) was answered "argument --stream-interval:
    invalid float value: 'true'", naming a flag that was never typed."""
    from vicuna.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["serve", "--model-path", "m", "--stream", "true"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "vicuna serve: error: argument --stream-interval: invalid float value: 'true' "
        "(--stream, as typed, is taken for --stream-interval)"
    )
    with pytest.raises(SystemExit):  # the flag as it is spelled: nothing to add
        main(["serve", "--model-path", "m", "--stream-interval=true"])
    assert capsys.readouterr().err.splitlines()[-1].endswith("invalid float value: 'true'")


@pytest.mark.parametrize(
    "typed",
    [
        "chat --model-path m --multiline true",  # was told to pipe 'true' to the model
        "train --data d.json --lora true",  # was "argument inspect: invalid choice: 'true'"
        "serve --model-path m --no-webui False",  # was "unrecognized arguments: False"
        "bench latency --no-progress true",  # a subcommand's flag
    ],
)
def test_a_value_given_to_a_flag_that_takes_none_is_said_so(typed, capsys):
    """LitGPT's flags take true or false (`--multiline true`, as jsonargparse reads them); vicuna's on/off
    flags take none, and the value was answered as a word out of place."""
    from vicuna.cli import main

    with pytest.raises(SystemExit) as stop:
        main(typed.split())
    assert stop.value.code == 2
    flag = typed.split()[-2]
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith(f": error: {flag} takes no value: typed alone it is on, left out off")
    )


def test_a_model_typed_before_train_s_flags_is_told_to_go_after_model_path(capsys):
    """`vicuna train MODEL --data d.json`, as `litgpt finetune_lora MODEL` takes its model, was answered
    "argument inspect: invalid choice: 'MODEL' (choose from inspect)": the model read as the subcommand."""
    from vicuna.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["train", "checkpoints/m", "--data", "d.json", "--lora"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "vicuna train: error: unrecognized argument checkpoints/m: the model is named with --model-path "
        "(`vicuna train --model-path checkpoints/m --data d.json --lora`)"
    )
    for typed in (["inpsect", "--data", "d.json"], ["--model-path", "m", "extra"]):  # not a model
        with pytest.raises(SystemExit):
            main(["train", *typed])
        assert "invalid choice" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("columns", [80, 40])
def test_every_help_renders_at_80_and_40_columns_without_cutting_a_word_at_its_hyphen(columns, monkeypatch):
    """argparse wrapped help after a hyphen too: `vicuna download --help` showed its default folder as
    `$VICUNA_HOME/models/OWNER--` above `NAME` at 80 columns, and at 40 the built-in model as `SmolLM2-135M-`
    above `Instruct`."""
    from vicuna.cli import build_parser

    monkeypatch.setenv("COLUMNS", str(columns))
    for parser in [build_parser(), *_all_parsers()]:
        text = parser.format_help()
        assert text.startswith(f"usage: {parser.prog}")
        cut = [line for line in text.splitlines() if re.search(r"\w-$", line)]
        assert not cut, f"{parser.prog}: {cut}"
        if parser.prog == "vicuna download":
            assert "$VICUNA_HOME/models/OWNER--NAME)" in text


def test_every_command_and_subcommand_says_what_it_does_and_names_its_values_alike():
    """`vicuna delta apply --help` (template list and render, train inspect, lora merge too) began with the
    usage and the flags: the line saying what it does was only in its parent's list. Defaults are said as
    '(default: X)', as the formatter adds them (some read '(default 8)'), and values in capitals, as in the
    usage (`vicuna download repo_id`, `vicuna get name` beside `vicuna verify DIR`)."""
    missing = []
    for parser in _all_parsers():
        missing += [] if parser.description else [f"{parser.prog}: no description"]
        formatter = parser._get_formatter()
        for action in parser._actions:
            said = formatter._expand_help(action) if action.help else ""
            if re.search(r"\(default [^:]", said):
                missing.append(f"{parser.prog} {action.dest}: {said}")
            if (
                not action.option_strings
                and action.choices is None
                and not (action.metavar or action.dest).isupper()
            ):
                missing.append(f"{parser.prog} {action.dest}: metavar {action.metavar or action.dest}")
    assert not missing, "\n".join(missing)


def test_a_value_the_help_names_by_a_letter_is_shown_by_that_letter():
    """`--top-k TOP_K  sample from the K most likely tokens`, `--save-steps SAVE_STEPS  save a checkpoint
    every N steps`: the help named a value the usage beside it did not."""
    named = []
    for parser in _all_parsers():
        for action in parser._actions:
            if action.option_strings and action.help and action.help != argparse.SUPPRESS:
                for letter in set(re.findall(r"(?<![\w-])([A-Z])(?![\w-])", action.help)) - {action.metavar}:
                    named.append(
                        f"{parser.prog} {action.option_strings[-1]}: {letter}, shown as {action.metavar}"
                    )
    assert not named, "\n".join(named)
    assert len([1 for p in _all_parsers() for a in p._actions if a.metavar == "N"]) >= 3


def test_train_help_says_what_it_needs_to_train_and_that_inspect_is_optional(capsys):
    """`vicuna train --help` showed `inspect ...` in its usage as if it were needed, and --data and
    --output-dir among the optional flags, while a run without them stops at once."""
    from vicuna.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    said = capsys.readouterr().out
    usage, flags = said.split("\n\n")[0], " ".join(said.split())
    assert " ".join(usage.split()).endswith("[--force] [inspect] ...")
    assert "--data DATA ShareGPT JSON list or OpenAI-style JSONL ({'messages': [...]});" in flags
    assert "'output'} records too; required" in flags
    assert "--output-dir OUTPUT_DIR where checkpoints and the final model go; required to train" in flags
    assert main(["train", "--data", "d.json"]) != 0
    assert capsys.readouterr().err == "error: --output-dir is required\n"
