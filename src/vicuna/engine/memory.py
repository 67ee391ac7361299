"""What the machine has and what a model needs: GPUs, CPU features, RAM, disk; weight and KV-cache bytes."""

from __future__ import annotations

import platform
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    capability: tuple[int, int]


@dataclass(frozen=True)
class Hardware:
    cpu: str
    cpu_flags: tuple[str, ...]
    cores: int
    ram_total: int
    ram_available: int
    disk_free: int
    gpus: tuple[GPU, ...] = field(default_factory=tuple)
    mps: bool = False


def probe_hardware() -> Hardware:
    import os

    import psutil

    from vicuna.config import vicuna_home
    from vicuna.weights.disk import free_bytes

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            gpus.append(GPU(i, props.name, total, free, (props.major, props.minor)))
    vm = psutil.virtual_memory()
    return Hardware(
        cpu=cpu,
        cpu_flags=tuple(f for f in CPU_FLAGS if f in flags),
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        ram_total=vm.total,
        ram_available=vm.available,
        disk_free=free_bytes(vicuna_home()),
        gpus=tuple(gpus),
        mps=bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
    )


def empty_model(config: Any) -> Any:
    """The model's modules with no memory behind them (meta tensors): for counting and planning."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # tied embeddings are one tensor, counted once
    return model


@dataclass(frozen=True)
class ModelSize:
    params: int
    int8_params: int  # what 8-bit quantizes: the layers' Linear weights, the embedding and the head
    kv_values_per_token: int  # keys and values stored per token, all layers

    def weight_bytes(self, dtype: torch.dtype, load_8bit: bool = False) -> int:
        width = DTYPE_BYTES[dtype]
        if not load_8bit:
            return self.params * width
        # int8 weights plus one scale per output row (negligible), the norms kept in `dtype`
        return self.int8_params + (self.params - self.int8_params) * width

    def kv_bytes(self, tokens: int, dtype: torch.dtype) -> int:
        return self.kv_values_per_token * tokens * DTYPE_BYTES[dtype]


# Each count builds the model's modules (0.06 s of CPU for the built-in model once transformers is loaded;
# 0.1-0.2 s on 2 busy cores), and a start asked for it two or three times (the dtype's RAM check, the fit
# check, doctor's tables): counted once per config in a process, keyed by all of its fields.
_sizes: dict[str, ModelSize] = {}


def model_size(config: Any) -> ModelSize:
    key = config.to_json_string(use_diff=False)
    if key not in _sizes:
        _sizes[key] = count_size(config)
    return _sizes[key]


def count_size(config: Any) -> ModelSize:
    model = empty_model(config)
    params = sum(p.numel() for p in model.parameters())
    lm_head = model.get_output_embeddings()
    linear = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not lm_head
    )
    tables = {id(t): t.numel() for t in (model.get_input_embeddings().weight, lm_head.weight)}  # tied: one
    int8 = linear + sum(tables.values())
    return ModelSize(params, int8, kv_values_per_token(config))


def kv_values_per_token(config: Any) -> int:
    """Keys and values a KV cache stores per token, all layers (grouped-query attention's fewer KV heads)."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim


def parse_bytes(text: str) -> int:
    """'20GiB', '20GB', '512MiB', '1.5 TiB' -> bytes. A bare number is refused: 13 bytes is never meant."""
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
    units |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("kmgtib")
    try:
        size = int(float(number) * units[raw[len(number) :]])
    except (ValueError, KeyError, OverflowError):
        size = 0
    if size <= 0:
        from vicuna.errors import VicunaError

        raise VicunaError(
            f"--max-gpu-memory: cannot read {text!r}; expected a positive size with its unit, such as 20GiB"
        )
    return size


def free_bytes(device: torch.device) -> int:
    """Memory free for more tensors on `device`: the GPU's free memory, else the RAM available (an Apple
    GPU shares the RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def gib(n: int) -> str:
    """A byte count for people: GiB from 1 GiB up, MiB from 1 MiB up, KiB from 1 KiB up, bytes below (a tiny
    model's 8-bit weights, all in MiB, were '0 MiB -> 0 MiB')."""
    for unit, scale, digits in (("GiB", 2**30, 1), ("MiB", 2**20, 0), ("KiB", 2**10, 0)):
        if n >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{n} bytes"


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the GPU running out of memory: CUDA raises torch.OutOfMemoryError, while
    PyTorch's allocator for Apple's GPU (mps) raises a plain RuntimeError that says so."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and str(error).startswith("MPS backend out of memory")
    )


def release_memory_after(error: BaseException) -> None:
    """After running out of GPU memory, give what the failed work held back to the GPU. The error's
    traceback keeps every frame it passed through, and with them their tensors (a step's activations, a
    reply's KV cache), for as long as the error lives (it is logged, and handed to each reply it ended):
    those frames' variables are cleared first. Then PyTorch's cache of freed blocks, which other
    programs (and `nvidia-smi`) would see as used, is given back: on a Mac, memory the whole system shares."""
    if out_of_memory(error):
        traceback.clear_frames(error.__traceback__)  # frames still running (the caller's) are kept
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if torch.backends.mps.is_available():
            torch.mps.empty_cache()
