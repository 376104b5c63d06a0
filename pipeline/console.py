"""What a person watching a run sees, and where everything else goes.

A run writes two streams:

* **the screen** (the terminal or the CI log): lmpipe's own lines only -- stage started, parts
  done, committed, warnings that mean something, the training steps and validation losses its
  workers report. In a terminal the running stage also has one live status line (parts done,
  rows/s, bytes/s, ETA); anywhere else every line is plain and timestamped, with no escape codes.
* **the run's log file** (its path is said once at the start): every line -- lmpipe's, Ray's
  (Ray Data's plans and progress blocks, Ray Train's controller, the C++ core worker's messages
  written straight to file descriptor 2) and every worker's output -- so nothing shown before
  is lost. ``--verbose`` puts all of it on the screen as well.

Workers mark their lmpipe log lines (``worker_process_setup_hook``), so the driver can tell them
apart from the rest of a worker's output without guessing from the text.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from typing import Any, Optional, TextIO

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
WORKER_MARK = "[lmpipe] "  # how a worker's lmpipe log line starts (see setup_worker_logging)
LOG_DIR_ENV = "LMPIPE_LOG_DIR"
_LOGGER = "lmpipe"

log = logging.getLogger(_LOGGER)


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def default_log_dir(work_dir: str) -> str:
    """Where a run's log file goes: ``$LMPIPE_LOG_DIR``, else ``<work_dir>/_logs`` for a local work
    dir, else ``~/.cache/lmpipe/logs`` (a log is written as it goes, which object stores cannot)."""
    if os.environ.get(LOG_DIR_ENV):
        return os.environ[LOG_DIR_ENV]
    if "://" in work_dir and not work_dir.startswith("file://"):
        return os.path.join(os.path.expanduser("~"), ".cache", "lmpipe", "logs")
    return os.path.join(work_dir.removeprefix("file://"), "_logs")


class _StripAnsi(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "\x1b" in record.msg:
            record.msg = strip_ansi(record.msg)
        return True


class _LmpipeOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == _LOGGER or record.name.startswith(_LOGGER + ".")


class _Console(logging.Handler):
    """lmpipe's lines on the screen; in a terminal, a live status line kept below them."""

    def __init__(self, stream: TextIO, tty: bool):
        super().__init__()
        self.stream, self.tty = stream, tty
        self._status = ""
        self._lock_out = threading.Lock()
        datefmt = "%H:%M:%S" if tty else "%Y-%m-%d %H:%M:%S"
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt=datefmt))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if not self.tty:
                line = strip_ansi(line)
            with self._lock_out:
                if self.tty and self._status:
                    self.stream.write("\r\x1b[K")
                self.stream.write(line + "\n")
                if self.tty and self._status:
                    self.stream.write(self._status)
                self.stream.flush()
        except Exception:  # pragma: no cover - logging must never take the run down
            self.handleError(record)

    def status(self, text: str) -> None:
        """The live line (terminal only); an empty text clears it."""
        if not self.tty:
            return
        with self._lock_out:
            self._status = text
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()


_active: Optional["RunOutput"] = None


def status(text: str) -> None:
    """Update the running stage's live status line (a no-op outside a terminal or a run)."""
    if _active is not None and _active.console is not None:
        _active.console.status(text)


def is_live() -> bool:
    """Whether a live status line is being shown (a run in a terminal)."""
    return _active is not None and _active.console is not None and _active.console.tty


class RunOutput:
    """Sets up both streams for the duration of a run (``with RunOutput(path, verbose): ...``).

    File descriptor 2 is pointed at a pipe whose reader copies every line into the log file, so
    what native code writes there (Ray's C++ core worker) is kept but not shown; lmpipe's own
    screen output goes to a duplicate of the original descriptor."""

    def __init__(self, log_path: str, verbose: bool = False):
        self.log_path, self.verbose = log_path, verbose
        self.console: Optional[_Console] = None
        self._file: Optional[TextIO] = None
        self._saved_fd: Optional[int] = None
        self._pipe_thread: Optional[threading.Thread] = None
        self._saved_root: tuple[list[logging.Handler], int] = ([], logging.WARNING)
        self._saved_env: dict[str, Optional[str]] = {}
        self._own_handlers: list[logging.Handler] = []

    def __enter__(self) -> "RunOutput":
        global _active
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        self._file = open(self.log_path, "a", encoding="utf-8", buffering=1)
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        screen = os.fdopen(os.dup(self._saved_fd), "w", buffering=1, encoding="utf-8", errors="replace")
        tty = os.isatty(self._saved_fd) and os.environ.get("TERM") != "dumb"
        self.console = _Console(screen, tty)
        if not self.verbose:
            self.console.addFilter(_LmpipeOnly())
        file_handler = logging.StreamHandler(self._file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        file_handler.addFilter(_StripAnsi())
        root = logging.getLogger()
        self._saved_root = (list(root.handlers), root.level)
        for h in list(root.handlers):  # the CLI's plain stderr handler (a test's capture handler stays)
            if type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__):
                root.removeHandler(h)
        root.addHandler(file_handler)
        root.addHandler(self.console)
        root.addHandler(_NoticeHandler())
        self._own_handlers = [file_handler, self.console]
        root.setLevel(logging.DEBUG if self.verbose else logging.INFO)
        logging.captureWarnings(True)
        # Ray's prefixes of worker lines carry colour codes unless told otherwise
        for key, value in (("RAY_COLOR_PREFIX", "0"),):
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        self._redirect_fd2()
        _active = self
        return self

    def _redirect_fd2(self) -> None:
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        echo = self.verbose

        def copy() -> None:
            with os.fdopen(read_fd, "r", encoding="utf-8", errors="replace") as pipe:
                for line in pipe:
                    text = strip_ansi(line.rstrip("\n"))
                    self._file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} STDERR {text}\n")
                    notice(text)
                    if echo and self.console is not None:
                        self.console.stream.write(text + "\n")

        self._pipe_thread = threading.Thread(target=copy, name="lmpipe stderr to log", daemon=True)
        self._pipe_thread.start()

    def __exit__(self, *exc: Any) -> None:
        global _active
        _active = None
        if self.console is not None:
            self.console.status("")
        sys.stderr.flush()
        if self._saved_fd is not None:
            os.dup2(self._saved_fd, 2)  # closes the pipe's last writer: the copy thread ends
            os.close(self._saved_fd)
        if self._pipe_thread is not None:
            self._pipe_thread.join(timeout=5)
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        handlers, level = self._saved_root
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
        for h in self._own_handlers:
            h.close()
        logging.captureWarnings(False)
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        route_worker_lines_back()
        if self.console is not None:
            self.console.stream.flush()
            self.console.stream.close()
        if self._file is not None:
            self._file.flush()
            self._file.close()


