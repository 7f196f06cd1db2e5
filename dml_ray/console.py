"""The console of a run: our stage lines and progress on the terminal, everything else in the run's log file.

The CLI and the jobs call ``setup_console(verbose)`` once. Every log record then goes to the run's log file
(``runs/<id>/logs/run.log``, collected by ``run_log(run)`` while a run's stages run and appended when they
changed the run; the records before it are buffered and written first); the console shows the stage
runner's lines (one per stage start and end), the progress line, warnings of our code and errors of any,
or everything with ``verbose`` (``ConsoleFilter``).

Ray's lines reach this process in two ways, and both become log records:

* the driver's own Ray loggers (``ray``, ``ray.data``, ``ray.train``, ``ray.tune``) have their console
  handlers removed and propagate to ours (``quiet_ray_loggers``);
* the output of workers, which Ray forwards to the driver (``ray.init(log_to_driver=True)``), is routed by
  ``route_worker_output`` to the ``ray.worker`` logger instead of being printed. Lines carrying ``MARKER``
  are progress messages from our own code in a worker (``advance``, ``counted``) and drive the progress line.

Progress: ``expect(stage, rows)`` (driver) announces work, ``advance(stage, rows)`` (driver or worker) counts
it. On a terminal one line is redrawn in place (rows, rows/s, ETA); elsewhere (cron, ``ray job submit``)
a log line is written every ``NON_TTY_INTERVAL_S`` seconds.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Iterable, Iterator, Optional, TypeVar

log = logging.getLogger(__name__)

MARKER = "@dml_ray.progress "
PROGRESS_ENV = "DML_RAY_PROGRESS"
OWN_LOGGERS = ("dml_ray", "pipelines", "jobs", "__main__")
CONSOLE_LOGGERS = ("dml_ray", "dml_ray.progress", "pipelines.run", "pipelines.ray_env", "pipelines.tune")
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")
WORKER_LOGGER = "ray.worker"
LOG_FILE = ("logs", "run.log")
NON_TTY_INTERVAL_S = 10.0
TTY_INTERVAL_S = 0.2
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HOOK = "dml_ray_console"

T = TypeVar("T")


class ConsoleFilter(logging.Filter):
    """The console's records: INFO of the stage runner, the progress line and the commands (``CONSOLE_LOGGERS``),
    warnings of the rest of our code, errors of everything else; all of them when verbose."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return True
        if record.name in CONSOLE_LOGGERS or record.name.split(".", 1)[0] in ("jobs", "__main__"):
            return record.levelno >= logging.INFO
        own = record.name.split(".", 1)[0] in OWN_LOGGERS
        return record.levelno >= (logging.WARNING if own else logging.ERROR)


class _ConsoleHandler(logging.StreamHandler):
    """A stream handler that clears the progress line before it writes a record."""

    def emit(self, record: logging.LogRecord) -> None:
        if _state.progress is not None:
            _state.progress.clear()
        super().emit(record)


class _Buffer(logging.Handler):
    """The records before a run's log file is open (the last ``capacity``), replayed into it."""

    def __init__(self, capacity: int = 5000) -> None:
        super().__init__(logging.DEBUG)
        self.records: collections.deque = collections.deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class _Bar:
    stage: str
    unit: str = "rows"
    total: int = 0
    done: int = 0
    label: str = ""
    start: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = self.done / elapsed
        head = f"{self.stage}: {self.label + ' ' if self.label else ''}{self.done}"
        if not self.total:
            return f"{head} {self.unit}, {rate:.1f} {self.unit}/s"
        eta = (self.total - self.done) / rate if rate > 0 else None
        eta_text = "?" if eta is None else f"{eta:.0f} s"
        return (f"{head}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%), {rate:.1f} {self.unit}/s, "
                f"ETA {eta_text}")


