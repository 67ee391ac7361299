"""The training run: check the hardware, prepare the data, load the model (full, LoRA or QLoRA), train,
checkpoint, resume, and write the result as a normal checkpoint that records its prompt template.

The loop is transformers' `Trainer`, so the same command runs on one CPU or GPU, or on several GPUs
and machines (configs in vicuna/train/configs/; one process per GPU):

    accelerate launch --config_file configs/fsdp.yaml -m vicuna train ...            # FSDP full shard
    accelerate launch --use_deepspeed --deepspeed_config_file configs/zero3.json \
        --num_processes 4 -m vicuna train ...                                        # DeepSpeed ZeRO-3
    torchrun --nproc_per_node 4 -m vicuna train ...                                  # DDP (model fits a GPU)

Its checkpoints hold the optimizer, scheduler, RNG and data position, so `--resume` continues with
the same data order; a record of the run's settings refuses a resume that would change it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vicuna.engine.loader import (  # chat and serve read them
    RECORDED_TEMPLATE,
    RUN_RECORD,
    names_hub_repository,
)
from vicuna.errors import ModelLoadError, VicunaError
from vicuna.shell import pip_install, quote
from vicuna.train.data import IGNORE, Encoder, Prepared, bad_records, prepare, read_conversations
from vicuna.weights.disk import one_writer, write_atomically
from vicuna.weights.manifest import redraws, transformers_bar

MIN_CAPABILITY = (7, 5)
FULL_LR = 2e-5  # --lr not given: Vicuna's own fine-tune (FastChat's train.py)
LORA_LR = 2e-4  # with --lora or --qlora: the QLoRA paper's rate for 7B and 13B, ten times the full one
MAX_LENGTH = 2048  # tokens per example unless the model's context is shorter or --max-length says
MODEL_FILES = ("config.json", "adapter_config.json", "*.safetensors", "*.bin", "*.index.json")
STORED_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # safetensors' names
SCHEDULERS = ("cosine", "linear", "constant_with_warmup")  # see lr_factor


LORA_TARGET = "q_proj,v_proj"  # the default: the attention's query and value projections
# ...which Phi-3 computes in one layer, with the key's: the default's counterpart there
FUSED_LORA_TARGET = "qkv_proj"


@dataclass
class TrainConfig:
    data: Path
    output_dir: Path
    model_path: str | None = None  # None: the built-in model
    conv_template: str | None = None
    conv_system_msg: str | None = None
    max_length: int | None = None  # None: MAX_LENGTH or the model's context, whichever is shorter
    split_long: bool = False
    allow_bad: int = 0
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    lr: float | None = None  # None: FULL_LR, or LORA_LR with --lora or --qlora (see learning_rate)
    batch_size: int = 1  # per device
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    gradient_checkpointing: bool = False
    dtype: str = "auto"
    lora: bool = False
    qlora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target: str = LORA_TARGET
    save_steps: int = 500
    save_total_limit: int | None = 2
    logging_steps: int = 10
    seed: int = 42
    resume: bool = False
    force: bool = False
    progress: bool = True  # False: nothing said but warnings and errors
    bars: bool = True  # progress bars on a terminal; False (--no-progress): the same lines without them

    def __post_init__(self) -> None:
        self.data, self.output_dir = Path(self.data), Path(self.output_dir)
        if isinstance(self.model_path, os.PathLike):  # a Path, as `data` may be: a str as the CLI gives it
            self.model_path = os.fspath(self.model_path)
        self.lora = self.lora or self.qlora
        checks = [
            (
                self.batch_size >= 1 and self.grad_accum >= 1,
                "--batch-size and --grad-accum must be at least 1",
            ),
            (self.epochs > 0 or self.max_steps > 0, "--epochs or --max-steps must be positive"),
            (
                self.max_steps == -1 or self.max_steps > 0,
                "--max-steps must be at least 1 (leave it out to let --epochs decide)",
            ),
            (self.lr is None or self.lr > 0, "--lr must be positive"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),  # below, AdamW grew every weight
            (0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
            (
                self.save_steps >= 1 and self.logging_steps >= 1,
                "--save-steps and --logging-steps must be >= 1",
            ),
            (self.allow_bad >= 0, "--allow-bad must be >= 0"),
            # peft's own errors blamed --lora-target, and an alpha of 0 scaled every update to nothing
            (self.lora_r >= 1 and self.lora_alpha > 0, "--lora-r and --lora-alpha must be at least 1"),
            (0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
            (  # peft said "No `target_modules` passed but also no `target_parameters` found"
                not self.lora or bool(self.lora_target.replace(",", "").strip()),
                "--lora-target is empty; name the layers (e.g. q_proj,v_proj) or pass all-linear",
            ),
            (self.lr_scheduler in SCHEDULERS, f"unknown --lr-scheduler {self.lr_scheduler!r}"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"), f"unknown --dtype {self.dtype!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise VicunaError(message)

    @property
    def learning_rate(self) -> float:
        """The peak learning rate: --lr, or where it was not given FULL_LR, or LORA_LR with --lora or --qlora
        (a LoRA run at a full fine-tune's rate barely moved the model in a short run). Worked out here, not
        at construction, where `dataclasses.replace(cfg, lora=True)` kept the full fine-tune's."""
        if self.lr is not None:
            return self.lr
        return LORA_LR if self.lora or self.qlora else FULL_LR


# --- before loading ------------------------------------------------------------------------------


def check_gpus(force: bool) -> None:
    """Refuse GPUs below compute capability 7.5 unless `force`: PyTorch's CUDA 12.8 and 13 builds (since
    PyTorch 2.11) have no kernels for them (CUDA 13 dropped Maxwell, Pascal and Volta; PyTorch's 12.8 builds
    followed), so the first kernel launched fails with "no kernel image is available for execution"."""
    import torch

    if not torch.cuda.is_available() or force:
        return
    for i in range(torch.cuda.device_count()):
        capability = torch.cuda.get_device_capability(i)
        if tuple(capability) < MIN_CAPABILITY:
            raise VicunaError(
                f"GPU {i} ({torch.cuda.get_device_name(i)}) has compute capability "
                f"{capability[0]}.{capability[1]}; training needs 7.5 or newer (T4, RTX 20xx, A100 and "
                "later): PyTorch's CUDA 12.8 and 13 builds have no kernels for older GPUs (\"no kernel image "
                'is available"). Pass --force to try anyway with a PyTorch built for CUDA 12.6, which has them'
            )


def check_fits_in_ram(folder: Path, cfg: TrainConfig, compute_dtype: Any) -> None:
    """Refuse, before loading, a model whose training cannot fit the RAM, where no CUDA GPU holds it (on the
    CPU, or on Apple's GPU, which shares the RAM). A full fine-tune holds float32 weights, their gradients
    and AdamW's two moments, 16 bytes a parameter (a 7B model: 100 GiB); LoRA the weights in the compute
    dtype. Unchecked, a 7B model on an 8 GB laptop was killed by the system, after minutes of loading, with
    no word of why. Activations come on top, and are not counted. RAM available leaves out swap: with enough
    of it a run may still go, slowly, and --force lets it."""
    from vicuna.engine.loader import read_config
    from vicuna.engine.memory import gib, model_size, probe_hardware
    from vicuna.errors import DoesNotFitError

    params = model_size(read_config(folder)).params
    need = params * compute_dtype.itemsize if cfg.lora else 16 * params
    available = probe_hardware().ram_available
    if need <= available:
        return
    what = (
        f"its weights in {str(compute_dtype).removeprefix('torch.')}"
        if cfg.lora
        else "float32 weights, their gradients and AdamW's two moments"
    )
    lora_bf16 = 2 * params
    hint = (
        f"; LoRA in bfloat16 (--lora --dtype bfloat16) needs about {gib(lora_bf16)}"
        if lora_bf16 <= available and not (cfg.lora and compute_dtype.itemsize == 2)
        else ""
    )
    raise DoesNotFitError(
        f"{folder}: training it needs about {gib(need)} of RAM for {what}, "
        f"but {gib(available)} is available{hint}; --force tries anyway (with swap: slowly)"
    )


def check_disk_room(folder: Path, cfg: TrainConfig) -> None:
    """Refuse, before loading, a full fine-tune whose output disk cannot take one checkpoint (float32 weights
    and AdamW's two moments, 12 bytes a parameter: 84 GB for a 7B model) and the trained model (as large as
    the base's weights): it trained for hours, then failed at its first save. A lower bound: a run keeps up
    to --save-total-limit checkpoints. A LoRA adapter's are megabytes."""
    if cfg.lora:
        return
    from vicuna.engine.loader import read_config, weight_files
    from vicuna.engine.memory import model_size
    from vicuna.weights.disk import ensure_free_space

    needed = 12 * model_size(read_config(folder)).params + sum(f.stat().st_size for f in weight_files(folder))
    ensure_free_space(cfg.output_dir, needed, f"training {folder} in full (a checkpoint, then the model)")


def check_qlora() -> None:
    """A CUDA GPU, and a bitsandbytes that transformers loads 4-bit weights with: an older one passed here,
    and transformers refused it with a traceback once the data was tokenized and the run recorded."""
    import importlib.metadata

    import torch
    from packaging.version import Version
    from transformers import __version__ as transformers_version

    try:  # where transformers says it; its value in transformers 5.x where it no longer does
        from transformers.utils.import_utils import BITSANDBYTES_MIN_VERSION
    except ImportError:
        BITSANDBYTES_MIN_VERSION = "0.46.1"

    if not torch.cuda.is_available():
        raise VicunaError("--qlora needs a CUDA GPU (bitsandbytes 4-bit); use --lora on this machine")
    try:
        found = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        raise VicunaError("--qlora needs bitsandbytes: " + pip_install("vicuna[gpu]")) from None
    if Version(found) < Version(BITSANDBYTES_MIN_VERSION):
        raise VicunaError(
            f"--qlora: bitsandbytes {found} is installed, and transformers {transformers_version} loads 4-bit "
            f"weights with {BITSANDBYTES_MIN_VERSION} or newer: "
            + pip_install("-U", f"bitsandbytes>={BITSANDBYTES_MIN_VERSION}")
        )


def precision(dtype: str, *, warn: bool = True) -> tuple[Any, str]:
    """(dtype to compute in, "bf16" | "fp16" | "no" for mixed precision) for `--dtype` on this machine;
    `warn`: say when an explicit bfloat16 is emulated, slowly, on this GPU. Mixed float16 needs a gradient
    scaler: accelerate uses PyTorch's, which runs on Apple's GPU (mps) from PyTorch 2.8."""
    import torch
    from packaging.version import Version

    from vicuna.engine.placement import native_bfloat16, warn_if_bfloat16_is_emulated

    cuda = torch.cuda.is_available()
    if dtype == "bfloat16" and cuda and warn:
        warn_if_bfloat16_is_emulated()
    if dtype == "auto":
        dtype = ("bfloat16" if native_bfloat16() else "float16") if cuda else "float32"
    mps = not cuda and torch.backends.mps.is_available()  # where Trainer puts the model, as chat does
    if dtype == "bfloat16" and mps and not torch.backends.mps.is_macos_or_newer(14, 0):
        # as chat and serve say (`resolve_device`); unrefused, the data was read and the model loaded first
        raise VicunaError(
            "--dtype bfloat16 on mps needs macOS 14 or newer, where Apple's GPU computes in bfloat16; "
            "use --dtype float16 or float32"
        )
    if dtype == "float16" and not cuda:
        if not torch.backends.mps.is_available():
            raise VicunaError(
                "--dtype float16 needs a CUDA GPU or Apple's GPU (mps); use bfloat16 or float32 on this machine"
            )
        if Version(torch.__version__).release < (2, 8):
            raise VicunaError(
                "--dtype float16 on Apple's GPU (mps) needs PyTorch 2.8 or newer, whose gradient scaler runs "
                f"there (this is {torch.__version__}): upgrade PyTorch, or use --dtype bfloat16 (macOS 14 or "
                "newer) or float32"
            )
    mixed = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[dtype]
    return getattr(torch, dtype), mixed


def load_tokenizer_and_template(
    model_path: str | None, conv_template: str | None = None, conv_system_msg: str | None = None
) -> tuple[Path, Any, Any]:
    """The model folder, its tokenizer, and the template: --conv-template, the recorded one, or the model's."""
    from vicuna.config import ModelSettings
    from vicuna.engine.loader import load_tokenizer, pick_template, resolve_model_path

    folder = resolve_model_path(model_path)
    tokenizer = load_tokenizer(folder)
    settings = ModelSettings(
        model_path=model_path, conv_template=conv_template, conv_system_msg=conv_system_msg
    )
    model_name = folder.name if model_path is not None else "SmolLM2-135M-Instruct"
    return folder, tokenizer, pick_template(settings, tokenizer, folder, model_name)


def read_and_tokenize(
    data: Path,
    model_path: str | None,
    conv_template: str | None,
    conv_system_msg: str | None,
    *,
    max_length: int | None,
    split_long: bool,
    progress: bool,
    allow_bad: int | None = None,
    bars: bool = True,
) -> tuple[Path, Any, Any, Prepared]:
    """Read the conversations (more bad records than `allow_bad` stop here, before anything loads; fewer
    are left out; None: any bad record stops `vicuna train inspect`, which takes no --allow-bad), load the
    tokenizer and template, and tokenize with the loss mask (a bar on a terminal, with `progress` and
    `bars`); returns the model folder, tokenizer, template and result."""
    from vicuna.engine.loader import read_config

    # FastChat dropped a conversation's first turn where it was a reply, without a word, and ShareGPT
    # exports hold many such records: --allow-bad ("train even if up to N examples are bad") leaves them out
    conversations, bad, total = read_conversations(data)
    if len(bad) > (allow_bad or 0):
        allowed = f"{len(bad)} records are bad, more than --allow-bad {allow_bad}: " if allow_bad else ""
        # `train inspect` was told to "pass --allow-bad N", a flag it does not take
        leave_out = (
            "`vicuna train --allow-bad N` trains without up to N"
            if allow_bad is None
            else "pass --allow-bad N to train without up to N"
        )
        raise VicunaError(
            f"{allowed}{bad_records(bad, total)}. Fix them, or {leave_out} bad records and examples"
        )
    folder, tokenizer, template = load_tokenizer_and_template(model_path, conv_template, conv_system_msg)
    prepared = prepare(
        conversations,
        Encoder(tokenizer, template),
        max_length=fit_max_length(max_length, read_config(folder), folder),
        split_long=split_long,
        progress=progress and bars,
    )
    prepared.bad_records = bad
    if progress:
        print(f"{data}: {prepared.summary()} (template {template.name})", flush=True)
    return folder, tokenizer, template, prepared


def fit_max_length(max_length: int | None, config: Any, folder: Path) -> int:
    """--max-length, refused when longer than the model's context; by default MAX_LENGTH or the context,
    whichever is shorter (positions past the context are ones the model never learnt)."""
    from vicuna.engine.engine import context_length

    context = context_length(config)
    if max_length is not None and max_length < 16:  # `train inspect` too, which showed every example cut
        raise VicunaError(f"--max-length must be at least 16, not {max_length}")
    if max_length is None:
        return min(MAX_LENGTH, context) if context else MAX_LENGTH
    if context and max_length > context:
        raise VicunaError(
            f"--max-length {max_length} is longer than the model's context of {context} tokens "
            f"({folder / 'config.json'}); pass --max-length {context} or less"
        )
    return max_length


# --- checkpoints and the run record ---------------------------------------------------------------


def checkpoints(output_dir: Path) -> list[Path]:
    """The `checkpoint-N` folders in `output_dir`, complete or not, oldest step first."""
    found = [
        p
        for p in output_dir.glob("checkpoint-*")
        if p.name.removeprefix("checkpoint-").isdigit() and p.is_dir()
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix("checkpoint-")))


