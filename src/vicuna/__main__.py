"""`python -m vicuna` is the `vicuna` command."""

from vicuna.cli import main

raise SystemExit(main())
