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
    before, after = quantize_int8(model)
    assert before == bf16
    layers = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    # the layers' Linear weights went from 2 bytes to about 1 byte per value
    assert after < before - 0.9 * layers
    with torch.inference_mode():
        out = model(ids).logits.float()
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99
