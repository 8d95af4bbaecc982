"""The run directory: where one run's recipe, metrics, logs and TensorBoard events live.

    runs/<name>/version_N/  (or <run.dir>/version_N/; see ddp.lifecycle for how N is chosen)
      recipe.yaml           the resolved recipe it trains with now, its history as comments (rank 0)
      history.jsonl         one record per start or resume (with the recipe changes) or stop on a signal (rank 0)
      metrics.jsonl         one JSON object per step interval and per epoch (rank 0)
      tensorboard/          the same metrics as TensorBoard events (rank 0)
      checkpoints/          step-*.pt or step-*.dcp/ + manifests, latest, best (see ddp.checkpoint.files)
      logs/rank{r}.log      every rank's own log
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ddp.checkpoint.atomic import write_text_atomic


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def history(self) -> Path:
        return self.root / "history.jsonl"

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
        write_text_atomic(self.recipe, text)
