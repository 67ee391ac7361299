"""Where a model goes and in what precision: device and dtype choice, layer placement across GPUs, and
the check that the model fits before loading starts (with the flags that would fit when it does not)."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vicuna.config import ModelSettings, vicuna_home
from vicuna.engine.memory import (
    Hardware,
    ModelSize,
    empty_model,
    gib,
    model_size,
    parse_bytes,
    probe_hardware,
)
from vicuna.errors import DoesNotFitError, VicunaError
from vicuna.weights.disk import write_atomically

log = logging.getLogger("vicuna.placement")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_TOKENS = 2048  # the KV cache a chat is planned for
HEADROOM = 1.1  # activations, allocator slack


def resolve_device(settings: ModelSettings) -> torch.device:
    """The device to load on, after the checks of the flags that need no model, so that they are said
    before a model is converted or read: the device is there, --max-gpu-memory reads, and so many GPUs
    are visible."""
    requested = settings.device
    cuda, mps = torch.cuda.is_available(), bool(torch.backends.mps.is_available())
    # a CPU-only PyTorch (pip's default on Windows) sees no GPU, whatever is there
    if requested == "cuda" and not cuda:
        cpu_only = torch.version.cuda is None and torch.version.hip is None  # ROCm builds set hip
        why = (
            f": this PyTorch ({torch.__version__}) is a CPU-only build; install one built for CUDA to use the GPU, or"
            if cpu_only
            else " (nvidia-smi lists the GPUs; CUDA_VISIBLE_DEVICES may hide them);"
        )
        raise VicunaError(f"--device cuda: no CUDA GPU is visible to PyTorch{why} use --device cpu")
    if requested == "mps" and not mps:
        raise VicunaError("--device mps: Apple's Metal backend is not available here; use --device cpu")
    device = torch.device(requested or ("cuda" if cuda else "mps" if mps else "cpu"))
    if device.type == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
        # Apple's GPU has bfloat16 from macOS 14 on; before, PyTorch (2.9 and older run there) stopped with a
        # TypeError traceback once the weights were read
        needs = "--load-8bit (its scales are bfloat16)" if settings.load_8bit else "--dtype bfloat16"
        if settings.load_8bit or settings.dtype == "bfloat16":
            raise VicunaError(
                f"{needs} on mps needs macOS 14 or newer, where Apple's GPU computes in bfloat16; "
                "use --dtype float16 on mps, or --device cpu"
            )
    if settings.max_gpu_memory:
        parse_bytes(settings.max_gpu_memory)
    if device.type == "cuda" and settings.num_gpus > torch.cuda.device_count():
        raise VicunaError(
            f"--num-gpus {settings.num_gpus}: only {torch.cuda.device_count()} GPU(s) are visible"
        )
    return device


def resolve_dtype(requested: str, device: torch.device, config: Any, progress: bool = True) -> torch.dtype:
    if requested != "auto":
        if requested == "bfloat16" and device.type == "cuda":
            warn_if_bfloat16_is_emulated()
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if native_bfloat16() else torch.float16
    if device.type == "mps":
        return torch.float16
    if not fits_in_ram(config, torch.float32):  # not timed: float32 would be refused (check_fits)
        return torch.bfloat16
    return fastest_cpu_dtype(config, progress)


def fits_in_ram(config: Any, dtype: torch.dtype) -> bool:
    """Whether the model in `dtype`, with a chat's KV cache, fits the RAM available, as `check_fits` asks."""
    return chat_needs(model_size(config), dtype) <= probe_hardware().ram_available


def chat_needs(size: ModelSize, dtype: torch.dtype, load_8bit: bool = False) -> int:
    """The memory a chat with the model needs: its weights and a KV cache of KV_TOKENS, with HEADROOM."""
    return int((size.weight_bytes(dtype, load_8bit) + size.kv_bytes(KV_TOKENS, dtype)) * HEADROOM)


def native_bfloat16() -> bool:
    """Whether this machine's CUDA GPU computes in bfloat16 (compute capability 8.0+). PyTorch makes
    bfloat16 tensors on a T4 or an RTX 20xx too, emulated and slow, and `is_bf16_supported()` counts that."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def warn_if_bfloat16_is_emulated() -> None:
    """An explicit --dtype bfloat16 on a GPU without native bfloat16 (below compute capability 8.0: a T4,
    an RTX 20xx, a V100) runs, emulated by PyTorch, slowly and without a word: said, not refused. Logged
    ('vicuna.placement'), as the other warnings of a load are: a library's caller routes or silences it with
    logging; `vicuna chat` shows it on stderr, `vicuna serve` in its log's format."""
    if native_bfloat16():
        return
    gpu = torch.cuda.get_device_properties(torch.cuda.current_device())
    log.warning(
        "--dtype bfloat16 on the %s (compute capability %d.%d), which has no native bfloat16 (8.0 and newer "
        "have it): PyTorch emulates it, slowly; try --dtype float16",
        gpu.name,
        gpu.major,
        gpu.minor,
    )


