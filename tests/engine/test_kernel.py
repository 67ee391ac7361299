"""Our CPU kernel: products against float64 for every weight type and awkward shapes, one build per
source, and PyTorch's products wherever it cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vicuna.engine import kernel

needs_kernel = pytest.mark.skipif(kernel.load(progress=False) is None, reason="the kernel needs AVX2 and g++")


@pytest.fixture(params=["avx2", "dot"])
def bf16_way(request):
    """Each way the kernel multiplies bfloat16 and int8 weights: with AVX2 (x in float32) and, where the
    CPU has AVX512-BF16, with its dot products (x rounded to bfloat16); answers whether x is rounded."""
    library = kernel.load(progress=False)
    if library is None:
        pytest.skip("the kernel needs AVX2 and g++")
    before = library.vicuna_dot_bf16(-1)
    if library.vicuna_dot_bf16(1 if request.param == "dot" else 0) != (request.param == "dot"):
        library.vicuna_dot_bf16(before)
        pytest.skip("no AVX512-BF16 here (the CPU or the compiler)")
    yield request.param == "dot"
    library.vicuna_dot_bf16(before)


def weights(kind: torch.dtype, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if kind == torch.int8:
        return torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) / 100
    return (torch.randn(n, k) * 0.05).to(kind), None


@needs_kernel
@pytest.mark.parametrize("kind", [torch.bfloat16, torch.float16, torch.float32, torch.int8])
@pytest.mark.parametrize(
    "m,n,k",
    [
        (1, 37, 40),
        (1, 960, 576),
        (2, 13, 16),
        (3, 5, 23),
        (4, 100, 1536),
        (5, 17, 577),
        (7, 33, 7),
        (16, 64, 96),
        (13, 1, 1),
        (600, 40, 64),  # more rows than one pass takes
    ],
)
def test_products_equal_float64_for_every_weight_type(bf16_way, kind, m, n, k):
    torch.manual_seed(m * n + k)
    w, scales = weights(kind, n, k)
    x = torch.randn(m, k)
    rounded = bf16_way and kind in (torch.bfloat16, torch.int8)  # x rounded to bfloat16 as PyTorch rounds it
    exact = (x.bfloat16() if rounded else x).double() @ w.double().T
    if scales is not None:
        exact = exact * scales.double()
    out = kernel.product(x, w, scales)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert (out.double() - exact).abs().max() <= 1e-5 * exact.abs().max()


@needs_kernel
@pytest.mark.parametrize("kind", [torch.bfloat16, torch.float32, torch.int8])
@pytest.mark.parametrize("m", [1, 3, 16, 600])  # each thread prepares its rows / they share the work
def test_the_norm_gate_and_residual_add_around_a_product_equal_float64(bf16_way, kind, m):
    torch.manual_seed(m)
    n, k = 40, 52  # k: not a multiple of 8 or 16
    w, scales = weights(kind, n, k)
    x, residual = torch.randn(m, 2 * k) * 4, torch.randn(m, n)  # gates down to ~-16 (e^-gate ~ 1e7)
    norm = torch.rand(k) + 0.5
    gate, up = x.double().chunk(2, dim=-1)
    rows = torch.nn.functional.silu(gate) * up
    rows = rows / (rows.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * norm.double()
    product = rows @ w.double().T * (1 if scales is None else scales.double())
    into = residual.clone()
    out = kernel.product(x, w, scales, norm=(norm, 1e-5), gated=True, into=into)
    assert out is into
    error = (out.double() - (residual.double() + product)).abs()
    if bf16_way and kind in (torch.bfloat16, torch.int8):  # each value rounded to bfloat16: by <= 2^-8 of it
        error -= 2**-8 * (rows.abs() @ w.double().abs().T).mul(1 if scales is None else scales.double())
    assert error.max() <= 1e-5 * product.abs().max()


@pytest.fixture
def packing():
    """Packed bfloat16 weights (`kernel.pack_`): where the kernel multiplies with AVX512-BF16 only."""
    if kernel.load(progress=False) is None or not kernel.packs(torch.zeros(16, 2, dtype=torch.bfloat16)):
        pytest.skip("packed weights need the kernel's AVX512-BF16 products (not on this CPU)")


@pytest.mark.parametrize(
    "m,n,k",
    [
        (1, 37, 40),  # two blocks and 5 rows past them
        (1, 960, 576),
        (1, 224, 64),  # 14 blocks: 7 a thread, int8 read at two places and one more
        (2, 15, 16),  # no whole block
        (2, 160, 64),  # 10 blocks: bfloat16 read at four places
        (3, 48, 4),  # 3 blocks: a tile of 2 and one alone
        (4, 200, 1536),  # 12 blocks: 6 a thread, read at four places
        (5, 17, 578),
        (6, 80, 96),
        (8, 64, 96),
        (9, 31, 64),
        (15, 50, 64),  # 8 rows of x at a time, then 7
        (16, 2000, 576),
        (17, 33, 130),
        (600, 40, 64),  # more rows than one pass takes
    ],
)
@pytest.mark.parametrize("kind", [torch.bfloat16, torch.int8])
def test_packed_weights_multiply_as_the_rows_they_hold(packing, kind, m, n, k):
    torch.manual_seed(m * n + k)
    (w, scales), x = weights(kind, n, k), torch.randn(m, k)
    exact = x.bfloat16().double() @ w.double().T * (1 if scales is None else scales.double())
    packed = kernel.pack_(w.clone())
    assert torch.equal(packed[n // 16 * 16 :], w[n // 16 * 16 :])  # the rows past the blocks stay
    assert n < 16 or not torch.equal(packed[:16], w[:16])  # the blocks are rearranged
    out = kernel.Weight(packed, scales, packed=True)(x)
    assert out.shape == (m, n)
    assert (out.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    ids = torch.tensor([[0, n - 1], [n // 2, min(n - 1, 17)]])
    assert torch.equal(kernel.packed_rows(packed, ids), w[ids])


@pytest.mark.parametrize("kind", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("m", [1, 3, 16, 600])
def test_the_norm_gate_and_residual_add_around_a_packed_product_equal_float64(packing, kind, m):
    torch.manual_seed(m)
    n, k = 40, 52  # two blocks and 8 rows past them; k not a multiple of 32
    w, scales = weights(kind, n, k)
    scale = 1 if scales is None else scales.double()
    x, residual, norm = torch.randn(m, 2 * k) * 4, torch.randn(m, n), torch.rand(k) + 0.5
    gate, up = x.double().chunk(2, dim=-1)
    rows = torch.nn.functional.silu(gate) * up
    rows = rows / (rows.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * norm.double()
    product = rows @ w.double().T * scale
    into = residual.clone()
    packed = kernel.Weight(kernel.pack_(w.clone()), scales, packed=True)
    out = packed(x, norm=(norm, 1e-5), gated=True, into=into)
    assert out is into
    error = (out.double() - (residual.double() + product)).abs()
    error -= 2**-8 * (rows.abs() @ w.double().abs().T) * scale  # each value rounded to bfloat16
    assert error.max() <= 1e-5 * product.abs().max()


@pytest.mark.parametrize("kind", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("gated", [False, True])
def test_a_rows_packed_product_does_not_depend_on_the_rows_beside_it(packing, kind, gated):
    """Each row's sums come out bit for bit the same whichever way its call takes (one row at four places,
    tiles of 8 rows, int8 widened in registers or into a buffer): batched replies match replies alone."""
    torch.manual_seed(1)
    n, k = 200, 96  # 12 blocks and 8 rows past them
    w, scales = weights(kind, n, k)
    packed = kernel.Weight(kernel.pack_(w.clone()), scales, packed=True)
    x, residual, norm = torch.randn(20, 2 * k if gated else k), torch.randn(20, n), torch.rand(k) + 0.5

    def first_row(m: int) -> torch.Tensor:
        return packed(x[:m], norm=(norm, 1e-5), gated=gated, into=residual[:m].clone())[0]

    alone = first_row(1)
    assert [m for m in range(2, 21) if not torch.equal(first_row(m), alone)] == []


def test_packed_weights_are_refused_where_they_cannot_be_multiplied(packing):
    with pytest.raises(ValueError, match="of an even width, not torch.bfloat16 of 3"):
        kernel.pack_(torch.ones(16, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="not torch.float32 of 4"):
        kernel.pack_(torch.ones(16, 4))
    with pytest.raises(ValueError, match="packs bfloat16 and int8 weights, not torch.float32"):
        kernel.Weight(torch.ones(16, 4), packed=True)
    weight = kernel.Weight(kernel.pack_(torch.ones(16, 4, dtype=torch.bfloat16)), packed=True)
    library = kernel.load()
    library.vicuna_dot_bf16(0)  # as on a CPU without AVX512-BF16: the kernel refuses, not misreads
    try:
        with pytest.raises(ValueError, match="does not multiply these weights here"):
            weight(torch.ones(1, 4))
    finally:
        library.vicuna_dot_bf16(1)


@needs_kernel
def test_products_take_strided_rows_and_refuse_mismatched_shapes():
    w, _ = weights(torch.float32, 8, 32)
    x = torch.randn(32, 3).T  # not contiguous
    torch.testing.assert_close(kernel.product(x, w), x @ w.float().T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rows of 32 values are needed, not 31"):
        kernel.product(torch.randn(2, 31), w)
    with pytest.raises(ValueError, match="norm weight of at least 32"):
        kernel.product(torch.randn(2, 32), w, norm=(torch.ones(16), 1e-5))
    with pytest.raises(ValueError, match="one float32 scale per weight row"):
        kernel.Weight(torch.ones(8, 32, dtype=torch.int8), torch.ones(7))
    with pytest.raises(ValueError, match="float32 rows"):
        kernel.product(torch.randn(2, 32).bfloat16(), w)


def test_a_build_is_made_once_per_source_and_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path))
    calls = []

    def compile_(command, **kwargs):
        calls.append(command)
        Path(command[-1]).write_bytes(b"built")  # the partial file the compiler would write

    monkeypatch.setattr(subprocess, "run", compile_)
    # what the compiler of a build whose Python was killed went on to write goes once no build can still be
    # writing it; a recent one stays. Told apart by age, not by asking whether the pid in its name runs:
    # on Windows os.kill(pid, 0) ends that process, or fails for a pid that is gone.
    (tmp_path / "kernels").mkdir()
    orphan = tmp_path / "kernels" / f"vicuna-kernel-x.so.{os.getpid()}.partial"
    orphan.write_bytes(b"orphan")
    os.utime(orphan, (time.time() - 3600, time.time() - 3600))
    (tmp_path / "kernels" / f"vicuna-kernel-y.so.{os.getpid()}.partial").write_bytes(b"being built")
    monkeypatch.setattr(os, "kill", None)  # no process is signalled
    first = kernel.build("g++", progress=False)
    assert (tmp_path / "kernels" / f"vicuna-kernel-y.so.{os.getpid()}.partial").exists()
    (tmp_path / "kernels" / f"vicuna-kernel-y.so.{os.getpid()}.partial").unlink()
    assert first.read_bytes() == b"built" and first.parent == tmp_path / "kernels"
    assert kernel.build("g++", progress=False) == first and len(calls) == 1  # reused
    assert kernel.build("clang++", progress=False) != first and len(calls) == 2
    assert sorted(p.name for p in first.parent.iterdir()) == sorted(
        [first.name, kernel.library_path("clang++").name]
    )


@pytest.mark.skipif(not shutil.which("x86_64-w64-mingw32-g++"), reason="needs MinGW's g++ (a cross-compiler)")
def test_on_windows_mingw_builds_a_kernel_that_needs_no_dll_from_the_compiler_s_folder(tmp_path, monkeypatch):
    """MinGW's g++ (MSYS2's, the g++ a Windows user installs) refused the source (Windows' C runtime has no
    aligned_alloc), and a build would have needed libgomp-1.dll and libstdc++-6.dll from the compiler's
    folder, where Python 3.8 and later does not look for a library's dependencies: the engine decoded with
    PyTorch's slower operations on every Windows machine, after a warning of compiler errors."""
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path / "用户 home"))
    monkeypatch.setattr(sys, "platform", "win32")
    library = kernel.build("x86_64-w64-mingw32-g++", progress=False)
    dump = subprocess.run(
        ["x86_64-w64-mingw32-objdump", "-p", str(library)], capture_output=True, text=True, check=True
    ).stdout
    needed = {line.split(":", 1)[1].strip().lower() for line in dump.splitlines() if "DLL Name:" in line}
    assert needed and all(
        name in ("kernel32.dll", "msvcrt.dll", "ucrtbase.dll") or name.startswith("api-ms-win-")
        for name in needed
    ), needed
    assert all(f" vicuna_{name}\n" in dump for name in ("product", "attend", "decode", "pack", "threads"))


