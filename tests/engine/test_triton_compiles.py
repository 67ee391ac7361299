"""Our Triton kernels compile for the GPUs they are meant for, on a machine without one: Triton's
interpreter (the other tests) runs them as Python and cannot catch what only the compiler refuses (a
construct Triton cannot lower, a layout it cannot build, too much shared memory). Each kernel is compiled
to a cubin for compute capabilities 7.5 (T4, RTX 20xx), 8.0 (A100, RTX 30xx and 40xx alike) and 9.0
(H100, H200) with the ptxas that comes with Triton, in float16 and (from 8.0) bfloat16, each of the int8
kernels in each of its ways (an added residual; `_one_row`: gated rows too, and split) with its first tile size (compiling every
tile size for every GPU took ~5 minutes on 2 cores)."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vicuna.engine import int8_gpu, step_gpu  # noqa: E402

CAPABILITIES = (75, 80, 90)


def dtypes(capability: int) -> list[str]:
    return ["fp16", "bf16"] if capability >= 80 else ["fp16"]  # no bfloat16 tensor cores before Ampere


def compile_for(capability: int, fn, signature: dict[str, str], constexprs: dict, warps=4, stages=3):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    options = {"num_warps": warps, "num_stages": stages, **int8_gpu.FP_FUSION}
    kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    assert kernel.asm["cubin"], (fn.__name__, capability, constexprs)


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_the_int8_kernels_compile(capability):
    for t in dtypes(capability):
        pointers = {"x_ptr": f"*{t}", "w_ptr": "*i8", "s_ptr": "*bf16", "y_ptr": f"*{t}"}
        for gated, add in ((False, False), (True, True)):
            for tile, tuned in ((16, int8_gpu._rows), (64, int8_gpu._rows64)):
                config = tuned.configs[0]
                constexprs = dict(K=528, BLOCK_M=tile, IEEE=False, ADD=add, **config.kwargs)
                signature = {**pointers, "M": "i32", "N": "i32"}
                compile_for(capability, tuned.fn, signature, constexprs, config.num_warps, config.num_stages)
            split = next(c for c in int8_gpu._one_row.configs if c.kwargs["SPLIT"] > 1)
            for config in (int8_gpu._one_row.configs[0], split):  # whole rows; split, with its atomics
                constexprs = dict(K=528, GATED=gated, ADD=add, **config.kwargs)
                signature = {**pointers, "sums_ptr": "*fp32", "counts_ptr": "*i32", "N": "i32"}
                compile_for(
                    capability,
                    int8_gpu._one_row.fn,
                    signature,
                    constexprs,
                    config.num_warps,
                    config.num_stages,
                )


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_the_decode_steps_kernels_compile(capability):
    for t in dtypes(capability):
        signature = {
            "mixed_ptr": f"*{t}", "table_ptr": f"*{t}", "pos_ptr": "*i64", "q_ptr": f"*{t}",
            "k_ptr": f"*{t}", "v_ptr": f"*{t}",
            **{name: "i32" for name in ("mixed_row", "table_sin", "table_pos", "k_row", "k_head", "k_pos",
                                        "v_row", "v_head", "v_pos")},
        }  # fmt: skip
        for heads, kv_heads, dim in ((40, 40, 128), (9, 3, 64), (3, 3, 80)):
            constexprs = dict(HEADS=heads, KV_HEADS=kv_heads, DIM=dim, BLOCK=triton.next_power_of_2(dim))
            compile_for(capability, step_gpu._rotate_store, signature, constexprs)
        signature = {"x_ptr": f"*{t}", "out_ptr": f"*{t}", "x_row": "i32", "width": "i32"}
        compile_for(capability, step_gpu._silu_mul, signature, {"BLOCK": 1024})
        signature = {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "out_ptr": f"*{t}", "x_row": "i32", "eps": "fp32"}
        for width, block, warps in ((5120, 8192, 16), (20000, 16384, 16)):
            compile_for(capability, step_gpu._rms_norm, signature, {"WIDTH": width, "BLOCK": block}, warps)
