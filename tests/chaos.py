"""Chaos: SIGKILL a random rank at a random moment under ``torchrun --max-restarts``, run after run.

    python -m tests.chaos --runs 50 [--seed S] [--nproc 2] [--out DIR] [--keep]

The recipe is first trained once without faults (the reference). Each run then starts
``torchrun --standalone --nproc_per_node=N --max-restarts=K -m tests.workers.held_save`` and kills
one random rank with SIGKILL, once or twice (the second time in the restarted group), at one of:

    time        a random time into the attempt: start-up, rendezvous, resume, training, saves, exit
    step        as soon as a random training step has been logged
    save        inside a checkpoint save, its ``.tmp`` partly written (the writer is held there)
    after-save  right after a save completed, before the ranks hear how it went

A run passes when torchrun exits 0, used exactly one restart per kill that landed, kept exactly one
version directory (a restart continues its own version: after a kill before the first checkpoint
it trains that version again from step 0, after the last it says the version is finished and exits
0), and that version's final checkpoint's model equals the reference's bitwise (``torch.equal`` on
every tensor). One line per run, then the count; exit 1 when a run failed (its directory is kept, the others are removed
unless ``--keep``). ``DIR/summary.json`` holds every run. ``tests/test_chaos.py`` runs a few in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

from ddp.checkpoint import files
from tests.harness import python_env

RECIPE = ("train.epochs=2", "checkpoint.every_steps=5", "log.every_steps=1", "log.tensorboard=false")
WORKER = "tests.workers.held_save"
MOMENTS = ("time", "step", "save", "after-save")
RUN_DIR = Path("runs", "digits", "version_0")
RUN_TIMEOUT_S = 600.0  # one run, all its attempts (a loaded 2-core machine is slow to start torch)
POLL_S = 0.005


@dataclass(frozen=True)
class Kill:
    """What to do: kill ``rank`` at ``moment``; ``draw`` in [0, 1) picks when (time, step or save),
    unless ``step`` names the step (``step``) or the save's step (``save``, ``after-save``)."""

    moment: str
    rank: int
    draw: float = 0.0
    step: int | None = None


@dataclass
class Landed:
    """What happened: the kill, the last step logged before it, and where it hit."""

    moment: str
    rank: int
    step: int | None = None
    where: str = ""
    missed: bool = False  # the job had ended before the moment came

    def text(self) -> str:
        if self.missed:
            return f"{self.moment} rank {self.rank}: missed ({self.where})"
        logged = f"step {self.step}" if self.step is not None else "no step yet"
        return f"{self.moment} rank {self.rank}, {logged} ({self.where})"


@dataclass(frozen=True)
class Schedule:
    """When the uninterrupted run saved, how many steps it took, its wall time: where kills can aim."""

    save_steps: tuple[int, ...]
    steps: int
    seconds: float


@dataclass(frozen=True)
class Reference:
    """The uninterrupted run."""

    weights: dict[str, torch.Tensor]
    schedule: Schedule


@dataclass
class Outcome:
    run: int
    kills: list[Landed] = field(default_factory=list)
    restarts: int = 0
    exit_code: int | None = None
    same_weights: bool = False
    seconds: float = 0.0
    directory: str = ""
    problem: str = ""
    versions: list[str] = field(default_factory=list)  # the version directories the job wrote: one

    @property
    def passed(self) -> bool:
        landed = sum(not k.missed for k in self.kills)
        return self.exit_code == 0 and self.same_weights and self.restarts == landed and not self.problem

    def line(self) -> str:
        verdict = "pass" if self.passed else f"FAIL: {self.problem or self._why()}"
        return (f"run {self.run:>2}: {' | '.join(k.text() for k in self.kills)} | restarts {self.restarts} | "
                f"{verdict} | {self.seconds:.1f} s")

    def _why(self) -> str:
        if self.exit_code != 0:
            return f"torchrun exited {self.exit_code}"
        if not self.same_weights:
            return "final weights differ from the uninterrupted run's"
        return f"{self.restarts} restarts for {sum(not k.missed for k in self.kills)} kills"


def plan(runs: int, seed: int, nproc: int) -> list[tuple[Kill, ...]]:
    """Each run's kills: the first cycles through the moments (every moment in any 4 runs), a third
    of the runs get a second kill at a random moment; ranks and draws are random."""
    rng = random.Random(seed)
    plans = []
    for index in range(runs):
        kills = [Kill(MOMENTS[index % len(MOMENTS)], rng.randrange(nproc), rng.random())]
        if rng.random() < 1 / 3:
            kills.append(Kill(rng.choice(MOMENTS), rng.randrange(nproc), rng.random()))
        plans.append(tuple(kills))
    return plans


