"""What every command of the CLI shares: the typer app, the help texts, and how results and errors are
printed (exit 0, 1 or 2)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from pipeline.output.lease import LeaseHeld
from pipeline.storage import redact

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Batch transfer learning: pretrained vision backbones -> embeddings in Parquet, on Ray.",
)

SET_HELP = "override any config key, e.g. --set runtime.batch_size=64 (repeatable)"
LOCK_WAIT_HELP = "when another run is writing the output, wait up to this long for it (default: stop at once)"
BREAK_LOCK_HELP = "take the output's lease from another run (only when you know that run is dead)"
# The two options of every command that writes an output (pipeline/output/lease.py)
WaitForLock = Annotated[float, typer.Option("--wait-for-lock", metavar="SECONDS", help=LOCK_WAIT_HELP)]
BreakLock = Annotated[bool, typer.Option("--break-lock", help=BREAK_LOCK_HELP)]


def lock_policy(wait_for_lock: float, break_lock: bool):
    from pipeline.output.lease import LockPolicy

    if wait_for_lock < 0:
        fail(f"--wait-for-lock {wait_for_lock:g}: give 0 or more seconds")
    return LockPolicy(wait_s=wait_for_lock, break_lock=break_lock)


def fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {redact(msg)}", err=True)
    raise typer.Exit(code)


def echo(result: Any, fmt: Callable[[Any], str], as_json: bool) -> None:
    """A command's result as its formatted text, or with --json as JSON."""
    result = redact(result)
    typer.echo(json.dumps(result, indent=2, default=str) if as_json else fmt(result))


def invoke(fn, rerun_hint: bool = False):
    """Call fn; turn input errors into one line and exit 2, run failures into one line and exit 1."""
    try:
        return fn()
    except typer.Exit:
        raise
    except LeaseHeld as e:  # another run writes the output: nothing was done
        fail(str(e), 1)
    except ValueError as e:  # ConfigError, BackboneError, StorageError, WeightsError are ValueErrors
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__, 2)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback only on request
        if "--debug" in sys.argv:
            raise
        again = "; rerun the same command to resume" if rerun_hint else ""
        fail(f"run failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              f"(rerun with --debug for the traceback{again})", 1)