def test_on_windows_a_build_another_start_made_and_loaded_meanwhile_is_used(tmp_path, monkeypatch):
    """Two first starts at once each compile the kernel; on Windows the second could not rename its build
    over the first's, which that process has loaded (PermissionError): it was taken for a failed build,
    and the .failed file it left kept the kernel off for every later start."""
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path))
    path = kernel.library_path("g++")

    def compile_(command, **kwargs):
        Path(command[-1]).write_bytes(b"this start's")
        path.write_bytes(b"the other start's, loaded")  # it finished first, meanwhile

    def replace(src, dst):
        if Path(dst).exists():
            raise PermissionError(13, "Access is denied", str(src), None, str(dst))
        os.rename(src, dst)

    monkeypatch.setattr(subprocess, "run", compile_)
    monkeypatch.setattr(os, "replace", replace)
    assert kernel.build("g++", progress=False) == path
    assert path.read_bytes() == b"the other start's, loaded"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # this start's build is gone


def test_a_library_there_that_does_not_load_is_built_again(tmp_path, monkeypatch, caplog):
    """A build in $VICUNA_HOME/kernels that does not load here (made on another machine whose home is shared
    or was copied, or cut short by a crash) was taken for a failed build: the kernel was kept off for good,
    and deleting the .failed file, as the warning said, brought the same warning back."""
    import ctypes
    from unittest import mock

    monkeypatch.setenv("VICUNA_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "g++")
    monkeypatch.setattr(kernel, "_tried", False)
    monkeypatch.setattr(kernel, "_library", None)
    monkeypatch.setattr(kernel, "cpu_supported", lambda: True)
    path = kernel.library_path("g++")
    path.parent.mkdir()
    path.write_bytes(b"another machine's build")
    loaded = mock.MagicMock()

    def open_(name, *args, **kwargs):
        if Path(name).read_bytes() != b"built here":
            raise OSError(f"{name}: cannot open shared object file: invalid ELF header")
        return loaded

    def compile_(command, **kwargs):
        Path(command[-1]).write_bytes(b"built here")

    monkeypatch.setattr(ctypes, "CDLL", open_)
    monkeypatch.setattr(subprocess, "run", compile_)
    assert kernel.load(progress=False) is loaded
    assert caplog.text == ""
    assert [p.name for p in path.parent.iterdir()] == [path.name] and path.read_bytes() == b"built here"


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="Linux's files in memory")
def test_a_kernel_in_a_vicuna_home_mounted_noexec_is_loaded_from_memory(tmp_path, monkeypatch, caplog):
    """$VICUNA_HOME on a filesystem mounted noexec (a container's volume, a shared home): the library built
    there failed to load, was said as "could not build the CPU kernel", and was kept off for good."""
    import ctypes
    from unittest import mock

    monkeypatch.setenv("VICUNA_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "g++")
    monkeypatch.setattr(kernel, "_tried", False)
    monkeypatch.setattr(kernel, "_library", None)
    monkeypatch.setattr(kernel, "cpu_supported", lambda: True)
    loaded, opened = mock.MagicMock(), []

    def open_(name, *args, **kwargs):  # as the dynamic loader answers for a file on a noexec mount
        if not name.startswith("/proc/self/fd/"):
            raise OSError(f"{name}: failed to map segment from shared object")
        opened.append(Path(name).read_bytes())
        return loaded

    monkeypatch.setattr(ctypes, "CDLL", open_)
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: Path(command[-1]).write_bytes(b"built"))
    assert kernel.load(progress=False) is loaded
    assert opened == [b"built"] and caplog.text == ""
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [
        kernel.library_path("g++").name
    ]  # no .failed


