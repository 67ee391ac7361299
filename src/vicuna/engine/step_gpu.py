"""What a decode step does between its matrix products on a CUDA GPU, each as one Triton kernel.

A CUDA-graph decode step (`runner.step_in_pytorch`) of a 13B model on an H200 took 8.8 ms, of which
reading the weights at the measured bandwidth is 6.0 ms. Besides its 5 products and the attention, each
layer ran ~10 small kernels of a few microseconds each, even replayed from a graph; these two take 7 of
them (with them, 8.0 ms: a 4-layer model's step replayed in 0.888 ms against 0.951 ms without them):

- `rotate_store`: the rotary embedding of q and k and the writes of k and v into the KV cache (in
  PyTorch: a product with cos, a copy that swaps the halves, a multiply-add with sin, and one indexed
  write each for keys and values);
- `silu_mul`: the MLP's gating, silu(gate) * up (two kernels in PyTorch).

And `rms_norm`, the norm before each layer's attention and MLP: PyTorch's `rms_norm` kernel took 7.3 µs
for one row of 5,120 on the H200 (each of a 13B step's 81 norms; 10% of a step with int8 weights), where
one program per row with the whole row in its registers reads and writes 20 KB (not yet timed on a
GPU: `scripts/gpu_profile.py` times both).

Both compute in float32 and round once to the output's dtype. Triton comes with PyTorch's CUDA builds on
Linux; without it the step keeps PyTorch's operations. Tests run the kernels on the CPU through Triton's
interpreter (TRITON_INTERPRET=1), where `runs_on` accepts CPU tensors too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Triton where it is installed and not turned off (VICUNA_TRITON=0), as the int8 kernels find it
from vicuna.engine.int8_gpu import FP_FUSION, INTERPRET, triton

if triton is not None:
    import triton.language as tl


def runs_on(device: torch.device) -> bool:
    """Whether the step's fused kernels run for tensors on `device`."""
    return triton is not None and (device.type == "cuda" or INTERPRET)


