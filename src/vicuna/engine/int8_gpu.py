"""The product of rows with int8 weight rows (`--load-8bit`) on a CUDA GPU.

Decoding reads every weight once per token, so int8 weights are read in half of float16's time if the
product reads them as they are stored. PyTorch has no such product on CUDA (`_weight_int8pack_mm` runs on
CPUs and Apple GPUs), and converting the weight to float16 first reads and writes it again, which makes
8-bit slower than float16. So products of up to `MAX_ROWS` rows go through Triton kernels that load int8
tiles and convert them in registers, summing in float32, with each output row's scale applied at the end:

- `_rows` / `_rows64`: tiles of 16 or 64 rows multiplied on the tensor cores (batched decode steps,
  prompts);
- `_one_row`: a single row (a decode step), multiply-adds without the tensor cores, whose 16-row tiles
  would be 15 rows of zeros. Its tile sizes may also split each weight row's columns among `SPLIT`
  programs (split-K): a 13B model's narrow weights (5,120 rows) then keep more programs, and more bytes,
  in flight. Each program stores its float32 sums, and the last of a tile's programs to finish (counted
  with an atomic add) adds them in a fixed order and stores the row: the same result on every run.

They also do what a layer does around the product, which in a CUDA-graph decode step saves a kernel
each (3 of a layer's ~12 with int8 weights): both add the residual as the sums are stored (`product`'s
`into`), and `_one_row` applies the MLP's gating to the row as it loads it (`gated`; tiles of rows are
gated first by `step_gpu.silu_mul`, since each block of weight rows would compute the gating of its
whole tile again).

For one row both are tried on first use of each weight shape and the faster is kept (`product`); Triton
tunes each kernel's tile sizes for each weight shape on first use (kept in its cache folder). More rows
are compute-bound: the weight is converted to the rows' dtype and multiplied by cuBLAS.

Triton comes with PyTorch's CUDA builds on Linux; without it (or without a C compiler, which it builds its
launcher with) every product takes the converting path.
Tests run the kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import inspect
import os
import shutil

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # PyTorch's CPU builds, Windows
    triton = None
TURNED_OFF = os.environ.get("VICUNA_TRITON") == "0"  # PyTorch's operations instead (see `vicuna doctor`)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Triton builds its CUDA driver module (and, before 3.4, each kernel's launcher) from C on first use, with
# $CC, gcc or clang: where there is none (a slim container image) the first decode step on a GPU failed
# with "Failed to find C compiler". Its interpreter (tests) builds nothing.
NO_COMPILER = triton is not None and not (
    INTERPRET or os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
)
if TURNED_OFF or NO_COMPILER:
    triton = None

# Multiply-adds as one instruction each (Triton's default until 3.10, which turns it off): the one-row
# kernel's products and sums would otherwise take two.
FP_FUSION = {"enable_fp_fusion": True}
MAX_ROWS = 256  # more rows: dequantize and cuBLAS (the kernels would read the weight once per 64 rows)
_one_row_wins: dict[tuple[int, int, torch.dtype], bool] = {}  # per weight shape and dtype, once timed


def status() -> str:
    """One line on the GPU kernels (this module's and `step_gpu`'s) here."""
    if triton is None:
        why = (
            "turned off (VICUNA_TRITON=0)"
            if TURNED_OFF
            else "no C compiler for Triton to build its GPU launcher with (install gcc, or name one in CC)"
            if NO_COMPILER
            else "Triton is not installed"
        )
        return (
            f"not used: {why}; --load-8bit converts each weight to float16 for each product, and a decode "
            "step runs PyTorch's operations between its products"
        )
    return f"ready (Triton {triton.__version__}): int8 products, and a decode step's norms, rotary, KV-cache writes and gating"


def runs_on(device: torch.device) -> bool:
    """Whether int8 products of rows on `device` go through `product`: on a CUDA GPU (through PyTorch's
    operations where Triton is not used), and on the CPU in Triton's interpreter (tests)."""
    return device.type == "cuda" or INTERPRET


