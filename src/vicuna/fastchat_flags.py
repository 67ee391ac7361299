"""FastChat's (and Ollama's and LitGPT's) command-line spellings that vicuna takes under another name or lacks,
and what to type instead.

Users come with FastChat's commands in their fingers and in their scripts (`--repetition_penalty`,
`apply_delta --base-model-path`, `--gptq-ckpt`), or LitGPT's (`finetune_lora`, `--out_dir`, `--precision
bf16-true`, `--train.epochs`); argparse answered them with a bare "unrecognized arguments". The command
line consults these tables only when its parsing has failed, so a flag that vicuna does take is never in
the way. No torch here.
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
    "--max_new_tokens": "--new-tokens",  # bench latency's; chat's is --max-new-tokens, serve has none
    "--max-new-tokens": "--new-tokens",
    # LitGPT's (jsonargparse: --train.epochs is found as --epochs, below, without a row here)
    "--checkpoint_dir": "--model-path",  # LitGPT before 0.4
    "--devices": "--num-gpus",
    "--accelerator": "--device",
    "--data.json_path": "--data",  # `--data JSON --data.json_path F`: `--data F`
    "--train.micro_batch_size": "--batch-size",
    "--train.max_seq_length": "--max-length",
    "--train.lr_warmup_fraction": "--warmup-ratio",
    "--train.save_interval": "--save-steps",
    "--train.log_interval": "--logging-steps",
}
# LitGPT's --out_dir: each command's own name for where its output goes
OUTPUT_FLAGS = ("--output-dir", "--output", "--dir")
_LORA_TARGET = (
    "here the layers are chosen with --lora-target (comma-separated module names: "
    "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; or all-linear)"
)
_PER_REQUEST = (
    "each request to the API sets its own max_tokens, temperature, top_p and top_k (the web UI has sliders)"
)
_NO_EVAL = "vicuna train holds out no validation data; run lm-eval on the model it writes (see the README)"

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
    "--lora_query": _LORA_TARGET,  # LitGPT's, one flag per layer
    "--lora_key": _LORA_TARGET,
    "--lora_value": _LORA_TARGET,
    "--lora_projection": _LORA_TARGET,
    "--lora_mlp": _LORA_TARGET,
    "--lora_head": _LORA_TARGET,
    "--train.lr_warmup_steps": "here warmup is --warmup-ratio, a share of the steps",
    "--train.global_batch_size": "a step here takes --batch-size times --grad-accum examples on each GPU",
    "--eval.interval": _NO_EVAL,
    "--data.val_split_fraction": _NO_EVAL,
    "--access_token": "set HF_TOKEN in the environment for a gated repository",
    "--repo_id": "the repository is named alone here: vicuna download OWNER/NAME",  # LitGPT before 0.4
    "--max_new_tokens": _PER_REQUEST,  # serve (LitGPT's serve takes them); chat's are flags
    "--max-new-tokens": _PER_REQUEST,
    "--temperature": _PER_REQUEST,
    "--top_k": _PER_REQUEST,
    "--top_p": _PER_REQUEST,
    "--openai_spec": "not needed; vicuna serve always serves OpenAI's API (/v1/chat/completions, /v1/completions)",
    # LitGPT's generate (and llama.cpp's -p): chat reads the question from standard input
    "--prompt": "the question is piped in: echo 'QUESTION' | vicuna chat --model-path MODEL (the reply alone "
    "on standard output)",
    "--compile": "not needed; decoding runs vicuna's own CPU kernel, or CUDA graphs on a GPU",
    "--devices": "several GPUs train under accelerate: `accelerate launch --num_processes N -m vicuna train ...` "
    "(see the README's Fine-tune section)",  # train; chat and serve take --num-gpus (RENAMED)
}
# LitGPT's --precision -> vicuna's --dtype
PRECISIONS = {"bf16": "bfloat16", "16": "float16", "32": "float32"}


def unknown_flags(typed: Sequence[str], known: Collection[str]) -> list[str]:
    """The flags among `typed` that the command does not take (`known`: its option strings), in order."""
    flags = [token.split("=", 1)[0] for token in typed if token.startswith("--") and token != "--"]
    # taken as it is, or as argparse takes a unique abbreviation
    return [
        flag for flag in flags if flag not in known and sum(option.startswith(flag) for option in known) != 1
    ]


def advice(typed: Sequence[str], known: Collection[str]) -> str | None:
    """What to type instead of each FastChat or LitGPT spelling among `typed` that the command does not take
    (`known`: its option strings), or None where there is none to say. Each at once: FastChat's apply_delta
    command, pasted, has three flags named otherwise here, and was answered about one per run. A reason
    shared by several flags (--gptq-ckpt, --gptq-wbits) is said once, with the first."""
    said: dict[str, str] = {}  # reason: the first flag it was said for
    for flag in unknown_flags(typed, known):
        if (reason := _reason(flag, typed, known)) is not None:
            said.setdefault(reason, flag)
    return "; ".join(f"{flag}: {reason}" for reason, flag in said.items()) or None


def _reason(flag: str, typed: Sequence[str], known: Collection[str]) -> str | None:
    """What to type instead of `flag`, which the command does not take, or None where there is none to say."""
    if RENAMED.get(flag) in known:
        return f"here it is {RENAMED[flag]}"
    if flag.replace("_", "-") in known:  # --repetition_penalty, --max_new_tokens, --model_size
        return f"here it is spelled {flag.replace('_', '-')}"
    if flag == "--compile" and "--lora" in known:  # train: UNSUPPORTED's answer is about decoding
        return (
            "not supported in training: vicuna train runs the model uncompiled, as transformers' Trainer does "
            "by default"
        )
    # after the spellings: --max_new_tokens is chat's, not serve's; the API's settings only where it is served
    # (`vicuna train --temperature 0.7`, `bench latency --top_p 0.9` were told of the API's requests)
    if flag in UNSUPPORTED and (UNSUPPORTED[flag] != _PER_REQUEST or "--host" in known):
        return UNSUPPORTED[flag]
    plain = "--" + flag.rpartition(".")[2].replace("_", "-")  # LitGPT's --train.epochs, --optimizer.lr
    if "." in flag and plain in known:
        return f"here it is {plain}"
    if flag == "--out_dir" and (output := next((f for f in OUTPUT_FLAGS if f in known), None)):
        return f"here it is {output}"
    if flag == "--precision" and "--dtype" in known:  # bf16-true, 16-mixed, 32-true
        value = value_of(typed, flag)
        dtype = PRECISIONS.get(value.split("-")[0])
        return "here it is --dtype" + (f" ({flag} {value}: --dtype {dtype})" if dtype else "")
    if flag == "--quantize" and "--qlora" in known:  # bnb.nf4: LitGPT's QLoRA
        return "here a 4-bit (NF4) base is --qlora (LoRA on it; CUDA and bitsandbytes)"
    if flag == "--quantize" and "--load-8bit" in known:
        return "here it is --load-8bit (int8 weights, half of float16's memory; no 4-bit formats)"
    return None


def value_of(typed: Sequence[str], flag: str) -> str:
    """The value typed for `flag` (`--flag VALUE` or `--flag=VALUE`), or "" where none was."""
    for at, token in enumerate(typed):
        if token == flag:
            return typed[at + 1] if at + 1 < len(typed) else ""
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return ""


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


_FINETUNE = "vicuna train --model-path MODEL --data FILE.json --output-dir DIR"
_CONVERT = (
    "no conversion needed: vicuna runs a Hugging Face-format folder as it is (--model-path FOLDER); "
    "a LitGPT checkpoint (lit_model.pth) goes back to that format with LitGPT's convert_from_litgpt"
)
# LitGPT's command -> what does its work here (`litgpt chat`, `serve` and `download` are vicuna's too)
LITGPT_COMMANDS: dict[str, str] = {
    "generate": "echo PROMPT | vicuna chat --model-path MODEL (the reply alone on standard output); "
    "text continued without the chat template: vicuna serve's /v1/completions",
    "finetune": _FINETUNE,
    "finetune_full": _FINETUNE,
    "finetune_lora": _FINETUNE + " --lora (--qlora for a 4-bit base)",
    "finetune_adapter": _FINETUNE + " --lora (LoRA; LLaMA-Adapter is not supported)",
    "finetune_adapter_v2": _FINETUNE + " --lora (LoRA; LLaMA-Adapter is not supported)",
    "merge_lora": "vicuna lora merge --adapter DIR --output MERGED (DIR: vicuna train --lora's --output-dir; "
    "into the base the adapter records)",
    "evaluate": "vicuna serve --model-path MODEL, then lm_eval --model local-completions on its "
    "/v1/completions (the README's Serve section has the command)",
    "convert_to_litgpt": _CONVERT,
    "convert_from_litgpt": _CONVERT,
    "convert_pretrained_checkpoint": _CONVERT,
    "pretrain": "not supported; vicuna fine-tunes an existing model: " + _FINETUNE,
}


def litgpt_advice(command: str) -> str | None:
    """What to type instead of LitGPT's `command` (`litgpt finetune_lora`, `merge_lora`, `generate`), or
    None: its users typed them and got only argparse's list of choices."""
    name = command.replace("-", "_")  # LitGPT's are finetune_lora; its docs' older ones finetune-lora
    return f"{command} is LitGPT's; here: {LITGPT_COMMANDS[name]}" if name in LITGPT_COMMANDS else None
