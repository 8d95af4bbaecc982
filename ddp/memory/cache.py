"""Probe results kept between runs, so a rerun skips the trial steps.

One small JSON file (``memory.cache``, default ``runs/.probe_cache.json``) maps a key made of the
device model, the model's architecture (name and a hash of its module tree), the input shape,
the parameter dtype, the optimizer, the world size and the bytes of data kept on the device to the
agreed sizes, the memory they need and the budget they were found under. An entry is reused only when its need still fits today's
budget and today's budget is not more than 10% larger (then a new probe could find more).
Only rank 0 writes, atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from ddp.checkpoint.atomic import write_text_atomic

log = logging.getLogger(__name__)
GROWTH = 1.10  # reprobe when the budget grew by more than this since the entry was written


def cache_key(device: str, model_name: str, architecture: str, shape: tuple[int, ...], dtype: str, optimizer: str,
              world: int, data_on_device: int = 0, parallel: str = "ddp") -> str:
    """``data_on_device``: bytes the in-memory loader keeps on the device (part of what a pick needs);
    ``parallel``: ``dist.parallel`` (FSDP's shards leave room for other batches; DDP keys omit it)."""
    digest = hashlib.sha1(architecture.encode()).hexdigest()[:12]
    key = {"device": device, "model": f"{model_name}@{digest}", "input": list(shape), "dtype": dtype,
           "optimizer": optimizer, "world": world, "data_on_device": data_on_device}
    if parallel == "fsdp":
        key["parallel"] = parallel
    return json.dumps(key, sort_keys=True)


def lookup(path: Path | None, key: str, kinds: list[str], budget_mb: float) -> dict[str, int] | None:
    """The cached sizes for ``kinds`` when every one of them may be reused under ``budget_mb``."""
    entry = _read(path).get(key) if path else None
    if not entry or any(kind not in entry for kind in kinds):
        return None
    try:
        for kind in kinds:
            item = entry[kind]
            if item["need_mb"] > budget_mb or budget_mb > item["budget_mb"] * GROWTH:
                return None
        return {kind: int(entry[kind]["pick"]) for kind in kinds}
    except (KeyError, TypeError, ValueError):  # an entry edited by hand or by another version: probe again
        return None


def store(path: Path | None, key: str, results: dict[str, dict[str, Any]]) -> None:
    """Rank 0 only. ``results``: kind → {"pick", "need_mb", "budget_mb"}."""
    if not path:
        return
    data = _read(path)
    data[key] = {**data.get(key, {}), **results}
    try:
        write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    except OSError as err:  # a cache that cannot be written costs a probe next time, nothing more
        log.warning("could not write the probe cache %s: %s", path, err)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {key: entry for key, entry in data.items() if isinstance(entry, dict)}  # a bad entry is dropped
