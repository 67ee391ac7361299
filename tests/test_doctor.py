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
    assert "--num-gpus applies to CUDA GPUs; on cpu it is ignored" in err
    assert main([*model, "--num-gpus", "2", "--max-gpu-memory", "10GiB"]) == 0
    assert (
        "--num-gpus and --max-gpu-memory apply to CUDA GPUs; on cpu they are ignored"
        in capsys.readouterr().err
    )
