"""Checkpoint save and resume cost: ``Checkpointer`` ÷ plain ``torch.save`` / ``torch.load``.

State: torchvision ResNet-18 (CIFAR head) + SGD-momentum state after one step (≈ 94 MB), or with
``--model big`` a 4 × Linear(4096, 4096) stack + its momentum (≈ 537 MB), saved to the same local
directory. Each round times both sides once, in alternating order; the report
gives the median of per-round ratios with [min–max] and the absolute medians.

* save — ours: ``Checkpointer.save`` (CRC-32 while streaming, fsync, atomic rename, manifest,
  ``latest`` pointer, pruning), as one file and sharded (``torch.distributed.checkpoint``, here
  one process's shards), each synchronous and with ``checkpoint.async_save`` (timed until
  training may go on); plain: ``torch.save(state, path)`` (no fsync, no rename).
* resume — ours: ``Checkpointer.resume`` (size + CRC check, ``weights_only`` load or DCP's
  reader, compatibility check, load into model/optimizer, RNG restore) of the file and of the
  sharded checkpoint; plain: ``torch.load`` + ``load_state_dict`` of model and optimizer.

``python -m bench.checkpoint_save [--rounds N] [--model resnet18|big]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ddp.checkpoint.files import read_pointer
from ddp.checkpoint.checkpointer import Checkpointer, TrainState
from ddp.config import CheckpointConfig, load_recipe
from ddp.model.zoo import resnet18


MODELS = {  # name → (model, one input batch)
    "resnet18": (lambda: resnet18((3, 32, 32), 10), lambda: torch.randn(4, 3, 32, 32)),
    "big": (lambda: torch.nn.Sequential(*(torch.nn.Linear(4096, 4096) for _ in range(4))),
            lambda: torch.randn(4, 4096)),
}


def _state(name: str = "resnet18") -> tuple[torch.nn.Module, torch.optim.Optimizer,
                                            torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    build, batch = MODELS[name]
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    model(batch()).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


VARIANTS = {  # checkpoint.* of each of our sides
    "file": {},
    "sharded": {"format": "sharded"},
    "file, async (blocking part)": {"async_save": True},
    "sharded, async (blocking part)": {"format": "sharded", "async_save": True},
}


def measure(rounds: int, directory: Path, model_name: str = "resnet18") -> dict[str, dict[str, list[float]]]:
    """Per operation, per side ("plain" and each of ours), the seconds of each round. An async
    save is timed until training could go on (the snapshot); its background write finishes
    before the next side runs, untimed."""
    model, optimizer, scheduler = _state(model_name)
    recipe = load_recipe(None, ["model.name=resnet18", "data.name=synthetic", "data.synthetic_shape=[3,32,32]"])
    keepers = {name: Checkpointer(CheckpointConfig(keep=2, **cfg), directory / f"ours-{index}", recipe)
               for index, (name, cfg) in enumerate(VARIANTS.items())}
    plain_path = directory / "plain" / "state.pt"
    plain_path.parent.mkdir(parents=True)
    state = TrainState(epoch=1, global_step=10)

    def saving(keeper: Checkpointer) -> Callable[[], None]:
        def save() -> None:
            state.global_step += 1
            keeper.save(model, optimizer, scheduler, state)
        return save

    def plain_save() -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict()}, plain_path)

    def resuming(keeper: Checkpointer) -> Callable[[], None]:
        return lambda: keeper.resume(keeper.directory / str(read_pointer(keeper.directory, "latest")), model,
                                     optimizer)

    def plain_resume() -> None:
        payload = torch.load(plain_path, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])

    sides = {"save": {"plain": plain_save, **{name: saving(k) for name, k in keepers.items()}},
             "resume": {"plain": plain_resume, "file": resuming(keepers["file"]),
                        "sharded": resuming(keepers["sharded"])}}
    for operation in sides.values():  # warm the page cache and allocator once
        for fn in operation.values():
            fn()
            _finish(keepers)
    results: dict[str, dict[str, list[float]]] = {op: {side: [] for side in fns} for op, fns in sides.items()}
    for round_ in range(rounds):
        for op, fns in sides.items():
            order = list(fns.items())
            for name, fn in order if round_ % 2 == 0 else reversed(order):
                results[op][name].append(_timed(fn))
                _finish(keepers)
    return results


def _finish(keepers: dict[str, Checkpointer]) -> None:
    for keeper in keepers.values():
        keeper.finish()


def report(results: dict[str, dict[str, list[float]]]) -> list[str]:
    lines = ["| operation | ours | ours ÷ plain, median [min–max] | ours, median s | plain, median s | rounds |",
             "|---|---|---|---|---|---|"]
    for op, sides in results.items():
        plain = sides["plain"]
        for name, ours in sides.items():
            if name == "plain":
                continue
            ratios = [o / p for o, p in zip(ours, plain)]
            lines.append(f"| {op} | {name} | {statistics.median(ratios):.2f} [{min(ratios):.2f}–{max(ratios):.2f}] | "
                         f"{statistics.median(ours):.3f} | {statistics.median(plain):.3f} | {len(ratios)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.checkpoint_save", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet18",
                        help="resnet18 (≈ 94 MB of state) or big (≈ 537 MB)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        lines = report(measure(args.rounds, Path(tmp), args.model))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
