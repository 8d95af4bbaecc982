"""Checkpoint files on disk: atomic writes, integrity manifests, safe loads, retention.

    checkpoints/
      step-00000120.pt      torch.save of plain data (tensors, dicts, lists, numbers, strings)
      step-00000120.json    manifest: size and CRC-32 of the .pt, step, epoch, metric, seconds the save took
      step-00000240.dcp/    or a sharded checkpoint: a directory of every rank's shards (ddp.checkpoint.sharded)
      step-00000240.json    its manifest lists the size and CRC-32 of each file in it
      latest                name of the newest checkpoint
      best                  name of the best checkpoint by the recipe's metric

A checkpoint counts only when its manifest exists and matches the .pt byte for byte; both are
written to a temporary file in the same directory, fsynced and renamed, the .pt first. A save
killed at any point therefore leaves either the previous state or a complete new checkpoint; one
that fails (a full disk) removes what it wrote, unless ``latest`` already names it.
Pure file logic: no process group here (``ddp.checkpoint.checkpointer`` decides who calls what).
"""

from __future__ import annotations

import json
import re
import shutil
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ddp.checkpoint.atomic import atomic_open, write_text_atomic
from ddp.errors import DDPError

_NAME = re.compile(r"step-(\d{8,})\.(?:pt|dcp)$")
SHARDED = ".dcp"


class CheckpointError(DDPError):
    """A checkpoint cannot be used: missing, corrupt, unsafe, or written for another recipe."""

    exit_code = 2


@dataclass(frozen=True)
class Manifest:
    file: str
    bytes: int
    crc32: int
    step: int
    epoch: int
    metric: float | None
    recipe: str | None = None  # the resolved recipe YAML it was trained with (None: written before 0.2)
    save_s: float | None = None  # wall time of the save (None in manifests from before it was recorded)
    metric_name: str | None = None  # the epoch field ``metric`` holds (checkpoint.best_metric, auto resolved)
    files: dict[str, list[int]] | None = None  # a sharded checkpoint: {file in its directory: [bytes, CRC-32]}


class _CrcWriter:
    """File wrapper that checksums and counts bytes as torch.save streams them."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.crc, self.size = handle, 0, 0
        self.error: OSError | None = None  # torch.save re-raises a failed write as a bare RuntimeError

    def write(self, data: bytes) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.handle.flush()


def checkpoint_name(step: int, sharded: bool = False) -> str:
    return f"step-{step:08d}{SHARDED if sharded else '.pt'}"


def is_sharded(path: Path) -> bool:
    """A sharded checkpoint (a directory written by every rank), not one ``.pt`` file."""
    return path.suffix == SHARDED


def save(directory: Path, payload: dict[str, Any], step: int, epoch: int, metric: float | None,
         recipe: str | None = None, metric_name: str | None = None) -> Manifest:
    """Write ``payload`` as ``step-<step>.pt`` plus its manifest, atomically; point ``latest`` at it."""
    began = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    with atomic_open(directory / name, sync_dir=False) as handle, _without_record_crcs():
        size, crc = torch_save(payload, handle)
    manifest = Manifest(name, size, crc, step, epoch, metric, recipe,
                        save_s=round(time.perf_counter() - began, 3), metric_name=metric_name)
    publish(directory, manifest)
    return manifest


def publish(directory: Path, manifest: Manifest) -> None:
    """Make the checkpoint ``manifest.file``, complete under its final name, count: its manifest,
    then ``latest``. When either write fails, the checkpoint is removed again (unless ``latest``
    names it already) and the error raised."""
    name = manifest.file
    before = read_pointer(directory, "latest")
    try:
        write_text_atomic(directory / f"{Path(name).stem}.json", json.dumps(asdict(manifest)), sync_dir=False)
        write_text_atomic(directory / "latest", name + "\n")  # this rename's directory fsync covers all three
    except BaseException:
        with suppress(OSError):  # the save's own error is the one to report
            if read_pointer(directory, "latest") == before:  # unless `latest` names it already, it goes
                _discard(directory / name)
        raise
    for other in (".pt", SHARDED):  # the same step in the other format (checkpoint.format changed) lost its manifest
        sibling = directory / f"{Path(name).stem}{other}"
        if sibling.name != name and sibling.exists():
            remove(sibling)


def torch_save(obj: Any, handle: BinaryIO) -> tuple[int, int]:
    """``torch.save(obj)`` into ``handle``; returns (bytes written, their CRC-32). A write the disk
    refuses raises the disk's own OSError (ENOSPC, EIO...), not torch's RuntimeError around it."""
    writer = _CrcWriter(handle)
    try:
        torch.save(obj, writer)  # type: ignore[arg-type]
    except RuntimeError:
        if writer.error is None:
            raise
        raise writer.error from None
    return writer.size, writer.crc


def _discard(pt_file: Path) -> None:
    """Remove a checkpoint whose save failed after its .pt was renamed into place (its manifest or
    ``latest`` could not be written): nothing of a failed save stays under a final name."""
    pt_file.with_suffix(".json").unlink(missing_ok=True)
    remove(pt_file)


def remove(path: Path) -> None:
    """Delete a checkpoint's data: the .pt file, or a sharded checkpoint's directory."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def _without_record_crcs() -> Iterator[None]:
    """torch.save computes a CRC-32 per zip record by default; ours covers the whole file already,
    so skip torch's during our own save (≈ 15% of its time) and restore the setting after."""
    serialization = torch.serialization
    if not hasattr(serialization, "set_crc32_options"):  # torch < 2.5
        yield
        return
    previous = serialization.get_crc32_options()
    serialization.set_crc32_options(False)
    try:
        yield
    finally:
        serialization.set_crc32_options(previous)


