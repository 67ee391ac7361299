"""The fused LLaMA runner's pieces against plain PyTorch and transformers: products, norms, rotary, and
whole forwards in float32 and bfloat16, alone and batched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vicuna.config import ModelSettings
from vicuna.engine.loader import load_engine
from vicuna.engine.runner import UPCAST_ROWS, Dense, HFRunner, LlamaRunner, LlamaWeights, decode, rotate


def test_dense_computes_many_rows_in_float32_on_cpus_without_native_bf16():
    torch.manual_seed(0)
    weight = torch.randn(48, 32).bfloat16()
    dense = Dense(weight)
    dense.upcast = True  # as on a CPU without AVX-512 BF16 / AMX, whatever this one has
    many, one = torch.randn(UPCAST_ROWS, 32).bfloat16(), torch.randn(1, 32).bfloat16()
    assert dense(many).dtype == torch.bfloat16
    assert torch.equal(dense(many), F.linear(many.float(), weight.float()).bfloat16())
    assert torch.equal(dense(one), F.linear(one, weight))
    dense.upcast = False
    assert torch.equal(dense(many), F.linear(many, weight))


def test_dense_upcasts_only_half_precision_without_native_support():
    from vicuna.engine.runner import native_half_matmul

    assert not Dense(torch.zeros(4, 4)).upcast  # float32 is native everywhere
    assert Dense(torch.zeros(4, 4, dtype=torch.bfloat16)).upcast == (not native_half_matmul(torch.bfloat16))


@pytest.mark.parametrize("rows", [1, 5])
def test_norm_rows_is_rms_norm(tiny_llama_dir, rows):
    engine = load_engine(ModelSettings(model_path=str(tiny_llama_dir), dtype="float32"), progress=False)
    w, norm = engine.llama_weights, engine.model.model.layers[0].input_layernorm
    x = torch.randn(rows, engine.model.config.hidden_size) * 3
    expected = F.rms_norm(x, (x.shape[-1],), norm.weight, w.eps)
    torch.testing.assert_close(w.norm_rows(x, w.norm_weight(norm)), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)  # what transformers computes


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
    prompts = [[3, 4, 5], list(range(10, 40)), [7]]
    alone, batch = [], []
    for prompt in prompts:
        runner = LlamaRunner(w, None)
        runner.prefill(prompt)
        alone.append(runner.step(9))
        batch.append(LlamaRunner(w, None))
        batch[-1].prefill(prompt)
    rows = decode(w, batch, [9, 9, 9])
    for row, expected in zip(rows, alone, strict=True):
        torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-5)
    assert [r.pos for r in batch] == [len(p) + 1 for p in prompts]


def test_rotary_tables_grow_with_the_cache_and_keep_old_positions(tiny_llama_dir):
    engine = load_engine(ModelSettings(model_path=str(tiny_llama_dir), dtype="float32"), progress=False)
    w = LlamaWeights(engine.model)
    small = w.rope(10).clone()
    large = w.rope(small.shape[1] + 1)
    assert large.shape[1] > small.shape[1]
    torch.testing.assert_close(large[:, : small.shape[1]], small)


def test_rows_keep_the_model_dtype_unless_every_product_is_packed(tiny_llama_dir, monkeypatch):
    from vicuna.engine import runner

    monkeypatch.setattr(runner, "packs_half", lambda weight: False)
    engine = load_engine(ModelSettings(model_path=str(tiny_llama_dir), dtype="bfloat16"), progress=False)
    assert engine.llama_weights.act_dtype == torch.bfloat16
    logits = LlamaRunner(engine.llama_weights, None).prefill([3, 4, 5])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
