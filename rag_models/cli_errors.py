"""One way for every console script to fail: ``COMMAND: error: ...`` on one stderr line, exit status 2.

Every ``main()`` of the project's commands is wrapped by :func:`command`. A user's mistake
(an `InputError`, a Hydra composition / override / instantiation error, an OmegaConf key or
type error, a missing or unreadable file) becomes one line naming the setting or file and the
fix; the traceback is shown only with ``--debug`` (any position on the command line) or the
environment variable ``RAG_DEBUG=1``. Anything else is a bug in the project and keeps its
traceback.

    @command("rag-score")
    def main(argv: list[str] | None = None) -> int: ...
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from rag_models.errors import InputError

DEBUG_FLAG = "--debug"
DEBUG_ENV = "RAG_DEBUG"
EXIT_USER_ERROR = 2  # as argparse exits on a bad command line
F = TypeVar("F", bound=Callable[..., Any])


def debugging() -> bool:
    """True when tracebacks are wanted (``--debug`` was given, or ``RAG_DEBUG=1``)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _one_line(text: str) -> str:
    """A multi-line library message as one line: its non-empty lines joined by '; '."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "; ".join(lines)


def user_error_message(err: BaseException) -> str | None:
    """The one-line message of a user's mistake, or None when ``err`` is a bug (keeps its traceback)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, InputError):
        return _one_line(str(err))
    if isinstance(err, (HydraException, OmegaConfBaseException)):
        cause = err.__cause__
        text = _one_line(str(err).split("Config search path")[0])  # Hydra's list of its search path: noise
        if cause is not None and str(cause) and str(cause) not in str(err):
            text += "; " + _one_line(str(cause))
        return f"{text}. Check the setting named above (`--cfg job` prints the composed config)"
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}. Check the path and its permissions"
    return None


@contextmanager
def reported(prog: str) -> Iterator[None]:
    """Turn a user's mistake raised inside into ``PROG: error: ...`` on stderr and ``SystemExit(2)``."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - every user error is reported; a bug is re-raised untouched
        message = user_error_message(err)
        if message is None:
            raise
        if debugging():
            traceback.print_exc()
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None


@contextmanager
def warnings_as_lines(prog: str) -> Iterator[None]:
    """Python warnings as ``PROG: warning: message`` (one line, no source path or code line) while inside;
    with ``--debug`` they keep Python's own format (file and line)."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 - stdlib hook
        if debugging():
            shown(message, category, filename, lineno, file, line)
            return
        print(f"{prog}: warning: {_one_line(str(message))}", file=file or sys.stderr, flush=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _without_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether it was there."""
    kept = [arg for arg in argv if arg != DEBUG_FLAG]
    return kept, len(kept) != len(argv)


def command(prog: str) -> Callable[[F], F]:
    """Decorator of a console script's ``main(argv=None)`` (or ``main()``): one way to fail, ``--debug``.

    ``--debug`` is taken out of ``argv`` (or of ``sys.argv`` when ``argv`` is None, so that argparse and
    Hydra never see it) and sets ``RAG_DEBUG=1`` for the run (child processes inherit it).
    """

    def wrap(main: F) -> F:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> Any:
            given = list(sys.argv[1:] if argv is None else argv)
            kept, debug = _without_debug(given)
            previous = os.environ.get(DEBUG_ENV)
            if debug:
                os.environ[DEBUG_ENV] = "1"
            saved_argv = sys.argv
            try:
                with reported(prog), warnings_as_lines(prog):
                    if argv is None:
                        sys.argv = [sys.argv[0], *kept]
                        return main()
                    return main(kept)
            finally:
                sys.argv = saved_argv
                if debug:
                    if previous is None:
                        os.environ.pop(DEBUG_ENV, None)
                    else:
                        os.environ[DEBUG_ENV] = previous

        return run  # type: ignore[return-value]

    return wrap


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type=``: an integer >= ``minimum`` (argparse names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = at_least(1)