class Job:
    """One torchrun job in ``directory`` and the controller's view of it."""

    def __init__(self, directory: Path, nproc: int, max_restarts: int) -> None:
        self.directory, self.nproc = directory, nproc
        self.control = directory / "control"
        self.control.mkdir(parents=True, exist_ok=True)
        self.run_dir = directory / RUN_DIR
        self.attempt, self.attempt_began = 0, time.time()
        self.log = (directory / "torchrun.log").open("w")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               f"--max-restarts={max_restarts}", "-m", WORKER, *RECIPE]
        env = python_env(OMP_NUM_THREADS="1", CHAOS_DIR=str(self.control))
        self.proc = subprocess.Popen(cmd, cwd=directory, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.started = time.monotonic()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def starts(self) -> list[tuple[int, int, int]]:
        """(rank, restart count, pid) of every worker started so far."""
        try:
            lines = (self.control / "starts").read_text().splitlines()
        except FileNotFoundError:
            return []
        return [tuple(int(x) for x in line.split()) for line in lines if len(line.split()) == 3]  # type: ignore[misc]

    def restarts(self) -> int:
        return max((count for _, count, _ in self.starts()), default=0)

    def workers(self) -> dict[int, int] | None:
        """This attempt's pids by rank once all its ranks have started; None if the job ended first."""
        while self.alive():
            pids = {rank: pid for rank, count, pid in self.starts() if count == self.attempt}
            if len(pids) == self.nproc:
                return pids
            time.sleep(POLL_S)
        return None

    def step(self) -> int | None:
        """The last step this attempt has logged (None: none yet)."""
        try:
            lines = (self.run_dir / "metrics.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return None
        steps = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line being written
            if record.get("kind") == "step" and record.get("time", 0) >= self.attempt_began:
                steps.append(record["step"])
        return max(steps, default=None)

    def wait_until(self, condition: Callable[[], bool]) -> bool:
        """Poll ``condition`` until it holds (True) or the job ends (False)."""
        while self.alive():
            if condition():
                return True
            time.sleep(POLL_S)
        return condition()

    def stop(self) -> None:
        """Kill whatever is left of the job: torchrun's process group, then every worker it started
        (each runs in a session of its own)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for _, _, pid in self.starts():
            _sigkill(pid)
        self.proc.wait()
        self.log.close()


def strike(job: Job, kill: Kill, schedule: Schedule, since_step: int) -> Landed:
    """Arm ``kill``, wait for its moment in the current attempt, SIGKILL the rank."""
    saves = [s for s in schedule.save_steps if s > since_step]
    moment = kill.moment if (kill.moment in ("time", "step") or saves or kill.step) else "time"  # no save left
    landed = Landed(moment, kill.rank)
    request = None
    if moment in ("save", "after-save"):
        target = kill.step or saves[int(kill.draw * len(saves))]
        request = job.control / f"{moment.split('-')[0]}-{target}"
        request.write_text("")
    began = time.monotonic()
    pids = job.workers()
    if pids is None:
        landed.missed, landed.where = True, "the job ended before its ranks started"
        return landed
    if job.attempt > 0:
        job.attempt_began = time.time()  # steps logged from now on are this attempt's
    if moment == "time":
        delay = kill.draw * 0.8 * schedule.seconds
        job.wait_until(lambda: time.monotonic() - began >= delay)
        landed.where = f"{time.monotonic() - began:.2f} s into the attempt"
    elif moment == "step":
        last = schedule.steps - 1
        target = kill.step or min(since_step + 1 + int(kill.draw * max(last - since_step, 1)), last)
        job.wait_until(lambda: (job.step() or 0) >= target)
        landed.where = f"aimed at step {target}"
    else:
        assert request is not None
        held = job.control / f"held-{request.name}"
        job.wait_until(held.exists)
        landed.where = _save_state(job, request.name)
    landed.step = job.step()
    killed = _sigkill(pids[kill.rank])
    if request is not None:
        request.unlink(missing_ok=True)  # let the writer go on (when it was not the rank killed)
    if not killed:
        landed.missed, landed.where = True, "the rank had exited"
        return landed
    job.attempt += 1
    return landed


def _sigkill(pid: int) -> bool:
    """SIGKILL ``pid``; False when it had already exited (gone, or a zombie not yet reaped)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        process.kill()
        return True
    except psutil.NoSuchProcess:
        return False


def _save_state(job: Job, request: str) -> str:
    kind, step = request.split("-")
    directory = job.run_dir / "checkpoints"
    if kind == "save":
        tmp = sorted(directory.glob(f".{files.checkpoint_name(int(step))}.*.tmp"))
        sizes = ", ".join(f"{p.stat().st_size} bytes" for p in tmp if p.exists())
        return f"inside the save of step {step}: .tmp {sizes or 'absent'}"
    return f"after the save of step {step}: latest={files.read_pointer(directory, 'latest')}"


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = files.read_pointer(run_dir / "checkpoints", "latest")
    if latest is None:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'} has no latest checkpoint")
    return files.load(run_dir / "checkpoints" / latest)["model"]


def same(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> bool:
    return weights.keys() == reference.keys() and all(torch.equal(weights[k], t) for k, t in reference.items())


def train_reference(directory: Path, nproc: int) -> Reference:
    """The uninterrupted run (same worker, nothing held): its weights, save steps, wall time."""
    job = Job(directory, nproc, max_restarts=0)
    try:
        code = job.proc.wait(RUN_TIMEOUT_S)
    finally:
        job.stop()
    seconds = time.monotonic() - job.started
    log = directory / "torchrun.log"
    if code != 0:
        raise RuntimeError(f"the uninterrupted run exited {code}; see {log}:\n{log.read_text()[-3000:]}")
    saved = re.findall(r"checkpoint \S+ saved \(step (\d+)\)", (job.run_dir / "logs" / "rank0.log").read_text())
    save_steps = tuple(sorted({int(s) for s in saved}))
    return Reference(final_weights(job.run_dir), Schedule(save_steps, max(save_steps), seconds))


def chaos_run(index: int, kills: tuple[Kill, ...], directory: Path, nproc: int, schedule: Schedule) -> Outcome:
    """Start a job, strike each kill in turn, wait for its end (``judge`` then compares weights)."""
    outcome = Outcome(index, directory=str(directory))
    job = Job(directory, nproc, max_restarts=len(kills) + 1)  # one spare: an extra restart fails the run
    try:
        since = 0
        for kill in kills:
            landed = strike(job, kill, schedule, since)
            outcome.kills.append(landed)
            since = max(since, landed.step or 0)
        outcome.exit_code = job.proc.wait(max(RUN_TIMEOUT_S - (time.monotonic() - job.started), 1))
    except subprocess.TimeoutExpired:
        outcome.problem = f"not finished within {RUN_TIMEOUT_S:.0f} s"
    finally:
        job.stop()
        outcome.seconds = time.monotonic() - job.started
    outcome.restarts = job.restarts()
    return outcome


def judge(outcome: Outcome, reference: Reference) -> Outcome:
    """Compare the run's final weights with the reference's; a restart must not start a new version."""
    group = Path(outcome.directory) / RUN_DIR.parent
    outcome.versions = sorted((p.name for p in group.glob("version_*")), key=lambda name: int(name.split("_")[1]))
    if outcome.exit_code != 0:
        return outcome
    if outcome.versions != [RUN_DIR.name]:
        outcome.problem = f"the job wrote {', '.join(outcome.versions) or 'no version'}: a restart started a new version"
        return outcome
    try:
        outcome.same_weights = same(final_weights(Path(outcome.directory) / RUN_DIR), reference.weights)
    except Exception as err:  # noqa: BLE001 - reported as the run's failure
        outcome.problem = f"final checkpoint unreadable: {err}"
    return outcome


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="how many chaos runs (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill plan (default 0)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per run (default 2)")
    parser.add_argument("--out", type=Path, help="directory for the runs and summary.json (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the directories of passing runs too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="chaos-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"chaos: {args.runs} runs, seed {args.seed}, {args.nproc} ranks, in {out}", flush=True)
    reference = train_reference(out / "reference", args.nproc)
    schedule = reference.schedule
    print(f"reference: {schedule.steps} steps, saves at steps {list(schedule.save_steps)}, "
          f"{schedule.seconds:.1f} s", flush=True)
    outcomes = []
    for index, kills in enumerate(plan(args.runs, args.seed, args.nproc), start=1):
        outcome = judge(chaos_run(index, kills, out / f"run-{index:02d}", args.nproc, schedule), reference)
        outcomes.append(outcome)
        print(outcome.line(), flush=True)
        if outcome.passed and not args.keep:
            shutil.rmtree(outcome.directory)
    passed = sum(o.passed for o in outcomes)
    print(f"{passed} of {len(outcomes)} runs finished with the uninterrupted run's weights", flush=True)
    summary = {"runs": len(outcomes), "passed": passed, "seed": args.seed, "nproc": args.nproc, "recipe": RECIPE,
               "reference_s": round(schedule.seconds, 1),
               "outcomes": [{**asdict(o), "passed": o.passed, "seconds": round(o.seconds, 1)} for o in outcomes]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"summary: {out / 'summary.json'}")
    return 0 if passed == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
