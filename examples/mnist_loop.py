"""The classic MNIST training loop — model, optimizer, epochs, evaluation — on ``ddp.setup``.

Written as the PyTorch MNIST tutorial writes it (a small CNN, Adadelta, a StepLR schedule), on the
8×8 handwritten digits that ship with scikit-learn, so it needs no download::

    python examples/mnist_loop.py                                  # one process
    torchrun --nproc_per_node=2 examples/mnist_loop.py --epochs 5  # two ranks, same results file layout
    python -m ddp.report runs/mnist_loop                           # the table and plot of the run

Stopped (Ctrl-C, SIGTERM, a Slurm preemption), it saves where it is and the same command resumes.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import TensorDataset

import ddp


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def digits(test_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """1,797 8×8 digits scaled to [0, 1], split the same way on every rank."""
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(len(y) * (1 - test_fraction))
    train, test = order[:cut], order[cut:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def main(args: argparse.Namespace) -> None:
    run = ddp.setup(epochs=args.epochs)
    train_set, test_set = digits()
    model = Net()
    model, optimizer = run.prepare(model, torch.optim.Adadelta(model.parameters(), lr=args.lr))
    scheduler = StepLR(optimizer, step_size=1, gamma=args.gamma)
    train_loader = run.loader(train_set, batch_size=args.batch_size)
    run.resume(model, optimizer, scheduler)
    for epoch in run.epochs():
        model.train()
        for inputs, targets in train_loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs), targets)
            loss.backward()
            optimizer.step()
            if run.should_stop():
                run.save(model, optimizer, scheduler)
                run.exit()
        scheduler.step()
        test = run.evaluate(model, test_set)
        run.log(epoch=epoch + 1, train_loss=loss.item(), test_loss=test["loss"], test_acc=test["accuracy"],
                test_count=test["count"])
        run.save(model, optimizer, scheduler)
    run.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="MNIST-style training on your own loop")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=0.7)
    main(parser.parse_args())
