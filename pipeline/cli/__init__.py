"""Command line: thin; parses flags into a config and calls the API.

Exit status: 0 when the run completed (bad images are data, in errors/); 2 with one line on stderr for bad
configuration (unknown model or layer, unreachable source...); 1 for a failure during the run.
"""

from __future__ import annotations

import importlib

from pipeline.cli.common import app

__all__ = ["app", "main"]

# each registers its commands on the app, in this order in --help
for _module in ("images", "analytics", "serve"):
    importlib.import_module(f"pipeline.cli.{_module}")


def main(argv: list[str] | None = None) -> None:
    """The console script; ``argv`` (default: sys.argv[1:]) lets a job file run one command."""
    app(args=argv)
