"""Metrics sink: ``metrics.jsonl`` and TensorBoard, written by rank 0 only."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends one JSON object per record; mirrors numeric fields to TensorBoard.

    Build it on every rank with ``enabled=is_main()``: on other ranks every call is a no-op, so
    callers never check the rank themselves.
    """

    def __init__(self, jsonl: Path, tensorboard_dir: Path | None, enabled: bool) -> None:
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        self._file = jsonl.open("w", encoding="utf-8")
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # ~0.3 s import: rank 0 only

            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._to_tensorboard(record)

    def _to_tensorboard(self, record: dict[str, Any]) -> None:
        kind, step = record.get("kind", "metrics"), record.get("step", 0)
        for key, value in record.items():
            if key not in ("kind", "step", "epoch") and isinstance(value, (int, float)):
                self._tb.add_scalar(f"{kind}/{key}", value, step)  # type: ignore[union-attr]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
