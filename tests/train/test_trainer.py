"""Training on a tiny LLaMA on the CPU: the loss goes down, the result chats with its recorded template,
a resumed run ends where an uninterrupted one does, and bad spans or old GPUs stop a run early."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from vicuna.cli import main as cli
from vicuna.errors import VicunaError

DATA = [
    {
        "id": "hello",
        "conversations": [
            {"from": "human", "value": "Hello!"},
            {"from": "gpt", "value": "Hi! How are you today?"},
        ],
    },
    {
        "id": "capitals",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "The capital of France?"},
            {"from": "gpt", "value": "Paris."},
            {"from": "human", "value": "And Japan?"},
            {"from": "gpt", "value": "Tokyo."},
        ],
    },
    {
        "id": "thanks",
        "conversations": [{"from": "human", "value": "Thank you."}, {"from": "gpt", "value": "I am fine."}],
    },
    {
        "id": "world",
        "conversations": [{"from": "human", "value": "Good night."}, {"from": "gpt", "value": "Sleep well."}],
    },
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.json"
    path.write_text(json.dumps(DATA), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, data_file, tmp_path_factory) -> Path:
    """A full fine-tune through the CLI with the llama-2 template (the tiny model's default is vicuna_v1.1)."""
    out = tmp_path_factory.mktemp("run") / "out"
    args = ["train", "--model-path", str(tiny_llama_dir), "--data", str(data_file), "--output-dir", str(out)]
    args += ["--conv-template", "llama-2", "--max-steps", "60", "--lr", "3e-3", "--batch-size", "4"]
    assert cli([*args, "--warmup-ratio", "0", "--save-steps", "30", "--logging-steps", "20"]) == 0
    return out


def masked_loss(model_dir: Path, template_name: str) -> float:
    """Mean cross-entropy over the loss tokens of DATA, computed here without the trainer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vicuna.conversation import get_template
    from vicuna.train.data import Conversation, Encoder, parse_record

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    encoder = Encoder(tokenizer, get_template(template_name))
    losses = []
    for i, record in enumerate(DATA):
        conv: Conversation = parse_record(record, f"data[{i}]")
        ids, labels = encoder.encode(conv.messages)
        with torch.no_grad():
            losses.append(model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item())
    return sum(losses) / len(losses)


def test_loss_goes_down_and_the_trained_folder_chats(trained, tiny_llama_dir):
    from vicuna.config import ModelSettings, SamplingParams
    from vicuna.conversation import Message
    from vicuna.engine.events import Finished, TextChunk
    from vicuna.engine.loader import load_engine

    before, after = masked_loss(tiny_llama_dir, "llama-2"), masked_loss(trained, "llama-2")
    assert after < 0.3 * before, (before, after)

    assert json.loads((trained / "vicuna.json").read_text()) == {"conv_template": "llama-2"}
    assert (trained / "checkpoint-60" / "trainer_state.json").is_file()
    # the model has its manifest (the checkpoints beside it are not a loader's files)
    assert cli(["verify", str(trained), "--no-progress"]) == 0
    engine = load_engine(ModelSettings(model_path=str(trained), device="cpu"), progress=False)
    assert engine.template.name == "llama-2"  # the recorded template, not the name-based default
    events = list(engine.chat([Message("user", "Hello!")], SamplingParams(temperature=0, max_new_tokens=20)))
    reply = "".join(e.text for e in events if isinstance(e, TextChunk))
    assert reply.strip() == "Hi! How are you today?"
    assert isinstance(events[-1], Finished) and events[-1].reason == "stop"


def chat_template_model(tiny_llama_dir: Path, dest: Path, template: str) -> Path:
    from transformers import AutoTokenizer

    shutil.copytree(tiny_llama_dir, dest)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(dest)
    return dest


# user and assistant texts run together: a reply that continues the user's word has no token boundary
GLUED = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"


def test_allow_bad_leaves_out_records_that_begin_with_a_reply_as_fastchat_s_data_has_them(
    tiny_llama_dir, tmp_path, monkeypatch, capsys
):
    """ShareGPT exports hold conversations whose first turn is the model's (FastChat dropped that turn
    without a word): --allow-bad, 'train even if up to N examples are bad', was no help with them."""
    import vicuna.train.trainer as trainer

    leading_reply = {"id": "late", "conversations": [{"from": "gpt", "value": "Welcome back."}]}
    leading_reply["conversations"] += DATA[0]["conversations"]
    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps([*DATA, leading_reply, {"id": "none", "conversations": []}]), encoding="utf-8")
    out = tmp_path / "out"
    args = ["train", "--model-path", str(tiny_llama_dir), "--data", str(data), "--output-dir", str(out)]

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was loaded although the data was bad")

    monkeypatch.setattr(trainer, "load_model", no_model)
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert f"{data}[4] (id 'late').conversations[0].from: expected 'human', got 'gpt'" in err
    assert f"1 more of the 6 records are bad: {data}[5]" in err and "pass --allow-bad N" in err
    assert cli([*args, "--allow-bad", "1"]) == 2
    assert "2 records are bad, more than --allow-bad 1: " in capsys.readouterr().err
    assert not out.exists()

    monkeypatch.undo()
    assert cli([*args, "--allow-bad", "2", "--max-steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"{data}: 4 examples," in printed and "2 bad records left out (--allow-bad)" in printed


def test_inspect_refusing_bad_records_says_the_flag_is_train_s(tiny_llama_dir, tmp_path, capsys):
    """`train inspect` was told to "pass --allow-bad N", which it does not take."""
    leading_reply = {"id": "late", "conversations": [{"from": "gpt", "value": "Welcome back."}]}
    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps([*DATA, leading_reply]), encoding="utf-8")
    assert cli(["train", "inspect", "--model-path", str(tiny_llama_dir), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"{data}[4] (id 'late').conversations[0].from: expected 'human', got 'gpt'" in err
    assert "`vicuna train --allow-bad N` trains without up to N bad records" in err
    assert "pass --allow-bad" not in err


def test_bad_records_left_out_count_against_allow_bad_with_the_bad_examples(tmp_path):
    from vicuna.train.data import Prepared

    prepared = Prepared(max_length=64, bad=[("data.json[3]", "no token boundary")])
    prepared.bad_records = [("data.json[1]", "expected 'human', got 'gpt'")]
    prepared.check_bad(2)
    # "(allowed: 0)" alone did not say where --allow-bad 1 had gone
    allowed = r"\(allowed: 0: --allow-bad 1 less the 1 bad record\(s\) left out\)"
    with pytest.raises(VicunaError, match=rf"1 example\(s\) .*{allowed}; the first is data.json\[3\]"):
        prepared.check_bad(1)


def test_unlocatable_spans_stop_the_run_before_training(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import vicuna.train.trainer as trainer

    model = chat_template_model(tiny_llama_dir, tmp_path / "glued", GLUED)
    data = tmp_path / "data.jsonl"
    lines = [
        [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": " Hi!"}],
        [{"role": "user", "content": "He"}, {"role": "assistant", "content": "llo world"}],  # "He|llo"
    ]
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in lines), encoding="utf-8")
    out = tmp_path / "训练 输出"
    args = ["train", "--model-path", str(model), "--data", str(data), "--output-dir", str(out)]

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was loaded although the data was bad")

    monkeypatch.setattr(trainer, "load_model", no_model)
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "1 example(s) have assistant text that cannot be located" in err
    assert "data.jsonl:2" in err and "--allow-bad" in err

    monkeypatch.undo()
    assert cli([*args, "--allow-bad", "1", "--max-steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "1 examples," in printed
    assert f"chat with it: vicuna chat --model-path '{out}'" in printed  # pasted, it works
    assert json.loads((out / "vicuna.json").read_text()) == {"conv_template": "hf"}


def test_a_chat_template_that_refuses_system_messages_is_named_as_the_reason(
    tiny_llama_dir, tmp_path, monkeypatch, capsys
):
    """Gemma 2's chat template refuses a system message: the run was refused with "have assistant text that
    cannot be located" and the summary counted the conversation as "not locatable", which sent users
    looking for a tokenization problem. The template's own words and the remedy are said now."""
    import vicuna.train.trainer as trainer
    from tests.chat_templates import GEMMA2, family_tokenizer

    model = Path(shutil.copytree(tiny_llama_dir, tmp_path / "gemma2"))
    family_tokenizer(model, GEMMA2).save_pretrained(model)
    data = tmp_path / "data.jsonl"
    lines = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        [{"role": "user", "content": "Hello!"}],
    ]
    reply = {"role": "assistant", "content": "Hi!"}
    data.write_text("".join(json.dumps({"messages": [*m, reply]}) + "\n" for m in lines), encoding="utf-8")
    refused = (
        f"{data}:1: the model's chat template refuses system messages (System role not supported): leave them "
        "(and --conv-system-msg) out, or put their text into the first user message"
    )
    assert cli(["train", "inspect", "--model-path", str(model), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "1 examples, " in out and "1 bad (refused by the chat template)" in out
    assert f"bad: {refused}" in out
    assert "model\n[[Hi!<end_of_turn>\n]]" in out  # the other one, with its reply's span

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was loaded although the data was bad")

    monkeypatch.setattr(trainer, "load_model", no_model)
    args = ["train", "--model-path", str(model), "--data", str(data), "--output-dir", str(tmp_path / "out")]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert (
        f"1 example(s) are refused by the model's chat template (allowed: 0); the first is {refused}." in err
    )


def crash_after_checkpoint(step: int):
    """A callback that stops the run like a killed process, right after checkpoint `step` is written."""
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise RuntimeError("simulated crash")

    return Crash()


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_resume_ends_where_an_uninterrupted_run_does(tiny_llama_dir, data_file, tmp_path, capsys):
    import torch

    from vicuna.train.trainer import TrainConfig, train

    def config(out: str, **overrides) -> TrainConfig:
        # 4 examples, 2 per step: 2 steps per epoch, so the crash at step 3 falls inside the 2nd epoch
        settings = dict(
            data=data_file, output_dir=tmp_path / out, model_path=str(tiny_llama_dir), max_steps=6
        )
        settings.update(grad_accum=2, save_steps=3, lr=1e-3, warmup_ratio=0.2, logging_steps=1)
        return TrainConfig(**{**settings, **overrides})

    train(config("straight"))
    progress = capsys.readouterr().out
    assert "step 6/6  loss " in progress and " tokens/s" in progress and "lr " in progress

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config("resumed"), callbacks=[crash_after_checkpoint(3)])
    assert (tmp_path / "resumed" / "checkpoint-3").is_dir()
    assert not (tmp_path / "resumed" / "vicuna.json").exists()
    with pytest.raises(VicunaError, match="already holds a training run; pass --resume"):
        train(config("resumed"))
    with pytest.raises(VicunaError, match="--resume: lr was 0.001"):
        train(config("resumed", resume=True, lr=2e-3))
    with pytest.raises(VicunaError, match="no complete checkpoint.*run the command without --resume"):
        train(config("fresh", resume=True))

    capsys.readouterr()
    train(config("resumed", resume=True))
    assert "done: 6 steps; the 3 since the resume in " in capsys.readouterr().out  # its mean loss is theirs
    straight, resumed, base = (
        weights(tmp_path / "straight"),
        weights(tmp_path / "resumed"),
        weights(tiny_llama_dir),
    )
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(straight[n], base[n]) for n in straight)  # it did train

    # resumed once more, complete: said, and the model left as it is
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "resumed").iterdir() if p.is_file()}
    train(config("resumed", resume=True))
    assert "this run is complete, its model written; nothing to resume" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "resumed").iterdir() if p.is_file()} == written
    # and so with its checkpoints deleted: it said to run without --resume, which said to pass --resume
    for checkpoint in (tmp_path / "resumed").glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    train(config("resumed", resume=True))
    assert "this run is complete, its model written; nothing to resume" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "resumed").iterdir() if p.is_file()} == written