def test_a_failed_build_is_said_once_leaves_no_library_and_the_engine_uses_pytorch(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path))
    monkeypatch.setattr(kernel, "_tried", False)
    monkeypatch.setattr(kernel, "_library", None)
    monkeypatch.setenv("CXX", "/bin/false")  # a compiler that fails (as Apple's clang does on -fopenmp)
    monkeypatch.setattr(kernel, "cpu_supported", lambda: True)
    assert kernel.load(progress=False) is None
    assert "could not build the CPU kernel" in caplog.text
    assert "the build with /bin/false failed" in kernel.status()
    failed = kernel.library_path("/bin/false").with_suffix(".failed")
    assert list((tmp_path / "kernels").iterdir()) == [failed]  # no partial library; what the compiler said
    # the next start neither compiles again nor warns again; doctor still says why, and how to try again
    caplog.clear()
    monkeypatch.setattr(kernel, "_tried", False)
    monkeypatch.setattr(subprocess, "run", None)
    assert kernel.load(progress=False) is None
    assert caplog.text == ""
    assert f"the build with /bin/false failed (see {failed}; delete it to try again)" in kernel.status()
    from vicuna.engine.runner import Dense

    weight = torch.randn(8, 16).bfloat16()
    dense = Dense(weight)
    assert dense.kernel is None
    x = torch.randn(1, 16)
    torch.testing.assert_close(dense(x), torch.nn.functional.linear(x.bfloat16(), weight).float())


