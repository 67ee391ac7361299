"""`vicuna doctor`: the hardware, what the model needs in each precision, and which flags fit (without a model,
the hardware alone)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vicuna.config import add_model_arguments, model_settings_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    # a prompt template needs no memory: taken (a chat's command line run as doctor), but not offered
    for action in parser._actions:
        if action.dest in ("conv_template", "conv_system_msg"):
            action.help = argparse.SUPPRESS


def main(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.markup import escape

    from vicuna.engine import kernel
    from vicuna.engine.memory import gib, model_size, probe_hardware
    from vicuna.engine.placement import fit_options
    from vicuna.errors import ModelLoadError

    console = Console()
    hw = probe_hardware()
    console.print("[bold]Hardware[/bold]")
    # what the machine or the user names is printed as it is, not as rich's markup, which took "[v2]" in a
    # path for a tag (and on Windows the backslash before it for its escape)
    console.print(
        f"  CPU   {hw.cpu}, {hw.cores} core{'s' * (hw.cores != 1)}; features: {' '.join(hw.cpu_flags) or 'none of note'}",
        markup=False,
    )
    console.print(f"  CPU kernel  {kernel.status()}", markup=False)
    console.print(f"  RAM   {gib(hw.ram_total)} total, {gib(hw.ram_available)} available")
    console.print(f"  Disk  {gib(hw.disk_free)} free for models")
    for g in hw.gpus:
        console.print(
            f"  GPU {g.index} {g.name}: {gib(g.total_bytes)} ({gib(g.free_bytes)} free), "
            f"compute capability {g.capability[0]}.{g.capability[1]}"
            + ("" if g.capability >= (7, 5) else " (below 7.5: no fine-tuning)")
        )
    if hw.gpus:
        from vicuna.engine import int8_gpu

        console.print(f"  GPU kernels  {int8_gpu.status()}", markup=False)
    else:
        console.print("  GPU   none visible to PyTorch" + (" (Apple MPS available)" if hw.mps else ""))

    settings = model_settings_from_args(args)
    try:
        folder, config = model_config(settings.model_path)
    except ModelLoadError as err:
        if settings.model_path is not None:  # the model asked about: its error is the answer
            raise
        # the built-in model is not installed: one line of the machine's report, not a failure of it
        console.print(f"\n[bold]Model[/bold] none: {escape(str(err))}", highlight=False)
        return 0
    size = model_size(config)
    console.print(f"\n[bold]Model[/bold] {escape(str(folder))} — {size.params / 1e6:,.1f}M parameters")
    sizes = whole_words_table("precision", "weights", "KV cache per 1k tokens")
    for name, dtype, eight in (
        ("float32", torch.float32, False),
        ("bfloat16 / float16", torch.bfloat16, False),
        ("8-bit (--load-8bit)", torch.bfloat16, True),
    ):
        sizes.add_row(name, gib(size.weight_bytes(dtype, eight)), gib(size.kv_bytes(1024, dtype)))
    console.print(sizes)
    from vicuna.engine.batching import DEFAULT_MAX_BATCH_SIZE, DEFAULT_TOKENS_PER_SEQUENCE, KV_SHARE
    from vicuna.engine.engine import context_window

    tokens = DEFAULT_MAX_BATCH_SIZE * min(context_window(config), DEFAULT_TOKENS_PER_SEQUENCE)
    console.print(
        f"`vicuna serve` also reserves a KV cache of up to {tokens:,} tokens by default ({DEFAULT_MAX_BATCH_SIZE} "
        f"replies at once; fewer where {KV_SHARE:.0%} of the memory free after loading holds less, or for LLaMA "
        "models holds less twice, since their cache grows by copying): "
        f"{gib(size.kv_bytes(tokens, torch.bfloat16))} in 16 bits (--max-batch-size, --kv-cache-tokens)",
        highlight=False,
    )
    fits = whole_words_table("flags", "needs", "available", "fits")
    for option in fit_options(size, hw, settings):
        fits.add_row(
            option.flags, gib(option.needed), gib(option.available), "yes" if option.fits else "[red]no[/red]"
        )
    console.print(fits)

    # The flags given here, checked as `vicuna chat` checks them before loading.
    from vicuna.engine.placement import check_fits, resolve_device, resolve_dtype
    from vicuna.errors import VicunaError

    try:
        device = resolve_device(settings)
        dtype = resolve_dtype(settings.dtype, device, config)
        check_fits(config, settings, device, dtype)
    except VicunaError as err:
        console.print(
            f"\n[bold]These flags[/bold] [red]do not work here[/red]: {escape(str(err))}", highlight=False
        )
        return err.exit_code
    eight = " --load-8bit" if settings.load_8bit else ""
    several = device.type == "cuda" and settings.num_gpus > 1 and not settings.load_8bit  # 8-bit: one GPU
    gpus = f" --num-gpus {settings.num_gpus}" if several else ""
    chosen = f"--device {device.type} --dtype {str(dtype).removeprefix('torch.')}{gpus}{eight}"
    console.print(f"\n[bold]These flags[/bold] ({chosen}): the model fits", highlight=False)
    return 0


def whole_words_table(*headers: str) -> Any:
    """A rich table whose words too long for a narrow terminal (COLUMNS=40, a large font, a screen
    magnifier) go on in the next row, not cut at "…": the flags that fit were shown as "--load-…", which
    left two rows alike and no flag to copy."""
    from rich.table import Column, Table

    return Table(*(Column(header, overflow="fold") for header in headers))


def model_config(model_path: str | None) -> tuple[Path, Any]:
    """The model asked about (its folder, or its .gguf file) and its config. A .gguf file not yet converted is
    read from its header: doctor converted it (for a 7B model, minutes and a 27 GB copy) only to report what
    it needs. A Hub repository is not downloaded either."""
    from vicuna.engine.loader import gguf_config, read_config, resolve_model_path
    from vicuna.weights.builtin import gguf_cache_dir

    path = Path(model_path).expanduser() if model_path else None
    unconverted = path is not None and path.suffix == ".gguf" and path.is_file()
    if unconverted and not (gguf_cache_dir(path) / "config.json").is_file():
        return path, gguf_config(path)
    folder = resolve_model_path(model_path, download=False)  # not gigabytes to show the needs
    return folder, read_config(folder)
