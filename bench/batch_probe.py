"""Batch-size search: our memory probe vs Lightning's BatchSizeFinder and Accelerate's
``find_executable_batch_size``, on the same simulated device and model.

``python -m bench.batch_probe [--caps 100,5000,100000] [--seeds 5] [--out DIR]``

The device (``bench/simulated_memory.py``) holds memory affine in the batch (2% fixed, ±0.3%
noise) and raises a CUDA-style out-of-memory error above ``cap`` samples; the budget given to our
probe is exactly what ``cap`` samples need, so the true maximum is ``cap``. The model is a real
MLP (16-128-10) trained with SGD + momentum on random 1×4×4 inputs, so every side runs real
steps. A step is one forward pass seen by the device. Lightning runs with its defaults
(``steps_per_trial=3``, ``init_val=2``, ``max_trials=25``, ``max_val=8192``, margin 5%) through
``Tuner.scale_batch_size`` in one process (its finder refuses distributed strategies); Accelerate
with its default start (128) and with a start of 131,072 (it only ever shrinks, by ×0.9).
Requires the bench extras (``pip install -e '.[bench]'``) for the two competitors.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import logging
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from bench.simulated_memory import SimulatedDevice
from ddp.memory.estimate import estimate_state
from ddp.memory.trials import probe_model
from ddp.model.zoo import mnist_mlp

SHAPE = (1, 4, 4)
CLASSES = 10
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


@dataclass
class Outcome:
    tool: str
    cap: int
    found: int | None
    steps: int
    seconds: float

    @property
    def verdict(self) -> str:
        if self.found is None:
            return "failed"
        if self.found > self.cap:
            return "ABOVE the cap (would OOM)"
        return "ok" if self.found >= 0.95 * self.cap else "< 95% of max"


def _model(device: SimulatedDevice) -> torch.nn.Module:
    torch.manual_seed(0)
    return device.attach(mnist_mlp(SHAPE, CLASSES))


def ours(cap: int, seed: int) -> Outcome:
    device = SimulatedDevice(cap=cap, seed=seed)
    model = _model(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    estimate = estimate_state(model, "sgd", 0.9)
    started = time.perf_counter()
    results = probe_model(model, optimizer, SHAPE, CLASSES, device, estimate.state + device.budget(),
                          {"train": 10**7}, estimate)
    return Outcome("ours (ddp.memory)", cap, results["train"].pick, device.forwards, time.perf_counter() - started)


def lightning(cap: int, seed: int, mode: str) -> Outcome:
    import lightning as L
    from lightning.pytorch.tuner import Tuner

    device = SimulatedDevice(cap=cap, seed=seed)
    net = _model(device)
    data = TensorDataset(torch.randn(2**18, *SHAPE), torch.randint(0, CLASSES, (2**18,)))

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.batch_size = net, 2

        def training_step(self, batch, _index):
            inputs, targets = batch
            return F.cross_entropy(self.net(inputs), targets)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

        def train_dataloader(self):
            return DataLoader(data, batch_size=self.batch_size, shuffle=True)

    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    started = time.perf_counter()
    with _quiet():
        found = Tuner(trainer).scale_batch_size(Module(), mode=mode)
    return Outcome(f"Lightning BatchSizeFinder ({mode})", cap, found, device.forwards, time.perf_counter() - started)


def accelerate(cap: int, seed: int, start: int) -> Outcome:
    from accelerate.utils import find_executable_batch_size

    device = SimulatedDevice(cap=cap, seed=seed)
    model = _model(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    @find_executable_batch_size(starting_batch_size=start)
    def one_step(batch_size: int) -> int:
        inputs, targets = torch.randn(batch_size, *SHAPE), torch.randint(0, CLASSES, (batch_size,))
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return batch_size

    started = time.perf_counter()
    with _quiet():
        try:
            found = one_step()
        except RuntimeError:  # "No executable batch size found, reached zero."
            found = None
    return Outcome(f"Accelerate find_executable_batch_size (start {start:,})", cap, found, device.forwards,
                   time.perf_counter() - started)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def run(caps: list[int], seeds: int) -> list[list[Outcome]]:
    """Per cap and tool, one outcome per seed (ours varies with the noise; the others do not)."""
    tools = [lambda c, s: ours(c, s), lambda c, s: lightning(c, s, "power"), lambda c, s: lightning(c, s, "binsearch"),
             lambda c, s: accelerate(c, s, 128), lambda c, s: accelerate(c, s, 2**17)]
    rows = []
    for cap in caps:
        for index, tool in enumerate(tools):
            outcomes = [tool(cap, seed) for seed in range(seeds if index == 0 else 1)]
            rows.append(outcomes)
            print(f"cap {cap:,}: {outcomes[0].tool}: found {[o.found for o in outcomes]} "
                  f"steps {[o.steps for o in outcomes]}", file=sys.stderr)
    return rows


def render(rows: list[list[Outcome]], seeds: int) -> str:
    lines = [f"# Batch-size search, {datetime.date.today().isoformat()}", "",
             f"torch {torch.__version__}, {_versions()}; our probe over {seeds} noise seeds (min–max), "
             "the others are deterministic here.", "",
             "| cap (true max) | tool | found | steps | seconds | verdict |", "|---|---|---|---|---|---|"]
    for outcomes in rows:
        first = outcomes[0]
        found = _span([o.found for o in outcomes]) if first.found is not None else "—"
        steps = _span([o.steps for o in outcomes])
        seconds = f"{statistics.median(o.seconds for o in outcomes):.2f}"
        verdicts = sorted({o.verdict for o in outcomes})
        lines.append(f"| {first.cap:,} | {first.tool} | {found} | {steps} | {seconds} | {', '.join(verdicts)} |")
    return "\n".join(lines) + "\n"


def _span(values: list[int | None]) -> str:
    values = [v for v in values if v is not None]
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def _versions() -> str:
    found = []
    for name in ("lightning", "accelerate"):
        try:
            found.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batch_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--caps", default="100,5000,100000", help="comma-separated caps in samples")
    parser.add_argument("--seeds", type=int, default=5, help="noise seeds for our probe (default 5)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the markdown report")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = render(run([int(c) for c in args.caps.split(",")], args.seeds), args.seeds)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{datetime.date.today().isoformat()}-batch-probe.md").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
