"""Loading a checkpoint: find it, check it before spending minutes on it, place it, and pick its template.

Every check names the file and the field at fault, so that a user sees "shard 2 is truncated" or
"the tokenizer has no EOS token" instead of a traceback or a model that never stops talking.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vicuna.config import ModelSettings
from vicuna.conversation import (  # RECORDED_TEMPLATE: trainer and lora import it from here
    RECORDED_TEMPLATE,
    HFTemplate,
    Template,
    choose_template_name,
    get_template,
    with_system,
)
from vicuna.errors import ModelLoadError, VicunaError
from vicuna.shell import quote
from vicuna.weights import hub
from vicuna.weights.manifest import redraws, transformers_bar, unfinished_job
from vicuna.weights.tokenizer import blank_special_tokens_error, check_tokenizer

if TYPE_CHECKING:  # imported in load_engine: the checks before loading need no torch
    from vicuna.engine.engine import Engine

CONFIG = "config.json"
RUN_RECORD = "vicuna-train.json"  # in `vicuna train`'s --output-dir: the settings a resumed run must keep
HUB_REPO_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")  # owner/name, as FastChat's --model-path takes it


def resolve_model_path(model_path: str | None, download: bool = True, progress: bool = True) -> Path:
    """The HF-format folder to load: the built-in model, a converted copy of a .gguf file, the folder, or
    a Hugging Face Hub repository (`owner/name` where no such path is here), downloaded first unless
    `download` is False, as FastChat's `--model-path lmsys/vicuna-7b-v1.5` is. `progress`: say that a
    .gguf file (the built-in model's too) is being converted, which takes minutes for a 7B model, or that a
    Hub repository is being downloaded."""
    from vicuna.weights.builtin import (
        BUILTIN_NAME,
        builtin_gguf,
        builtin_model_dir,
        convert_gguf,
        gguf_cache_dir,
    )

    if model_path is None:
        # its float32 copy's size checked free first, as any .gguf file's: a $VICUNA_HOME on a small disk
        # (a container's volume) failed only after the model was read and dequantized, with no sizes said
        gguf = builtin_gguf()
        needed = 0 if (gguf_cache_dir(gguf, BUILTIN_NAME) / CONFIG).is_file() else check_conversion_fits(gguf)
        return builtin_model_dir(progress, needed)
    path = Path(model_path).expanduser()
    if names_hub_repository(model_path):
        return hub_model(model_path, download, progress)
    # a merge or conversion cut short, whose first shards are there without their index: transformers said
    # "no file named model.safetensors" after a while, and of NAME itself that Ollama's names are not taken
    if said := unfinished_job(path, "use"):
        raise ModelLoadError(said)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder{not_a_model_name(model_path)}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path}: expected an HF-format folder or a .gguf file{unnamed_gguf(path)}")
        out = gguf_cache_dir(path)
        needed = 0 if (out / CONFIG).is_file() else check_conversion_fits(path)
        # said as the built-in model's is: minutes of silence, and a copy of 4 bytes a parameter (27 GB for a
        # 7B model's 4 GB file) that its user found nowhere said
        from vicuna.weights.disk import size

        notice = f"Converting {path.name} once into {out}" + (
            f" ({size(needed)}: its weights in float32)" if needed else ""
        )
        return convert_gguf(path, out, notice=f"{notice} ...", needed_bytes=needed, progress=progress)
    if not (path / CONFIG).is_file():
        if (path / "adapter_config.json").is_file():
            base = adapter_base(path)
            raise ModelLoadError(
                f"{path}: a LoRA adapter, not a whole model; merge it first with `vicuna lora merge "
                f"--base {quote(base) if base else 'BASE'} --adapter {quote(str(path))} --output OUT`"
            )
        if (path / RUN_RECORD).is_file():
            raise ModelLoadError(unfinished_training(path))
        raise ModelLoadError(f"{path}: no {CONFIG}; expected an HF-format model folder{litgpt_files(path)}")
    return path


def unfinished_training(output_dir: Path) -> str:
    """What to do with a `vicuna train --output-dir` whose run has not written its model yet (stopped, or
    running still), where 'no config.json' left its user to guess: finish the run, or use a checkpoint."""
    steps = [p.name.removeprefix("checkpoint-") for p in output_dir.glob("checkpoint-*")]
    latest = max(
        (int(n) for n in steps if n.isdigit() and (output_dir / f"checkpoint-{n}" / CONFIG).is_file()),
        default=None,
    )
    said = (
        f"{output_dir} holds a training run that has not written its model yet (stopped, or still running): "
        "the same `vicuna train` command with --resume finishes it"
    )
    if latest is not None:
        said += f"; meanwhile its latest checkpoint is {output_dir / f'checkpoint-{latest}'}"
    return said


def litgpt_files(folder: Path) -> str:
    """What to add to "no config.json" or "no weights" where `folder` holds LitGPT's files: its checkpoints
    (`checkpoints/OWNER/NAME`, `out/finetune/lora/final`) are one lit_model.pth in LitGPT's own tensor
    names, and its convert_from_litgpt writes model.pth, a name transformers does not look for."""
    convert = (
        f"write it in Hugging Face format with `litgpt convert_from_litgpt {quote(str(folder))} OUT`, copy its "
        "config.json and the tokenizer files into OUT, rename OUT/model.pth to pytorch_model.bin, then "
        "--model-path OUT"
    )
    if (folder / "lit_model.pth").is_file():
        return f"; it is a LitGPT checkpoint (lit_model.pth): {convert}"
    if (folder / "lit_model.pth.lora").is_file():
        return f"; it is a LitGPT LoRA checkpoint: merge it with `litgpt merge_lora {quote(str(folder))}`, then {convert}"
    if (folder / "model.pth").is_file():
        return (
            "; model.pth, as LitGPT's convert_from_litgpt names it, is read as pytorch_model.bin: rename it"
        )
    return ""


def not_a_model_name(model_path: str) -> str:
    """What to add to "no such file or folder" where `model_path` is a model's name as Ollama takes it
    (`llama3`, `qwen2.5:7b`, `hf.co/OWNER/NAME:Q4_K_M`): its users typed them and learned only that no such
    file was here, though no file was meant."""
    if said := hub.ollama_hub_name(model_path):
        return f"; {said}"
    parts = Path(model_path).parts
    if len(parts) >= 3 and parts[-3] == "checkpoints":  # LitGPT's folder for a Hub repository
        repo = "/".join(parts[-2:])
        return (
            f"; LitGPT downloads {repo} into checkpoints/{repo}, vicuna into $VICUNA_HOME/models: "
            f"--model-path {repo} (downloaded on its first start, then found there)"
        )
    if "/" in model_path or "\\" in model_path or model_path.endswith(".gguf"):
        return ""  # a path mistyped
    return (
        "; --model-path takes an HF-format folder, a .gguf file or a Hugging Face Hub repository "
        "OWNER/NAME (e.g. Qwen/Qwen2.5-7B-Instruct), not a name of Ollama's library such as llama3 or "
        "qwen2.5:7b"
    )


def unnamed_gguf(path: Path) -> str:
    """What to add where a file without the .gguf ending is a GGUF file all the same (as Ollama keeps its
    models: ~/.ollama/models/blobs/sha256-...)."""
    try:
        with open(path, "rb") as file:
            if file.read(4) != b"GGUF":
                return ""
    except OSError:
        return ""
    return (
        "; this one is a GGUF file (as Ollama keeps its models): give it a name that ends in .gguf, e.g. "
        f"`ln -s {quote(str(path.absolute()))} MODEL.gguf`, then --model-path MODEL.gguf"
    )


def gguf_config(gguf: Path) -> Any:
    """A GGUF file's config, read from its header alone (seconds, where converting the file takes minutes)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:  # gguf raises many kinds of errors for a bad file
        raise ModelLoadError(
            f"{gguf}: cannot read this GGUF file's header ({type(err).__name__}: {err})"
        ) from None


def check_conversion_fits(gguf: Path) -> int:
    """Refuse a GGUF file whose conversion cannot fit the RAM, before it starts: its weights are dequantized
    into float32 in memory (the built-in model's peaked at 1.4x their float32 size), so a 7B model's 4 GB
    Q4 file needs over 27 GB, and on an 8 GB laptop the system killed `vicuna chat` (or `vicuna doctor`)
    with no word of why. Swap counts, free: a one-time conversion may page, as it did before this check.
    Read from the file's header only. Returns the float32 copy's size, which the conversion needs on disk
    (0 where the header cannot be read)."""
    import psutil
    import torch

    from vicuna.engine.memory import gib, model_size, probe_hardware
    from vicuna.errors import DoesNotFitError

    try:
        config = gguf_config(gguf)
    except ModelLoadError:  # said by the conversion, which reads the whole file
        return 0
    need = model_size(config).weight_bytes(torch.float32)
    available = probe_hardware().ram_available + psutil.swap_memory().free
    if need > available:
        raise DoesNotFitError(
            f"{gguf}: vicuna runs a GGUF file by converting it once into an HF folder, its weights dequantized "
            f"to float32: at least {gib(need)} of memory, and {gib(available)} is available (RAM and swap). "
            "Convert it on a "
            "machine with more memory (the folder goes in $VICUNA_HOME/models), or use a smaller model"
        )
    return need


def names_hub_repository(model_path: str) -> bool:
    """Whether a --model-path is a Hub repository's id: owner/name, where no such path is here, nor a folder
    `owner` (`runs/chekpoint-9` is a folder's name mistyped)."""
    path = Path(model_path).expanduser()
    return bool(HUB_REPO_ID.fullmatch(model_path)) and not path.exists() and not path.parent.exists()


def adapter_base(adapter: Path) -> str | None:
    """The base model a LoRA adapter's config records (peft's `base_model_name_or_path`), if it says."""
    try:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):  # `vicuna lora merge` says what is wrong
        return None
    named = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return named if isinstance(named, str) and named.strip() else None