def complete(checkpoint: Path) -> bool:
    """The Trainer writes trainer_state.json last, in place: a job killed while writing it leaves a
    checkpoint whose state does not parse (and one killed while deleting it may have none)."""
    return is_json_file(checkpoint / "trainer_state.json")


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete `checkpoint-N`."""
    return next((p for p in reversed(checkpoints(output_dir)) if complete(p)), None)


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Delete the checkpoints that are not complete (what a job killed while it wrote or deleted one left)
    and all but the newest `limit` complete ones (None, 0 or less: none of those, as the Trainer took it);
    the newest, which a resume starts from, always stays.
    The Trainer's own pruning runs after each save, so a job killed between the two kept one too many (for
    good when the resume saved none), and it counted incomplete folders as checkpoints, ordered by time,
    deleting complete ones instead. One that cannot be deleted (a file in it held open: on Windows, or on
    NFS) is left for the next save to try again, as the Trainer left it: a chat with an old checkpoint
    does not end the training run."""
    found = checkpoints(output_dir)
    kept = [p for p in found if complete(p)]
    kept = kept[-limit:] if limit and limit > 0 else kept
    for folder in found:
        if folder not in kept:
            try:
                shutil.rmtree(folder)
            except OSError as err:
                print(f"warning: {folder} is left, not deleted: {err}", file=sys.stderr, flush=True)


