"""The baseline: a minimal hand-written DDP loop, the PyTorch tutorial pattern.

``torchrun --standalone --nproc_per_node=N bench/minimal_ddp.py --workload mlp --max-steps 500``

init_process_group(gloo) + DistributedSampler + DataLoader + DistributedDataParallel + SGD with
momentum and cross-entropy; nothing else (no scheduler, no evaluation, no metrics beyond the step
record of ``bench.loop_common``). The model is wrapped in DDP at every world size, as the tutorial
does. Same model, data, per-rank batch, optimizer settings and threads per rank as ``ddp.train``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository (and `bench`) importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from bench.loop_common import StepRecorder, finish, parse_args, reached, set_threads
from bench.workloads import BATCH_SIZE, Workload, build_model


def main() -> int:
    workload, max_steps, epochs, out = parse_args(__doc__.splitlines()[0])
    set_threads()
    dist.init_process_group("gloo")
    train(workload, max_steps, epochs, out)
    finish()
    return 0


def train(workload: Workload, max_steps: int, epochs: int, out: Path) -> None:
    torch.manual_seed(0)
    dataset = workload.train_set()
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler)
    model = DistributedDataParallel(build_model(workload.model, workload.shape, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    recorder = StepRecorder(out, dist.get_rank())
    step = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        model.train()
        for inputs, targets in loader:
            loss = F.cross_entropy(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
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
