"""8-bit weights (`--load-8bit`), and the bytes a model's weights take.

8-bit: each weight row is stored as int8 with one scale (symmetric, absmax / 127), for every linear layer,
the output head and the token embedding (one table when the last two are tied, as in small models where
they are a fifth of the weights); the norms keep their precision. The products read the int8 rows as
stored: on the CPU our kernel (`vicuna.engine.kernel`) for any number of rows, on CUDA GPUs Triton
kernels for up to 256 rows (`vicuna.engine.int8_gpu`), elsewhere PyTorch's int8 weight-only kernel
(`_weight_int8pack_mm`, bf16 activations). torchao's generic int8 path dequantizes each weight first
and halved CPU speed here (see docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

import torch

from vicuna.engine import kernel


def quantize_rows(weight: torch.Tensor, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (int8 values, bfloat16 scales), `block` rows at a time, so that no
    float32 copy of the whole weight is made (a 49,152-row embedding table would take several)."""
    values = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], device=weight.device)
    for start in range(0, weight.shape[0], block):
        rows = weight[start : start + block].detach().float()
        scale = rows.abs().amax(dim=1).clamp(min=1e-8) / 127
        values[start : start + block] = (rows / scale[:, None]).round_().clamp_(-127, 127)
        scales[start : start + block] = scale
    return values, scales.to(torch.bfloat16)


class Int8Linear(torch.nn.Module):
    """A Linear layer with int8 weights and a bfloat16 scale per output row; the weights may be `packed`
    for our CPU kernel (`kernel.pack_`), which then multiplies them."""

    packed = False

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
        if self.packed or kernel.runs_on(rows.device, self.weight_int8.dtype):
            out = kernel.product(rows.float(), self.weight_int8, self.scales.float(), packed=self.packed)
        elif rows.is_cuda:
            from vicuna.engine import int8_gpu

            out = int8_gpu.product(rows, self.weight_int8, self.scales)
        else:
            out = torch.ops.aten._weight_int8pack_mm(rows.to(torch.bfloat16), self.weight_int8, self.scales)
        out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(torch.nn.Module):
    """A token embedding stored as int8 rows with a scale each; looks rows up in `dtype`. The rows may be
    `packed` with the output head that shares them (`kernel.pack_`). `multiplier` is the factor the
    replaced embedding applied to its rows (Gemma's embeddings are scaled by sqrt(hidden_size) in the
    embedding itself); it is kept apart from the rows' scales, which a tied output head shares."""

    packed = False

    def __init__(
        self, rows: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype, multiplier: float = 1.0
    ) -> None:
        super().__init__()
        self.dtype, self.multiplier = dtype, multiplier
        self.register_buffer("weight_int8", rows[0])
        self.register_buffer("scales", rows[1])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = kernel.packed_rows(self.weight_int8, ids) if self.packed else self.weight_int8[ids]
        scales = self.scales[ids].to(self.dtype).unsqueeze(-1)
        return rows.to(self.dtype) * (scales if self.multiplier == 1.0 else scales * self.multiplier)


def weight_bytes(model: Any) -> int:
    """Bytes of the model's weights (parameters and int8 buffers), quantized ones at their stored size."""
    int8 = {
        id(b): b
        for m in model.modules()
        if isinstance(m, Int8Linear | Int8Embedding)
        for b in (m.weight_int8, m.scales)
    }
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in int8.values()
    )


def decode_bytes(model: Any) -> int:
    """Weight bytes that one decoded token reads: all of them but the token-embedding table (one row of it
    is read), unless that table is also the output head, which reads it whole."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    table = [
        t for t in (getattr(embedding, n, None) for n in ("weight", "weight_int8", "scales")) if t is not None
    ]
    shared = any(t is getattr(head, n, None) for t in table for n in ("weight", "weight_int8", "scales"))
    return weight_bytes(model) - (0 if shared else sum(t.numel() * t.element_size() for t in table))


def _layer_linears(model: Any) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    head = model.get_output_embeddings()
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.Linear) and child is not head:
                found.append((parent, name, child))
    return found


def quantize_int8(model: Any, device: torch.device, dtype: torch.dtype | None = None) -> tuple[int, int]:
    """Quantize in place for `device`, one layer at a time on `device` (the model itself may still be on
    the CPU, and is moved there when quantized); the other parameters (norms) become `dtype` (default:
    as they are). The weights are quantized from the model's own tensors: loaded as the checkpoint
    stores them, those are its memory-mapped file, and no full copy in `dtype` is ever made (13B in
    bfloat16 on a CPU: 26 GB of memory that only page cache was needed for). Returns the weight bytes
    in `dtype` before and after."""
    dtype = dtype or next(model.parameters()).dtype
    before = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    for parent, name, linear in _layer_linears(model):
        setattr(parent, name, Int8Linear(linear, quantize_rows(linear.weight.to(device))))
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    table = quantize_rows(embedding.weight.to(device))
    head_rows = table if head.weight is embedding.weight else quantize_rows(head.weight.to(device))
    multiplier = float(getattr(embedding, "embed_scale", 1.0))  # Gemma's scaled embeddings
    model.set_input_embeddings(Int8Embedding(table, dtype, multiplier))
    model.set_output_embeddings(Int8Linear(head, head_rows))
    model.to(device)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return before, weight_bytes(model)
