"""Checkpoint folders on disk, one tensor at a time: read any Hugging Face checkpoint (safetensors or `.bin`,
with or without an index) and write sharded safetensors with an index, one shard at a time, into a staging
folder `OUT.partial` that is renamed to `OUT` only once it is complete and has its sha256 manifest.

Memory stays bounded because inputs are memory-mapped and the mappings are dropped after every output shard:
pages of a mapped file that were read count in the process's RSS until the mapping goes away."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import sys
import zipfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vicuna.errors import ModelLoadError, VicunaError
from vicuna.shell import quote
from vicuna.weights import disk
from vicuna.weights.disk import ensure_free_space, new_file_mode, one_writer, set_mode, write_atomically
from vicuna.weights.manifest import MANIFEST_NAME, progress_bar, sha256_of, write_manifest

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack", ".gguf")
PLAN_NAME = ".vicuna-plan.json"
FILES_SLACK = 16 << 20  # beyond the tensors' bytes: shard headers, the index, the manifest
# Output shards hold a twentieth of the model (at least MIN_SHARD_BYTES, at most MAX_SHARD_BYTES): while a
# shard is built, memory holds it and the input pages it was made from (twice those for a delta's two
# inputs; safetensors 0.8 writes from the tensors, where older ones also made a serialized copy), which
# stays well under the model's size (measured: 0.12-0.17x for convert, 0.20x for delta apply).
MIN_SHARD_BYTES = 8 << 20
MAX_SHARD_BYTES = 2 << 30
# safetensors' dtype codes, as get_slice().get_dtype() names them.
_SAFE_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def notice(message: str) -> None:
    """Something the user should know that is not an error."""
    print(f"notice: {message}", file=sys.stderr)


def is_skipped(name: str) -> bool:
    """Buffers some old `.bin` checkpoints carry that are recomputed on load, not weights."""
    return name.endswith("rotary_emb.inv_freq")


def file_fingerprint(paths: Iterable[Path]) -> list[list[Any]]:
    """Path, size and mtime of each input: enough to tell whether a resumed job has the same inputs."""
    return [[str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns] for p in paths]


LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def check_not_lfs_pointer(path: Path) -> None:
    """Refuse a Git LFS pointer in place of a weight file: what `git clone` leaves of a Hugging Face
    repository when git-lfs is not installed (the tutorial's `git lfs clone` without `git lfs install`)."""
    with open(path, "rb") as f:
        if f.read(len(LFS_POINTER)) != LFS_POINTER:
            return
    raise ModelLoadError(
        f"{path} is a Git LFS pointer ({path.stat().st_size} bytes of text), not the weights: the repository "
        f"was cloned without git-lfs. Install git-lfs, then in {path.parent} run `git lfs install && git lfs "
        "pull`; or download the repository with `vicuna download REPO_ID`"
    )


def check_safetensors_header(path: Path) -> None:
    """Refuse a safetensors file that ends inside its header (a download or copy that stopped in its first
    bytes), saying so: read as it is, it is "not a valid safetensors file", or safetensors' "Error while
    deserializing header", which sends a user looking for a format problem rather than rerunning the job.
    A header starts with its length, 8 bytes, then a JSON object ('{'); a file of other bytes is left to the
    readers to refuse as not safetensors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = f.read(9)
    declared = 8 + int.from_bytes(start[:8], "little")
    # safetensors refuses headers over 100 MB: a larger length is other bytes, not a header cut short
    if len(start) < 8 or (declared > size and declared <= 8 + 100_000_000 and start[8:] in (b"{", b"")):
        raise ModelLoadError(
            f"{path}: cut short: {size} bytes on disk, where its header alone takes "
            + (f"{declared}" if len(start) == 9 else "more")
            + "; download it again, or rerun the job that wrote it"
        )


def load_pth(path: Path) -> dict[str, torch.Tensor]:
    """A `torch.save`d state dict, memory-mapped (nothing is read until a tensor's data is used)."""
    check_not_lfs_pointer(path)
    try:
        with open(path, "rb") as f:
            start = f.read(2)
        if not start:
            raise ValueError("it is empty (0 bytes)")
        if start == b"PK" and not zipfile.is_zipfile(path):
            raise ValueError("its zip directory is missing")
        if start == b"PK":
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        elif start[:1] == b"\x80":  # a pickle: files saved before torch 1.6, which cannot be mapped
            notice(f"{path} uses PyTorch's legacy format and is read whole into memory")
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"it starts with {start!r}, neither a zip archive (PK) nor a pickle (0x80)")
    except OSError:
        raise
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError... for damaged files
        reason = str(err) or type(err).__name__
        raise VicunaError(
            f"cannot read {path}: {reason}. The file is damaged or incomplete: download it again"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VicunaError(f"{path} is not a state dict of tensors")
    return state


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor: its name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


class CheckpointReader:
    """The tensors of a Hugging Face checkpoint folder, read one at a time from memory-mapped files.

    Safetensors are preferred when a folder has both kinds. Call `release()` to drop the mappings (and
    the RSS of the pages read so far); later reads map the files again."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise VicunaError(f"{self.folder} is not a folder")
        self.files, index = self._weight_files()
        self.specs: dict[str, TensorSpec] = {}
        self._where: dict[str, Path] = {}
        for path in self.files:
            for spec in self._read_specs(path):
                if spec.name in self._where:
                    raise VicunaError(f"tensor {spec.name} is in both {self._where[spec.name]} and {path}")
                if not is_skipped(spec.name):
                    self.specs[spec.name] = spec
                    self._where[spec.name] = path
        for name, file in (self._weight_map(index) if index else {}).items():
            if not is_skipped(name) and name not in self.specs:
                raise VicunaError(f"{index} says tensor {name} is in {file}, but it is not there")
        self._open: dict[Path, Any] = {}
        self.release()

    def _weight_files(self) -> tuple[list[Path], Path | None]:
        """The weight files, and the index that lists them if there is one."""
        folder = self.folder
        for index in (SAFE_INDEX, BIN_INDEX):
            if (folder / index).is_file():
                weight_map = self._weight_map(folder / index)
                files = [folder / name for name in dict.fromkeys(weight_map.values())]
                for path in files:
                    if not path.is_file():
                        from vicuna.weights.hub import download_command

                        raise VicunaError(
                            f"{folder / index} lists {path.name}, which is not in {folder}: its download was "
                            f"not finished, or the file was deleted; `{download_command(folder)}` fetches it "
                            "(and any other missing file) again"
                        )
                check_all_listed(folder / index, files)
                return files, folder / index
            if index == SAFE_INDEX and (files := sorted(folder.glob("*.safetensors"))):
                return files, None
        files = sorted(folder.glob("pytorch_model*.bin")) or sorted(
            p for p in folder.glob("*.bin") if p.name != "training_args.bin"
        )
        if files:
            return files, None
        hint = (
            " (it looks like a Meta checkpoint: run `vicuna convert` first)"
            if any(folder.glob("*.pth"))
            else ""
        )
        raise VicunaError(f"no weights in {folder}: expected *.safetensors or *.bin files{hint}")

    @staticmethod
    def _weight_map(index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise VicunaError(f"{index} is not a checkpoint index (a JSON object with a weight_map)") from err
        if not isinstance(weight_map, dict):
            raise VicunaError(f"{index}: weight_map must map tensor names to file names")
        return weight_map

    def _read_specs(self, path: Path) -> list[TensorSpec]:
        if path.suffix == ".safetensors":
            handle = self._safe_open(path)
            specs = []
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                part = handle.get_slice(name)
                dtype = _SAFE_DTYPES.get(part.get_dtype())
                if dtype is None:
                    raise VicunaError(
                        f"{path}: tensor {name} has dtype {part.get_dtype()}, which is not supported"
                    )
                specs.append(TensorSpec(name, tuple(part.get_shape()), dtype))
            return specs
        return [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in load_pth(path).items()]

    @staticmethod
    def _safe_open(path: Path) -> Any:
        from safetensors import safe_open

        check_not_lfs_pointer(path)
        check_safetensors_header(path)
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as err:  # SafetensorError is not importable under a stable name
            raise VicunaError(
                f"cannot read {path}: {err}. The file is damaged or incomplete: download it again"
            ) from err

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.specs.values())

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`; it may be a view of a memory-mapped file, so do not modify it in place."""
        path = self._where[name]
        if path not in self._open:
            self._open[path] = self._safe_open(path) if path.suffix == ".safetensors" else load_pth(path)
        handle = self._open[path]
        if path.suffix != ".safetensors":
            return handle[name]
        try:
            return handle.get_tensor(name)
        except Exception as err:
            raise VicunaError(f"cannot read tensor {name} from {path}: {err}") from err

    def release(self) -> None:
        self._open = {}


def check_all_listed(index: Path, listed: Iterable[Path]) -> None:
    """Refuse a single-file checkpoint beside an index that does not list it (`model.safetensors` next to
    `model.safetensors.index.json`): two models in one folder, of which transformers loads the single file
    and an index reader the shards."""
    single = index.parent / index.name.removesuffix(".index.json")
    if single.is_file() and single.name not in {Path(p).name for p in listed}:
        raise VicunaError(
            f"{index.parent} holds {single.name} and {index.name}, which lists other files: two checkpoints in "
            "one folder; move one of them elsewhere"
        )


def check_apart(out: Path, out_flag: str, inputs: dict[str, Path]) -> None:
    """Refuse an output folder that is an input folder ({flag: folder}), lies inside one or holds one: a
    `--target` that named the base was refused as an existing folder "to delete", the base itself, and one
    inside the base was written there, after which the base no longer matched its SHA256SUMS."""
    where = Path(out).resolve()
    for flag, folder in inputs.items():
        folder = Path(folder).resolve()
        if where == folder:
            how = "is"
        elif folder in where.parents:
            how = "is inside"
        elif where in folder.parents:
            how = "holds"
        else:
            continue
        raise VicunaError(
            f"{out_flag} {out} {how} the {flag} folder ({folder}): choose a new folder for {out_flag}, apart "
            "from the inputs"
        )


def side_files(folder: Path) -> list[Path]:
    """Files of a model folder other than weights, indexes and the manifest: config, tokenizer, README..."""
    return sorted(
        p
        for p in Path(folder).iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and not p.name.endswith(WEIGHT_SUFFIXES)
        and p.name not in (SAFE_INDEX, BIN_INDEX, MANIFEST_NAME)
    )


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int | None = None) -> dict[str, list[TensorSpec]]:
    """Group tensors, in order, into files `model-0000i-of-0000n.safetensors`."""
    total = sum(spec.nbytes for spec in specs)
    limit = max_shard_bytes or min(MAX_SHARD_BYTES, max(total // 20, MIN_SHARD_BYTES))
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    n = len(groups)
    return {f"model-{i:05d}-of-{n:05d}.safetensors": group for i, group in enumerate(groups, 1)}


def _return_freed_memory() -> None:
    """glibc keeps freed blocks smaller than 32 MB for reuse, and with tensors of a few MB churning through
    them its heap fragments and RSS creeps up shard after shard; malloc_trim hands the free pages back."""
    if not sys.platform.startswith("linux"):  # no glibc; and Windows' ctypes.CDLL(None) raises TypeError
        return
    with contextlib.suppress(OSError, AttributeError):  # musl: nothing to do
        ctypes.CDLL(None).malloc_trim(0)


def _shard_complete(path: Path, specs: list[TensorSpec]) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return sorted(handle.keys()) == sorted(spec.name for spec in specs)
    except Exception:  # a damaged shard is written again
        return False


def _planned(staging: Path, plan_record: dict) -> bool:
    """Whether `staging` holds a job of `plan_record` (the same inputs, shards and tensors)."""
    try:
        return json.loads((staging / PLAN_NAME).read_text(encoding="utf-8")) == plan_record
    except (OSError, ValueError):
        return False


def _prepare_staging(out: Path, staging: Path, plan_record: dict) -> None:
    """Create `staging`, or keep it when it holds an interrupted run of the same job."""
    marker = staging / PLAN_NAME
    if staging.exists():
        if marker.is_file():
            if _planned(staging, plan_record):
                notice(f"resuming the interrupted job in {staging}")
                # What the interruption cut short: our `.NAME.tmp` files, and the `.tmpXXXXXX` file that
                # safetensors writes a shard to before renaming it to ours (a kill leaves it behind). Hidden
                # files are never listed in the manifest, so one left here would end up in OUT unnoticed.
                for partial in staging.glob(".*"):
                    if partial.name != PLAN_NAME and partial.is_file():
                        partial.unlink()
                return
            notice(f"{staging} holds an interrupted job with other inputs; starting over")
            shutil.rmtree(staging)
        elif any(staging.iterdir()):
            raise VicunaError(f"{staging} exists and was not made by vicuna; move it away or delete it")
    staging.mkdir(parents=True, exist_ok=True)
    write_atomically(marker, json.dumps(plan_record))


def write_checkpoint(
    out: Path,
    specs: list[TensorSpec],
    make: Callable[[TensorSpec], torch.Tensor],
    *,
    fingerprint: Any,
    release: Callable[[], None],
    extras: Callable[[Path], None],
    description: str,
    progress: bool = True,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a Hugging Face checkpoint folder `out`: `make(spec)` builds each tensor, one shard at a time,
    and `release()` runs after each shard so the inputs' mapped pages are let go; `extras(folder)` writes
    config and tokenizer files first. The work happens in `out.partial`, which gets the index and the
    sha256 manifest last and is then renamed to `out`. A re-run with the same `fingerprint` (the inputs)
    keeps the shards an interrupted run finished."""
    out = Path(out)
    staging = out.with_name(out.name + ".partial")
    with one_writer(out, staging):
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            if (out / MANIFEST_NAME).is_file():  # a finished run's: not to be deleted by mistake
                raise VicunaError(
                    f"{out} already exists, finished (`vicuna verify {quote(str(out))}` checks it); to "
                    "make it again, delete it or choose another output folder"
                )
            # not said "delete it": a --target such as `models`, meant as where to put the result, holds others
            held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
            raise VicunaError(
                f"{out} already exists"
                + (f" and holds {', '.join(held[:3])}{', ...' if len(held) > 3 else ''}" if held else "")
                + ": the output needs a new folder of its own (it is made for you); choose another name"
            )
        shards = plan_shards(specs, max_shard_bytes)
        plan_record = {
            "fingerprint": fingerprint,
            "shards": {
                file: [[s.name, list(s.shape), str(s.dtype)] for s in group] for file, group in shards.items()
            },
        }
        if (staging / MANIFEST_NAME).is_file() and _planned(staging, plan_record):
            return _finish(staging, out)  # interrupted as it was renamed: done, from these inputs
        _prepare_staging(out, staging, plan_record)
        extras(staging)
        done = {
            file
            for file, group in shards.items()
            if (staging / file).is_file() and _shard_complete(staging / file, group)
        }
        needed = sum(spec.nbytes for file, group in shards.items() if file not in done for spec in group)
        ensure_free_space(staging, needed + FILES_SLACK, description)

        from safetensors.torch import save_file

        total = sum(spec.nbytes for spec in specs)
        # Each shard is hashed for the manifest as soon as it is written, on another thread (hashlib lets go
        # of the GIL) while the next shard is made, and while its pages are still in the page cache: hashed
        # at the end, the first shards of a model larger than RAM would be read back from disk.
        hashing, digests = ThreadPoolExecutor(max_workers=1), {}
        # a resumed job's kept shards start the bar as done: counted as made now, they showed a rate of
        # hundreds of GB/s and a wrong time left
        with hashing, progress_bar(description, total, enabled=progress, done=total - needed) as advance:
            for file, group in shards.items():
                if file in done:  # kept from the interrupted run: hashed meanwhile, not after the last one
                    digests[file] = hashing.submit(sha256_of, staging / file)
                    continue
                tensors = {}
                for spec in group:
                    tensor = make(spec)
                    if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                        raise RuntimeError(
                            f"{spec.name} came out as {tuple(tensor.shape)} {tensor.dtype}, not {spec}"
                        )
                    tensors[spec.name] = tensor.contiguous()
                    advance(spec.nbytes)
                tmp = staging / f".{file}.tmp"
                try:
                    save_file(tensors, str(tmp), metadata={"format": "pt"})
                except Exception as err:  # safetensors says a full disk with its own error: not an OSError
                    if not (isinstance(err, OSError) or "I/O error" in str(err)):
                        raise
                    tmp.unlink(missing_ok=True)
                    said = str(err)
                    if full := disk.disk_full(err):  # how much more is needed, against what is free
                        left = sum(s.nbytes for f, group in shards.items() if f not in digests for s in group)
                        free = disk.free_bytes(staging)
                        said = f"{full}: {disk.size(left)} still to write, {disk.size(free)} free on its disk"
                    raise VicunaError(
                        f"writing {staging / file} failed ({said}); the shards finished so far are kept in "
                        f"{staging}: free some space and run the same command again to go on"
                    ) from err
                set_mode(tmp, new_file_mode())  # safetensors creates files readable by their owner only
                os.replace(tmp, staging / file)
                digests[file] = hashing.submit(sha256_of, staging / file)
                del tensors, tensor
                release()
                _return_freed_memory()

        index = {
            "metadata": {"total_size": total},
            "weight_map": {s.name: f for f, group in shards.items() for s in group},
        }
        (staging / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        # hidden files (the plan among them) are not listed
        write_manifest(staging, progress=progress, known={file: d.result() for file, d in digests.items()})
        return _finish(staging, out)


def _finish(staging: Path, out: Path) -> Path:
    """Rename the finished `staging` to `out`, and only then remove its plan: until the rename the plan
    says which inputs the folder was made from, so that a job with other inputs cannot take it for its own.
    An empty `out` (made beforehand) goes first: Windows does not rename a folder onto a folder."""
    if out.is_dir():
        out.rmdir()
    os.replace(staging, out)
    (out / PLAN_NAME).unlink(missing_ok=True)
    return out