def test_a_build_that_ran_out_of_disk_is_not_kept_off_for_good(tmp_path, monkeypatch, caplog):
    """The compiler's output, or its temporary files in $TMPDIR, on a full disk: taken for a failed build, whose
    .failed file kept the kernel off on every start after space was freed, said as "the build failed"."""
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path))
    monkeypatch.setattr(kernel, "_tried", False)
    monkeypatch.setattr(kernel, "_library", None)
    monkeypatch.setattr(kernel, "cpu_supported", lambda: True)
    monkeypatch.setenv("CXX", "c++")

    def full(command, **kwargs):
        said = (
            b"{standard input}: Fatal error: can't write 24 bytes to section .text: No space left on device"
        )
        raise subprocess.CalledProcessError(1, command, stderr=said)

    monkeypatch.setattr(subprocess, "run", full)
    assert kernel.load(progress=False) is None
    folder = tmp_path / "kernels"
    assert (
        len(caplog.records) == 1
        and (
            f"the CPU kernel is not built: the build ran out of disk (no space left on device) in {folder} or "
            "$TMPDIR; free some space there and it is built on the next start"
        )
        in caplog.text
    )
    assert list(folder.iterdir()) == []  # no .failed file, no partial library
    built = []

    def again(command, **kwargs):
        built.append(command)
        raise subprocess.CalledProcessError(1, command, stderr=b"")

    monkeypatch.setattr(kernel, "_tried", False)
    monkeypatch.setattr(subprocess, "run", again)
    assert kernel.load(progress=False) is None
    assert len(built) == 1  # tried again on the next start


