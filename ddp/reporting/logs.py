"""Rank-aware logging.

* rank 0 writes the console at the recipe's level (through ``tqdm.write`` so bars stay intact);
* every other rank writes the console only at WARNING and above, so a problem on ANY rank is seen;
* every rank writes its own ``logs/rank{r}.log`` at the recipe's level, with full tracebacks;
* every record carries ``[rank r/w host]``; Python warnings are routed through logging.

The log file is opened only once the run is sure to start (``RankLogs.attach``): records before
that are kept in memory and written first, so a refused run leaves no file behind.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from logging.handlers import BufferingHandler
from pathlib import Path

from tqdm import tqdm

_CONSOLE_FORMAT = "%(asctime)s %(levelname)s [rank {rank}/{world} {host}] %(message)s"
_FILE_FORMAT = "%(asctime)s %(levelname)s [rank {rank}/{world} {host}] %(name)s: %(message)s"


class _TqdmHandler(logging.StreamHandler):
    """Writes between tqdm bar refreshes instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # pragma: no cover - logging's own error path
            self.handleError(record)


class _OneLineFormatter(logging.Formatter):
    """Console records stay one line: tracebacks go to the rank's log file only."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text = saved


class _RankFile(logging.FileHandler):
    """The rank's log file, which a full disk cannot turn into "--- Logging error ---" tracebacks:
    the first failed write is said once on stderr, in one line, and the file is left alone from
    then on; the run goes on and its console is unchanged."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord | None) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)  # type: ignore[arg-type]  # a bug in a record: logging's own report
            return
        if not self.failed:
            self.failed = True
            say_unwritable(self.baseFilename, error, "this rank's log goes on on the console only")

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the last buffered lines could not be written either
            self.handleError(None)


def say_unwritable(path: str | Path, error: OSError, then: str) -> None:
    """One line on stderr: a file of the run could not be written; what happens instead."""
    print(f"warning: cannot write {path}: {error.strerror or error}; {then}", file=sys.stderr, flush=True)


class _Pending(BufferingHandler):
    """Holds records until the log file exists; never flushes by itself."""

    def shouldFlush(self, record: logging.LogRecord) -> bool:
        return False


class RankLogs:
    """This rank's handlers. ``attach`` opens the log file and writes what was held back."""

    def __init__(self, level: str, file_format: str) -> None:
        self.level, self.file_format = level.upper(), file_format
        self.path: Path | None = None
        self._pending: _Pending | None = _Pending(capacity=0)
        self._pending.setLevel(self.level)
        self._file: logging.Handler | None = None

    @property
    def handlers(self) -> list[logging.Handler]:
        return [h for h in (self._pending, self._file) if h is not None]

    def attach(self, path: Path) -> None:
        """Open ``path`` (appending) and write the records held so far. Idempotent."""
        if self._file is not None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        to_file = _RankFile(path, mode="a", encoding="utf-8")
        to_file.setLevel(self.level)
        to_file.setFormatter(logging.Formatter(self.file_format))
        root = logging.getLogger()
        pending, self._pending = self._pending, None
        if pending is not None:
            root.removeHandler(pending)
            for record in pending.buffer:
                to_file.handle(record)
            pending.close()
        root.addHandler(to_file)
        self._file, self.path = to_file, path

    @property
    def attached(self) -> bool:
        return self._file is not None


@contextmanager
def rank_logging(rank: int, world: int, host: str, level: str) -> Iterator[RankLogs]:
    """Install the handlers on the root logger for the duration of a run, then remove them."""
    tag = {"rank": rank, "world": world, "host": host}
    root = logging.getLogger()
    console = _TqdmHandler(sys.stderr)
    console.setLevel(level.upper() if rank == 0 else logging.WARNING)
    console.setFormatter(_OneLineFormatter(_CONSOLE_FORMAT.format(**tag), datefmt="%H:%M:%S"))
    logs = RankLogs(level, _FILE_FORMAT.format(**tag))
    saved_level = root.level
    root.setLevel(min(logging.getLevelName(level.upper()), logging.WARNING))
    root.addHandler(console)
    for handler in logs.handlers:
        root.addHandler(handler)
    logging.captureWarnings(True)
    try:
        yield logs
    finally:
        logging.captureWarnings(False)
        for handler in (console, *logs.handlers):
            root.removeHandler(handler)
            handler.close()
        root.setLevel(saved_level)
