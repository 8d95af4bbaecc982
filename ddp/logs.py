"""Rank-aware logging.

* rank 0 writes the console at the recipe's level (through ``tqdm.write`` so bars stay intact);
* every other rank writes the console only at WARNING and above, so a problem on ANY rank is seen;
* every rank writes its own ``logs/rank{r}.log`` at the recipe's level, with full tracebacks;
* every record carries ``[rank r/w host]``; Python warnings are routed through logging.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def rank_logging(log_file: Path, rank: int, world: int, host: str, level: str) -> Iterator[None]:
    """Install the handlers on the root logger for the duration of a run, then remove them."""
    tag = {"rank": rank, "world": world, "host": host}
    root = logging.getLogger()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    console = _TqdmHandler(sys.stderr)
    console.setLevel(level.upper() if rank == 0 else logging.WARNING)
    console.setFormatter(_OneLineFormatter(_CONSOLE_FORMAT.format(**tag), datefmt="%H:%M:%S"))
    to_file = logging.FileHandler(log_file, mode="a", encoding="utf-8")
    to_file.setLevel(level.upper())
    to_file.setFormatter(logging.Formatter(_FILE_FORMAT.format(**tag)))
    saved_level = root.level
    root.setLevel(min(logging.getLevelName(level.upper()), logging.WARNING))
    root.addHandler(console)
    root.addHandler(to_file)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for handler in (console, to_file):
            root.removeHandler(handler)
            handler.close()
        root.setLevel(saved_level)
