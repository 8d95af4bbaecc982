"""``python -m slurm.submit``: submit a recipe (or any program) to Slurm through submitit.

    python -m slurm.submit [--recipe X] --nodes N (--gpus-per-node G | --tasks-per-node T) [--partition P]
        --time MIN [--account A --qos Q --constraint C --mem 64G --cpus-per-task 8 --signal-lead S]
        [--sbatch KEY=VALUE ...] [--dry-run] [--wait] [--cluster local] [key=value ... | program.py args ...]
        [--sweep KEY=V1,V2,... ...] [--parallel P]

One task per GPU (``--gpus-per-node``) or ``--tasks-per-node`` tasks for a CPU job; each task is
one rank (``slurm.job``). ``--sweep`` trains every combination of values as one job array
(``slurm.sweep``), ``--parallel`` of them at once. Everything that can be checked is checked before
anything is sent to Slurm, and refused with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import submitit

from ddp.config import Recipe, flat, load_recipe, to_yaml
from ddp.errors import ConfigError, DDPError, print_error
from ddp.reporting.text import count
from slurm import cluster
from slurm.follow import announce, local_state, wait
from slurm.job import ProgramJob, TrainJob
from slurm.request import Request, SubmitError, check
from slurm.sweep import Element, grid, parse_axis

DEFAULT_SIGNAL_LEAD_S = 120


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m slurm.submit", description=__doc__.split("\n\n")[0],
                                     epilog="example: python -m slurm.submit --nodes 1 --tasks-per-node 2 "
                                            "--partition debug --time 10 --wait train.epochs=2")
    parser.add_argument("--recipe", help="YAML recipe (default: the built-in digits recipe)")
    parser.add_argument("--nodes", type=int, default=1)
    per_node = parser.add_mutually_exclusive_group(required=True)
    per_node.add_argument("--gpus-per-node", type=int, help="GPUs per node; one task (rank) per GPU")
    per_node.add_argument("--tasks-per-node", type=int, help="tasks (ranks) per node for a CPU job")
    parser.add_argument("--partition", help="Slurm partition (default: the cluster's default)")
    parser.add_argument("--time", type=int, required=True, help="time limit in minutes")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--constraint")
    parser.add_argument("--mem", help="memory per node, as sbatch takes it (64G)")
    parser.add_argument("--cpus-per-task", type=int)
    parser.add_argument("--signal-lead", type=int, default=DEFAULT_SIGNAL_LEAD_S,
                        help="seconds before the time limit that USR2 asks the job to checkpoint and requeue")
    parser.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                        help="any other sbatch option, e.g. --sbatch exclude=node3")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script and the recipe; submit nothing")
    parser.add_argument("--wait", action="store_true", help="stream rank 0's log; exit 0 only if the job COMPLETED")
    parser.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                        help="local: the same job through submitit's local executor (no Slurm)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="train every combination of values (repeatable: the grid is the product) as one job "
                             "array; each combination is a run of its own in <run dir>/<key=value,...>")
    parser.add_argument("--parallel", type=int, help="with --sweep: how many runs at once (default: all)")
    parser.add_argument("rest", nargs=argparse.REMAINDER, metavar="key=value | program args",
                        help="recipe overrides, or a program (script.py, -m module, executable) and its arguments")
    argv = sys.argv[1:] if argv is None else argv
    module_at = argv.index("-m") if "-m" in argv else len(argv)  # argparse cannot start a remainder with "-m"
    args = parser.parse_args(argv[:module_at])
    args.rest += argv[module_at:]
    return args


def build_request(args: argparse.Namespace) -> Request:
    gpus = args.gpus_per_node or 0
    extra = {}
    for option in args.sbatch:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise SubmitError(f"--sbatch {option!r} is not KEY=VALUE.", "e.g. --sbatch exclude=node3")
        extra[key.lstrip("-")] = value
    return Request(nodes=args.nodes, tasks_per_node=gpus or args.tasks_per_node, gpus_per_node=gpus,
                   time_min=args.time, signal_lead_s=args.signal_lead, partition=args.partition,
                   cpus_per_task=args.cpus_per_task, mem=args.mem, account=args.account, qos=args.qos,
                   constraint=args.constraint, extra=extra)


def split_rest(rest: list[str]) -> tuple[list[str], list[str]]:
    """(overrides, program words): a program starts at the first word that is not ``key=value``."""
    for index, word in enumerate(rest):
        if "=" not in word or word.startswith("-"):
            return rest[:index], rest[index:]
    return rest, []


def program_argv(words: list[str]) -> list[str]:
    """``script.py ...`` and ``-m module ...`` run with this Python; anything else as an executable."""
    if words[0].endswith(".py") or words[0] == "-m":
        return [sys.executable, "-u", *words]
    return words


def executor_parameters(request: Request, partition: str, name: str) -> dict[str, Any]:
    params: dict[str, Any] = {
        "name": name, "nodes": request.nodes, "tasks_per_node": request.tasks_per_node,
        "timeout_min": request.time_min, "slurm_partition": partition,
        "slurm_signal_delay_s": request.signal_lead_s,
    }
    if request.gpus_per_node:
        params["gpus_per_node"] = request.gpus_per_node
    if request.cpus_per_task:
        params["cpus_per_task"] = request.cpus_per_task
    optional = {"slurm_mem": request.mem, "slurm_account": request.account, "slurm_qos": request.qos,
                "slurm_constraint": request.constraint}
    params.update({key: value for key, value in optional.items() if value})
    if request.extra:
        params["slurm_additional_parameters"] = dict(request.extra)
    return params


def make_job(args: argparse.Namespace) -> tuple[Any, str, Recipe | None]:
    """(the job callable, the job name, the resolved recipe for a training job)."""
    overrides, program = split_rest(args.rest)
    if program and (overrides or args.recipe):
        raise SubmitError("a program cannot take a recipe or key=value overrides.",
                          "pass the program's own arguments after its name")
    cwd = str(Path.cwd())
    if program:
        module = program[0] == "-m" and len(program) > 1
        name = program[1].replace(".", "_") if module else Path(program[0]).stem
        return ProgramJob(program_argv(program), cwd), name, None
    recipe = load_recipe(args.recipe, overrides)
    return TrainJob(to_yaml(recipe), cwd), recipe.run.name, recipe


def job_folder(recipe: Recipe | None, name: str, kind: str = "slurm") -> Path:
    """submitit's files and the tasks' stdout/stderr: ``<run dir>/slurm/<job id>`` (Slurm fills in
    ``%j``); a local job's files are named by its id inside ``<run dir>/slurm/local``."""
    base = (recipe.run_dir if recipe else Path("runs") / name) / "slurm"
    return base.resolve() / ("%j" if kind == "slurm" else "local")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sweep or args.parallel is not None:
        return sweep_main(args)
    try:
        request = build_request(args)
        job, name, recipe = make_job(args)
        executor, partition = prepare_executor(args, request, name, recipe)
        warning = signal_lead_warning(recipe, request.signal_lead_s)
        if warning:
            print(warning, file=sys.stderr)
        if args.dry_run:
            print_dry_run(executor, job, recipe, partition)
            return 0
        submitted = submit_job(executor, job)
    except DDPError as err:
        print_error(err, 0)
        return err.exit_code
    announce(submitted, partition)
    return wait(submitted, args.cluster) if args.wait else 0


