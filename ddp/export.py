"""Command line: ``python -m ddp.export SOURCE DEST [--which latest|best] [--force]``.

Writes the model weights of a checkpoint as one plain state_dict file, whether a DDP, an FSDP or
a one-process run wrote it: torch.load(DEST, weights_only=True) loads it into the recipe's model,
and model.weights=DEST starts a run from it. SOURCE is a run version directory or its checkpoints
directory (the checkpoint `latest` names, or `best`) or one step-*.pt file or step-*.dcp directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddp.checkpoint.export import POINTERS, export, summary
from ddp.errors import DDPError, print_error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ddp.export", description=__doc__.split("\n\n")[1],
                                     epilog="example: python -m ddp.export runs/digits/version_0 model.pt")
    parser.add_argument("source", type=Path, metavar="SOURCE",
                        help="runs/<name>/version_N, its checkpoints directory, a step-*.pt file or a step-*.dcp directory")
    parser.add_argument("dest", type=Path, metavar="DEST", help="the file to write, e.g. model.pt")
    parser.add_argument("--which", choices=POINTERS,
                        help="for a directory: the newest checkpoint (latest, the default) or the best by "
                             "checkpoint.best_metric (best)")
    parser.add_argument("--force", action="store_true", help="replace DEST if it exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = export(args.source, args.dest, args.which, args.force)
    except DDPError as err:
        print_error(err, 0)
        return 2 if type(err) is DDPError else err.exit_code
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
