"""DDP communication options, one at a time: each variant's throughput ÷ torch's defaults.

``python -m bench.ddp_options [--rounds N] [--workloads mlp,cnn] [--worlds 2] [--out DIR]``

Every variant is ours (``python -m ddp.train``) on a workload of ``bench.workloads`` with one
``dist.*`` key changed from torch's own defaults (``gradient_as_bucket_view=false``,
``bucket_cap_mb=25``, ``static_graph=false``), or FSDP2 instead of DDP (``parallel=fsdp``). Each round launches every variant once per
workload, in an order rotated each round; a ratio is formed per round from that round's runs, and
the report gives the median and [min–max] over rounds (the rules of ``bench.suite``). The report
goes to stdout and ``<out>/<YYYY-MM-DD>-<name>.md`` (``--name``, default ``ddp-options``).
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

from bench.measure import Summary
from bench.report import code_version, machine, write
from bench.runners import OURS
from bench.suite import Measurement, Plan, describe, measure
from bench.workloads import WORKLOADS, Workload

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
TORCH_DEFAULTS = {"dist.gradient_as_bucket_view": "false", "dist.bucket_cap_mb": "25", "dist.static_graph": "false"}


@dataclass(frozen=True)
class Variant:
    key: str
    changes: dict[str, str]  # the dist.* keys that differ from torch's defaults
    only: tuple[str, ...] = ()  # the workloads it runs on; () = every one

    def runs_on(self, workload: str) -> bool:
        return not self.only or workload in self.only

    def overrides(self) -> tuple[str, ...]:
        return tuple(f"{k}={v}" for k, v in {**TORCH_DEFAULTS, **self.changes}.items())


# Bucket size matters only where the gradients fill more than one bucket: ResNet-18 has 42.7 MiB of
# them; the MLP (0.4 MiB), the MNIST CNN (4.6 MiB) and digits_cnn (0.6 MiB) fit in DDP's first 1 MB
# bucket plus one more at any cap ≥ 5 MB, so every bucket variant runs the same all-reduces there.
BUCKETED = ("resnet18",)
BASELINE = Variant("torch defaults", {})
VARIANTS = [BASELINE,
            Variant("gradient_as_bucket_view=true", {"dist.gradient_as_bucket_view": "true"}),
            Variant("static_graph=true", {"dist.static_graph": "true"}),
            Variant("bucket_cap_mb=5", {"dist.bucket_cap_mb": "5"}, BUCKETED),
            Variant("bucket_cap_mb=10", {"dist.bucket_cap_mb": "10"}, BUCKETED),
            Variant("bucket_cap_mb=100", {"dist.bucket_cap_mb": "100"}, BUCKETED),
            Variant("parallel=fsdp", {"dist.parallel": "fsdp"})]  # FSDP2 instead of DDP (its keys then unused)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ddp_options", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"subset of {','.join(WORKLOADS)}")
    parser.add_argument("--worlds", default="2", help="comma-separated world sizes (DDP wraps only at 2+)")
    parser.add_argument("--variants", help=f"comma-separated subset of: {', '.join(v.key for v in VARIANTS[1:])} "
                        "(default all; torch's defaults always run)")
    parser.add_argument("--quick", action="store_true", help="the workloads' short run lengths")
    parser.add_argument("--timeout", type=float, default=240.0)
    parser.add_argument("--quiet-wait", type=float, default=20.0, help="longest wait for an idle machine, s")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--name", default="ddp-options", help="the report is <out>/<YYYY-MM-DD>-<name>.md")
    return parser.parse_args(argv)


def chosen(args: argparse.Namespace) -> list[Variant]:
    """The baseline and the variants ``--variants`` names (all when it names none)."""
    if not args.variants:
        return VARIANTS
    names = set(args.variants.split(","))
    unknown = names - {v.key for v in VARIANTS}
    if unknown:
        raise SystemExit(f"error: unknown variants {sorted(unknown)}; choose from {', '.join(v.key for v in VARIANTS[1:])}")
    return [BASELINE, *(v for v in VARIANTS[1:] if v.key in names)]


def run(args: argparse.Namespace, workdir: Path) -> dict[tuple[str, int, str], list[Measurement | str]]:
    """Every (workload, world, variant) once per round, the variants in a rotated order."""
    workloads = [WORKLOADS[key] for key in args.workloads.split(",")]
    worlds = [int(w) for w in args.worlds.split(",")]
    results: dict[tuple[str, int, str], list[Measurement | str]] = {}
    variants = chosen(args)
    for index in range(args.rounds):
        order = variants[index % len(variants):] + variants[:index % len(variants)]
        for workload in workloads:
            for world in worlds:
                for variant in (v for v in order if v.runs_on(workload.key)):
                    outcome = _measure(variant, workload, world, args, workdir / f"r{index}-{workload.key}-{world}")
                    results.setdefault((workload.key, world, variant.key), []).append(outcome)
                    print(f"round {index + 1} {workload.key} × {world} {variant.key}: {describe(outcome)}",
                          file=sys.stderr, flush=True)
    return results


def _measure(variant: Variant, workload: Workload, world: int, args: argparse.Namespace,
             run_dir: Path) -> Measurement | str:
    plan = Plan([workload], [world], [], {}, 1, args.quick, args.timeout, args.quiet_wait, 0, variant.overrides())
    return measure(OURS, workload, world, plan, run_dir / variant.key.replace("=", "-"))


def table(results: dict[tuple[str, int, str], list[Measurement | str]], args: argparse.Namespace) -> list[str]:
    rows = ["| workload | ranks | variant | ÷ torch defaults: median [min–max] | samples/s | defaults samples/s "
            "| rounds |", "|---|---:|---|---|---:|---:|---:|"]
    for key in args.workloads.split(","):
        for world in (int(w) for w in args.worlds.split(",")):
            base = results[(key, world, BASELINE.key)]
            for variant in (v for v in chosen(args)[1:] if v.runs_on(key)):
                pairs = [(a.samples_per_s, b.samples_per_s) for a, b in zip(results[(key, world, variant.key)], base)
                         if isinstance(a, Measurement) and isinstance(b, Measurement)]
                rows.append(f"| {WORKLOADS[key].title} | {world} | {variant.key} | {_cells(pairs, args.rounds)} |")
    return rows


def _cells(pairs: list[tuple[float, float]], rounds: int) -> str:
    if not pairs:
        return f"failed | | | 0/{rounds}"
    ratio = Summary.of([a / b for a, b in pairs])
    return (f"{ratio.median:.3f} [{ratio.low:.2f}–{ratio.high:.2f}] | {Summary.of([a for a, _ in pairs]).median:,.0f} "
            f"| {Summary.of([b for _, b in pairs]).median:,.0f} | {len(pairs)}/{rounds}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, version = time.perf_counter(), code_version()
    with tempfile.TemporaryDirectory(prefix="bench-ddp-options-") as scratch:
        results = run(args, Path(scratch))
    minutes = (time.perf_counter() - started) / 60
    date = datetime.date.today().isoformat()
    command = "python -m bench.ddp_options " + shlex.join(sys.argv[1:] if argv is None else argv)
    failures = [m for outcomes in results.values() for m in outcomes if isinstance(m, str)]
    disturbed = sum(m.disturbed for outcomes in results.values() for m in outcomes if isinstance(m, Measurement))
    lines = [f"# DDP communication options {date}: each variant ÷ torch's defaults", "", *machine(version), "",
             f"`{command}`: {args.rounds} interleaved round(s) in {minutes:.1f} min; each launch waited up to "
             f"{args.quiet_wait:.0f} s for an idle machine, {disturbed} measurement(s) were disturbed by other "
             "processes. Above 1 = the variant is faster than torch's defaults. Bucket sizes run on "
             f"{', '.join(BUCKETED)} only: the other models' gradients fill the same buckets at any cap ≥ 5 MB.",
             "", *table(results, args), ""]
    if failures:
        lines += ["## Failed launches", "", *(f"- {f}" for f in failures), ""]
    text = "\n".join(lines)
    print(text)
    print(f"report written to {write(text, args.out, f'{date}-{args.name}.md')}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