def submit_job(executor: submitit.AutoExecutor, job: Any) -> submitit.Job:
    """``executor.submit``, with sbatch's own refusal (bad account, QOS...) as one line."""
    return _sbatch(lambda: executor.submit(job))


def _sbatch(send: Callable[[], Any]) -> Any:
    try:
        return send()
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "no output")
        raise SubmitError(f"sbatch refused the job: {reason.strip()}", "fix the option it names") from None


def last_save(recipe: Recipe) -> tuple[Path, float] | None:
    """(manifest, seconds) of the newest checkpoint save of this run, from its manifest."""
    manifests = sorted(recipe.run_dir.glob("**/checkpoints/step-*.json"), key=lambda p: p.stat().st_mtime)
    for manifest in reversed(manifests):
        try:
            seconds = json.loads(manifest.read_text()).get("save_s")
        except (OSError, ValueError):
            continue
        if isinstance(seconds, (int, float)):
            return manifest, float(seconds)
    return None


def signal_lead_warning(recipe: Recipe | None, lead_s: int) -> str | None:
    """A warning line when the run's last measured save took longer than the signal lead."""
    found = last_save(recipe) if recipe is not None else None
    if found is None or found[1] <= lead_s:
        return None
    manifest, seconds = found
    return (f"warning: the last checkpoint save of this run took {seconds:.0f} s ({manifest}) but --signal-lead is "
            f"{lead_s} s: a preempted job may be killed before its checkpoint is written. "
            f"HINT: --signal-lead {math.ceil(2 * seconds) + 30}")


def prepare_executor(args: argparse.Namespace, request: Request, name: str, recipe: Recipe | None,
                     parallel: int | None = None) -> tuple[submitit.AutoExecutor, str]:
    if args.cluster == "local":
        partition = "local"
    elif args.dry_run:  # rendered even where Slurm is absent or down: nothing is submitted
        known = _partitions_if_reachable()
        partition = (check(request, known).name if known is not None else
                     f"{request.partition or 'the default'} (not checked: no Slurm controller reachable here)")
    else:
        cluster.require_sbatch()
        partition = check(request, cluster.partitions()).name
    if args.dry_run:  # the Slurm job, rendered; no folder is created
        with _srun_assumed():
            executor = submitit.AutoExecutor(folder=job_folder(recipe, name), cluster="slurm")
    else:
        executor = submitit.AutoExecutor(folder=job_folder(recipe, name, args.cluster), cluster=args.cluster)
    params = executor_parameters(request, partition, name)
    if parallel is not None:
        params["slurm_array_parallelism"] = parallel
    if args.cluster == "local":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    executor.update_parameters(**params)
    return executor, partition