def test_ctrl_c_says_how_to_go_on_only_from_a_checkpoint_there_is(
    tiny_llama_dir, data_file, tmp_path, capsys, monkeypatch
):
    """Ctrl-C before the first checkpoint (one every 500 steps by default) said 'run it again with
    --resume', which then refused: there was no checkpoint to resume from."""
    from transformers import TrainerCallback

    from vicuna.train import trainer

    class CtrlC(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    train = trainer.train
    monkeypatch.setattr(trainer, "train", lambda cfg: train(cfg, callbacks=[CtrlC()]))
    args = ["train", "--model-path", str(tiny_llama_dir), "--data", str(data_file), "--max-steps", "5"]
    assert cli([*args, "--output-dir", str(tmp_path / "a"), "--save-steps", "2"]) == 130
    assert f"interrupted; run it again with --resume to go on from {tmp_path / 'a' / 'checkpoint-2'}" in (
        capsys.readouterr().err
    )
    assert cli([*args, "--output-dir", str(tmp_path / "b")]) == 130
    err = capsys.readouterr().err
    assert "interrupted; no checkpoint was written yet (one every --save-steps 500): run it again" in err
    monkeypatch.setattr(trainer, "train", train)
    assert cli([*args, "--output-dir", str(tmp_path / "b")]) == 0  # as it says: without --resume


def test_a_second_run_into_the_folder_a_run_is_writing_is_refused(
    tiny_llama_dir, data_file, tmp_path, capsys
):
    """Two `vicuna train` runs with the same --output-dir (two terminals, a script started twice) both
    trained to 'done', writing checkpoints and models over each other's: the folder held one run's model
    beside the other's record of settings. The second is now refused while the first is writing."""
    import threading

    from transformers import TrainerCallback

    from vicuna.train.trainer import TrainConfig, train

    training, go = threading.Event(), threading.Event()

    class Held(TrainerCallback):  # the first run, held at its first step until the second has been tried
        def on_step_begin(self, args, state, control, **kwargs):
            training.set()
            assert go.wait(timeout=600)

    out, errors = tmp_path / "out", []
    first = TrainConfig(data=data_file, output_dir=out, model_path=str(tiny_llama_dir), max_steps=2, lr=1e-3)

    def run_first():
        try:
            train(first, callbacks=[Held()])
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=run_first)
    thread.start()
    try:
        assert training.wait(timeout=600) and not errors
        args = ["train", "--model-path", str(tiny_llama_dir), "--data", str(data_file), "--max-steps", "2"]
        assert cli([*args, "--output-dir", str(out), "--lr", "2e-3"]) == 2
        assert f"another vicuna job is writing {out} now; wait for it to finish" in capsys.readouterr().err
    finally:
        go.set()
        thread.join()
    assert errors == []
    assert json.loads((out / "vicuna-train.json").read_text(encoding="utf-8"))["lr"] == 1e-3
    assert not (tmp_path / ".out.lock").exists()
    assert cli([*args, "--output-dir", str(out), "--lr", "1e-3", "--resume"]) == 0  # done, its folder free