def hub_model(repo_id: str, download: bool, progress: bool = True) -> Path:
    """The folder of a Hub repository, where `vicuna download` puts it; fetched (or its download resumed)
    unless its manifest, written last, says it is complete. With HF_HUB_OFFLINE set, a model copied into it
    without the manifest (by `huggingface-cli download --local-dir`, by hand) is used as it is, where no
    download of it was cut short; nothing is fetched, and what is missing is said."""
    from vicuna.weights.manifest import MANIFEST_NAME

    folder = hub.model_folder(repo_id)
    try:  # not a part fetched by `vicuna download --include '*.json'`, which has its manifest too
        has_model = (folder / CONFIG).is_file() and bool(weight_files(folder))
    except ModelLoadError:
        has_model = False
    if has_model and (folder / MANIFEST_NAME).is_file():
        return folder
    copied_in = has_model and not any(folder.rglob("*.part"))
    if copied_in and hub.offline():
        return folder
    if not download:
        raise ModelLoadError(
            f"{repo_id}: no such folder, and not downloaded yet from the Hugging Face Hub: `vicuna download "
            f"{repo_id}` (or `vicuna chat --model-path {repo_id}`) fetches it into {folder}"
        )
    if hub.offline():  # said before a line that says it is being downloaded
        raise ModelLoadError(hub.not_downloaded_offline(repo_id, folder))
    if progress:
        print(
            f"{repo_id}: no such folder here; downloading it from the Hugging Face Hub into {folder} "
            "(interrupted, the same command resumes it)",
            file=sys.stderr,
            flush=True,
        )
    try:
        with contextlib.redirect_stdout(sys.stderr):  # standard output is the chat's (--style programmatic)
            # a second first start: after the first; a model copied in: checked by the Hub's hashes, and only
            # what it lacks fetched
            return hub.download(repo_id, folder, wait=True, progress=progress)
    except VicunaError as err:  # a mistyped folder, most often: both are said
        as_is = (
            f"; {folder} holds a copy of it, without the {MANIFEST_NAME} a download writes: with "
            "HF_HUB_OFFLINE=1 it is used as it is, unchecked"
            if copied_in
            else ""
        )
        raise ModelLoadError(
            f"{repo_id}: no such file or folder here, and from the Hub: {err}{as_is}"
        ) from err


