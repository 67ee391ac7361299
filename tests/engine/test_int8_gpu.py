"""The int8 product for CUDA GPUs (`--load-8bit`): the Triton kernel against the dequantized product,
with every tile size it may be tuned to. On the CPU the kernel runs in Triton's interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from vicuna.engine import int8_gpu
from vicuna.engine.quant import quantize_rows

# Shapes with edges: one row, a few, a full tile and more (tiles of 64); weight rows and columns that no
# tile size divides.
CHECK = """
    import torch
    import torch.nn.functional as F
    from triton.runtime.errors import OutOfResources
    from vicuna.engine import int8_gpu
    from vicuna.engine.quant import quantize_rows

    def check(got, exact, dtype, what):
        tol = 1e-4 if dtype == torch.float32 else 1e-2  # float32 sums of ~500 terms, in any order
        assert got.dtype == dtype and got.shape == exact.shape, what
        err = ((got.double() - exact).abs() / (exact.abs() + 1)).max().item()
        assert err < tol, (what, err)

    def inputs(m, k, dtype, gated):
        # with gated, x is gate and up side by side; the rows multiplied are silu(gate) * up, rounded to
        # x's dtype (as `step_gpu.silu_mul` gives them)
        x = torch.randn(m, 2 * k if gated else k, device=device).to(dtype)
        if not gated:
            return x, x.double()
        gate, up = x.float().chunk(2, dim=-1)
        return x, (F.silu(gate) * up).to(dtype).double()

    torch.manual_seed(0)
    device, dtypes, shapes = {device!r}, {dtypes}, {shapes}
    for dtype in dtypes:
        for m, n, k in shapes:
            weight, scales = quantize_rows(torch.randn(n, k, device=device))
            dequantized = weight.double() * scales.double()[:, None]
            residual = torch.randn(m, n, device=device).to(dtype)
            tile, tuned = (16, int8_gpu._rows) if m <= 16 else (64, int8_gpu._rows64)
            one_row = int8_gpu._one_row.configs if m == 1 else ()
            # the tiles: plain and adding; the one row: plain, and gated and adding (each way is compiled
            # apart for each tile size, which takes a GPU a second or two)
            for gated, add in ((False, False), (False, True), (True, True)):
                x, rows = inputs(m, k, dtype, gated)
                exact = rows @ dequantized.T + (residual.double() if add else 0)
                flags = dict(GATED=gated, ADD=add)
                # each kernel with each of its tile sizes, by hand (the tuner picks one); a GPU may not
                # have the shared memory for some, which the tuner skips too, but not for all
                ran = 0
                for config in tuned.configs if not gated else ():
                    out = residual.clone() if add else torch.full((m, n), float("nan"), dtype=dtype, device=device)
                    grid = (-(-n // config.kwargs["BLOCK_N"]), -(-m // tile))
                    try:
                        tuned.fn[grid](x, weight, scales, out, m, n, K=k, BLOCK_M=tile,
                                       IEEE=dtype == torch.float32, ADD=add, **config.all_kwargs())
                    except OutOfResources:
                        continue
                    check(out, exact, dtype, ("rows", dtype, m, n, k, flags, config))
                    ran += 1
                assert ran or gated, ("no tile size fits", dtype, m, n, k)
                for config in one_row if gated == add else ():
                    for again in range(2):  # a split tile size sets its counts back for the next product
                        out = residual.clone() if add else torch.full((m, n), float("nan"), dtype=dtype, device=device)
                        int8_gpu.one_row(x, weight, scales, out, **flags, config=config)
                        check(out, exact, dtype, ("one row", dtype, m, n, k, flags, config, again))
            # the tuned product, each way; the first call for a shape is tuned (every config runs), and
            # `into` must still be added once
            for gated in (True, False):
                x, rows = inputs(m, k, dtype, gated)
                exact = rows @ dequantized.T
                into = residual.clone()
                got = int8_gpu.product(x, weight, scales, gated=gated, into=into)
                assert got is into
                check(got, exact + residual.double(), dtype, ("tuned, into", gated))
                check(int8_gpu.product(x, weight, scales, gated=gated), exact, dtype, ("tuned", gated))
    print("ok")
"""


def run_check(device: str, dtypes: str, shapes: str, interpret: bool) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0")
    code = textwrap.dedent(CHECK.format(device=device, dtypes=dtypes, shapes=shapes))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_the_kernel_with_each_tile_size_equals_the_dequantized_product_in_tritons_interpreter():
    pytest.importorskip("triton")
    # float16 and float32 rows (the interpreter's tl.dot misreads bfloat16; the GPU test covers it)
    run_check(
        "cpu",
        "(torch.float16, torch.float32)",
        "((1, 48, 80), (1, 50, 2100), (5, 100, 300), (16, 64, 528), (70, 24, 96))",  # 2100: split in 2-3 parts
        True,
    )


@pytest.mark.gpu
def test_the_kernel_with_each_tile_size_equals_the_dequantized_product_on_the_gpu():
    pytest.importorskip("triton")
    # shapes with edges everywhere: each shape and dtype is compiled for each tile size
    # K of 2,100: the split tile sizes split it in 2 and 4 parts with data in each (528 would leave parts empty)
    run_check("cuda", "(torch.float16, torch.bfloat16)", "((1, 100, 2100), (70, 100, 528))", False)


def test_more_rows_than_the_kernels_take_use_the_dequantized_weight():
    torch.manual_seed(0)
    x = torch.randn(int8_gpu.MAX_ROWS + 1, 128)
    weight, scales = quantize_rows(torch.randn(32, 64))
    dequantized = weight.float() * scales.float()[:, None]
    expected = F.linear(x[:, :64], dequantized)
    torch.testing.assert_close(int8_gpu.product(x[:, :64], weight, scales), expected)
    gate, up = x.chunk(2, dim=-1)
    gated = F.linear(F.silu(gate) * up, dequantized)
    residual = torch.randn(x.shape[0], 32)
    into = residual.clone()
    assert int8_gpu.product(x, weight, scales, gated=True, into=into) is into
    torch.testing.assert_close(into, residual + gated)


def test_the_product_refuses_rows_and_sums_of_the_wrong_shape():
    weight, scales = quantize_rows(torch.randn(32, 64))
    with pytest.raises(ValueError, match="rows of 64 for a weight of 64 columns .gated=True"):
        int8_gpu.product(torch.randn(2, 64), weight, scales, gated=True)
    with pytest.raises(ValueError, match=r"cannot add \[2, 32\] into \(2, 16\)"):
        int8_gpu.product(torch.randn(2, 64), weight, scales, into=torch.zeros(2, 16))


def test_one_row_refuses_a_split_tile_size_its_buffers_are_not_made_for():
    """A split tile size of `one_row(config=)` (gpu_profile's sweep) in more parts, or with smaller tiles,
    than the tuner's: its sums and counts went past the ends of the buffers made for those, into whatever
    memory lay there. Whole rows use no buffer, at any size."""
    if int8_gpu.triton is None:
        pytest.skip("needs Triton")
    weight, scales = quantize_rows(torch.randn(48, 80))
    x, out = torch.randn(1, 80), torch.empty(1, 48)
    for sizes in ((8, 512, 8, 4, 3), (2, 512, 2, 4, 3)):  # 8 parts; tiles of 2 rows, split
        with pytest.raises(ValueError, match="do not fit the split buffers, made for ONE_ROW_CONFIGS"):
            int8_gpu.one_row(x, weight, scales, out, config=int8_gpu.tile_config(*sizes))


@pytest.mark.parametrize("installed", [True, False])
def test_doctor_says_how_8bit_multiplies_on_a_gpu(monkeypatch, tiny_llama_dir, capsys, installed):
    import dataclasses

    from vicuna.cli import main
    from vicuna.engine import memory

    hw = memory.probe_hardware()
    pretend = dataclasses.replace(hw, gpus=(memory.GPU(0, "Pretend", 2**34, 2**34, (9, 0)),))
    monkeypatch.setattr(memory, "probe_hardware", lambda: pretend)
    if not installed:
        monkeypatch.setattr(int8_gpu, "triton", None)
    elif int8_gpu.triton is None:
        pytest.skip("Triton is not installed here")
    assert main(["doctor", "--model-path", str(tiny_llama_dir)]) == 0
    out = capsys.readouterr().out
    assert "GPU 0 Pretend" in out
    expected = "ready (Triton " if installed else "not used: Triton is not installed"
    assert f"GPU kernels  {expected}" in out


def test_the_engine_imports_with_the_triton_of_pytorch_2_6_and_2_7():
    """Triton's tuner takes `cache_results` from 3.4 (PyTorch 2.8) only, and `do_bench` in recent versions
    only: with PyTorch 2.6 or 2.7 (Triton 3.2, 3.3) importing the engine failed with "autotune() got an
    unexpected keyword argument 'cache_results'", on a GPU and on a CPU alike (PyTorch's Linux builds bring
    Triton). Here the tuner takes neither."""
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import triton
        newest = triton.autotune

        def autotune(configs, key, prune_configs_by=None, reset_to_zero=None, restore_value=None,
                     pre_hook=None, post_hook=None, warmup=None, rep=None, use_cuda_graph=False):
            return newest(configs, key, prune_configs_by=prune_configs_by, reset_to_zero=reset_to_zero,
                          restore_value=restore_value, pre_hook=pre_hook, post_hook=post_hook)

        triton.autotune = autotune  # an older tuner's arguments
        from vicuna.engine import int8_gpu, runner
        print(int8_gpu.status())
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.pop("VICUNA_TRITON", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ready (Triton "), done.stdout