def test_a_kernel_folder_that_cannot_be_written_is_said_in_one_line_with_what_to_do(
    tmp_path, monkeypatch, caplog
):
    """A read-only $VICUNA_HOME (a container's volume): the compiler was run, failed to write its output, and
    the warning was its command line and linker errors, with nothing on what to do; and a .failed file,
    where one could be written, kept the kernel off after the folder was made writable."""
    home = tmp_path / "home"
    home.write_text("")  # no folder can be made here, whoever runs the test (root ignores read-only modes)
    monkeypatch.setenv("VICUNA_HOME", str(home))
    monkeypatch.setattr(kernel, "_tried", False)
    monkeypatch.setattr(kernel, "_library", None)
    monkeypatch.setattr(kernel, "cpu_supported", lambda: True)
    compiled = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: compiled.append(a))
    assert kernel.load(progress=False) is None
    assert compiled == []
    assert len(caplog.records) == 1 and "\n" not in caplog.text.strip()
    assert (
        f"the CPU kernel is not built: cannot write into {home / 'kernels'} (Not a directory); make it writable "
        "or set VICUNA_HOME to a writable folder; decoding on the CPU uses PyTorch's slower operations"
    ) in caplog.text
    assert kernel.status().startswith(f"not used: cannot write into {home / 'kernels'}")


def test_a_missing_cxx_is_named_with_what_it_costs(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path))
    monkeypatch.setattr(kernel, "_tried", False)
    monkeypatch.setattr(kernel, "_library", None)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setattr(kernel, "cpu_supported", lambda: True)
    assert kernel.load(progress=False) is None
    assert f"could not build the CPU kernel with {tmp_path / 'no-such-g++'} (" in caplog.text
    assert "decoding on the CPU uses PyTorch's slower operations" in caplog.text