def read_config(folder: Path) -> Any:
    """The model's config, refused early when it is not a causal language model transformers can run."""
    from transformers import AutoConfig

    raw = json_fields(folder / CONFIG)
    archs = raw.get("architectures") or []
    # a string was read one letter at a time ("architecture L"); a null in the list had no `endswith`
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ModelLoadError(f"{folder / CONFIG}: 'architectures' should be a list of class names")
    if not isinstance(raw.get("model_type"), str):
        raise ModelLoadError(f"{folder / CONFIG}: no 'model_type' field")
    bad = [a for a in archs if not a.endswith("ForCausalLM") and not runs_as_causal_lm(a)]
    if bad:
        raise ModelLoadError(
            f"{folder / CONFIG}: architecture {bad[0]} is not a causal language model; "
            "vicuna runs LLaMA-family (…ForCausalLM) checkpoints"
        )
    from huggingface_hub.errors import StrictDataclassError

    try:
        config = AutoConfig.from_pretrained(folder)
    except StrictDataclassError as err:  # a field of the wrong type: "hidden_size": "4096"
        raise ModelLoadError(f"{folder / CONFIG}: {' '.join(str(err).split())}") from None
    except (ValueError, KeyError) as err:
        raise ModelLoadError(
            f"{folder / CONFIG}: model_type {raw['model_type']!r} is not one this version of transformers can run ({err})"
        ) from None
    text = config.get_text_config()
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads"):  # what sizing reads
        value = getattr(text, field, None)
        if value is None:  # Mamba, RWKV: state, not attention and a KV cache
            raise ModelLoadError(
                f"{folder / CONFIG}: model_type {raw['model_type']!r} has no {field}: not an attention "
                "transformer; vicuna runs LLaMA-family (decoder-only transformer) checkpoints"
            )
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:  # 0 divided the sizing
            raise ModelLoadError(f"{folder / CONFIG}: {field} is {value!r}; expected a whole number above 0")
    positions = getattr(text, "max_position_embeddings", None)  # optional: 2048 where it is not said
    if positions is not None and positions <= 0:  # said as "a context window of -1 tokens: use less than -1"
        raise ModelLoadError(
            f"{folder / CONFIG}: max_position_embeddings is {positions!r}; expected a whole number above 0"
        )
    check_generation_config(folder / "generation_config.json")
    return config


