"""`vicuna bench memory`: weight memory and peak RSS of a loaded model per dtype and with 8-bit weights, and
peak RSS and MB/s of `vicuna convert` and `vicuna delta apply` on a generated checkpoint.

Every measurement runs in a fresh subprocess (`python -m vicuna.bench.memory JOB`), because peak RSS is a
high-water mark of the whole process: measuring two things in one process would mix them. Each child
imports torch, safetensors, transformers' classes and the jobs' modules before it notes its idle RSS and
starts the clock, so the children differ only by the job, and a job's "peak RSS above idle" is what it held
at most (the tensors it made and the pages of its memory-mapped inputs it had read), as the convert and
delta tests measure it.
Baselines: float32 for the other dtypes, bfloat16 for 8-bit, a plain copy of the same bytes in another
child for convert and delta apply.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from vicuna.bench.report import Report
from vicuna.config import ModelSettings
from vicuna.errors import VicunaError

MB = 10**6
MiB = 2**20
# The share of LLaMA-7B's bytes in its token-embedding table and output head (2 x 32000 x 4096 of 6.74B
# parameters), which the generated checkpoint keeps: a job holds a few tensors at once, so the largest must
# be as small a part of the checkpoint as in a real model. With a 32000-row vocabulary at width 1024 those
# two tables were 84% of a 157 MB checkpoint, and delta apply seemed to hold 1.4x the model.
EMBEDDING_SHARE = 0.039
# Within the convert and delta tests' bound (tests/weights), which README's claims rest on.
HELD_TARGET = 0.75


# --- inside a child ----------------------------------------------------------------------------


def current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """This process's highest resident set size so far, in bytes.

    On Linux it is VmHWM, which starts afresh at exec; `getrusage`'s ru_maxrss does not: a child inherits
    the high-water mark of the parent it was forked from, which would hide a small job's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows: psutil knows the peak working set
        import psutil

        return int(psutil.Process().memory_info().peak_wset)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, the BSDs KiB


def copy_files(files: list[str], out_dir: str) -> int:
    """A plain copy of `files` into `out_dir`, flushed to disk like a written checkpoint; bytes copied."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for name in files:
        dst = out / Path(name).name
        shutil.copyfile(name, dst)
        total += dst.stat().st_size
    return total


def weight_file_bytes(folder: Path) -> int:
    return sum(Path(name).stat().st_size for name in weight_files(folder))


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Do one measured job in this process and return its figures (the child's side)."""
    # imported before the idle RSS and the clock, in every child alike: transformers loads its modules on
    # first use, which took ~2 s of a 157 MB conversion's ~2 s here (0.03x a copy's MB/s with it, 0.2x
    # without); a one-time cost, not a rate
    import torch  # noqa: F401
    from safetensors.torch import save_file  # noqa: F401
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: F401

    import vicuna.weights.checkpoint  # noqa: F401 (what convert and delta apply import when they start)
    from vicuna.engine.loader import load_engine
    from vicuna.weights.convert import convert_meta
    from vicuna.weights.delta import apply_delta

    kind = job["kind"]
    idle_rss = current_rss()
    start = time.perf_counter()
    result: dict[str, Any] = {}
    if kind == "load":
        from vicuna.bench.latency import SHORT_QUESTION, time_engine
        from vicuna.conversation import Message
        from vicuna.engine.quant import weight_bytes

        engine = load_engine(ModelSettings(**job["settings"]), progress=False)
        result["load_s"] = time.perf_counter() - start
        result["weight_bytes"] = weight_bytes(engine.model)
        result["loaded_rss"] = current_rss()
        ids = engine.encode_chat([Message(role="user", content=SHORT_QUESTION)])
        result["decode_tokens_per_s"] = time_engine(engine, ids, job["new_tokens"]).decode_tokens_per_s
    elif kind == "convert":
        convert_meta(Path(job["meta_dir"]), Path(job["out_dir"]), dtype="float16", progress=False)
        result["bytes"] = weight_file_bytes(Path(job["out_dir"]))
    elif kind == "delta":
        apply_delta(Path(job["base"]), Path(job["delta"]), Path(job["target"]), progress=False)
        result["bytes"] = weight_file_bytes(Path(job["target"]))
    elif kind == "copy":
        result["bytes"] = copy_files(job["files"], job["out_dir"])
    else:
        raise ValueError(f"unknown job kind {kind!r}")
    result |= {"seconds": time.perf_counter() - start, "idle_rss": idle_rss, "peak_rss": peak_rss()}
    return result