class Progress:
    """The driver's progress line: redrawn in place on a terminal, else a log line every ``interval`` seconds."""

    def __init__(self, stream: IO[str], tty: bool, interval: Optional[float] = None) -> None:
        self.stream, self.tty = stream, tty
        self.interval = interval if interval is not None else (TTY_INTERVAL_S if tty else NON_TTY_INTERVAL_S)
        self.bars: dict[str, _Bar] = {}
        self.since: dict[str, float] = {}  # when each stage's first bar began (epochs of training share one)
        self.shown = False
        self.last = float("-inf")
        self.lock = threading.RLock()

    def expect(self, stage: str, rows: int, unit: str = "rows") -> None:
        with self.lock:
            bar = self.bars.setdefault(stage, _Bar(stage, unit))
            bar.total += rows

    def advance(self, stage: str, rows: int = 0, at: Optional[int] = None, total: Optional[int] = None,
                label: Optional[str] = None, unit: str = "rows", elapsed: Optional[float] = None) -> None:
        with self.lock:
            bar = self.bars.get(stage)
            if bar is None or (label is not None and label != bar.label):
                if bar is None and total is None:
                    return  # a late message of a finished stage
                bar = self.bars[stage] = _Bar(stage, unit, label=label or "")
            if elapsed is not None:  # the sender's clock: its pass began ``elapsed`` seconds ago
                bar.start = time.monotonic() - elapsed
            if total is not None:
                bar.total = total
            bar.done = at if at is not None else bar.done + rows
            self._show(bar)

    def _show(self, bar: _Bar) -> None:
        now = time.monotonic()
        if self.tty:
            if now - self.last < self.interval and not (bar.total and bar.done >= bar.total):
                return
        elif now - max(self.last, self.since.setdefault(bar.stage, bar.start)) < self.interval:
            return  # a stage shorter than the interval prints nothing
        self.last = now
        if self.tty:
            self.stream.write("\r\033[K" + bar.line())
            self.stream.flush()
            self.shown = True
        else:
            logging.getLogger("dml_ray.progress").info("%s", bar.line())

    def clear(self) -> None:
        with self.lock:
            if self.shown:
                self.stream.write("\r\033[K")
                self.stream.flush()
                self.shown = False

    def finish(self) -> None:
        """End every bar (a stage ended): the progress line is cleared, the next stage starts afresh."""
        with self.lock:
            self.clear()
            self.bars.clear()
            self.since.clear()
            self.last = float("-inf")


@dataclass
class _State:
    verbose: bool = False
    progress: Optional[Progress] = None
    buffer: Optional[_Buffer] = None


_state = _State()


def setup_console(verbose: bool = False, stream: Optional[IO[str]] = None) -> None:
    """Logging of the CLI and the jobs: the filtered console on ``stream`` (stderr), records buffered for the run
    log, Ray's driver loggers routed through ours, and the progress line."""
    stream = stream or sys.stderr
    reset_console()
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    console = _ConsoleHandler(stream)
    console.addFilter(ConsoleFilter(verbose))
    console.setFormatter(logging.Formatter("%(asctime)s %(message)s" if not verbose else FILE_FORMAT, "%H:%M:%S"))
    root.addHandler(console)
    _state.buffer = _Buffer()
    root.addHandler(_state.buffer)
    logging.captureWarnings(True)  # Python warnings (py.warnings) to the run log, on the console with verbose
    _state.verbose = verbose
    _state.progress = Progress(stream, tty=stream.isatty())
    os.environ[PROGRESS_ENV] = "1"  # Ray workers started from now on send progress messages
    quiet_ray_loggers()