def json_fields(path: Path) -> dict:
    """The JSON object of fields a model's file holds; refused, naming the file, where it is not valid JSON
    (or not UTF-8) or holds something else (`[]`, `null`)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSON or UTF-8
        raise ModelLoadError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object of fields, found {type(raw).__name__}")
    return raw


def check_generation_config(path: Path) -> None:
    """The token ids that end a reply, where the folder has this file: loading it, transformers passed over
    one that is not valid JSON without a word (a model that ends its turn with an id said only there then
    went on past it), and ended in a TypeError at a list or at an id written as a string."""
    if not path.is_file():
        return
    raw = json_fields(path)
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = raw.get(field)
        ids = value if isinstance(value, list) else [value]
        if not all(i is None or (isinstance(i, int) and not isinstance(i, bool)) for i in ids):
            raise ModelLoadError(
                f"{path}: {field} is {value!r}; expected a token id (a whole number) or a list of them"
            )


def runs_as_causal_lm(architecture: str) -> bool:
    """A chat model whose checkpoint names another class than …ForCausalLM, which transformers loads as a
    causal language model on text alone (Gemma 3 4B-27B: Gemma3ForConditionalGeneration); not the encoders
    that its causal-LM table also lists (BertLMHeadModel, XLNetLMHeadModel), no chat models."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return architecture.endswith("ForConditionalGeneration") and architecture in set(
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    )


