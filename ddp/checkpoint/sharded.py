"""Sharded checkpoints: every rank writes its own part, and any world size reads them back.

    checkpoints/
      step-00000120.dcp/        torch.distributed.checkpoint's directory:
        .metadata               which rank's file holds which piece of which tensor (rank 0)
        __R_0.distcp            rank R's shards of the model and optimizer state
        train_state.pt          what is not sharded: step, epoch, every rank's RNG, the recipe (rank 0)
      step-00000120.json        manifest: size and CRC-32 of every file above

Written with ``torch.distributed.checkpoint`` (DCP) rather than by hand: its planner records the
global shape and offsets of every shard, so a checkpoint saved by 4 FSDP ranks loads into 2, into
one process, or into DDP, and each rank reads only the pieces it holds. Everything is written into
a hidden ``.step-N.dcp.partial`` directory first, fsynced by every rank, CRC-checked per file, and
only then renamed into place by rank 0, followed by its manifest and ``latest``
(``ddp.checkpoint.files.publish``): a save killed at any point leaves no checkpoint that resume
would pick. Who calls what is ``ddp.checkpoint.checkpointer``'s.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ddp.checkpoint.atomic import fsync_dir
from ddp.checkpoint.files import CheckpointError, crc32, load as load_pt, remove
from ddp.model.parallel import unwrap_model

STATE_FILE = "train_state.pt"


def partial_dir(final: Path) -> Path:
    """Where a save of ``final`` is written before it is published."""
    return final.parent / f".{final.name}.partial"


def state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Each rank's part of the model's (and optimizer's) state, keyed by parameter name: DTensor
    shards under FSDP, whole tensors otherwise. Under FSDP all ranks must call. An optimizer
    that has not stepped is left out: DCP would take a zero step to make its state (an Adam then
    starts at step 2)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    plain = unwrap_model(model)
    if optimizer is None or not optimizer.state:
        return {"model": get_model_state_dict(plain)}
    weights, optim = get_state_dict(plain, optimizer)
    return {"model": weights, "optim": optim}


def write_shards(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, group: Any,
                 distributed: bool) -> None:
    """All ranks must call, with the same (empty, existing) ``directory``. Each writes and fsyncs its
    shards, DCP's collectives on ``group``; replicated tensors (DDP) are written once, by one rank."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state_dicts(model, optimizer), storage_writer=dcp.FileSystemWriter(str(directory), sync_files=True),
             process_group=group if distributed else None, no_dist=not distributed)


def own_files(directory: Path, rank: int) -> dict[str, list[int]]:
    """{file name: [bytes, CRC-32]} of the files rank ``rank`` wrote into ``directory`` (rank 0
    also the metadata and the train state)."""
    names = [p.name for p in directory.glob(f"__{rank}_*.distcp")]
    if rank == 0:
        names += [".metadata", STATE_FILE]
    return {name: [(directory / name).stat().st_size, crc32(directory / name)] for name in sorted(names)}


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, group: Any,
         distributed: bool) -> None:
    """All ranks must call. Reads the pieces of ``path`` this rank holds, at whatever world size
    and parallelism wrote them, into ``model`` (and ``optimizer``: its state and, until the caller
    restores the recipe's, its hyperparameters), DCP's collectives on ``group``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict

    plain = unwrap_model(model)
    if optimizer is not None and not has_optimizer(path):
        optimizer = None  # saved before its first step: the optimizer starts fresh, as it was
    if optimizer is None:
        wanted = {"model": get_model_state_dict(plain)}
    else:  # an optimizer without state gets it from a zero step here, then the checkpoint's
        weights, optim = get_state_dict(plain, optimizer)
        wanted = {"model": weights, "optim": optim}
    try:
        dcp.load(wanted, storage_reader=dcp.FileSystemReader(str(path)),
                 planner=DefaultLoadPlanner(allow_partial_load=True),  # state of params that had no gradient yet
                 process_group=group if distributed else None, no_dist=not distributed)
    except save_errors() as err:
        raise _unreadable(path, err) from None
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(plain, wanted["model"])
        return
    set_state_dict(plain, optimizer, model_state_dict=wanted["model"], optim_state_dict=wanted["optim"])


def _keys(path: Path) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    try:
        return dict(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    except save_errors() as err:  # a torn or foreign .metadata
        raise CheckpointError(f"{path} has unreadable shard metadata ({type(err).__name__}: {err}).",
                              "use another checkpoint") from None


def model_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{parameter or buffer name: global shape} of the model in the checkpoint ``path``."""
    return {key[len("model."):]: tuple(getattr(meta, "size", ())) for key, meta in _keys(path).items()
            if key.startswith("model.")}


