"""The run directory: where a run's recipe, metrics, logs and TensorBoard events live.

    runs/<name>/            (or run.dir=)
      recipe.yaml           the resolved recipe (rank 0)
      metrics.jsonl         one JSON object per step interval and per epoch (rank 0)
      tensorboard/          the same metrics as TensorBoard events (rank 0)
      checkpoints/          step-*.pt + manifests, latest, best (rank 0; see ddp.checkpoint_files)
      logs/rank{r}.log      every rank's own log
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def rank_log(self, rank: int) -> Path:
        return self.root / "logs" / f"rank{rank}.log"

    def write_recipe(self, text: str) -> None:
        """Rank 0 only. Atomic: a reader never sees a half-written recipe."""
        write_atomic(self.recipe, text)


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
