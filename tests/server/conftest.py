"""A tiny float32 engine shared by the server tests (context window 1024, so long replies are possible)."""

from __future__ import annotations

import pytest

from tests.tiny_models import write_tiny_llama


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory):
    from vicuna.config import ModelSettings
    from vicuna.engine.loader import load_engine

    folder = write_tiny_llama(
        tmp_path_factory.mktemp("tiny-serve") / "tiny-llama", max_position_embeddings=1024
    )
    return load_engine(ModelSettings(model_path=str(folder), device="cpu", dtype="float32"), progress=False)
