"""Where a 13B-shaped decode step's time goes on a CUDA GPU. First a 4-layer 13B-shaped model's step, in
float16 and with int8 weights: its graph replayed with `step_gpu`'s fused kernels (and, with int8 weights,
the gating and residual adds inside the int8 products) and with PyTorch's operations between the products,
the same step launched from Python, and the profiler's kernel table. Then each of a 13B model's weight
shapes times one row, inside a CUDA graph with the weights read from HBM: float16 cuBLAS, the tuned int8
product, and the one-row int8 kernel with each tile size of a sweep (which tile sizes to tune over); and a
one-row RMSNorm. About two minutes on an H200; needs a GPU with >= 20 GB.

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


# Weights are read from HBM in a step, each once; a timing loop over one weight would read it from L2 (60 MB
# on an H200) after the first pass. So each timed product cycles through copies of its weight that
# together exceed L2, and all of them are captured in one CUDA graph, so that Python's launch (~20-40 us a
# Triton kernel, more than the small products take) is not counted either.
COPIES_BYTES = 256 << 20
# one-row tile sizes to compare on each shape: (BLOCK_N, BLOCK_K, SPLIT, warps, stages); the tuner's own first
SWEEP = list(int8_gpu.ONE_ROW_CONFIGS) + [
    (2, 2048, 1, 4, 2),
    (4, 2048, 1, 8, 2),
    (16, 1024, 1, 8, 2),
    (4, 1024, 2, 4, 3),
    (8, 512, 4, 4, 3),
    (16, 1024, 2, 8, 3),
    (32, 256, 4, 4, 3),
]


def graph_time(calls, reps=5):
    """Mean time of one of `calls` (us), all of them captured in one CUDA graph and replayed `reps` times."""
    for call in calls:  # compiles and tunes, which a graph cannot capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        graph.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / reps / len(calls)


def speed(t_us, nbytes):
    return f"{t_us:.1f} us ({nbytes / t_us / 1e6:.2f} TB/s)"


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
        m = LlamaForCausalLM(cfg).eval().requires_grad_(False)  # else the eager step records autograd
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
        print(
            f"replay: {tg:.3f} ms with the fused kernels, {tu:.3f} ms with PyTorch's operations", flush=True
        )
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

print("== one row times each of a 13B model's weights, in a CUDA graph, weights from HBM", flush=True)
for n, k in ((15360, 5120), (5120, 5120), (27648, 5120), (5120, 13824), (49152, 5120)):
    try:
        x = torch.randn(1, k, device=dev, dtype=torch.float16)
        copies16 = [
            torch.randn(n, k, device=dev, dtype=torch.float16) for _ in range(-(-COPIES_BYTES // (2 * n * k)))
        ]
        fp16 = graph_time([lambda w=w: F.linear(x, w) for w in copies16])
        del copies16
        copies = [
            quantize_rows(torch.randn(n, k, device=dev, dtype=torch.float16))
            for _ in range(-(-COPIES_BYTES // (n * k)))
        ]
        outs = [torch.empty(1, n, device=dev, dtype=torch.float16) for _ in copies]
        tuned = graph_time([lambda w=w, s=s: int8_gpu.product(x, w, s) for w, s in copies])
        kernel = "one row" if int8_gpu._one_row_wins.get((n, k, torch.float16)) else "tiles of 16 rows"
        rows16 = graph_time(
            [lambda w=w, s=s, o=o: int8_gpu.rows(x, w, s, o) for (w, s), o in zip(copies, outs)]
        )
        print(
            f"{n}x{k}: fp16 cuBLAS {speed(fp16, 2 * n * k)} | int8 product {speed(tuned, n * k)} ({kernel}) "
            f"| int8 tiles of 16 rows, tuned {speed(rows16, n * k)}",
            flush=True,
        )
        swept = []
        for sizes in SWEEP:
            config = int8_gpu.tile_config(*sizes)
            try:
                t = graph_time(
                    [
                        lambda w=w, s=s, o=o, c=config: int8_gpu.one_row(x, w, s, o, config=c)
                        for (w, s), o in zip(copies, outs)
                    ]
                )
            except Exception as e:  # a config that does not fit
                print(f"  one row {sizes}: {type(e).__name__}", flush=True)
                continue
            swept.append((t, sizes))
        swept.sort()
        print(
            "  one row (BLOCK_N, BLOCK_K, SPLIT, warps, stages), fastest first: "
            + "; ".join(f"{c} {speed(t, n * k)}" for t, c in swept),
            flush=True,
        )
        del copies, outs
        torch.cuda.empty_cache()
    except Exception:
        traceback.print_exc()

try:
    h = torch.randn(1, 5120, device=dev, dtype=torch.float16)
    weight = torch.randn(5120, device=dev, dtype=torch.float16)
    pytorchs = graph_time([lambda: F.rms_norm(h, (5120,), weight, 1e-6)] * 20)
    ours = graph_time([lambda: step_gpu.rms_norm(h, weight, 1e-6)] * 20)
    print(
        f"RMSNorm of one row of 5120, in a CUDA graph: PyTorch's rms_norm {pytorchs:.1f} us, step_gpu.rms_norm {ours:.1f} us",
        flush=True,
    )
except Exception:
    traceback.print_exc()
