"""The fused LLaMA runner's pieces against plain PyTorch and transformers: products, norms, rotary, and
whole forwards in float32 and bfloat16, alone and batched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vicuna.config import ModelSettings
from vicuna.engine.loader import load_engine
from vicuna.engine.runner import (
    CACHE_CHUNK,
    UPCAST_ROWS,
    Dense,
    HFRunner,
    LlamaRunner,
    LlamaWeights,
    cache_arg,
    decode,
    llama_fast_path_ok,
    norm_rows,
    norm_weight,
    rotate,
    shared_prefix,
)


def test_dense_runs_few_rows_on_the_kernel_and_many_in_float32_without_native_bf16():
    from vicuna.engine import kernel

    torch.manual_seed(0)
    weight = torch.randn(48, 32).bfloat16()
    dense = Dense(weight)
    assert (dense.kernel is not None) == (kernel.load() is not None)
    many, one = torch.randn(UPCAST_ROWS, 32), torch.randn(1, 32)
    rounded = one.bfloat16() if kernel.dot_bf16() else one  # AVX512-BF16 multiplies bfloat16 rows
    exact = F.linear(rounded.double(), weight.double())
    if dense.kernel is not None:  # float32 rows in and out, float32 sums
        assert dense(one).dtype == torch.float32
        torch.testing.assert_close(dense(one).double(), exact, rtol=1e-6, atol=1e-6)
    dense.kernel, dense.native = None, False  # as on a CPU without AVX-512 BF16 / AMX, and no kernel
    assert torch.equal(dense(many), F.linear(many, weight.float()))
    assert torch.equal(dense(one), F.linear(one.bfloat16(), weight).float())
    dense.native = True
    assert torch.equal(dense(many.bfloat16()), F.linear(many.bfloat16(), weight))


def test_dense_leaves_many_rows_to_pytorch_where_it_multiplies_the_dtype_natively():
    from vicuna.engine import kernel
    from vicuna.engine.kernel import pytorch_multiplies_natively

    for dtype in (torch.float32, torch.bfloat16):
        dense = Dense(torch.zeros(4, 4, dtype=dtype))
        assert dense.native == pytorch_multiplies_natively(dtype)
        assert dense.kernel_rows == (kernel.FEW_ROWS if dense.native else None)  # None: every product


@pytest.mark.parametrize(("dot", "native"), [(True, False), (False, True)])
def test_bf16_products_of_many_rows_stay_on_our_kernel_where_it_has_avx512_bf16(monkeypatch, dot, native):
    from vicuna.engine import kernel

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(kernel, "dot_bf16", lambda: dot)
    assert kernel.pytorch_multiplies_natively(torch.bfloat16) is native


@pytest.mark.parametrize(("capability", "native"), [("AVX2", False), ("AVX512", True)])
def test_float32_products_of_many_rows_stay_on_our_kernel_on_avx2_cpus(monkeypatch, capability, native):
    from vicuna.engine.kernel import pytorch_multiplies_natively

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert pytorch_multiplies_natively(torch.float32) is native


@pytest.mark.parametrize("rows", [1, 5])
def test_norm_rows_is_rms_norm(tiny_llama_dir, rows):
    engine = load_engine(ModelSettings(model_path=str(tiny_llama_dir), dtype="float32"), progress=False)
    norm = engine.model.model.layers[0].input_layernorm
    eps = engine.model.config.rms_norm_eps
    x = torch.randn(rows, engine.model.config.hidden_size) * 3
    expected = F.rms_norm(x, (x.shape[-1],), norm.weight, eps)
    torch.testing.assert_close(
        norm_rows(x, norm_weight(norm, torch.float32), eps), expected, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)  # what transformers computes


@pytest.mark.parametrize("rows", [3, 16])  # the kernel's few-rows and many-rows paths
def test_dense_applies_the_norm_gating_and_residual_add_on_the_kernel_and_without_it(rows):
    from vicuna.engine import kernel

    torch.manual_seed(rows)
    weight, norm = torch.randn(24, 36).bfloat16(), torch.rand(36) + 0.5
    x, residual = torch.randn(rows, 72) * 20, torch.randn(rows, 24)  # gates far below 0 (e^-gate: inf)
    gate, up = x.double().chunk(2, dim=-1)
    rows = F.silu(gate) * up
    rows = rows / (rows.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * norm.double()
    exact = residual.double() + rows @ weight.double().T
    dense = Dense(weight)
    for bound in [dense.kernel, None] if dense.kernel is not None else [None]:
        dense.kernel = bound  # the kernel takes all these rows, or only a few where PyTorch's take more
        on_kernel = bound is not None and (dense.kernel_rows is None or x.shape[0] <= dense.kernel_rows)
        into = residual.clone()
        out = dense(x, norm=(torch.cat([norm, norm]), 1e-5), gated=True, into=into)
        assert out is into
        # products of bfloat16 rows: without the kernel, and on it with AVX512-BF16 (tested closely there)
        tolerance = 1e-5 if on_kernel and not kernel.dot_bf16() else 5e-2
        torch.testing.assert_close(out.double(), exact, rtol=tolerance, atol=tolerance)


def test_rotate_is_transformers_rotary():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 7, 16), torch.randn(1, 2, 7, 16)
    angle = torch.randn(7, 8)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    expected_q, expected_k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    signed = torch.cat([-sin[:, :8], sin[:, 8:]], -1)
    torch.testing.assert_close(rotate(q, cos, signed), expected_q)
    torch.testing.assert_close(rotate(k, cos, signed), expected_k)


def test_bfloat16_runner_is_as_close_to_float32_as_transformers_bfloat16(tiny_llama_dir):
    """A prompt long enough for the float32 products of a CPU without native bf16, then decode steps: the
    runner's bfloat16 error against float32 (with packed float16 weights on such a CPU) is of the size of
    transformers' own bfloat16 error."""
    path = str(tiny_llama_dir)
    bf16 = load_engine(ModelSettings(model_path=path, dtype="bfloat16"), progress=False)
    fp32 = load_engine(ModelSettings(model_path=path, dtype="float32"), progress=False)
    prompt = list(range(3, 3 + 2 * UPCAST_ROWS))
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()  # unpacked
    runners = {
        "ours": LlamaRunner(bf16.llama_weights, None),
        "hf_bf16": HFRunner(plain, bf16.device),
        "hf_fp32": HFRunner(fp32.model, fp32.device),
    }
    logits = {name: [r.prefill(prompt)] for name, r in runners.items()}
    for token in [5, 17, 300, 2, 42]:
        for name, r in runners.items():
            logits[name].append(r.step(token))
    for ours, hf, exact in zip(logits["ours"], logits["hf_bf16"], logits["hf_fp32"], strict=True):
        assert (ours - exact).abs().max() <= 2 * (hf - exact).abs().max() + 1e-3
        assert ours.argmax() == exact.argmax() or hf.argmax() != exact.argmax()


