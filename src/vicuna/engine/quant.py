"""8-bit weights (`--load-8bit`), and the bytes a model's weights take.

8-bit: each weight row is stored as int8 with one scale (symmetric, absmax / 127). On the CPU our kernel
(`vicuna.engine.kernel`) multiplies them for any number of rows, reading a quarter of float32's bytes;
where it does not run, PyTorch's int8 weight-only kernel does (`_weight_int8pack_mm`, bf16 activations,
about half the kernel's speed on prompts here), while torchao's generic int8 path dequantizes and halves
CPU speed (see docs/benchmarks.md). On
the CPU the token embedding and the output head are int8 too (one table
when they are tied, as in small models where they are a fifth of the weights). On GPUs torchao's
int8 weight-only layout is used for the decoder's layers. The norms keep their precision.
"""

from __future__ import annotations

from typing import Any

import torch

from vicuna.engine import kernel


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (int8 values, bfloat16 scales)."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
    return (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8), scales.to(torch.bfloat16)


class Int8Linear(torch.nn.Module):
    """A Linear layer with int8 weights and a bfloat16 scale per output row."""

    def __init__(
        self, linear: torch.nn.Linear, rows: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight_int8, scales = rows if rows is not None else quantize_rows(linear.weight)
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.bias = linear.bias

    @classmethod
    def fuse(cls, *layers: Int8Linear) -> Int8Linear:
        """One layer computing several that read the same input (their outputs concatenated); the
        layers' own buffers become views into the fused ones, so no memory is added."""
        fused = cls.__new__(cls)
        torch.nn.Module.__init__(fused)
        fused.in_features, fused.bias = layers[0].in_features, None
        fused.out_features = sum(m.out_features for m in layers)
        for name in ("weight_int8", "scales"):
            whole = torch.cat([getattr(m, name) for m in layers])
            fused.register_buffer(name, whole)
            row = 0
            for m in layers:
                setattr(m, name, whole[row : row + m.out_features])
                row += m.out_features
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if kernel.runs_on(rows.device, self.weight_int8.dtype):
            out = kernel.product(rows.float(), self.weight_int8, self.scales.float())
        else:
            out = torch.ops.aten._weight_int8pack_mm(rows.to(torch.bfloat16), self.weight_int8, self.scales)
        out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(torch.nn.Module):
    """A token embedding stored as int8 rows with a scale each; looks rows up in `dtype`."""

    def __init__(self, embedding: torch.nn.Embedding, rows: tuple[torch.Tensor, torch.Tensor]) -> None:
        super().__init__()
        self.dtype = embedding.weight.dtype
        self.register_buffer("weight_int8", rows[0])
        self.register_buffer("scales", rows[1])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = torch.nn.functional.embedding(ids, self.weight_int8).to(self.dtype)
        return rows * self.scales[ids].to(self.dtype).unsqueeze(-1)


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes as stored; torchao's subclasses keep int8 data and scales in inner tensors."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:
        return t.numel() * t.element_size()
    return sum(_tensor_bytes(getattr(t, name)) for name in flatten()[0])


def weight_bytes(model: Any) -> int:
    """Bytes of the model's weights (parameters and int8 buffers), quantized ones at their stored size."""
    int8 = {
        id(b): b
        for m in model.modules()
        if isinstance(m, Int8Linear | Int8Embedding)
        for b in (m.weight_int8, m.scales)
    }
    return sum(_tensor_bytes(p.data) for p in model.parameters()) + sum(
        _tensor_bytes(b) for b in int8.values()
    )


def decode_bytes(model: Any) -> int:
    """Weight bytes that one decoded token reads: all of them but the token-embedding table (one row of it
    is read), unless that table is also the output head, which reads it whole."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    table = [
        t for t in (getattr(embedding, n, None) for n in ("weight", "weight_int8", "scales")) if t is not None
    ]
    shared = any(t is getattr(head, n, None) for t in table for n in ("weight", "weight_int8", "scales"))
    return weight_bytes(model) - (0 if shared else sum(_tensor_bytes(t) for t in table))


def _layer_linears(model: Any) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    head = model.get_output_embeddings()
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.Linear) and child is not head:
                found.append((parent, name, child))
    return found


def quantize_int8(model: Any, device: torch.device) -> tuple[int, int]:
    """Quantize in place for `device` (the model itself may still be on the CPU, and is moved there when
    quantized); returns the weight bytes before and after."""
    before = weight_bytes(model)
    if device.type == "cpu":
        for parent, name, linear in _layer_linears(model):
            setattr(parent, name, Int8Linear(linear))
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        table = quantize_rows(embedding.weight)
        head_rows = table if head.weight is embedding.weight else quantize_rows(head.weight)
        model.set_input_embeddings(Int8Embedding(embedding, table))
        model.set_output_embeddings(Int8Linear(head, head_rows))
    else:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        head = model.get_output_embeddings()
        quantize_(
            model,
            Int8WeightOnlyConfig(),
            filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and m is not head,
        )
        model.to(device)
    return before, weight_bytes(model)


def native_half_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` matrices natively (AVX-512 BF16/FP16, AMX), as PyTorch decides
    when it routes them to oneDNN."""
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return True
