"""One plain ``state_dict`` file from a checkpoint, whatever wrote it (DDP, FSDP, one process).

``export(source, dest)`` finds the checkpoint (a run version directory or its checkpoints
directory: the one ``latest`` names, or ``best``; or one checkpoint file), verifies it as a resume
does (size and CRC-32 against its manifest), reads it with ``weights_only=True`` and writes the
plain model's ``state_dict`` (no ``module.``/``_orig_mod.`` prefixes) to ``dest`` atomically: a
reader sees no file or the whole one. The result loads with ``torch.load(dest, weights_only=True)``
into the recipe's model, and a run starts from it with ``model.weights=dest``.

Each checkpoint format is a ``Reader``: how to recognise a checkpoint of that format and how to
read its weights: the whole-state ``.pt`` file (``checkpoint.format=file``) and the sharded
``.dcp`` directory (``torch.distributed.checkpoint``, FSDP's default), whose shards are put
together here in one process. Pure file logic: no process group.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ddp.checkpoint import files, sharded, storage
from ddp.checkpoint.atomic import atomic_open
from ddp.checkpoint.compatibility import FORMAT, strip_prefixes
from ddp.checkpoint.files import CheckpointError
from ddp.config import flat
from ddp.errors import DDPError
from ddp.lifecycle.versions import list_versions
from ddp.reporting.text import count

POINTERS = ("latest", "best")


class ExportError(DDPError):
    """The destination cannot be written as asked: it exists, is a directory, or has no parent."""

    exit_code = 2


@dataclass(frozen=True)
class Weights:
    """What a reader gives: the plain model's weights and the checkpoint they come from."""

    state_dict: dict[str, torch.Tensor]
    checkpoint: Path
    step: int
    epoch: int
    metric: str | None = None  # e.g. "test_acc 0.9861"
    model_name: str | None = None  # the recipe's model.name


@dataclass(frozen=True)
class Reader:
    """One checkpoint format."""

    name: str
    recognises: Callable[[Path], bool]
    read: Callable[[Path], Weights]


@dataclass(frozen=True)
class Exported:
    weights: Weights
    dest: Path
    bytes: int


def export(source: Path, dest: Path, which: str | None = None, force: bool = False) -> Exported:
    """Write the model weights of the checkpoint ``source`` names to ``dest`` (see the module)."""
    checkpoint = locate(source, which)
    if dest.resolve() == checkpoint.resolve():
        raise ExportError(f"{dest} is the checkpoint itself.", "give another destination, e.g. model.pt")
    check_dest(dest, force)  # before reading: a large checkpoint takes a while
    try:
        weights = reader_for(checkpoint).read(checkpoint)
    except OSError as err:
        raise CheckpointError(f"cannot read {checkpoint}: {err.strerror or err}.", _another(checkpoint)) from None
    return Exported(weights, dest, write(dest, weights.state_dict))


# --- finding the checkpoint -----------------------------------------------------------------

def locate(source: Path, which: str | None = None) -> Path:
    """The checkpoint ``source`` names: itself when a reader recognises it, else the one the
    ``which`` pointer (default ``latest``) of its checkpoints directory names."""
    if not source.exists():
        raise CheckpointError(f"{source} does not exist.",
                              "give a run version directory (runs/<name>/version_N) or a checkpoint file")
    if any(reader.recognises(source) for reader in READERS):
        if which is not None:
            raise CheckpointError(f"--which {which} picks a checkpoint of a directory, but {source} is one "
                                  "checkpoint already.", "drop --which, or give the run directory")
        return source
    return _pointed(_checkpoints_dir(source), which or "latest")


def _checkpoints_dir(source: Path) -> Path:
    if not source.is_dir():
        raise CheckpointError(f"{source} is not a checkpoint.",
                              "give a run version directory (runs/<name>/version_N) or a step-*.pt file or step-*.dcp directory")
    if (source / "checkpoints").is_dir():
        return source / "checkpoints"
    versions = list_versions(source)
    if versions:
        raise CheckpointError(f"{source} holds {count(len(versions), 'run version')}, not one run's checkpoints.",
                              f"name one, e.g. the newest: {versions[-1]}")
    return source


def _pointed(directory: Path, which: str) -> Path:
    name = files.read_pointer(directory, which)
    if name is not None and not (directory / name).exists():
        raise CheckpointError(f"{directory / which} names {name}, which does not exist.", _another(directory / name))
    if name is not None:
        return directory / name
    where = directory.parent if directory.name == "checkpoints" else directory
    if which == "best" and files.candidates(directory):
        raise CheckpointError(f"{where} has no best checkpoint (no metric was recorded with its checkpoints).",
                              "export the newest with --which latest")
    raise CheckpointError(f"{where} has no checkpoint (no {directory / which}).",
                          "train it until a checkpoint is saved, or give another run or a step-*.pt file or step-*.dcp directory")


def reader_for(checkpoint: Path) -> Reader:
    for reader in READERS:
        if reader.recognises(checkpoint):
            return reader
    raise CheckpointError(f"{checkpoint} is not a checkpoint in a format this version reads "
                          f"({', '.join(reader.name for reader in READERS)}).",
                          "give a step-*.pt file written by ddp.train")


