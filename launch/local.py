"""``python -m launch local``: this machine's ranks, no addresses needed (torchrun ``--standalone``).

    python -m launch local --nproc 2 [--recipe X] [key=value ...]     # the trainer
    python -m launch local --nproc 2 train.py --epochs 3              # your script, arguments untouched
    python -m launch local --nproc 2 -m mypkg.train                   # your module
    python -m launch local --nproc 2 ... --print                      # the command and variables only

What it adds to torchrun: each rank's share of the cores (``OMP_NUM_THREADS`` = cores ÷ ranks,
where torchrun sets 1 and warns), never overwriting a variable you set; the script or module
checked before any rank starts; torchrun's banner left out. Then this process becomes torchrun, so
signals (Ctrl-C) and the exit code are torchrun's own.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ddp.cluster.environment import available_cpus, child_environ, plan_variables
from ddp.errors import DDPError, print_error
from launch.node import LaunchError, OneLineParser, check_program, check_recipe_or_program, show_command, split_program

log = logging.getLogger("launch.local")


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m launch local",
                       description="Start N ranks on this machine (torchrun --standalone underneath). With no "
                                   "program, trains a recipe; a .py file or -m module is run with its arguments.")
    p.add_argument("--nproc", type=int, default=1, help="ranks on this machine (default 1)")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts of the worker group")
    p.add_argument("--print", action="store_true", help="print the command and variables, run nothing")
    p.add_argument("--recipe", help="recipe YAML (recipe mode only)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides (recipe mode only)")
    return p


def command(args: argparse.Namespace, program: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           f"--max-restarts={args.max_restarts}"]
    if program:
        return cmd + program
    recipe = ["--recipe", args.recipe] if args.recipe else []
    return cmd + ["-m", "ddp.train", *recipe, *args.overrides]


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    options, program = split_program(argv)
    args = parser().parse_args(options)
    if args.nproc < 1:
        raise LaunchError(f"--nproc {args.nproc}: it must be at least 1.", "count the ranks to start with --nproc")
    check_recipe_or_program(args, program)
    check_program(program, "local --nproc 2")
    return args, program


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s launch local: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    try:
        args, program = parse(argv)
    except DDPError as err:
        print_error(err, 0)
        return err.exit_code
    threads = max(1, available_cpus() // args.nproc)
    variables, notes = plan_variables({"OMP_NUM_THREADS": str(threads)},
                                      f"{available_cpus()} cores / {args.nproc} ranks")
    cmd = command(args, program)
    if args.print:
        print(show_command(notes, variables, cmd))
        return 0
    for note in notes:
        log.info("%s", note)
    sys.stderr.flush()
    os.execve(cmd[0], cmd, child_environ(variables))
    return 1  # pragma: no cover - execve does not return
