"""Weight layouts: int8 weights (--load-8bit) take about half the memory of bf16 and give nearly the same
logits; packed float16 weights give bf16 products with float32 sums and keep the model working."""

from __future__ import annotations

import torch

from tests.tiny_models import tiny_llama_config
from vicuna.engine.quant import quantize_int8, weight_bytes


def test_int8_halves_bf16_weight_memory_and_keeps_the_logits():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(256, hidden_size=256, intermediate_size=768, num_hidden_layers=2)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 256, (1, 12))
    with torch.inference_mode():
        ref = model(ids).logits.float()
    bf16 = weight_bytes(model)
    before, after = quantize_int8(model, torch.device("cpu"))
    assert before == bf16
    layers = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    # the layers' Linear weights went from 2 bytes to about 1 byte per value
    assert after < before - 0.9 * layers
    with torch.inference_mode():
        out = model(ids).logits.float()
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


def test_load_8bit_engine_uses_the_fused_int8_path_with_the_same_tokens(tiny_llama_dir):
    from vicuna.config import ModelSettings, SamplingParams
    from vicuna.engine.engine import Engine
    from vicuna.engine.loader import load_engine
    from vicuna.engine.quant import Int8Linear

    engine = load_engine(
        ModelSettings(model_path=str(tiny_llama_dir), dtype="bfloat16", load_8bit=True), progress=False
    )
    assert engine.llama_weights is not None  # the fused fast path takes int8 layers too
    assert any(isinstance(m, Int8Linear) for m in engine.model.modules())
    plain = Engine(
        model=engine.model,
        tokenizer=engine.tokenizer,
        template=engine.template,
        model_name="x",
        fast_path=False,
    )
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    prompt = engine.encode("Hello world")
    tokens = [
        [t for e in eng.generate(prompt, params) for t in getattr(e, "token_ids", ())]
        for eng in (engine, plain)
    ]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 16


def test_packed_half_multiplies_bf16_weights_with_float32_sums():
    from vicuna.engine.quant import PackedHalf

    torch.manual_seed(0)
    weight = torch.randn(96, 64).bfloat16()
    packed = PackedHalf(weight)
    assert packed.nbytes == weight.numel() * 2
    for rows in (1, 3, 40):
        x = torch.randn(rows, 64).bfloat16()
        out = packed(x)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, 96)
        exact = torch.nn.functional.linear(x.double(), weight.double())
        torch.testing.assert_close(out.double(), exact, rtol=8e-3, atol=1e-2)  # bf16 rounding of the output


def test_packs_half_only_half_weights_that_fit_float16_on_cpus_without_native_half():
    from vicuna.engine.quant import native_half_matmul, packs_half

    assert not packs_half(torch.zeros(8, 8))  # float32
    small = torch.ones(8, 8, dtype=torch.bfloat16)
    assert packs_half(small) == (not native_half_matmul(torch.bfloat16))
    assert not packs_half(small * 70000)  # beyond float16's range


def packed_model(monkeypatch, **config):
    """A bf16 tiny LLaMA whose fast path packs every matrix (as on a CPU without native bf16)."""
    from transformers import LlamaForCausalLM

    from vicuna.engine import runner

    monkeypatch.setattr(runner, "packs_half", lambda weight: True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(256, **config)).to(torch.bfloat16).eval()
    ids = torch.randint(0, 256, (1, 20))
    with torch.inference_mode():
        ref = model(ids).logits.float()
    before = weight_bytes(model)
    weights = runner.LlamaWeights(model)
    return model, weights, ids, ref, before


def test_packing_keeps_the_model_working_and_its_weight_bytes(monkeypatch):
    from vicuna.engine.quant import PackedRows, decode_bytes

    model, weights, ids, ref, before = packed_model(monkeypatch)
    attn = model.model.layers[0].self_attn
    assert all(isinstance(getattr(attn, n), PackedRows) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert attn.q_proj.packed is attn.v_proj.packed  # one packed matrix for q, k and v
    assert weights.act_dtype == torch.float32 and weights.dtype == torch.bfloat16  # rows between products
    assert weight_bytes(model) == before
    embedding = model.get_input_embeddings().weight
    assert decode_bytes(model) == before - embedding.numel() * 2  # the table is read one row at a time
    with torch.inference_mode():
        out = model(ids).logits.float()  # transformers' forward through the packed rows
        fast = runner_logits(weights, ids[0].tolist())
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999
    torch.testing.assert_close(fast, out[0, -1], rtol=0.05, atol=0.05)


def test_a_tied_head_is_packed_as_a_copy(monkeypatch):
    from vicuna.engine.quant import decode_bytes

    model, weights, ids, ref, before = packed_model(monkeypatch, tie_word_embeddings=True)
    table = model.get_input_embeddings().weight
    assert weight_bytes(model) == before + table.numel() * 2
    assert decode_bytes(model) == before  # the packed head, and not the table, is read whole
    with torch.inference_mode():
        fast = runner_logits(weights, ids[0].tolist())
    assert fast.argmax() == ref[0, -1].argmax()


def runner_logits(weights, ids):
    from vicuna.engine.runner import LlamaRunner

    return LlamaRunner(weights, None).prefill(ids)
