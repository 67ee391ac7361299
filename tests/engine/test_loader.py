"""Every bad checkpoint gives a specific error naming the file and the field, never a traceback."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading

import pytest

from tests.tiny_models import write_tiny_llama
from vicuna.cli import main as cli
from vicuna.config import ModelSettings
from vicuna.engine.loader import load_engine, load_tokenizer
from vicuna.errors import ModelLoadError, VicunaError


@pytest.fixture
def model_copy(tiny_llama_dir, tmp_path):
    return shutil.copytree(tiny_llama_dir, tmp_path / "model")


def load(path):
    return load_engine(ModelSettings(model_path=str(path), dtype="float32"), progress=False)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load(tmp_path / "nope")


@pytest.mark.parametrize("given", ["path", None])
def test_a_path_or_none_given_to_load_engine_is_told_to_be_model_settings(tiny_llama_dir, given):
    with pytest.raises(TypeError, match=r"load_engine\(ModelSettings\(model_path=\.\.\.\)\)"):
        load_engine(str(tiny_llama_dir) if given == "path" else None, progress=False)


def test_a_hub_repo_id_as_fastchat_takes_it_is_downloaded_once_then_loaded(
    tiny_llama_dir, tmp_path, monkeypatch, capsys
):
    from vicuna.engine.loader import resolve_model_path
    from vicuna.weights import hub
    from vicuna.weights.manifest import write_manifest

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "models" / "lmsys--vicuna-7b-v1.5"
    # not VICUNA_HOME moved, with the CPU kernel compiled into it
    monkeypatch.setattr(hub, "model_folder", lambda repo_id: tmp_path / "models" / repo_id.replace("/", "--"))
    fetched = []

    def download(
        repo_id, target, wait=False, progress=True
    ):  # the Hub, offline: the files, then the manifest written last
        fetched.append(repo_id)
        print("lmsys/vicuna-7b-v1.5@0123456789: 6 files")
        shutil.copytree(tiny_llama_dir, target, dirs_exist_ok=True)
        if len(fetched) == 1:
            raise KeyboardInterrupt  # the first download is interrupted before its manifest
        write_manifest(target)
        return target

    monkeypatch.setattr(hub, "download", download)
    with pytest.raises(
        ModelLoadError, match="not downloaded yet from the Hugging Face Hub: `vicuna download"
    ):
        resolve_model_path("lmsys/vicuna-7b-v1.5", download=False)  # doctor's: no gigabytes to show needs
    assert not fetched
    with pytest.raises(KeyboardInterrupt):
        load("lmsys/vicuna-7b-v1.5")
    # the same command resumes it; with progress, as `vicuna chat` loads (`load` asks for none)
    assert load_engine(ModelSettings(model_path="lmsys/vicuna-7b-v1.5", dtype="float32")) is not None
    engine = load("lmsys/vicuna-7b-v1.5")
    assert fetched == ["lmsys/vicuna-7b-v1.5"] * 2
    assert engine.model_name == "lmsys/vicuna-7b-v1.5"  # the API's model name, as other servers call it
    assert load(folder).model_name == "lmsys--vicuna-7b-v1.5"  # the folder given: its name
    assert resolve_model_path("lmsys/vicuna-7b-v1.5", download=False) == folder
    out, err = capsys.readouterr()
    assert not out  # standard output is the chat's
    assert f"downloading it from the Hugging Face Hub into {folder}" in err and "@0123456789" in err

    def not_on_the_hub(repo_id, target, wait=False, progress=True):
        raise VicunaError(
            f"{repo_id} was not found on https://huggingface.co (a private repo needs HF_TOKEN)"
        )

    monkeypatch.setattr(hub, "download", not_on_the_hub)  # a folder's name mistyped, most often
    with pytest.raises(ModelLoadError) as info:
        load("runs/chekpoint-9")
    assert str(info.value) == (
        "runs/chekpoint-9: no such file or folder here, and from the Hub: runs/chekpoint-9 was not found on "
        "https://huggingface.co (a private repo needs HF_TOKEN)"
    )
    (tmp_path / "runs").mkdir()  # the folder it is in is here: not the Hub's
    with pytest.raises(ModelLoadError, match=r"^runs/chekpoint-9: no such file or folder$"):
        load("runs/chekpoint-9")

    # `vicuna download --include '*.json'` fetched a part, with its manifest: --model-path fetches the rest
    shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copy(tiny_llama_dir / "config.json", folder)
    write_manifest(folder)
    monkeypatch.setattr(hub, "download", download)
    assert load("lmsys/vicuna-7b-v1.5") is not None and len(fetched) == 3


def test_a_second_first_start_with_a_hub_repo_waits_for_the_first_s_download_then_loads_it(
    tiny_llama_dir, tmp_path, monkeypatch, capsys
):
    """Two first `vicuna chat --model-path owner/name` at once: the second was refused by the download's
    one-writer lock, said as "owner/name: no such file or folder here, and from the Hub: another vicuna job
    is writing ...". It now waits for the first, saying so, and loads the folder it finished without
    fetching or hashing it again."""
    import hashlib

    from vicuna.engine.loader import resolve_model_path
    from vicuna.weights import disk, hub

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "models" / "lmsys--vicuna-7b-v1.5"
    monkeypatch.setattr(hub, "model_folder", lambda repo_id: tmp_path / "models" / repo_id.replace("/", "--"))
    files = {p.name: p.read_bytes() for p in sorted(tiny_llama_dir.iterdir()) if p.is_file()}
    remote = tuple(
        hub.RemoteFile(
            name,
            len(data),
            hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
            hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else None,
        )
        for name, data in files.items()
    )
    monkeypatch.setattr(
        hub, "plan_download", lambda *a, **k: hub.Plan("lmsys/vicuna-7b-v1.5", "model", "0" * 40, remote)
    )
    fetching, go, waiting, fetched, checked = threading.Event(), threading.Event(), threading.Event(), [], []

    def fetch_files(plan, target, bars):  # the first start's download, held until the second waits for it
        fetched.append(target)
        fetching.set()
        assert go.wait(timeout=60)
        target.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (target / name).write_bytes(data)

    real_check, real_locked = hub.check_files, disk.locked
    monkeypatch.setattr(hub, "fetch_files", fetch_files)
    monkeypatch.setattr(
        hub,
        "check_files",
        lambda plan, target, bars: checked.append(target) or real_check(plan, target, bars=bars),
    )

    def noted(handle, wait=True):
        if wait:
            waiting.set()  # the second start, about to wait for the first
        return real_locked(handle, wait)

    monkeypatch.setattr(disk, "locked", noted)
    results = {}

    def start(which):
        try:
            results[which] = resolve_model_path("lmsys/vicuna-7b-v1.5")
        except Exception as err:
            results[which] = err
            waiting.set()

    first = threading.Thread(target=start, args=("first",))
    first.start()
    assert fetching.wait(timeout=60)
    second = threading.Thread(target=start, args=("second",))
    second.start()
    assert waiting.wait(timeout=60) and "second" not in results
    go.set()
    first.join()
    second.join()
    assert results == {"first": folder, "second": folder}
    assert fetched == [folder] and checked == [folder]  # the second neither fetched nor hashed it again
    lock = folder.with_name(f".{folder.name}.lock")
    assert f"Waiting for another vicuna process downloading into {folder} (it holds {lock}) ..." in (
        capsys.readouterr().err
    )
    assert load("lmsys/vicuna-7b-v1.5") is not None


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(tmp_path)


def test_a_chat_model_whose_checkpoint_names_another_class_than_for_causal_lm_loads(tiny_llama_dir, tmp_path):
    """Gemma 3 4B to 27B name Gemma3ForConditionalGeneration (the model with its image encoder), which runs
    text alone and which transformers loads as a causal LM: they were refused as 'not a causal language
    model'."""
    import torch
    from transformers import AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration

    from tests.tiny_models import tiny_config
    from vicuna.config import SamplingParams
    from vicuna.engine.events import Finished

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28
    )
    text = tiny_config("gemma3_text", len(tok)).to_dict()
    config = Gemma3Config(text_config=text, vision_config=dict(vision, patch_size=14), mm_tokens_per_image=4)
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(config).save_pretrained(tmp_path / "gemma3")
    tok.save_pretrained(tmp_path / "gemma3")
    engine = load(tmp_path / "gemma3")
    events = list(engine.generate(engine.encode("Hello"), SamplingParams(temperature=0, max_new_tokens=4)))
    assert isinstance(events[-1], Finished) and events[-1].completion_tokens >= 1