def has_optimizer(path: Path) -> bool:
    return any(key.startswith("optim.") for key in _keys(path))


def read_train_state(path: Path) -> dict[str, Any]:
    """What rank 0 wrote beside the shards (the ``.pt`` payload less model and optimizer)."""
    return load_pt(path / STATE_FILE)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The whole model weights of ``path`` in this one process, without a process group (for
    ``python -m ddp.export``): every piece of every tensor, read onto the CPU."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=FileSystemReader(str(path)),
                         planner=_EmptyStateDictLoadPlanner(keys={"model"}), no_dist=True)
    except save_errors() as err:
        raise _unreadable(path, err) from None
    return dict(state.get("model", {}))


def _unreadable(path: Path, err: BaseException) -> CheckpointError:
    _, _, text = describe_error(err, 0)
    return CheckpointError(f"the shards of {path} cannot be read: {text}.", "use another checkpoint")


# DCP warns that it assumes one process whenever no process group exists, on its own threads too
# (checkpoint.async_save in one process): that is meant here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)


def move_into_place(partial: Path, final: Path) -> None:
    """Rename the complete ``partial`` directory to ``final`` (a checkpoint of the same step saved
    before is replaced) and make the rename durable."""
    if final.exists():
        old = final.parent / f".{final.name}.replaced.partial"
        remove(old)
        os.replace(final, old)
        os.replace(partial, final)
        remove(old)
    else:
        os.replace(partial, final)
    fsync_dir(final.parent)


def bytes_of(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """About how many bytes a sharded checkpoint of ``model`` and ``optimizer`` holds, all ranks together."""
    from ddp.checkpoint.storage import payload_bytes

    def whole(value: Any) -> Any:
        return torch.empty(value.shape, dtype=value.dtype, device="meta") if isinstance(value, torch.Tensor) else value

    total = sum(payload_bytes(whole(v)) for v in unwrap_model(model).state_dict().values())
    if optimizer is not None:
        total += sum(payload_bytes({k: whole(v) for k, v in s.items()}) for s in optimizer.state.values())
    return total


def save_errors() -> tuple[type[BaseException], ...]:
    """What a failed DCP save or load raises, for ``except sharded.save_errors()``: DCP's
    ``CheckpointException`` is a ``BaseException``. Imported only when an exception is matched:
    ``torch.distributed.checkpoint`` takes 1.6 s of CPU to import, in every rank, and most runs
    never write a sharded checkpoint."""
    from torch.distributed.checkpoint.api import CheckpointException

    return Exception, CheckpointException


def describe_error(err: BaseException, rank: int) -> tuple[int, int | None, str]:
    """(rank, errno or None, "Type: message") of a failed save, picklable for the other ranks. DCP
    raises the same ``CheckpointException`` on every rank, wrapping each failed rank's error."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, (err, _) = min(failures.items(), key=lambda item: item[0])
    seen: BaseException | None = err
    while seen is not None:  # the disk's own error, however deep torch wrapped it
        if isinstance(seen, OSError) and seen.errno is not None:
            return rank, seen.errno, seen.strerror or str(seen)
        seen = seen.__cause__ or seen.__context__
    return rank, None, f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"


def start_shards(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, group: Any,
                 distributed: bool, stager: Any) -> Callable[[], Any]:
    """All ranks must call, with the same (empty, existing) ``directory``. Copies this rank's part
    of the state to host memory (``stager``, from ``background.host_stager``; None: DCP's own) and
    starts writing it on DCP's thread, its collectives on ``group``; returns the function that
    waits until the files are durable. The next call may only come after that function returned:
    it reuses the buffers."""
    import torch.distributed.checkpoint as dcp

    # per_thread_copy_ahead=0: the staged state is in host memory already. DCP's own stager sets it
    # so; with ours given instead, its writer would otherwise pick the CUDA-overlapping loader on any
    # machine with a GPU, and make a CUDA context on GPU 0 from its writer thread in every rank.
    writer = dcp.FileSystemWriter(str(directory), sync_files=True, per_thread_copy_ahead=0)
    staged = {"async_stager": stager} if stager is not None else {}
    response = dcp.async_save(state_dicts(model, optimizer), storage_writer=writer, process_group=group,
                              no_dist=not distributed, **staged)
    staging = getattr(response, "staging_completion", None)
    if staging is not None:
        staging.result()  # the snapshot: training may go on once it is taken
    return getattr(response, "upload_completion", response).result
