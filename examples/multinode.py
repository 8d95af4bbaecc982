"""pytorch/examples' ddp-tutorial-series ``multinode.py``, written on ``ddp.setup``.

The tutorial's script sets up the process group by hand, saves ``snapshot.pt`` from rank 0 with
``torch.save`` and resumes only the weights and the epoch. Here the same model, data and loop get
the launcher, device and interface choice, versioned runs, atomic checkpoints of the model AND
optimizer, resume of an interrupted run (even at another world size), agreed stop signals, and
exact evaluation::

    torchrun --nproc_per_node=2 examples/multinode.py 20 5          # 20 epochs, a checkpoint every 5
    python -m launch local --nproc 2 examples/multinode.py 20 5     # the same, with our thread counts
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=2 --master_addr=HOST0 --master_port=29500 \\
        examples/multinode.py 20 5                                  # one of two machines
"""

from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import ddp


def load_train_objs(size: int = 2048) -> tuple[TensorDataset, torch.nn.Module, torch.optim.Optimizer]:
    """The tutorial's objects: random 20-feature inputs with a random target, a linear model, SGD.
    The data come from a fixed generator, so every rank (and every rerun) has the same samples."""
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.rand(size, 20, generator=generator), torch.rand(size, 1, generator=generator)
    model = torch.nn.Linear(20, 1)
    return TensorDataset(inputs, targets), model, torch.optim.SGD(model.parameters(), lr=1e-3)


def main(total_epochs: int, save_every: int, batch_size: int) -> None:
    run = ddp.setup(name="multinode", epochs=total_epochs)
    dataset, model, optimizer = load_train_objs()
    model, optimizer = run.prepare(model, optimizer)
    train_data = run.loader(dataset, batch_size=batch_size)
    state = run.resume(model, optimizer)
    if run.is_main:
        print(f"epochs {state.epoch}..{total_epochs} | batch size {batch_size} per rank | "
              f"{len(train_data)} steps per epoch | {run.world_size} ranks on {run.device}")
    for epoch in run.epochs():
        for source, targets in train_data:
            optimizer.zero_grad()
            loss = F.mse_loss(model(source), targets)
            loss.backward()
            optimizer.step()
            if run.should_stop():
                run.save(model, optimizer)
                run.exit()
        metrics = run.evaluate(model, dataset, lambda out, y: {"mse": F.mse_loss(out, y, reduction="none").mean(1)})
        run.log(epoch=epoch + 1, loss=metrics["mse"])
        if (epoch + 1) % save_every == 0 or epoch + 1 == total_epochs:
            run.save(model, optimizer)
    run.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="simple distributed training job")
    parser.add_argument("total_epochs", type=int, help="Total epochs to train the model")
    parser.add_argument("save_every", type=int, help="How often to save a snapshot")
    parser.add_argument("--batch_size", default=32, type=int, help="Input batch size on each device (default: 32)")
    args = parser.parse_args()
    main(args.total_epochs, args.save_every, args.batch_size)