def test_an_architecture_without_attention_is_refused_by_name(tmp_path):
    """A Mamba checkpoint ended in "AttributeError: 'MambaConfig' object has no attribute
    'num_attention_heads'" with a traceback."""
    from transformers import MambaConfig

    MambaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2).save_pretrained(tmp_path)
    with pytest.raises(
        ModelLoadError, match="'mamba' has no num_attention_heads: not an attention transformer"
    ):
        load(tmp_path)


@pytest.mark.parametrize("architecture", ["BertForMaskedLM", "BertLMHeadModel"])
def test_architecture_we_cannot_run(model_copy, architecture):
    # BertLMHeadModel is in transformers' causal-LM table, but it is an encoder, no chat model
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["architectures"] = [architecture]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=f"{architecture} is not a causal language model"):
        load(model_copy)


def test_unknown_model_type(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"] = "no-such-model"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="no-such-model"):
        load(model_copy)


def test_truncated_safetensors_shard_is_named(model_copy):
    shard = model_copy / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: truncated"):
        load(model_copy)


@pytest.mark.parametrize("kept", [0, 5, 8, 100])
def test_a_shard_cut_short_inside_its_header_is_said_cut_short(model_copy, kept):
    """A shard that ends inside its header (a download or copy stopped in its first bytes) was "not a
    valid safetensors file", which reads as a wrong format, not as a file to fetch again."""
    shard = model_copy / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:kept])
    with pytest.raises(
        ModelLoadError, match=rf"model\.safetensors: cut short: {kept} bytes on disk.*download it again"
    ):
        load(model_copy)


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (
            {"num_key_value_heads": 3},
            "model.layers.0.self_attn.k_proj.weight is [32, 64] in model.safetensors, [48, 64] by config.json "
            "(and 3 more tensors)",
        ),
        (
            {"hidden_size": 128},
            "model.embed_tokens.weight is [400, 64] in model.safetensors, [400, 128] by config.json",
        ),
    ],
)
def test_a_config_that_does_not_match_the_weights_names_the_first_tensor(model_copy, overrides, said):
    """Said only "cannot load the weights (RuntimeError: ... look at the above report!)", the tensors named
    only in the table transformers prints before it."""
    config = json.loads((model_copy / "config.json").read_text(encoding="utf-8"))
    (model_copy / "config.json").write_text(json.dumps({**config, **overrides}), encoding="utf-8")
    with pytest.raises(ModelLoadError) as info:
        load(model_copy)
    message = str(info.value)
    assert message.startswith(f"{model_copy}: config.json does not match the weights: {said}")
    assert message.endswith("correct config.json to the values the model was trained with")


