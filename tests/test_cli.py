"""The `vicuna` command itself: dispatch and the process settings it makes before any command runs."""

from __future__ import annotations

import os
import subprocess
import sys

from vicuna.cli import SPIN_COUNT


def test_openmp_spinning_is_shortened_before_torch_loads_unless_the_user_chose():
    code = "import os, sys; from vicuna.cli import main; main(['template', 'list']); print(os.environ['GOMP_SPINCOUNT'], 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == [SPIN_COUNT, "False"]  # set, and torch not loaded before
    env["GOMP_SPINCOUNT"] = "123"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2] == "123"
