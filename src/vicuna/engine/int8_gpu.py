"""The product of rows with int8 weight rows (`--load-8bit`) on a CUDA GPU.

Decoding reads every weight once per token, so int8 weights are read in half of float16's time if the
product reads them as they are stored. PyTorch has no such product on CUDA (`_weight_int8pack_mm` runs on
CPUs and Apple GPUs), and converting the weight to float16 first reads and writes it again, which makes
8-bit slower than float16. So up to `ROWS` rows (decode steps, also batched ones, and short prompts) go
through a Triton kernel that loads int8 tiles, converts them in registers and multiplies them with the
rows on the tensor cores, summing in float32, with each output row's scale applied at the end; Triton
tunes the tile sizes for each weight shape on first use. More rows (prompts) are compute-bound: the
weight is converted to the rows' dtype and multiplied by cuBLAS.

Triton comes with PyTorch's CUDA builds on Linux; without it every product takes the converting path.
Tests run the kernel on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # PyTorch's CPU builds, Windows
    triton = None

ROWS = 16  # rows per kernel call: tl.dot's smallest tile


def has_kernel() -> bool:
    return triton is not None


def product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] times int8 `weight` [N, K] with a scale per output row (`scales` [N]): [M, N] in x's
    dtype, as F.linear(x, weight * scales[:, None]) with float32 sums."""
    m, k = x.shape
    n = weight.shape[0]
    if triton is None or m > ROWS:
        return F.linear(x, weight.to(x.dtype).mul_(scales.to(x.dtype)[:, None]))
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _int8_rows[grid](x, weight, scales, out, m, N=n, K=k, BLOCK_M=ROWS, IEEE=x.dtype == torch.float32)
    return out


if triton is not None:
    # Tiles of BLOCK_N weight rows by BLOCK_K columns. Small tiles keep enough programs in flight for the
    # narrow weights (5,120 rows in a 13B model's o_proj and down_proj, on 132 multiprocessors).
    _CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
        for bn, bk, warps, stages in ((16, 512, 4, 3), (32, 256, 4, 4), (32, 512, 8, 3), (64, 256, 8, 3))
    ]

    def _run_once(call, quantiles):  # Triton's interpreter (tests): no timer to tune with
        call()
        return [0.0] * len(quantiles)

    @triton.autotune(
        configs=_CONFIGS,
        key=["N", "K"],
        do_bench=_run_once if os.environ.get("TRITON_INTERPRET") == "1" else None,
        cache_results=True,  # in Triton's cache folder: tuned once per machine
    )
    @triton.jit
    def _int8_rows(
        x_ptr,
        w_ptr,
        s_ptr,
        y_ptr,
        M,
        N,
        K: tl.constexpr,  # a loop bound: the interpreter cannot take a run-time one (with NumPy 2)
        BLOCK_M: tl.constexpr,
        IEEE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns: weight rows
        rows = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + rows[:, None] * K + k[None, :], mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0
            )
            w = tl.load(  # [BLOCK_K, BLOCK_N]: the weight rows' slices, side by side
                w_ptr + cols[None, :] * K + k[:, None], mask=(cols[None, :] < N) & (k[:, None] < K), other=0
            )
            w = w.to(tl.float32).to(x.dtype)  # exact: |w| <= 127 (and int8 -> bfloat16 at once is not)
            if IEEE:  # float32 rows: no TF32 rounding
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        scale = tl.load(s_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        out = acc * scale[None, :]
        tl.store(
            y_ptr + rows[:, None] * N + cols[None, :],
            out.to(y_ptr.dtype.element_ty),
            mask=(rows[:, None] < M) & (cols[None, :] < N),
        )
