"""Metrics sink: ``metrics.jsonl`` and TensorBoard, written by rank 0 only."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ddp.checkpoint.atomic import write_text_atomic
from ddp.reporting.logs import say_unwritable

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends one JSON object per record; mirrors numeric fields to TensorBoard.

    Build it on every rank with ``enabled=is_main()``: on other ranks every call is a no-op, so
    callers never check the rank themselves.
    """

    def __init__(self, jsonl: Path, tensorboard_dir: Path | None, enabled: bool,
                 resumed_step: int | None = None) -> None:
        """A fresh run truncates ``jsonl``; a resumed one keeps the records up to ``resumed_step``
        (dropping what the interrupted run wrote after its checkpoint) and appends."""
        self.enabled, self.path = enabled, jsonl
        self._file = None
        self._tb = None
        if not enabled:
            return
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        if resumed_step is None:
            write_text_atomic(jsonl, "")
        else:
            _truncate_after(jsonl, resumed_step)
        self._file = jsonl.open("a", encoding="utf-8")
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # ~0.3 s import: rank 0 only

            purge = None if resumed_step is None else resumed_step + 1  # hide the lost steps' events
            self._tb = SummaryWriter(log_dir=str(tensorboard_dir), purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        """One record. When the disk refuses it (full, I/O error), the file is closed and said so
        once on stderr; training goes on (a checkpoint save then says what the disk needs)."""
        if self._file is not None:
            try:
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()
            except OSError as err:
                self._give_up(err)
        if self._tb is not None:
            self._to_tensorboard(record)

    def _give_up(self, error: OSError) -> None:
        file, self._file = self._file, None
        say_unwritable(self.path, error, "no more records go there in this run")
        try:
            file.close()  # type: ignore[union-attr]
        except OSError:
            pass

    def _to_tensorboard(self, record: dict[str, Any]) -> None:
        kind, step = record.get("kind", "metrics"), record.get("step", 0)
        for key, value in record.items():
            if key not in ("kind", "step", "epoch", "time") and isinstance(value, (int, float)):
                self._tb.add_scalar(f"{kind}/{key}", value, step)  # type: ignore[union-attr]

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as err:  # its last buffered record could not be written
                self._give_up(err)
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _truncate_after(jsonl: Path, step: int) -> None:
    try:
        lines = jsonl.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line + "\n")
        except ValueError:  # a line torn by a kill mid-write
            log.warning("dropping an unreadable line of %s", jsonl)
    write_text_atomic(jsonl, "".join(kept))
