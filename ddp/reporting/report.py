"""Looking at a run: ``python -m ddp.report runs/<name>`` (a group: its newest version) or a version dir;
a directory holding several run groups (a sweep's) is one table and one plot (``compare``).

Writes ``report.png`` in the version dir (loss and accuracy per epoch, learning rate per step,
throughput per epoch; matplotlib) and prints a table of the epochs and a summary. ``summary``
is also what every run prints at its end. Reads files only: no process group, any process.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ddp.checkpoint.files import read_pointer
from ddp.errors import ConfigError, DDPError, print_error
from ddp.lifecycle.versions import list_versions
from ddp.reporting.text import count


def version_dir(path: Path) -> Path:
    """``path`` itself when it holds a run's metrics, else the newest ``version_N`` under it."""
    if (path / "metrics.jsonl").is_file():
        return path
    versions = [v for v in list_versions(path) if (v / "metrics.jsonl").is_file()]
    if not versions:
        raise ConfigError(f"no run under '{path}': no metrics.jsonl there or in a version_N/ below it.",
                          "give runs/<name> or runs/<name>/version_N of a run that has trained")
    return versions[-1]


def read_records(version: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(epoch records, step records) of ``metrics.jsonl`` (a line torn by a kill is skipped)."""
    epochs: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    path = version / "metrics.jsonl"
    for line in (path.read_text(encoding="utf-8").splitlines() if path.is_file() else []):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        (epochs if record.get("kind") == "epoch" else steps if record.get("kind") == "step" else []).append(record)
    return epochs, steps


def summary(version: Path, wall_s: float | None = None, peak_mb: float | None = None) -> str:
    """A few lines: best and final accuracy (or loss), throughput, time, memory, best checkpoint."""
    epochs, _ = read_records(version)
    if not epochs:
        return f"{version}: no epoch finished yet"
    final = epochs[-1]
    scored = [e for e in epochs if e.get("test_acc") is not None]
    lines = [f"run {version}: {count(len(epochs), 'epoch record')}, {count(final.get('step', 0), 'step')}"]
    if scored:
        best = max(scored, key=lambda e: e["test_acc"])
        lines.append(f"  test accuracy: best {best['test_acc']:.4f} (epoch {best['epoch']}), "
                     f"final {final['test_acc']:.4f}")
    losses = [e for e in epochs if e.get("test_loss") is not None]
    if losses:
        best_loss = min(losses, key=lambda e: e["test_loss"])
        lines.append(f"  test loss:     best {best_loss['test_loss']:.4f} (epoch {best_loss['epoch']}), "
                     f"final {losses[-1]['test_loss']:.4f}")
    rates = [e["samples_per_s"] for e in epochs if e.get("samples_per_s")]
    if rates:
        train_s = sum(e.get("epoch_time_s", 0.0) for e in epochs)
        starts = len(resumed_at(version)) + 1
        lines.append(f"  throughput:    {sum(rates) / len(rates):.0f} samples/s (mean over epochs); {train_s:.1f} s "
                     f"in training epochs" + (f" over the run's {starts} starts" if starts > 1 else ""))
    if wall_s is not None:
        lines.append(f"  this start:    {wall_s:.1f} s wall")
    if peak_mb is not None:
        lines.append(f"  peak memory:   {peak_mb:.0f} MB (this process)")
    best_file = read_pointer(version / "checkpoints", "best")
    if best_file:
        lines.append(f"  best checkpoint: {version / 'checkpoints' / best_file}")
    return "\n".join(lines)


def table(epochs: list[dict[str, Any]]) -> str:
    """One row per epoch record."""
    head = f"{'epoch':>5} {'step':>7} {'train loss':>10} {'train acc':>9} {'test loss':>9} {'test acc':>8} " \
           f"{'lr':>9} {'samples/s':>9} {'time s':>7}"
    rows = [head]
    for e in epochs:
        rows.append(f"{e['epoch']:>5} {e.get('step', 0):>7} {_num(e.get('train_loss'), 10)} {_num(e.get('train_acc'), 9)} "
                    f"{_num(e.get('test_loss'), 9)} {_num(e.get('test_acc'), 8)} {e.get('lr', math.nan):>9.3g} "
                    f"{e.get('samples_per_s', 0):>9.0f} {e.get('epoch_time_s', 0):>7.2f}"
                    + (" (partial)" if e.get("partial") else ""))
    return "\n".join(rows)


def figure(version: Path) -> Any:
    """Four panels: loss (log scale), accuracy (or the run's own test metrics), learning rate,
    throughput; a dashed line where the run was resumed."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs, steps = read_records(version)
    x = [e["epoch"] for e in epochs]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    loss, acc, lr, speed = axes.flat
    _curves(loss, epochs, {"train": "train_loss", "test": "test_loss", "loss": "loss"})
    if all(v > 0 for e in epochs for k, v in e.items() if k.endswith("loss") and isinstance(v, (int, float))):
        loss.set_yscale("log")  # losses fall by orders of magnitude: a linear axis is flat after a few epochs
    _label(loss, "loss per epoch", "epoch")
    if any(e.get("test_acc") is not None for e in epochs):
        _curves(acc, epochs, {"train": "train_acc", "test": "test_acc"})
        _label(acc, "accuracy per epoch", "epoch")
    else:  # not class logits: the run's own metrics, if any
        metrics = sorted({k for e in epochs for k, v in e.items() if k.startswith("test_") and k not in
                          ("test_loss", "test_acc", "test_count") and isinstance(v, (int, float))})
        _curves(acc, epochs, {name: name for name in metrics})
        _label(acc, "test metrics per epoch" if metrics else "no accuracy (outputs are not class logits)", "epoch")
    for ax in (loss, acc, speed):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for epoch in resumed_at(version):
            ax.axvline(epoch + 0.5, color="grey", linestyle="--", linewidth=1)
    if resumed_at(version):
        loss.plot([], [], color="grey", linestyle="--", label="resumed")
        loss.legend()
    lr_points = ([(s["step"], s["lr"]) for s in steps if "lr" in s]
                 or [(e["step"], e["lr"]) for e in epochs if "lr" in e and "step" in e])
    if lr_points:
        lr.plot(*zip(*lr_points), "-")
    _label(lr, "learning rate", "step", legend=False)
    speed.bar(x, [e.get("samples_per_s", 0) or 0 for e in epochs])
    _label(speed, "throughput (samples/s)", "epoch", legend=False)
    fig.suptitle(str(version))
    fig.tight_layout()
    return fig


def plot(version: Path, out: Path) -> Path:
    """``figure`` written as a PNG."""
    from matplotlib import pyplot as plt

    fig = figure(version)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _curves(ax: Any, epochs: list[dict[str, Any]], series: dict[str, str]) -> None:
    """One line per (label → field) that some epoch record has."""
    for label, field in series.items():
        points = [(e["epoch"], e[field]) for e in epochs if isinstance(e.get(field), (int, float))]
        if points:
            ax.plot(*zip(*points), "o-", label=label)


def resumed_at(version: Path) -> list[int]:
    """The epochs (completed) at which the run was resumed, from ``history.jsonl``."""
    path = version / "history.jsonl"
    found = []
    for line in (path.read_text(encoding="utf-8").splitlines() if path.is_file() else []):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "resume":
            found.append(int(entry.get("epoch", 0)))
    return found


def _label(ax: Any, title: str, xlabel: str, legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend()


def _num(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddp.report",
                                     description="Plot and summarise a run: runs/<name> or runs/<name>/version_N; "
                                                 "a sweep's directory (runs below it): one row per run, best first.")
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, help="PNG to write (default: <version dir>/report.png; for several "
                                                 "runs <dir>/report.png)")
    args = parser.parse_args(argv)
    from ddp.reporting import compare

    groups = [] if (args.run / "metrics.jsonl").is_file() else compare.groups_under(args.run)
    if groups and groups != [args.run]:
        return compare.report(args.run, groups, args.out)
    try:
        version = version_dir(args.run)
    except DDPError as err:
        print_error(err, 0)
        return err.exit_code
    epochs, _ = read_records(version)
    print(table(epochs))
    print(summary(version))
    out = plot(version, args.out or version / "report.png")
    print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
