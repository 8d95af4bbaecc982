"""``python -m launch node ...``, ``python -m launch local ...`` and ``python -m launch doctor ...``."""

from __future__ import annotations

import sys

USAGE = """usage: python -m launch {node,local,doctor} ...
  node    start this machine's ranks of a (multi-machine) job through torchrun
  local   start N ranks on this machine, no addresses needed (torchrun --standalone)
  doctor  versions, GPUs, CPUs, network, detected environment and an all_reduce self-test"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help"}:
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "node":
        from launch.node import main as node_main

        return node_main(rest)
    if command == "local":
        from launch.local import main as local_main

        return local_main(rest)
    if command == "doctor":
        from launch.doctor import main as doctor_main

        return doctor_main(rest)
    print(f"error: unknown command {command!r}. HINT: use 'node', 'local' or 'doctor'\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