def test_a_batched_step_equals_each_row_alone(tiny_llama_dir):
    engine = load_engine(ModelSettings(model_path=str(tiny_llama_dir), dtype="float32"), progress=False)
    w = engine.llama_weights
    prompts = [[3, 4, 5], list(range(10, 300)), [7]]  # the long one spans two cache chunks
    alone, batch = [], LlamaRunner(w, None)
    for prompt in prompts:
        runner = LlamaRunner(w, None)
        runner.prefill(prompt)
        batch.join(runner)
        alone.append([runner.step(9), runner.step(11)])
    assert batch.lengths == [len(p) for p in prompts]
    for token in (9, 11):
        rows = decode(w, batch, [token] * 3)
        for row, expected in zip(rows, alone, strict=True):
            torch.testing.assert_close(row, expected[0 if token == 9 else 1], rtol=1e-5, atol=1e-5)
    assert batch.lengths == [len(p) + 2 for p in prompts]


def test_attention_on_the_kernel_equals_pytorchs(tiny_llama_dir):
    engine = load_engine(ModelSettings(model_path=str(tiny_llama_dir), dtype="float32"), progress=False)
    w = engine.llama_weights
    if not w.attend_kernel:
        pytest.skip("the kernel does not run here")
    logits = {}
    step_kernel = w.step_kernel
    for on_kernel in (True, False):
        w.attend_kernel, w.step_kernel = on_kernel, step_kernel if on_kernel else None
        batch = LlamaRunner(w, None)
        for prompt in ([3, 4, 5], list(range(10, 50))):
            runner = LlamaRunner(w, None)
            runner.prefill(prompt)
            batch.join(runner)
        logits[on_kernel] = [decode(w, batch, [9, 9]), decode(w, batch, [4, 7])]
    for ours, theirs in zip(logits[True], logits[False], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_decode_step_in_one_kernel_call_equals_the_step_call_by_call(tiny_llama_dir, dtype):
    engine = load_engine(ModelSettings(model_path=str(tiny_llama_dir), dtype=dtype), progress=False)
    w = engine.llama_weights
    if w.step_kernel is None:
        pytest.skip("the kernel does not run here")
    step_kernel, logits = w.step_kernel, {}
    for whole in (True, False):
        w.step_kernel = step_kernel  # the prompts the same way (see the next test)
        batch = LlamaRunner(w, None)
        for prompt in ([3, 4, 5], list(range(10, 80)), [6]):
            runner = LlamaRunner(w, None)
            runner.prefill(prompt)
            batch.join(runner)
        w.step_kernel = step_kernel if whole else None
        logits[whole] = [decode(w, batch, [9, 9, 2]), decode(w, batch, [4, 7, 1])]
        # the positions each row holds (past them the cache is not initialized)
        logits[whole] += [
            batch.cache[:, :, row, :, :length].clone() for row, length in enumerate(batch.lengths)
        ]
    for ours, theirs in zip(logits[True], logits[False], strict=True):
        assert torch.equal(ours, theirs)  # the same kernel functions in the same order


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_short_prompt_in_one_kernel_call_equals_it_layer_by_layer(tiny_llama_dir, dtype, monkeypatch):
    """Up to `prompt_step_rows` new tokens go through `Step` as one prompt (each token attends through the
    decode attention, to the cache as stored); longer ones, layer by layer with PyTorch's attention."""
    from vicuna.engine import kernel

    engine = load_engine(ModelSettings(model_path=str(tiny_llama_dir), dtype=dtype), progress=False)
    w = engine.llama_weights
    if w.step_kernel is None:
        pytest.skip("the kernel does not run here")
    calls = []
    step = kernel.Step.__call__
    monkeypatch.setattr(
        kernel.Step, "__call__", lambda self, *a, **kw: calls.append(kw) or step(self, *a, **kw)
    )
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == "float32" else {"rtol": 0.05, "atol": 0.05}
    prefix, default = list(range(10, 40)), w.prompt_step_rows
    for start, new in ((0, [3, 4, 5]), (0, list(range(50, 90))), (len(prefix), [7, 8, 9, 11, 12, 13])):
        prompt = (prefix if start else []) + new
        got = {}
        for limit in (default, 0):  # the kernel call, then layer by layer
            monkeypatch.setattr(w, "prompt_step_rows", limit)
            runner = LlamaRunner(w, None)
            if start:
                runner.prefill(prefix + [1])  # the prefix cached, as a copied one would be
                runner.lengths = [start]
            calls.clear()
            logits = runner.prefill(prompt, start)
            on_kernel = calls == [{"prompt": True}]
            got[limit] = (logits, runner.cache[:, :, 0, :, : len(prompt)].float(), runner.step(5), on_kernel)
        ours, theirs = got[default], got[0]
        few = len(new) <= (w.step_rows or len(new))  # where the kernel multiplies this many rows
        assert ours[3] == few and not theirs[3]
        for a, b in zip(ours[:3], theirs[:3], strict=True):
            torch.testing.assert_close(a, b, **tolerance)
        assert ours[0].argmax() == theirs[0].argmax() and ours[2].argmax() == theirs[2].argmax()


def test_the_one_call_decode_step_refuses_what_would_write_outside_the_cache(tiny_llama_dir):
    engine = load_engine(ModelSettings(model_path=str(tiny_llama_dir), dtype="float32"), progress=False)
    w = engine.llama_weights
    if w.step_kernel is None:
        pytest.skip("the kernel does not run here")
    runner = LlamaRunner(w, None)
    runner.prefill([3, 4, 5])
    rope = w.rope(4)
    with pytest.raises(ValueError, match="past the cache"):
        w.step_kernel([7], rope, runner.cache, [runner.capacity])
    with pytest.raises(ValueError, match="cache"):
        w.step_kernel([7], rope, runner.cache[:, :, :, :, :, :8], [3])
    with pytest.raises(ValueError, match="token id outside"):
        w.step_kernel([w.config.vocab_size], rope, runner.cache, [3])
    with pytest.raises(ValueError, match="rotary table"):
        w.step_kernel([7], rope.double(), runner.cache, [3])


def test_rows_that_leave_free_their_cache_and_the_rest_go_on(tiny_llama_dir):
    engine = load_engine(ModelSettings(model_path=str(tiny_llama_dir), dtype="float32"), progress=False)
    w = engine.llama_weights
    prompts = [list(range(10, 300)), [3, 4, 5], [7, 8]]
    alone, batch = [], LlamaRunner(w, None)
    for prompt in prompts:
        runner = LlamaRunner(w, None)
        runner.prefill(prompt)
        batch.join(runner)
        alone.append(runner.step(9))
    assert batch.slots == 3 and batch.capacity == 2 * CACHE_CHUNK
    batch.keep([2, 1])  # the long row leaves; the others swap places
    assert batch.lengths == [2, 3] and batch.rows == 2
    assert batch.slots == 2 and batch.capacity == CACHE_CHUNK  # the memory of what is left
    rows = decode(w, batch, [9, 9])
    torch.testing.assert_close(rows[0], alone[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows[1], alone[1], rtol=1e-5, atol=1e-5)
    batch.keep([])
    assert batch.cache is None and batch.rows == 0
    with pytest.raises(ValueError, match="2 tokens for 0 rows"):
        decode(w, batch, [9, 9])


SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 250},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 250,
    },
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s and s["rope_type"])
def test_rotary_tables_are_transformers_own_up_to_the_context_window(scaling):
    """A table rounded up to whole chunks past a window of 1,000 positions: dynamic NTK scaling, which
    rescales every position once a sequence passes the window, must not do that to positions in use."""
    from transformers import LlamaForCausalLM

    from tests.tiny_models import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(64, max_position_embeddings=1000, rope_scaling=scaling)).eval()
    w = LlamaWeights(model)
    small = w.rope(10).clone()
    table = w.rope(1000)
    assert small.shape[1] < 1000 <= table.shape[1]  # grown, not made whole at once
    torch.testing.assert_close(table[:, : small.shape[1]], small)
    cos, sin = model.model.rotary_emb(torch.zeros(1, 1), torch.arange(1000)[None])
    half = w.head_dim // 2
    torch.testing.assert_close(table[0, :1000], cos[0])
    torch.testing.assert_close(table[1, :1000], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1))


