"""``python -m launch node``: start this machine's ranks of a multi-machine job through torchrun.

    python -m launch node --nnodes 2 --node-rank R --master-addr A --nproc 4 [--recipe X] [key=value ...]
    python -m launch node ... train.py --epochs 3        # any script, arguments untouched
    python -m launch node ... -m mypkg.train --lr 0.1    # any module
    python -m launch node ... --print                    # the torchrun command and variables, run nothing
    python -m launch node --nnodes 1:2 --run-id job7 --max-restarts 3 ...   # elastic: goes on without a lost node

Steps: parse; choose the interface that routes to the master and the CPU threads per rank; plan
the environment variables (never overwriting one the user set, logging each); preflight
(``launch.preflight``); then replace this process with torchrun, so signals and the exit code are
torchrun's own.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from dataclasses import dataclass

from ddp.cluster.environment import available_cpus, child_environ, environment_value, plan_variables
from ddp.errors import DDPError, print_error
from ddp.cluster.network import NetworkError, Route, nccl_interface_line, route_to
from launch import preflight

log = logging.getLogger("launch.node")

_VALUE_OPTIONS = {"--nnodes", "--node-rank", "--master-addr", "--master-port", "--nproc", "--run-id",
                  "--max-restarts", "--rdzv-conf", "--preflight-timeout", "--recipe"}


class LaunchError(DDPError):
    exit_code = 2


@dataclass(frozen=True)
class Nodes:
    """``--nnodes``: a count, or torchrun's elastic ``MIN:MAX`` range."""

    min: int
    max: int

    def __str__(self) -> str:
        return str(self.max) if self.min == self.max else f"{self.min}:{self.max}"

    @property
    def elastic(self) -> bool:
        return self.min != self.max


def nodes(text: str) -> Nodes:
    """argparse type of ``--nnodes``: ``2`` or ``1:2``."""
    low, _, high = text.partition(":")
    try:
        counts = Nodes(int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count or a MIN:MAX range like 1:2") from None
    if not 1 <= counts.min <= counts.max:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= MIN <= MAX")
    return counts


@dataclass(frozen=True)
class NodePlan:
    """Everything ``launch node`` decided: the command, the variables, and why."""

    command: list[str]
    variables: dict[str, str]  # to set for the ranks (the user's own are already excluded)
    notes: list[str]  # one line per variable: set, or kept because the user set it
    route: Route


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line with the fix, exit 2 (argparse prints the whole usage)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}. HINT: {self.prog} --help", file=sys.stderr)
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m launch node",
        description="Start this machine's ranks of a multi-machine job (torchrun underneath). With no program, "
                    "trains a recipe (python -m ddp.train); a first positional that is a .py file or -m module "
                    "is run as torchrun would run it, its arguments passed through untouched.")
    p.add_argument("--nnodes", type=nodes, required=True,
                   help="number of machines, or MIN:MAX to go on with fewer (elastic; needs --run-id)")
    p.add_argument("--node-rank", type=int, required=True, help="this machine's index, 0 = the master")
    p.add_argument("--master-addr", required=True, help="node 0's address, reachable from every node")
    p.add_argument("--master-port", type=int, default=29500, help="free TCP port on node 0 (default 29500)")
    p.add_argument("--nproc", type=int, default=1, help="ranks on this machine (default 1)")
    p.add_argument("--run-id", help="use c10d rendezvous with this shared id instead of static ranks")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts of the worker group")
    p.add_argument("--rdzv-conf", default="",
                   help="more of torchrun's c10d settings, e.g. last_call_timeout=10 (with --run-id)")
    p.add_argument("--print", action="store_true", help="print the torchrun command and variables, run nothing")
    p.add_argument("--preflight-timeout", type=float, default=15.0,
                   help="seconds a worker node waits for the master's port (default 15)")
    p.add_argument("--recipe", help="recipe YAML (recipe mode only)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides (recipe mode only)")
    return p