def mlp_width(text: Any) -> int:
    """The MLP's inner width: `intermediate_size`, which GPT-2-style configs (`n_inner`, None for the
    default) lack; their default is 4 * hidden_size."""
    return getattr(text, "intermediate_size", None) or 4 * text.hidden_size


def trial_layers(config: Any) -> int:
    """Enough decoder layers for 128 MB of float32 weights, so that they stream from memory as a real
    model's do rather than sitting in a cache."""
    text = config.get_text_config()
    per_layer = 4 * (4 * text.hidden_size**2 + 3 * text.hidden_size * mlp_width(text))
    return max(1, min(text.num_hidden_layers, -(-(128 * 2**20) // per_layer)))


def _time_reply(config: Any, dtype: torch.dtype) -> float:
    """Seconds for a 64-token prompt and 16 decode steps on a cut-down copy of the model (random weights,
    its real layers and output head) in `dtype`, run as the engine runs it: through the fused LLaMA
    runner where the model allows (with our CPU kernel where it runs), else through
    transformers."""
    import copy

    from transformers import AutoModelForCausalLM

    from vicuna.engine.runner import HFRunner, LlamaRunner, LlamaWeights, llama_fast_path_ok

    trial = copy.deepcopy(config)
    trial.get_text_config().num_hidden_layers = trial_layers(config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(trial, dtype=dtype).eval()
    weights = LlamaWeights(model) if llama_fast_path_ok(model) else None
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        runner = LlamaRunner(weights, None) if weights else HFRunner(model, torch.device("cpu"))
        runner.prefill([0] * 64)
        for _ in range(16):
            runner.step(0)
        best = min(best, time.perf_counter() - start)
    return best


def remembered_dtypes(cache: Path) -> dict[str, str]:
    """The answers timed before; none from a damaged file (not UTF-8, not an object of dtype names), which
    ended every start on the CPU in a traceback until it was found and deleted: it is written again."""
    try:
        known = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # JSON or UTF-8
        return {}
    if not isinstance(known, dict):
        return {}
    return {key: name for key, name in known.items() if isinstance(name, str) and name in DTYPES}


def fastest_cpu_dtype(config: Any, progress: bool = True) -> torch.dtype:
    """float32 or bfloat16, whichever runs a reply of this model faster on this CPU; measured once per
    CPU and model shape, and remembered. `progress`: say so while it is measured (seconds)."""
    text = config.get_text_config()
    shape = (text.hidden_size, mlp_width(text), text.num_attention_heads, text.vocab_size)
    from vicuna.engine import kernel

    runs_on = f"kernel-{kernel.source_hash()}" if kernel.load(progress) is not None else "pytorch"
    key = f"{runs_on}|{platform.processor()}|{os.cpu_count()}|{torch.__version__}|{torch.get_num_threads()}|{shape}"
    cache = vicuna_home() / "cpu-dtype.json"
    known = remembered_dtypes(cache)
    if key not in known:
        if progress:
            print(
                "Timing float32 against bfloat16 for this model on this CPU (once) ...",
                file=sys.stderr,
                flush=True,
            )
        fp32, bf16 = _time_reply(config, torch.float32), _time_reply(config, torch.bfloat16)
        # read again: what another start (another model) remembered while this one timed stays remembered
        known = {**remembered_dtypes(cache), key: "bfloat16" if bf16 < fp32 else "float32"}
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(cache, json.dumps(known))
        except OSError as err:  # a read-only or full $VICUNA_HOME (a container's): the answer still holds
            log.warning(
                "cannot remember the faster CPU dtype in %s (%s), so it is timed again on every start: make "
                "that folder writable or set VICUNA_HOME to a writable one",
                cache,
                err.strerror or err,
            )
    return DTYPES[known[key]]


def plan_placement(config: Any, dtype: torch.dtype, budgets: list[int]) -> dict[str, int]:
    """Decoder layers spread over GPUs with these byte budgets in proportion to them, so that a small GPU
    beside a large one keeps as large a share of its memory for its layers' KV cache and activations.

    Raises DoesNotFitError when the layers do not all fit on the GPUs.
    """
    from accelerate.utils import compute_module_sizes, infer_auto_device_map

    model = empty_model(config)
    # a list: recent transformers give a set, which accelerate before 1.14 takes for one class name
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    sizes = compute_module_sizes(model, dtype=dtype)
    weights = sizes[""]
    # Each GPU but the last gets its share and room for one more layer (whole layers rarely make up the
    # share exactly), the first for one more (accelerate keeps a layer's room free there); the last, the rest.
    layer = max((sizes[n] for n, m in model.named_modules() if type(m).__name__ in no_split), default=0)
    max_memory = {
        i: min(b, b * weights // sum(budgets) + layer * (2 if i == 0 else 1))
        for i, b in enumerate(budgets[:-1])
    }
    max_memory[len(budgets) - 1] = budgets[-1]
    device_map = infer_auto_device_map(
        model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype
    )
    off = sorted({str(v) for v in device_map.values() if not isinstance(v, int)})
    if off:
        raise DoesNotFitError(
            f"the model does not fit on {len(budgets)} GPU(s) of {', '.join(gib(b) for b in budgets)} "
            f"(part would go to {', '.join(off)})"
        )
    return device_map


def gpu_budgets(hw: Hardware, settings: ModelSettings) -> list[int]:
    """The bytes each GPU can give the model: --max-gpu-memory up to what is free, by default 90% of it."""
    budget = parse_bytes(settings.max_gpu_memory) if settings.max_gpu_memory else None
    return [min(budget, g.free_bytes) if budget else int(g.free_bytes * 0.9) for g in hw.gpus]


@dataclass(frozen=True)
class Option:
    flags: str
    needed: int
    available: int

    @property
    def fits(self) -> bool:
        return self.needed <= self.available


def fit_options(size: ModelSize, hw: Hardware, settings: ModelSettings) -> list[Option]:
    """Each way to run the model on this machine, with what it needs and what there is."""
    opts = []
    for dtype_name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        for eight in (False, True):
            flags = f"--device cpu --dtype {dtype_name}" + (" --load-8bit" if eight else "")
            opts.append(Option(flags, chat_needs(size, dtype, eight), hw.ram_available))
    if hw.mps:  # Apple's GPU, in the same RAM; --load-8bit's bfloat16 scales need macOS 14 (resolve_device)
        for eight in (False, True) if torch.backends.mps.is_macos_or_newer(14, 0) else (False,):
            flags = "--device mps --dtype float16" + (" --load-8bit" if eight else "")
            opts.append(Option(flags, chat_needs(size, torch.float16, eight), hw.ram_available))
    if hw.gpus:
        per_gpu = gpu_budgets(hw, settings)
        half_name, half = ("bfloat16", torch.bfloat16) if native_bfloat16() else ("float16", torch.float16)
        for eight in (False, True):
            need = chat_needs(size, half, eight)
            for n in range(1, 1 + (1 if eight else len(hw.gpus))):  # 8-bit: on one GPU (see check_fits)
                flags = (
                    f"--device cuda --dtype {half_name}"
                    + (f" --num-gpus {n}" if n > 1 else "")
                    + (" --load-8bit" if eight else "")
                )
                opts.append(Option(flags, need, sum(per_gpu[:n])))
    return opts


def check_fits(config: Any, settings: ModelSettings, device: torch.device, dtype: torch.dtype) -> Any:
    """The device_map to load with, after checking that the model fits; else a DoesNotFitError that
    lists the flags that would fit."""
    size = model_size(config)
    hw = probe_hardware()
    kv = size.kv_bytes(KV_TOKENS, dtype)
    weights = size.weight_bytes(dtype, settings.load_8bit)
    given = (("--num-gpus", settings.num_gpus > 1), ("--max-gpu-memory", bool(settings.max_gpu_memory)))
    gpu_flags = [flag for flag, is_given in given if is_given]  # its value was read by resolve_device
    if device.type != "cuda" and gpu_flags:
        flags, ignored = (
            " and ".join(gpu_flags),
            "they are ignored" if len(gpu_flags) > 1 else "it is ignored",
        )
        said = f"{flags} {'apply' if len(gpu_flags) > 1 else 'applies'} to CUDA GPUs"
        if settings.device is None and device.type == "cpu":  # why, before a 13B model loads on the CPU
            cpu_only = torch.version.cuda is None and torch.version.hip is None  # ROCm builds set hip
            why = "is a CPU-only build" if cpu_only else "sees no CUDA GPU"
            said += f", and this PyTorch ({torch.__version__}) {why}; the model runs on {device.type} and {ignored}"
        else:
            said += f"; on {device.type} {ignored}"
        print(f"notice: {said}", file=sys.stderr)
    if device.type == "cuda":
        gpus = settings.num_gpus
        if settings.load_8bit and gpus > 1:  # quantized layer by layer onto one device (quant.quantize_int8)
            print("notice: --load-8bit keeps the model on one GPU; --num-gpus is ignored", file=sys.stderr)
            gpus = 1
        budgets = gpu_budgets(hw, settings)[:gpus]
        where = f"{gpus} GPU(s) with {gib(sum(budgets))} usable"
        available = sum(budgets)
    else:
        where, available, budgets = (
            f"{device.type} RAM with {gib(hw.ram_available)} available",
            hw.ram_available,
            [],
        )
    needed = chat_needs(size, dtype, settings.load_8bit)
    if needed > available:
        fitting = [o.flags for o in fit_options(size, hw, settings) if o.fits]
        advice = ("; these would fit: " + " | ".join(fitting)) if fitting else "; no option fits this machine"
        raise DoesNotFitError(
            f"the model needs about {gib(needed)} ({gib(weights)} of weights, {gib(kv)} of KV cache for "
            f"{KV_TOKENS} tokens) but {where}{advice}. See `vicuna doctor`."
        )
    if settings.load_8bit:
        # read as stored from the memory-mapped file, each layer quantized on `device` (quant.quantize_int8):
        # on Apple's GPU too, where loading it whole first held the 16-bit model in the RAM it shares
        return {"": "cpu"}
    if device.type != "cuda":
        return {"": str(device)}
    if settings.num_gpus == 1:
        return {"": device.index or 0}
    return plan_placement(config, dtype, budgets)
