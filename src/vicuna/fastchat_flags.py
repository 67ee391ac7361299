"""FastChat's (and Ollama's) command-line spellings that vicuna takes under another name or lacks, and what to
type instead.

Users come with FastChat's commands in their fingers and in their scripts (`--repetition_penalty`,
`apply_delta --base-model-path`, `--gptq-ckpt`); argparse answered them with a bare "unrecognized
arguments". The command line consults this table only when its parsing has failed, so a flag that vicuna
does take is never in the way. No torch here.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

_SERVE = "serve (one process serves the OpenAI API and the web UI: no controller or workers to start)"
# FastChat's module (python3 -m fastchat.serve.cli) -> the vicuna command that does its work
COMMANDS: dict[str, str] = {
    "cli": "chat",
    "openai_api_server": _SERVE,
    "model_worker": _SERVE,
    "vllm_worker": _SERVE,
    "controller": _SERVE,
    "gradio_web_server": _SERVE,
    "apply_delta": "delta apply",
    "make_delta": "delta make",
    "apply_lora": "lora merge",
}

# FastChat's flag -> vicuna's flag of the same meaning, said where the command takes the latter
RENAMED: dict[str, str] = {
    "--model": "--model-path",  # FastChat's usage lines abbreviate it; ambiguous in `vicuna serve`
    "--base-model-path": "--base",  # fastchat.model.apply_delta
    "--target-model-path": "--target",
    "--delta-path": "--delta",
    "--model-names": "--model-name",  # model_worker: the same comma-separated names
    "--limit-worker-concurrency": "--max-batch-size",
    "--folder": "--dir",  # pyllama's llama.download
    "--model_name_or_path": "--model-path",  # fastchat.train.train (Hugging Face TrainingArguments)
    "--data_path": "--data",
    "--num_train_epochs": "--epochs",
    "--learning_rate": "--lr",
    "--per_device_train_batch_size": "--batch-size",
    "--gradient_accumulation_steps": "--grad-accum",
    "--model_max_length": "--max-length",
    "--q_lora": "--qlora",
}

_GPTQ = "GPTQ checkpoints are not supported; load the float16 model, with --load-8bit where it does not fit"
_AWQ = "AWQ checkpoints are not supported; load the float16 model, with --load-8bit where it does not fit"
_EXLLAMA = "ExLlama is not supported; vicuna's own GPU decoding runs float16 or --load-8bit weights"
_XFT = (
    "xFasterTransformer is not supported; on the CPU vicuna decodes with its own kernel (see `vicuna doctor`)"
)
_NO_CONTROLLER = (
    "vicuna has no controller or workers; one `vicuna serve --model-path M` holds the model and serves the "
    "OpenAI API and the web UI"
)

# FastChat's flag -> why vicuna has none, and what to do instead
UNSUPPORTED: dict[str, str] = {
    "--gpus": "choose the GPUs with CUDA_VISIBLE_DEVICES, e.g. CUDA_VISIBLE_DEVICES=0,2 with --num-gpus 2",
    "--cpu-offloading": "not supported; vicuna does not offload weights to the CPU; --load-8bit halves the GPU memory, "
    "--device cpu runs on the CPU alone; `vicuna doctor` lists the flags that fit",
    "--revision": "--model-path OWNER/NAME downloads the main branch; fetch another revision with "
    "`vicuna download REPO --revision REV --dir DIR`, then --model-path DIR",
    "--mouse": "not supported; the terminal chat has no mouse mode (--style rich renders markdown)",
    "--judge-sent-end": "not supported; a reply ends where the model ends its turn",
    "--gptq-ckpt": _GPTQ,
    "--gptq-wbits": _GPTQ,
    "--gptq-groupsize": _GPTQ,
    "--gptq-act-order": _GPTQ,
    "--awq-ckpt": _AWQ,
    "--awq-wbits": _AWQ,
    "--awq-groupsize": _AWQ,
    "--enable-exllama": _EXLLAMA,
    "--exllama-max-seq-len": _EXLLAMA,
    "--exllama-gpu-split": _EXLLAMA,
    "--exllama-cache-8bit": _EXLLAMA,
    "--enable-xft": _XFT,
    "--xft-max-seq-len": _XFT,
    "--xft-dtype": _XFT,
    "--controller-address": _NO_CONTROLLER,
    "--controller-url": _NO_CONTROLLER,
    "--worker-address": _NO_CONTROLLER,
    "--no-register": _NO_CONTROLLER,
    "--dispatch-method": _NO_CONTROLLER,
    "--ssl": "vicuna serve speaks plain HTTP; put a reverse proxy (nginx, Caddy) in front of it for HTTPS",
    "--share": "no public share links; --host 0.0.0.0 makes the server reachable from other machines",
    "--allow-credentials": "CORS takes --allowed-origins alone (GET and POST, any header, no credentials)",
    "--allowed-methods": "CORS takes --allowed-origins alone (GET and POST, any header, no credentials)",
    "--allowed-headers": "CORS takes --allowed-origins alone (GET and POST, any header, no credentials)",
    "--low-cpu-mem": "not needed; vicuna delta apply always merges tensor by tensor, in little memory",
}


def unknown_flags(typed: Sequence[str], known: Collection[str]) -> list[str]:
    """The flags among `typed` that the command does not take (`known`: its option strings), in order."""
    flags = [token.split("=", 1)[0] for token in typed if token.startswith("--") and token != "--"]
    # taken as it is, or as argparse takes a unique abbreviation
    return [
        flag for flag in flags if flag not in known and sum(option.startswith(flag) for option in known) != 1
    ]


def advice(typed: Sequence[str], known: Collection[str]) -> str | None:
    """What to type instead of the first FastChat spelling among `typed` that the command does not take
    (`known`: its option strings), or None where there is none to say."""
    for flag in unknown_flags(typed, known):
        if RENAMED.get(flag) in known:
            return f"{flag}: here it is {RENAMED[flag]}"
        if flag in UNSUPPORTED:
            return f"{flag}: {UNSUPPORTED[flag]}"
        if flag.replace("_", "-") in known:  # --repetition_penalty, --max_new_tokens, --model_size
            return f"{flag}: here it is spelled {flag.replace('_', '-')}"
    return None


def ollama_advice(command: str) -> str | None:
    """What to type instead of Ollama's `command` (`ollama run`, `pull`, `list`, `rm`, `ps`), where vicuna
    has no command of that name, or None: its users typed them and got only argparse's list of choices."""
    if command not in ("run", "pull", "list", "ls", "rm", "ps"):
        return None
    from vicuna.config import vicuna_home

    models = vicuna_home() / "models"
    here = {
        "run": "vicuna chat --model-path MODEL (an HF-format folder, a .gguf file or a Hugging Face Hub "
        "repository OWNER/NAME, downloaded on its first start)",
        "pull": f"vicuna download OWNER/NAME (a Hugging Face Hub repository, into {models}/OWNER--NAME)",
        "list": f"each model downloaded or converted is a folder in {models} (du -sh {models}/* lists "
        "their sizes)",
        "rm": f"delete the model's folder in {models} (a Hub repository's is downloaded again, and a .gguf "
        "file's copy converted again, on its next start)",
        "ps": "a model is loaded for as long as the vicuna chat or vicuna serve that loaded it runs",
    }
    here["ls"] = here["list"]
    return f"{command} is Ollama's; here: {here[command]}"