# --- the whole-state .pt file (DDP and FSDP today) ---------------------------------------------

def _is_whole_file(path: Path) -> bool:
    return path.is_file() and path.suffix == ".pt"


def _read_whole_file(path: Path) -> Weights:
    """Verified against its manifest, then read onto the CPU with ``weights_only=True``."""
    try:
        manifest = files.verify(path)
    except CheckpointError as err:
        raise CheckpointError(err.problem, _another(path)) from None
    payload = files.load(path)
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt != FORMAT or not isinstance(payload.get("model"), dict):
        raise CheckpointError(f"{path} is not a ddp.train checkpoint (format {fmt!r}).",
                              "give a step-*.pt file written by ddp.train")
    state = strip_prefixes(payload["model"])
    odd = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if odd:
        raise CheckpointError(f"{path}: the model state holds values that are not tensors ({odd[:3]}).",
                              "give a step-*.pt file written by ddp.train")
    metric = f"{manifest.metric_name or 'metric'} {manifest.metric:.4f}" if manifest.metric is not None else None
    recipe = manifest.recipe if manifest.recipe is not None else str(payload.get("recipe", ""))
    return Weights(state, path, manifest.step, manifest.epoch, metric, _model_name(recipe))


def _another(broken: Path) -> str:
    """The hint for a broken checkpoint: the newest intact one beside it, when there is one."""
    intact = storage.newest_valid(broken.parent)
    if intact is None:
        return "no intact checkpoint is left beside it; export another run"
    return f"export an intact one, e.g. {broken.parent / intact}"


def _model_name(recipe_yaml: str) -> str | None:
    try:
        name = flat(recipe_yaml).get("model.name")
    except Exception:  # noqa: BLE001 - the name only words the summary line
        return None
    return str(name) if name is not None else None


# --- the sharded step-*.dcp directory (every rank's shards, torch.distributed.checkpoint) ---------

def _is_sharded_dir(path: Path) -> bool:
    return path.is_dir() and files.is_sharded(path)


def _read_sharded(path: Path) -> Weights:
    """Verified against its manifest file by file, then every shard of every model tensor read and
    put together in this one process."""
    try:
        manifest = files.verify(path)
    except CheckpointError as err:
        raise CheckpointError(err.problem, _another(path)) from None
    state = strip_prefixes(sharded.read_weights(path))
    if not state:
        raise CheckpointError(f"{path} holds no model weights.", _another(path))
    metric = f"{manifest.metric_name or 'metric'} {manifest.metric:.4f}" if manifest.metric is not None else None
    return Weights(state, path, manifest.step, manifest.epoch, metric, _model_name(manifest.recipe or ""))


READERS: tuple[Reader, ...] = (Reader("a whole-state step-*.pt file", _is_whole_file, _read_whole_file),
                               Reader("a sharded step-*.dcp directory", _is_sharded_dir, _read_sharded))


# --- writing the destination ----------------------------------------------------------------

def check_dest(dest: Path, force: bool) -> None:
    """Refuse a destination that exists (unless ``force``), is a directory, or cannot be made."""
    if dest.is_dir():
        raise ExportError(f"{dest} is a directory.", f"give a file name, e.g. {dest / 'model.pt'}")
    if dest.exists() and not force:
        raise ExportError(f"{dest} exists already.", "give another name, or --force to replace it")
    parent = dest.parent
    if not parent.is_dir():
        raise ExportError(f"the directory {parent} does not exist.",
                          f"create it (mkdir -p {parent}) or write elsewhere")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise storage.file_refused(dest, PermissionError(errno.EACCES, os.strerror(errno.EACCES)))  # type: ignore[misc]


def write(dest: Path, state_dict: dict[str, torch.Tensor]) -> int:
    """``torch.save(state_dict)`` to ``dest`` atomically; returns its size in bytes."""
    try:
        with atomic_open(dest) as handle:
            size, _ = files.torch_save(state_dict, handle)
    except OSError as err:
        refused = storage.file_refused(dest, err, storage.payload_bytes(state_dict))
        if refused is not None:
            raise refused from None
        raise ExportError(f"cannot write {dest}: {err.strerror or err}.", "write elsewhere") from None
    return size


def summary(result: Exported) -> str:
    """The one line saying what was written and how to load it."""
    weights, dest = result.weights, result.dest
    facts = ", ".join(fact for fact in (f"step {weights.step}", f"epoch {weights.epoch}", weights.metric) if fact)
    model = f" (model.name={weights.model_name})" if weights.model_name else ""
    return (f"wrote {dest}: {count(len(weights.state_dict), 'tensor')}, {storage.human_size(result.bytes)}, the "
            f"weights of {weights.checkpoint} ({facts}). Load it into the recipe's model{model} with "
            f"model.load_state_dict(torch.load({str(dest)!r}, weights_only=True)), or start a run from it with "
            f"model.weights={dest}")