def split_program(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher options, program): the program starts at the first ``-m`` or ``*.py`` positional."""
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in _VALUE_OPTIONS:
            i += 2
            continue
        if token == "-m" or (not token.startswith("-") and token.endswith(".py")):
            return argv[:i], argv[i:]
        i += 1
    return argv, []


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    options, program = split_program(argv)
    args = parser().parse_args(options)
    _check(args, program)
    return args, program


def _check(args: argparse.Namespace, program: list[str]) -> None:
    if args.nproc < 1:
        raise LaunchError(f"--nproc {args.nproc}: must be at least 1.", "count ranks per machine with --nproc")
    if not 0 <= args.node_rank < args.nnodes.max:
        raise LaunchError(f"--node-rank {args.node_rank} is outside --nnodes {args.nnodes}.",
                          f"node ranks run from 0 to {args.nnodes.max - 1}; node 0 is the master")
    if (args.nnodes.elastic or args.rdzv_conf) and not args.run_id:
        what = f"--nnodes {args.nnodes}" if args.nnodes.elastic else "--rdzv-conf"
        raise LaunchError(f"{what} needs torchrun's c10d rendezvous, which --run-id turns on.",
                          "add --run-id NAME, the same on every node")
    for item in filter(None, args.rdzv_conf.split(",")):
        key, equals, value = item.partition("=")
        if not (equals and key.strip() and value.strip()) or key.strip() == "is_host":
            raise LaunchError(f"--rdzv-conf {args.rdzv_conf}: {item!r} is not a KEY=VALUE setting of torchrun's "
                              "c10d rendezvous (is_host is set by --node-rank).",
                              "e.g. --rdzv-conf last_call_timeout=10,keep_alive_interval=2")
    if not 0 < args.master_port < 65536:
        raise LaunchError(f"--master-port {args.master_port} is not a TCP port.", "use 1024-65535, the same on every node")
    check_recipe_or_program(args, program)
    if program == ["-m"]:
        raise LaunchError("-m needs a module name.", "e.g. python -m launch node ... -m mypkg.train")
    if not args.print:  # --print writes the command for any machine: the script may live only there
        check_program(program, "node ...")


def check_recipe_or_program(args: argparse.Namespace, program: list[str]) -> None:
    """A recipe (``--recipe``, ``key=value``) or a program, not both."""
    if program and (args.recipe or args.overrides):
        raise LaunchError(f"--recipe/key=value overrides apply to recipes, but a program was given: {program[0]}.",
                          "put the program's own arguments after it; they are passed through untouched")


def check_program(program: list[str], usage: str) -> None:
    """The script or module exists, before torchrun starts (else every rank fails on its own)."""
    if not program:
        return
    if program == ["-m"]:
        raise LaunchError("-m needs a module name.", f"e.g. python -m launch {usage} -m mypkg.train")
    if program[0] == "-m":
        import importlib.util

        try:
            found = importlib.util.find_spec(program[1])
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise LaunchError(f"no module named {program[1]!r} (-m {program[1]}).",
                              "check the name and that its package is installed or in the current directory")
        return
    if not os.path.isfile(program[0]):
        raise LaunchError(f"script {program[0]!r} not found (from {os.getcwd()}).",
                          "give the path of your training script, relative to here or absolute")


def torchrun_command(args: argparse.Namespace, program: list[str], route: Route) -> list[str]:
    """The exact torchrun command for this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={args.nnodes}",
           f"--nproc-per-node={args.nproc}", f"--max-restarts={args.max_restarts}"]
    if args.run_id:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={_host_port(route.master_ip, args.master_port)}",
                f"--rdzv-id={args.run_id}", f"--local-addr={route.source_ip}",
                "--rdzv-conf=" + ",".join(filter(None, [f"is_host={1 if args.node_rank == 0 else 0}", args.rdzv_conf]))]
    else:
        cmd += [f"--node-rank={args.node_rank}", f"--master-addr={route.master_ip}",
                f"--master-port={args.master_port}", f"--local-addr={route.source_ip}"]
    if program:
        return cmd + program
    recipe = ["--recipe", args.recipe] if args.recipe else []
    return cmd + ["-m", "ddp.train", *recipe, *args.overrides]


def plan(args: argparse.Namespace, program: list[str]) -> NodePlan:
    """Route, command and variables for this node; raises ``DDPError`` (exit 2) on bad input."""
    route = route_to(args.master_addr)
    if args.nnodes.max > 1 and route.loopback:
        raise NetworkError(
            f"--master-addr {args.master_addr} is {route.master_ip}, a loopback address, but --nnodes "
            f"{args.nnodes}: the other machines cannot reach it.",
            "pass node 0's address on the network the machines share (python -m launch doctor lists them)")
    threads = max(1, available_cpus() // args.nproc)
    wanted = {"OMP_NUM_THREADS": str(threads)}
    variables, notes = plan_variables(wanted, f"{available_cpus()} cores / {args.nproc} ranks")
    if args.run_id:
        # torchrun's shared store publishes its address only in the first round, so a node started
        # again later would wait for it forever: every round gets a fresh store instead
        more, more_notes = plan_variables({"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
                                          "a fresh rendezvous store each round, so a restarted node can rejoin")
        variables.update(more)
        notes += more_notes
    if args.nnodes.max > 1:
        more, more_notes = plan_variables({"GLOO_SOCKET_IFNAME": route.interface},
                                          f"the route to the master {route.describe()}")
        variables.update(more)
        notes += [*more_notes, nccl_interface_line(environment_value("NCCL_SOCKET_IFNAME"), route.interface)]
    return NodePlan(torchrun_command(args, program, route), variables, notes, route)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def show(node: NodePlan) -> str:
    """``--print``: the variables as ``export`` lines, then the command, ready to paste."""
    return show_command(node.notes, node.variables, node.command)


def show_command(notes: list[str], variables: dict[str, str], command: list[str]) -> str:
    """Notes as comments, the variables as ``export`` lines, then the command (``launch node/local --print``)."""
    exports = [f"export {name}={shlex.quote(value)}" for name, value in variables.items()]
    return "\n".join([*(f"# {note}" for note in notes), *exports, shlex.join(command)])


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s launch node: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    try:
        args, program = parse(argv)
        node = plan(args, program)
        if args.print:
            print(show(node))
            return 0
        for note in node.notes:
            log.info("%s", note)
        preflight.check(node.route, args.node_rank, args.master_port, args.preflight_timeout, log)
    except DDPError as err:
        print_error(err, 0)
        return err.exit_code
    log.info("node %d of %s: %s", args.node_rank, args.nnodes, shlex.join(node.command))
    sys.stderr.flush()
    os.execve(node.command[0], node.command, child_environ(node.variables))
    return 1  # pragma: no cover - execve does not return
