"""Our CPU kernel for decoding LLaMA-family models (`kernel.cpp`), called through ctypes.

`product`: float32 rows times a weight matrix stored as bfloat16, float16, float32 or int8 rows with
scales, summed in float32, with the layer's RMSNorm, SiLU gating and residual add in the same call.
`attend`: one decode step's attention for every row of a batch (rotary embedding, KV-cache write,
grouped-query attention over each row's own length). `Step`: both, for every layer, in one call.

Decoding one token reads every weight once, so its products are as fast as the weights stream from
memory, and PyTorch's kernels fall short of that on CPUs without native 16-bit matrix units (AVX2 only).
For one row the kernel reads each thread's share of a weight at four places at once: on a 2-core AVX2
EPYC that streams bfloat16 weights at ~24 GB/s, against ~17 GB/s reading them one row after another and
~20 GB/s for a plain one-stream read of memory. `Step` runs a whole decode step (every layer and the
head) in one call. For many rows (batches, prompts) it multiplies 6x16 float32 tiles at ~100-125
GFLOP/s, 2-5x PyTorch's float32 kernel. Decode attention is 2-2.5x PyTorch's fused kernel. The kernel
reads the model's own tensors, as stored (but see packing below): nothing is copied at load time.

On CPUs with AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake; not those with AMX, where PyTorch's
kernels use the tile units), bfloat16 and int8 weights are multiplied with the CPU's bfloat16 dot
products, each row of x rounded to bfloat16 first as PyTorch rounds it for a bfloat16 product, int8
weights widened to bfloat16 exactly (`dot_bf16`). On a 2-core Zen 5 EPYC the products of a 16-row
decode step of the built-in model take 2.3-2.5x less time than our AVX2 way (bf16 ~8 ms: ~540 GFLOP/s
from memory, against ~300 for PyTorch's oneDNN), one row streams at memory speed as before, and a row's
result does not depend on the rows that share its call, so batched replies match replies computed alone.
There, bfloat16 and int8 weights are also packed in place when the engine loads them (`pack_`: blocks of
16 rows with their values paired side by side, so that each dot product adds to 16 outputs at once and
no sums across a vector's lanes remain): a 16-row step's products then take ~5.5 ms (~800-900 GFLOP/s,
near the CPU's ~1,000 GFLOP/s of dot products), and one to four rows stream as fast as before.

The source is compiled once per machine with the system's C++ compiler (a few seconds) into
$VICUNA_HOME/kernels (on Windows with MinGW's g++, e.g. MSYS2's, its runtime linked in); it runs on
PyTorch's OpenMP threads. On a CPU without AVX2 and FMA, without a
compiler, when the build fails or with VICUNA_KERNEL=0, `load()` answers None and the engine uses
PyTorch's operations.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from vicuna.config import vicuna_home

log = logging.getLogger("vicuna.kernel")

SOURCE = Path(__file__).with_name("kernel.cpp")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
# Windows: MinGW's g++ links its runtime (libgomp, libstdc++, libgcc) as DLLs in its own folder, where
# Python 3.8 and later does not look for a library's dependencies: the build would not load. Linked in.
WINDOWS_FLAGS = ["-static"]
KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.int8: 3}
PACKED = {torch.bfloat16: 4, torch.int8: 5}  # weights in the kernel's blocks (`pack_`)
BLOCK = 16  # weight rows per block
BUILD_TIMEOUT_S = 600
FEW_ROWS = 4  # up to this many rows the kernel streams the weights at memory speed

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
_why_not = ""


def status() -> str:
    """One line on whether the engine decodes on this kernel here, and why not."""
    if load() is not None:
        units = ", AVX512-BF16" if dot_bf16() else ""
        threads = torch.get_num_threads()
        return f"ready ({torch.backends.cpu.get_cpu_capability()}{units}, {threads} thread{'s' * (threads != 1)})"
    return f"not used: {_why_not}; decoding on the CPU uses PyTorch's slower operations"


def runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel multiplies `dtype` tensors on `device` here (it builds on first use)."""
    return device.type == "cpu" and dtype in KINDS and load() is not None