def test_a_config_that_does_not_match_pytorch_bin_weights_names_the_tensor(tmp_path):
    model = write_tiny_llama(tmp_path / "model", safe_serialization=False)
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}), encoding="utf-8")
    with pytest.raises(
        ModelLoadError,
        match=re.escape(
            "model.layers.0.mlp.gate_proj.weight is [128, 64] in pytorch_model.bin, [100, 64] by config.json"
        ),
    ):
        load(model)


def test_running_out_of_gpu_memory_while_loading_is_said_as_such(model_copy, monkeypatch, gpu_out_of_memory):
    """Apple's GPU (mps) runs out of memory with a RuntimeError, which the loader took for a config that does
    not match its weights: it compared every tensor's shape, then said "cannot load the weights"."""
    from transformers import AutoModelForCausalLM

    def from_pretrained(*args, **kwargs):
        raise gpu_out_of_memory()

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(ModelLoadError, match=r"out of memory while loading \(.*\); see `vicuna doctor`"):
        load(model_copy)


def test_index_listing_a_missing_shard(model_copy):
    (model_copy / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors, which is missing"):
        load(model_copy)


@pytest.mark.parametrize(
    "index, expected",
    [
        ([], "not a valid index (TypeError"),
        ({"weight_map": {"lm_head.weight": None}}, "weight_map must map each tensor name to a file name"),
    ],
    ids=["list", "null-file"],
)
def test_an_index_of_the_wrong_shape_is_named(model_copy, index, expected):
    """`[]` ended in "TypeError: list indices must be integers", a null file name in "unsupported operand
    type(s) for /: 'PosixPath' and 'NoneType'", each with a traceback."""
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=rf"model\.safetensors\.index\.json: {re.escape(expected)}"):
        load(model_copy)


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"eos_token_id": ', "not valid JSON"),
        ("[]", "expected a JSON object of fields, found list"),
        (
            '{"eos_token_id": "2"}',
            "eos_token_id is '2'; expected a token id (a whole number) or a list of them",
        ),
    ],
    ids=["cut-short", "list", "string-id"],
)
def test_a_bad_generation_config_is_named(model_copy, text, expected):
    """Cut short, it was passed over without a word (and with it the ids that end a reply); a list, or an
    id as a string, ended in a TypeError with a traceback."""
    (model_copy / "generation_config.json").write_text(text)
    with pytest.raises(ModelLoadError, match=rf"generation_config\.json: {re.escape(expected)}"):
        load(model_copy)


def test_bin_checkpoint_loads_and_corrupt_bin_is_named(tmp_path):
    folder = write_tiny_llama(tmp_path / "bin", safe_serialization=False)
    bins = sorted(folder.glob("*.bin"))
    assert bins, "expected a .bin checkpoint"
    assert load(folder).model_name == "bin"
    bins[0].write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(ModelLoadError, match=bins[0].name):
        load(folder)


def test_a_folder_without_tokenizer_files_says_so(model_copy):
    """It was told transformers' "You need to have sentencepiece or tiktoken installed", which they were."""
    for path in model_copy.glob("tokenizer*"):
        path.unlink()
    with pytest.raises(
        ModelLoadError, match=r"model: no tokenizer files \(tokenizer\.json, tokenizer\.model"
    ):
        load(model_copy)


def test_tokenizer_larger_than_embedding(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["vocab_size"] = 100
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ModelLoadError, match=r"tokenizer has 400 tokens but the model's embedding has 100 rows"
    ):
        load(model_copy)


def test_blank_eos_token_is_the_never_stops_problem(model_copy):
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = model_copy / name
        if path.exists():
            data = json.loads(path.read_text())
            data["eos_token"] = ""
            path.write_text(json.dumps(data))
    tok = json.loads((model_copy / "tokenizer.json").read_text())
    for added in tok.get("added_tokens", []):
        if added["content"] == "</s>":
            added["special"] = False
    (model_copy / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ModelLoadError, match="no EOS token so replies would never stop"):
        load(model_copy)


def decapoda_tokenizer(folder):
    """decapoda-research/llama-7b-hf's tokenizer files, which FastChat's tutorials used as the base: every
    special token blank, the class spelled LLaMATokenizer, and no tokenizer.json."""
    (folder / "tokenizer.json").unlink()
    (folder / "special_tokens_map.json").write_text("{}")
    fields = {"bos_token": "", "eos_token": "", "tokenizer_class": "LLaMATokenizer", "unk_token": ""}
    (folder / "tokenizer_config.json").write_text(json.dumps(fields))
    return folder


def test_decapoda_s_blank_special_tokens_are_named_with_what_to_write(model_copy, capsys):
    """transformers fails on them with only 'RecursionError: maximum recursion depth exceeded'."""
    decapoda_tokenizer(model_copy)
    assert cli(["chat", "--model-path", str(model_copy), "--max-new-tokens", "32"]) == 2
    err = capsys.readouterr().err
    assert "Recursion" not in err
    assert (
        "tokenizer_config.json 'bos_token', tokenizer_config.json 'eos_token', tokenizer_config.json "
        "'unk_token' are blank" in err
    )
    assert '"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"' in err
    fields = json.loads((model_copy / "tokenizer_config.json").read_text())
    fields |= {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}  # as the error says
    (model_copy / "tokenizer_config.json").write_text(json.dumps(fields))
    assert load_tokenizer(model_copy).eos_token_id == 2


