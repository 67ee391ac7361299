"""8-bit weights (--load-8bit) take about half the memory of bf16 and give nearly the same logits; the
bytes a decoded token reads."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import plain_engine, tiny_config, tiny_llama_config
from vicuna.engine.quant import quantize_int8, weight_bytes


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text"])
def test_int8_halves_bf16_weight_memory_and_keeps_the_logits(family):
    """Gemma scales its embeddings by sqrt(hidden_size) inside the embedding: the int8 one lost that."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config(family, 256, hidden_size=256, intermediate_size=768, num_hidden_layers=2)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
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


@pytest.mark.parametrize(
    ("device", "dtype"), [("cpu", "bfloat16"), pytest.param("cuda", "float32", marks=pytest.mark.gpu)]
)
def test_load_8bit_engine_uses_the_fused_int8_path_with_the_same_tokens(tiny_llama_dir, device, dtype):
    from vicuna.config import ModelSettings, SamplingParams
    from vicuna.engine.loader import load_engine
    from vicuna.engine.quant import Int8Linear

    engine = load_engine(
        ModelSettings(model_path=str(tiny_llama_dir), dtype=dtype, device=device, load_8bit=True),
        progress=False,
    )
    assert engine.llama_weights is not None  # the fused fast path takes int8 layers too
    assert any(isinstance(m, Int8Linear) for m in engine.model.modules())
    plain = plain_engine(engine)
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    prompt = engine.encode("Hello world")
    tokens = [
        [t for e in eng.generate(prompt, params) for t in getattr(e, "token_ids", ())]
        for eng in (engine, plain)
    ]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 16


@pytest.mark.parametrize("rows", [1, 4, 16])  # the kernel's paths: one row, a few, panels
def test_int8_rows_give_the_same_products_on_the_kernel_and_on_pytorch(monkeypatch, rows):
    from vicuna.engine import kernel
    from vicuna.engine.quant import Int8Linear

    torch.manual_seed(rows)
    layer = Int8Linear(torch.nn.Linear(64, 96, bias=False))
    x = torch.randn(rows, 64)
    with torch.inference_mode():
        ours = layer(x)  # the kernel, where it runs
        monkeypatch.setattr(kernel, "runs_on", lambda device, dtype: False)
        pytorch = layer(x)  # PyTorch's int8 kernel (bfloat16 rows)
    assert ours.dtype == pytorch.dtype == torch.float32
    exact = x.double() @ (layer.weight_int8.double() * layer.scales.double()[:, None]).T
    assert (ours.double() - exact).abs().max() <= (pytorch.double() - exact).abs().max() + 1e-6


def test_decode_bytes_count_the_embedding_table_only_when_it_is_the_head():
    from transformers import LlamaForCausalLM

    from vicuna.engine.quant import decode_bytes

    for tied in (False, True):
        model = LlamaForCausalLM(tiny_llama_config(256, tie_word_embeddings=tied)).to(torch.bfloat16)
        table = model.get_input_embeddings().weight.numel() * 2
        assert decode_bytes(model) == weight_bytes(model) - (0 if tied else table)


def test_8bit_decode_steps_of_any_number_of_rows_are_one_kernel_call(tiny_llama_dir):
    from vicuna.config import ModelSettings
    from vicuna.engine import kernel
    from vicuna.engine.loader import load_engine
    from vicuna.engine.runner import LlamaRunner, decode

    engine = load_engine(
        ModelSettings(model_path=str(tiny_llama_dir), dtype="bfloat16", load_8bit=True), progress=False
    )
    w = engine.llama_weights
    if w.step_kernel is None:
        pytest.skip("the kernel does not run here")
    assert w.step_rows is None  # the kernel's int8 products take any number of rows
    calls, step = [], w.step_kernel
    w.step_kernel = lambda *args, **kw: (
        calls.append((len(args[0]), kw.get("prompt", False))) or step(*args, **kw)
    )
    alone, batch, rows = [], LlamaRunner(w, None), 2 * kernel.FEW_ROWS + 1
    for i in range(rows):
        runner = LlamaRunner(w, None)
        runner.prefill([3, 4, 5 + i])
        batch.join(runner)
        alone.append(runner.step(9))
    out = decode(w, batch, [9] * rows)
    # each prompt in one call, each row's step alone, then the batch in one call
    assert calls == [(3, True), (1, False)] * rows + [(rows, False)]
    for row, expected in zip(out, alone, strict=True):
        assert row.argmax() == expected.argmax()
        assert torch.nn.functional.cosine_similarity(row, expected, dim=0) > 0.999


def test_load_8bit_quantizes_the_checkpoints_own_tensors_without_a_copy_in_the_model_dtype(tiny_llama_dir):
    """The float32 checkpoint is loaded as stored (memory-mapped) and quantized from that: the int8 rows are
    those of the float32 weights, not of a bfloat16 copy, and the rest of the model is bfloat16."""
    from safetensors.torch import load_file

    from vicuna.config import ModelSettings
    from vicuna.engine.loader import load_engine
    from vicuna.engine.quant import Int8Embedding, Int8Linear, quantize_rows

    stored = load_file(tiny_llama_dir / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    assert stored[name].dtype == torch.float32
    engine = load_engine(
        ModelSettings(model_path=str(tiny_llama_dir), dtype="bfloat16", load_8bit=True), progress=False
    )
    down = engine.model.model.layers[1].mlp.down_proj
    assert isinstance(down, Int8Linear)
    values, scales = quantize_rows(stored[name])
    rows = down.weight_int8  # as stored, or packed for the kernel
    if down.packed:
        from vicuna.engine import kernel

        rows = kernel.packed_rows(rows, torch.arange(rows.shape[0]))
    assert torch.equal(rows, values) and torch.equal(down.scales, scales)
    assert not torch.equal(values, quantize_rows(stored[name].bfloat16())[0])  # the copy would differ
    embedding = engine.model.get_input_embeddings()
    assert isinstance(embedding, Int8Embedding) and embedding.dtype == torch.bfloat16
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    assert engine.dtype == torch.bfloat16


@pytest.mark.parametrize("tied", [False, True])
def test_the_8bit_estimate_that_doctor_and_the_fit_check_use_matches_the_quantized_model(tied):
    from transformers import LlamaForCausalLM

    from vicuna.engine.memory import model_size

    config = tiny_llama_config(512, hidden_size=128, intermediate_size=384, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    _, after = quantize_int8(model, torch.device("cpu"))
    estimate = model_size(config).weight_bytes(torch.bfloat16, load_8bit=True)
    assert estimate <= after <= 1.05 * estimate  # beyond it: one scale per row


def test_load_8bit_of_a_tiny_model_says_its_sizes_in_kib_not_0_mib(tiny_llama_dir, capsys):
    """`vicuna chat --load-8bit` of a model under 1 MiB said "8-bit weights: 0 MiB -> 0 MiB"."""
    import re

    from vicuna.config import ModelSettings
    from vicuna.engine.loader import load_engine
    from vicuna.engine.memory import gib

    load_engine(ModelSettings(model_path=str(tiny_llama_dir), dtype="bfloat16", load_8bit=True))
    before, after = re.search(r"8-bit weights: (\d+) KiB -> (\d+) KiB\n", capsys.readouterr().err).groups()
    assert 0 < int(after) < int(before)
    assert [gib(n) for n in (0, 1023, 1024, 2**20, 3 * 2**30)] == [
        "0 bytes",
        "1023 bytes",
        "1 KiB",
        "1 MiB",
        "3.0 GiB",
    ]