def test_a_checkpoint_killed_while_its_state_was_written_is_not_resumed_from(tmp_path):
    """The Trainer writes trainer_state.json last and in place: cut short, the checkpoint is incomplete."""
    from vicuna.train.trainer import last_checkpoint

    state = json.dumps({"global_step": 3, "max_steps": 9, "log_history": []})
    for step, text in ((3, state), (6, state.replace("3", "6")[:20]), (9, "")):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(text)
    (tmp_path / "checkpoint-12").mkdir()  # killed before the state was begun
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-3"


def test_a_run_killed_after_its_last_checkpoint_resumes_without_a_step_more(
    tiny_llama_dir, data_file, tmp_path
):
    """Killed while the final model is written, a run resumes from its last checkpoint: the Trainer
    would train one step past the end (a constant learning rate makes that step change the weights)."""
    import torch

    from vicuna.train.trainer import TrainConfig, train

    def config(out: str, **overrides) -> TrainConfig:
        settings = dict(
            data=data_file, output_dir=tmp_path / out, model_path=str(tiny_llama_dir), max_steps=3
        )
        settings.update(
            batch_size=2, save_steps=3, lr=1e-3, lr_scheduler="constant_with_warmup", progress=False
        )
        return TrainConfig(**{**settings, **overrides})

    train(config("straight"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config("resumed"), callbacks=[crash_after_checkpoint(3)])
    train(config("resumed", resume=True))
    assert not (tmp_path / "resumed" / "checkpoint-4").exists()
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


def test_a_run_keeps_the_newest_checkpoints_as_it_saves(tiny_llama_dir, data_file, tmp_path):
    """--save-total-limit 2 with a checkpoint each step: after each save only the newest two remain (a
    callback prunes them, in place of the Trainer)."""
    from vicuna.train.trainer import TrainConfig, train

    out = tmp_path / "out"
    settings = dict(data=data_file, output_dir=out, model_path=str(tiny_llama_dir), max_steps=4)
    train(TrainConfig(**settings, batch_size=2, save_steps=1, save_total_limit=2, progress=False))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


def test_a_resumed_run_keeps_only_the_newest_complete_checkpoints(tiny_llama_dir, data_file, tmp_path):
    """A job killed after writing checkpoint 4 and before deleting the oldest leaves one too many, and one
    killed while deleting leaves a checkpoint without its state; a resume from the last step saves no
    checkpoint more, and must still end with --save-total-limit complete ones and no partial one."""
    from vicuna.train.trainer import TrainConfig, train

    def config(**overrides) -> TrainConfig:
        settings = dict(data=data_file, output_dir=tmp_path / "out", model_path=str(tiny_llama_dir))
        settings.update(max_steps=4, batch_size=2, save_steps=1, progress=False)
        return TrainConfig(**{**settings, **overrides})

    with pytest.raises(RuntimeError, match="simulated crash"):  # no limit: none is deleted
        train(config(save_total_limit=None), callbacks=[crash_after_checkpoint(4)])
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{n}" for n in (1, 2, 3, 4)]
    (out / "checkpoint-1" / "trainer_state.json").unlink()  # its deletion cut short
    train(config(save_total_limit=2, resume=True))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert (out / "vicuna.json").is_file()


def test_a_checkpoint_that_cannot_be_deleted_is_left_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """A file held open in an old checkpoint (a chat with it, on Windows or NFS) made its deletion fail, and
    the error ended the training run at its next save; the Trainer's pruning left such a folder."""
    from vicuna.train import trainer

    for step in (1, 2, 3, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    rmtree = shutil.rmtree

    def held_open(path, *args, **kwargs):
        if Path(path).name == "checkpoint-1":
            raise PermissionError(13, "The process cannot access the file", str(path))
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(trainer.shutil, "rmtree", held_open)
    trainer.prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-3", "checkpoint-4"]
    assert f"warning: {tmp_path / 'checkpoint-1'} is left, not deleted" in capsys.readouterr().err


def test_a_full_disk_while_a_checkpoint_is_written_is_a_clear_error(
    tiny_llama_dir, data_file, tmp_path, monkeypatch, capsys, recwarn
):
    import torch

    def full_disk(obj, f, *args, **kwargs):  # what torch.save raises when the disk fills up mid-file
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 107840 vs 107728")

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "out"
    args = ["train", "--data", str(data_file), "--model-path", str(tiny_llama_dir), "--output-dir", str(out)]
    assert cli([*args, "--max-steps", "2", "--save-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"error: {out}: a checkpoint could not be written in full (" in err and "--resume" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("os_error", "said"),
    [
        ("No space left on device (os error 28)", "no space left on device"),
        # a shared server's or an NFS home's quota: a traceback, as safetensors' error was not known as one
        ("Disk quota exceeded (os error 122)", "disk quota exceeded"),
    ],
)
def test_a_full_disk_while_the_trained_model_is_written_is_a_clear_error(
    tiny_llama_dir, data_file, tmp_path, monkeypatch, capsys, recwarn, os_error, said
):
    import transformers.modeling_utils

    save_file = transformers.modeling_utils.safe_save_file

    def full_disk(tensors, filename, *args, **kwargs):  # the checkpoints fit, the model does not
        if ".final.partial" in str(filename):  # safetensors' words (a Rust io::Error) for a full disk
            raise Exception(f"Error while serializing: I/O error: {os_error}")
        return save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    out = tmp_path / "out"
    args = ["train", "--data", str(data_file), "--model-path", str(tiny_llama_dir), "--output-dir", str(out)]
    assert cli([*args, "--max-steps", "1", "--save-steps", "100"]) == 2
    err = capsys.readouterr().err
    assert (
        f"error: {out}: the trained model could not be written in full ({said}; " in err and "--resume" in err
    )
    assert "Traceback" not in err


def test_a_full_fine_tune_onto_a_disk_without_room_for_a_checkpoint_is_refused_before_it_trains(
    tiny_llama_dir, data_file, tmp_path, monkeypatch, capsys
):
    """It trained, then failed at its first checkpoint: hours lost on a 7B model. LoRA's adapter is small,
    and --force goes on."""
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=200_000))
    out = tmp_path / "out"
    args = ["train", "--data", str(data_file), "--model-path", str(tiny_llama_dir), "--output-dir", str(out)]
    assert cli([*args, "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"error: training {tiny_llama_dir} in full (a checkpoint, then the model) needs " in err
    assert f"of free disk in {out}, but only 200.0 kB is available there" in err
    assert not out.exists() or not any(out.iterdir())
    assert cli([*args, "--max-steps", "1", "--lora", "--save-steps", "100"]) == 0


def test_piped_output_is_lines_without_a_redrawn_bar(tiny_llama_dir, data_file, tmp_path, capfd):
    out = tmp_path / "out"
    args = ["train", "--data", str(data_file), "--model-path", str(tiny_llama_dir), "--output-dir", str(out)]
    assert cli([*args, "--max-steps", "2", "--logging-steps", "1", "--save-steps", "2"]) == 0
    printed = capfd.readouterr()
    assert "\r" not in printed.out + printed.err  # a bar redrawn in a log file makes one endless line
    lines = printed.out.splitlines()
    assert [line.split("  loss")[0] for line in lines if line.startswith("step ")] == ["step 1/2", "step 2/2"]
    assert any(line.startswith("done: 2 steps in ") for line in lines)


def test_on_a_dumb_terminal_the_output_is_lines_without_a_redrawn_bar(
    tiny_llama_dir, data_file, tmp_path, capsys, monkeypatch, screen
):
    """TERM=dumb (Emacs' M-x shell, where Emacspeak reads out each redraw; a carriage return shows as ^M):
    the run drew its step bar and transformers' loading bar as on any terminal."""
    import sys

    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setenv("TERM", "dumb")
    out = tmp_path / "out"
    args = ["train", "--data", str(data_file), "--model-path", str(tiny_llama_dir), "--output-dir", str(out)]
    assert cli([*args, "--max-steps", "2", "--logging-steps", "1", "--save-steps", "2"]) == 0
    printed = capsys.readouterr().out + screen.getvalue()
    assert "\r" not in printed and "Loading weights" not in printed
    lines = printed.splitlines()
    assert [line.split("  loss")[0] for line in lines if line.startswith("step ")] == ["step 1/2", "step 2/2"]


def test_no_progress_on_a_terminal_draws_no_bar_and_keeps_the_lines(
    tiny_llama_dir, data_file, tmp_path, monkeypatch, screen
):
    """`vicuna train` had no --no-progress, which `delta apply`, `convert` and `get` take: on a terminal its
    step bar, transformers' loading bar and the manifest's hashing bar were drawn whatever was asked."""
    import sys

    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setenv("TERM", "xterm")
    out = tmp_path / "out"
    args = ["train", "--data", str(data_file), "--model-path", str(tiny_llama_dir), "--output-dir", str(out)]
    assert cli([*args, "--max-steps", "2", "--logging-steps", "1", "--save-steps", "2", "--no-progress"]) == 0
    printed = screen.getvalue()
    assert "\r" not in printed and "Loading weights" not in printed and "sha256" not in printed
    lines = printed.splitlines()
    assert [line.split("  loss")[0] for line in lines if line.startswith("step ")] == ["step 1/2", "step 2/2"]
    assert any(line.startswith("done: 2 steps in ") for line in lines)
    assert any(line.startswith(f"Model written to {out}") for line in lines)


def test_on_a_terminal_the_step_bar_ends_once_before_the_done_line(
    tiny_llama_dir, data_file, tmp_path, monkeypatch, screen
):
    """The "done:" line was written through the step bar, which tqdm then drew again below it (its final
    100% drawn a second time, after the line meant to end the run)."""
    import sys

    # one screen: the bar on stderr, the lines on stdout
    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setenv("TERM", "xterm")
    out = tmp_path / "out"
    args = ["train", "--data", str(data_file), "--model-path", str(tiny_llama_dir), "--output-dir", str(out)]
    assert cli([*args, "--max-steps", "2", "--logging-steps", "1", "--save-steps", "2"]) == 0
    before, done, after = screen.getvalue().partition("done: 2 steps in ")
    assert done and "| 2/2 [" in before  # the bar was drawn, and ended above the line
    assert "| 2/2 [" not in after and "| 1/2 [" not in after


def test_a_run_on_the_cpu_says_so_and_why(tiny_llama_dir, data_file, tmp_path, capsys, monkeypatch):
    """Nothing said where a run trained: with a CPU-only PyTorch on a GPU machine (what `pip install torch`
    gives on Windows) a 7B model trained on the CPU, for days, without a word."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    out = tmp_path / "out"
    args = ["train", "--data", str(data_file), "--model-path", str(tiny_llama_dir), "--output-dir", str(out)]
    assert cli([*args, "--max-steps", "1"]) == 0
    out, err = capsys.readouterr()
    assert "Training on the CPU in float32 (a CPU-only build of PyTorch, " in err and "Training" not in out


@pytest.mark.parametrize(("name", "capability"), [("Tesla P40", (6, 1)), ("Tesla V100-SXM2-16GB", (7, 0))])
def test_old_gpus_are_refused_unless_forced(monkeypatch, tmp_path, data_file, capsys, name, capability):
    """The reason given was that older GPUs "lack the fp16 tensor-core kernels", which a V100 (7.0) has;
    what they lack is kernels in PyTorch's CUDA 12.8 and 13 builds."""
    import torch

    from vicuna.train.trainer import check_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)
    with pytest.raises(VicunaError) as err:
        check_gpus(force=False)
    assert str(err.value) == (
        f"GPU 0 ({name}) has compute capability {capability[0]}.{capability[1]}; training needs 7.5 or newer "
        "(T4, RTX 20xx, A100 and later): PyTorch's CUDA 12.8 and 13 builds have no kernels for older GPUs "
        '("no kernel image is available"). Pass --force to try anyway with a PyTorch built for CUDA 12.6, which has them'
    )
    check_gpus(force=True)
    # the CLI checks before it loads anything
    assert cli(["train", "--data", str(data_file), "--output-dir", str(tmp_path / "out")]) == 2
    assert "Pass --force" in capsys.readouterr().err


@pytest.mark.parametrize(("major", "dtype", "mixed"), [(7, "float16", "fp16"), (8, "bfloat16", "bf16")])
def test_auto_precision_is_bfloat16_only_where_the_gpu_has_it(pretend_gpu, major, dtype, mixed):
    """A T4 (7.5) trained in bfloat16 by default: PyTorch makes bfloat16 tensors there (emulated, slowly),
    so `torch.cuda.is_bf16_supported()` says yes; float16 is the precision such a GPU computes in."""
    import torch

    from vicuna.train.trainer import precision

    pretend_gpu("a GPU", major, 5)
    assert precision("auto") == (getattr(torch, dtype), mixed)


@pytest.mark.parametrize(("major", "warned"), [(7, True), (8, False)])
def test_bfloat16_asked_for_where_it_is_emulated_is_said_not_refused(pretend_gpu, caplog, major, warned):
    """`--dtype bfloat16` on a T4 trained in emulated bfloat16, slowly, without a word."""
    import torch

    from vicuna.train.trainer import precision

    pretend_gpu("Tesla T4" if major < 8 else "A100", major, 5)
    assert precision("bfloat16") == (torch.bfloat16, "bf16")
    said = caplog.text
    assert ("--dtype bfloat16 on the Tesla T4 (compute capability 7.5)" in said) == warned
    assert ("try --dtype float16" in said) == warned
    caplog.clear()
    assert precision("bfloat16", warn=False) == (torch.bfloat16, "bf16")  # a process other than the first
    assert precision("float16") == (torch.float16, "fp16")
    assert caplog.text == ""


@pytest.mark.parametrize(("version", "refused"), [("2.7.1", True), ("2.8.0", False), ("2.9.0a0+git1", False)])
def test_float16_trains_on_apple_s_gpu_where_pytorch_scales_its_gradients(monkeypatch, version, refused):
    """`--dtype float16` on mps was refused as needing a CUDA GPU, though accelerate trains in mixed float16
    there, with PyTorch's gradient scaler for mps (2.8 and newer; accelerate refuses an older one)."""
    import torch

    from vicuna.train.trainer import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch, "__version__", version)
    if refused:
        with pytest.raises(VicunaError) as info:
            precision("float16")
        assert str(info.value) == (
            "--dtype float16 on Apple's GPU (mps) needs PyTorch 2.8 or newer, whose gradient scaler runs "
            "there (this is 2.7.1): upgrade PyTorch, or use --dtype bfloat16 (macOS 14 or newer) or float32"
        )
    else:
        assert precision("float16") == (torch.float16, "fp16")  # TrainingArguments(fp16=True): scaled
    assert precision("auto") == (torch.float32, "no")  # unchanged: float16 only when asked for
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(VicunaError, match="^--dtype float16 needs a CUDA GPU or Apple's GPU"):
        precision("float16")


@pytest.mark.parametrize("macos_14", [False, True])
def test_bfloat16_on_apple_s_gpu_before_macos_14_is_refused_before_loading(
    monkeypatch, tmp_path, data_file, capsys, macos_14
):
    """Apple's GPU computes in bfloat16 from macOS 14 on: chat and serve refuse `--dtype bfloat16` on mps
    before it, but train went on to read the data and load the model, which PyTorch then failed on."""
    import torch

    import vicuna.train.trainer
    from vicuna.train.trainer import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos_14)
    if macos_14:
        assert precision("bfloat16") == (torch.bfloat16, "bf16")
        return
    said = (
        "--dtype bfloat16 on mps needs macOS 14 or newer, where Apple's GPU computes in bfloat16; "
        "use --dtype float16 or float32"
    )
    with pytest.raises(VicunaError) as info:
        precision("bfloat16")
    assert str(info.value) == said
    assert precision("auto") == (torch.float32, "no")  # not asked for: nothing to refuse

    def never(*args, **kwargs):
        raise AssertionError("the data was read")

    monkeypatch.setattr(vicuna.train.trainer, "read_and_tokenize", never)
    args = ["train", "--data", str(data_file), "--output-dir", str(tmp_path / "out"), "--dtype", "bfloat16"]
    assert cli(args) == 2
    assert capsys.readouterr().err == f"error: {said}\n"


def test_qlora_without_cuda_is_a_clear_error(tiny_llama_dir, data_file, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["train", "--model-path", str(tiny_llama_dir), "--data", str(data_file)]
    assert cli([*args, "--output-dir", str(tmp_path / "out"), "--qlora"]) == 2
    assert "--qlora needs a CUDA GPU" in capsys.readouterr().err


def test_multi_gpu_configs_ship_with_the_package():
    from importlib.resources import files

    from accelerate.commands.config.config_args import ClusterConfig

    configs = files("vicuna.train") / "configs"
    fsdp = ClusterConfig.from_yaml_file(str(configs / "fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP"
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the output is a normal checkpoint
    zero3 = json.loads((configs / "zero3.json").read_text())
    assert zero3["zero_optimization"]["stage"] == 3
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_an_output_dir_that_holds_a_model_is_refused(tiny_llama_dir, data_file, tmp_path, capsys):
    model = Path(shutil.copytree(tiny_llama_dir, tmp_path / "vm_copy"))
    before = sorted(p.name for p in model.iterdir())
    args = ["train", "--data", str(data_file), "--max-steps", "1"]
    same = str(tmp_path / "vm_copy" / ".." / "vm_copy")  # the same folder, spelled differently
    assert cli([*args, "--model-path", str(model), "--output-dir", same]) == 2
    err = capsys.readouterr().err
    assert "is the model folder (--model-path" in err and "choose another --output-dir" in err
    assert sorted(p.name for p in model.iterdir()) == before  # nothing written into it
    assert cli([*args, "--model-path", str(model), "--output-dir", str(model / "trained")]) == 2
    assert "is inside the model folder" in capsys.readouterr().err
    assert sorted(p.name for p in model.iterdir()) == before

    other = Path(shutil.copytree(tiny_llama_dir, tmp_path / "other"))
    assert cli([*args, "--model-path", str(tiny_llama_dir), "--output-dir", str(other)]) == 2
    err = capsys.readouterr().err
    assert "already holds a model (config.json, model.safetensors" in err
    assert "choose another --output-dir" in err
    assert not (other / "vicuna-train.json").exists()


def test_max_steps_0_is_refused_before_anything_is_written(tiny_llama_dir, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["train", "--data", str(data_file), "--model-path", str(tiny_llama_dir), "--output-dir", str(out)]
    assert cli([*args, "--max-steps", "0"]) == 2  # it trained nothing and wrote the base model as the result
    assert "--max-steps must be at least 1" in capsys.readouterr().err
    assert not out.exists()


def test_a_negative_weight_decay_is_refused_before_anything_is_written(
    tiny_llama_dir, data_file, tmp_path, capsys
):
    """--weight-decay -1 trained, each step pushing every weight away from 0, and wrote that model."""
    out = tmp_path / "out"
    args = ["train", "--data", str(data_file), "--model-path", str(tiny_llama_dir), "--output-dir", str(out)]
    assert cli([*args, "--max-steps", "1", "--weight-decay", "-1"]) == 2
    assert capsys.readouterr().err == "error: --weight-decay must be >= 0\n"
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora-alpha", "0"], "--lora-r and --lora-alpha must be at least 1"),  # it trained nothing
        (["--lora-r", "0"], "--lora-r and --lora-alpha must be at least 1"),  # said as --lora-target's
        (["--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
        (
            ["--lora-target", " , "],
            "--lora-target is empty; name the layers (e.g. q_proj,v_proj) or pass all-linear",
        ),
    ],
)
def test_lora_settings_that_cannot_train_are_refused(
    tiny_llama_dir, data_file, tmp_path, capsys, flags, message
):
    out = tmp_path / "out"
    args = ["train", "--data", str(data_file), "--model-path", str(tiny_llama_dir), "--output-dir", str(out)]
    assert cli([*args, "--lora", "--max-steps", "1", *flags]) == 2
    assert f"error: {message}\n" == capsys.readouterr().err
    assert not out.exists()


LONG = [
    {"messages": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Paris. " * 200}]}
]


def test_max_length_defaults_to_the_model_context_and_may_not_exceed_it(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "long.json"
    data.write_text(json.dumps(LONG), encoding="utf-8")
    out = tmp_path / "examples.jsonl"
    args = ["train", "inspect", "--data", str(data), "--model-path", str(tiny_llama_dir), "-n", "0"]
    assert cli([*args, "--json", str(out)]) == 0
    assert "1 truncated to --max-length 256" in capsys.readouterr().out  # the tiny model's 256 positions
    [example] = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(example["input_ids"]) == 256

    assert cli([*args, "--max-length", "2048"]) == 2
    assert "--max-length 2048 is longer than the model's context of 256 tokens" in capsys.readouterr().err
    train = ["train", "--data", str(data), "--model-path", str(tiny_llama_dir), "--output-dir"]
    assert cli([*train, str(tmp_path / "out"), "--max-length", "300"]) == 2
    assert "--max-length 300 is longer than the model's context of 256 tokens" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # inspect took --max-length 0, which train refuses, and showed every example cut to nothing
    assert cli([*args, "--max-length", "0"]) == 2
    assert "error: --max-length must be at least 16, not 0\n" in capsys.readouterr().err
    assert cli([*train, str(tmp_path / "out"), "--max-length", "8"]) == 2
    assert "error: --max-length must be at least 16, not 8\n" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_inspect_refuses_a_json_output_it_cannot_write_before_the_work(
    tiny_llama_dir, data_file, tmp_path, capsys
):
    """--json naming a folder ended, after the work, in "Is a directory: OUT.partial", that file left beside
    it; a folder that does not exist in "No such file or directory: OUT.partial"."""
    args = ["train", "inspect", "--data", str(data_file), "--model-path", str(tiny_llama_dir), "-n", "0"]
    (tmp_path / "examples").mkdir()
    assert cli([*args, "--json", str(tmp_path / "examples")]) == 2
    assert f"--json {tmp_path / 'examples'} is a folder; name the file" in capsys.readouterr().err
    assert cli([*args, "--json", str(tmp_path / "no-such" / "x.jsonl")]) == 2
    assert f"the folder {tmp_path / 'no-such'} does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["examples"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes (Windows)")
def test_inspect_writes_its_json_into_a_pipe_named_as_the_file(tiny_llama_dir, data_file, tmp_path):
    """`--json /dev/stdout`, `--json >(jq .)`, a FIFO: the examples were written to a file renamed over the
    pipe, which its reader never saw (and as root, over /dev/stdout itself). A FIFO stands in here."""
    import stat
    import subprocess
    import threading

    fifo = tmp_path / "examples.fifo"
    os.mkfifo(fifo)
    read: list[str] = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_text(encoding="utf-8")), daemon=True)
    reader.start()
    command = [sys.executable, "-m", "vicuna", "train", "inspect", "--data", str(data_file)]
    command += ["--model-path", str(tiny_llama_dir), "-n", "0", "--json", str(fifo)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reader.join(timeout=30)
    assert stat.S_ISFIFO(fifo.stat().st_mode)  # not replaced by a file
    sources = [json.loads(line)["source"] for line in read[0].splitlines()]
    assert [source.split(" ")[0] for source in sources] == [f"{data_file}[{i}]" for i in range(len(DATA))]


@pytest.mark.skipif(not Path("/dev/fd").is_dir(), reason="no /dev/fd (Windows)")
def test_inspect_s_json_sent_to_standard_output_is_all_it_holds(tiny_llama_dir, data_file):
    """`vicuna train inspect ... --json /dev/stdout | jq`: the summary, the examples shown and "wrote N
    examples" came on standard output with the JSON lines; they go to stderr then."""
    import subprocess

    command = [sys.executable, "-m", "vicuna", "train", "inspect", "--data", str(data_file)]
    command += ["--model-path", str(tiny_llama_dir), "-n", "1", "--json", "/dev/fd/1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len([json.loads(line) for line in done.stdout.splitlines()]) == len(DATA)
    assert f"{data_file}: {len(DATA)} examples" in done.stderr and "tokens with loss are" in done.stderr


def test_inspect_refuses_a_negative_count_before_the_work(tiny_llama_dir, data_file, monkeypatch, capsys):
    """-n -1 showed no example and said nothing of why; -n 0 (the summary and the bad examples, with
    --json the examples written, none shown) stays, as the tests above use it."""
    import vicuna.train.trainer

    def never(*args, **kwargs):
        raise AssertionError("the data was read")

    monkeypatch.setattr(vicuna.train.trainer, "read_and_tokenize", never)
    args = ["train", "inspect", "--data", str(data_file), "--model-path", str(tiny_llama_dir), "-n", "-1"]
    assert cli(args) == 2
    assert capsys.readouterr().err == "error: -n must be at least 0 (0: show no example), not -1\n"


def test_a_base_stored_as_pytorch_bin_is_saved_in_the_dtype_its_config_names(
    tiny_llama_dir, data_file, tmp_path
):
    """Vicuna v1.3 and older come as float16 pytorch_model.bin files, whose dtype is read from config.json's
    torch_dtype (the field's name before transformers 4.56): the model trained from one is float16 too, not
    the float32 the CPU trained it in (twice the size)."""
    import torch
    from safetensors import safe_open

    base = Path(shutil.copytree(tiny_llama_dir, tmp_path / "fp16-bin"))
    state = weights(base)
    torch.save({k: v.to(torch.float16) for k, v in state.items()}, base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    config = json.loads((base / "config.json").read_text())
    config.pop("dtype", None)
    (base / "config.json").write_text(json.dumps({**config, "torch_dtype": "float16"}))
    out = tmp_path / "out"
    args = ["train", "--model-path", str(base), "--data", str(data_file), "--output-dir", str(out)]
    assert cli([*args, "--max-steps", "1", "--warmup-ratio", "0"]) == 0

    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118 (not iterable)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16"


def test_a_full_fine_tune_is_saved_in_the_base_models_dtype(tiny_llama_dir, data_file, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base = Path(shutil.copytree(tiny_llama_dir, tmp_path / "bf16"))
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(base)
    out = tmp_path / "out"
    args = ["train", "--model-path", str(base), "--data", str(data_file), "--output-dir", str(out)]
    mask = os.umask(0o022)
    try:
        assert cli([*args, "--max-steps", "2", "--lr", "1e-2", "--warmup-ratio", "0"]) == 0
    finally:
        os.umask(mask)

    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118 (not iterable)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert config.get("use_cache", True)  # off while training only: transformers' generate reads it
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
    size, base_size = (out / "model.safetensors").stat().st_size, (base / "model.safetensors").stat().st_size
    assert size < 1.1 * base_size, (size, base_size)
    trained, original = weights(out), weights(base)
    assert any(not torch.equal(trained[n], original[n]) for n in trained)  # it did train
    assert (out / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by others, as any new file


def test_the_first_warmup_step_learns(tiny_llama_dir, data_file, tmp_path):
    from transformers import TrainerCallback

    from vicuna.train.trainer import TrainConfig, train

    rates: list[float] = []

    class Rates(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            rates.append(optimizer.param_groups[0]["lr"])

    settings = dict(data=data_file, output_dir=tmp_path / "out", model_path=str(tiny_llama_dir))
    settings.update(max_steps=4, lr=1e-3, warmup_ratio=0.5, batch_size=4, progress=False)
    train(TrainConfig(**settings), callbacks=[Rates()])
    # 2 warmup steps at 1/2 and 2/2 of the peak (transformers' own: 0 and 1/2), then the cosine from the peak
    assert rates == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])


def test_the_system_prompt_trained_with_is_the_one_chat_uses(tiny_llama_dir, data_file, tmp_path):
    """--conv-system-msg goes into the trained model's record: chat and serve send the prompt the model
    learnt from, not the template's default system prompt (and a further fine-tune keeps it)."""
    from vicuna.config import ModelSettings
    from vicuna.conversation import Message, get_template, with_system
    from vicuna.engine.loader import load_engine
    from vicuna.train.data import Encoder, load_conversations

    system = "你是一个乐于助人的助手。"
    out = tmp_path / "out"
    args = ["train", "--model-path", str(tiny_llama_dir), "--data", str(data_file), "--output-dir", str(out)]
    assert cli([*args, "--max-steps", "1", "--conv-system-msg", system]) == 0
    engine = load_engine(ModelSettings(model_path=str(out), device="cpu"), progress=False)
    hello = load_conversations(data_file)[0].messages  # a conversation without a system turn
    trained_on = with_system(get_template("vicuna_v1.1"), system)
    ids, _ = Encoder(engine.tokenizer, trained_on).encode(hello)
    prompt = engine.encode_chat(hello[:1])
    assert ids[: len(prompt)] == prompt
    assert engine.template == trained_on
    # a template named at chat time brings its own default system prompt
    other = load_engine(ModelSettings(model_path=str(out), conv_template="vicuna_v0"), progress=False)
    assert system not in other.render_chat([Message("user", "x")])


def test_a_checkpoint_chats_with_the_template_it_is_trained_with(tiny_llama_dir, data_file, tmp_path):
    """`vicuna chat --model-path OUT/checkpoint-N` (to try a run's earlier steps) prompts the model as it
    is being trained, not with the template its folder's name would choose."""
    from vicuna.config import ModelSettings
    from vicuna.engine.loader import load_engine

    out = tmp_path / "out"
    args = ["train", "--model-path", str(tiny_llama_dir), "--data", str(data_file), "--output-dir", str(out)]
    assert cli([*args, "--max-steps", "2", "--save-steps", "1", "--conv-template", "chatml"]) == 0
    for step in (1, 2):
        engine = load_engine(ModelSettings(model_path=str(out / f"checkpoint-{step}")), progress=False)
        assert engine.template.name == "chatml"
        # the KV cache is off while training only: transformers' generate reads the saved setting
        assert json.loads((out / f"checkpoint-{step}" / "config.json").read_text()).get("use_cache", True)
    assert json.loads((out / "config.json").read_text()).get("use_cache", True)


def test_a_resume_from_another_base_model_is_refused(tmp_path):
    """The run record did not say which model a run trained, so `--resume --model-path OTHER` went on
    training a LoRA adapter (or full weights) made for one model on another without a word."""
    from dataclasses import replace

    from vicuna.train.data import Prepared
    from vicuna.train.trainer import RUN_RECORD, TrainConfig, run_record, start_or_resume

    base, other, out = tmp_path / "base", tmp_path / "other", tmp_path / "out"
    base.mkdir(), other.mkdir()
    started = TrainConfig(data=tmp_path / "data.json", output_dir=out, model_path=str(base), lora=True)

    def resume(model: Path | None, model_path: str | None) -> Path | None:
        cfg = replace(started, resume=True, model_path=model_path)
        return start_or_resume(cfg, run_record(cfg, "vicuna_v1.1", Prepared(64)), True, model)

    assert start_or_resume(started, run_record(started, "vicuna_v1.1", Prepared(64)), True, base) is None
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    with pytest.raises(VicunaError) as err:
        resume(other, str(other))
    assert str(err.value) == (
        f"--resume: the run in {out} was started from --model-path {base}, now from --model-path {other}; "
        "resume with the model it was started from, or start a new --output-dir (the same model, moved: "
        f'set "base_model" in {out / "vicuna-train.json"} to its new folder)'
    )
    with pytest.raises(VicunaError, match="started from --model-path .*, now from the built-in model"):
        resume(Path("builtin"), None)
    assert resume(base, str(tmp_path / "other" / ".." / "base")) == out / "checkpoint-3"  # the same folder
    # a Hub repository (downloaded by --model-path): its id, wherever the run is resumed from
    hub = replace(started, model_path="lmsys/vicuna-7b-v1.5")
    assert run_record(hub, "vicuna_v1.1", Prepared(64))["base_model"] == "lmsys/vicuna-7b-v1.5"
    # the model moved: the record is told its new folder, as the message says
    record = json.loads((out / RUN_RECORD).read_text(encoding="utf-8"))
    (out / RUN_RECORD).write_text(json.dumps(record | {"base_model": str(other)}), encoding="utf-8")
    assert resume(other, str(other)) == out / "checkpoint-3"
    # a run recorded before the base model was: resumed as it was
    record = json.loads((out / RUN_RECORD).read_text(encoding="utf-8"))
    del record["base_model"]
    (out / RUN_RECORD).write_text(json.dumps(record), encoding="utf-8")
    assert resume(other, str(other)) == out / "checkpoint-3"
    # the record edited wrong: a JSONDecodeError traceback, and a list resumed as if it recorded nothing
    (out / RUN_RECORD).write_text('{"base_model": "' + str(other) + '",', encoding="utf-8")
    with pytest.raises(VicunaError, match=r"vicuna-train\.json: not valid JSON \(.*\); fix it to resume"):
        resume(other, str(other))
    (out / RUN_RECORD).write_text("[]", encoding="utf-8")
    with pytest.raises(
        VicunaError, match=r"vicuna-train\.json: expected the JSON object of the run's settings"
    ):
        resume(other, str(other))


@pytest.mark.parametrize(
    ("installed", "said"), [(None, "--qlora needs bitsandbytes"), ("0.45.5", "0.45.5 is installed")]
)
def test_qlora_without_a_bitsandbytes_transformers_takes_is_a_clear_error(
    tiny_llama_dir, data_file, tmp_path, capsys, monkeypatch, installed, said
):
    """bitsandbytes older than transformers takes for 4-bit weights (0.46.1 in transformers 5) passed the
    check, and transformers refused it with an ImportError traceback after the data was tokenized."""
    import importlib.machinery
    import importlib.metadata
    import importlib.util

    import torch
    from transformers.utils.import_utils import BITSANDBYTES_MIN_VERSION

    from vicuna.shell import quote

    def version(name):
        if name != "bitsandbytes":
            return real(name)
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    def find_spec(name, *rest):
        if name == "bitsandbytes" and installed:
            return importlib.machinery.ModuleSpec(name, None)
        return real_find_spec(name, *rest)

    real, real_find_spec = importlib.metadata.version, importlib.util.find_spec
    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # check_gpus: no GPU to refuse
    monkeypatch.setattr(sys, "executable", "/opt/my tools/bin/python")  # a path the shell needs quoted
    args = ["train", "--model-path", str(tiny_llama_dir), "--data", str(data_file)]
    assert cli([*args, "--output-dir", str(tmp_path / "out"), "--qlora"]) == 2
    err = capsys.readouterr().err
    assert said in err
    # this Python's pip (a pipx install's, not another's), its path quoted for the shell where it must be
    assert f"{quote(sys.executable)} -m pip install " in err
    if installed:
        assert f"pip install -U 'bitsandbytes>={BITSANDBYTES_MIN_VERSION}'" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_qlora_check_knows_the_bitsandbytes_transformers_5_takes_where_transformers_no_longer_says(
    monkeypatch,
):
    import importlib.metadata

    import torch
    import transformers.utils.import_utils

    from vicuna.train.trainer import check_qlora

    monkeypatch.delattr(transformers.utils.import_utils, "BITSANDBYTES_MIN_VERSION", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "0.45.5" if n == "bitsandbytes" else real(n))
    with pytest.raises(VicunaError, match=r"bitsandbytes>=0\.46\.1"):
        check_qlora()


def test_training_that_cannot_fit_the_ram_is_refused_before_loading(
    tiny_llama_dir, data_file, tmp_path, capsys, monkeypatch
):
    """Without a CUDA GPU (on the CPU, or Apple's GPU in the same RAM) a model whose training could not fit
    was loaded anyway, and the system killed the run: a full fine-tune holds 16 bytes a parameter."""
    import dataclasses

    import torch

    from vicuna.engine import memory
    from vicuna.engine.loader import read_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = memory.model_size(read_config(tiny_llama_dir)).params
    hw = dataclasses.replace(memory.probe_hardware(), ram_available=10 * params)
    monkeypatch.setattr(memory, "probe_hardware", lambda: hw)
    out = tmp_path / "out"
    args = ["train", "--data", str(data_file), "--model-path", str(tiny_llama_dir), "--output-dir", str(out)]
    assert cli([*args, "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "training it needs about" in err and "for float32 weights, their gradients and AdamW's" in err
    assert "LoRA in bfloat16 (--lora --dtype bfloat16) needs about" in err and "--force tries anyway" in err
    assert not out.exists()  # refused before anything was written
    assert cli([*args, "--max-steps", "1", "--force"]) == 0  # swap may hold what RAM does not
    shutil.rmtree(out)
    assert cli([*args, "--max-steps", "1", "--lora", "--dtype", "bfloat16"]) == 0  # 2 bytes a parameter fit


def test_an_output_dir_that_is_a_file_is_named(tiny_llama_dir, data_file, tmp_path, capsys):
    """It ended in "error: File exists: out", from mkdir, which said neither the flag nor what was wrong."""
    out = tmp_path / "out"
    out.write_text("notes")
    args = ["train", "--data", str(data_file), "--model-path", str(tiny_llama_dir), "--max-steps", "1"]
    assert cli([*args, "--output-dir", str(out)]) == 2
    assert f"--output-dir {out} is a file; name a new or empty folder" in capsys.readouterr().err
    assert out.read_text() == "notes"


def test_a_lora_adapter_trained_on_a_gguf_file_names_the_file_as_its_base(
    tiny_llama_dir, data_file, tmp_path, monkeypatch, capsys, recwarn
):
    """peft recorded the converted copy's folder in $VICUNA_HOME/models as the adapter's base: once the file
    changed and was converted again, the older copy was deleted, and the adapter (and the merge command
    said after training) named a folder that was gone. The file as given resolves to its current copy."""
    from vicuna.engine.loader import resolve_model_path
    from vicuna.errors import ModelLoadError
    from vicuna.shell import quote
    from vicuna.weights import builtin

    def convert(gguf, out, notice=None, needed_bytes=0, progress=True):  # the tiny model as the file's copy
        shutil.copytree(tiny_llama_dir, out)
        return out

    monkeypatch.setattr(builtin, "convert_gguf", convert)
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path / "home"))  # not the shared one: its copies stayed there
    gguf, out = tmp_path / "model.gguf", tmp_path / "adapter"
    gguf.write_bytes(b"GGUF 1")
    args = ["train", "--model-path", str(gguf), "--data", str(data_file), "--max-steps", "1", "--lora"]
    assert cli([*args, "--output-dir", str(out)]) == 0
    named = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
    assert named == str(gguf.resolve())
    assert not [w for w in recwarn if "config file" in str(w.message)]  # peft's, looking for its config.json
    assert f"vicuna lora merge --base {quote(str(gguf.resolve()))} --adapter" in capsys.readouterr().out
    with pytest.raises(
        ModelLoadError, match=re.escape(f"merge it first with `vicuna lora merge --base {quote(named)} ")
    ):
        resolve_model_path(str(out))

    gguf.write_bytes(b"GGUF 2, downloaded again")  # converted again: the first copy is an older one
    assert resolve_model_path(named) == builtin.gguf_cache_dir(gguf)


def test_a_model_path_given_as_a_path_trains(tiny_llama_dir, data_file, tmp_path):
    """TrainConfig takes `data` and `output_dir` as Paths; `model_path` as one ended in a TypeError."""
    from vicuna.train.trainer import TrainConfig, train

    out = tmp_path / "out"
    cfg = TrainConfig(data=data_file, output_dir=out, model_path=tiny_llama_dir, max_steps=1, progress=False)
    assert train(cfg) == out and (out / "config.json").is_file()


def test_lr_not_given_is_ten_times_higher_for_lora(tmp_path):
    """--lora kept a full fine-tune's 2e-5 (its help said "LoRA: try 2e-4"): a short LoRA run barely moved
    the model, and LitGPT's and the QLoRA paper's users expect LoRA's own rate."""
    from vicuna.cli import command_parser
    from vicuna.train.trainer import TrainConfig

    def lr(*flags: str) -> float:
        args = command_parser("train").parse_args(["--data", "d.json", "--output-dir", str(tmp_path), *flags])
        settings = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
        return TrainConfig(**settings).learning_rate

    assert (lr(), lr("--lora"), lr("--qlora")) == (2e-5, 2e-4, 2e-4)
    assert (lr("--lr", "1e-3"), lr("--lora", "--lr", "3e-5")) == (1e-3, 3e-5)  # given: as typed


def test_lr_not_given_follows_lora_set_after_construction(tiny_llama_dir, data_file, tmp_path):
    """The default was filled in when the config was made: `dataclasses.replace(cfg, lora=True)` on a
    config made without LoRA trained the adapter at a full fine-tune's 2e-5, and recorded it."""
    from dataclasses import replace

    from transformers import TrainerCallback

    from vicuna.train.trainer import TrainConfig, train

    used = []

    class Rate(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            used.append(args.learning_rate)

    full = TrainConfig(data=data_file, output_dir=tmp_path / "full", model_path=tiny_llama_dir, max_steps=1)
    lora = replace(full, output_dir=tmp_path / "lora", lora=True, progress=False)
    train(lora, callbacks=[Rate()])
    assert used == [2e-4]
    assert json.loads((tmp_path / "lora" / "vicuna-train.json").read_text(encoding="utf-8"))["lr"] == 2e-4
    assert replace(lora, lora=False).learning_rate == 2e-5 and replace(full, lr=1e-3).learning_rate == 1e-3


def test_a_lora_run_started_before_its_default_lr_changed_resumes_with_the_same_command(tmp_path):
    """A LoRA run started without --lr recorded 2e-5, --lr's default then; its own command with --resume
    was refused once the default became 2e-4 ("--resume: lr was 2e-05 ..., now 0.0002")."""
    from vicuna.train.trainer import TrainConfig, start_or_resume

    out, model = tmp_path / "out", tmp_path / "model"
    model.mkdir()
    (out / "checkpoint-3").mkdir(parents=True)
    state = {"global_step": 3, "max_steps": 9, "log_history": []}
    (out / "checkpoint-3" / "trainer_state.json").write_text(json.dumps(state))
    (out / "vicuna-train.json").write_text(json.dumps({"lr": 2e-5, "lora": True}))

    cfg = TrainConfig(data=tmp_path / "d.json", output_dir=out, lora=True, resume=True)
    record = {"lr": cfg.learning_rate, "lora": True}
    assert start_or_resume(cfg, record, True, model) == out / "checkpoint-3"
    assert (
        cfg.learning_rate == record["lr"] == 2e-5
    )  # what the run was started with, and the record it is checked by
    given = TrainConfig(data=tmp_path / "d.json", output_dir=out, lora=True, resume=True, lr=2e-4)
    with pytest.raises(VicunaError, match=r"--resume: lr was 2e-05 for the run in .*, now 0.0002"):
        start_or_resume(given, {"lr": given.lr, "lora": True}, True, model)
