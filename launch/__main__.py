"""``python -m launch doctor``."""

from __future__ import annotations

import argparse
import sys

from ddp.errors import DDPError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="show what a rank started here would detect and use")
    parser.parse_args(argv)
    from launch.doctor import report

    try:
        print("\n".join(report()))
    except DDPError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
