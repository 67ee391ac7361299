"""Shared fixtures: tiny models built in code, and the real built-in model (loaded once per session)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from tests.tiny_models import write_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA (2 layers, hidden 64, SentencePiece vocab of 400) in HF format. Treat as read-only."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory):
    """The tiny LLaMA loaded as a float32 engine on the CPU, with a context window of 1024 so that long
    replies and batches that run out of cache are possible; shared by the batching and server tests."""
    from vicuna.config import ModelSettings
    from vicuna.engine.loader import load_engine

    folder = write_tiny_llama(
        tmp_path_factory.mktemp("tiny-serve") / "tiny-llama", max_position_embeddings=1024
    )
    return load_engine(ModelSettings(model_path=str(folder), device="cpu", dtype="float32"), progress=False)


@pytest.fixture(scope="session", autouse=True)
def _vicuna_home():
    """The built-in model is converted once per machine and shared by every test through
    $VICUNA_HOME (VICUNA_TEST_HOME, else ~/.cache/vicuna); tests that write other caches use tmp_path."""
    os.environ.setdefault(
        "VICUNA_HOME", os.environ.get("VICUNA_TEST_HOME", str(Path.home() / ".cache" / "vicuna"))
    )
    # Nothing downloads from the Hub in a test: one that reaches it by mistake (a --model-path shaped like
    # owner/name is downloaded) fails at once here; the Hub's tests set a fake Hub of their own.
    os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
    yield


class Terminal(io.StringIO):
    """A screen that says it is a terminal, where bars are drawn and redrawn."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def screen() -> Terminal:
    return Terminal()


@pytest.fixture
def prefill_starts(monkeypatch) -> list[int]:
    """Where each `LlamaRunner.prefill` starts from now on (0: the whole prompt; more: after a cached
    beginning), in call order."""
    from vicuna.engine.runner import LlamaRunner

    starts: list[int] = []
    prefill = LlamaRunner.prefill

    def spy(self, ids, start=0):
        starts.append(start)
        return prefill(self, ids, start)

    monkeypatch.setattr(LlamaRunner, "prefill", spy)
    return starts


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA GPU: skipped where PyTorch sees none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def pretend_gpu(monkeypatch):
    """`pretend_gpu(name, major, minor)`: a CUDA GPU of this compute capability, on which PyTorch can make
    bfloat16 tensors (emulated below 8.0, as on a T4)."""
    from types import SimpleNamespace

    import torch

    def pretend(name: str, major: int, minor: int) -> None:
        properties = SimpleNamespace(name=name, major=major, minor=minor)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: properties)
        monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda d: True)  # emulation works
        monkeypatch.setattr(torch.version, "hip", None)

    return pretend


@pytest.fixture(params=["cuda", "mps"])
def gpu_out_of_memory(request):
    """`gpu_out_of_memory()`: the error a GPU running out of memory raises, CUDA's and Apple's: PyTorch's mps
    allocator raises a plain RuntimeError, never torch.OutOfMemoryError."""
    import torch

    if request.param == "cuda":
        return lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return lambda: RuntimeError(
        "MPS backend out of memory (MPS allocated: 17.20 GiB, other allocations: 1.02 GiB, max allowed: "
        "18.13 GiB). Tried to allocate 1.00 GiB on private pool."
    )