def test_an_interrupted_merge_is_told_to_be_finished_before_its_model_is_used(tmp_path, capsys):
    """A merge or conversion cut short leaves NAME.partial with its first shards and no index. Chatting with
    NAME was told that --model-path takes no name of Ollama's library; with NAME.partial, loading went on
    for a while, then failed with transformers' 'no file named model.safetensors'."""
    from tests.weights.test_checkpoint import UNIFORM_SHAPES, _interrupted_at_the_third_shard, random_state

    out = tmp_path / "vicuna-7b-all-v1.1"
    _interrupted_at_the_third_shard(out, random_state(UNIFORM_SHAPES))
    again = "run the same command (convert, delta apply, get) again to finish it"
    with pytest.raises(ModelLoadError) as named:
        load(out)
    assert (
        str(named.value)
        == f"{out} does not exist yet: {out}.partial holds the interrupted job that makes it; {again}"
    )
    assert cli(["chat", "--model-path", f"{out}.partial"]) == 2
    err = capsys.readouterr().err
    assert f"{out}.partial is an unfinished job's folder" in err and err.rstrip().endswith(
        f"{again}, then use {out}"
    )


def test_a_training_run_that_has_not_written_its_model_says_to_resume_it_or_use_a_checkpoint(
    tiny_llama_dir, tmp_path, capsys
):
    """`vicuna train --output-dir out` stopped (or running still) has its run record and checkpoints, not yet
    its model: chatting with `out` was told only 'no config.json; expected an HF-format model folder'."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "vicuna-train.json").write_text("{}")
    with pytest.raises(ModelLoadError) as err:
        load(out)
    assert str(err.value) == (
        f"{out} holds a training run that has not written its model yet (stopped, or still running): the "
        "same `vicuna train` command with --resume finishes it"
    )
    for step in (2, 10):
        shutil.copytree(tiny_llama_dir, out / f"checkpoint-{step}")
    (out / "checkpoint-12").mkdir()  # being written: no config yet
    assert cli(["chat", "--model-path", str(out)]) == 2
    assert capsys.readouterr().err.rstrip().endswith(f"its latest checkpoint is {out / 'checkpoint-10'}")


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    assert cli(["chat", "--model-path", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such file or folder" in err and "Traceback" not in err


def test_recorded_template_wins_over_the_name(model_copy):
    (model_copy / "vicuna.json").write_text(json.dumps({"conv_template": "chatml"}))
    assert load(model_copy).template.name == "chatml"
    engine = load_engine(ModelSettings(model_path=str(model_copy), conv_template="llama-2"), progress=False)
    assert engine.template.name == "llama-2"


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"conv_template": "llama-2",', "not valid JSON"),
        ("[]", "expected an object whose conv_template names a template"),
        ('{"conv_template": "chatml", "conv_system_msg": 5}', "expected an object whose conv_template"),
        ('{"conv_template": "nosuch"}', "conv_template: unknown template 'nosuch'"),
    ],
    ids=["cut-short", "list", "system-number", "unknown"],
)
def test_a_bad_recorded_template_is_named_with_its_file(model_copy, text, expected):
    """A vicuna.json cut short, not an object, or with a number for the system prompt, ended in
    JSONDecodeError, AttributeError or TypeError with a traceback; an unknown name in it was said as
    "unknown template", as if --conv-template had named it."""
    (model_copy / "vicuna.json").write_text(text)
    with pytest.raises(ModelLoadError, match=rf"vicuna\.json: {re.escape(expected)}"):
        load(model_copy)
    assert load_engine(ModelSettings(model_path=str(model_copy), conv_template="chatml"), progress=False)


def test_a_llama_3_tokenizer_without_a_chat_template_gets_llama_3_and_stops_at_its_end_of_turn(tmp_path):
    """Known by its tokenizer's special tokens, whatever its folder is named: before, vicuna_v1.1, whose
    `</s>` a Llama 3 model never writes, so replies ran on to the token limit."""
    from transformers import AutoTokenizer

    from vicuna.conversation import Message

    specials = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    folder = write_tiny_llama(tmp_path / "model", vocab_size=403)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == 400 and not tokenizer.chat_template
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.save_pretrained(folder)
    engine = load(folder)
    assert engine.template.name == "llama-3"
    assert engine.template_stop_ids == (402,)  # <|eot_id|>, a token: its text is never decoded
    ids = engine.encode_chat([Message("user", "Hi")])  # BOS, then each header and end of turn one token
    assert ids[:2] == [1, 400] and [ids.count(t) for t in (400, 401, 402)] == [2, 2, 1]


def without_bos_token(model_copy, chat_template=None):
    data = json.loads((model_copy / "tokenizer_config.json").read_text())
    data["bos_token"] = None
    if chat_template is not None:
        data["chat_template"] = chat_template
    (model_copy / "tokenizer_config.json").write_text(json.dumps(data))
    tok = json.loads((model_copy / "tokenizer.json").read_text())
    for added in tok.get("added_tokens", []):
        if added["content"] == "<s>":
            added["special"] = False
    (model_copy / "tokenizer.json").write_text(json.dumps(tok))
    return model_copy


def test_missing_bos_token_is_named(model_copy):
    with pytest.raises(ModelLoadError, match="defines no BOS token"):
        load(without_bos_token(model_copy))
    with pytest.raises(ModelLoadError, match="defines no BOS token"):  # a template that writes it
        load(without_bos_token(model_copy, "{{ bos_token }}{{ messages[0]['content'] }}"))


def test_a_model_whose_chat_template_writes_no_bos_needs_none(model_copy):
    """Qwen2's config names a bos_token_id, its tokenizer has `bos_token: null` and its chat template writes
    no BOS: every Qwen2 / Qwen2.5 checkpoint was refused for a token it never uses."""
    from vicuna.conversation import Message

    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
    engine = load(without_bos_token(model_copy, template))
    assert engine.template.name == "hf"
    ids = engine.encode_chat([Message("user", "Hello")])
    assert ids == engine.tokenizer("<|user|>Hello<|assistant|>", add_special_tokens=False)["input_ids"]
    named = [{"name": "default", "template": template}, {"name": "tool_use", "template": template}]
    assert load(without_bos_token(model_copy, named)).encode_chat([Message("user", "Hello")]) == ids


def test_lora_adapter_folder_points_to_merge(tmp_path):
    """The command suggested had `--base BASE` even where the adapter's config records its base."""
    adapter = tmp_path / "我的 adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=f"vicuna lora merge --base BASE --adapter '{adapter}' --output"):
        load(adapter)
    base = tmp_path / "基础 模型"
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    with pytest.raises(ModelLoadError) as err:
        load(adapter)
    assert f"`vicuna lora merge --base '{base}' --adapter '{adapter}' --output OUT`" in str(err.value)