def weight_files(folder: Path) -> list[Path]:
    """The weight files a checkpoint declares (through its index) or holds, checked for presence."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, AttributeError, TypeError) as err:  # ValueError: JSON, UTF-8
                raise ModelLoadError(f"{index}: not a valid index ({type(err).__name__}: {err})") from None
            if not all(isinstance(n, str) for n in names):  # sorted() took a lone null
                raise ModelLoadError(f"{index}: weight_map must map each tensor name to a file name")
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise ModelLoadError(f"{index}: lists {missing[0]}, which is missing from {folder}")
            from vicuna.weights.checkpoint import check_all_listed

            check_all_listed(index, [folder / n for n in names])
            return [folder / n for n in names]
    for pattern in ("*.safetensors", "*.bin"):
        found = sorted(p for p in folder.glob(pattern) if "training_args" not in p.name)
        if found:
            return found
    raise ModelLoadError(f"{folder}: no weights (*.safetensors or *.bin files){litgpt_files(folder)}")


def check_weight_file(path: Path) -> None:
    """Refuse a truncated or corrupt shard before loading starts, naming it."""
    from vicuna.weights.checkpoint import check_not_lfs_pointer, check_safetensors_header

    check_not_lfs_pointer(path)
    if path.suffix == ".safetensors":
        check_safetensors_header(path)
        size = path.stat().st_size
        try:
            with path.open("rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if header_len <= 0 or 8 + header_len > size:
                    raise ValueError("header longer than the file")
                header = json.loads(f.read(header_len))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError) as err:
            raise ModelLoadError(f"{path}: not a valid safetensors file ({err})") from None
        if 8 + header_len + end > size:
            raise ModelLoadError(
                f"{path}: truncated: {size} bytes on disk, {8 + header_len + end} expected; download it again"
            )
        return
    import torch

    try:  # weights_only: a checkpoint must never run code; mmap: no need to read it all
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise ModelLoadError(
            f"{path}: cannot be read as a PyTorch checkpoint ({type(err).__name__}: {err})"
        ) from None


def shape_mismatches(folder: Path, config: Any) -> list[str]:
    """Each tensor whose shape in the weights is not the one config.json gives it, in the model's order,
    said with both shapes. transformers 5 prints them in a table and raises only "look at the above
    report"; asked once loading has failed, so a model that loads reads no tensor list twice."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        expected = AutoModelForCausalLM.from_config(config).state_dict()
    stored: dict[str, tuple[str, list[int]]] = {}  # name -> (file, shape)
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                    stored[name] = (path.name, list(f.get_slice(name).get_shape()))
        else:
            tensors = torch.load(path, map_location="meta", weights_only=True, mmap=True)
            stored |= {name: (path.name, list(t.shape)) for name, t in tensors.items()}
    return [
        f"{name} is {stored[name][1]} in {stored[name][0]}, {list(tensor.shape)} by {CONFIG}"
        for name, tensor in expected.items()
        if name in stored and stored[name][1] != list(tensor.shape)
    ]


