"""Hugging Face Accelerate on the bench workloads: ``Accelerator(cpu=True)`` + ``prepare``.

``torchrun --standalone --nproc_per_node=N bench/accelerate_loop.py --workload mlp --max-steps 400``

The plain loop Accelerate's docs show: ``prepare(model, optimizer, dataloader)`` (DDP wrapping and
dataloader sharding are Accelerate's), ``accelerator.backward(loss)``, SGD with momentum, no
scheduler. With one process Accelerate runs without a process group and without DDP.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository (and `bench`) importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader

from bench.loop_common import StepRecorder, finish, parse_args, reached, set_threads
from bench.workloads import BATCH_SIZE, Workload, build_model


def main() -> int:
    workload, max_steps, epochs, out = parse_args(__doc__.splitlines()[0])
    set_threads()
    train(workload, max_steps, epochs, out)
    finish()  # not accelerator.end_training(): it destroys the group without a barrier (SIGABRT)
    return 0


def train(workload: Workload, max_steps: int, epochs: int, out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    set_threads()  # Accelerate may pick its own CPU thread count; keep the bench's rule
    torch.manual_seed(0)
    model = build_model(workload.model, workload.shape, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(workload.train_set(), batch_size=BATCH_SIZE, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    recorder = StepRecorder(out, accelerator.process_index)
    step = 0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        model.train()
        for inputs, targets in loader:
            loss = F.cross_entropy(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            step += 1
            recorder.record(epoch + 1, step, loss.detach())
            if reached(step, max_steps):
                break
        if reached(step, max_steps):
            break
    recorder.close()


if __name__ == "__main__":
    sys.exit(main())