def product(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    *,
    gated: bool = False,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] times int8 `weight` [N, K] with a scale per output row (`scales` [N]): [M, N] in x's
    dtype, as F.linear(x, weight * scales[:, None]) with float32 sums. What a layer does around the
    product is done inside it, which in a decode step saves a kernel each: with `gated`, x is [M, 2K] and
    the rows multiplied are silu(first half) * second half (the MLP's gating, rounded to x's dtype as
    `step_gpu.silu_mul` rounds it); with `into` ([M, N], x's dtype) the product is added into it (the
    residual add, rounded once) and `into` is returned."""
    m = x.shape[0]
    n, k = weight.shape
    if x.shape[1] != (2 if gated else 1) * k:
        raise ValueError(f"int8 product: rows of {x.shape[1]} for a weight of {k} columns (gated={gated})")
    if into is not None and (into.shape != (m, n) or not into.is_contiguous() or into.dtype != x.dtype):
        raise ValueError(f"int8 product: cannot add [{m}, {n}] into {tuple(into.shape)} {into.dtype}")
    one = triton is not None and m == 1 and _one_row_faster(x[:, :k], weight, scales)
    if gated and not one:  # gated once here: each tile of rows would gate its whole tile again
        from vicuna.engine.step_gpu import gate  # step_gpu takes Triton from this module

        x, gated = gate(x), False
    if triton is None or m > MAX_ROWS:
        y = F.linear(x, weight * scales.to(x.dtype)[:, None])  # int8 promoted as it is scaled: one pass
        return y if into is None else into.add_(y)
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device) if into is None else into
    if one:
        return one_row(x, weight, scales, out, GATED=gated, ADD=into is not None)
    return rows(x, weight, scales, out, ADD=into is not None)


def rows(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, ADD=False
) -> torch.Tensor:
    """`_rows` into `out` (tiles of 16 rows) for up to 16 rows, else `_rows64` (tiles of 64); with `ADD`
    the product is added to what `out` holds."""
    m = x.shape[0]
    n, k = weight.shape
    tile, kernel = (16, _rows) if m <= 16 else (64, _rows64)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, tile))  # noqa: E731
    ieee = x.dtype == torch.float32
    kernel[grid](x, weight, scales, out, m, n, K=k, BLOCK_M=tile, IEEE=ieee, ADD=ADD, **FP_FUSION)
    return out


def one_row(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    out: torch.Tensor,
    GATED=False,
    ADD=False,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """`_one_row` into `out`; `GATED` and `ADD` as `product`'s `gated` and `into`. With `config`, that
    tile size instead of the tuner's choice (tests, `scripts/gpu_profile.py`); a split one no finer, and
    in no more parts, than `ONE_ROW_CONFIGS` has (`_split_buffers`)."""
    n, k = weight.shape
    sums, counts = _split_buffers(x.device, n)
    args = (x, weight, scales, out, sums, counts, n)
    flags = dict(K=k, GATED=GATED, ADD=ADD, **FP_FUSION)
    if config is None:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT"])  # noqa: E731
        _one_row[grid](*args, **flags)
    else:
        block_n, split = config.kwargs["BLOCK_N"], config.kwargs["SPLIT"]
        grid = (triton.cdiv(n, block_n), split)
        if split > 1 and (split > sums.shape[0] or grid[0] > counts.numel()):  # past their ends: any memory
            raise ValueError(
                f"one_row: tiles of {block_n} rows in {split} parts ({grid[0]} tiles) do not fit the split "
                f"buffers, made for ONE_ROW_CONFIGS: at most {sums.shape[0]} parts and {counts.numel()} tiles"
            )
        _one_row.fn[grid](*args, **flags, **config.all_kwargs())
    return out


_split: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _split_buffers(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For `_one_row`'s split tile sizes, per device and number of weight rows: each program's float32
    sums ([most SPLIT, n]) and, per tile of weight rows, how many of its programs are done (int32 zeros;
    the last program sets its count back to zero), sized for the tuner's tile sizes. Made on first use,
    which a decode step's CUDA graph is recorded after, and kept: the products run one after another on
    the GPU, so weights of the same width share them."""
    key = (device, n)
    if key not in _split:
        most = max(c.kwargs["SPLIT"] for c in _one_row.configs)
        tiles = triton.cdiv(n, min(c.kwargs["BLOCK_N"] for c in _one_row.configs))
        _split[key] = (
            torch.empty(most, n, dtype=torch.float32, device=device),
            torch.zeros(tiles, dtype=torch.int32, device=device),
        )
    return _split[key]


