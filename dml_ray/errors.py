"""One error taxonomy for the CLI and the jobs: every failure is an exit code and one line.

    0    ok (also when everything was already committed)
    1    unexpected failure (a crash, a lost node, a storage outage): a retry may succeed
    2    bad configuration or input (invalid config, missing or damaged dataset / checkpoint / table,
         refused query, URI scheme not allowed, unwritable output root): a retry fails the same way
    3    the output root is locked by another run: retry later
    4    error budget exceeded: more unreadable images than ``embed.max_error_fraction``; nothing committed
    130  interrupted (Ctrl-C / SIGINT): committed stages are kept, the same command resumes

Tracebacks are for ``--verbose`` only.
"""
from __future__ import annotations

import errno
import pickle

EXIT_OK, EXIT_RETRY, EXIT_BAD_INPUT, EXIT_LOCKED, EXIT_ERROR_BUDGET = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130

EXIT_NAMES = {EXIT_RETRY: "failed", EXIT_BAD_INPUT: "bad config or input", EXIT_LOCKED: "locked",
              EXIT_ERROR_BUDGET: "error budget exceeded", EXIT_INTERRUPTED: "interrupted"}

# errnos of a storage location no retry will make writable or readable
_BAD_LOCATION_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}

MAX_LINE = 600


class BadInput(ValueError):
    """Input that no retry can fix: a damaged table or checkpoint, a refused query, an unusable location."""


class CheckpointRefused(BadInput, pickle.UnpicklingError):
    """A checkpoint that ``weights_only`` loading refuses: it carries code or objects other than tensors."""


class LockHeld(RuntimeError):
    """Another run holds the output root's lock."""


class ErrorBudgetExceeded(RuntimeError):
    """More inputs failed than the configured error budget allows; nothing was committed."""


def _is_duckdb(err: BaseException) -> bool:
    return type(err).__module__.split(".")[0] in ("duckdb", "_duckdb")


def exit_code(err: BaseException) -> int:
    """The exit code of the taxonomy for ``err`` (see the module docstring)."""
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(err, LockHeld):
        return EXIT_LOCKED
    if isinstance(err, ErrorBudgetExceeded):
        return EXIT_ERROR_BUDGET
    if isinstance(err, (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)):
        return EXIT_BAD_INPUT
    if isinstance(err, OSError) and err.errno in _BAD_LOCATION_ERRNOS:
        return EXIT_BAD_INPUT
    if _is_duckdb(err):
        return EXIT_BAD_INPUT  # SQL that does not parse, bind or run: the query is the input
    return EXIT_RETRY


def one_line(err: BaseException) -> str:
    """The error as one line: a remote traceback is cut to its last line, whitespace collapsed, length capped."""
    cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError keeps the remote exception here
    if isinstance(cause, BaseException) and cause is not err:
        return one_line(cause)
    text = str(err)
    if _is_duckdb(err):
        text = text.strip().splitlines()[0] if text.strip() else text  # the rest is the SQL with a caret
    if "Traceback (most recent call last)" in text:
        lines = [line for line in text.splitlines() if line.strip()]
        text = lines[-1] if lines else text
    text = " ".join(text.split())
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    if not text or (exit_code(err) == EXIT_RETRY and not text.startswith(type(err).__name__)):
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 3] + "..."
