"""What runs in each Slurm task of a submitted job: submitit ``Checkpointable`` callables.

Every task of the job step calls the same object (``srun`` starts one per rank); each reads its
rank from Slurm's variables through ``ddp.cluster.environment`` (``SlurmEnv``).

Preemption and time limit. Slurm sends the warning signal (``--signal=USR2@lead``, submitit's
choice: NCCL catches USR1) to every task. During training the signal only sets a flag
(``ddp.engine.stop``); the ranks agree at a step boundary, all take part in one checkpoint and stop
(exit code 75). Then global rank 0 alone, the only task whose submitit handler checkpoints and
requeues, hands the same signal to that handler: it pickles this object again
(``checkpoint()``: same arguments) and runs ``scontrol requeue`` on this job (an array task
requeues only itself). The requeued job runs the same recipe and continues its own version from
the checkpoint (finished: it says so and exits 0). A warning that comes after training ended requeues
nothing: around the run, the task's handler for it passes it to submitit only before training began
and otherwise says it was ignored. A SIGTERM (``scancel``, ``scontrol requeue`` from outside, a
preemption without a warning, the time limit itself) also checkpoints and stops, but requeues
nothing: Slurm is already ending or requeueing the job (SIGINT likewise, exit 130). submitit counts a warning that arrives
late in the run as a time-out and stops requeueing after ``max_num_timeout`` (3) of them.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import submitit

from ddp.config import from_yaml
from ddp.cluster.environment import ClusterEnv, SingleProcessEnv, child_environ, detect_environment, torch_variables, slurm_master_port
from ddp.engine.stop import EXIT_INTERRUPTED, EXIT_PREEMPTED, SIGNALS, last_received, training_began
from ddp.runner import run


def requeue_signal() -> signal.Signals:
    """The signal submitit's job handler checkpoints and requeues on (USR2 unless configured)."""
    return signal.Signals[f"SIG{submitit.JobEnvironment.USR_SIG}"]


class _Job(submitit.helpers.Checkpointable):
    """Shared by both kinds of job: run in the submit directory, then act on the exit code."""

    def __init__(self, cwd: str) -> None:
        self.cwd = cwd

    def __call__(self) -> dict[str, Any]:
        os.chdir(self.cwd)
        self._started = False  # a requeued job's pickle holds the first run's value
        env = task_environment()
        requeue = signal.signal(requeue_signal(), self._warning_handler(env.rank))
        code, stopped_by = self.run(env)
        return finish(code, stopped_by, env.rank, requeue)

    def run(self, env: ClusterEnv) -> tuple[int, int]:
        """(exit code, the stop signal received or 0)."""
        raise NotImplementedError

    def began(self) -> bool:
        """True once training began (the handlers of the run took the stop signals)."""
        return training_began()

    def _warning_handler(self, rank: int) -> Any:
        """The warning's handler outside training: submitit's checkpoint-and-requeue before training
        began, nothing after it ended (only ``os.write`` here: logging is not safe in a handler)."""
        requeue = signal.getsignal(requeue_signal())

        def on_warning(signum: int, frame: Any) -> None:
            if not self.began():
                if callable(requeue):
                    requeue(signum, frame)
                return
            if rank == 0:
                os.write(2, f"slurm.job: {signal.Signals(signum).name} came after training ended: nothing to "
                            f"checkpoint, the job is not requeued\n".encode())

        return on_warning


class TrainJob(_Job):
    """``ddp.train`` on every task, from the recipe resolved at submission."""

    def __init__(self, recipe_yaml: str, cwd: str) -> None:
        super().__init__(cwd)
        self.recipe_yaml = recipe_yaml

    def run(self, env: ClusterEnv) -> tuple[int, int]:
        return run(from_yaml(self.recipe_yaml, "the submitted recipe"), env), last_received()


class ProgramJob(_Job):
    """A user's program on every task, with torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR...).

    The stop signals are passed on to it; exit code 75 after the requeue signal requeues the job.
    """

    def __init__(self, argv: list[str], cwd: str) -> None:
        super().__init__(cwd)
        self.argv = argv

    def run(self, env: ClusterEnv) -> tuple[int, int]:
        child = subprocess.Popen(self.argv, env=child_environ(torch_variables(env)), cwd=self.cwd)
        self._started = True
        received = [0]

        def forward(signum: int, frame: Any) -> None:
            received[0] = signum
            child.send_signal(signum)

        previous = {signum: signal.signal(signum, forward) for signum in SIGNALS}
        try:
            code = child.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return code, received[0]

    def began(self) -> bool:
        return self._started


def task_environment() -> ClusterEnv:
    """This task's ranks: Slurm's variables, or submitit's local executor's for ``--cluster local``."""
    env = detect_environment()
    if not isinstance(env, SingleProcessEnv):
        return env
    job = submitit.JobEnvironment()
    if job.num_tasks == 1:
        return env
    return ClusterEnv(rank=job.global_rank, local_rank=job.local_rank, world_size=job.num_tasks,
                      local_world_size=job.num_tasks // job.num_nodes, node_rank=job.node,
                      master_addr="127.0.0.1", master_port=slurm_master_port(job.job_id)).validate()


def finish(code: int, stopped_by: int, rank: int, requeue: Any) -> dict[str, Any]:
    """Turn a rank's exit code into the task's outcome: a result, a requeue, or a failure.
    ``requeue``: the handler submitit installed for the warning signal (its checkpoint-and-requeue)."""
    if code == 0:
        return {"rank": rank, "exit_code": 0}
    if code in (EXIT_PREEMPTED, EXIT_INTERRUPTED):
        if rank == 0 and code == EXIT_PREEMPTED and stopped_by == requeue_signal() and callable(requeue):
            requeue(stopped_by, None)  # pickles the job again, scontrol requeue, exits
        raise SystemExit(code)  # checkpointed; no result file: the job is not over
    raise RuntimeError(f"rank {rank} exited with code {code}; its log has the reason")