def _one_row_faster(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> bool:
    """`_time_one_row` once per weight shape and dtype."""
    key = (*weight.shape, x.dtype)
    if key not in _one_row_wins:
        _one_row_wins[key] = _time_one_row(x, weight, scales)
    return _one_row_wins[key]


def _time_one_row(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether `_one_row` multiplies this one row faster than `_rows`, each with its tuned tiles."""
    if INTERPRET:  # no timer: the one-row kernel
        return True
    from triton.testing import do_bench

    out = torch.empty(1, weight.shape[0], dtype=x.dtype, device=x.device)
    one_row(x, weight, scales, out)  # tunes each kernel first
    rows(x, weight, scales, out)
    alone = do_bench(lambda: one_row(x, weight, scales, out))
    tiled = do_bench(lambda: rows(x, weight, scales, out))
    return alone < tiled


if triton is not None:

    def _run_once(call, quantiles):  # Triton's interpreter (tests): no timer to tune with
        call()
        return [0.0] * len(quantiles)

    def tile_config(bn: int, bk: int, *rest: int) -> triton.Config:
        """(BLOCK_N, BLOCK_K, warps, stages), or (BLOCK_N, BLOCK_K, SPLIT, warps, stages) for `_one_row`,
        as a Triton config."""
        *split, warps, stages = rest
        sizes = {"BLOCK_N": bn, "BLOCK_K": bk} | ({"SPLIT": split[0]} if split else {})
        return triton.Config(sizes, num_warps=warps, num_stages=stages)

    def _tuned(configs: list[tuple[int, ...]], key: list[str]):
        """Triton's tuner over `configs` (`tile_config`), its choice kept in Triton's cache folder where
        this Triton keeps one: from 3.4 (PyTorch 2.8). The tuners of PyTorch 2.6's and 2.7's Triton (3.2,
        3.3) refuse `cache_results` (and older ones `do_bench`, which only the interpreter needs), which
        made importing this module, and so the engine, fail with a TypeError, on a CPU too."""
        takes = inspect.signature(triton.autotune).parameters
        options = {"cache_results": True} if "cache_results" in takes else {}
        if INTERPRET:
            options["do_bench"] = _run_once
        return triton.autotune(
            configs=[tile_config(*c) for c in configs],
            key=key,
            restore_value=["y_ptr"],  # tuning runs each config, and with ADD each run adds into y
            **options,
        )

    @triton.jit
    def _exactly(w, dtype: tl.constexpr):
        """int8 weights as `dtype`, exactly. A GPU converts integers to floats on a narrow unit (16 a clock
        on each of an H200's multiprocessors, one per weight: about the rate the weights stream in), so for
        float32 and float16 the byte is added into the bits of 2^23 + 128 (or 1024 + 128), which makes that
        float plus the weight exactly, and the constant is taken away again: an integer add and a float
        add on the wide units. Triton converts int8 to bfloat16 that way itself."""
        if dtype == tl.float32:
            return (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        elif dtype == tl.float16:
            return (w.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0
        else:
            return w.to(tl.float32).to(dtype)  # exact: |w| <= 127 (and int8 -> bfloat16 at once is not)

    @triton.jit
    def _store_y(y_ptr, offsets, sums, mask, ADD: tl.constexpr):
        """float32 sums into y, rounded once: added to what y holds with ADD (the residual add)."""
        if ADD:
            sums += tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offsets, sums.to(y_ptr.dtype.element_ty), mask=mask)

    # Small tiles of weight rows keep enough programs in flight for the narrow weights (5,120 rows in a
    # 13B model's o_proj and down_proj, on an H100's 132 multiprocessors). Tiles of 64 rows hold 4x the
    # x in shared memory at each pipeline stage, so they have fewer stages (a config that does not fit
    # is skipped by the tuner).
    ROWS_CONFIGS = [(16, 512, 4, 3), (32, 256, 4, 4), (32, 512, 8, 3), (64, 256, 8, 3)]
    ROWS64_CONFIGS = [(16, 512, 4, 2), (32, 256, 4, 3), (64, 128, 4, 3), (64, 256, 8, 2)]
    # (BLOCK_N, BLOCK_K, SPLIT, warps, stages); split in 2 or 4: twice or 4x the programs on narrow weights
    ONE_ROW_CONFIGS = [
        (4, 1024, 1, 4, 3),
        (8, 512, 1, 4, 3),
        (8, 1024, 1, 4, 3),
        (16, 512, 1, 8, 3),
        (8, 1024, 2, 4, 3),
        (16, 512, 4, 4, 3),
    ]

    @triton.jit
    def _rows_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        y_ptr,
        M,
        N,
        K: tl.constexpr,  # a loop bound: the interpreter cannot take a run-time one (with NumPy 2)
        BLOCK_M: tl.constexpr,
        IEEE: tl.constexpr,
        ADD: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns: weight rows
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + rows[:, None] * K + k[None, :], mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0
            )
            w = tl.load(  # [BLOCK_K, BLOCK_N]: the weight rows' slices, side by side
                w_ptr + cols[None, :] * K + k[:, None], mask=(cols[None, :] < N) & (k[:, None] < K), other=0
            )
            w = _exactly(w, x.dtype)
            if IEEE:  # float32 rows: no TF32 rounding
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        scale = tl.load(s_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        _store_y(y_ptr, rows[:, None] * N + cols[None, :], acc * scale[None, :], inside, ADD)

    _rows = _tuned(ROWS_CONFIGS, key=["N", "K"])(_rows_kernel)  # tiles of 16 rows
    _rows64 = _tuned(ROWS64_CONFIGS, key=["N", "K"])(_rows_kernel)  # tiles of 64 rows

    @_tuned(ONE_ROW_CONFIGS, key=["N", "K"])
    @triton.jit
    def _one_row(
        x_ptr,
        w_ptr,
        s_ptr,
        y_ptr,
        sums_ptr,  # [SPLIT, N] float32: each program's sums (`_split_buffers`)
        counts_ptr,  # per tile of BLOCK_N weight rows: its programs done
        N,
        K: tl.constexpr,
        GATED: tl.constexpr,
        ADD: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT: tl.constexpr,
    ):
        tile = tl.program_id(0)
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        part = tl.program_id(1)  # this program's columns: every SPLIT-th block of BLOCK_K, from the part-th
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # summed across at the end
        for start in range(0, K, SPLIT * BLOCK_K):
            k = start + part * BLOCK_K + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + k, mask=k < K, other=0.0)
            if GATED:  # x is gate and up side by side: silu(gate) * up, rounded as `step_gpu.silu_mul` does
                gate = x.to(tl.float32)
                up = tl.load(x_ptr + K + k, mask=k < K, other=0.0).to(tl.float32)
                x = (gate / (1.0 + tl.exp(-gate)) * up).to(x.dtype)
            x = x.to(tl.float32)
            w = tl.load(
                w_ptr + cols[:, None] * K + k[None, :], mask=(cols[:, None] < N) & (k[None, :] < K), other=0
            )
            acc += _exactly(w, tl.float32) * x[None, :]
        sums = tl.sum(acc, axis=1)
        if SPLIT == 1:
            _scale_store(s_ptr, y_ptr, cols, sums, cols < N, ADD)
        else:
            tl.store(sums_ptr + part * N + cols, sums, mask=cols < N)
            tl.debug_barrier()  # every thread's sums stored before the count says so (released below)
            if tl.atomic_add(counts_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:  # the last one
                sums = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for p in tl.static_range(SPLIT):  # in a fixed order: the same sums on every run
                    sums += tl.load(sums_ptr + p * N + cols, mask=cols < N, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(counts_ptr + tile, 0, sem="relaxed", scope="gpu")  # for the next product
                _scale_store(s_ptr, y_ptr, cols, sums, cols < N, ADD)

    @triton.jit
    def _scale_store(s_ptr, y_ptr, cols, sums, mask, ADD: tl.constexpr):
        """The row's float32 sums times each weight row's scale, into y (`_store_y`)."""
        scale = tl.load(s_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        _store_y(y_ptr, cols, sums * scale, mask, ADD)