# --- in the parent -----------------------------------------------------------------------------


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    """Run `job` in a fresh Python process and return what it measured."""
    proc = subprocess.run(
        [sys.executable, "-m", "vicuna.bench.memory", json.dumps(job)],
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    last = proc.stdout.strip().splitlines()[-1:]
    if proc.returncode != 0:
        if last and last[0].startswith('{"error": '):  # refused (no GPU, no model there...): said in a line
            raise VicunaError(f"the {job['kind']} measurement: {json.loads(last[0])['error']}")
        raise VicunaError(f"the {job['kind']} measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(last[0])


# the checkpoint's copies kept in $TMPDIR at once: Meta's, converted, its plain copy, the delta, merged, its copy
CHECKPOINT_COPIES = 6


def meta_params(weights_mb: float) -> tuple[dict[str, Any], int]:
    """A LLaMA shape (params.json, vocab) whose float16 weights take about `weights_mb` MB, with LLaMA-7B's
    share of the bytes in the embedding table and output head (`EMBEDDING_SHARE`): width 1024 from 100 MB
    (whole layers of ~26 MB), 128 below (layers of ~0.5 MB, for tests)."""
    from vicuna.weights.convert import ffn_hidden_size

    dim = 1024 if weights_mb >= 100 else 128
    params = {"dim": dim, "n_heads": dim // 64, "multiple_of": 256, "norm_eps": 1e-5}
    per_layer = 4 * dim * dim + 3 * dim * ffn_hidden_size({**params, "n_layers": 1}) + 2 * dim
    total = weights_mb * MB / 2  # float16 parameters
    vocab = max(round(EMBEDDING_SHARE * total / (2 * dim)), 32)
    layers = round((total - 2 * vocab * dim - dim) / per_layer)
    return {**params, "n_layers": max(layers, 1), "vocab_size": vocab}, vocab


def largest_tensor_bytes(params: dict[str, Any]) -> int:
    """The bytes of the checkpoint's largest tensor (float16), which a job holds a few of at once."""
    from vicuna.weights.convert import ffn_hidden_size

    return 2 * max(params["vocab_size"], ffn_hidden_size(params)) * params["dim"]


def meta_bytes(params: dict[str, Any]) -> int:
    """The float16 weights' bytes of the checkpoint `write_meta_checkpoint` writes for `params`."""
    from vicuna.weights.convert import ffn_hidden_size

    dim, vocab = params["dim"], params["vocab_size"]
    per_layer = 4 * dim * dim + 3 * dim * ffn_hidden_size(params) + 2 * dim
    return 2 * (2 * vocab * dim + dim + params["n_layers"] * per_layer)


def write_meta_checkpoint(folder: Path, weights_mb: float, seed: int = 0) -> Path:
    """Random float16 LLaMA weights in Meta's layout (params.json + consolidated.00.pth), no tokenizer."""
    import torch

    from vicuna.weights.convert import ffn_hidden_size

    params, vocab = meta_params(weights_mb)
    dim, ffn = params["dim"], ffn_hidden_size(params)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * 0.02).half()

    def norm(dim: int) -> torch.Tensor:  # near 1, as a model's (a delta's are near 0)
        return 1 + rand(dim)

    state = {
        "tok_embeddings.weight": rand(vocab, dim),
        "norm.weight": norm(dim),
        "output.weight": rand(vocab, dim),
    }
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        state |= {p + f"attention.{w}.weight": rand(dim, dim) for w in ("wq", "wk", "wv", "wo")}
        state |= {p + "feed_forward.w1.weight": rand(ffn, dim), p + "feed_forward.w3.weight": rand(ffn, dim)}
        state |= {p + "feed_forward.w2.weight": rand(dim, ffn)}
        state |= {p + "attention_norm.weight": norm(dim), p + "ffn_norm.weight": norm(dim)}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(params), encoding="utf-8")
    return folder


def write_delta(base: Path, out: Path, seed: int = 1) -> Path:
    """Random delta weights with the base's tensor names, shapes and dtypes, and its config."""
    import torch
    from safetensors.torch import save_file

    from vicuna.weights.checkpoint import CheckpointReader, side_files

    gen = torch.Generator().manual_seed(seed)
    specs = CheckpointReader(base).specs.values()
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {s.name: (torch.randn(s.shape, generator=gen) * 1e-3).to(s.dtype) for s in specs},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    for path in side_files(base):
        shutil.copyfile(path, out / path.name)
    return out


def weight_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir() if p.suffix in (".safetensors", ".pth", ".bin"))