def reset_console() -> None:
    """Undo ``setup_console`` (the end of an in-process ``main()``): our handlers removed, no progress line. Worker
    output stays routed to the ``ray.worker`` logger while this process is connected to Ray."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, (_ConsoleHandler, _Buffer)):
            root.removeHandler(handler)
    if _state.progress is not None:
        _state.progress.clear()
    _state.progress = _state.buffer = None
    os.environ.pop(PROGRESS_ENV, None)  # a Ray instance this process starts later gets no progress senders


def quiet_ray_loggers() -> None:
    """Ray's driver-side loggers print on their own handlers and do not propagate (ray/_private/log.py,
    ray/data/_internal/logging.py): drop their console handlers (their session-log files stay) and let the
    records propagate to the console filter and the run log."""
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True


def route_worker_output() -> None:
    """Worker output forwarded by Ray goes to the ``ray.worker`` logger (the run log; the console with
    ``--verbose``) instead of Ray's printer; progress messages (``MARKER``) drive the progress line.

    Ray has no public hook for the driver's printing of worker output: this replaces the handler ``ray.init``
    registers on ``global_worker_stdstream_dispatcher`` (the printer, with its deduplication, named
    ``ray_print_logs``) by ours. A no-op unless ``setup_console`` ran (library use keeps Ray's printer)."""
    if _state.progress is None:
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler(_HOOK)
    dispatcher.add_handler(_HOOK, _worker_lines)
    quiet_ray_loggers()


def ray_progress_bars() -> bool:
    """Whether Ray Data should draw its own progress bars: only with ``--verbose`` (or without our console)."""
    return _state.progress is None or _state.verbose


def _worker_lines(data: dict) -> None:
    worker = logging.getLogger(WORKER_LOGGER)
    who = data.get("actor_name") or data.get("task_name") or ""
    for line in data.get("lines", []):
        if MARKER in line:
            try:
                message = json.loads(line.split(MARKER, 1)[1])
            except ValueError:
                worker.info("(%s pid=%s) %s", who, data.get("pid"), line)
                continue
            advance(**message)
        else:
            worker.info("(%s pid=%s) %s", who, data.get("pid"), line)


@contextlib.contextmanager
def run_log(run) -> Iterator[Optional[str]]:  # run: dml_ray.io.run.Run (not imported: no cycle)
    """Collect every log record while the block runs (after the records buffered since ``setup_console``) and
    append them to the run's ``logs/run.log`` at the end, when the block changed the run (a stage ran: the
    manifest records it) or failed: re-running a finished run changes no file of it. Yields the log's URI, or
    None when ``setup_console`` did not run (library use: the caller's logging is left alone)."""
    if _state.buffer is None:
        yield None
        return
    uri = run.path(*LOG_FILE)
    handle, path = tempfile.mkstemp(prefix="dml_ray_run_", suffix=".log")
    os.close(handle)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.DEBUG if _state.verbose else logging.INFO)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    for record in _state.buffer.records:
        if record.levelno >= handler.level:
            handler.handle(record)
    _state.buffer.records.clear()
    root = logging.getLogger()
    root.removeHandler(_state.buffer)  # the file has the records now; the buffer waits for the next run
    root.addHandler(handler)
    manifest = run.manifest
    failed = True
    try:
        yield uri
        failed = False
    finally:
        root.removeHandler(handler)
        root.addHandler(_state.buffer)
        handler.close()
        try:
            if failed or run.manifest != manifest:
                with open(path, "rb") as f:
                    run.write_bytes(uri, (run.read_bytes(uri) or b"") + f.read())
        finally:
            os.remove(path)


def expect(stage: str, rows: int, unit: str = "rows") -> None:
    """Announce ``rows`` more rows of work for ``stage``'s progress line (in the driver)."""
    if _state.progress is not None:
        _state.progress.expect(stage, int(rows), unit)


def advance(stage: str, rows: int = 0, at: Optional[int] = None, total: Optional[int] = None,
            label: Optional[str] = None, unit: str = "rows", elapsed: Optional[float] = None) -> None:
    """Count ``rows`` done for ``stage`` (or set the position ``at`` of ``total``, under ``label``, reached
    ``elapsed`` seconds after the pass began).

    In the driver it updates the progress line; in a Ray worker it writes a ``MARKER`` line to stdout,
    which Ray forwards to the driver (``route_worker_output``)."""
    if _state.progress is not None:
        _state.progress.advance(stage, int(rows), at, total, label, unit, elapsed)
    elif _in_ray_worker():
        message = {k: v for k, v in {"stage": stage, "rows": int(rows), "at": at, "total": total, "label": label,
                                     "unit": unit, "elapsed": elapsed}.items() if v is not None}
        _worker_logger().info("%s%s", MARKER, json.dumps(message))


def counted(items: Iterable[T], stage: str, total: Optional[int] = None, label: Optional[str] = None,
            unit: str = "steps", every_s: float = 1.0) -> Iterator[T]:
    """``items``, reporting the position in them to ``stage``'s progress line at most every ``every_s`` seconds
    and after the last one (training steps within an epoch)."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None
    start = last = time.monotonic()
    i = 0
    for i, item in enumerate(items, 1):
        yield item
        if time.monotonic() - last >= every_s:
            last = time.monotonic()
            advance(stage, at=i, total=total, label=label, unit=unit, elapsed=round(last - start, 3))
    advance(stage, at=i, total=total, label=label, unit=unit, elapsed=round(time.monotonic() - start, 3))


def finish_progress() -> None:
    """A stage ended: clear its progress line."""
    if _state.progress is not None:
        _state.progress.finish()


def _in_ray_worker() -> bool:
    """Whether this is a Ray worker of a driver that shows progress (``setup_console`` set PROGRESS_ENV before
    Ray started): a library user's own driver gets no marker lines."""
    if os.environ.get(PROGRESS_ENV) != "1":
        return False
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    return ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def _worker_logger() -> logging.Logger:
    """The logger a worker's progress messages go through: plain lines on stdout, which Ray forwards."""
    logger = logging.getLogger("dml_ray.console.worker")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
