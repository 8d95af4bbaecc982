"""PyTorch Lightning's Trainer on the bench workloads (``strategy="ddp"`` on CPU, under torchrun).

``torchrun --standalone --nproc_per_node=N bench/lightning_loop.py --workload mlp --max-steps 400``

A LightningModule around the same model (cross-entropy, SGD with momentum, no scheduler); the
Trainer swaps in a DistributedSampler itself. Progress bar, logger, checkpointing, model summary
and sanity validation are off and there is no validation loop. A callback writes the step record
after each optimizer step (``on_train_batch_end``).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository (and `bench`) importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from bench.loop_common import StepRecorder, finish, parse_args, set_threads
from bench.workloads import BATCH_SIZE, Workload, build_model


class Classifier(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        return F.cross_entropy(self.model(inputs), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


class StepTimes(L.Callback):
    """Writes the step record once per training batch, after its optimizer step."""

    def __init__(self, recorder: StepRecorder) -> None:
        self.recorder = recorder
        self.step = 0

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: object,
                           batch: object, batch_idx: int) -> None:
        self.step += 1
        self.recorder.record(trainer.current_epoch + 1, self.step, outputs["loss"])  # type: ignore[index]


def main() -> int:
    workload, max_steps, epochs, out = parse_args(__doc__.splitlines()[0])
    warnings.filterwarnings("ignore", module="lightning")  # "few workers" and similar advice
    set_threads()
    fit(workload, max_steps, epochs, out)
    finish()
    return 0


def fit(workload: Workload, max_steps: int, epochs: int, out: Path) -> None:
    torch.manual_seed(0)
    recorder = StepRecorder(out, int(os.environ.get("RANK", "0")))
    trainer = L.Trainer(
        accelerator="cpu", devices=int(os.environ.get("LOCAL_WORLD_SIZE", "1")), num_nodes=1,
        strategy="ddp", max_steps=max_steps, max_epochs=epochs, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[StepTimes(recorder)],
    )
    loader = DataLoader(workload.train_set(), batch_size=BATCH_SIZE, shuffle=True)
    trainer.fit(Classifier(build_model(workload.model, workload.shape, 10)), train_dataloaders=loader)
    recorder.close()


if __name__ == "__main__":
    sys.exit(main())
