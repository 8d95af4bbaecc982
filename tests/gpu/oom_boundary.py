"""The real out-of-memory boundary of one recipe's training step, found by bisection (GPU check c).

    python tests/gpu/oom_boundary.py [--fake-cap N] key=value ...     → one JSON line on stdout

The model, optimizer, device and seeding come from the library's own ``ddp.runner.prepare`` on the
same overrides a training run gets (so cudnn.benchmark, the model's construction and the optimizer
are the run's), and the dataset's tensors are put on the device when the run would put them there
(the in-memory path, ``ddp.data.device_data.choose_loader``) — they hold memory during training too.
Then real training steps, in the trainer's order (zero_grad, forward, cross-entropy, backward,
optimizer step), run at batch sizes that double until one runs out of memory, and the boundary
is bisected to 0.5% between the largest batch that ran and the smallest that did not. Each trial
runs ``TRIAL_STEPS`` steps: the optimizer state exists from the first (primed) step on, and a
second step meets the allocator as a training run's steady state does. After an out-of-memory
error the half-built graph and the gradients are dropped and the CUDA cache emptied.

Run this while nothing else of yours holds the GPU except a ballast process, and run the training
run after this process has exited: both then see the same free memory (``mem_get_info``, which is
what the probe's budget is read from).

``--fake-cap N`` (CPU smoke mode only): a batch above N counts as out of memory without running.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch.nn import functional as F

TRIAL_STEPS = 2
START = 16
RESOLUTION = 0.005  # stop bisecting when (first failure - boundary) <= 0.5% of the boundary


def is_oom(err: BaseException) -> bool:
    text = str(err)
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(err, oom)) or "out of memory" in text or "ALLOC_FAILED" in text


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fake-cap", type=int, default=0)
    args, overrides = parser.parse_known_args(argv)

    from ddp.config import load_recipe
    from ddp.cluster.environment import SingleProcessEnv
    from ddp.data.device_data import choose_loader
    from ddp.model.optim import build_optimizer
    from ddp.runner import prepare

    overrides = [o for o in overrides if not o.startswith(("data.batch_size=", "data.eval_batch_size="))]
    recipe = load_recipe(None, [*overrides, "data.batch_size=1", "data.eval_batch_size=1"])
    plan = prepare(recipe, SingleProcessEnv())
    device, splits = plan.device, plan.splits
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = plan.model.to(device)
    if recipe.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, recipe.optim)
    resident = []
    if choose_loader(recipe.data.loader, splits, device, recipe.data.memory_limit_mb):
        tensors = splits.materialise()
        resident = [t.to(device) for t in vars(tensors).values() if isinstance(t, torch.Tensor)]
    shape, classes, limit = tuple(splits.shape), splits.classes, len(splits.train)
    free_mb = torch.cuda.mem_get_info(device)[0] / 2**20 if device.type == "cuda" else None

    def steps(batch: int) -> None:
        for _ in range(TRIAL_STEPS):
            inputs = torch.randn((batch, *shape), device=device)
            targets = torch.randint(0, classes, (batch,), device=device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
            del inputs, targets, loss
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    trials: list[list] = []

    def fits(batch: int) -> bool:
        outcome = "fits"
        if args.fake_cap and batch > args.fake_cap:
            outcome = "oom (fake cap)"
        else:
            try:
                steps(batch)
            except Exception as err:  # noqa: BLE001 - only out-of-memory is expected
                if not is_oom(err):
                    raise
                outcome = f"oom ({type(err).__name__})"
        optimizer.zero_grad(set_to_none=True)  # outside the except block: its traceback held the graph
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        trials.append([batch, outcome])
        print(f"  batch {batch:>7}: {outcome}", file=sys.stderr, flush=True)
        return outcome == "fits"

    started = time.perf_counter()
    smallest = 2  # BatchNorm cannot train on one sample
    if not fits(smallest):
        raise SystemExit(f"batch {smallest} does not fit: nothing to bisect")
    good, bad, batch = smallest, None, max(START, smallest)
    while True:
        batch = min(batch, limit)
        if fits(batch):
            good = batch
            if batch == limit:
                break
            batch *= 2
        else:
            bad = batch
            break
    while bad is not None and bad - good > max(1, int(good * RESOLUTION)):
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    del resident
    print(json.dumps({"boundary": good, "first_oom": bad, "limit": limit, "free_mb": free_mb,
                      "device": str(device), "trials": trials, "seconds": round(time.perf_counter() - started, 2)}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