def is_json_file(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return True


def base_model(model_path: str | None) -> str | None:
    """The model a run trains, as its record keeps it: the folder, resolved; a Hub repository's id (where
    the folder is not) wherever the run is started from; None for the built-in model."""
    if model_path is None:
        return None
    return model_path if names_hub_repository(model_path) else str(Path(model_path).expanduser().resolve())


def lora_base(model_path: str | None, folder: str | None) -> str | None:
    """The base a LoRA adapter names (its adapter_config.json, which `vicuna lora merge` merges into, and the
    merge command said): a .gguf file as given, which resolves to its current converted copy; peft's choice,
    the copy's folder, is deleted once the file changes and is converted again. Otherwise `folder`, the one
    loaded, as an absolute path: peft's, as typed, was looked for wherever the merge ran."""
    if model_path is not None and Path(model_path).suffix == ".gguf":
        return str(base_model(model_path))
    return str(Path(folder).resolve()) if folder else folder


def run_record(cfg: TrainConfig, template_name: str, prepared: Prepared) -> dict[str, Any]:
    """What fixes the model trained, the data order and the schedule: a resumed run must match it."""
    keys = ("epochs", "max_steps", "lr", "batch_size", "grad_accum", "warmup_ratio")
    keys += ("weight_decay", "lr_scheduler", "lora", "lora_r", "lora_alpha", "lora_target", "seed")
    record = {k: asdict(cfg)[k] for k in keys}
    record.update(
        lr=cfg.learning_rate,
        # a resumed LoRA adapter on another base, or full weights loaded over another model's, would go
        # on training as if nothing had changed; None: the built-in model
        base_model=base_model(cfg.model_path),
        max_length=prepared.max_length,
        conv_template=template_name,
        data_fingerprint=prepared.fingerprint(),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
    )
    return record


def model_files(folder: Path) -> list[str]:
    """The names of the files in `folder` that make it a model (or adapter) folder."""
    return sorted({p.name for pattern in MODEL_FILES for p in folder.glob(pattern)})


def start_or_resume(
    cfg: TrainConfig, record: dict[str, Any], is_main: bool, model_folder: Path
) -> Path | None:
    """The checkpoint to resume from (None: a fresh run); refuses mismatches and accidental overwrites,
    of a training run or of a model (the trained one would lie beside it, and tools would load either)."""
    path = cfg.output_dir / RUN_RECORD
    if cfg.output_dir.exists() and not cfg.output_dir.is_dir():  # mkdir said only "File exists: out"
        raise VicunaError(f"--output-dir {cfg.output_dir} is a file; name a new or empty folder")
    if cfg.output_dir.resolve() == model_folder.resolve():
        raise VicunaError(
            f"--output-dir {cfg.output_dir} is the model folder (--model-path {model_folder}); the "
            "trained model would be written into it beside the original: choose another --output-dir"
        )
    if model_folder.resolve() in cfg.output_dir.resolve().parents:  # its SHA256SUMS would fail to verify
        raise VicunaError(
            f"--output-dir {cfg.output_dir} is inside the model folder (--model-path {model_folder}), "
            "which would then hold the checkpoints and a second model: choose another --output-dir"
        )
    checkpoint = last_checkpoint(cfg.output_dir) if cfg.output_dir.is_dir() else None
    if not cfg.resume:
        if checkpoint is not None or (cfg.output_dir / RECORDED_TEMPLATE).is_file():
            raise VicunaError(
                f"{cfg.output_dir} already holds a training run; pass --resume to continue it, "
                "or choose another --output-dir"
            )
        found = model_files(cfg.output_dir)
        if found:
            more = f" and {len(found) - 3} more" if len(found) > 3 else ""
            raise VicunaError(
                f"{cfg.output_dir} already holds a model ({', '.join(found[:3])}{more}); the trained model "
                "would be written beside it, and tools would load either: choose another --output-dir"
            )
        if is_main:
            cfg.output_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(path, json.dumps(record, indent=2))
        return None
    # a complete run (its model written) needs none: its checkpoints are often deleted to free the disk
    if checkpoint is None and not (cfg.output_dir / RECORDED_TEMPLATE).is_file():
        raise VicunaError(
            f"--resume: {cfg.output_dir} has no complete checkpoint-N folder to resume from (a run stopped "
            "before its first checkpoint was written): run the command without --resume to start again"
        )
    if path.is_file():  # edited by hand, where the base model moved (said below)
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:  # JSON or UTF-8
            raise VicunaError(f"{path}: not valid JSON ({err}); fix it to resume the run") from None
        if not isinstance(old, dict):  # each setting was then taken as one it did not record
            raise VicunaError(
                f"{path}: expected the JSON object of the run's settings; fix it to resume the run"
            )
        for key, value in record.items():
            if key not in old:  # a record written before vicuna recorded it
                continue
            if key == "base_model" and old[key] != value:
                was, now = (
                    f"--model-path {quote(v)}" if v else "the built-in model" for v in (old[key], value)
                )
                raise VicunaError(
                    f"--resume: the run in {cfg.output_dir} was started from {was}, now from {now}; resume "
                    "with the model it was started from, or start a new --output-dir (the same model, moved: "
                    f'set "base_model" in {path} to its new folder)'
                )
            if key == "lr" and cfg.lr is None and cfg.lora and old[key] == FULL_LR:
                # a LoRA run started without --lr before LORA_LR was its default: resumed with the command it
                # was started with, it was refused ("lr was 2e-05 ..., now 0.0002"); it keeps its rate
                cfg.lr = record[key] = old[key]
                continue
            if old[key] != value:
                what = "the tokenized data" if key == "data_fingerprint" else key
                # --lr left out: a LoRA run started before its default became LORA_LR, resumed with the
                # command that started it, was told to resume with the same settings, which it had typed
                same = f"--lr {old[key]}" if key == "lr" else "the same data and settings"
                raise VicunaError(
                    f"--resume: {what} was {old[key]!r} for the run in {cfg.output_dir}, now {value!r}; "
                    f"resume with {same}, or start a new --output-dir"
                )
    return checkpoint


# --- the model -------------------------------------------------------------------------------------


def load_model(
    folder: Path, cfg: TrainConfig, compute_dtype: Any, tokenizer: Any, *, show: bool = False
) -> Any:
    """The model to train: full weights in float32 (mixed precision computes in `compute_dtype`), or a
    LoRA-wrapped base in `compute_dtype`, or a 4-bit base for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    from vicuna.engine.loader import check_tokenizer, check_weight_file, read_config, weight_files

    config = read_config(folder)
    for path in weight_files(folder):
        check_weight_file(path)
    check_tokenizer(tokenizer, config, folder)
    kwargs: dict[str, Any] = {"dtype": compute_dtype if cfg.lora else torch.float32}
    if cfg.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}  # one GPU per process
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        raise ModelLoadError(f"{folder}: cannot load the weights ({type(err).__name__}: {err})") from None
    model.config.use_cache = False  # the cache is for generation; training would only store it
    if cfg.gradient_checkpointing and not cfg.qlora:  # QLoRA: prepare_model_for_kbit_training does it
        # renamed activation_checkpointing_enable in transformers 5.x; the old name warns until v6
        enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
        enable({"use_reentrant": False})
    return add_lora(model, cfg, show=show) if cfg.lora else model


def lora_targets(cfg: TrainConfig) -> str | list[str]:
    targets = cfg.lora_target.strip()
    return targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]


@contextlib.contextmanager
def disk_full_is_one_line(output_dir: Path, what: str, resume: str) -> Iterator[None]:
    """A write that fails for want of disk space (`disk_full`) becomes one line saying what to do."""
    from vicuna.engine.memory import gib
    from vicuna.weights.disk import disk_full

    try:
        yield
    except Exception as err:
        if not (full := disk_full(err)):
            raise
        free = shutil.disk_usage(output_dir).free
        raise VicunaError(
            f"{output_dir}: {what} could not be written in full ({full}; {gib(free)} free on its "
            f"disk). Free some space and run again with --resume, which {resume}"
        ) from None


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft asks the model for `is_gradient_checkpointing`, which transformers 5 deprecates with a
    FutureWarning: a message for peft's authors, printed to users who can do nothing about it. Saving an
    adapter whose base is a .gguf file (`lora_base`), it looks for the base's config.json at the file's path,
    to learn whether the vocabulary was resized (training never resizes it), and warns that it is not there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        warnings.filterwarnings("ignore", "Could not find a config file in .* vocabulary was not modified")
        yield


def wrap_lora(model: Any, cfg: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_targets(cfg),
        task_type="CAUSAL_LM",
    )
    try:
        with quiet_peft():
            wrapped = get_peft_model(model, lora)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        raise VicunaError(f"--lora-target {cfg.lora_target}: {err}") from None
    config = wrapped.peft_config[wrapped.active_adapter]
    config.base_model_name_or_path = lora_base(cfg.model_path, config.base_model_name_or_path)
    return wrapped


def check_lora_target(folder: Path, cfg: TrainConfig) -> None:
    """Refuse a --lora-target that names no module of the model, or one LoRA cannot wrap, before anything
    is written: LoRA is put on the model's layers without their weights (PyTorch's "meta" device)."""
    import torch
    from transformers import AutoModelForCausalLM

    from vicuna.engine.loader import read_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(read_config(folder))
    names = [name for name, _ in model.named_modules()]
    has = lambda target: any(n == target or n.endswith(f".{target}") for n in names)  # noqa: E731
    if cfg.lora_target == LORA_TARGET and not has("q_proj") and has(FUSED_LORA_TARGET):
        cfg.lora_target = FUSED_LORA_TARGET  # the run record keeps what was used
    targets = lora_targets(cfg)
    for target in targets if isinstance(targets, list) else []:  # peft skips a name when another matches
        if not has(target):
            linear = {
                n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            }
            raise VicunaError(
                f"--lora-target {cfg.lora_target}: {target!r} names no module of {folder}; its linear "
                f"layers are {', '.join(sorted(linear))}, or pass all-linear"
            )
    wrap_lora(model, cfg)


def add_lora(model: Any, cfg: TrainConfig, *, show: bool = False) -> Any:
    import torch
    from peft import prepare_model_for_kbit_training

    if cfg.qlora:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    # the adapter's random initialisation: --seed's (the Trainer seeds only after the model is made), not
    # whatever state the random generator was left in by what the process did before
    torch.manual_seed(cfg.seed)
    model = wrap_lora(model, cfg)
    if show:
        trainable, total = model.get_nb_trainable_parameters()
        print(f"LoRA: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)")
    return model


@dataclass
class PadCollator:
    """Right-pads a batch; padding has attention 0 and no loss."""

    pad_id: int

    def __call__(self, batch: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(b["input_ids"]) for b in batch)

        def pad(key: str, value: int) -> Any:
            return torch.tensor([b[key] + [value] * (width - len(b[key])) for b in batch])

        return {
            "input_ids": pad("input_ids", self.pad_id),
            "labels": pad("labels", IGNORE),
            "attention_mask": torch.tensor(
                [[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch]
            ),
        }


def lr_factor(step: int, *, name: str, warmup: int, total: int) -> float:
    """The learning rate of optimizer step `step` (from 0) as a share of --lr: warmup step k of W at
    (k + 1) / W (transformers' schedules give the first step 0, so it would learn nothing), then constant,
    or a linear or cosine decay to 0 at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if name == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0  # constant_with_warmup


def trainer_class() -> Any:
    """transformers' Trainer with the schedule of `lr_factor`; the Trainer asks for its scheduler through
    this method under every launcher (DeepSpeed included)."""
    from functools import partial

    from torch.optim.lr_scheduler import LambdaLR
    from transformers import Trainer

    class VicunaTrainer(Trainer):
        def create_scheduler(self, num_training_steps, optimizer=None):  # type: ignore[no-untyped-def]
            if self.lr_scheduler is None:
                factor = partial(
                    lr_factor,
                    name=self.args.lr_scheduler_type,
                    warmup=self.args.get_warmup_steps(num_training_steps),
                    total=num_training_steps,
                )
                self.lr_scheduler = LambdaLR(optimizer or self.optimizer, factor)
                self._created_lr_scheduler = True  # as the base method: remade if train() runs again
            return self.lr_scheduler

        def _save(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            # `load_model` turned the KV cache off for training; each checkpoint and the final model are
            # saved with it on, or transformers' `generate` (and tools built on it) would recompute the
            # whole text at every token
            config = self.accelerator.unwrap_model(self.model).config
            config.use_cache = True
            try:
                with quiet_peft():
                    return super()._save(*args, **kwargs)
            finally:
                config.use_cache = False

    return VicunaTrainer


def progress_callback(bars: bool) -> Any:
    """Trainer's progress bar, with one readable line per logging step instead of a dict; without `bars`
    (piped to a file, on a dumb terminal, or --no-progress), the lines alone (a bar redrawn with carriage
    returns would make one endless line of it)."""
    from transformers.trainer_callback import ProgressCallback

    class Progress(ProgressCallback):
        def __init__(self) -> None:
            super().__init__()
            self.plain = not bars

        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.first_step = state.global_step  # past 0 when resumed
            if not self.plain:
                super().on_train_begin(args, state, control, **kwargs)

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if not self.plain:
                super().on_step_end(args, state, control, **kwargs)

        def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if not self.plain and self.training_bar is not None:  # ended before the "done:" line
                super().on_train_end(args, state, control, **kwargs)

        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            if not state.is_world_process_zero or not logs:
                return
            if self.training_bar is None and not self.plain:
                return
            write = (lambda line: print(line, flush=True)) if self.plain else self.training_bar.write
            if "loss" in logs:
                line = f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}"
                line += f"  lr {logs.get('learning_rate', 0):.2e}"
                if "train_tokens_per_second" in logs:
                    line += f"  {logs['train_tokens_per_second']:.0f} tokens/s"
                write(line)
            elif "train_loss" in logs:  # the Trainer's figures are of the steps run since the start or resume
                ran = state.global_step - getattr(self, "first_step", 0)
                steps = (
                    f"{ran} steps"
                    if ran == state.global_step
                    else f"{state.global_step} steps; the {ran} since the resume"
                )
                # the bar ended first: written through it, the line was followed by the bar drawn again
                self.on_train_end(args, state, control)
                print(
                    f"done: {steps} in {logs['train_runtime']:.1f}s, mean loss {logs['train_loss']:.4f}",
                    flush=True,
                )

    return Progress


class TrainingDone(Exception):
    """The checkpoint resumed from is the run's last step: nothing is left to train."""


def record_in_checkpoints(record: dict[str, str]) -> Any:
    """A callback that puts the template record in each checkpoint as it is saved: chatting with one
    (or merging a LoRA one) then prompts the model as it is being trained."""
    from transformers import TrainerCallback

    class RecordInCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and checkpoint.is_dir():
                write_template_record(checkpoint, record)

    return RecordInCheckpoints()


def prune_after_saves(limit: int | None) -> Any:
    """A callback that runs prune_checkpoints after each save, in place of the Trainer's pruning."""
    from transformers import TrainerCallback

    class PruneAfterSaves(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if args.should_save:  # the process that saved: the Trainer prunes there too
                prune_checkpoints(Path(args.output_dir), limit)

    return PruneAfterSaves()


def stop_at_the_end() -> Any:
    """A callback that ends a run resumed from its last step before it trains a step more: the Trainer
    checks for the end only after a step (a job killed while the final model was written would get one
    step more than an uninterrupted run)."""
    from transformers import TrainerCallback

    class StopAtTheEnd(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.global_step >= state.max_steps:
                raise TrainingDone

    return StopAtTheEnd()


# --- the run -----------------------------------------------------------------------------------------


def train(cfg: TrainConfig, callbacks: Sequence[Any] = ()) -> Path:
    """Run (or resume) training; returns the output folder, which then holds the final model. A second run
    into the same folder meanwhile is refused: both ran to 'done', writing their checkpoints and models over
    each other's and pruning each other's checkpoints, the folder left with one's model and the other's
    record of settings."""
    # accelerate launch / torchrun: rank 0 reports and holds the folder the other ranks share
    is_main = int(os.environ.get("RANK", "0")) == 0
    with one_writer(cfg.output_dir, cfg.output_dir) if is_main else contextlib.nullcontext():
        return _train(cfg, callbacks, is_main)


def _train(cfg: TrainConfig, callbacks: Sequence[Any], is_main: bool) -> Path:
    import torch
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    check_gpus(cfg.force)
    if cfg.qlora:
        check_qlora()
    compute_dtype, mixed = precision(cfg.dtype, warn=is_main)
    show = cfg.progress and is_main
    bars = cfg.bars and redraws(sys.stderr)  # in a log: not lines redrawn with carriage returns
    folder, tokenizer, template, prepared = read_and_tokenize(
        cfg.data,
        cfg.model_path,
        cfg.conv_template,
        cfg.conv_system_msg,
        max_length=cfg.max_length,
        split_long=cfg.split_long,
        progress=show,
        allow_bad=cfg.allow_bad,
        bars=bars,
    )
    prepared.check_bad(cfg.allow_bad)  # before any model loads: a bad run stops in seconds
    if not prepared.examples:
        raise VicunaError(f"{cfg.data}: no example is left to train on")
    on_cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    # said, or a CPU-only PyTorch (what `pip install torch` gives on Windows) trains a 7B model for days
    if show and on_cpu:
        why = "a CPU-only build of PyTorch" if torch.version.cuda is None else "PyTorch sees no CUDA GPU"
        print(
            f"Training on the CPU in {str(compute_dtype).removeprefix('torch.')} ({why}, {torch.__version__}): "
            "fine for a tiny model, far too slow for a 7B one",
            file=sys.stderr,  # a warning: standard output holds the run's progress and its result
            flush=True,
        )
    if not torch.cuda.is_available() and not cfg.force:
        check_fits_in_ram(folder, cfg, compute_dtype)
    if not cfg.force and is_main:
        check_disk_room(folder, cfg)
    if cfg.lora:
        check_lora_target(folder, cfg)  # before start_or_resume writes anything
    checkpoint = start_or_resume(cfg, run_record(cfg, template.name, prepared), is_main, folder)
    if cfg.resume and (cfg.output_dir / RECORDED_TEMPLATE).is_file():  # written last, by `save_final`
        if show:  # not "done: 0 steps since the resume, mean loss 0.0000", and the model written again
            print(f"{cfg.output_dir}: this run is complete, its model written; nothing to resume")
        return cfg.output_dir
    if is_main:  # what a killed job left: incomplete checkpoints, or one more than the limit
        prune_checkpoints(cfg.output_dir, cfg.save_total_limit)

    # The arguments come before the model: under DeepSpeed ZeRO-3 they make from_pretrained shard at load.
    args = TrainingArguments(
        output_dir=str(cfg.output_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler,
        bf16=mixed == "bf16",
        fp16=mixed == "fp16",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        include_num_input_tokens_seen="non_padding",
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=None,  # prune_checkpoints' job
        seed=cfg.seed,
        report_to="none",
        disable_tqdm=not show,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=on_cpu,
    )
    # transformers' bars for loading and saving weights: in a log, off, as progress_callback's
    with transformers_bar(bars):
        model = load_model(folder, cfg, compute_dtype, tokenizer, show=show)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        trainer = trainer_class()(
            model=model,
            args=args,
            train_dataset=[{"input_ids": e.input_ids, "labels": e.labels} for e in prepared.examples],
            data_collator=PadCollator(pad_id if pad_id is not None else 0),
            processing_class=tokenizer,
            callbacks=[
                *callbacks,
                stop_at_the_end(),
                record_in_checkpoints(template_record(template)),
                prune_after_saves(cfg.save_total_limit),
            ],
        )
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        if show:
            trainer.add_callback(progress_callback(bars))
        resume, on_full = str(checkpoint) if checkpoint else None, "goes on from the last complete checkpoint"
        with disk_full_is_one_line(cfg.output_dir, "a checkpoint", on_full):
            try:
                trainer.train(resume_from_checkpoint=resume)
            except TrainingDone:  # the checkpoint's weights: they only need writing as the final model
                trainer.callback_handler.on_train_end(args, trainer.state, trainer.control)
        # a full model goes back to the base's precision: the Trainer holds a float32 copy, twice a 16-bit one
        with disk_full_is_one_line(cfg.output_dir, "the trained model", "writes it from the last checkpoint"):
            save_final(
                trainer,
                cfg.output_dir,
                template_record(template),
                is_main,
                None if cfg.lora else stored_dtype(folder),
                bars=bars,
            )
    if show:
        if cfg.lora:
            print(
                f"LoRA adapter written to {cfg.output_dir}; make a full checkpoint with: vicuna lora merge "
                f"--base {quote(lora_base(cfg.model_path, str(folder)))} --adapter {quote(str(cfg.output_dir))} "
                f"--output {quote(f'{cfg.output_dir}-merged')}"
            )
        else:
            print(
                f"Model written to {cfg.output_dir}; chat with it: vicuna chat --model-path "
                f"{quote(str(cfg.output_dir))}"
            )
    return cfg.output_dir


def stored_dtype(folder: Path) -> str | None:
    """The floating-point dtype the model's weights are stored in: its first safetensors file's, else
    config.json's dtype (or torch_dtype); None when neither says."""
    from safetensors import safe_open

    from vicuna.engine.loader import weight_files

    first = weight_files(folder)[0]
    if first.suffix == ".safetensors":
        with safe_open(first, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                dtype = STORED_DTYPES.get(f.get_slice(key).get_dtype())
                if dtype is not None:
                    return dtype
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in STORED_DTYPES.values() else None


def cast_weights(folder: Path, dtype: str) -> None:
    """Rewrite the floating-point weights saved in `folder` in `dtype`, and say so in its config.json
    (and its index's total size)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    to, total = getattr(torch, dtype), 0
    for path in sorted(folder.glob("*.safetensors")):
        tensors = {}
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (not iterable); one float32 tensor in memory at a time
                tensor = f.get_tensor(key)
                tensors[key] = tensor.to(to) if tensor.is_floating_point() else tensor
                total += tensors[key].nbytes
            metadata = f.metadata()
        save_file(tensors, path, metadata=metadata)
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index.setdefault("metadata", {})["total_size"] = total
        index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["dtype"] = dtype
    if "torch_dtype" in config:  # the field's name in older transformers
        config["torch_dtype"] = dtype
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def template_record(template: Any) -> dict[str, str]:
    """What chat and serve need to prompt the trained model as it was trained: the template's name, and
    its system prompt where that is not the template's default (`--conv-system-msg`)."""
    from vicuna.conversation import BUILTIN_TEMPLATES

    record = {"conv_template": template.name}
    default = BUILTIN_TEMPLATES[template.name].system if template.name in BUILTIN_TEMPLATES else None
    if template.system != default:
        record["conv_system_msg"] = template.system
    return record


def write_template_record(folder: Path, record: dict[str, str]) -> None:
    write_atomically(folder / RECORDED_TEMPLATE, json.dumps(record, ensure_ascii=False) + "\n")


def save_final(
    trainer: Any,
    output_dir: Path,
    record: dict[str, str],
    is_main: bool,
    dtype: str | None = None,
    *,
    bars: bool,
) -> None:
    """Write the model (or adapter), in `dtype` when given, with the tokenizer and template record
    beside the checkpoints, each file renamed into place once complete; the template record goes last.
    `bars`: the manifest's hashing bar, on a terminal."""
    tmp = output_dir / ".final.partial"
    if is_main:  # what an interrupted save left behind
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))  # every process: FSDP and ZeRO-3 gather the weights collectively
    if is_main:
        from vicuna.weights.disk import new_file_mode, set_mode
        from vicuna.weights.manifest import MANIFEST_NAME, write_manifest

        if dtype is not None:
            cast_weights(tmp, dtype)
        write_template_record(tmp, record)
        if (output_dir / RUN_RECORD).is_file():  # the run's settings, listed with the model's files
            shutil.copyfile(output_dir / RUN_RECORD, tmp / RUN_RECORD)
        write_manifest(tmp, progress=bars)  # the model's files, not the checkpoints beside it
        mode = new_file_mode()  # safetensors writes files only their owner may read
        # the manifest and then the template record last: the record says the model is there
        for f in sorted(tmp.iterdir(), key=lambda p: (p.name == RECORDED_TEMPLATE, p.name == MANIFEST_NAME)):
            if f.is_file():
                set_mode(f, mode)
                os.replace(f, output_dir / f.name)
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