WINDOW_SCALINGS = [  # an original window of 64 positions, which a prompt of 150 passes
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.1 * i for i in range(8)],
        "long_factor": [2.0 + 0.5 * i for i in range(8)],
        "original_max_position_embeddings": 64,
    },
]


@pytest.mark.parametrize("scaling", WINDOW_SCALINGS, ids=lambda s: s and s["rope_type"])
def test_the_runner_the_engine_picks_gives_transformers_logits_past_the_original_window(scaling):
    """Each RoPE scaling on a prompt longer than its original window, on the runner the engine would pick:
    the fast path where it tabulates the scaling, else transformers' forward. Longrope on the fast path gave
    other logits (and replies) once a prompt passed the window."""
    from transformers import LlamaForCausalLM

    from tests.tiny_models import tiny_llama_config

    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 10000.0, **(scaling or {})}
    model = LlamaForCausalLM(tiny_llama_config(300, rope_parameters=rope)).eval()
    for p in model.parameters():  # weights large enough for the rotary angles to matter
        if p.dim() > 1:
            p.data.normal_(0, 0.2)
    fast = llama_fast_path_ok(model)
    runner = LlamaRunner(LlamaWeights(model), None) if fast else HFRunner(model, torch.device("cpu"))
    ref = HFRunner(model, torch.device("cpu"))
    prompt = torch.randint(3, 300, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    torch.testing.assert_close(runner.prefill(prompt), ref.prefill(prompt), rtol=1e-4, atol=1e-4)
    for token in [5, 17, 200]:
        torch.testing.assert_close(runner.step(token), ref.step(token), rtol=1e-4, atol=1e-4)
    assert fast == (scaling is None or scaling["rope_type"] != "longrope")


@pytest.mark.parametrize(
    "overrides", [{"attention_bias": True}, {"mlp_bias": True}, {"hidden_act": "gelu"}], ids=str
)
def test_a_llama_with_biases_or_another_activation_runs_as_transformers_does(overrides):
    """LLaMA-architecture checkpoints with biases on the projections (InternLM's, converted) or another
    activation: the fused runner has no bias and gates with SiLU, so the engine must run them through
    transformers' forward to give the model's own logits."""
    from transformers import LlamaForCausalLM

    from tests.tiny_models import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(300, **overrides)).eval()
    for p in model.parameters():  # biases too: left at 0, a runner that drops them could not be told apart
        p.data.normal_(0, 0.2)
    fast = llama_fast_path_ok(model)
    runner = LlamaRunner(LlamaWeights(model), None) if fast else HFRunner(model, torch.device("cpu"))
    ref = HFRunner(model, torch.device("cpu"))
    prompt = [3, 10, 57, 120, 299]
    torch.testing.assert_close(runner.prefill(prompt), ref.prefill(prompt), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(runner.step(42), ref.step(42), rtol=1e-4, atol=1e-4)


def test_rows_are_float32_on_the_kernel_and_the_model_dtype_without_it(tiny_llama_dir, monkeypatch):
    from vicuna.engine import kernel

    settings = ModelSettings(model_path=str(tiny_llama_dir), dtype="bfloat16")
    on_kernel = load_engine(settings, progress=False).llama_weights
    assert on_kernel.act_dtype == (torch.float32 if kernel.load() is not None else torch.bfloat16)
    monkeypatch.setattr(kernel, "load", lambda progress=True: None)
    without = load_engine(settings, progress=False).llama_weights
    assert without.act_dtype == torch.bfloat16
    for w in (on_kernel, without):
        logits = LlamaRunner(w, None).prefill([3, 4, 5])
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_rows_joining_use_the_room_made_for_them_without_copying(tiny_llama_dir):
    engine = load_engine(ModelSettings(model_path=str(tiny_llama_dir), dtype="float32"), progress=False)
    w = engine.llama_weights
    batch, caches = LlamaRunner(w, None), []
    for prompt in ([3, 4, 5], [7], [8, 9], [10, 11, 12, 13], [14]):
        runner = LlamaRunner(w, None)
        runner.prefill(prompt)
        batch.join(runner, slots=4)
        caches.append(batch.cache.data_ptr())
    assert caches[0] == caches[1] == caches[2] == caches[3] != caches[4]  # room for 4, then grown for the 5th
    assert batch.rows == batch.slots == 5
    assert batch.lengths == [3, 1, 2, 4, 1]


def test_shared_prefix_counts_the_first_tokens_in_common_up_to_the_limit():
    a = list(range(200))
    assert shared_prefix(a, a, 150) == 150
    assert shared_prefix(a, [*a[:70], -1, *a[71:]], 200) == 70  # past the first block of 64
    assert shared_prefix(a, [-1, *a[1:]], 200) == 0
    assert shared_prefix(a, a[:10], 10) == 10
    assert shared_prefix(a, a, 0) == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_prefill_after_a_copied_prefix_equals_the_whole_prefill(tiny_llama_dir, dtype):
    engine = load_engine(ModelSettings(model_path=str(tiny_llama_dir), dtype=dtype), progress=False)
    w = engine.llama_weights
    first = LlamaRunner(w, None)
    first.prefill(list(range(10, 310)))  # 300 tokens: the copy spans two cache chunks
    prompt = [*range(10, 290), 7, 8, 9]  # the same first 280 tokens, then others
    whole, reused = LlamaRunner(w, None), LlamaRunner(w, None)
    expected = whole.prefill(prompt)
    reused.copy_prefix(first, 0, 280)
    got = reused.prefill(prompt, start=280)
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == "float32" else {"rtol": 0.05, "atol": 0.05}
    torch.testing.assert_close(got, expected, **tolerance)
    assert reused.lengths == whole.lengths == [len(prompt)]
    torch.testing.assert_close(reused.step(5), whole.step(5), **tolerance)
    n = len(prompt)
    torch.testing.assert_close(
        reused.cache[:, :, :, :, :n].float(), whole.cache[:, :, :, :, :n].float(), **tolerance
    )
    with pytest.raises(ValueError, match="cannot start"):
        LlamaRunner(w, None).prefill(prompt, start=3)  # nothing cached
    with pytest.raises(ValueError, match="cannot start"):
        reused.prefill(prompt[:5], start=5)  # at least one token must be computed


def _batch_steps(w: LlamaWeights) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Three rows (one spans two cache chunks) decoded together, then two of them after the third left."""
    batch = LlamaRunner(w, None)
    for prompt in ([3, 4, 5], list(range(10, 300)), [7]):
        runner = LlamaRunner(w, None)
        runner.prefill(prompt)
        batch.join(runner)
    logits = [decode(w, batch, tokens) for tokens in ([9, 9, 2], [4, 7, 1], [5, 5, 5])]
    batch.keep([2, 0])
    logits += [decode(w, batch, [8, 8]), decode(w, batch, [1, 2])]
    return logits, batch.cache.clone()


@pytest.mark.gpu
@pytest.mark.parametrize(("dtype", "load_8bit"), [("float32", False), ("float16", False), ("float16", True)])
def test_on_a_gpu_steps_replayed_from_cuda_graphs_equal_the_steps_run_as_usual(
    tiny_llama_dir, dtype, load_8bit, monkeypatch
):
    from vicuna.engine import runner as runner_module

    settings = ModelSettings(model_path=str(tiny_llama_dir), dtype=dtype, device="cuda", load_8bit=load_8bit)
    w = load_engine(settings, progress=False).llama_weights
    assert w is not None and w.device.type == "cuda"
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: replays.append(1) or replay(self))
    graphed, graphed_cache = _batch_steps(w)
    assert len(replays) == 3  # steps 2 and 3 of three rows, step 2 of two rows; the others recorded

    def as_usual(self, tokens, positions):
        inputs = torch.tensor([list(tokens), list(positions)], device=w.device)
        return runner_module.step_in_pytorch(w, self.cache, inputs[0], inputs[1], w.rope(self.capacity))

    monkeypatch.setattr(LlamaRunner, "graphed_step", as_usual)
    eager, eager_cache = _batch_steps(w)
    for ours, theirs in zip(graphed, eager, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert torch.equal(graphed_cache, eager_cache)


@pytest.mark.gpu
def test_on_a_gpu_the_runner_gives_transformers_logits(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    settings = ModelSettings(model_path=str(tiny_llama_dir), dtype="float32", device="cuda")
    ours = LlamaRunner(load_engine(settings, progress=False).llama_weights, None)
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).cuda().eval()
    theirs = HFRunner(plain, torch.device("cuda"))
    prompt = list(range(3, 40))
    torch.testing.assert_close(ours.prefill(prompt), theirs.prefill(prompt), rtol=1e-4, atol=1e-4)
    for token in [5, 17, 300, 2, 42]:
        torch.testing.assert_close(ours.step(token), theirs.step(token), rtol=1e-4, atol=1e-4)


def test_the_hf_runner_passes_its_cache_by_the_name_the_model_takes(tiny_llama_dir):
    """Earlier transformers 5 releases take the cache as `past_key_values`, later ones as `cache`; under
    the wrong name each step would be computed without the tokens before it."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()

    class EarlierNames(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = plain.config

        def forward(self, input_ids=None, past_key_values=None, use_cache=None, logits_to_keep=0):
            # by the name of the transformers installed: any release that `pyproject.toml` allows
            cache = {cache_arg(plain): past_key_values}
            return plain(input_ids=input_ids, use_cache=use_cache, logits_to_keep=logits_to_keep, **cache)

    prompt, steps = [3, 4, 5, 6], [9, 300, 2]
    with torch.inference_mode():
        whole = plain(input_ids=torch.tensor([prompt + steps])).logits[0].float()
    for model in (plain, EarlierNames()):
        runner = HFRunner(model, torch.device("cpu"))
        got = [runner.prefill(prompt)] + [runner.step(t) for t in steps]
        torch.testing.assert_close(torch.stack(got), whole[len(prompt) - 1 :], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("int8", [False, True])
def test_weights_are_packed_in_place_and_the_model_still_gives_its_logits(int8):
    """Where the kernel multiplies packed weights, `LlamaWeights` packs them in place: bfloat16
    projections and head become `PackedLinear`s over the same memory (int8 ones are marked packed), a
    tied embedding table reads the packed rows back, and the model's own forward, the runner and a second
    `LlamaWeights` of the packed model all give the unpacked model's logits."""
    import copy

    from transformers import LlamaForCausalLM

    from tests.tiny_models import tiny_llama_config
    from vicuna.engine import kernel
    from vicuna.engine.quant import Int8Embedding, Int8Linear, quantize_int8
    from vicuna.engine.runner import PackedEmbedding, PackedLinear

    if kernel.load(progress=False) is None or not kernel.packs(torch.zeros(16, 2, dtype=torch.bfloat16)):
        pytest.skip("packed weights need the kernel's AVX512-BF16 products (not on this CPU)")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(400, tie_word_embeddings=True)).to(torch.bfloat16).eval()
    if int8:
        quantize_int8(model, torch.device("cpu"))
    plain = copy.deepcopy(model)
    ids = [1, 5, 17, 300, 42, 7, 399, 398]
    with torch.inference_mode():
        expected = plain(input_ids=torch.tensor([ids])).logits[0].float()
    stored = "weight_int8" if int8 else "weight"
    memory = [getattr(m, stored).data_ptr() for m in (model.lm_head, model.model.layers[0].mlp.down_proj)]

    weights = LlamaWeights(model)
    layer = model.model.layers[0]
    projections = [layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    embedding = model.get_input_embeddings()
    if int8:
        assert all(type(m) is Int8Linear and m.packed for m in [*projections, model.lm_head])
        assert type(embedding) is Int8Embedding and embedding.packed
    else:
        assert all(type(m) is PackedLinear for m in [*projections, model.lm_head])
        assert type(embedding) is PackedEmbedding and embedding.weight is model.lm_head.weight
    assert [getattr(m, stored).data_ptr() for m in (model.lm_head, layer.mlp.down_proj)] == memory
    assert weights.head.kernel.args[0] == kernel.PACKED[torch.int8 if int8 else torch.bfloat16]

    def close(logits: torch.Tensor, first: int = 0) -> None:  # the logits after tokens first.. on
        error = (logits - expected[first:]).abs().max() / expected.abs().max()
        assert error <= 0.02

    with torch.inference_mode():
        close(model(input_ids=torch.tensor([ids])).logits[0].float())
    for w in (weights, LlamaWeights(model)):
        runner = LlamaRunner(w, None)
        close(torch.stack([runner.prefill(ids[:3]), *(runner.step(t) for t in ids[3:])]), first=2)


@pytest.mark.parametrize(
    ("rows", "width", "packed"),
    [((32, 16, 16), 24, True), ((32, 8, 24), 24, False), ((16, 16), 7, False)],  # whole blocks / not / odd
)
def test_fused_layers_are_packed_only_where_each_starts_at_a_whole_block(rows, width, packed):
    from vicuna.engine import kernel
    from vicuna.engine.runner import PackedLinear, fuse

    if kernel.load(progress=False) is None or not kernel.packs(torch.zeros(16, 2, dtype=torch.bfloat16)):
        pytest.skip("packed weights need the kernel's AVX512-BF16 products (not on this CPU)")
    torch.manual_seed(0)
    parent = torch.nn.Module()
    names = [f"part{i}" for i in range(len(rows))]
    for name, n in zip(names, rows, strict=True):
        setattr(parent, name, torch.nn.Linear(width, n, bias=False).to(torch.bfloat16))
    x = torch.randn(3, width)
    expected = [getattr(parent, name)(x.bfloat16()).float() for name in names]
    dense = fuse(parent, *names)
    assert (dense.kernel.args[0] == kernel.PACKED[torch.bfloat16]) == packed
    assert all(type(getattr(parent, name)) is (PackedLinear if packed else torch.nn.Linear) for name in names)
    out = dense(x).split(list(rows), dim=-1)
    for name, ours, theirs in zip(names, out, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0.02, atol=0.02)
        torch.testing.assert_close(getattr(parent, name)(x.bfloat16()).float(), theirs, rtol=0.02, atol=0.02)
