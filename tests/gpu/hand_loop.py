"""The hand-written loop of GPU check h: ``bench/minimal_ddp.py``'s loop on one GPU, data on the GPU.

    torchrun --standalone --nproc_per_node=1 tests/gpu/hand_loop.py --model resnet18 --shape 3,32,32 \
        --train 10240 --steps 300 --order none,ddp --out DIR

The tutorial pattern (SGD with momentum, cross-entropy, zero_grad / backward / step) with the
same model builder, synthetic data, per-rank batch (32) and optimizer settings as
``bench.workloads`` gives ``python -m ddp.train``; the training set lives on the device and each
batch is sliced from a per-epoch permutation, as ours' in-memory path does, so the comparison is
loop against loop. ``--order`` runs one segment of ``--steps`` steps per entry in this one process:
``none`` (the plain module) or ``ddp`` (DistributedDataParallel, NCCL at world 1, as the tutorial
wraps at every world size); each segment builds its model afresh from the same seed. Each segment writes ``DIR/<entry>.jsonl`` with
``bench.loop_common``'s step records, timed by ``bench.measure``'s rule like every bench side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from bench.loop_common import StepRecorder, finish, set_threads
from bench.workloads import BATCH_SIZE, build_model, synthetic_train


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--shape", default="3,32,32")
    parser.add_argument("--train", type=int, default=10240)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--order", default="none,ddp")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    set_threads()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    train(args, device)
    finish()
    return 0


def train(args: argparse.Namespace, device: torch.device) -> None:
    torch.backends.cudnn.benchmark = True  # ours' default too (train.deterministic=false)
    shape = tuple(int(s) for s in args.shape.split(","))
    inputs, targets = (t.to(device) for t in synthetic_train(shape, args.train).tensors)
    generator = torch.Generator(device=device).manual_seed(0)
    order, position = torch.randperm(len(targets), device=device, generator=generator), 0
    for segment in args.order.split(","):
        torch.manual_seed(0)  # each segment has a model of its own: no DDP hooks on the plain one
        model = build_model(args.model, shape, 10).to(device)
        if segment == "ddp":
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        model.train()
        recorder = StepRecorder(args.out / f"{segment}.jsonl", dist.get_rank())
        for step in range(1, args.steps + 1):
            if position + BATCH_SIZE > len(targets):
                order, position = torch.randperm(len(targets), device=device, generator=generator), 0
            index = order[position:position + BATCH_SIZE]
            position += BATCH_SIZE
            loss = F.cross_entropy(model(inputs.index_select(0, index)), targets.index_select(0, index))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            recorder.record(1, step, loss.detach())
        recorder.close()
        del model, optimizer


if __name__ == "__main__":
    sys.exit(main())