@contextmanager
def _srun_assumed() -> Iterator[None]:
    """submitit's Slurm executor refuses to be made where ``srun`` is missing; a dry run only renders
    its script, so it is made as if ``srun`` were there."""
    executor_class = submitit.SlurmExecutor
    original = executor_class.__dict__["affinity"]
    executor_class.affinity = classmethod(lambda cls: 1)  # type: ignore[assignment]
    try:
        yield
    finally:
        executor_class.affinity = original  # type: ignore[assignment]


def _partitions_if_reachable() -> dict[str, Any] | None:
    if not cluster.has_sbatch():
        return None
    try:
        return cluster.partitions()
    except SubmitError:
        return None


def print_dry_run(executor: submitit.AutoExecutor, job: Any, recipe: Recipe | None, partition: str) -> None:
    """The sbatch script submitit would submit (its own text), what each task runs as a command
    you could type, then the resolved recipe. Needs no Slurm: nothing is submitted."""
    inner = executor._executor  # noqa: SLF001 - submitit has no public "render the script" call
    print(inner._make_submission_file_text(inner._submitit_command_str, "dry-run"))  # noqa: SLF001
    print(f"# partition: {partition}")
    print(f"# each task runs, in {job.cwd}:")
    print(f"#   {task_command(job, recipe)}")
    if recipe is not None:
        print("# resolved recipe\n" + to_yaml(recipe), end="")


def task_command(job: Any, recipe: Recipe | None, shown: tuple[str, ...] = ()) -> str:
    """What a task runs, as the equivalent command line (submitit runs it from a pickle): the keys
    that differ from the defaults, and the ``shown`` keys (a sweep's) whatever their value."""
    if recipe is None:
        return shlex.join(job.argv)
    defaults, mine = flat(load_recipe(None, [])), flat(recipe)
    changed = [f"{key}={_value(value)}" for key, value in mine.items() if defaults.get(key) != value or key in shown]
    return shlex.join(["python", "-m", "ddp.train", *changed])


