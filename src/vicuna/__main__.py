"""`python -m vicuna` is the `vicuna` command."""

from vicuna.cli import run

run()