def load_tokenizer(model_path: str | Path | None) -> Any:
    from transformers import AutoTokenizer

    folder = model_path if isinstance(model_path, Path) else resolve_model_path(model_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # tokenizers fail in many ways; none is the user's to debug
        # none at all was said as "You need to have sentencepiece or tiktoken installed", which they were
        if not any(p.name.startswith("tokenizer") for p in folder.iterdir()):
            raise ModelLoadError(
                f"{folder}: no tokenizer files (tokenizer.json, tokenizer.model, tokenizer_config.json); "
                "copy them from where the model came from"
            ) from None
        raise ModelLoadError(
            blank_special_tokens_error(folder)
            or f"{folder}: cannot load the tokenizer ({type(err).__name__}: {err})"
        ) from None
    without_word_cache(tokenizer)
    return tokenizer


def without_word_cache(tokenizer: Any) -> None:
    """Turn off the word cache of a fast tokenizer (the `tokenizers` library) whose pieces are whole texts.

    The cache keeps up to 10,000 pre-tokenized pieces, and in tokenizers 0.23 that many again for each
    thread that encodes: a server encodes on many (its event loop's worker threads, the web UI's). A LLaMA
    tokenizer does not split its text at spaces, so a whole short prompt is one piece, and serving short
    distinct texts (embeddings of sentences) grew the server by ~4 KB a request on 6 threads (on 2, until
    20,000 of them). Where the pieces are words (byte-level BPE: SmolLM2, LLaMA 3), the cache holds words,
    stays small, and encodes a 300-word prompt 1.4x faster: it is kept."""
    backend = getattr(tokenizer, "_tokenizer", None)
    resize = getattr(getattr(backend, "model", None), "_resize_cache", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if resize is not None and (pre is None or len(pre.pre_tokenize_str("hello world")) < 2):
        resize(0)


def template_for(name: str, tokenizer: Any) -> Template:
    if name != "hf":
        return get_template(name)

    def apply(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    stops = (tokenizer.eos_token, end_of_turn(tokenizer))
    return HFTemplate(apply, stop=tuple(dict.fromkeys(s for s in stops if s)))


REPLY_MARK = "vicuna-reply-mark"


def end_of_turn(tokenizer: Any) -> str | None:
    """The special token the chat template writes right after an assistant's text (`<|eot_id|>`,
    `<end_of_turn>`, `<|end|>`, `<|im_end|>`), or None. A reply ends there whether or not the checkpoint's
    EOS or generation config says so: a GGUF file keeps one EOS (a Llama 3 one often `<|end_of_text|>`),
    and a folder may come without its generation_config.json; the model then went on past its turn."""
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": REPLY_MARK}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception:  # a template that refuses these turns: no marker learned from it
        return None
    at = text.rfind(REPLY_MARK)
    after = text[at + len(REPLY_MARK) :].lstrip() if at >= 0 else ""
    special = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.added_tokens_encoder), key=len)
    return next((t for t in reversed(special) if t and after.startswith(t)), None)


def pick_template(settings: ModelSettings, tokenizer: Any, folder: Path, model_name: str) -> Template:
    requested, system = settings.conv_template, settings.conv_system_msg
    recorded = folder / RECORDED_TEMPLATE
    if requested is None and recorded.is_file():  # the template, and system prompt, it was trained with
        try:
            record = json.loads(recorded.read_text(encoding="utf-8"))
        except ValueError as err:  # JSON or UTF-8: a copy cut short, an edit gone wrong
            raise ModelLoadError(f"{recorded}: not valid JSON ({err})") from None
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("conv_template"), str)
            or not isinstance(record.get("conv_system_msg") or "", str)
        ):
            raise ModelLoadError(
                f"{recorded}: expected an object whose conv_template names a template (and whose "
                "conv_system_msg, if any, is a string), as `vicuna train` writes it"
            )
        requested = record["conv_template"]
        system = record.get("conv_system_msg") if system is None else system
    try:
        name = choose_template_name(
            requested,
            has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
            model_name=model_name,
            special_tokens=set(tokenizer.all_special_tokens) | set(tokenizer.added_tokens_encoder),
        )
    except VicunaError as err:  # said as if --conv-template, which was not given, had named it
        if settings.conv_template is not None:
            raise
        raise ModelLoadError(f"{recorded}: conv_template: {err}") from None
    return with_system(template_for(name, tokenizer), system)


def placed_on(device_map: Any, device: Any, *, load_8bit: bool) -> str:
    """Where the weights ended up, for the "Loaded" line: cpu, cuda:0, cuda:0+cuda:1."""
    if load_8bit or not isinstance(device_map, dict):  # 8-bit: loaded on the CPU, then moved to `device`
        return f"cuda:{device.index or 0}" if device.type == "cuda" else str(device)  # "cuda" is GPU 0
    return "+".join(sorted({f"cuda:{d}" if isinstance(d, int) else str(d) for d in device_map.values()}))


