"""`vicuna convert`: Meta's original LLaMA checkpoint (params.json + consolidated.NN.pth) to a Hugging Face
LlamaForCausalLM folder, streamed one tensor at a time from memory-mapped shards."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

from vicuna.errors import VicunaError
from vicuna.shell import quote

DTYPES = ("float16", "bfloat16", "float32")
# Meta's name -> HF's name for each layer's tensors, and how model parallelism split them: column-parallel
# weights on dim 0, row-parallel ones on dim 1, norms replicated (None).
_LAYER_TENSORS = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_REQUIRED = ("dim", "n_layers", "n_heads")
# What params.json's `use_scaled_rope: true` means: Meta's published values for Llama 3.1, over an 8192-token
# window trained on; its window with them is 131072 tokens.
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
LLAMA3_SCALED_WINDOW = 131072


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


# What each params.json field the converter reads must hold; null or absent means LLaMA's default, except for
# the _REQUIRED ones.
_FIELDS = {
    "dim": ("a positive integer", _positive_int),
    "n_layers": ("a positive integer", _positive_int),
    "n_heads": ("a positive integer", _positive_int),
    "n_kv_heads": ("a positive integer", _positive_int),
    "multiple_of": ("a positive integer", _positive_int),
    "ffn_dim_multiplier": ("a positive number", _positive_number),
    "norm_eps": ("a positive number", _positive_number),
    "rope_theta": ("a positive number", _positive_number),
    "max_seq_len": ("a positive integer", _positive_int),
    "vocab_size": ("a positive integer, or -1", lambda v: v == -1 or _positive_int(v)),
    "use_scaled_rope": ("true or false", lambda v: isinstance(v, bool)),
}


def _read_params(meta_dir: Path) -> dict:
    path = meta_dir / "params.json"
    if not path.is_file():
        # the download folder (tokenizer.model, 7B/, 13B/) given instead of one model's folder
        inside = sorted(p.parent for p in meta_dir.glob("*/params.json"))
        hint = f"; its model folders: {', '.join(quote(str(p)) for p in inside)}" if inside else ""
        raise VicunaError(
            f"{path} does not exist: META_DIR must hold Meta's params.json and consolidated.*.pth{hint}"
        )
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise VicunaError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(params, dict):
        raise VicunaError(f"{path} must hold a JSON object")
    for field, (what, fits) in _FIELDS.items():
        value = params.get(field)
        if (value is not None or field in _REQUIRED) and not fits(value):
            quoted = " (a JSON number, without quotes)" if isinstance(value, str) else ""
            raise VicunaError(f"{path}: field {field!r} must be {what}{quoted}, found {value!r}")
    if params["dim"] % params["n_heads"]:
        raise VicunaError(f"{path}: dim {params['dim']} is not a multiple of n_heads {params['n_heads']}")
    if params["dim"] // params["n_heads"] % 2:
        raise VicunaError(
            f"{path}: dim / n_heads = {params['dim'] // params['n_heads']} is odd, but the rotary embedding "
            "turns the head's values in pairs"
        )
    n_kv = params.get("n_kv_heads") or params["n_heads"]
    if params["n_heads"] % n_kv:
        raise VicunaError(f"{path}: n_heads {params['n_heads']} is not a multiple of n_kv_heads {n_kv}")
    return params


def ffn_hidden_size(params: dict) -> int:
    """LLaMA's feed-forward width: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
    hidden = int(2 * 4 * params["dim"] / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple_of = params.get("multiple_of") or 256
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def find_tokenizer(meta_dir: Path, tokenizer: Path | None) -> Path | None:
    """`--tokenizer` (a file, or a folder with tokenizer.model), else META_DIR's or its parent's tokenizer.model."""
    if tokenizer is not None:
        path = Path(tokenizer)
        path = path / "tokenizer.model" if path.is_dir() else path
        if not path.is_file():
            raise VicunaError(f"--tokenizer: {path} does not exist")
        return path
    for folder in (meta_dir, meta_dir.parent):
        if (folder / "tokenizer.model").is_file():
            return folder / "tokenizer.model"
    return None


def _to_half_split(weight, n_heads: int):
    """Reorder wq/wk rows from Meta's rotary layout (pairs 2i, 2i+1 rotate together) to HF's (i and
    i + head_dim/2 rotate together, as rotate_half expects)."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _check_checklist(meta_dir: Path, paths: list[Path], *, progress: bool) -> None:
    """Check `paths` against the md5 sums of Meta's checklist.chk in `meta_dir`, when there is one. Files that
    download-llama or an earlier convert verified and that have not changed since are not hashed again: a
    rerun after an interruption would otherwise read the whole checkpoint again (26 GB for 13B) before
    resuming."""
    from vicuna.weights.manifest import progress_bar
    from vicuna.weights.meta_download import mark_verified, md5_of, parse_checklist, verified_md5s

    checklist = meta_dir / "checklist.chk"
    if not checklist.is_file():
        return
    sums = parse_checklist(checklist)
    missing = [name for name in sums if name.endswith(".pth") and not (meta_dir / name).is_file()]
    if missing:
        raise VicunaError(
            f"{checklist} lists {', '.join(missing)}, not in {meta_dir}: the download is incomplete"
        )
    for path in paths:
        if path.name not in sums:
            raise VicunaError(
                f"{checklist} has no md5 for {path.name}; is it the checklist of this checkpoint?"
            )
    verified = verified_md5s(meta_dir)
    todo = [path for path in paths if verified.get(path.name) != sums[path.name]]
    total = sum(path.stat().st_size for path in todo)
    with progress_bar(f"md5 {meta_dir.name}", total, enabled=progress and bool(todo)) as advance:
        found = {path.name: md5_of(path, advance) for path in todo}
    for name, md5 in found.items():
        if md5 == sums[name]:  # also when another file is refused: the rerun after it is fetched again
            with contextlib.suppress(OSError):  # a read-only META_DIR: checked again next time
                mark_verified(meta_dir / name, md5)
    wrong = [f"{meta_dir / name} has md5 {md5}" for name, md5 in found.items() if md5 != sums[name]]
    if wrong:
        raise VicunaError(
            f"{'; '.join(wrong)}: not the md5 {checklist} lists, so the file is damaged or incomplete; "
            "download it again"
        )


def _shard_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from vicuna.weights.checkpoint import load_pth

    if path.stat().st_size == 0:
        raise VicunaError(f"{path} is empty (0 bytes): its download did not finish; download it again")
    return {name: tuple(t.shape) for name, t in load_pth(path).items()}


class _MetaShards:
    """The consolidated.NN.pth files, memory-mapped on first use and dropped by release()."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self._states: list[dict] | None = None

    def parts(self, name: str) -> list:
        from vicuna.weights.checkpoint import load_pth

        if self._states is None:
            self._states = [load_pth(path) for path in self.paths]
        return [state[name] for state in self._states]

    def release(self) -> None:
        self._states = None


def _write_tokenizer(tokenizer: Path, folder: Path) -> None:
    """Convert tokenizer.model into transformers' LLaMA tokenizer, adding BOS: ids are SentencePiece's with BOS
    first, except that transformers 5 adds no extra "▁" to a text that already starts with a space."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(tokenizer, Path(tmp) / "tokenizer.model")
        try:
            tok = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False)
        except Exception as err:  # sentencepiece/protobuf raise assorted errors for a wrong file
            raise VicunaError(f"{tokenizer} is not a SentencePiece tokenizer model: {err}") from err
    tok.save_pretrained(folder)
    shutil.copyfile(tokenizer, folder / "tokenizer.model")


def _sentencepiece_ids(tokenizer: Path | None) -> tuple[int, int, int | None]:
    """(bos, eos, vocab size) of tokenizer.model; LLaMA's 1 and 2 without one."""
    if tokenizer is None:
        return 1, 2, None
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    except Exception as err:
        raise VicunaError(f"{tokenizer} is not a SentencePiece tokenizer model: {err}") from err
    return sp.bos_id(), sp.eos_id(), sp.get_piece_size()


def convert_meta(
    meta_dir: Path,
    out_dir: Path,
    *,
    tokenizer: Path | None = None,
    dtype: str = "float16",
    progress: bool = True,
    context_length: int | None = None,
) -> Path:
    """Convert Meta's checkpoint in `meta_dir` to a Hugging Face LlamaForCausalLM folder `out_dir`.

    Peak memory is a few output shards (a twentieth of the model each), not the model: the `.pth` files are
    memory-mapped and each output tensor is assembled from its model-parallel slices on its own."""
    import torch

    from vicuna.weights.checkpoint import TensorSpec, check_apart, file_fingerprint, notice, write_checkpoint

    meta_dir, out_dir = Path(meta_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise VicunaError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if context_length is not None and context_length <= 0:
        raise VicunaError(f"--context-length must be a positive number of tokens, not {context_length}")
    if not meta_dir.is_dir():
        raise VicunaError(f"{meta_dir} is not a folder")
    check_apart(out_dir, "OUT_DIR", {"META_DIR": meta_dir})
    params = _read_params(meta_dir)
    params_path = meta_dir / "params.json"
    paths = sorted(meta_dir.glob("consolidated.*.pth"))
    if not paths:
        raise VicunaError(f"no consolidated.*.pth files in {meta_dir}")
    expected = [f"consolidated.{i:02d}.pth" for i in range(len(paths))]
    if [p.name for p in paths] != expected:
        raise VicunaError(
            f"{meta_dir} has {', '.join(p.name for p in paths)}; expected {', '.join(expected)}"
        )
    _check_checklist(meta_dir, [*paths, params_path], progress=progress)
    tokenizer_path = find_tokenizer(meta_dir, tokenizer)
    bos, eos, tokenizer_vocab = _sentencepiece_ids(tokenizer_path)

    n = len(paths)
    dim, n_layers, n_heads = params["dim"], params["n_layers"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    head_dim = dim // n_heads
    ffn = ffn_hidden_size(params)
    # Every shard is opened (and mapped, not read) up front: a damaged file stops the job before it starts.
    shard_shapes = [_shard_shapes(path) for path in paths]
    shapes = shard_shapes[0]
    for name in (
        "tok_embeddings.weight",
        "norm.weight",
        "layers.0.attention.wq.weight",
        "layers.0.feed_forward.w1.weight",
    ):
        if name not in shapes:
            raise VicunaError(f"{paths[0]} has no tensor {name}: it is not a LLaMA checkpoint")
    if shapes["norm.weight"] != (dim,):
        raise VicunaError(
            f"{params_path}: dim is {dim}, but norm.weight in {paths[0]} has "
            f"{'x'.join(map(str, shapes['norm.weight']))} entries"
        )
    # wq is split across its dim rows: the slice in each file says how many files the model was split into.
    wq_rows = shapes["layers.0.attention.wq.weight"][0]
    if wq_rows and wq_rows * n != dim and dim % wq_rows == 0:
        names = ", ".join(p.name for p in paths)
        lacking = [f"consolidated.{i:02d}.pth" for i in range(n, dim // wq_rows)]
        raise VicunaError(
            f"{meta_dir} has {n} shard(s) ({names}), but layers.0.attention.wq.weight in {paths[0].name} holds "
            f"{wq_rows} of its {dim} rows, so the model has {dim // wq_rows} shard(s)"
            + (f": {', '.join(lacking)} look(s) missing" if lacking else "")
        )
    # LLaMA 1/2 split the embedding across its columns (ParallelEmbedding), LLaMA 3 across its rows.
    emb_rows, emb_cols = shapes["tok_embeddings.weight"]
    if emb_cols * n == dim and n > 1:
        embed_dim, vocab = 1, emb_rows
    elif emb_cols == dim:
        embed_dim, vocab = 0, emb_rows * n
    else:
        raise VicunaError(
            f"{paths[0]}: tok_embeddings.weight is {emb_rows}x{emb_cols}, which does not fit dim {dim}"
        )
    if params.get("vocab_size", -1) not in (-1, None, vocab):
        raise VicunaError(
            f"{params_path}: vocab_size is {params['vocab_size']} but the embedding has {vocab} rows"
        )
    if shapes["layers.0.feed_forward.w1.weight"][0] * n != ffn:
        raise VicunaError(
            f"{params_path}: multiple_of/ffn_dim_multiplier give a feed-forward width of {ffn}, but "
            f"layers.0.feed_forward.w1.weight in {paths[0]} has {shapes['layers.0.feed_forward.w1.weight'][0]} "
            f"rows ({n} shard(s))"
        )
    # Meta's files carry rope.freqs, head_dim/2 rotary frequencies: the head size, which no weight's shape shows
    # when n_kv_heads = n_heads.
    for path, found in zip(paths, shard_shapes, strict=True):
        freqs = math.prod(found.get("rope.freqs", (head_dim // 2,)))
        # past the first file, which agrees with params.json, a mismatch is the file's: one of another model
        if freqs != head_dim // 2 and path != paths[0]:
            raise VicunaError(
                f"{path}: rope.freqs has {freqs} entries, for heads of {2 * freqs} values, but {params_path} and "
                f"{paths[0].name} make heads of {head_dim}: {path.name} is a file of another model; download it again"
            )
        if freqs != head_dim // 2:
            fix = f": n_heads should be {dim // (2 * freqs)}" if freqs and dim % (2 * freqs) == 0 else ""
            raise VicunaError(
                f"{params_path}: n_heads is {n_heads}, which makes heads of dim/n_heads = {head_dim} values, but "
                f"rope.freqs in {path} has {freqs} entries, for heads of {2 * freqs}{fix}"
            )
    layers = sorted({int(m[1]) for name in shapes if (m := re.match(r"layers\.(\d+)\.", name))})
    if layers[-1] + 1 != n_layers:
        raise VicunaError(
            f"{params_path}: n_layers is {n_layers}, but the checkpoint has layers 0..{layers[-1]}"
        )
    if tokenizer_vocab is not None and tokenizer_vocab != vocab:
        notice(f"{tokenizer_path} has {tokenizer_vocab} tokens but the embedding has {vocab} rows")

    torch_dtype = getattr(torch, dtype)
    # name -> (Meta name, split dim or None, heads for the rotary permutation or None)
    recipes: dict[str, tuple[str, int | None, int | None]] = {
        "model.embed_tokens.weight": ("tok_embeddings.weight", embed_dim, None)
    }
    shapes_out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, dim)}
    layer_shapes = {
        "attention.wq.weight": (n_heads * head_dim, dim),
        "attention.wk.weight": (n_kv * head_dim, dim),
        "attention.wv.weight": (n_kv * head_dim, dim),
        "attention.wo.weight": (dim, n_heads * head_dim),
        "feed_forward.w1.weight": (ffn, dim),
        "feed_forward.w3.weight": (ffn, dim),
        "feed_forward.w2.weight": (dim, ffn),
        "attention_norm.weight": (dim,),
        "ffn_norm.weight": (dim,),
    }
    for i in range(n_layers):
        for meta_name, (hf_name, split) in _LAYER_TENSORS.items():
            heads = {"attention.wq.weight": n_heads, "attention.wk.weight": n_kv}.get(meta_name)
            recipes[f"model.layers.{i}.{hf_name}"] = (f"layers.{i}.{meta_name}", split, heads)
            shapes_out[f"model.layers.{i}.{hf_name}"] = layer_shapes[meta_name]
    recipes["model.norm.weight"] = ("norm.weight", None, None)
    shapes_out["model.norm.weight"] = (dim,)
    recipes["lm_head.weight"] = ("output.weight", 0, None)
    shapes_out["lm_head.weight"] = (vocab, dim)
    specs = [TensorSpec(name, shapes_out[name], torch_dtype) for name in recipes]
    for name, (meta_name, split, _) in recipes.items():  # check every slice now, not hours in
        expected = list(shapes_out[name])
        if split is not None:
            expected[split] //= n
        for path, found in zip(paths, shard_shapes, strict=True):
            if found.get(meta_name) != tuple(expected):
                size = "x".join(map(str, found[meta_name])) if meta_name in found else "missing"
                raise VicunaError(
                    f"{path}: tensor {meta_name} is {size}, but params.json and {n} shard(s) imply "
                    f"{'x'.join(map(str, expected))}"
                )
    wanted = {meta_name for meta_name, _, _ in recipes.values()} | {"rope.freqs"}
    for path, found in zip(paths, shard_shapes, strict=True):
        if unknown := sorted(set(found) - wanted):
            raise VicunaError(
                f"{path} has tensor(s) that a LLaMA model as {params_path} describes does not: "
                f"{', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}"
            )

    shards = _MetaShards(paths)

    def make(spec: TensorSpec):
        meta_name, split, heads = recipes[spec.name]
        parts = shards.parts(meta_name)
        tensor = parts[0] if split is None or n == 1 else torch.cat(parts, dim=split)
        if heads is not None:
            tensor = _to_half_split(tensor, heads)
        return tensor.to(torch_dtype)

    def extras(folder: Path) -> None:
        from transformers import GenerationConfig, LlamaConfig

        norm_eps = params.get("norm_eps") or 1e-5
        scaled = params.get("use_scaled_rope")
        rope = {"rope_type": "default"} | (LLAMA3_ROPE_SCALING if scaled else {})
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=dim,
            intermediate_size=ffn,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=norm_eps,
            rope_parameters=rope | {"rope_theta": float(params.get("rope_theta") or 10000.0)},
            # params.json rarely says; LLaMA 1 (norm_eps 1e-6) was trained on 2048 tokens, LLaMA 2 on 4096.
            max_position_embeddings=context_length
            or params.get("max_seq_len")
            or (LLAMA3_SCALED_WINDOW if scaled else 2048 if norm_eps <= 1e-6 else 4096),
            bos_token_id=bos,
            eos_token_id=eos,
            tie_word_embeddings=False,
            architectures=["LlamaForCausalLM"],
            dtype=dtype,
        )
        config.save_pretrained(folder)
        GenerationConfig(bos_token_id=bos, eos_token_id=eos).save_pretrained(folder)
        if tokenizer_path is not None:
            _write_tokenizer(tokenizer_path, folder)

    inputs = [*paths, meta_dir / "params.json", *([tokenizer_path] if tokenizer_path else [])]
    write_checkpoint(
        out_dir,
        specs,
        make,
        fingerprint={"job": "convert", "dtype": dtype, "inputs": file_fingerprint(inputs)},
        release=shards.release,
        extras=extras,
        description=f"convert {meta_dir.name}",
        progress=progress,
    )
    if tokenizer_path is None:
        notice(
            f"no tokenizer.model in {meta_dir} or {meta_dir.parent}: converted the weights only; "
            "pass --tokenizer PATH to add the tokenizer"
        )
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "meta_dir", type=Path, metavar="META_DIR", help="folder with params.json and consolidated.*.pth"
    )
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the Hugging Face folder to create")
    parser.add_argument(
        "--tokenizer", type=Path, help="tokenizer.model (default: the one in META_DIR or its parent)"
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float16", help="dtype of the saved weights")
    parser.add_argument(
        "--context-length",
        type=int,
        help="max_position_embeddings (default: params.json's max_seq_len, else 2048 for LLaMA 1, 4096 for LLaMA 2, "
        "131072 for LLaMA 3.1's use_scaled_rope)",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not draw progress bars")


def main(args: argparse.Namespace) -> int:
    out = convert_meta(
        args.meta_dir,
        args.out_dir,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        progress=not args.no_progress,
        context_length=args.context_length,
    )
    print(f"converted {args.meta_dir} to {out}")
    return 0
