"""The workloads every implementation trains: model, data, per-rank batch and run length.

``Workload.ours_overrides`` is the recipe for ``python -m ddp.train``; ``train_set`` and
``build_model`` give the competitor loops the same data and model. Only torch (and scikit-learn
for digits) is imported here, so a competitor's time to first step is not charged for our config
stack. ``train_set`` rebuilds exactly what ``ddp.data.datasets`` builds (a smoke test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from ddp.model.zoo import build_model  # noqa: F401  (re-exported: the same model builders as ours)

BATCH_SIZE = 32  # per rank, as data.batch_size in ours
SYNTHETIC_TEST = 256  # ours evaluates it after the measured steps; small so the run ends sooner


@dataclass(frozen=True)
class Workload:
    """One model on one dataset. A run stops after ``max_steps`` steps or ``epochs`` epochs."""

    key: str
    title: str
    model: str  # a ddp.model.zoo name
    data: str  # "synthetic" or "digits"
    shape: tuple[int, int, int]
    max_steps: int  # -1 = whole epochs
    epochs: int
    quick_max_steps: int
    quick_epochs: int
    synthetic_train: int = 4096

    def length(self, quick: bool) -> tuple[int, int]:
        """(max_steps, epochs) for a full or a quick run."""
        return (self.quick_max_steps, self.quick_epochs) if quick else (self.max_steps, self.epochs)

    def ours_overrides(self, quick: bool) -> list[str]:
        """``key=value`` overrides for ``ddp.train``: one step record per step; no TensorBoard, progress
        bar, resume or per-epoch checkpoint (ours still saves once after the last step, outside the
        measured window, like its evaluation)."""
        max_steps, epochs = self.length(quick)
        common = [f"model.name={self.model}", f"data.batch_size={BATCH_SIZE}", f"train.max_steps={max_steps}",
                  f"train.epochs={epochs}", "train.resume=never", "checkpoint.every_epochs=0", "log.every_steps=1",
                  "log.tensorboard=false", "log.progress=false", "log.level=WARNING"]
        if self.data == "digits":
            return ["data.name=digits", *common]
        shape = ",".join(str(s) for s in self.shape)
        return ["data.name=synthetic", f"data.synthetic_shape=[{shape}]",
                f"data.synthetic_train={self.synthetic_train}", f"data.synthetic_test={SYNTHETIC_TEST}", *common]

    def train_set(self) -> TensorDataset:
        """The training split exactly as ``ddp.data.datasets`` builds it for ``ours_overrides``."""
        return digits_train() if self.data == "digits" else synthetic_train(self.shape, self.synthetic_train)


# Run lengths. A launch costs ~5-7 s before and after the loop on this kind of machine (torchrun,
# interpreter, imports, rendezvous, shutdown), so the timed windows are kept to roughly 0.3-3 s:
# long enough to average over many steps, short enough that 7 rounds × 4 implementations ×
# 4 workloads × 2 world sizes stay near 20-25 minutes on 2 cores. Synthetic runs stay inside
# epoch 1 (synthetic_train ≥ max_steps × batch × 2 ranks); digits runs whole epochs.
WORKLOADS: dict[str, Workload] = {w.key: w for w in (
    Workload("mlp", "MNIST MLP 784-128-10 (synthetic 1×28×28)", "mnist_mlp", "synthetic", (1, 28, 28),
             max_steps=500, epochs=1, quick_max_steps=40, quick_epochs=1, synthetic_train=32000),
    Workload("cnn", "MNIST CNN (synthetic 1×28×28)", "mnist_cnn", "synthetic", (1, 28, 28),
             max_steps=40, epochs=1, quick_max_steps=10, quick_epochs=1, synthetic_train=4096),
    Workload("digits", "digits recipe (digits_cnn, 8×8 digits)", "digits_cnn", "digits", (1, 8, 8),
             max_steps=-1, epochs=3, quick_max_steps=-1, quick_epochs=1),
    Workload("resnet18", "ResNet-18 (synthetic 3×32×32)", "resnet18", "synthetic", (3, 32, 32),
             max_steps=15, epochs=1, quick_max_steps=6, quick_epochs=1, synthetic_train=1024),
)}
QUICK_WORKLOADS = ("mlp", "digits")  # --quick: the synthetic and the real-data path, cheapest models


def synthetic_train(shape: tuple[int, int, int], count: int, seed: int = 0, classes: int = 10) -> TensorDataset:
    """``ddp.data.datasets.load_synthetic``'s train split: seeded normal images, uniform labels."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn((count, *shape), generator=generator)
    labels = torch.randint(0, classes, (count,), generator=generator)
    return TensorDataset(images, labels)


def digits_train(test_fraction: float = 0.2, seed: int = 0) -> TensorDataset:
    """``ddp.data.datasets.load_digits``'s train split: the seeded 80% of 1,797 images, standardised."""
    from ddp.data.digits import standardised_split  # torch, numpy and the standard library only

    train, _ = standardised_split(test_fraction, seed)
    return TensorDataset(*train)
