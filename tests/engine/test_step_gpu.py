"""The decode step's fused kernels for CUDA GPUs (rotary with the cache writes, the MLP's gating, RMSNorm) against
PyTorch's operations, alone and in a whole step of a tiny model (also with int8 weights, whose products
do the gating and the residual add). On the CPU they run in Triton's
interpreter; our CPU kernel is switched off (VICUNA_KERNEL=0) so that the step's gating is PyTorch's
too."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

CHECK = """
    import torch
    import torch.nn.functional as F
    from vicuna.config import ModelSettings
    from vicuna.engine import int8_gpu, step_gpu
    from vicuna.engine.loader import load_engine
    from vicuna.engine.runner import rotate, step_in_pytorch

    assert step_gpu.runs_on(torch.device({device!r}))
    torch.manual_seed(0)
    device, dtypes = {device!r}, {dtypes}

    def close(got, want, what, dtype=None):
        tol = 1e-5 if (dtype or want.dtype) == torch.float32 else 1e-2
        assert got.dtype == want.dtype and got.shape == want.shape, what
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol, msg=what)

    for dtype in dtypes:
        # grouped heads (6 q heads on 2 kv heads), a head size that is not a power of two, rows at
        # different positions of a cache of 12
        for heads, kv_heads, dim in ((6, 2, 64), (3, 3, 80)):
            rows, size = 3, 12
            positions = torch.tensor([0, 7, 11], device=device)
            mixed = torch.randn(rows, (heads + 2 * kv_heads) * dim, device=device).to(dtype)
            angles = torch.rand(size, dim, device=device) * 6
            table = torch.stack([angles.cos(), angles.sin()]).to(dtype)
            cache = torch.randn(2, 5, kv_heads, size, dim, device=device).to(dtype)  # 5 rows, 3 used
            want = cache.clone()
            qk = rotate(mixed[:, : (heads + kv_heads) * dim].view(rows, -1, dim).float(),
                        table[0, positions, None].float(), table[1, positions, None].float())
            for r, p in enumerate(positions.tolist()):
                want[0, r, :, p] = qk[r, heads:].to(dtype)
                want[1, r, :, p] = mixed[r, (heads + kv_heads) * dim :].view(kv_heads, dim)
            q = step_gpu.rotate_store(mixed, table, positions, cache[0, :rows], cache[1, :rows], heads, kv_heads)
            close(q, qk[:, :heads].to(dtype), ("q", dtype, heads, kv_heads, dim))
            close(cache, want, ("cache", dtype, heads, kv_heads, dim))  # nothing else written

        x = torch.randn(3, 2 * 1500, device=device).to(dtype)  # a width no block divides
        gate, up = x.float().chunk(2, dim=-1)
        close(step_gpu.silu_mul(x), (F.silu(gate) * up).to(dtype), ("silu_mul", dtype))

        # rows of a width no block divides, and wider than one block (read in pieces), taken from wider
        # rows (a row stride that is not the width)
        for width in (1500, 20000):
            x = (torch.randn(3, width + 7, device=device) * 3).to(dtype)[:, :width]
            weight = torch.randn(width, device=device).to(dtype)
            want = F.rms_norm(x.float(), (width,), weight.float(), 1e-6).to(dtype)
            close(step_gpu.rms_norm(x, weight, 1e-6), want, ("rms_norm", dtype, width))

    # a whole step of the tiny model, three rows at their own positions: fused against PyTorch's operations
    # (with int8 weights, the int8 kernels with the gating and the residual adds inside them against the
    # dequantized weights' products and PyTorch's gating and adds)
    triton = __import__("triton")
    for dtype, int8 in [(dtype, int8) for dtype in dtypes for int8 in (False, True)]:
        settings = ModelSettings(
            model_path={model!r}, dtype=str(dtype).split(".")[1], device=device, load_8bit=int8
        )
        w = load_engine(settings, progress=False).llama_weights
        assert int8 == (w.layers[0][1].fallback is not None)
        shape = (len(w.layers), 2, 3, w.kv_heads, 16, w.head_dim)
        start = torch.randn(shape, device=device).to(w.dtype)
        tokens, positions = torch.tensor([5, 17, 300], device=device), torch.tensor([3, 15, 0], device=device)
        steps = []
        for fused in (True, False):
            step_gpu.triton = int8_gpu.triton = triton if fused else None
            cache = start.clone()
            with torch.inference_mode():
                steps.append((step_in_pytorch(w, cache, tokens, positions, w.rope(16)), cache))
        (logits, cache), (want_logits, want_cache) = steps
        close(cache, want_cache, ("step's cache", dtype, int8))
        close(logits, want_logits, ("step's logits", dtype, int8), dtype)  # float32 logits
        step_gpu.triton = int8_gpu.triton = triton
    print("ok")
"""


def run_check(device: str, dtypes: str, model: str, interpret: bool) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0", VICUNA_KERNEL="0")
    code = textwrap.dedent(CHECK.format(device=device, dtypes=dtypes, model=model))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_fused_step_kernels_equal_pytorchs_operations_in_tritons_interpreter(tiny_llama_dir):
    pytest.importorskip("triton")
    run_check("cpu", "(torch.float32, torch.float16)", str(tiny_llama_dir), True)


@pytest.mark.gpu
def test_fused_step_kernels_equal_pytorchs_operations_on_the_gpu(tiny_llama_dir):
    pytest.importorskip("triton")
    run_check("cuda", "(torch.float32, torch.float16, torch.bfloat16)", str(tiny_llama_dir), False)


def test_without_triton_the_step_keeps_pytorchs_operations(monkeypatch):
    import torch

    from vicuna.engine import step_gpu

    monkeypatch.setattr(step_gpu, "triton", None)
    assert not step_gpu.runs_on(torch.device("cuda"))
    assert not step_gpu.runs_on(torch.device("cpu"))


def test_vicuna_triton_0_turns_the_gpu_kernels_off():
    pytest.importorskip("triton")
    code = "from vicuna.engine import int8_gpu, step_gpu; print(int8_gpu.triton, step_gpu.triton, int8_gpu.status())"
    for value, off in (("0", True), ("1", False)):
        env = dict(os.environ, VICUNA_TRITON=value)
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.startswith("None None not used: turned off (VICUNA_TRITON=0)") == off, done.stdout
        assert ("ready (Triton " in done.stdout) != off


def test_without_a_c_compiler_the_gpu_kernels_are_not_used(tmp_path):
    """Triton builds its CUDA driver module from C on first use, with $CC, gcc or clang: on a machine with
    none (a slim container image) the first step on a GPU failed with "Failed to find C compiler", and
    doctor said the kernels were ready."""
    pytest.importorskip("triton")
    code = "from vicuna.engine import int8_gpu, step_gpu; print(int8_gpu.triton, step_gpu.triton, int8_gpu.status())"
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "VICUNA_TRITON", "TRITON_INTERPRET")}
    for path, found in ((str(tmp_path), False), (os.environ.get("PATH", ""), True)):
        done = subprocess.run(
            [sys.executable, "-c", code],
            env={**env, "PATH": path},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        if found:
            assert "ready (Triton " in done.stdout, done.stdout
        else:
            assert done.stdout.startswith("None None not used: no C compiler for Triton"), done.stdout
            assert "install gcc, or name one in CC" in done.stdout