# -- Ray ---------------------------------------------------------------------------------------
_RAY_HANDLER = "ray_print_logs"
_OUR_HANDLER = "lmpipe_worker_lines"
_removed: list = []  # Ray's own handler of worker output, while a run replaces it


def is_active() -> bool:
    """Whether a run's output is set up (RunOutput) in this process."""
    return _active is not None


def route_ray_output(marked_workers: bool) -> None:
    """After ``ray.init``: Ray's own loggers go to the run's handlers (the log file; the screen
    only with --verbose) instead of their own stream handlers, and worker output is split into
    lmpipe's marked lines (screen and file) and the rest (file)."""
    for name in list(logging.Logger.manager.loggerDict):
        if name != "ray" and not name.startswith("ray."):
            continue
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                logger.removeHandler(h)
        logger.propagate = True
    if _active is None or not marked_workers:  # unmarked workers: Ray prints their lines, uncoloured
        return
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover - a Ray without the dispatcher prints as it always did
        return
    with dispatcher._lock:
        _removed.extend(pair for pair in dispatcher.handlers if pair[0] == _RAY_HANDLER)
    dispatcher.remove_handler(_RAY_HANDLER)
    dispatcher.remove_handler(_OUR_HANDLER)
    dispatcher.add_handler(_OUR_HANDLER, _worker_lines)


def route_worker_lines_back() -> None:
    """After a run: Ray prints worker output again as it did before (a later run in this process)."""
    if not _removed:
        return
    from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler(_OUR_HANDLER)
    for name, handler in _removed:
        dispatcher.add_handler(name, handler)
    _removed.clear()


# Lines of Ray's (worker output, its loggers, its C++ core worker) that concern the person
# watching, each said once a minute at most in lmpipe's words; the line itself is in the log file.
NOTICES = (
    (re.compile(r"[Ss]pilled \d+ ?MiB|[Ss]pilling .*objects"), "Ray's object store is full and spills objects to disk: stages run slower"),
    (re.compile(r"worker died|WorkerCrashedError|died unexpectedly|was killed due to|OutOfMemoryError|OOM", re.I),
     "a Ray worker died (its task or actor is retried, see the log file)"),
    (re.compile(r"NodeDiedError|node .* (is|was|marked) dead|[Nn]ode .* lost", re.I), "a Ray node was lost (its work is retried elsewhere)"),
)
_said: dict[str, float] = {}


def notice(line: str) -> None:
    """Say in one lmpipe line what a Ray line means for the run, if it means something."""
    for pattern, message in NOTICES:
        if pattern.search(line):
            now = time.monotonic()
            if now - _said.get(message, -1e9) >= 60.0:
                _said[message] = now
                log.warning("%s", message)
            return


class _NoticeHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(_LOGGER):
            try:
                notice(record.getMessage())
            except Exception:  # pragma: no cover
                pass


_worker_log = logging.getLogger("lmpipe.worker")
_ray_worker_log = logging.getLogger("ray.worker_output")


def _worker_lines(data: dict[str, Any]) -> None:
    who = data.get("actor_name") or data.get("task_name") or "worker"
    prefix = f"({who} pid={data.get('pid')})"
    for raw in data.get("lines", []):
        line = strip_ansi(raw)
        at = line.find(WORKER_MARK)
        if at >= 0:
            level, _, message = line[at + len(WORKER_MARK):].partition(" ")
            _worker_log.log(logging.getLevelName(level) if level in ("INFO", "WARNING", "ERROR", "DEBUG") else logging.INFO,
                            "%s", message)
        else:
            _ray_worker_log.info("%s %s", prefix, line)  # the log file; _NoticeHandler says what matters


def setup_worker_logging() -> None:
    """Runs in every Ray worker of a run (``worker_process_setup_hook``): lmpipe's log lines are
    written marked, once, so the driver shows them as lmpipe's."""
    logger = logging.getLogger(_LOGGER)
    if any(getattr(h, "_lmpipe_worker", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(WORKER_MARK + "%(levelname)s %(message)s"))
    handler._lmpipe_worker = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def format_rate(value: float, unit: str) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.1f}{suffix}{unit}/s"
    return f"{value:.0f}{unit}/s"


def format_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