def rotate_store(
    mixed: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> torch.Tensor:
    """Row r of `mixed` [rows, (heads + 2 kv_heads) * head_dim] holds one token's q, k and v heads, at
    position `positions[r]`. Rotates q and k by that position's cos and sin (`table` [2, positions,
    head_dim], sin with its first half negated: see `runner.rotate`), writes k and v into `keys[r, :,
    position]` and `values[r, :, position]` ([rows, kv_heads, cache positions, head_dim]) and returns the
    rotated q, [rows, heads, head_dim] in the cache's dtype."""
    rows, dim = mixed.shape[0], keys.shape[-1]
    if mixed.shape[1] != (heads + 2 * kv_heads) * dim or mixed.stride(1) != 1:
        raise ValueError(f"rotate_store: rows of {tuple(mixed.shape)} are not q, k and v heads of {dim}")
    if table.stride(2) != 1 or keys.stride(3) != 1 or values.stride(3) != 1:
        raise ValueError("rotate_store: the table's and the cache's head_dim must be contiguous")
    q = torch.empty(rows, heads, dim, dtype=keys.dtype, device=keys.device)
    _rotate_store[(rows, heads + 2 * kv_heads)](
        mixed, table, positions, q, keys, values,
        mixed.stride(0), table.stride(0), table.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        HEADS=heads, KV_HEADS=kv_heads, DIM=dim, BLOCK=triton.next_power_of_2(dim), **FP_FUSION,
    )  # fmt: skip
    return q


def gate(x: torch.Tensor) -> torch.Tensor:
    """The MLP's gating of rows of gate and up side by side: `silu_mul` where the step's kernels run,
    else PyTorch's operations."""
    if runs_on(x.device):
        return silu_mul(x)
    first, second = x.chunk(2, dim=-1)
    return F.silu(first) * second


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :width]) * x[:, width:] for x [rows, 2 width]: [rows, width] in x's dtype."""
    rows, width = x.shape[0], x.shape[1] // 2
    if x.shape[1] != 2 * width or x.stride(1) != 1:
        raise ValueError(f"silu_mul: {tuple(x.shape)} is not gate and up side by side")
    out = torch.empty(rows, width, dtype=x.dtype, device=x.device)
    block = 1024
    _silu_mul[(rows, triton.cdiv(width, block))](x, out, x.stride(0), width, BLOCK=block, **FP_FUSION)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight for each row of x [rows, width]: [rows, width] in x's dtype,
    computed in float32 and rounded once, as PyTorch's `rms_norm` computes it."""
    rows, width = x.shape
    if x.stride(1) != 1 or weight.shape != (width,) or weight.stride(0) != 1:
        raise ValueError(f"rms_norm: rows {tuple(x.shape)} and weight {tuple(weight.shape)} do not match")
    out = torch.empty(rows, width, dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(width), 16384)  # wider rows: in pieces, read twice
    warps = min(16, max(4, block // 512))  # 16 values a thread
    _rms_norm[(rows,)](
        x, weight, out, x.stride(0), eps, WIDTH=width, BLOCK=block, num_warps=warps, **FP_FUSION
    )
    return out


if triton is not None:

    @triton.jit
    def _rms_norm(x_ptr, w_ptr, out_ptr, x_row, eps, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
        src = x_ptr + tl.program_id(0) * x_row
        dst = out_ptr + tl.program_id(0) * WIDTH
        squares = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, WIDTH, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(src + cols, mask=cols < WIDTH, other=0.0).to(tl.float32)
            squares += x * x
        scale = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / WIDTH + eps)
        for start in range(0, WIDTH, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(src + cols, mask=cols < WIDTH, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=cols < WIDTH, other=0.0).to(tl.float32)
            tl.store(dst + cols, (x * scale * w).to(out_ptr.dtype.element_ty), mask=cols < WIDTH)

    @triton.jit
    def _rotate_store(
        mixed_ptr,
        table_ptr,
        pos_ptr,
        q_ptr,
        k_ptr,
        v_ptr,
        mixed_row,
        table_sin,  # the table's stride from cos to sin
        table_pos,
        k_row,
        k_head,
        k_pos,
        v_row,
        v_head,
        v_pos,
        HEADS: tl.constexpr,
        KV_HEADS: tl.constexpr,
        DIM: tl.constexpr,
        BLOCK: tl.constexpr,  # DIM rounded up to a power of two
    ):
        row, head = tl.program_id(0), tl.program_id(1)  # head: q heads, then k heads, then v heads
        d = tl.arange(0, BLOCK)
        inside = d < DIM
        pos = tl.load(pos_ptr + row)
        src = mixed_ptr + row * mixed_row + head * DIM
        x = tl.load(src + d, mask=inside, other=0.0).to(tl.float32)
        if head < HEADS + KV_HEADS:
            swapped = tl.load(src + (d + DIM // 2) % DIM, mask=inside, other=0.0).to(tl.float32)
            cos = tl.load(table_ptr + pos * table_pos + d, mask=inside, other=0.0).to(tl.float32)
            sin = tl.load(table_ptr + table_sin + pos * table_pos + d, mask=inside, other=0.0).to(tl.float32)
            y = x * cos + swapped * sin
            if head < HEADS:
                tl.store(q_ptr + (row * HEADS + head) * DIM + d, y.to(q_ptr.dtype.element_ty), mask=inside)
            else:
                dst = k_ptr + row * k_row + (head - HEADS) * k_head + pos * k_pos
                tl.store(dst + d, y.to(k_ptr.dtype.element_ty), mask=inside)
        else:
            dst = v_ptr + row * v_row + (head - HEADS - KV_HEADS) * v_head + pos * v_pos
            tl.store(dst + d, x.to(v_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _silu_mul(x_ptr, out_ptr, x_row, width, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        gate = tl.load(x_ptr + row * x_row + cols, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * x_row + width + cols, mask=inside, other=0.0).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out_ptr + row * width + cols, y.to(out_ptr.dtype.element_ty), mask=inside)
