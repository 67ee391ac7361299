"""`vicuna convert`: tiny Meta checkpoints (1, 2 and 4 model-parallel shards, with and without GQA) converted
and loaded with transformers; logits compared with a reference LLaMA forward pass computed here from the Meta
tensors (Meta's interleaved rotary pairs), independent of the converter."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.weights.test_checkpoint import peak_rss_above_idle
from vicuna.cli import main
from vicuna.errors import VicunaError
from vicuna.weights import meta_download
from vicuna.weights.checkpoint import CheckpointReader
from vicuna.weights.convert import convert_meta, ffn_hidden_size
from vicuna.weights.manifest import verify_manifest

VOCAB = 400
TEXTS = ["Hello world! How are you?", "spaces  inside and\nnew lines", "你好，世界！", "x = 42 + y"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A SentencePiece model set up like LLaMA's: BPE, byte fallback, no normalization, digits split."""
    from tests.tiny_models import write_sentencepiece

    return write_sentencepiece(
        tmp_path_factory.mktemp("sp") / "tokenizer.model",
        VOCAB,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
    )


def meta_weights(
    params: dict, vocab: int, seed: int = 0, dtype=torch.float32, random: bool = True
) -> dict[str, torch.Tensor]:
    """A full (unsplit) LLaMA in Meta's names and layout; random=False fills it with a constant (fast)."""
    gen = torch.Generator().manual_seed(seed)
    dim, heads = params["dim"], params["n_heads"]
    kv = params.get("n_kv_heads") or heads
    hd, ffn = dim // heads, ffn_hidden_size(params)

    def rand(*shape, scale=0.08):
        if not random:
            return torch.full(shape, 0.01, dtype=dtype)
        return (torch.randn(shape, generator=gen) * scale).to(dtype)

    w = {
        "tok_embeddings.weight": rand(vocab, dim, scale=1.0),
        "norm.weight": 1 + rand(dim),
        "output.weight": rand(vocab, dim),
    }
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        w |= {
            p + "attention.wq.weight": rand(heads * hd, dim, scale=0.3),
            p + "attention.wk.weight": rand(kv * hd, dim, scale=0.3),
            p + "attention.wv.weight": rand(kv * hd, dim),
            p + "attention.wo.weight": rand(dim, heads * hd),
            p + "feed_forward.w1.weight": rand(ffn, dim),
            p + "feed_forward.w2.weight": rand(dim, ffn),
            p + "feed_forward.w3.weight": rand(ffn, dim),
            p + "attention_norm.weight": 1 + rand(dim),
            p + "ffn_norm.weight": 1 + rand(dim),
        }
    return w