def test_no_compiler_is_said_once_not_on_every_start(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(kernel, "cpu_supported", lambda: True)
    monkeypatch.setattr(kernel, "_library", None)
    for _ in range(2):  # two starts
        monkeypatch.setattr(kernel, "_tried", False)
        assert kernel.load(progress=False) is None
    assert caplog.text.count("no C++ compiler found (install g++): decoding on the CPU uses PyTorch's") == 1
    assert kernel.status().startswith("not used: no C++ compiler found (install g++)")  # doctor still says it


def test_vicuna_kernel_0_turns_it_off_and_doctor_says_so(monkeypatch, tiny_llama_dir, capsys):
    monkeypatch.setattr(kernel, "_tried", False)
    monkeypatch.setattr(kernel, "_library", None)
    monkeypatch.setenv("VICUNA_KERNEL", "0")
    assert kernel.load(progress=False) is None
    assert kernel.status().startswith("not used: turned off (VICUNA_KERNEL=0)")
    from vicuna.cli import main

    assert main(["doctor", "--model-path", str(tiny_llama_dir)]) == 0
    assert "CPU kernel  not used: turned off (VICUNA_KERNEL=0)" in capsys.readouterr().out


@needs_kernel
def test_status_says_the_kernel_is_ready():
    assert kernel.status().startswith("ready (")


@needs_kernel
def test_status_counts_one_thread_as_one():
    """`OMP_NUM_THREADS=1` (the README's stand-in for Ollama's num_thread) made doctor say '1 threads'."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert kernel.status().endswith(", 1 thread)")
    finally:
        torch.set_num_threads(before)
    if before > 1:
        assert kernel.status().endswith(f", {before} threads)")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as transformers computes it (sin here with its true sign)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


@needs_kernel
@pytest.mark.parametrize("kind", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "rows,kv_heads,group,dim,longest,threads",
    [
        (1, 3, 3, 64, 100, None),
        (16, 3, 3, 64, 300, None),
        (2, 8, 1, 128, 37, None),
        (3, 2, 8, 64, 5, None),
        (2, 1, 2, 16, 9, None),
        (2, 1, 7, 80, 150, None),  # heads in sets of 3, 2 and 2; 80 = 64 + 16 values at a time
        (1, 1, 8, 256, 40, None),
        # few pairs of (row, KV head) and long rows: each pair's positions in pieces that the threads
        # take separately (some empty: the last row holds one position), then combined
        (1, 3, 3, 64, 900, 2),
        (3, 1, 4, 64, 700, 4),
        (1, 1, 1, 128, 2000, 3),
    ],
)
def test_a_decode_attention_step_equals_float64_over_each_rows_own_length(
    kind, rows, kv_heads, group, dim, longest, threads
):
    torch.manual_seed(rows * dim + longest)
    if threads:
        before_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
    heads = kv_heads * group
    keys = torch.randn(rows, kv_heads, longest + 20, dim).to(kind)  # room past every row's end
    values = torch.randn_like(keys)
    before = keys.clone(), values.clone()
    mixed = torch.randn(rows, (heads + 2 * kv_heads) * dim)
    angles = torch.rand(longest + 20, dim // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    table = torch.stack([cos, torch.cat([-sin[:, : dim // 2], sin[:, dim // 2 :]], -1)])
    positions = torch.randint(0, longest, (rows,), dtype=torch.int32)
    positions[0] = longest - 1  # the longest row, and one of a single position
    if rows > 1:
        positions[-1] = 0
    assert kernel.attends(kind, group, dim)
    try:
        out = kernel.attend(mixed, table, keys, values, positions, heads, kv_heads)
    finally:
        if threads:
            torch.set_num_threads(before_threads)
    assert out.shape == (rows, heads * dim) and out.dtype == torch.float32
    for r, at in enumerate(positions.tolist()):
        q, k, v = mixed[r].double().split([heads * dim, kv_heads * dim, kv_heads * dim])
        q = rotate(q.view(heads, dim), cos[at].double(), sin[at].double())
        k = rotate(k.view(kv_heads, dim), cos[at].double(), sin[at].double())
        # the new k and v are stored at the row's position, in the cache's dtype; the rest is untouched
        torch.testing.assert_close(keys[r, :, at], k.to(kind))
        torch.testing.assert_close(values[r, :, at], v.view(kv_heads, dim).to(kind))
        for cache, old in zip((keys, values), before, strict=True):
            assert torch.equal(cache[r, :, :at], old[r, :, :at]) and torch.equal(
                cache[r, :, at + 1 :], old[r, :, at + 1 :]
            )
        exact = torch.nn.functional.scaled_dot_product_attention(
            q.view(kv_heads, group, dim),
            keys[r, :, : at + 1].double(),
            values[r, :, : at + 1].double(),
        )
        assert (out[r].double() - exact.flatten()).abs().max() <= 1e-5


@needs_kernel
@pytest.mark.parametrize("kind", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens,start,threads", [(24, 27, None), (7, 0, None), (40, 300, 3), (5, 2, 4)])
def test_a_prompts_tokens_in_one_cache_row_see_each_others_keys_and_values(kind, tokens, start, threads):
    """Rows with a row stride of 0 are one prompt's new tokens at positions start, start + 1, ...: each
    attends to the cached positions and to the tokens up to itself, which other threads store."""
    torch.manual_seed(tokens + start)
    kv_heads, group, dim = 3, 3, 64
    heads = kv_heads * group
    if threads:
        before_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
    row = torch.randn(1, kv_heads, start + tokens + 8, dim).to(kind)
    row_values = torch.randn_like(row)
    keys, values = row.expand(tokens, -1, -1, -1), row_values.expand(tokens, -1, -1, -1)
    assert keys.stride(0) == 0
    mixed = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    angles = torch.rand(start + tokens + 8, dim // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    table = torch.stack([cos, torch.cat([-sin[:, : dim // 2], sin[:, dim // 2 :]], -1)])
    positions = torch.arange(start, start + tokens, dtype=torch.int32)
    try:
        out = kernel.attend(mixed, table, keys, values, positions, heads, kv_heads)
    finally:
        if threads:
            torch.set_num_threads(before_threads)
    for r in range(tokens):
        at = start + r
        q, k, v = mixed[r].double().split([heads * dim, kv_heads * dim, kv_heads * dim])
        q = rotate(q.view(heads, dim), cos[at].double(), sin[at].double())
        k = rotate(k.view(kv_heads, dim), cos[at].double(), sin[at].double())
        torch.testing.assert_close(row[0, :, at], k.to(kind))
        torch.testing.assert_close(row_values[0, :, at], v.view(kv_heads, dim).to(kind))
        exact = torch.nn.functional.scaled_dot_product_attention(
            q.view(kv_heads, group, dim), row[0, :, : at + 1].double(), row_values[0, :, : at + 1].double()
        )
        assert (out[r].double() - exact.flatten()).abs().max() <= 1e-5


def test_attention_takes_only_the_shapes_it_is_written_for():
    assert not kernel.attends(torch.bfloat16, 3, 72)  # head size not a multiple of 16
    assert not kernel.attends(torch.bfloat16, 16, 64)  # more query heads per KV head than it holds
    assert not kernel.attends(torch.int8, 1, 64)


def zero_layer_step(table: kernel.Weight, head: torch.Tensor, dtype: torch.dtype) -> kernel.Step:
    """A one-layer step whose layer adds nothing (zero output and down weights): its logits are the head
    times the final norm of each token's embedding, as the step looks it up."""
    heads, kv_heads, dim, inter = 2, 1, 16, 64
    hidden = heads * dim
    zeros = [
        torch.zeros(n, k)
        for n, k in ((4 * dim, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter))
    ]
    layer = tuple(kernel.Weight(z) for z in zeros)
    norms = [torch.ones(hidden)] * 3
    return kernel.Step([layer], kernel.Weight(head), norms, 1e-6, heads, kv_heads, dim, table, dtype)


@needs_kernel
@pytest.mark.parametrize("table_kind", [torch.bfloat16, torch.float32, torch.int8, "packed", "packed int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_step_looks_its_tokens_up_as_pytorchs_embedding_does(table_kind, dtype, request):
    """int8 rows times their scale are rounded to the model's dtype, as `Int8Embedding` gives them; a
    packed table (the head's, tied) is read back as the rows it holds."""
    from vicuna.engine.quant import Int8Embedding, quantize_rows

    torch.manual_seed(7)
    vocab, hidden = 50, 32  # packed: 3 blocks and 2 rows past them
    source = torch.nn.Embedding(vocab, hidden).to(dtype)
    if table_kind in (torch.int8, "packed int8"):
        module = Int8Embedding(quantize_rows(source.weight), dtype)
        table = kernel.Weight(module.weight_int8, module.scales.float())
        if table_kind == "packed int8":
            request.getfixturevalue("packing")
            packed = kernel.pack_(module.weight_int8.clone())
            table = kernel.Weight(packed, module.scales.float(), packed=True)
    elif table_kind == "packed":
        request.getfixturevalue("packing")
        module = torch.nn.Embedding(vocab, hidden).to(torch.bfloat16)
        table = kernel.Weight(kernel.pack_(module.weight.data.clone()), packed=True)
    else:
        module = torch.nn.Embedding(vocab, hidden).to(table_kind)
        table = kernel.Weight(module.weight.data)
    head = torch.randn(vocab, hidden)
    step = zero_layer_step(table, head, dtype)
    tokens = [0, 49, 17, 17]
    cache = torch.zeros(1, 2, len(tokens), 1, 8, 16)
    rope = torch.zeros(2, 8, 16)
    logits = step(tokens, rope, cache, [0, 3, 1, 7])
    x = module(torch.tensor(tokens)).double()
    x = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(logits.double(), x @ head.double().T, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_step_refuses_tokens_outside_its_table_and_positions_that_do_not_match():
    step = zero_layer_step(kernel.Weight(torch.randn(50, 32)), torch.randn(50, 32), torch.float32)
    cache, rope = torch.zeros(1, 2, 2, 1, 8, 16), torch.zeros(2, 8, 16)
    with pytest.raises(ValueError, match="token id outside"):
        step([50], rope, cache, [0])
    with pytest.raises(ValueError, match="token id outside"):
        step([-1], rope, cache, [0])
    with pytest.raises(ValueError, match="2 tokens but 1 positions"):
        step([1, 2], rope, cache, [0])
    with pytest.raises(ValueError, match="past the cache"):
        step([1], rope, cache, [8])
    with pytest.raises(ValueError, match="past the cache"):
        step([1], rope, cache, [-1])


@needs_kernel
@pytest.mark.parametrize("n", [1, 7, 8, 31, 32, 33, 100, 49152])
def test_argmax_answers_as_torch_does_with_ties_and_nans(n):
    generator = torch.Generator().manual_seed(n)
    for case in range(12):
        row = torch.randn(n, generator=generator)
        if case % 3 == 1:
            row[torch.randint(0, n, (3,), generator=generator)] = row.max() + 1  # tied maxima
        if case % 4 == 2:
            row[torch.randint(0, n, (2,), generator=generator)] = float("nan")
        if case == 5:
            row[:] = -float("inf")
        assert kernel.argmax(row) == int(torch.argmax(row)), (n, case)
    assert kernel.argmax(torch.randn(n, dtype=torch.float64)) is None  # not a float32 row: not taken
    assert kernel.argmax(torch.randn(n, 2)[:, 0]) is None  # nor a strided one


@needs_kernel
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_sample_draws_each_token_by_the_inverse_of_its_softmax_distribution(temperature):
    """With evenly spaced u, the number of draws of each token is its probability times the draws (to within
    one): the kernel's search is exactly the inverse of the distribution's cumulative sum."""
    generator = torch.Generator().manual_seed(int(temperature * 10))
    logits = torch.randn(37, generator=generator) * 2
    logits[[0, 5, 36]] = -float("inf")  # masked (as held-back, top-k and top-p tokens are): never drawn
    draws = 4000
    counts = torch.zeros(37)
    for i in range(draws):
        counts[kernel.sample(logits, temperature, (i + 0.5) / draws)] += 1
    expected = torch.softmax(logits.double() / temperature, -1) * draws
    assert (counts - expected).abs().max() <= 1.0 + 1e-6
    assert counts[[0, 5, 36]].sum() == 0
    assert kernel.sample(logits, temperature, 0.0) not in (
        0,
        5,
        36,
    )  # u = 0: the first token that may be drawn


@needs_kernel
def test_sample_over_a_vocabulary_lands_where_the_float64_cumulative_sum_says():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(49152, generator=generator) * 4
    cumulative = torch.softmax(logits.double() / 0.7, -1).cumsum(0)
    for u in torch.rand(200, generator=generator, dtype=torch.float64).tolist():
        j = kernel.sample(logits, 0.7, u)
        below = cumulative[j - 1].item() if j else 0.0
        assert below - 1e-5 <= u <= cumulative[j].item() + 1e-5


@needs_kernel
def test_sample_answers_none_where_there_is_no_distribution():
    assert kernel.sample(torch.tensor([0.0, float("nan")]), 1.0, 0.5) is None
    assert kernel.sample(torch.full((9,), -float("inf")), 1.0, 0.5) is None
    assert kernel.sample(torch.zeros(4, dtype=torch.float64), 1.0, 0.5) is None
    assert kernel.sample(torch.zeros(4), 0.0, 0.5) is None  # temperature 0 is greedy, not sampling
    assert kernel.sample(torch.zeros(4), 1.0, 1.0) is None  # u must be below 1


class FakeThreads:
    """`vicuna_threads` of a 2-core machine; a step takes what `cost` says for the team size."""

    def __init__(self) -> None:
        self.size, self.calls = 2, []

    def vicuna_threads(self, wanted: int) -> int:
        if wanted > 0:
            self.size = wanted
            self.calls.append(wanted)
        return self.size


def run_steps(team, library, steps: int, cost, rows: int = 1) -> list[int]:
    sizes = []
    for _ in range(steps):
        sizes.append(library.size)
        team.timed(cost(library.size), rows)
    return sizes


def test_the_team_gives_up_a_thread_whose_core_is_busy_and_takes_it_back_when_it_is_free():
    library = FakeThreads()
    team = kernel.Team(library)
    idle = {2: 7e-3, 1: 8.5e-3}.get  # both threads are faster on idle cores
    busy = {2: 25e-3, 1: 8.5e-3}.get  # another program on one core: its thread holds up every region
    sizes = run_steps(team, library, 200, idle)
    assert sizes.count(1) == team.WINDOW and sizes[-150:] == [2] * 150  # one fewer tried once, and left
    sizes = run_steps(team, library, 200, busy)
    assert 1 <= sizes.index(1) <= 6 and sizes[-100:] == [1] * 100  # one fewer within 6 slow steps
    tries = library.calls.count(2)
    run_steps(team, library, 2000, busy)
    assert 1 <= library.calls.count(2) - tries <= 6  # the whole team is tried again ever more rarely
    sizes = run_steps(team, library, 5000, idle)
    assert sizes[-100:] == [2] * 100  # and comes back once the core is free


def test_the_team_keeps_its_size_when_steps_slow_for_another_reason():
    library = FakeThreads()
    team = kernel.Team(library)
    run_steps(team, library, 30, {2: 7e-3, 1: 8.5e-3}.get)
    run_steps(team, library, 30, {2: 14e-3, 1: 17e-3}.get)  # a longer context: both sizes twice as slow
    assert run_steps(team, library, 100, {2: 14e-3, 1: 17e-3}.get)[-90:] == [2] * 90
    sixteen = run_steps(team, library, 100, {2: 20e-3, 1: 38e-3}.get, rows=16)  # more rows: their own times
    assert sixteen.count(1) == team.WINDOW and sixteen[-80:] == [2] * 80  # tried once for 16 rows too


def test_a_build_interrupted_by_ctrl_c_is_built_on_the_next_load(tmp_path, monkeypatch):
    """A notebook's interrupt of a first load_engine during the build left the kernel off, without a word,
    for every later load in that process."""
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path))
    monkeypatch.setattr(kernel, "_tried", False)
    monkeypatch.setattr(kernel, "_library", None)
    monkeypatch.setattr(kernel, "cpu_supported", lambda: True)
    monkeypatch.setenv("CXX", "c++")
    builds = []

    def open_library(compiler, progress):
        builds.append(compiler)
        raise KeyboardInterrupt if len(builds) == 1 else OSError("the second build, a failure for the test")

    monkeypatch.setattr(kernel, "open_library", open_library)
    with pytest.raises(KeyboardInterrupt):
        kernel.load(progress=False)
    assert kernel.load(progress=False) is None
    assert builds == ["c++", "c++"]  # built again, not taken for no kernel