def cpu_supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in (
        "AVX2",
        "AVX512",
    )


def dot_bf16() -> bool:
    """Whether the kernel multiplies bfloat16 and int8 weights with the CPU's AVX512-BF16 dot products (each
    row of x rounded to bfloat16 first, as PyTorch rounds it for a bfloat16 product): on such CPUs without
    AMX."""
    library = load()
    return library is not None and library.vicuna_dot_bf16(-1) == 1


def packs(weight: torch.Tensor) -> bool:
    """Whether the kernel multiplies this weight [n, k] faster packed (`pack_`): bfloat16 or int8 on the CPU
    with an even k, where the kernel uses AVX512-BF16."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in PACKED
        and weight.dim() == 2
        and weight.shape[1] % 2 == 0
        and weight.is_contiguous()
        and dot_bf16()
    )


def pack_(weight: torch.Tensor) -> torch.Tensor:
    """Rearrange a bfloat16 or int8 weight [n, k] in place into the kernel's blocks (`packs(weight)` must hold):
    each block of 16 rows as [k/2][16][2], a pair of values of each of its rows side by side, so that one
    vector load holds the same pair of 16 rows and a dot product adds to 16 outputs at once (see BLOCK in
    kernel.cpp); the rows past the last whole block stay as they are. Rows [16 a, 16 b) of the packed
    tensor are those rows packed. Afterwards only `Weight(weight, packed=True)` reads it correctly."""
    n, k = weight.shape
    if _library.vicuna_pack(PACKED.get(weight.dtype, -1), weight.data_ptr(), n, k):  # a block at a time
        raise ValueError(
            f"pack: the kernel packs bfloat16 and int8 weights of an even width, not {weight.dtype} of {k}"
        )
    return weight


def packed_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of a packed weight [n, k] (`pack_`), as they were before packing: [*ids.shape, k]."""
    n, k = weight.shape
    whole = n // BLOCK * BLOCK
    flat = ids.reshape(-1)
    rows = torch.empty(flat.shape[0], k, dtype=weight.dtype, device=weight.device)
    inside = flat < whole
    blocks = weight[:whole].view(-1, k // 2, BLOCK, 2)  # [block, pair, row in block, value in pair]
    at = flat[inside]
    rows[inside] = blocks[at // BLOCK, :, at % BLOCK].reshape(-1, k)
    rows[~inside] = weight[flat[~inside]]
    return rows.view(*ids.shape, k)


def pytorch_multiplies_natively(dtype: torch.dtype) -> bool:
    """Whether PyTorch's own CPU kernels are the ones to multiply many rows by `dtype` weights here: 16-bit
    weights where the CPU has units for them (AVX-512 BF16/FP16, AMX), as PyTorch decides when it routes
    them to oneDNN, except bfloat16 where our kernel uses AVX512-BF16 itself (`dot_bf16`); float32 where
    the CPU has AVX-512, which our AVX2 kernel does not use. On a 2-core AVX2 EPYC our kernel multiplied
    8-16 float32 rows 1.3-2.5x faster than PyTorch's (the built-in model's 49,152-row head 2.5x), and a
    float32 16-row decode step took 70-81 ms instead of 163-217 ms."""
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported() and not dot_bf16()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return torch.backends.cpu.get_cpu_capability() != "AVX2"


def source_hash() -> str:
    """A short hash of the kernel's source: what it computes, and how fast."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]


def flags() -> list[str]:
    """The compiler's flags here."""
    return FLAGS + (WINDOWS_FLAGS if sys.platform == "win32" else [])


def library_path(compiler: str) -> Path:
    """Where the build for this source, compiler and flags lives."""
    how = hashlib.sha256(" ".join([compiler, *flags()]).encode()).hexdigest()[:8]
    return vicuna_home() / "kernels" / f"vicuna-kernel-{source_hash()}-{how}.so"


class UnwritableFolder(Exception):
    """$VICUNA_HOME/kernels cannot be written (read-only, full, not a folder): no build was tried."""

    def __init__(self, folder: Path, err: OSError) -> None:
        super().__init__(f"cannot write into {folder} ({err.strerror or err})")
        self.folder = folder


def build(compiler: str, progress: bool = True) -> Path:
    """Compile the kernel unless this build exists (written to a temporary name, then renamed)."""
    path = library_path(compiler)
    if path.exists():
        return path
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:  # a read-only or full $VICUNA_HOME is said as such, not as the compiler's failure to write there
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.touch()
    except OSError as err:
        raise UnwritableFolder(path.parent, err) from None
    if progress:
        print("Compiling vicuna's CPU kernel (once for this machine) ...", file=sys.stderr, flush=True)
    for old in path.parent.glob("*.partial"):  # left by a build whose Python was killed: its compiler went on
        with contextlib.suppress(OSError):  # older than a build may take: no compiler is writing it
            if time.time() - old.stat().st_mtime > 2 * BUILD_TIMEOUT_S:
                old.unlink()
    try:
        subprocess.run(
            [compiler, *flags(), str(SOURCE), "-o", str(partial)],
            check=True,
            capture_output=True,
            timeout=BUILD_TIMEOUT_S,
        )
        # Windows replaces no library a process has loaded: there another start that built the same one
        # first and uses it made this rename fail, which was taken for a failed build (kept off for good)
        try:
            os.replace(partial, path)
        except PermissionError:
            if not path.exists():
                raise
    finally:
        partial.unlink(missing_ok=True)
    return path


def open_library(compiler: str, progress: bool = True) -> ctypes.CDLL:
    """The build for this source and compiler, loaded; built first where there is none, or where the one
    there does not load: built on another machine (a $VICUNA_HOME shared over the network or copied, its
    compiler's runtime not here) or cut short by a crash. That one was taken for a failed build here, kept
    off for good, and deleting the .failed file, as the warning said, only brought the warning back."""
    path = library_path(compiler)
    if path.exists():
        try:
            return open_built(path)
        except OSError:
            with contextlib.suppress(OSError):  # built again below; a library that stays is said as failed
                path.unlink()
    return open_built(build(compiler, progress))


def open_built(path: Path) -> ctypes.CDLL:
    """Load the library at `path`; where its filesystem is mounted noexec (a container's volume, a shared
    home), from a copy in memory: the kernel was built there, failed to load ("failed to map segment from
    shared object"), and was kept off for good as a failed build."""
    try:
        return ctypes.CDLL(str(path))
    except OSError as err:
        if "failed to map segment" not in str(err) or not hasattr(os, "memfd_create"):
            raise
    fd = os.memfd_create(path.name)  # Linux's: files in memory, on no filesystem's mount options
    try:
        with open(fd, "wb", closefd=False) as copy:
            copy.write(path.read_bytes())
        return ctypes.CDLL(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)  # the library stays mapped


def load(progress: bool = True) -> ctypes.CDLL | None:
    """The kernel library, built on first use; None where it cannot run or be built (said once, and
    kept for `status()`)."""
    global _library, _tried, _why_not
    with _lock:
        if _tried:
            return _library
        _tried = True
        if os.environ.get("VICUNA_KERNEL", "1") == "0":
            _why_not = "turned off (VICUNA_KERNEL=0)"
            return None
        if not cpu_supported():
            _why_not = "needs an x86-64 CPU with AVX2"
            return None
        compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if compiler is None:
            _why_not = "no C++ compiler found (install g++)"
            said = vicuna_home() / "kernels" / "no-compiler-said"  # said once, not on every start
            if not said.exists():
                log.warning("%s: decoding on the CPU uses PyTorch's slower operations", _why_not)
                with contextlib.suppress(OSError):
                    said.parent.mkdir(parents=True, exist_ok=True)
                    said.touch()
            return None
        # a compiler that refuses the source or its flags, or a build that does not load, is said once, not
        # tried again and said on every start (Apple's clang has no -fopenmp)
        failed = library_path(compiler).with_suffix(".failed")
        if failed.exists():
            _why_not = f"the build with {compiler} failed (see {failed}; delete it to try again)"
            return None
        try:
            library = open_library(compiler, progress)
        except UnwritableFolder as err:  # not a failed build: tried again on the next start
            _why_not = f"{err}; make it writable or set VICUNA_HOME to a writable folder"
            log.warning(
                "the CPU kernel is not built: %s; decoding on the CPU uses PyTorch's slower operations",
                _why_not,
            )
            return None
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", b"") or b""
            from vicuna.weights.disk import disk_full

            if full := disk_full(err) or disk_full(detail.decode(errors="replace")):
                # the compiler's output or its temporary files (in $TMPDIR) on a full disk: not a failed
                # build, which a .failed file kept off for good once space was freed
                _why_not = f"the build ran out of disk ({full}) in {library_path(compiler).parent} or $TMPDIR"
                log.warning(
                    "the CPU kernel is not built: %s; free some space there and it is built on the next start; "
                    "decoding on the CPU uses PyTorch's slower operations",
                    _why_not,
                )
                return None
            _why_not = f"the build with {compiler} failed"
            message = (
                f"could not build the CPU kernel with {compiler} ({err}): decoding on the CPU uses PyTorch's "
                "slower operations" + ("\n" + detail.decode(errors="replace")[-2000:]).rstrip()
            )
            log.warning("%s", message)
            if isinstance(err, subprocess.CalledProcessError) or library_path(compiler).exists():
                with contextlib.suppress(OSError):
                    failed.write_text(message + "\n", encoding="utf-8")
            return None
        except BaseException:  # Ctrl-C in the build (a notebook's interrupt of a first load_engine that
            _tried = False  # seemed stuck): not a kernel found missing, which left PyTorch's slower products
            raise  # on for the rest of the process without a word
        fn = library.vicuna_product
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 4, *[ctypes.c_int] * 3, ctypes.c_void_p]
        fn.argtypes += [ctypes.c_float, ctypes.c_int, ctypes.c_int]
        fn = library.vicuna_attend
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, *[ctypes.c_void_p] * 2]
        fn.argtypes += [ctypes.c_long] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 4
        fn = library.vicuna_decode
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_float] + [ctypes.c_int] * 7
        fn.argtypes += [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        fn.argtypes += [ctypes.c_int, *[ctypes.c_void_p] * 2, ctypes.c_int] + [ctypes.c_void_p] * 3
        fn.argtypes += [ctypes.c_int] * 2
        fn = library.vicuna_pack
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        library.vicuna_dot_bf16.restype = ctypes.c_int
        library.vicuna_dot_bf16.argtypes = [ctypes.c_int]
        library.vicuna_threads.restype = ctypes.c_int
        library.vicuna_threads.argtypes = [ctypes.c_int]
        fn = library.vicuna_argmax
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int]
        fn = library.vicuna_sample
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_double]
        _library = library
        return library