def write_meta(
    folder: Path, params: dict, weights: dict, shards: int, *, vocab_parallel: bool = False
) -> Path:
    """Split `weights` the way Meta's model parallelism did and save consolidated.NN.pth + params.json."""
    folder.mkdir(parents=True, exist_ok=True)
    parts: list[dict] = [{} for _ in range(shards)]
    for name, tensor in weights.items():
        kind = name.split(".")[-2]
        if kind in ("wq", "wk", "wv", "w1", "w3", "output") or (kind == "tok_embeddings" and vocab_parallel):
            pieces = tensor.chunk(shards, 0)
        elif kind in ("wo", "w2", "tok_embeddings"):
            pieces = tensor.chunk(shards, 1)
        else:
            pieces = [tensor] * shards
        for part, piece in zip(parts, pieces, strict=True):
            part[name] = piece.clone()
    hd = params["dim"] // params["n_heads"]
    for i, part in enumerate(parts):
        part["rope.freqs"] = torch.ones(hd // 2)  # present in Meta's files, ignored by the converter
        torch.save(part, folder / f"consolidated.{i:02d}.pth")
    (folder / "params.json").write_text(json.dumps(params))
    return folder


def write_checklist(folder: Path) -> Path:
    """Meta's checklist.chk (md5sum's format) for the checkpoint files in `folder`."""
    files = sorted(p for p in folder.iterdir() if p.suffix == ".pth" or p.name == "params.json")
    lines = [f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.name}\n" for p in files]
    (folder / "checklist.chk").write_text("".join(lines))
    return folder / "checklist.chk"


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def llama3_scaled(freqs: torch.Tensor) -> torch.Tensor:
    """Meta's Llama 3.1 scaling of rotary frequencies (factor 8, low/high frequency factors 1 and 4, over the
    8192-token window): wavelengths under 8192/4 kept, over 8192 divided by 8, blended in between."""
    wavelength = 2 * math.pi / freqs
    blend = (8192 / wavelength - 1.0) / (4.0 - 1.0)
    between = (1 - blend) * freqs / 8 + blend * freqs
    return torch.where(wavelength < 8192 / 4, freqs, torch.where(wavelength > 8192, freqs / 8, between))


def reference_logits(params: dict, w: dict, tokens: list[int], positions=None) -> torch.Tensor:
    """LLaMA's forward pass as Meta wrote it: rotary embedding on interleaved pairs (as complex numbers)."""
    dim, heads = params["dim"], params["n_heads"]
    kv = params.get("n_kv_heads") or heads
    hd, eps, theta = dim // heads, params.get("norm_eps", 1e-5), params.get("rope_theta", 10000.0)
    w = {k: v.double() for k, v in w.items()}
    T = len(tokens)
    freqs = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if params.get("use_scaled_rope"):
        freqs = llama3_scaled(freqs)
    at = torch.arange(T) if positions is None else torch.tensor(positions)
    angles = torch.outer(at.to(torch.float64), freqs)
    rot = torch.polar(torch.ones_like(angles), angles)[:, None, :]  # (T, 1, hd/2)

    def rope(x):  # (T, heads, hd): pairs (2i, 2i+1) rotate together
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(pairs * rot).flatten(-2)

    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    h = w["tok_embeddings.weight"][torch.tensor(tokens)]
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = rms_norm(h, w[p + "attention_norm.weight"], eps)
        q = rope((x @ w[p + "attention.wq.weight"].T).view(T, heads, hd))
        k = rope((x @ w[p + "attention.wk.weight"].T).view(T, kv, hd)).repeat_interleave(heads // kv, dim=1)
        v = (x @ w[p + "attention.wv.weight"].T).view(T, kv, hd).repeat_interleave(heads // kv, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask
        attn = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, dim)
        h = h + attn @ w[p + "attention.wo.weight"].T
        x = rms_norm(h, w[p + "ffn_norm.weight"], eps)
        gate, up = x @ w[p + "feed_forward.w1.weight"].T, x @ w[p + "feed_forward.w3.weight"].T
        h = h + (F.silu(gate) * up) @ w[p + "feed_forward.w2.weight"].T
    return rms_norm(h, w["norm.weight"], eps) @ w["output.weight"].T


def hf_logits(folder: Path, tokens: list[int], dtype=torch.float32, positions=None) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    at = None if positions is None else torch.tensor([positions])
    with torch.no_grad():
        return model(torch.tensor([tokens]), position_ids=at).logits[0].double()


TOKENS = [1, 17, 250, 3, 99, 318, 42, 7, 7, 160, 5, 64]
BASE = {"dim": 64, "n_layers": 2, "multiple_of": 32, "vocab_size": -1}
CASES = {
    "1-shard": (1, {"n_heads": 4, "norm_eps": 1e-6}, False),
    "1-shard-gqa-rope-theta": (
        1,
        {"n_heads": 4, "n_kv_heads": 2, "norm_eps": 1e-5, "rope_theta": 500000.0},
        False,
    ),
    "2-shards-ffn-multiplier": (2, {"n_heads": 4, "norm_eps": 1e-5, "ffn_dim_multiplier": 1.3}, False),
    "2-shards-gqa": (2, {"n_heads": 8, "n_kv_heads": 2, "norm_eps": 1e-5}, False),
    "4-shards": (4, {"n_heads": 8, "norm_eps": 1e-6, "vocab_size": VOCAB}, False),
    "4-shards-gqa-vocab-parallel": (
        4,
        {"n_heads": 8, "n_kv_heads": 4, "norm_eps": 1e-5, "rope_theta": 5e5},
        True,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_logits_match_the_meta_reference(tmp_path, case):
    shards, extra, vocab_parallel = CASES[case]
    params = BASE | extra
    weights = meta_weights(params, VOCAB)
    meta = write_meta(tmp_path / "meta", params, weights, shards, vocab_parallel=vocab_parallel)
    out = convert_meta(meta, tmp_path / "hf", dtype="float32", progress=False)

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == params.get("n_kv_heads", params["n_heads"])
    assert config["intermediate_size"] == ffn_hidden_size(params)
    assert config["rms_norm_eps"] == params["norm_eps"]
    assert config["vocab_size"] == VOCAB
    assert (out / "model.safetensors.index.json").is_file()
    assert verify_manifest(out, progress=False) == []
    expected = reference_logits(params, weights, TOKENS)
    torch.testing.assert_close(hf_logits(out, TOKENS), expected, atol=1e-4, rtol=1e-4)


def test_a_llama_3_1_checkpoint_keeps_its_scaled_rotary_embedding(tmp_path, capsys):
    """params.json's `use_scaled_rope: true` (Llama 3.1) was only a notice: config.json had no rope scaling
    and a window of 4096, so tokens farther apart than Meta's 8192 rotated at other angles than the model's
    and long prompts were refused. Positions 3000 apart stand in for a long prompt's distances here."""
    params = BASE | {
        "n_heads": 4,
        "n_kv_heads": 2,
        "norm_eps": 1e-5,
        "rope_theta": 5e5,
        "use_scaled_rope": True,
    }
    weights = meta_weights(params, VOCAB)
    meta = write_meta(tmp_path / "meta", params, weights, 1)
    out = convert_meta(meta, tmp_path / "hf", dtype="float32", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == 131072
    assert config["rope_parameters"] == {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert "not converted" not in capsys.readouterr().err
    positions = [3000 * i for i in range(len(TOKENS))]
    expected = reference_logits(params, weights, TOKENS, positions)
    got = hf_logits(out, TOKENS, positions=positions)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)  # float32 angles of positions to 33000
    unscaled = reference_logits(params | {"use_scaled_rope": False}, weights, TOKENS, positions)
    assert (got - unscaled).abs().max() > 0.1  # the scaling is what this tells apart


def test_default_float16_and_tokenizer_in_the_parent_folder(tmp_path, sp_model):
    """pyllama's layout: DIR/tokenizer.model next to DIR/7B/."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    params = BASE | {"n_heads": 4, "n_kv_heads": 2, "norm_eps": 1e-5}
    weights = meta_weights(params, VOCAB, seed=3)
    meta = write_meta(tmp_path / "llama" / "7B", params, weights, 2)
    (tmp_path / "llama" / "tokenizer.model").write_bytes(sp_model.read_bytes())
    out = convert_meta(meta, tmp_path / "hf", progress=False)

    reader = CheckpointReader(out)
    assert {spec.dtype for spec in reader.specs.values()} == {torch.float16}
    expected = reference_logits(params, weights, TOKENS)
    torch.testing.assert_close(hf_logits(out, TOKENS), expected, atol=0.05, rtol=0.02)

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert tok(text)["input_ids"] == [1, *sp.encode(text)], text
    assert tok.eos_token == "</s>" and tok.eos_token_id == 2 and tok.bos_token_id == 1
    assert (out / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 4096


def test_cli_with_tokenizer_option_and_without_tokenizer(tmp_path, sp_model, capsys):
    params = BASE | {"n_heads": 4, "norm_eps": 1e-6}
    meta = write_meta(tmp_path / "meta", params, meta_weights(params, VOCAB), 1)
    custom = tmp_path / "elsewhere" / "llama.model"
    custom.parent.mkdir()
    custom.write_bytes(sp_model.read_bytes())
    code = main(["convert", str(meta), str(tmp_path / "a"), "--tokenizer", str(custom), "--no-progress"])
    assert code == 0
    assert (tmp_path / "a" / "tokenizer_config.json").is_file()
    assert json.loads((tmp_path / "a" / "config.json").read_text())["max_position_embeddings"] == 2048

    assert main(["convert", str(meta), str(tmp_path / "b"), "--dtype", "bfloat16", "--no-progress"]) == 0
    assert "converted the weights only" in capsys.readouterr().err
    assert not (tmp_path / "b" / "tokenizer_config.json").exists()
    assert {s.dtype for s in CheckpointReader(tmp_path / "b").specs.values()} == {torch.bfloat16}

    assert main(["convert", str(meta), str(tmp_path / "b"), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_bad_inputs_are_named(tmp_path):
    params = BASE | {"n_heads": 4, "norm_eps": 1e-6}
    with pytest.raises(VicunaError, match="is not a folder"):
        convert_meta(tmp_path / "nowhere", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VicunaError, match=r"params\.json does not exist"):
        convert_meta(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "empty" / "13B").mkdir()  # the download folder, not a model's
    (tmp_path / "empty" / "13B" / "params.json").write_text(json.dumps(params))
    with pytest.raises(
        VicunaError, match=rf"params\.json does not exist: .*; its model folders: {tmp_path}/empty/13B$"
    ):
        convert_meta(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "empty" / "params.json").write_text(json.dumps(params))
    with pytest.raises(VicunaError, match=r"no consolidated\.\*\.pth"):
        convert_meta(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "empty" / "params.json").write_text('{"dim": 64}')
    with pytest.raises(VicunaError, match="'n_layers' must be a positive integer"):
        convert_meta(tmp_path / "empty", tmp_path / "out", progress=False)

    meta = write_meta(tmp_path / "meta", params, meta_weights(params, VOCAB), 2)
    with pytest.raises(VicunaError, match=r"--tokenizer: .*none\.model does not exist"):
        convert_meta(meta, tmp_path / "out", tokenizer=tmp_path / "none.model", progress=False)
    data = (meta / "consolidated.01.pth").read_bytes()
    (meta / "consolidated.01.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(VicunaError, match=r"consolidated\.01\.pth.*damaged or incomplete"):
        convert_meta(meta, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    (meta / "consolidated.01.pth").rename(meta / "consolidated.02.pth")
    with pytest.raises(VicunaError, match=r"expected consolidated\.00\.pth, consolidated\.01\.pth"):
        convert_meta(meta, tmp_path / "out", progress=False)

    meta = write_meta(tmp_path / "meta2", params | {"multiple_of": 256}, meta_weights(params, VOCAB), 1)
    with pytest.raises(VicunaError, match="feed-forward width of 256.*w1.weight"):
        convert_meta(meta, tmp_path / "out", progress=False)
    meta = write_meta(tmp_path / "meta3", params | {"n_kv_heads": 2}, meta_weights(params, VOCAB), 2)
    with pytest.raises(
        VicunaError, match=r"consolidated\.00\.pth: tensor layers\.0\.attention\.wk\.weight is 32x64"
    ):
        convert_meta(meta, tmp_path / "out", progress=False)
    weights = meta_weights(params, VOCAB)
    del weights["layers.1.ffn_norm.weight"]
    meta = write_meta(tmp_path / "meta4", params, weights, 1)
    with pytest.raises(VicunaError, match=r"tensor layers\.1\.ffn_norm\.weight is missing"):
        convert_meta(meta, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_an_output_folder_that_is_the_checkpoint_s_or_holds_it_is_refused(tmp_path, capsys):
    """`vicuna convert llama/7B llama` was refused as "llama already exists; delete it", the whole download."""
    params = BASE | {"n_heads": 4, "norm_eps": 1e-6}
    meta = write_meta(tmp_path / "llama" / "7B", params, meta_weights(params, VOCAB), 1)
    for out, said in ((meta, "is the META_DIR folder"), (meta.parent, "holds the META_DIR folder")):
        assert main(["convert", str(meta), str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"OUT_DIR {out} {said}" in err and "choose a new folder" in err and "delete" not in err
    assert sorted(p.name for p in meta.iterdir()) == ["consolidated.00.pth", "params.json"]


def test_peak_memory_stays_under_three_quarters_of_the_model(tmp_path):
    """A 150 MB float16 checkpoint in 2 shards: the converter's peak RSS above idle must stay under 0.75x."""
    params = {
        "dim": 1024,
        "n_layers": 6,
        "n_heads": 8,
        "multiple_of": 256,
        "norm_eps": 1e-5,
        "vocab_size": -1,
    }
    weights = meta_weights(params, 1000, dtype=torch.float16, random=False)
    size = sum(t.numel() * t.element_size() for t in weights.values())
    meta = write_meta(tmp_path / "meta", params, weights, 2)
    del weights
    job = "from vicuna.weights.convert import convert_meta\nconvert_meta(Path(sys.argv[1]), Path(sys.argv[2]), progress=False)"
    preload = "from transformers import GenerationConfig, LlamaConfig"  # what writing config.json imports
    above_idle = peak_rss_above_idle(job, str(meta), str(tmp_path / "hf"), preload=preload)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert size > 140e6
    assert above_idle < 0.75 * size, (
        f"peak RSS {above_idle / 1e6:.0f} MB above idle for a {size / 1e6:.0f} MB model"
    )


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('{"dim": 64,', r"params\.json is not valid JSON"),
        ("[64, 2, 4]", r"params\.json must hold a JSON object"),
        ('{"dim": 64, "n_layers": 2, "n_heads": 5}', r"dim 64 is not a multiple of n_heads 5"),
        ('{"dim": 12, "n_layers": 2, "n_heads": 4}', r"dim / n_heads = 3 is odd, but the rotary embedding"),
        (
            '{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 3}',
            r"n_heads 4 is not a multiple of n_kv_heads 3",
        ),
    ],
)
def test_params_that_no_llama_has_are_refused_before_the_weights_are_read(tmp_path, text, said):
    """A params.json edited by hand (or another model's) is refused naming the field, not with a reshape
    error from the middle of the conversion."""
    params = BASE | {"n_heads": 4, "norm_eps": 1e-6}
    meta = write_meta(tmp_path / "meta", params, meta_weights(params, VOCAB), 1)
    (meta / "params.json").write_text(text)
    with pytest.raises(VicunaError, match=said):
        convert_meta(meta, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_params_that_do_not_describe_the_tensors_are_refused(tmp_path):
    """Shapes alone cannot tell a wrong n_layers (fewer layers than the files hold) or a wrong n_heads (same dim)."""
    params = BASE | {"n_heads": 4, "norm_eps": 1e-6}
    weights = meta_weights(params, VOCAB)
    meta = write_meta(tmp_path / "meta", params, weights, 2)
    out = tmp_path / "out"
    for wrong, message in (
        ({"n_layers": 1}, r"params\.json: n_layers is 1, but the checkpoint has layers 0\.\.1"),
        ({"n_layers": 3}, r"params\.json: n_layers is 3, but the checkpoint has layers 0\.\.1"),
        ({"n_heads": 8}, r"params\.json: n_heads is 8, .* rope\.freqs .* 8 entries, .*n_heads should be 4"),
        ({"n_heads": 2}, r"params\.json: n_heads is 2, .* rope\.freqs .* 8 entries, .*n_heads should be 4"),
        ({"dim": 128}, r"params\.json: dim is 128, but norm\.weight .* has 64 entries"),
    ):
        (meta / "params.json").write_text(json.dumps(params | wrong))
        with pytest.raises(VicunaError, match=message):
            convert_meta(meta, out, progress=False)
    assert not out.exists() and not (tmp_path / "out.partial").exists()

    extra = meta_weights(params | {"n_layers": 3}, VOCAB)  # params.json still says 2 layers
    meta = write_meta(tmp_path / "meta2", params, extra, 1)
    with pytest.raises(VicunaError, match=r"n_layers is 2, but the checkpoint has layers 0\.\.2"):
        convert_meta(meta, out, progress=False)
    meta = write_meta(tmp_path / "meta3", params, weights | {"lm_head.bias": torch.zeros(VOCAB)}, 1)
    with pytest.raises(
        VicunaError, match=r"consolidated\.00\.pth has tensor\(s\) .* does not: lm_head\.bias"
    ):
        convert_meta(meta, out, progress=False)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("multiple_of", "32", "a positive integer"),
        ("norm_eps", "1e-6", "a positive number"),
        ("rope_theta", "x", "a positive number"),
        ("max_seq_len", "2048", "a positive integer"),
        ("ffn_dim_multiplier", "1.3", "a positive number"),
        ("norm_eps", -1e-6, "a positive number"),
        ("max_seq_len", 2048.5, "a positive integer"),
        ("n_kv_heads", 0, "a positive integer"),
        ("vocab_size", 0, "a positive integer, or -1"),
        ("dim", True, "a positive integer"),
        ("use_scaled_rope", "yes", "true or false"),
    ],
)
def test_params_fields_are_checked_before_anything_is_written(tmp_path, field, value, expected):
    params = BASE | {"n_heads": 4, "norm_eps": 1e-6}
    meta = write_meta(tmp_path / "meta", params, meta_weights(params, VOCAB, random=False), 1)
    (meta / "params.json").write_text(json.dumps(params | {field: value}))
    message = rf"{meta / 'params.json'}: field '{field}' must be {expected}.*, found {value!r}"
    with pytest.raises(VicunaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        convert_meta(meta, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_nulls_mean_the_defaults_and_context_length_must_be_positive(tmp_path, capsys):
    params = BASE | {"n_heads": 4, "norm_eps": 1e-6}
    meta = write_meta(tmp_path / "meta", params, meta_weights(params, VOCAB, random=False), 1)
    nulls = dict.fromkeys(("n_kv_heads", "ffn_dim_multiplier", "rope_theta", "max_seq_len", "vocab_size"))
    (meta / "params.json").write_text(json.dumps(params | nulls))
    assert main(["convert", str(meta), str(tmp_path / "out"), "--context-length", "-5", "--no-progress"]) == 2
    assert "--context-length must be a positive number of tokens, not -5" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    out = convert_meta(meta, tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert (config["rope_parameters"]["rope_theta"], config["max_position_embeddings"]) == (10000.0, 2048)


def test_a_missing_or_empty_shard_is_named(tmp_path):
    params = BASE | {"n_heads": 8, "norm_eps": 1e-5}
    meta = write_meta(tmp_path / "meta", params, meta_weights(params, VOCAB, random=False), 4)
    for i in (3, 2):
        (meta / f"consolidated.{i:02d}.pth").unlink()
    with pytest.raises(
        VicunaError,
        match=r"has 2 shard\(s\) \(consolidated\.00\.pth, consolidated\.01\.pth\), but .* so the model has 4 "
        r"shard\(s\): consolidated\.02\.pth, consolidated\.03\.pth look\(s\) missing",
    ):
        convert_meta(meta, tmp_path / "out", progress=False)
    (meta / "consolidated.01.pth").write_bytes(b"")
    with pytest.raises(VicunaError, match=r"consolidated\.01\.pth is empty \(0 bytes\)"):
        convert_meta(meta, tmp_path / "out", progress=False)


def test_a_shard_of_another_model_is_named_not_params_json(tmp_path):
    """consolidated.01.pth of a model with other heads (copied over, no checklist to catch it) was blamed on
    params.json: "n_heads should be 8", which the first file and the weights' shapes all contradict."""
    params = BASE | {"n_heads": 4, "norm_eps": 1e-6}
    meta = write_meta(tmp_path / "meta", params, meta_weights(params, VOCAB), 2)
    other = write_meta(tmp_path / "other", params | {"n_heads": 8}, meta_weights(params, VOCAB), 2)
    (other / "consolidated.01.pth").replace(meta / "consolidated.01.pth")
    with pytest.raises(VicunaError) as odd:
        convert_meta(meta, tmp_path / "out", progress=False)
    assert str(odd.value).startswith(
        f"{meta / 'consolidated.01.pth'}: rope.freqs has 4 entries, for heads of 8"
    )
    assert str(odd.value).endswith(
        "and consolidated.00.pth make heads of 16: consolidated.01.pth is a file of another model; download it "
        "again"
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_checklist_md5_sums_are_checked(tmp_path, capsys):
    params = BASE | {"n_heads": 4, "norm_eps": 1e-6}
    meta = write_meta(tmp_path / "meta", params, meta_weights(params, VOCAB), 2)
    checklist = write_checklist(meta)
    shard = meta / "consolidated.01.pth"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the tensors' bytes: torch still loads it
    shard.write_bytes(bytes(data))
    with pytest.raises(VicunaError, match=rf"{shard} has md5 \w{{32}}: not the md5 {checklist} lists"):
        convert_meta(meta, tmp_path / "out", progress=False)

    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["convert", str(meta), str(tmp_path / "out")]) == 0
    assert f"md5 {meta.name}" in capsys.readouterr().err  # the progress bar while hashing

    checklist.write_text(checklist.read_text().replace("params.json", "other.json"))
    with pytest.raises(VicunaError, match=r"checklist\.chk has no md5 for params\.json"):
        convert_meta(meta, tmp_path / "out2", progress=False)
    write_checklist(meta)
    shard.unlink()
    with pytest.raises(VicunaError, match=r"checklist\.chk lists consolidated\.01\.pth, not in .*incomplete"):
        convert_meta(meta, tmp_path / "out2", progress=False)


def test_files_download_llama_verified_are_not_hashed_again(tmp_path, monkeypatch):
    params = BASE | {"n_heads": 4, "norm_eps": 1e-6}
    meta = write_meta(tmp_path / "llama" / "llama-2-7b", params, meta_weights(params, VOCAB), 2)
    sums = meta_download.parse_checklist(write_checklist(meta))
    for name, md5 in sums.items():
        meta_download.mark_verified(meta / name, md5)
    hashed = []
    real_md5_of = meta_download.md5_of
    monkeypatch.setattr(
        meta_download, "md5_of", lambda path, advance: hashed.append(path.name) or real_md5_of(path)
    )

    convert_meta(meta, tmp_path / "a", progress=False)
    assert hashed == []
    stat = (meta / "consolidated.01.pth").stat()
    os.utime(meta / "consolidated.01.pth", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # written since
    convert_meta(meta, tmp_path / "b", progress=False)
    assert hashed == ["consolidated.01.pth"]


def test_a_rerun_does_not_hash_the_files_an_earlier_run_verified(tmp_path, monkeypatch):
    """Meta's own download script leaves no record of its md5 check: the first convert hashes the files, and
    a rerun (after an interruption, or for another dtype) goes straight to work unless a file changed."""
    params = BASE | {"n_heads": 4, "norm_eps": 1e-6}
    meta = write_meta(tmp_path / "meta", params, meta_weights(params, VOCAB), 2)
    write_checklist(meta)
    hashed = []
    real_md5_of = meta_download.md5_of
    monkeypatch.setattr(
        meta_download, "md5_of", lambda path, advance: hashed.append(path.name) or real_md5_of(path)
    )

    convert_meta(meta, tmp_path / "a", progress=False)
    assert sorted(hashed) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    hashed.clear()
    convert_meta(meta, tmp_path / "b", dtype="bfloat16", progress=False)
    assert hashed == []

    data = bytearray((meta / "consolidated.00.pth").read_bytes())
    data[len(data) // 2] ^= 0xFF  # damaged since: its mtime changed, so it is hashed and refused
    (meta / "consolidated.00.pth").write_bytes(bytes(data))
    with pytest.raises(VicunaError, match=r"consolidated\.00\.pth has md5 \w{32}: not the md5"):
        convert_meta(meta, tmp_path / "c", progress=False)
    assert hashed == ["consolidated.00.pth"]

    def read_only(path, md5):
        raise PermissionError(13, "Permission denied", str(path))

    data[len(data) // 2] ^= 0xFF
    (meta / "consolidated.00.pth").write_bytes(bytes(data))
    monkeypatch.setattr(meta_download, "mark_verified", read_only)  # a META_DIR it cannot write to
    convert_meta(meta, tmp_path / "c", progress=False)
    assert (tmp_path / "c" / "model.safetensors.index.json").is_file()


def test_the_files_that_match_are_recorded_when_another_is_refused(tmp_path, monkeypatch):
    """A damaged file is fetched again and convert run again: only that file is hashed then, not every
    file of the checkpoint (130 GB for 65B) a second time."""
    params = BASE | {"n_heads": 4, "norm_eps": 1e-6}
    meta = write_meta(tmp_path / "meta", params, meta_weights(params, VOCAB), 2)
    write_checklist(meta)
    shard = meta / "consolidated.01.pth"
    good = shard.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(VicunaError, match=r"consolidated\.01\.pth has md5 \w{32}: not the md5"):
        convert_meta(meta, tmp_path / "out", progress=False)

    hashed = []
    real_md5_of = meta_download.md5_of
    monkeypatch.setattr(
        meta_download, "md5_of", lambda path, advance: hashed.append(path.name) or real_md5_of(path)
    )
    shard.write_bytes(good)  # fetched again
    convert_meta(meta, tmp_path / "out", progress=False)
    assert hashed == ["consolidated.01.pth"]
