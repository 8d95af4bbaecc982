"""What logging costs the training loop: step records, TensorBoard and the tqdm bar, side by side.

One process, the MNIST MLP on synthetic 1×28×28 data (the workload where per-step overhead shows
most), two epochs per run; throughput is the second epoch's ``samples_per_s`` from metrics.jsonl.
Variants run in interleaved rounds; each is reported relative to the quietest setting
(``log.every_steps`` = 10,000, no TensorBoard, no bar): 1.00 means logging costs nothing.

``python -m bench.logging_cost [--rounds N]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from ddp.config import load_recipe
from ddp.cluster.environment import SingleProcessEnv
from ddp.runner import execute

BASE = ["model.name=mnist_mlp", "data.name=synthetic", "data.synthetic_shape=[1,28,28]",
        "data.synthetic_train=16384", "data.synthetic_test=256", "train.epochs=2", "checkpoint.every_epochs=0",
        "log.level=WARNING"]
VARIANTS = {
    "quiet (every_steps=10000, no TensorBoard, no bar)": ["log.every_steps=10000", "log.tensorboard=false",
                                                          "log.progress=false"],
    "default (every_steps=20, TensorBoard)": ["log.tensorboard=true", "log.progress=false"],
    "every step (every_steps=1, TensorBoard)": ["log.every_steps=1", "log.tensorboard=true", "log.progress=false"],
    "tqdm bar on (default logging)": ["log.tensorboard=true", "log.progress=true"],
}


def _throughput(run_dir: Path) -> float:
    epochs = [json.loads(line) for line in (run_dir / "version_0" / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in line]
    return epochs[-1]["samples_per_s"]


def measure(rounds: int, directory: Path) -> dict[str, list[float]]:
    quiet = next(iter(VARIANTS))
    ratios: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(rounds):
        order = list(VARIANTS) if round_ % 2 == 0 else list(reversed(VARIANTS))
        speeds = {}
        for name in order:
            run_dir = directory / f"r{round_}-{abs(hash(name))}"
            execute(load_recipe(None, [*BASE, *VARIANTS[name], f"run.dir={run_dir}"]), SingleProcessEnv())
            speeds[name] = _throughput(run_dir)
        for name in VARIANTS:
            ratios[name].append(speeds[name] / speeds[quiet])
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.logging_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ratios = measure(args.rounds, Path(tmp))
    print("| logging | throughput ÷ quiet, median [min–max] | rounds |\n|---|---|---|")
    for name, values in ratios.items():
        print(f"| {name} | {statistics.median(values):.2f} [{min(values):.2f}–{max(values):.2f}] | {len(values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