def _value(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


# --- sweeps: one job array, one run per element ----------------------------------------------------

@dataclass(frozen=True)
class Sweep:
    base: Recipe  # the recipe without the swept keys: names the job and the group directory
    elements: list[Element]
    recipes: list[Recipe]  # element i's resolved recipe: its values, run.dir = <group>/<element name>
    parallel: int

    @property
    def jobs(self) -> list[TrainJob]:
        cwd = str(Path.cwd())
        return [TrainJob(to_yaml(recipe), cwd) for recipe in self.recipes]


def make_sweep(args: argparse.Namespace) -> Sweep:
    """Every element's recipe, each checked as a single submission's is, before anything is sent."""
    overrides, program = split_rest(args.rest)
    if not args.sweep:
        raise SubmitError(f"--parallel {args.parallel} without --sweep: it says how many runs of a sweep run at once.",
                          "add --sweep KEY=V1,V2,... or drop --parallel")
    if program:
        raise SubmitError("--sweep sets recipe keys; a program takes its own arguments.",
                          "sweep a recipe (key=value overrides), or submit the program once per value")
    if args.parallel is not None and args.parallel < 1:
        raise SubmitError(f"--parallel {args.parallel} is invalid: it must be ≥ 1.", "give --parallel a whole number ≥ 1")
    elements = grid([parse_axis(spec) for spec in args.sweep], overrides)
    base = load_recipe(args.recipe, overrides)
    recipes = [_element_recipe(args.recipe, overrides, element, base) for element in elements]
    return Sweep(base, elements, recipes, min(args.parallel or len(elements), len(elements)))


def _element_recipe(path: str | None, overrides: list[str], element: Element, base: Recipe) -> Recipe:
    try:
        recipe = load_recipe(path, [*overrides, *element.overrides])
    except ConfigError as err:
        raise ConfigError(f"run {element.index} of the sweep ({element.label}): {err.problem}",
                          err.hint) from None
    recipe.run.dir = str(base.run_dir / element.name)
    return recipe


def sweep_main(args: argparse.Namespace) -> int:
    try:
        request = build_request(args)
        sweep = make_sweep(args)
        executor, partition = prepare_executor(args, request, sweep.base.run.name, sweep.base, sweep.parallel)
        warning = signal_lead_warning(sweep.base, request.signal_lead_s)
        if warning:
            print(warning, file=sys.stderr)
        if args.dry_run:
            print_sweep_dry_run(executor, sweep, partition)
            return 0
        if args.cluster == "local":
            return run_local_sweep(executor, sweep)
        jobs = _sbatch(lambda: executor.submit_array(sweep.jobs))
    except DDPError as err:
        print_error(err, 0)
        return err.exit_code
    announce_sweep(jobs, sweep, partition)
    return wait_array(jobs, sweep) if args.wait else 0


def print_sweep_dry_run(executor: submitit.AutoExecutor, sweep: Sweep, partition: str) -> None:
    """The array's sbatch script, then every element: its array task, directory and command."""
    inner = executor._executor  # noqa: SLF001 - submitit has no public "render the script" call
    inner.parameters["map_count"] = len(sweep.elements)  # as submitit sets it when it submits an array
    print(inner._make_submission_file_text(inner._submitit_command_str, "dry-run"))  # noqa: SLF001
    print(f"# partition: {partition}")
    print(f"# job array of {count(len(sweep.elements), 'run')}, at most {sweep.parallel} at a time; "
          f"array task i trains run i in its own directory; each task of it runs, in {Path.cwd()}:")
    for element, job, recipe in zip(sweep.elements, sweep.jobs, sweep.recipes):
        print(f"#   {element.index}  {recipe.run_dir}")
        print(f"#        {task_command(job, recipe, tuple(key for key, _ in element.values))}")
    print(f"# resolved recipe of run 0 (the others differ in {', '.join(k for k, _ in sweep.elements[0].values)} "
          "and run.dir)\n" + to_yaml(sweep.recipes[0]), end="")


def announce_sweep(jobs: list[submitit.Job], sweep: Sweep, partition: str) -> None:
    array_id = jobs[0].job_id.split("_")[0]
    print(f"submitted job array {array_id} ({count(len(jobs), 'run')}, at most {sweep.parallel} at a time) "
          f"to partition '{partition}'")
    for job, recipe in zip(jobs, sweep.recipes):
        print(f"  {job.job_id}  {recipe.run_dir}")
    logs = Path(str(jobs[0].paths.folder).replace(jobs[0].job_id, f"{array_id}_<i>"))
    print(f"logs: {logs}/ (array task i; rank r writes {array_id}_<i>_r_log.out and .err)")
    print(f"follow: squeue -j {array_id}   results: python -m ddp.report {shlex.quote(str(sweep.base.run_dir))}")


def wait_array(jobs: list[submitit.Job], sweep: Sweep) -> int:
    """Wait until every array task left the queue; 0 when every one COMPLETED."""
    array_id = jobs[0].job_id.split("_")[0]
    while cluster.queue_state(array_id) is not None:
        time.sleep(2.0)
    states = [cluster.final_state(job.job_id) for job in jobs]
    for job, recipe, state in zip(jobs, sweep.recipes, states):
        print(f"job {job.job_id}: {state}  {recipe.run_dir}", file=sys.stderr)
    return 0 if all(state == "COMPLETED" for state in states) else 1


def run_local_sweep(executor: submitit.AutoExecutor, sweep: Sweep) -> int:
    """``--cluster local``: the elements on this machine, at most ``sweep.parallel`` at once (submitit's
    local executor has no array limit of its own), in the foreground until the last one ends."""
    waiting = list(zip(sweep.elements, sweep.jobs, sweep.recipes))
    running: list[tuple[Element, submitit.Job, Recipe]] = []
    states: list[str] = []
    print(f"sweep of {count(len(waiting), 'run')} on this machine, at most {sweep.parallel} at a time")
    try:
        while waiting or running:
            while waiting and len(running) < sweep.parallel:
                element, job, recipe = waiting.pop(0)
                submitted = submit_job(executor, job)
                print(f"run {element.index} started (job {submitted.job_id}): {recipe.run_dir}", flush=True)
                running.append((element, submitted, recipe))
            time.sleep(0.5)
            for item in [item for item in running if item[1].done()]:
                running.remove(item)
                element, submitted, recipe = item
                states.append(local_state(submitted))
                print(f"run {element.index} {states[-1]} (job {submitted.job_id}): {recipe.run_dir}", flush=True)
    except KeyboardInterrupt:
        print(f"stopped: {count(len(running), 'run')} stopped, {len(waiting)} not started; the same command resumes "
              "the sweep", file=sys.stderr)
        return 130
    finished = states.count("FINISHED")
    print(f"sweep: {finished} of {count(len(states), 'run')} FINISHED; "
          f"results: python -m ddp.report {shlex.quote(str(sweep.base.run_dir))}")
    return 0 if finished == len(states) else 1


if __name__ == "__main__":
    sys.exit(main())
