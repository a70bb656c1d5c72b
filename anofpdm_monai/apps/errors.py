"""How the bundle workflows end when something goes wrong: one line naming the cause instead of MONAI's 50-line
traceback, and an exit status that tells "could not start" from "ran, but some cases failed".

The workflow configs call :func:`install` first in ``initialize`` (``--debug true`` keeps the full traceback).

Exit status: 0 done; 2 the run could not start or stopped (bad argument, file or configuration: nothing, or not
everything, was attempted); 3 the run went through every case and some failed (the others were written, the
summary lists the failures).
"""

from __future__ import annotations

import os
import sys
import traceback
from types import TracebackType
from typing import Any

from ..engines.inference import InferenceFailures
from ..io import first_line
from .options import flag

__all__ = ["EXIT_COULD_NOT_START", "EXIT_SOME_CASES_FAILED", "install", "root_cause", "exit_status"]

EXIT_COULD_NOT_START = 2
EXIT_SOME_CASES_FAILED = 3

# messages of the exceptions MONAI wraps around the real one while it parses, instantiates and applies
_WRAPPERS = ("Failed to instantiate", "Failed to evaluate", "applying transform", "Failed to resolve")


def root_cause(exc: BaseException) -> BaseException:
    """The exception under MONAI's wrappers (config instantiation/evaluation, ``Compose``)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = exc.__cause__ or exc.__context__
        if inner is None or not str(exc).strip().startswith(_WRAPPERS):
            break
        exc = inner
    return exc


def exit_status(exc: BaseException) -> int:
    return EXIT_SOME_CASES_FAILED if isinstance(root_cause(exc), InferenceFailures) else EXIT_COULD_NOT_START


def install(debug: Any = False) -> None:
    """Make an uncaught exception end the process with one line on stderr (the full traceback with ``debug``) and
    :func:`exit_status`; an interrupt (Ctrl-C) keeps Python's behaviour.

    ``debug`` is read by :func:`anofpdm_monai.apps.options.flag` (``--debug true``, ``--debug False``, ...); a value
    that is not a boolean is refused in one line, the hook already installed."""
    _install(False)
    _install(flag(debug, "debug"))


def _install(debug: bool) -> None:
    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, exc, tb)
            return
        # the process's own stderr: under torchrun sys.stderr may be a buffer that os._exit would never write
        err = sys.__stderr__ or sys.stderr
        sys.stdout.flush()
        sys.stderr.flush()
        if debug:
            traceback.print_exception(kind, exc, tb, file=err)
        root = root_cause(exc)
        print(f"error: {type(root).__name__}: {first_line(root)}", file=err)
        if not debug:
            print("(run again with --debug true for the traceback)", file=err)
        err.flush()
        os._exit(exit_status(exc))  # after flushing: the interpreter's own exit would use status 1

    sys.excepthook = hook
