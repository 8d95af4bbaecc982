"""Compare ddp-recipes' training loop with a minimal DDP loop, Lightning and Accelerate.

``python -m bench {all,minimal,lightning,accelerate,startup} [--rounds N] [--quick] [--out DIR]``

all         ours ÷ minimal DDP loop, ÷ Lightning, ÷ Accelerate: throughput and time to first step
minimal     ours ÷ the minimal DDP loop only (throughput and time to first step)
lightning   ours ÷ Lightning's Trainer only
accelerate  ours ÷ Accelerate only
startup     time to first optimizer step, ours ÷ the minimal DDP loop, with short runs

Progress goes to stderr; the markdown report is printed to stdout and written to
``<out>/<YYYY-MM-DD>.md`` (``<YYYY-MM-DD>-<part>.md`` for a single part). Exit code 0 when every
launch succeeded, 1 when any failed (the report lists them), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.report import FIRST_STEP, THROUGHPUT, Section, code_version, render, version_span, write
from bench.runners import COMPETITORS
from bench.suite import Plan, run_plan
from bench.workloads import QUICK_WORKLOADS, WORKLOADS

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_ROUNDS = 7
QUICK_WORLDS = [2]  # --quick: one world size, the one that exercises DDP


@dataclass(frozen=True)
class Part:
    competitors: list[str]
    sections: list[Section]
    short_runs: bool = False  # only the first step matters


PARTS = {
    "all": Part(list(COMPETITORS), [THROUGHPUT, FIRST_STEP]),
    "minimal": Part(["minimal"], [THROUGHPUT, FIRST_STEP]),
    "lightning": Part(["lightning"], [THROUGHPUT, FIRST_STEP]),
    "accelerate": Part(["accelerate"], [THROUGHPUT, FIRST_STEP]),
    "startup": Part(["minimal"], [FIRST_STEP], short_runs=True),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    summary, _usage, details = __doc__.split("\n\n", 2)
    parser = argparse.ArgumentParser(prog="python -m bench", description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=list(PARTS), help="what to compare (see below)")
    parser.add_argument("--rounds", type=_positive, help=f"interleaved rounds (default {DEFAULT_ROUNDS}; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: 1 round, few steps, world size 2, workloads {','.join(QUICK_WORKLOADS)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the report (default bench/results)")
    parser.add_argument("--workloads", type=_choices(WORKLOADS),
                        help=f"comma-separated subset of {','.join(WORKLOADS)} (default all; {','.join(QUICK_WORKLOADS)} "
                             "with --quick)")
    parser.add_argument("--worlds", type=_ints, help="comma-separated world sizes (default 1,2; 2 with --quick)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per launch before it is killed")
    parser.add_argument("--quiet-wait", type=float,
                        help="longest wait, in seconds, for an idle machine before each launch (default 120; 0 with --quick)")
    parser.add_argument("--retries", type=int,
                        help="repeats of a launch that other processes disturbed (default 2; 0 with --quick)")
    parser.add_argument("--ours-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra ddp.train override for ours only (repeatable), e.g. data.loader=dataloader")
    parser.add_argument("--keep-runs", type=Path, help="keep every launch's directory (logs, step records) here")
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be ≥ 1")
    return value


def _ints(text: str) -> list[int]:
    return [_positive(item) for item in text.split(",")]


def _choices(known: dict) -> object:
    def parse(text: str) -> list:
        unknown = [item for item in text.split(",") if item not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {','.join(known)}")
        return [known[item] for item in text.split(",")]
    return parse


def make_plan(args: argparse.Namespace) -> Plan:
    part = PARTS[args.part]
    implementations = [COMPETITORS[key] for key in part.competitors]
    return Plan(
        workloads=args.workloads or [WORKLOADS[key] for key in (QUICK_WORKLOADS if args.quick else WORKLOADS)],
        worlds=args.worlds or (QUICK_WORLDS if args.quick else [1, 2]),
        competitors=[impl for impl in implementations if impl.missing() is None],
        skipped={impl.key: impl.missing() for impl in implementations if impl.missing() is not None},
        rounds=args.rounds or (1 if args.quick else DEFAULT_ROUNDS),
        quick=args.quick or part.short_runs,
        timeout=args.timeout,
        quiet_wait=args.quiet_wait if args.quiet_wait is not None else (0.0 if args.quick else 120.0),
        retries=args.retries if args.retries is not None else (0 if args.quick else 2),
        ours_extra=tuple(args.ours_override),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    for key, reason in plan.skipped.items():
        _progress(f"skipping {COMPETITORS[key].label}: {reason}")
    started, version = time.perf_counter(), code_version()
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        results = run_plan(plan, args.keep_runs or Path(scratch), _progress)
    results.seconds = time.perf_counter() - started
    date = datetime.date.today().isoformat()
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = render(plan, results, PARTS[args.part].sections, command, date, version_span(version, code_version()))
    path = write(text, args.out, f"{date}.md" if args.part == "all" else f"{date}-{args.part}.md")
    print(text)
    _progress(f"report written to {path} ({results.seconds / 60:.1f} min)")
    return 1 if results.failures() else 0


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
