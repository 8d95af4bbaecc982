"""The markdown report: machine, method, and per workload × world size × competitor the median
ratio over rounds with its [min–max] and the absolute medians of both sides."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.measure import DROP_STEPS, Summary
from bench.runners import COMPETITORS, OURS, REPO
from bench.suite import Key, Measurement, Plan, Results
from bench.workloads import BATCH_SIZE


@dataclass(frozen=True)
class Section:
    title: str
    quantity: Callable[[Measurement], float]
    unit: str  # column header for the absolute values
    digits: int  # decimals for absolute values


THROUGHPUT = Section("Loop throughput, steady state: ours ÷ competitor (above 1 = ours is faster)",
                     lambda m: m.samples_per_s, "samples/s", 0)
FIRST_STEP = Section("Time to first optimizer step, from launching torchrun: ours ÷ competitor "
                     "(below 1 = ours starts sooner)", lambda m: m.first_step_s, "s", 2)


def machine(ours_version: str) -> list[str]:
    """CPU model, cores, memory, OS, Python and the versions of what is compared."""
    versions = []
    for package in ("torch", "lightning", "accelerate"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores ({len(os.sched_getaffinity(0))} usable), "
            f"{memory_gib:.0f} GiB RAM, no GPU in use (gloo, CPU)",
            f"- OS: {platform.system()} {platform.release()} {platform.machine()}",
            f"- Python {platform.python_version()}; {', '.join(versions)}",
            f"- ddp-recipes (ours): {ours_version}"]


def code_version() -> str:
    """The commit ours ran from, and whether ddp/ had uncommitted changes."""
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--", "ddp")
    except (OSError, subprocess.SubprocessError):
        return f"{REPO} (not a git checkout)"
    return f"commit {commit}" + (" + uncommitted changes in ddp/" if dirty else "")


def version_span(before: str, after: str) -> str:
    """``code_version()`` at the start and end of a run, flagged when ours changed meanwhile."""
    return before if before == after else f"{before} at the start, {after} at the end (ddp/ changed during the run)"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


DIFFERENCES = [
    "At 1 rank the minimal loop and Lightning still wrap the model in DDP (the tutorial pattern, "
    "Lightning's ddp strategy); ours and Accelerate run the bare module.",
    "The competitors feed a DataLoader over the same TensorDataset; ours picks its own data path "
    "(`data.loader=auto`: index-sliced in-memory batches for these datasets).",
    "Per step, ours also steps an LR schedule, accumulates loss/accuracy and runs its own per-step "
    "bookkeeping (e.g. the stop-signal poll); the competitors do SGD only. All sides read the loss back "
    "and write one flushed JSON line per step (rank 0).",
    "Ours evaluates and checkpoints after its last step (outside the timed window, inside its wall time); "
    "the competitors do neither.",
]


def render(plan: Plan, results: Results, sections: list[Section], command: str, date: str,
           ours_version: str = "") -> str:
    lines = [f"# Benchmark {date}: ddp-recipes vs hand-written DDP, Lightning, Accelerate", "",
             *machine(ours_version or code_version()), "", *method(plan, results, command), ""]
    for section in sections:
        lines += [f"## {section.title}", "", *table(plan, results, section), ""]
    lines += ["## What differs between the sides", "", *(f"- {d}" for d in DIFFERENCES), ""]
    failures = results.failures()
    if failures:
        lines += ["## Failed launches", "", *(f"- {f}" for f in failures), ""]
    return "\n".join(lines)


def method(plan: Plan, results: Results, command: str) -> list[str]:
    lengths = "; ".join(f"{w.key}: {_length(*w.length(plan.quick))}" for w in plan.workloads)
    measured = results.measurements()
    repeated = sum(m.attempts - 1 for m in measured)
    disturbed = sum(m.disturbed for m in measured)
    return [f"`{command}`: {plan.rounds} interleaved round(s), {plan.launches} launches in "
            f"{results.seconds / 60:.1f} min. Every launch is `torchrun --standalone --nproc_per_node=N` "
            f"with OMP_NUM_THREADS = cores ÷ N and each rank setting torch threads to the same; per-rank batch "
            f"{BATCH_SIZE}; SGD momentum 0.9, lr 0.05, weight decay 5e-4."
            + (f" Extra overrides for ours: {' '.join(plan.ours_extra)}." if plan.ours_extra else ""),
            "",
            f"Run lengths: {lengths}. Throughput drops the first max({DROP_STEPS}, 10%) steps, the first "
            "step of every later epoch and the last step of every epoch, from per-step wall-clock records "
            "written by rank 0 after each optimizer step (same rule for every side). Ratios are formed per "
            "round, then the median and [min–max] over rounds are shown; absolute columns are medians over rounds.",
            "",
            f"Other load: each launch waited (up to {plan.quiet_wait:.0f} s) for an idle machine; {repeated} launch(es) "
            f"were repeated because other processes used the CPU meanwhile, and {disturbed} measurement(s) kept "
            f"were still disturbed after {plan.retries} repeat(s)."]


def _length(max_steps: int, epochs: int) -> str:
    return f"{epochs} epoch(s)" if max_steps < 0 else f"{max_steps} steps"


def table(plan: Plan, results: Results, section: Section) -> list[str]:
    rows = [f"| workload | ranks | vs | ratio: median [min–max] | ours {section.unit} | theirs {section.unit} "
            "| rounds |", "|---|---:|---|---|---:|---:|---:|"]
    for workload in plan.workloads:
        for world in plan.worlds:
            for key, reason in _competitors(plan):
                cells = _cells(results, (workload.key, world, OURS.key), (workload.key, world, key), section,
                               reason, plan.rounds)
                rows.append(f"| {workload.title} | {world} | {COMPETITORS[key].label} | {' | '.join(cells)} |")
    return rows


def _competitors(plan: Plan) -> list[tuple[str, str | None]]:
    """Every competitor of this part, in table order, with the reason it was skipped (or None)."""
    ran = {impl.key: None for impl in plan.competitors}
    return [(key, ran[key] if key in ran else plan.skipped[key]) for key in COMPETITORS
            if key in ran or key in plan.skipped]


def _cells(results: Results, ours_key: Key, theirs_key: Key, section: Section, skipped: str | None,
           rounds: int) -> list[str]:
    if skipped:
        return [skipped, "", "", "0"]
    ours, theirs = results.measured(ours_key), results.measured(theirs_key)
    pairs = [(section.quantity(a), section.quantity(b)) for a, b in zip(ours, theirs) if a and b]
    if not pairs:
        return ["failed (see below)", "", "", f"0/{rounds}"]
    ratio = Summary.of([a / b for a, b in pairs])
    ours_abs = Summary.of([a for a, _ in pairs]).median
    theirs_abs = Summary.of([b for _, b in pairs]).median
    return [f"{ratio.median:.2f} [{ratio.low:.2f}–{ratio.high:.2f}]", f"{ours_abs:,.{section.digits}f}",
            f"{theirs_abs:,.{section.digits}f}", f"{len(pairs)}/{rounds}"]


def write(text: str, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(text, encoding="utf-8")
    return path