def read_manifest(pt_file: Path) -> Manifest:
    """The manifest of ``pt_file``; CheckpointError when it is missing or unreadable."""
    path = pt_file.with_suffix(".json")
    try:
        return Manifest(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{pt_file} has no manifest {path.name} (its save was interrupted).",
                              "use another checkpoint") from None
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"manifest {path} is unreadable ({err}).", "use another checkpoint") from None


def verify(pt_file: Path) -> Manifest:
    """Check size and CRC-32 (of every file of a sharded checkpoint) against the manifest; return
    it or raise CheckpointError."""
    try:
        size = pt_file.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {pt_file} does not exist.", "check train.resume") from None
    manifest = read_manifest(pt_file)
    if manifest.files is not None or pt_file.is_dir():
        _verify_sharded(pt_file, manifest)
        return manifest
    if size != manifest.bytes:
        raise CheckpointError(f"checkpoint {pt_file} is truncated or altered: {size} bytes, manifest says "
                              f"{manifest.bytes}.", "use another checkpoint")
    if crc32(pt_file) != manifest.crc32:
        raise CheckpointError(f"checkpoint {pt_file} is corrupt: CRC-32 does not match its manifest.",
                              "use another checkpoint")
    return manifest


def _verify_sharded(directory: Path, manifest: Manifest) -> None:
    if not directory.is_dir() or not manifest.files:
        raise CheckpointError(f"checkpoint {directory} does not match its manifest (a sharded checkpoint is a "
                              "directory listed file by file).", "use another checkpoint")
    for name, (size, crc) in manifest.files.items():
        path = directory / name
        try:
            found = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {directory} is incomplete: {name} is missing.",
                                  "use another checkpoint") from None
        if found != size:
            raise CheckpointError(f"checkpoint {directory} is truncated or altered: {name} has {found} bytes, the "
                                  f"manifest says {size}.", "use another checkpoint")
        if crc32(path) != crc:
            raise CheckpointError(f"checkpoint {directory} is corrupt: the CRC-32 of {name} does not match its "
                                  "manifest.", "use another checkpoint")


def crc32(path: Path, chunk: int = 1 << 22) -> int:
    crc = 0
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def load(pt_file: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` into host memory: a file holding code objects is refused.

    Always onto the CPU: ``load_state_dict`` then copies each tensor to where its parameter lives,
    one at a time, so a resume never holds a second copy of the model on the GPU; RNG states stay
    host tensors; and the optimizer's ``step`` counters stay on the CPU, where torch's optimizers
    keep them (on a GPU, Adam would read each back with ``.item()`` every step)."""
    try:
        return torch.load(pt_file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError (unsafe globals) or RuntimeError (bad zip)
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        reason = (f"it holds a pickled {unsafe.group(1)} object, which weights_only loading refuses" if unsafe
                  else f"{type(err).__name__}: {' '.join(str(err).split())[:200]}")
        raise CheckpointError(f"checkpoint {pt_file} cannot be loaded safely: {reason}.",
                              "only checkpoints written by ddp.train (plain tensors and data) are accepted") from None


def saved_recipe(pt_file: Path) -> str:
    """The recipe YAML ``pt_file`` was trained with: from its manifest, or (manifests written
    before they carried it) from the file itself."""
    recipe = read_manifest(pt_file).recipe
    if recipe is None:
        recipe = str(load(pt_file).get("recipe", ""))  # sharded checkpoints always have it in the manifest
    return recipe


def candidates(directory: Path) -> list[Path]:
    """Every checkpoint (``step-*.pt``, ``step-*.dcp``) in ``directory``, newest (highest step) first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.search(p.name))]
    return [path for _, path in sorted(found, reverse=True)]


def latest_step(directory: Path) -> int | None:
    """The step of the checkpoint ``latest`` names, by its manifest; None without a readable one."""
    name = read_pointer(directory, "latest")
    if name is None:
        return None
    try:
        return read_manifest(directory / name).step
    except CheckpointError:
        return None


def read_pointer(directory: Path, name: str) -> str | None:
    try:
        return (directory / name).read_text().strip() or None
    except FileNotFoundError:
        return None


def prune(directory: Path, keep: int, protect: set[str]) -> list[str]:
    """Delete all but the ``keep`` newest checkpoints (and their manifests), sparing ``protect``,
    and what saves killed midway left: temporary files and directories, and checkpoints renamed
    into place whose manifest was never written."""
    for stale in directory.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    for stale in directory.glob(".*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    removed = []
    found = candidates(directory)
    orphans = [path for path in found if not path.with_suffix(".json").exists()]  # saves killed before their manifest
    kept = [path for path in found if path not in orphans]
    for path in orphans + kept[keep:]:
        if path.name in protect:
            continue
        path.with_suffix(".json").unlink(missing_ok=True)  # manifest first: a half-pruned pair is invalid
        remove(path)
        removed.append(path.name)
    return removed