def test_a_litgpt_checkpoint_says_how_to_make_it_one_to_load(model_copy, tmp_path):
    """LitGPT's folders (checkpoints/OWNER/NAME, out/finetune/lora/final) were told only "no weights" or "no
    config.json"; the model.pth its convert_from_litgpt writes, "no weights", though it loads as
    pytorch_model.bin."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(model_copy / "model.safetensors")
    (model_copy / "model.safetensors").unlink()
    torch.save(weights, model_copy / "lit_model.pth")  # its tensors' names are LitGPT's: never loaded here
    with pytest.raises(
        ModelLoadError, match=r"no weights .*; it is a LitGPT checkpoint \(lit_model\.pth\): "
    ):
        load(model_copy)
    finetuned = tmp_path / "final"
    finetuned.mkdir()
    (finetuned / "lit_model.pth.lora").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=f"no config.json; .*`litgpt merge_lora {finetuned}`, then "):
        load(finetuned)
    (model_copy / "lit_model.pth").rename(model_copy / "model.pth")  # as convert_from_litgpt names it
    with pytest.raises(
        ModelLoadError, match="model.pth, as LitGPT's convert_from_litgpt names it, is read as "
    ):
        load(model_copy)
    (model_copy / "model.pth").rename(model_copy / "pytorch_model.bin")  # as the error says
    assert load(model_copy).model_name == "model"


def test_delta_weights_passed_as_the_model_say_to_merge_them_first(tiny_llama_dir, tmp_path):
    from vicuna.weights.delta import make_delta

    target = write_tiny_llama(tmp_path / "target", seed=1)
    delta = make_delta(tiny_llama_dir, target, tmp_path / "vicuna-7b-delta-v1.1", progress=False)
    with pytest.raises(ModelLoadError) as err:
        load(delta)
    assert str(err.value).startswith(f"{delta} holds Vicuna delta weights, not a model (its final norm")
    assert f"vicuna delta apply --base LLAMA_HF_FOLDER --delta {delta} --target NEW_FOLDER" in str(err.value)


POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize 318176\n".format("0" * 64)


def test_a_git_lfs_pointer_instead_of_the_weights_says_to_pull_them(model_copy, tmp_path):
    (model_copy / "model.safetensors").write_text(POINTER)  # `git clone` without git-lfs
    with pytest.raises(ModelLoadError) as err:
        load(model_copy)
    assert str(err.value).startswith(f"{model_copy / 'model.safetensors'} is a Git LFS pointer (")
    assert f"in {model_copy} run `git lfs install && git lfs pull`" in str(err.value)
    bins = write_tiny_llama(tmp_path / "bin", safe_serialization=False)
    (bins / "pytorch_model.bin").write_text(POINTER)
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin is a Git LFS pointer"):
        load(bins)


def test_the_loaded_line_names_the_device_the_weights_are_on():
    import torch

    from vicuna.engine.loader import placed_on

    cuda = torch.device("cuda")
    assert placed_on({"": "cpu"}, torch.device("cpu"), load_8bit=False) == "cpu"
    assert placed_on({"": 0}, cuda, load_8bit=False) == "cuda:0"
    assert placed_on({"model.embed_tokens": 0, "lm_head": 1}, cuda, load_8bit=False) == "cuda:0+cuda:1"
    assert placed_on({"": "cpu"}, cuda, load_8bit=True) == "cuda:0"  # loaded on the CPU, then moved


@pytest.mark.parametrize(
    "flags, error",
    [
        ({"device": "cuda"}, "--device cuda: no CUDA GPU"),
        ({"device": "cpu", "max_gpu_memory": "13"}, "--max-gpu-memory: cannot read '13'"),
    ],
)
def test_flags_are_refused_before_the_model_is_converted_or_read(monkeypatch, flags, error):
    """`--device cuda` on a machine without one was said after the built-in model (or a .gguf file) was
    converted, which takes minutes and gigabytes for a 7B model."""
    import torch

    from vicuna.engine import loader

    if flags.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("checks a machine without a CUDA GPU")

    def no_model(path):
        raise AssertionError("the model was looked at before the flags were checked")

    monkeypatch.setattr(loader, "resolve_model_path", no_model)
    with pytest.raises(VicunaError, match=error):
        load_engine(ModelSettings(**flags))


def test_loading_into_a_log_draws_no_progress_bar(tiny_llama_dir, capfd):
    """`vicuna serve > log 2>&1` (or a piped chat) got transformers' "Loading weights" bar, redrawn with
    carriage returns; out of a terminal only the "Loaded" line is written, and the bars' setting is kept."""
    from transformers.utils import logging as transformers_logging

    was = transformers_logging.is_progress_bar_enabled()
    load_engine(ModelSettings(model_path=str(tiny_llama_dir), device="cpu"))
    err = capfd.readouterr().err
    assert "Loaded " in err
    assert "Loading weights" not in err and "\r" not in err
    assert transformers_logging.is_progress_bar_enabled() == was


