"""Several runs side by side: ``python -m ddp.report runs/<name>`` on a sweep's directory (or any
directory holding run groups below it).

One row per run group (its newest version): the sweep's values read back from the directory name,
best and final test accuracy, epochs, time in training epochs and its state, best first; and one
plot of every run's test accuracy per epoch (``report.png`` in the directory). Reads files only.

A run's state: ``running`` while a process holds its version's lock (``ddp.lifecycle.lock``);
``finished`` when its newest checkpoint reached the run's ``train.epochs`` (or ``train.max_steps``),
as ``train.resume=auto`` judges it; ``stopped`` when its last act was to stop on a signal after a
checkpoint (a preemption waiting for its requeue, Ctrl-C: the same command resumes it); ``failed``
otherwise (it ended before its end without that: an error, a kill).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ddp.checkpoint import files
from ddp.config import flat
from ddp.lifecycle import history, lock
from ddp.lifecycle.decision import reached_end
from ddp.lifecycle.sweep_dirs import parse_name
from ddp.lifecycle.versions import list_versions, version_number
from ddp.reporting.report import read_records
from ddp.reporting.text import count

RUNNING, FINISHED, STOPPED, FAILED = "running", "finished", "stopped", "failed"


@dataclass(frozen=True)
class Row:
    label: str  # the group's path below the directory ("." for the directory itself)
    version: Path  # its newest version with metrics
    epochs: list[dict[str, Any]]
    state: str

    @property
    def best(self) -> float | None:
        scores = [e["test_acc"] for e in self.epochs if isinstance(e.get("test_acc"), (int, float))]
        return max(scores) if scores else None

    @property
    def final(self) -> float | None:
        scores = [e["test_acc"] for e in self.epochs if isinstance(e.get("test_acc"), (int, float))]
        return scores[-1] if scores else None

    @property
    def train_s(self) -> float | None:
        times = [e["epoch_time_s"] for e in self.epochs if isinstance(e.get("epoch_time_s"), (int, float))]
        return sum(times) if times else None


def groups_under(path: Path) -> list[Path]:
    """Every run group at or below ``path``: a directory with a ``version_N/metrics.jsonl``."""
    found = []
    for root, dirs, _ in os.walk(path):
        versions = [d for d in dirs if version_number(Path(d)) is not None]
        if any((Path(root) / d / "metrics.jsonl").is_file() for d in versions):
            found.append(Path(root))
        dirs[:] = sorted(d for d in dirs if d not in versions)  # a version holds no other runs
    return sorted(found)


def rows(path: Path, groups: list[Path]) -> list[Row]:
    """One row per group, its newest version with metrics; best test accuracy first."""
    found = []
    for group in groups:
        version = [v for v in list_versions(group) if (v / "metrics.jsonl").is_file()][-1]
        epochs, _ = read_records(version)
        found.append(Row(str(group.relative_to(path)), version, epochs, run_state(version)))
    return sorted(found, key=lambda row: (row.best is None, -(row.best or 0.0), row.label))


def run_state(version: Path) -> str:
    if lock.held(version):
        return RUNNING
    if _finished(version):
        return FINISHED
    return STOPPED if history.stopped(version / "history.jsonl") else FAILED


def _finished(version: Path) -> bool:
    """The newest readable checkpoint reached its recipe's end; without checkpoints, the last
    complete epoch record reached ``recipe.yaml``'s."""
    for checkpoint in files.candidates(version / "checkpoints"):
        try:
            manifest = files.read_manifest(checkpoint)
        except files.CheckpointError:
            continue
        if manifest.recipe is not None:
            return _reached(flat(manifest.recipe), manifest.epoch, manifest.step)
    epochs = [e for e in read_records(version)[0] if not e.get("partial")]
    try:
        recipe = flat((version / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return bool(epochs) and _reached(recipe, int(epochs[-1].get("epoch", 0)), int(epochs[-1].get("step", 0)))


def _reached(recipe: dict[str, Any], epoch: int, step: int) -> bool:
    """``train.resume=auto``'s rule (``reached_end``) on a recipe read back as flat values."""
    epochs, max_steps = recipe.get("train.epochs"), recipe.get("train.max_steps", -1)
    return reached_end(epoch, step, epochs if isinstance(epochs, int) else float("inf"),
                       max_steps if isinstance(max_steps, int) else -1)


def table(found: list[Row]) -> str:
    """The runs, one per line: a column per swept key when every run is a sweep's, else its path."""
    values = [parse_name(row.label) for row in found]
    if all(values):
        keys = list(dict.fromkeys(key for value in values for key in value))  # type: ignore[union-attr]
        names = [[value.get(key, "-") for key in keys] for value in values]  # type: ignore[union-attr]
    else:
        keys, names = ["run"], [[row.label] for row in found]
    widths = [max(len(key), *(len(name[i]) for name in names)) for i, key in enumerate(keys)]
    head = "  ".join(key.ljust(w) for key, w in zip(keys, widths))
    lines = [f"{head}  {'best acc':>8}  {'final acc':>9}  {'epochs':>6}  {'time s':>7}  {'state':<8}  version"]
    for row, name in zip(found, names):
        cells = "  ".join(cell.ljust(w) for cell, w in zip(name, widths))
        lines.append(f"{cells}  {_num(row.best, 8)}  {_num(row.final, 9)}  {len(row.epochs):>6}  "
                     f"{_num(row.train_s, 7, '.1f')}  {row.state:<8}  {row.version.name}")
    return "\n".join(lines)


def _num(value: float | None, width: int, spec: str = ".4f") -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def figure(path: Path, found: list[Row]) -> Any:
    """One panel: every run's test accuracy per epoch (test loss when no run reports accuracy)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    field = "test_acc" if any(row.best is not None for row in found) else "test_loss"
    fig, ax = plt.subplots(figsize=(10, 6))
    for row in found:
        points = [(e["epoch"], e[field]) for e in row.epochs if isinstance(e.get(field), (int, float))]
        if points:
            ax.plot(*zip(*points), "o-", markersize=3, label=f"{row.label} ({row.state})")
    ax.set_title(f"{'test accuracy' if field == 'test_acc' else 'test loss'} per epoch: {path}")
    ax.set_xlabel("epoch")
    last = max((e.get("epoch", 0) for row in found for e in row.epochs), default=1)
    ax.set_xlim(0.5, last + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def report(path: Path, groups: list[Path], out: Path | None) -> int:
    """Print the table and write the plot; 0."""
    from matplotlib import pyplot as plt

    found = rows(path, groups)
    print(table(found))
    states = [row.state for row in found]
    print(f"{count(len(found), 'run')} under {path}: " +
          ", ".join(f"{states.count(s)} {s}" for s in (FINISHED, RUNNING, STOPPED, FAILED) if s in states))
    fig = figure(path, found)
    out = out or path / "report.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    print(f"plot: {out}")
    return 0