class Weight:
    """A weight matrix [n, k] (any of `KINDS`, contiguous, on the CPU; int8 with float32 `scales` [n];
    bfloat16 or int8 `packed` by `pack_`) that the kernel multiplies by float32 rows. What is fixed is checked and
    kept here once, since a decode step makes over a hundred of these calls. The kernel must be loaded
    (`load()`)."""

    def __init__(
        self, weight: torch.Tensor, scales: torch.Tensor | None = None, packed: bool = False
    ) -> None:
        if weight.dtype not in KINDS or weight.dim() != 2 or not weight.is_contiguous():
            raise ValueError(f"the kernel takes contiguous 2-D {'/'.join(map(str, KINDS))} weights")
        if scales is not None and (scales.dtype != torch.float32 or scales.shape != weight.shape[:1]):
            raise ValueError(f"the kernel takes one float32 scale per weight row ({weight.shape[0]})")
        if packed and weight.dtype not in PACKED:
            raise ValueError(f"the kernel packs bfloat16 and int8 weights, not {weight.dtype}")
        self.weight, self.scales = weight, scales  # kept alive: the kernel reads their memory
        self.n, self.k = weight.shape
        kind = PACKED[weight.dtype] if packed else KINDS[weight.dtype]
        self.args = (kind, weight.data_ptr(), None if scales is None else scales.data_ptr())

    def __call__(
        self,
        x: torch.Tensor,
        norm: tuple[torch.Tensor, float] | None = None,
        gated: bool = False,
        into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [m, k] float32 times the weight's transpose: [m, n] float32. With `gated`, x is [m, 2k] and
        silu(x[:, :k]) * x[:, k:] is multiplied; with norm = (weight, eps), the rows are first
        RMS-normalized and scaled by the norm's first k weights (float32); with `into` ([m, n] float32,
        contiguous), the product is added to it, which is returned."""
        if x.dtype is not torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        m, width = x.shape
        n, k = self.n, self.k
        if width != (2 * k if gated else k):
            raise ValueError(f"product: rows of {2 * k if gated else k} values are needed, not {width}")
        if into is None:
            y = torch.empty(m, n)
        elif into.shape != (m, n) or into.dtype is not torch.float32 or not into.is_contiguous():
            raise ValueError(f"product: `into` must be a contiguous float32 [{m}, {n}] tensor")
        else:
            y = into
        scale = None
        if norm is not None:
            if norm[0].dtype is not torch.float32 or norm[0].numel() < k or not norm[0].is_contiguous():
                raise ValueError(
                    f"product: a contiguous float32 norm weight of at least {k} values is needed"
                )
            scale = norm[0].data_ptr()
        kind, weight, scales = self.args
        if _library.vicuna_product(
            kind, x.data_ptr(), weight, scales, y.data_ptr(), m, n, k, scale,
            0.0 if norm is None else norm[1], gated, into is not None,
        ):  # fmt: skip
            raise ValueError(
                "product: the kernel does not multiply these weights here (packed ones need `dot_bf16`)"
            )
        return y


class Step:
    """A whole decode step of a LLaMA-family model in one kernel call (`vicuna_decode` in kernel.cpp):
    for each layer the norm and fused q/k/v product, `attend`, the output product added to the rows,
    the norm and fused gate/up product, and the gated down product added to the rows; then the final norm
    and the head. Between two products no Python runs, and the GIL is free for the whole step (other
    threads, such as a server's event loop, run meanwhile instead of waiting between products).

    `layers`: per layer (qkv, o, gate_up, down) `Weight`s; `norms`: per layer the two norm weights, then
    the final one (float32, at least `hidden` values each); `embedding`: the token embedding table, whose
    rows the step looks up itself (int8 rows times their scales, rounded to `dtype`, the model's, as
    PyTorch's lookup gives them). The kernel must be loaded."""

    def __init__(
        self,
        layers: list[tuple[Weight, Weight, Weight, Weight]],
        head: Weight,
        norms: list[torch.Tensor],
        eps: float,
        heads: int,
        kv_heads: int,
        dim: int,
        embedding: Weight,
        dtype: torch.dtype,
    ) -> None:
        weights = [w for layer in layers for w in layer] + [head]
        self.hidden, self.inter, self.vocab = head.k, layers[0][3].k, head.n
        if embedding.k != self.hidden:
            raise ValueError(f"decode step: embedding rows of {embedding.k} values, not {self.hidden}")
        self.embedding = embedding  # kept alive: the kernel reads its memory
        self.embed_args = (*embedding.args, KINDS.get(dtype, -1))
        shapes = [((heads + 2 * kv_heads) * dim, self.hidden), (self.hidden, heads * dim)]
        shapes += [(2 * self.inter, self.hidden), (self.hidden, self.inter)]
        for i, layer in enumerate(layers):
            for weight, shape in zip(layer, shapes, strict=True):
                if (weight.n, weight.k) != shape:
                    raise ValueError(
                        f"decode step: layer {i} has a {weight.n}x{weight.k} weight, not {shape}"
                    )
        if len(norms) != 2 * len(layers) + 1 or any(
            n.dtype is not torch.float32 or not n.is_contiguous() or n.numel() < self.hidden for n in norms
        ):
            raise ValueError(f"decode step: {2 * len(layers) + 1} contiguous float32 norm weights are needed")
        count = len(weights)
        self.kinds = (ctypes.c_int * count)(*(w.args[0] for w in weights))
        self.weights = (ctypes.c_void_p * count)(*(w.args[1] for w in weights))
        self.scales = (ctypes.c_void_p * count)(*(w.args[2] for w in weights))
        self.norms = (ctypes.c_void_p * len(norms))(*(n.data_ptr() for n in norms))
        self.alive = (weights, norms)  # the kernel reads their memory
        self.eps, self.layers, self.heads, self.kv_heads, self.dim = eps, len(layers), heads, kv_heads, dim

    def __call__(
        self,
        tokens: Sequence[int],
        rope: torch.Tensor,
        cache: torch.Tensor,
        positions: Sequence[int],
        *,
        prompt: bool = False,
    ) -> torch.Tensor:
        """tokens: the new token of each row; rope as for `attend`; cache [layers, 2, >= rows, kv_heads,
        positions, dim] (the model's dtype); positions: where each row's token goes. Returns the float32
        logits [rows, vocab]; the cache holds the rows' new keys and values. The tokens and positions are
        handed over as plain integers (no tensors are made for them: between two steps, with the caches
        cold from reading the weights, each small PyTorch operation took 30-150 us here).

        With `prompt`, the rows are one prompt's tokens at their positions in the cache's first row (each
        attends to the positions before its own and to itself), and only the last row's logits [1, vocab]
        are computed: a short prefill, with no Python between its products either."""
        rows = len(tokens)
        if len(positions) != rows:
            raise ValueError(f"decode step: {rows} tokens but {len(positions)} positions")
        if rows and (min(tokens) < 0 or max(tokens) >= self.embedding.n):
            raise ValueError(f"decode step: a token id outside the embedding's {self.embedding.n} rows")
        if (
            cache.dim() != 6
            or cache.shape[0] != self.layers
            or cache.shape[2] < (1 if prompt else rows)
            or cache.shape[3] != self.kv_heads
            or cache.shape[5] != self.dim
            or cache.stride(-1) != 1
            or cache.dtype not in (torch.bfloat16, torch.float16, torch.float32)
        ):
            raise ValueError(
                f"decode step: a cache [{self.layers}, 2, rows, {self.kv_heads}, positions, {self.dim}] is needed"
            )
        if rope.dtype is not torch.float32 or not rope.is_contiguous() or rope.shape[-1] != self.dim:
            raise ValueError("decode step: a contiguous float32 rotary table is needed")
        if rows and (min(positions) < 0 or max(positions) >= min(cache.shape[4], rope.shape[1])):
            raise ValueError("decode step: a position past the cache or the rotary table")
        logits = torch.empty(1 if prompt else rows, self.vocab)
        strides = (ctypes.c_long * 5)(*cache.stride()[:5])
        if prompt:
            strides[2] = 0  # every row in the cache's first
        status = _library.vicuna_decode(
            self.kinds, self.weights, self.scales, self.norms, self.eps, self.layers, self.hidden,
            self.inter, self.vocab, self.heads, self.kv_heads, self.dim, rope.data_ptr(), rope.shape[1],
            KINDS[cache.dtype], cache.data_ptr(), strides, *self.embed_args, (ctypes.c_int * rows)(*tokens),
            (ctypes.c_int * rows)(*positions), logits.data_ptr(), rows, logits.shape[0],
        )  # fmt: skip
        if status:
            raise ValueError("decode step: the kernel does not take this model's shapes or types")
        return logits


def product(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None = None,
    *,
    norm: tuple[torch.Tensor, float] | None = None,
    gated: bool = False,
    into: torch.Tensor | None = None,
    packed: bool = False,
) -> torch.Tensor:
    """`Weight(weight, scales, packed)(x, norm, gated, into)`, for a weight multiplied once."""
    if x.dtype != torch.float32:
        raise ValueError(f"product: float32 rows are needed, not {x.dtype}")
    return Weight(weight, scales, packed)(x, norm, gated, into)


def attend(
    mixed: torch.Tensor,
    rope: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> torch.Tensor:
    """One decode step's attention for every row (see `vicuna_attend` in kernel.cpp): mixed [rows,
    (heads + 2 kv_heads) head_dim] float32 holds each row's new q, k and v; they are rotated with rope
    [2, positions, head_dim] float32 (cos, and sin with its first half negated) at positions[row]
    (int32), k and v are stored in keys and values [rows, kv_heads, positions, head_dim] there, and q
    attends to the row's positions up to that one. Returns [rows, heads head_dim] float32. The kernel
    must be loaded; the caller checks `attends(...)` first."""
    rows, dim = mixed.shape[0], rope.shape[-1]
    if mixed.dtype != torch.float32 or rope.dtype != torch.float32 or keys.stride(-1) != 1:
        raise ValueError(
            "attend: float32 rows and rotary tables, and a cache with contiguous heads are needed"
        )
    mixed, rope = mixed.contiguous(), rope.contiguous()
    out = torch.empty(rows, heads * dim)
    if keys.stride() != values.stride():
        raise ValueError("attend: keys and values must have the same layout")
    row, head, position = keys.stride()[:3]
    status = _library.vicuna_attend(
        KINDS[keys.dtype],
        mixed.data_ptr(),
        rope.data_ptr(),
        rope.shape[1],
        keys.data_ptr(),
        values.data_ptr(),
        row,
        head,
        position,
        positions.data_ptr(),
        out.data_ptr(),
        rows,
        heads,
        kv_heads,
        dim,
    )
    if status:
        raise ValueError(
            f"attend: the kernel does not take {keys.dtype} caches of {heads}/{kv_heads} heads of {dim}"
        )
    return out


def _takes(row: torch.Tensor) -> bool:
    """Whether the kernel is loaded and `row` is a contiguous float32 CPU row (for `argmax`, `sample`)."""
    return (
        _library is not None
        and row.dtype is torch.float32
        and row.dim() == 1
        and row.stride(0) == 1
        and row.device.type == "cpu"
    )


def argmax(row: torch.Tensor) -> int | None:
    """The index of a float32 CPU row's largest value (the first of equal ones; the first NaN, if any), as
    `torch.argmax` answers; None where the kernel is not loaded or the row is not a contiguous float32
    CPU row. Between two decode steps NumPy's argmax of a row of logits took 130-180 us here (its code
    and data cold after the step's weights went through the caches), this about 10 us."""
    return _library.vicuna_argmax(row.data_ptr(), row.shape[0]) if _takes(row) else None


def sample(row: torch.Tensor, temperature: float, u: float) -> int | None:
    """A token drawn from softmax(row / temperature) with `u`, uniform in [0, 1): the first index where the
    running sum of the probabilities passes u (-inf values are never drawn). None where the kernel is not
    loaded, the row is not a contiguous float32 CPU row, or it holds no distribution (a NaN, or only
    -inf). PyTorch's softmax and multinomial took ~1.5 ms for a row of 49,152 logits here, this ~0.1 ms."""
    if not _takes(row):
        return None
    token = _library.vicuna_sample(row.data_ptr(), row.shape[0], temperature, u)
    return None if token < 0 else token


def attends(dtype: torch.dtype, group: int, dim: int) -> bool:
    """Whether `attend` takes a cache of this dtype, query heads per KV head and head size."""
    return (
        dtype in (torch.bfloat16, torch.float16, torch.float32)
        and 1 <= group <= 8
        and dim % 16 == 0
        and dim <= 256
    )


class Team:
    """How many threads the kernel's work on the calling thread uses, picked from the time its decode steps
    take. With another program keeping a core busy, every one of a step's ~150 parallel regions waits for
    the thread that shares that core: on 2 cores the built-in model decoded at 39-51 tok/s with both
    threads and 114-121 with one (bf16, Zen 5 VM), while on idle cores both are 1.17x faster than one.

    Each step's time is given to `timed` with the step's number of rows. When steps at the current size
    become 1.5x slower than usual for that many rows (or at first), one thread fewer is tried for `WINDOW`
    steps; below the whole team, the whole team is tried again after `retry` steps (doubling each time it
    loses, up to `MAX_RETRY`). The faster is kept; a trial during which the rows changed counts for neither."""

    WINDOW = 6
    FIRST_RETRY, MAX_RETRY = 64, 4096
    SLOWER = 1.5

    def __init__(self, library: Any) -> None:
        self.library = library
        self.most = self.size = library.vicuna_threads(0)
        self.usual: dict[tuple[int, int], float] = {}  # (size, rows): median step time, followed slowly
        self.times: list[float] = []  # at the current size and rows
        self.rows = 0
        self.trial_from: int | None = None  # during a trial: the size it is compared with
        self.retry, self.since = self.FIRST_RETRY, 0

    def _use(self, size: int) -> None:
        self.size, self.times = size, []
        self.library.vicuna_threads(size)

    @contextlib.contextmanager
    def threads(self) -> Iterator[None]:
        """The team's size for the calling thread's work in this block, and the thread's own count again
        after it. The count is OpenMP's for the calling thread, which PyTorch's `get_num_threads` is too:
        left at the team's size, a reply after a trial of one thread fewer ran the caller's own PyTorch work
        (a notebook's next cell, `Engine.score`) on one core of two, and a second `load_engine` in the
        process timed float32 against bfloat16 again, as if on another machine."""
        before = self.library.vicuna_threads(0)
        self.library.vicuna_threads(self.size)
        try:
            yield
        finally:
            self.library.vicuna_threads(before)

    def _try(self, size: int, now: float, rows: int) -> None:
        """A trial of `size` threads, against the current size's `now`."""
        self.usual[(self.size, rows)] = now
        self.trial_from = self.size
        self._use(size)

    def timed(self, seconds: float, rows: int) -> None:
        if self.most <= 1:
            return
        if rows != self.rows:  # another batch: its own times (a trial in progress is abandoned)
            self.rows, self.times = rows, []
            if self.trial_from is not None:
                self._use(self.trial_from)
                self.trial_from = None
        self.times.append(seconds)
        self.since += 1
        if len(self.times) < self.WINDOW:
            return
        now = sorted(self.times)[len(self.times) // 2]
        self.times = []
        if self.trial_from is not None:  # the trial is over: keep the faster size
            before, self.trial_from = self.trial_from, None
            self.usual[(self.size, rows)] = now
            if now < self.usual[(before, rows)]:
                self.retry = self.FIRST_RETRY
            else:
                self.retry = min(2 * self.retry, self.MAX_RETRY) if self.size > before else self.retry
                self._use(before)
            self.since = 0
            return
        key = (self.size, rows)
        usual = self.usual.setdefault(key, now)
        fewer = (self.size - 1, rows)
        if self.size > 1 and (now > self.SLOWER * usual or fewer not in self.usual):
            # slower than it was, or one thread fewer never tried for these rows (the cores may have been
            # busy from the start): try one fewer
            self._try(self.size - 1, now, rows)
        elif self.size < self.most and self.since >= self.retry:  # the other cores may be free again
            self._try(self.size + 1, now, rows)
        else:
            self.usual[key] = 0.8 * usual + 0.2 * now  # a reply's steps grow slowly longer with its context
