"""Command line: ``[torchrun ...] python -m ddp.train [--recipe FILE] [--print-recipe] [key=value ...]``."""

from __future__ import annotations

import argparse
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from ddp.model.registry import check_recipe
from ddp.config import load_recipe, to_yaml
from ddp.cluster.environment import detect_environment, exit_code_file, launcher_rank
from ddp.errors import DDPError, print_error
from ddp.runner import run
from ddp.engine.stop import EXIT_INTERRUPTED


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ddp.train",
        description="Train a recipe on one process, or on every rank of torchrun / srun.",
        epilog="example: torchrun --nproc_per_node=4 -m ddp.train --recipe recipes/digits.yaml train.epochs=3",
    )
    parser.add_argument("--recipe", help="YAML recipe (default: the built-in digits recipe)")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=0.05")
    return parser.parse_args(argv)


@record  # torchrun's failure summary then names the root cause (an uncaught error's traceback)
def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before training started (during training it checkpoints)
        _report_interrupt()
        code = EXIT_INTERRUPTED
    _tell_wrapper(code)
    return code


def _tell_wrapper(code: int) -> None:
    """This process's exit code, for a wrapper that asked (``exit_code_file``): after a signal,
    torchrun's own exit code is 1 whatever its ranks did."""
    path = exit_code_file()
    if path is None:
        return
    try:
        path.write_text(f"{code}\n")
    except OSError:
        pass  # the wrapper then sees torchrun's code: nothing is requeued


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        check_recipe(recipe)  # model/data/loss names resolve and their args fit: before any rank waits
        env = detect_environment()
    except DDPError as err:
        _report(err)
        return err.exit_code
    if args.print_recipe:
        if env.rank == 0:
            print(to_yaml(recipe), end="")
        return 0
    return run(recipe, env)


def _report_interrupt() -> None:
    if launcher_rank() == 0:
        print("interrupted before training started: nothing was saved", file=sys.stderr)


def _report(err: DDPError) -> None:
    """One line on stderr, from one rank only when the launcher started several."""
    print_error(err, launcher_rank())


if __name__ == "__main__":
    sys.exit(main())
