"""Version directories of a run group: list them, claim a new one, find the one holding a file
or the one a job trains in.

Pure file logic; rank 0 calls it. A new version is claimed with ``mkdir``, which is atomic, so two
runs starting at once in the same group never share a version. ``version_N/job.json`` names the
job (``ddp.cluster.environment.Attempt.job``) that trains in it, so that job's restarts and
requeues find it again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ddp.checkpoint.atomic import write_text_atomic

PREFIX = "version_"
JOB_FILE = "job.json"
_VERSION = re.compile(rf"^{PREFIX}(\d+)$")


def version_number(path: Path) -> int | None:
    match = _VERSION.match(path.name)
    return int(match.group(1)) if match else None


def list_versions(group: Path) -> list[Path]:
    """The group's version directories, oldest (lowest number) first."""
    if not group.is_dir():
        return []
    found = [(n, p) for p in group.iterdir() if p.is_dir() and (n := version_number(p)) is not None]
    return [path for _, path in sorted(found)]


def claim_next(group: Path) -> tuple[Path, list[Path]]:
    """Create the next ``version_N`` of ``group``; return it and every directory this call created
    (so a refused run can remove exactly those, and nothing else)."""
    created = [] if group.is_dir() else _make_parents(group)
    existing = list_versions(group)
    number = version_number(existing[-1]) + 1 if existing else 0  # type: ignore[operator]
    while True:
        path = group / f"{PREFIX}{number}"
        try:
            path.mkdir()
            return path, [*created, path]
        except FileExistsError:  # another run claimed it a moment ago
            number += 1


def _make_parents(group: Path) -> list[Path]:
    missing = []
    probe = group
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    group.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def remove_created(paths: list[Path]) -> None:
    """Remove directories ``claim_next`` created, innermost first, only while they are empty."""
    for path in reversed(paths):
        try:
            path.rmdir()
        except OSError:
            return


def owning_version(checkpoint: Path) -> Path | None:
    """The version directory holding ``checkpoint`` (``…/version_N/checkpoints/step-*.pt``), if any."""
    parent = checkpoint.parent
    if parent.name == "checkpoints" and version_number(parent.parent) is not None:
        return parent.parent
    return None


def record_job(version: Path, job: str) -> None:
    """Say in ``version`` that ``job`` trains in it (replacing the job that trained there before)."""
    write_text_atomic(version / JOB_FILE, json.dumps({"job": job}) + "\n")


def job_version(group: Path, job: str) -> Path | None:
    """The newest version of ``group`` that ``job`` trains in, if any."""
    for version in reversed(list_versions(group)):
        if recorded_job(version) == job:
            return version
    return None


def recorded_job(version: Path) -> str | None:
    """The job ``version/job.json`` names; None when there is none or it cannot be read."""
    try:
        return str(json.loads((version / JOB_FILE).read_text())["job"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
