"""Where a 13B-shaped decode step's time goes on a CUDA GPU: the int8 products against float16's, and a
4-layer 13B-shaped model's step: its graph replayed with `step_gpu`'s fused kernels (and, with int8
weights, the gating and residual adds inside the int8 products) and with PyTorch's operations between the
products, the same step launched from Python, and the profiler's kernel table. About a minute on an H200;
needs a GPU with >= 20 GB.

Usage: PYTHONPATH=src python scripts/gpu_profile.py
"""

import time
import traceback

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from vicuna.engine import int8_gpu, step_gpu
from vicuna.engine.quant import quantize_int8, quantize_rows
from vicuna.engine.runner import CudaGraphStep, LlamaRunner, LlamaWeights, step_in_pytorch

dev = torch.device("cuda")


def cuda_time(fn, reps=50):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps  # ms


print("== one row times a 13B model's weights: float16 cuBLAS, then the int8 kernels, each tuned")
try:
    for n, k in ((15360, 5120), (5120, 5120), (27648, 5120), (5120, 13824), (49152, 5120)):
        x = torch.randn(1, k, device=dev, dtype=torch.float16)
        w16 = torch.randn(n, k, device=dev, dtype=torch.float16)
        wq, s = quantize_rows(w16)
        out = torch.empty(1, n, device=dev, dtype=torch.float16)
        row = [f"{n}x{k}:"]
        for name, f, nbytes in (
            ("fp16", lambda: F.linear(x, w16), 2 * n * k),
            ("int8 rows", lambda: int8_gpu.rows(x, wq, s, out), n * k),
            ("int8 one row", lambda: int8_gpu.one_row(x, wq, s, out), n * k),
            ("product", lambda: int8_gpu.product(x, wq, s), n * k),
        ):
            t = cuda_time(f)
            row.append(f"{name} {t * 1e3:.1f} us ({nbytes / t / 1e9:.2f} TB/s)")
        print(" | ".join(row), flush=True)
except Exception:
    traceback.print_exc()


def model(layers, int8):
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=layers,
        num_attention_heads=40,
        num_key_value_heads=40,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    if int8:
        quantize_int8(m, dev)
    return m


for int8 in (False, True):
    print(f"== 4-layer 13B-shaped model, int8={int8}", flush=True)
    try:
        m = model(4, int8)
        w = LlamaWeights(m)
        r = LlamaRunner(w, None)
        r.prefill(list(range(100)))
        tok = 5
        for _i in range(3):
            r.step(tok)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _i in range(100):
            logits = r.step(tok)
        torch.cuda.synchronize()
        graphed = (time.perf_counter() - t0) / 100
        # the graph alone (no Python around it), with the step's fused kernels and with PyTorch's operations
        g = r._graph
        tg = cuda_time(lambda: g.graph.replay(), reps=100)
        # unfused: PyTorch's operations between the products (int8 ones still on the int8 kernels)
        fused_kernels, step_gpu.triton = step_gpu.triton, None
        int8_fused, int8_gpu.runs_on = int8_gpu.runs_on, lambda device: False
        unfused = CudaGraphStep(w, r.cache, 1)
        unfused([tok], [r.lengths[0]])
        unfused([tok], [r.lengths[0]])
        step_gpu.triton, int8_gpu.runs_on = fused_kernels, int8_fused
        tu = cuda_time(lambda: unfused.graph.replay(), reps=100)
        print(f"replay: {tg:.3f} ms with the fused kernels, {tu:.3f} ms with PyTorch's operations", flush=True)
        del unfused
        cache, inputs, table = r.cache, g.inputs, g.table
        eager = cuda_time(lambda: step_in_pytorch(w, cache, inputs[0], inputs[1], table), reps=20)
        t0 = time.perf_counter()
        for _i in range(20):
            step_in_pytorch(w, cache, inputs[0], inputs[1], table)
        torch.cuda.synchronize()
        eager_wall = (time.perf_counter() - t0) / 20
        print(
            f"step: graphed wall {graphed * 1e3:.2f} ms, replay gpu {tg:.2f} ms, eager gpu-span {eager:.2f} ms, eager wall {eager_wall * 1e3:.2f} ms",
            flush=True,
        )
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step_in_pytorch(w, cache, inputs[0], inputs[1], table)
            torch.cuda.synchronize()
        print(
            prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70),
            flush=True,
        )
        del m, w, r, g, logits
        torch.cuda.empty_cache()
    except Exception:
        traceback.print_exc()
