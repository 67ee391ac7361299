"""Tiny LLaMA-family checkpoints built in code with a deterministic init: no network, a second or less.

`write_sentencepiece` trains a small SentencePiece BPE model (LLaMA's tokenizer kind, with byte fallback)
on fixed text; `write_tiny_llama` saves an HF-format LlamaForCausalLM folder with that tokenizer;
`tiny_config` is another family's config at the same size. `plain_engine` runs a loaded engine's model
without the fused LLaMA path, to compare the two.
"""

from __future__ import annotations

import io
from pathlib import Path

CORPUS = [
    "Hello world! How are you today? I am fine, thank you.",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "你好，世界！今天天气很好。我们一起去公园吧。",
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: ASSISTANT: ### Human: ### Assistant: [INST] [/INST] <<SYS>> <</SYS>>",
    "def add(x, y):\n    return x + y\n",
]


def write_sentencepiece(path: Path, vocab_size: int = 400, **options) -> Path:
    """Train a byte-fallback BPE SentencePiece model (ids: unk 0, <s> 1, </s> 2) and write it to `path`;
    `options` are more of SentencePieceTrainer's."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
        **options,
    )
    path.write_bytes(buf.getvalue())
    return path


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


# Other families' features at a tiny size: sliding windows shorter than a test's prompt, Gemma's head_dim
# and attention scale apart from hidden_size / heads.
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 16},
    "qwen2": {"tie_word_embeddings": True},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16},
    "phi3": {"pad_token_id": None},
}


def tiny_config(model_type: str, vocab_size: int, **overrides):
    """A tiny config of one of the `FAMILIES`, with `tiny_llama_config`'s sizes."""
    from transformers import AutoConfig

    kwargs = tiny_llama_config(vocab_size).to_diff_dict()
    kwargs.pop("model_type", None)
    kwargs.update(FAMILIES[model_type], **overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def write_tiny_llama(
    out: Path, *, seed: int = 0, safe_serialization: bool = True, **config_overrides
) -> Path:
    """An HF-format LLaMA folder: config.json, safetensors (or .bin) weights, a SentencePiece tokenizer.

    The weights come from `torch.manual_seed(seed)`, so the same call gives the same model.
    """
    import torch
    from transformers import LlamaForCausalLM, LlamaTokenizer

    out.mkdir(parents=True, exist_ok=True)
    sp_dir = out / "_sp"
    sp_dir.mkdir(exist_ok=True)
    write_sentencepiece(sp_dir / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(sp_dir, add_bos_token=True)
    config = tiny_llama_config(**{"vocab_size": len(tokenizer), **config_overrides})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    if not safe_serialization:  # transformers 5 writes only safetensors: write the old format by hand
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, out / "pytorch_model.bin")
        (out / "model.safetensors").unlink()
    tokenizer.save_pretrained(out)
    (out / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    for f in sp_dir.iterdir():
        f.unlink()
    sp_dir.rmdir()
    return out


def plain_engine(engine, model=None):
    """`engine`'s model (or `model` in its place), tokenizer and template without the fused LLaMA path:
    generated through transformers' forward, as an architecture other than LLaMA's is."""
    from vicuna.engine.engine import Engine

    model = engine.model if model is None else model
    return Engine(
        model=model, tokenizer=engine.tokenizer, template=engine.template, model_name="plain", fast_path=False
    )
