"""--load-8bit: int8 weights take about half the memory of bf16 and give nearly the same logits."""

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
