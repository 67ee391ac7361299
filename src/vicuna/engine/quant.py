"""8-bit weights (`--load-8bit`): int8 weight-only quantization of the decoder's Linear layers.

torchao stores each weight row as int8 with one scale and runs on both CPU and CUDA; the embedding,
the norms and the output head keep their precision (the head is small next to the layers for
LLaMA-sized models and is the most sensitive to rounding).
"""

from __future__ import annotations

from typing import Any

import torch


def weight_bytes(model: Any) -> int:
    """Bytes of the model's parameters as stored (quantized tensors counted at their packed size)."""
    total = 0
    for p in model.parameters():
        data = p.data
        inner = [getattr(data, name) for name in getattr(data, "__tensor_flatten__", lambda: ([], None))()[0]]
        inner = [t for t in inner if isinstance(t, torch.Tensor)] or [data]
        # torchao's subclasses keep int8 data and scales in inner tensors (possibly nested one level)
        for t in inner:
            sub = getattr(t, "__tensor_flatten__", None)
            parts = [getattr(t, n) for n in sub()[0]] if sub else [t]
            total += sum(x.numel() * x.element_size() for x in parts if isinstance(x, torch.Tensor))
    return total


def quantize_int8(model: Any) -> tuple[int, int]:
    """Quantize in place; returns the weight bytes before and after."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    before = weight_bytes(model)
    head = model.get_output_embeddings()

    def is_layer_linear(module: torch.nn.Module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and module is not head

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=is_layer_linear)
    return before, weight_bytes(model)
