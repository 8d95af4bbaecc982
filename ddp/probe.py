"""Command line: ``python -m ddp.probe [--recipe FILE] [--ranks N] [key=value ...]``.

Prints the analytic memory estimate and the probe's table (train and eval batch sizes) for a
recipe on this machine's device, without training and without writing anything. ``--ranks N``
sizes for N ranks sharing this host (DDP gradient buckets, or with ``dist.parallel=fsdp`` each
rank's shards, and each rank's share of the data and of host RAM).
"""

from __future__ import annotations

import argparse
import sys

from ddp.cluster.devices import choose_backend, choose_device, detect_devices
from ddp.config import Parallel, load_recipe
from ddp.data.datasets import build_datasets
from ddp.cluster.environment import SingleProcessEnv
from ddp.errors import DDPError, print_error
from ddp.memory.resolve import KEYS, probe_recipe, table_lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ddp.probe", description=__doc__.split("\n\n")[1],
                                     epilog="example: python -m ddp.probe --ranks 4 model.name=resnet18 "
                                            "data.name=synthetic data.synthetic_shape=[3,32,32] memory.budget_mb=2000")
    parser.add_argument("--recipe", help="YAML recipe (default: the built-in digits recipe)")
    parser.add_argument("--ranks", type=int, default=1, help="ranks per host to size for (default 1)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. memory.budget_mb=4000")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.ranks < 1:
            raise DDPError(f"--ranks={args.ranks} is invalid: it must be ≥ 1.", "e.g. --ranks 4")
        recipe = load_recipe(args.recipe, args.overrides)
        env = SingleProcessEnv()
        devices = detect_devices()
        parallel = Parallel.none if recipe.dist.parallel == Parallel.dp else recipe.dist.parallel
        device = choose_device(choose_backend(recipe.dist.backend, env, devices), parallel, env, devices)
        splits = build_datasets(recipe.data)
        probe = probe_recipe(recipe, splits, device, args.ranks, list(KEYS), ranks_on_host=args.ranks)
    except DDPError as err:
        print_error(err, 0)
        return 2 if type(err) is DDPError else err.exit_code
    print("\n".join(table_lines({"source": "probe", **probe.to_json()})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
