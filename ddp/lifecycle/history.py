"""A run's history: one JSON record per start, resume or stop on a signal in ``history.jsonl``, and
``recipe.yaml`` rewritten to say what the run trains with now, headed by that history as comments."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ddp.checkpoint.atomic import write_text_atomic
from ddp.config import Recipe, to_yaml
from ddp.lifecycle.changes import Change, Policy, show_value
from ddp.lifecycle.run_dir import RunDir

log = logging.getLogger(__name__)


def record_start(run_dir: RunDir, recipe: Recipe, checkpoint: Path | None, step: int, epoch: int,
                 changes: tuple[Change, ...], world_size: int) -> None:
    """Rank 0 only, once the run is sure to start: append the record, rewrite ``recipe.yaml``."""
    entry: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": "resume" if checkpoint else "start",
        "step": step, "epoch": epoch, "world_size": world_size,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "changes": {c.key: [c.before, c.after] for c in changes if c.policy == Policy.honoured},
    }
    entries = _append(run_dir.history, entry)
    run_dir.write_recipe(_header(run_dir.root, entries) + to_yaml(recipe))


def record_stop(run_dir: RunDir, signal: str, step: int, exit_code: int) -> None:
    """Rank 0 only, when a run stops on ``signal`` (a preemption, Ctrl-C) after its checkpoint: a
    ``stop`` record, so a reader tells a run waiting to be resumed from one that failed, and the
    line for it in ``recipe.yaml``'s header. A history that cannot be written is said in a warning:
    the stop itself succeeded."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": "stop", "signal": signal, "step": step,
             "exit_code": exit_code}
    try:
        entries = _append(run_dir.history, entry)
        body = [line for line in run_dir.recipe.read_text(encoding="utf-8").splitlines(keepends=True)
                if not line.startswith("#")]
        run_dir.write_recipe(_header(run_dir.root, entries) + "".join(body))
    except (OSError, ValueError) as err:
        log.warning("could not record the stop in %s: %s", run_dir.history, err)


def stopped(path: Path) -> bool:
    """The run's last record is a stop on a signal: running the same command resumes it."""
    try:
        entries = read_history(path)
    except (OSError, ValueError):  # unreadable, or not a history this version wrote
        return False
    return bool(entries) and isinstance(entries[-1], dict) and entries[-1].get("event") == "stop"


def _append(path: Path, entry: dict[str, Any]) -> list[dict[str, Any]]:
    entries = [*read_history(path), entry]
    write_text_atomic(path, "".join(json.dumps(e) + "\n" for e in entries))
    return entries


def read_history(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def _header(root: Path, entries: list[dict[str, Any]]) -> str:
    lines = [f"# The recipe {root} trains with now (history.jsonl has every start, resume and stop):"]
    for entry in entries:
        if entry["event"] == "stop":
            lines.append(f"#   {entry['time']} stopped by {entry['signal']} at step {entry['step']}")
            continue
        ranks = entry["world_size"]
        where = f"step {entry['step']} (epoch {entry['epoch']}) on {ranks} rank{'' if ranks == 1 else 's'}"
        if entry["event"] == "start":
            lines.append(f"#   {entry['time']} started at {where}")
            continue
        changes = ", ".join(f"{k} {show_value(b)} → {show_value(a)}" for k, (b, a) in entry["changes"].items())
        lines.append(f"#   {entry['time']} resumed at {where}" + (f" with changes: {changes}" if changes else ""))
    return "\n".join(lines) + "\n"