def bench_memory(
    settings: ModelSettings,
    *,
    dtypes: list[str] | None = None,
    new_tokens: int = 32,
    weights_mb: float | None = 512,
    progress: bool = True,
) -> Report:
    """Load the model in each dtype and in 8-bit (each in its own process); convert and merge a generated
    checkpoint of about `weights_mb` MB (skipped when None), each beside a plain copy of the same bytes."""
    from vicuna.bench.report import machine_info, progress_bar

    if weights_mb is not None and weights_mb < 1:
        raise VicunaError(
            f"--weights-mb must be at least 1, not {weights_mb:g} (--skip-weights leaves convert and delta "
            "apply out)"
        )
    shape = meta_params(weights_mb)[0] if weights_mb is not None else None  # params.json
    if shape:  # before minutes of loading: a small or full $TMPDIR (a container's) failed at the checkpoints
        from vicuna.weights.disk import ensure_free_space

        try:
            ensure_free_space(
                Path(tempfile.gettempdir()),
                CHECKPOINT_COPIES * meta_bytes(shape),
                f"bench memory's generated checkpoints (--weights-mb {weights_mb:g})",
            )
        except VicunaError as err:
            raise VicunaError(f"{err} (TMPDIR), or pass a smaller --weights-mb, or --skip-weights") from None
    dtypes = list(dict.fromkeys(dtypes or ["float32", "bfloat16", "float16"]))
    loads = {d: replace(settings, dtype=d, load_8bit=False) for d in dict.fromkeys([*dtypes, "bfloat16"])}
    loads["bfloat16 + 8-bit"] = replace(settings, dtype="bfloat16", load_8bit=True)
    samples: dict[str, Any] = {"load": {}, "weights": {}}
    steps = len(loads) + (5 if shape else 0)
    with progress_bar(progress) as bar, tempfile.TemporaryDirectory() as tmp:
        task = bar.add_task("memory", total=steps)
        for name, s in loads.items():
            bar.update(task, description=f"load {name}")
            samples["load"][name] = run_child(
                {"kind": "load", "settings": asdict(s), "new_tokens": new_tokens}
            )
            bar.advance(task)
        if shape:
            root = Path(tmp)
            bar.update(task, description=f"generate a {meta_bytes(shape) / MB:,.0f} MB checkpoint")
            meta = write_meta_checkpoint(root / "meta", weights_mb)
            bar.update(task, description="convert")
            samples["weights"]["convert"] = run_child(
                {"kind": "convert", "meta_dir": str(meta), "out_dir": str(root / "hf")}
            )
            bar.advance(task)
            bar.update(task, description="copy (for convert)")
            samples["weights"]["convert copy"] = run_child(
                {"kind": "copy", "files": weight_files(meta), "out_dir": str(root / "meta-copy")}
            )
            bar.advance(task)
            bar.update(task, description="generate delta")
            delta = write_delta(root / "hf", root / "delta")
            bar.advance(task)
            bar.update(task, description="delta apply")
            samples["weights"]["delta apply"] = run_child(
                {
                    "kind": "delta",
                    "base": str(root / "hf"),
                    "delta": str(delta),
                    "target": str(root / "merged"),
                }
            )
            bar.advance(task)
            bar.update(task, description="copy (for delta apply)")
            samples["weights"]["delta apply copy"] = run_child(
                {"kind": "copy", "files": weight_files(root / "hf"), "out_dir": str(root / "hf-copy")}
            )
            bar.advance(task)
    report = Report(
        "memory",
        settings={
            "model_path": settings.model_path,
            "device": settings.device,
            "dtypes": dtypes,
            "new_tokens": new_tokens,
            "weights_mb": weights_mb,
            "checkpoint_bytes": meta_bytes(shape) if shape else None,
            "largest_tensor_bytes": largest_tensor_bytes(shape) if shape else None,
        },
        machine=machine_info(),
        samples=samples,
    )
    add_memory_rows(report, samples, dtypes)
    return report


def add_memory_rows(report: Report, samples: dict[str, Any], dtypes: list[str]) -> None:
    """Rows from the children's figures: dtypes against the first one listed (float32 by default), 8-bit
    against bfloat16, convert and delta apply against a plain copy of the same bytes."""
    loads = samples["load"]
    reference = dtypes[0]
    for name in [*dtypes, "bfloat16 + 8-bit"]:
        base = "bfloat16" if name.endswith("8-bit") else reference
        got, ref = loads[name], loads[base]
        target = 0.55 if name.endswith("8-bit") else None
        group = f"load {name}"
        report.add(group, "weight memory", "MiB", got["weight_bytes"] / MiB, base, ref["weight_bytes"] / MiB,
                   target=target, target_op="<=")  # fmt: skip
        report.add(group, "peak RSS", "MiB", got["peak_rss"] / MiB, base, ref["peak_rss"] / MiB)
    for job in ("convert", "delta apply"):
        if job not in samples.get("weights", {}):
            continue
        got, copy = samples["weights"][job], samples["weights"][f"{job} copy"]
        group = f"{job} ({got['bytes'] / MB:,.0f} MB checkpoint)"
        rate, copy_rate = got["bytes"] / got["seconds"] / MB, copy["bytes"] / copy["seconds"] / MB
        report.add(group, "throughput", "MB/s", rate, "file copy", copy_rate)
        report.add(group, "peak RSS", "MiB", got["peak_rss"] / MiB, "file copy", copy["peak_rss"] / MiB)
        # what the job held at most: its peak above the child's RSS after its imports
        report.add(group, "peak RSS above idle", "MiB", (got["peak_rss"] - got["idle_rss"]) / MiB,
                   "checkpoint size", got["bytes"] / MiB, target=HELD_TARGET, target_op="<=")  # fmt: skip


if __name__ == "__main__":
    try:
        print(json.dumps(run_job(json.loads(sys.argv[1]))), flush=True)
    except VicunaError as err:  # a refusal, not a crash: the parent says it as the command would
        print(json.dumps({"error": str(err)}), flush=True)
        sys.exit(2)
