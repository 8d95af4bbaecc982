"""A run's history: one JSON record per start or resume in ``history.jsonl``, and ``recipe.yaml``
rewritten to say what the run trains with now, headed by that history as comments."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ddp.checkpoint.atomic import write_text_atomic
from ddp.config import Recipe, to_yaml
from ddp.lifecycle.changes import Change, Policy, show_value
from ddp.lifecycle.run_dir import RunDir


def record_start(run_dir: RunDir, recipe: Recipe, checkpoint: Path | None, step: int, epoch: int,
                 changes: tuple[Change, ...], world_size: int) -> None:
    """Rank 0 only, once the run is sure to start: append the record, rewrite ``recipe.yaml``."""
    entry: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": "resume" if checkpoint else "start",
        "step": step, "epoch": epoch, "world_size": world_size,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "changes": {c.key: [c.before, c.after] for c in changes if c.policy == Policy.honoured},
    }
    entries = [*read_history(run_dir.history), entry]
    write_text_atomic(run_dir.history, "".join(json.dumps(e) + "\n" for e in entries))
    run_dir.write_recipe(_header(run_dir.root, entries) + to_yaml(recipe))


def read_history(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def _header(root: Path, entries: list[dict[str, Any]]) -> str:
    lines = [f"# The recipe {root} trains with now (history.jsonl has every start and resume):"]
    for entry in entries:
        ranks = entry["world_size"]
        where = f"step {entry['step']} (epoch {entry['epoch']}) on {ranks} rank{'' if ranks == 1 else 's'}"
        if entry["event"] == "start":
            lines.append(f"#   {entry['time']} started at {where}")
            continue
        changes = ", ".join(f"{k} {show_value(b)} → {show_value(a)}" for k, (b, a) in entry["changes"].items())
        lines.append(f"#   {entry['time']} resumed at {where}" + (f" with changes: {changes}" if changes else ""))
    return "\n".join(lines) + "\n"