def load_engine(settings: ModelSettings, *, progress: bool = True) -> Engine:
    """Check, load and place a model; returns a ready `Engine`. `progress`: on stderr, what a first load
    does once (downloading a Hub repository, converting a .gguf file, timing float32 against bfloat16 on a
    CPU, building the CPU kernel), the bars (on a terminal only) and the "Loaded ..." line; warnings are
    said either way. What the caller can fix (a missing folder, a model that does not fit) raises a
    `VicunaError` (`ModelLoadError`, `DoesNotFitError`) that says it."""
    if not isinstance(settings, ModelSettings):  # a path, or None for the built-in model, was said as
        raise TypeError(  # "'str' object has no attribute 'device'" from deep in device placement
            "load_engine takes a vicuna.config.ModelSettings: load_engine(ModelSettings(model_path=...)), "
            f"or ModelSettings() for the built-in model, not {type(settings).__name__}"
        )
    from transformers import AutoModelForCausalLM

    from vicuna.engine.engine import Engine
    from vicuna.engine.memory import out_of_memory
    from vicuna.engine.placement import check_fits, resolve_device, resolve_dtype

    start = time.perf_counter()
    device = resolve_device(settings)
    folder = resolve_model_path(settings.model_path, progress=progress)
    config = read_config(folder)
    for path in weight_files(folder):
        check_weight_file(path)
    if config.model_type == "llama":  # Vicuna's deltas are LLaMA-shaped
        from vicuna.weights.delta import check_not_delta

        check_not_delta(folder)
    tokenizer = load_tokenizer(folder)
    check_tokenizer(tokenizer, config, folder)
    # a Hub repository: its id, as clients of other servers know it; a .gguf file: its name, not its copy's,
    # keyed by its size and time
    model_name = (
        "SmolLM2-135M-Instruct"
        if settings.model_path is None
        else settings.model_path
        if names_hub_repository(settings.model_path)
        else Path(settings.model_path).stem
        if Path(settings.model_path).expanduser().is_file()
        else folder.name
    )

    dtype = resolve_dtype(settings.dtype, device, config, progress)
    device_map = check_fits(config, settings, device, dtype)
    # 8-bit: loaded as stored (memory-mapped, not copied) and quantized from that (see quantize_int8)
    stored = "auto" if settings.load_8bit else dtype
    try:
        with transformers_bar(progress and redraws(sys.stderr)):  # in a log: not a line redrawn 300 times
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=stored, device_map=device_map)
    except (OSError, RuntimeError, ValueError) as err:
        if out_of_memory(err):  # CUDA's error, or mps's RuntimeError: not a config that mismatches
            raise ModelLoadError(
                f"{folder}: out of memory while loading ({err}); see `vicuna doctor`"
            ) from None
        mismatched = shape_mismatches(folder, config) if isinstance(err, RuntimeError) else []
        if mismatched:
            more = len(mismatched) - 1
            raise ModelLoadError(
                f"{folder}: {CONFIG} does not match the weights: {mismatched[0]}"
                + (f" (and {more} more tensor{'s' * (more > 1)})" if more else "")
                + f"; correct {CONFIG} to the values the model was trained with"
            ) from None
        raise ModelLoadError(f"{folder}: cannot load the weights ({type(err).__name__}: {err})") from None
    model.eval()
    if settings.load_8bit:
        from vicuna.engine.memory import gib
        from vicuna.engine.quant import quantize_int8

        before, after = quantize_int8(model, device, dtype)
        if progress:
            print(f"8-bit weights: {gib(before)} -> {gib(after)}", file=sys.stderr, flush=True)
    template = pick_template(settings, tokenizer, folder, model_name)
    if device.type == "cpu":  # built here, where its message belongs, the first time on this machine
        from vicuna.engine import kernel

        kernel.load(progress=progress)
    engine = Engine(model=model, tokenizer=tokenizer, template=template, model_name=model_name)
    if progress:
        where = placed_on(device_map, device, load_8bit=settings.load_8bit)
        print(
            f"Loaded {model_name} ({str(dtype).removeprefix('torch.')}, {where}, template {template.name}) "
            f"in {time.perf_counter() - start:.1f}s",
            file=sys.stderr,
            flush=True,
        )
    return engine