@pytest.mark.parametrize(("term", "drawn"), [("xterm-256color", True), ("dumb", False)])
def test_loading_on_a_dumb_terminal_draws_no_progress_bar(tiny_llama_dir, monkeypatch, term, drawn, screen):
    """On a dumb terminal (TERM=dumb: Emacs' M-x shell, where Emacspeak reads out each redraw) the
    "Loading weights" bar was drawn as on any terminal, one line redrawn with carriage returns."""
    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setenv("TERM", term)
    load_engine(ModelSettings(model_path=str(tiny_llama_dir), device="cpu"))
    assert "Loaded " in screen.getvalue()
    assert ("Loading weights" in screen.getvalue()) == drawn


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident memory from /proc")
def test_encoding_distinct_texts_on_several_threads_keeps_none_of_them(tiny_llama_dir):
    """The tokenizer's word cache kept up to 10,000 texts for each thread that encoded (a LLaMA tokenizer
    does not split at spaces: a whole text is one word), so a server encoding distinct short texts on its
    worker threads grew by ~4 KB a request: 16,000 texts on 4 threads, 25 MB here (under 3 MB without the cache)."""
    tokenizer = load_tokenizer(tiny_llama_dir)
    words = ["hello", "world", "the", "capital", "of", "France", "is", "Paris", "你好", "世界", "assistant"]
    texts = [f"{i} " + " ".join(words[(i * k) % len(words)] for k in range(20)) for i in range(16_000)]

    def encode(part: list[str]) -> None:
        for text in part:
            tokenizer(text)

    encode(texts[:100])  # what the first call allocates once
    before = resident_bytes()
    threads = [threading.Thread(target=encode, args=(texts[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert resident_bytes() - before < 8 * 2**20


def test_the_word_cache_goes_where_a_piece_is_a_whole_text_and_stays_where_it_is_a_word():
    from tokenizers import pre_tokenizers

    from vicuna.engine.loader import without_word_cache

    class Backend:  # a fast tokenizer's `tokenizers` object: its pre-tokenizer, and its model's cache
        def __init__(self, pre):
            self.pre_tokenizer, self.model, self.sizes = pre, self, []

        def _resize_cache(self, size):
            self.sizes.append(size)

    class Tokenizer:
        def __init__(self, pre):
            self._tokenizer = Backend(pre)

    cases = [
        (pre_tokenizers.Metaspace(prepend_scheme="first", split=False), [0]),  # LLaMA's: a text, one piece
        (None, [0]),
        (pre_tokenizers.ByteLevel(add_prefix_space=False), []),  # SmolLM2's, LLaMA 3's: words
    ]
    for pre, resized in cases:
        tokenizer = Tokenizer(pre)
        without_word_cache(tokenizer)
        assert tokenizer._tokenizer.sizes == resized, pre


def test_a_gguf_file_whose_conversion_cannot_fit_the_ram_is_refused_before_it_starts(
    tmp_path, monkeypatch, capsys
):
    """A GGUF file is dequantized into float32 in memory as it is converted: a 7B model's 4 GB Q4 file was
    converted on an 8 GB laptop until the system killed `vicuna chat`, before the model's fit was checked.
    Free swap counts: the conversion, made once, may page (as it could before the check)."""
    import dataclasses
    from types import SimpleNamespace

    import psutil

    from vicuna.engine import memory
    from vicuna.engine.loader import check_conversion_fits
    from vicuna.weights.builtin import builtin_gguf, gguf_cache_dir

    monkeypatch.setenv("VICUNA_HOME", str(tmp_path / "home"))
    gguf = tmp_path / "model.gguf"
    gguf.symlink_to(builtin_gguf())  # 134.5M parameters: 513 MiB in float32
    hw = dataclasses.replace(memory.probe_hardware(), ram_available=400 * 2**20)
    monkeypatch.setattr(memory, "probe_hardware", lambda: hw)
    monkeypatch.setattr(psutil, "swap_memory", lambda: SimpleNamespace(free=0))
    assert cli(["chat", "--model-path", str(gguf), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "to float32: at least 513 MiB of memory, and 400 MiB is available (RAM and swap)" in err
    assert not gguf_cache_dir(gguf).exists()  # nothing converted
    monkeypatch.setattr(psutil, "swap_memory", lambda: SimpleNamespace(free=200 * 2**20))
    assert check_conversion_fits(gguf) > 500 * 2**20  # with swap it goes on: the copy's size, for the disk


def test_a_gguf_file_whose_float32_copy_cannot_fit_the_disk_is_refused_before_it_converts(
    tmp_path, monkeypatch
):
    """A GGUF file is converted into a float32 copy (27 GB for a 7B model) without a look at the free disk:
    it failed only after minutes, once the disk was full."""
    from vicuna.weights import builtin, disk
    from vicuna.weights.builtin import builtin_gguf, gguf_cache_dir

    def converted(*args, **kwargs):
        raise AssertionError("converted without room for it")

    monkeypatch.setenv("VICUNA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(disk, "free_bytes", lambda folder: 50 * 10**6)
    monkeypatch.setattr(builtin, "_convert", converted)
    gguf = tmp_path / "model.gguf"
    gguf.symlink_to(builtin_gguf())  # 134.5M parameters: 538 MB in float32
    out = gguf_cache_dir(gguf)
    with pytest.raises(ModelLoadError) as err:
        load(gguf)
    assert str(err.value) == (
        f"converting model.gguf into float32 needs 0.54 GB of free disk in {out.parent}, but only 50.0 MB "
        "is available there; free 0.49 GB or choose another folder (set VICUNA_HOME to a folder on another disk)"
    )
    assert not out.exists()


def test_the_built_in_model_s_copy_that_cannot_fit_the_disk_is_refused_before_it_converts(
    tmp_path, monkeypatch
):
    """The built-in model's first start on a small $VICUNA_HOME (a container's volume, a quota'd home) failed
    only after its file was read and dequantized, with safetensors' words and no sizes; as a .gguf file is."""
    from vicuna.engine.loader import resolve_model_path
    from vicuna.weights import builtin, disk
    from vicuna.weights.builtin import BUILTIN_NAME, builtin_gguf, gguf_cache_dir

    def converted(*args, **kwargs):
        raise AssertionError("converted without room for it")

    monkeypatch.setenv("VICUNA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(disk, "free_bytes", lambda folder: 2 * 10**6)
    monkeypatch.setattr(builtin, "_convert", converted)
    out = gguf_cache_dir(builtin_gguf(), BUILTIN_NAME)
    with pytest.raises(ModelLoadError) as err:
        resolve_model_path(None, progress=False)
    assert str(err.value).startswith(
        f"converting {builtin_gguf().name} into float32 needs 0.54 GB of free disk in {out.parent}, but only 2.0 MB"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "text, expected",
    [
        (b"[]", "expected a JSON object of fields, found list"),
        (b"null", "expected a JSON object of fields, found NoneType"),
        ('{"model_type": "llama", "note": "你好"}'.encode("gbk"), "not valid JSON"),
        (b'{"model_type": "llama", "architectures": "LlamaForCausalLM"}', "'architectures' should be a list"),
        (b'{"model_type": "llama", "architectures": [null]}', "'architectures' should be a list of class"),
    ],
    ids=["list", "null", "gbk", "architectures-string", "architectures-null"],
)
def test_a_config_that_is_no_object_of_fields_is_named(model_copy, text, expected):
    """`[]` or `null` ended in "AttributeError: 'list' object has no attribute 'get'", a GBK config in
    UnicodeDecodeError, both with a traceback; an 'architectures' string was refused as "architecture L", and
    [null] ended in "AttributeError: 'NoneType' object has no attribute 'endswith'"."""
    (model_copy / "config.json").write_bytes(text)
    with pytest.raises(ModelLoadError, match=rf"config\.json: {expected}"):
        load(model_copy)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("hidden_size", "64", "Validation error for field 'hidden_size'.*expected int, got str"),
        ("hidden_size", 0, "hidden_size is 0; expected a whole number above 0"),
        ("num_hidden_layers", -1, "num_hidden_layers is -1; expected a whole number above 0"),
        ("max_position_embeddings", -1, "max_position_embeddings is -1; expected a whole number above 0"),
    ],
)
def test_a_size_field_of_the_wrong_type_or_below_one_is_named(model_copy, field, value, expected):
    """A hidden_size of "4096" ended in transformers' StrictDataclassFieldValidationError, 0 in
    ZeroDivisionError and a negative layer count in IndexError, each with a traceback."""
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg[field] = value
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=rf"config\.json: {expected}"):
        load(model_copy)


def test_a_model_named_as_ollama_names_it_is_told_what_model_path_takes(tmp_path, monkeypatch):
    """`--model-path llama3` or `qwen2.5:7b` (Ollama's library names), and `hf.co/OWNER/NAME:Q4_K_M` (Ollama's
    name for a Hub repository's GGUF file), were answered 'no such file or folder' alone."""
    from vicuna.engine.loader import resolve_model_path

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path / "home"))
    for name in ("llama3", "qwen2.5:7b"):
        with pytest.raises(ModelLoadError) as info:
            resolve_model_path(name)
        assert str(info.value) == (
            f"{name}: no such file or folder; --model-path takes an HF-format folder, a .gguf file or a Hugging "
            "Face Hub repository OWNER/NAME (e.g. Qwen/Qwen2.5-7B-Instruct), not a name of Ollama's library "
            "such as llama3 or qwen2.5:7b"
        )
    for name in (
        "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
        "bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
    ):
        with pytest.raises(ModelLoadError) as info:
            resolve_model_path(name)
        assert str(info.value) == (
            f"{name}: no such file or folder; a Hugging Face Hub repository is named OWNER/NAME alone "
            "(bartowski/Llama-3.2-1B-Instruct-GGUF), without Ollama's hf.co/ or :TAG; one GGUF file of it is "
            "fetched with `vicuna download bartowski/Llama-3.2-1B-Instruct-GGUF --include '*[Qq]4_[Kk]_[Mm]*.gguf'`, "
            f"then run as --model-path {tmp_path}/home/models/bartowski--Llama-3.2-1B-Instruct-GGUF/FILE.gguf"
        )
    (tmp_path / "runs").mkdir()
    for mistyped in ("runs/chekpoint-9", "model.gguf"):  # a path mistyped is said as before
        with pytest.raises(ModelLoadError, match=f"^{mistyped}: no such file or folder$"):
            resolve_model_path(mistyped)


def test_litgpt_s_folder_for_a_hub_repository_is_told_to_name_the_repository(tmp_path, monkeypatch):
    """`--model-path checkpoints/OWNER/NAME`, where LitGPT keeps what `litgpt download OWNER/NAME` fetched,
    was answered 'no such file or folder' alone after `vicuna download OWNER/NAME`, which keeps it elsewhere."""
    from vicuna.engine.loader import resolve_model_path

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        resolve_model_path("checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct")
    assert str(info.value) == (
        "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct: no such file or folder; LitGPT downloads "
        "HuggingFaceTB/SmolLM2-135M-Instruct into checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct, vicuna into "
        "$VICUNA_HOME/models: --model-path HuggingFaceTB/SmolLM2-135M-Instruct (downloaded on its first start, "
        "then found there)"
    )


def test_a_gguf_file_without_its_ending_is_told_to_take_one(tmp_path):
    """Ollama keeps its models as GGUF files named blobs/sha256-HEX: given to --model-path, one was refused
    as neither a folder nor a .gguf file, without a word that it is a GGUF file all the same."""
    from vicuna.engine.loader import resolve_model_path

    blob = tmp_path / "blobs" / "sha256-6a0746a1ec1a"
    blob.parent.mkdir()
    blob.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    with pytest.raises(ModelLoadError) as info:
        resolve_model_path(str(blob))
    assert str(info.value) == (
        f"{blob}: expected an HF-format folder or a .gguf file; this one is a GGUF file (as Ollama keeps its "
        f"models): give it a name that ends in .gguf, e.g. `ln -s {blob} MODEL.gguf`, then --model-path MODEL.gguf"
    )
    other = tmp_path / "notes.txt"
    other.write_text("GGU")
    with pytest.raises(ModelLoadError, match=r"notes.txt: expected an HF-format folder or a .gguf file$"):
        resolve_model_path(str(other))


def test_a_gguf_file_s_model_is_named_by_the_file_not_by_its_converted_copy(
    tiny_llama_dir, tmp_path, monkeypatch
):
    """A .gguf file's model was named as its converted copy's folder, Llama-3.2-1B-Q4_K_M-1a2b3c4d5e6f: the
    name clients must send as 'model' changed (a 404 for the old one) each time the file was downloaded
    again or touched, as the copy's key holds the file's size and time."""
    from vicuna.weights import builtin

    def convert(gguf, out, notice=None, needed_bytes=0, progress=True):  # the tiny model as the file's copy
        shutil.copytree(tiny_llama_dir, out)
        return out

    monkeypatch.setattr(builtin, "convert_gguf", convert)
    keyed = builtin.gguf_cache_dir  # named as in $VICUNA_HOME/models, not written there (its kernel is)
    monkeypatch.setattr(builtin, "gguf_cache_dir", lambda gguf: tmp_path / "models" / keyed(gguf).name)
    gguf = tmp_path / "Llama-3.2-1B-Instruct-Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF 1")
    engine = load(gguf)
    assert engine.model_name == "Llama-3.2-1B-Instruct-Q4_K_M"
    gguf.write_bytes(b"GGUF 2, downloaded again")
    assert load(gguf).model_name == "Llama-3.2-1B-Instruct-Q4_K_M"


def test_a_gguf_file_s_conversion_says_where_it_goes_and_its_size(
    tiny_llama_dir, tmp_path, monkeypatch, capsys
):
    """The built-in model's conversion said 'Converting ... once into FOLDER'; a --model-path FILE.gguf's
    said nothing, for minutes (a 7B file), and wrote a float32 copy of 27 GB no message named."""
    from vicuna.engine import loader
    from vicuna.engine.loader import resolve_model_path
    from vicuna.weights import builtin

    def convert(gguf, out):  # the tiny model as the file's copy
        shutil.copytree(tiny_llama_dir, out)
        return out

    monkeypatch.setattr(builtin, "_convert", convert)
    keyed = builtin.gguf_cache_dir
    monkeypatch.setattr(builtin, "gguf_cache_dir", lambda gguf: tmp_path / "models" / keyed(gguf).name)
    monkeypatch.setattr(loader, "check_conversion_fits", lambda gguf: 2_000_000)  # as read from its header
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    out = resolve_model_path(str(gguf))
    assert (
        capsys.readouterr().err
        == f"Converting model.gguf once into {out} (2.0 MB: its weights in float32) ...\n"
    )
    assert resolve_model_path(str(gguf)) == out and capsys.readouterr().err == ""  # converted once


@pytest.mark.parametrize("progress", [False, True])
def test_no_progress_is_said_when_none_is_asked_for(tiny_llama_dir, tmp_path, monkeypatch, capfd, progress):
    """load_engine(..., progress=False) from a notebook still said 'Converting ... once into FOLDER' and
    'Timing float32 against bfloat16 ... (once)' on stderr: a first load of a .gguf file with --dtype auto
    on a CPU says both, unless no progress was asked for."""
    from vicuna.engine import kernel, loader
    from vicuna.weights import builtin

    monkeypatch.setenv("VICUNA_HOME", str(tmp_path / "home"))  # nothing converted or timed yet
    monkeypatch.setattr(builtin, "_convert", lambda gguf, out: shutil.copytree(tiny_llama_dir, out))
    monkeypatch.setattr(loader, "check_conversion_fits", lambda gguf: 2_000_000)  # as read from its header
    monkeypatch.setattr(kernel, "load", lambda progress=True: None)  # not compiled again into tmp_path
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    load_engine(ModelSettings(model_path=str(gguf), device="cpu"), progress=progress)
    out, err = capfd.readouterr()
    assert out == ""
    if progress:
        assert "Converting model.gguf once into" in err and "Timing float32 against bfloat16" in err
    else:
        assert err == ""


def test_load_engine_says_it_returns_an_engine():
    """It had no return annotation: an editor completed nothing after `engine = load_engine(...)`."""
    import typing

    from vicuna.engine.engine import Engine

    # Engine is imported for type checkers only (torch stays unimported until a model loads)
    assert typing.get_type_hints(load_engine, localns={"Engine": Engine})["return"] is Engine


def test_a_model_path_given_as_a_path_loads(tiny_llama_dir):
    """From Python a folder is often a pathlib.Path: it ended in "expected string or bytes-like object"."""
    engine = load_engine(ModelSettings(model_path=tiny_llama_dir, dtype="float32"), progress=False)
    assert engine.model_name == tiny_llama_dir.name
