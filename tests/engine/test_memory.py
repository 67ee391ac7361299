"""Memory bookkeeping that needs no accelerator: what is given back after running out of memory."""

from __future__ import annotations

import torch

from vicuna.engine.memory import release_memory_after

MPS_OUT_OF_MEMORY = (  # what PyTorch's allocator for Apple's GPU raises: a RuntimeError, not OutOfMemoryError
    "MPS backend out of memory (MPS allocated: 17.20 GiB, other allocations: 1.02 GiB, max allowed: 18.13 GiB). "
    "Tried to allocate 1.00 GiB on private pool."
)


def test_running_out_of_memory_on_apple_s_gpu_gives_its_cache_back(monkeypatch):
    """Only CUDA's cache was emptied, and only after a torch.OutOfMemoryError, which the mps allocator never
    raises: a Mac's chat or server kept the failed reply's blocks cached, out of the reach of other apps."""
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: emptied.append("mps"))
    release_memory_after(RuntimeError(MPS_OUT_OF_MEMORY))
    assert emptied == ["mps"]
    release_memory_after(torch.OutOfMemoryError("out of memory"))
    assert emptied == ["mps", "mps"]
    release_memory_after(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))  # not memory: kept
    assert emptied == ["mps", "mps"]


def test_a_model_is_sized_again_only_when_its_config_differs(monkeypatch):
    from tests.tiny_models import tiny_llama_config
    from vicuna.engine import memory

    built = []
    empty_model = memory.empty_model
    monkeypatch.setattr(memory, "empty_model", lambda config: built.append(config) or empty_model(config))
    config = tiny_llama_config(vocab_size=411)
    first = memory.model_size(config)
    assert memory.model_size(tiny_llama_config(vocab_size=411)) == first  # an equal config: counted once
    assert len(built) == 1
    wider = memory.model_size(tiny_llama_config(vocab_size=411, intermediate_size=256))
    assert len(built) == 2 and wider.params > first.params
