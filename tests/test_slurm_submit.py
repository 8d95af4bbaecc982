"""slurm.submit without a cluster: refusals and the sbatch script, against faked sinfo/sbatch/srun; real jobs
through submitit's local executor (`--cluster local`)."""

import json
import re
import stat
import time

import pytest

from slurm import submit
from slurm.request import Partition, Request, SubmitError, check, parse_gres_gpus, parse_sinfo

SINFO = "gpu*|2|16|gpu:a100:4(S:0-1)\ncpu|4|2|(null)\ncpu|2|8|(null)\n"


def _fake_slurm(tmp_path, monkeypatch, sinfo=SINFO, sbatch_error=""):
    """sinfo prints SINFO; sbatch records its script and answers like Slurm; srun exists."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    answer = f'echo "{sbatch_error}" >&2; exit 1' if sbatch_error else 'echo "Submitted batch job 4242"'
    scripts = {"sinfo": f"cat <<'EOF'\n{sinfo}EOF\n",
               "sbatch": f'cp "$1" {tmp_path}/submitted.sh\n{answer}\n',
               "srun": "exit 0\n"}
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return tmp_path / "submitted.sh"


def test_parse_sinfo_combines_lines_and_reads_gpus():
    parts = parse_sinfo(SINFO)
    assert parts["gpu"] == Partition("gpu", 2, 16, 4, default=True)
    assert parts["cpu"] == Partition("cpu", 6, 2, 0)
    assert parse_gres_gpus("gpu:8,gpu:tesla:2") == 10 and parse_gres_gpus("(null)") == 0


@pytest.mark.parametrize("request_, message", [
    (Request(1, 4, 4, 10, 60, partition="nosuch"), "unknown partition 'nosuch'. HINT: sinfo lists: cpu, gpu"),
    (Request(1, 2, 2, 10, 60, partition="cpu"), "has no GPUs (sinfo shows no gpu GRES). HINT: use --tasks-per-node "
                                                "for a CPU job, or --partition gpu"),
    (Request(1, 8, 8, 10, 60), "--gpus-per-node 8 but the nodes of 'gpu' have 4 GPU(s)"),
    (Request(1, 4, 4, 10, 60, cpus_per_task=8), "4 task(s) per node × 8 CPU(s) per task = 32 CPUs"),
    (Request(1, 3, 0, 10, 60, partition="cpu"), "HINT: use --tasks-per-node 2"),
    (Request(3, 1, 0, 10, 60), "--nodes 3 but partition 'gpu' has 2 node(s)"),
    (Request(1, 1, 0, 1, 60), "--signal-lead 60 s does not fit in --time 1 min"),
    (Request(1, 0, 0, 10, 60), "--tasks-per-node 0 is invalid"),
])
def test_requests_the_cluster_cannot_hold_are_refused(request_, message):
    with pytest.raises(SubmitError) as info:
        check(request_, parse_sinfo(SINFO))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_no_sbatch_on_path_is_refused(in_tmp, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(in_tmp))
    assert submit.main(["--tasks-per-node", "2", "--time", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 'sbatch' is not on PATH") and err.count("\n") == 1


def test_refusal_happens_before_sbatch(in_tmp, monkeypatch, capsys):
    submitted = _fake_slurm(in_tmp, monkeypatch)
    assert submit.main(["--gpus-per-node", "8", "--time", "5"]) == 2
    assert "have 4 GPU(s)" in capsys.readouterr().err and not submitted.exists()


def test_gpu_job_is_one_task_per_gpu_with_the_warning_signal(in_tmp, monkeypatch, capsys):
    submitted = _fake_slurm(in_tmp, monkeypatch)
    code = submit.main(["--nodes", "2", "--gpus-per-node", "4", "--time", "30", "--signal-lead", "90",
                        "--account", "acct", "--qos", "high", "--constraint", "a100", "--mem", "64G",
                        "--cpus-per-task", "4", "--sbatch", "exclude=node3", "run.name=big"])
    out = capsys.readouterr().out
    assert code == 0 and "submitted job 4242 to partition 'gpu'" in out and "tail -F" in out
    script = submitted.read_text()
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--signal=USR2@90", "--time=30",
                 "--partition=gpu", "--account=acct", "--qos=high", "--constraint=a100", "--mem=64G",
                 "--cpus-per-task=4", "--exclude=node3", "--job-name=big"):
        assert f"#SBATCH {line}\n" in script, line
    assert "runs/big/slurm/%j" in script


def test_dry_run_works_without_slurm_and_shows_the_command_each_task_runs(in_tmp, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(in_tmp))  # no sbatch, no sinfo
    assert submit.main(["--tasks-per-node", "2", "--time", "5", "--dry-run", "train.epochs=3", "optim.lr=0.1"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --ntasks-per-node=2" in out and "not checked: no Slurm controller reachable here" in out
    assert "#   python -m ddp.train optim.lr=0.1 train.epochs=3\n" in out
    assert not (in_tmp / "runs").exists()  # a dry run creates no folder


def test_dry_run_prints_the_script_and_submits_nothing(in_tmp, monkeypatch, capsys):
    submitted = _fake_slurm(in_tmp, monkeypatch)
    assert submit.main(["--tasks-per-node", "2", "--partition", "cpu", "--time", "5", "--dry-run",
                        "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --ntasks-per-node=2" in out and "epochs: 3" in out and not submitted.exists()


@pytest.mark.parametrize("rest, overrides, program", [
    (["train.epochs=3", "optim.lr=0.1"], ["train.epochs=3", "optim.lr=0.1"], []),
    (["my_script.py", "--epochs", "3"], [], ["my_script.py", "--epochs", "3"]),
    (["-m", "pkg.mod", "a=b"], [], ["-m", "pkg.mod", "a=b"]),
])
def test_overrides_or_a_program(rest, overrides, program):
    assert submit.split_rest(rest) == (overrides, program)


def test_a_signal_lead_shorter_than_the_last_save_is_reported(in_tmp, monkeypatch, capsys):
    submitted = _fake_slurm(in_tmp, monkeypatch)
    checkpoints = in_tmp / "runs/slow/checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "step-00000010.json").write_text('{"file": "step-00000010.pt", "bytes": 1, "crc32": 0, '
                                                    '"step": 10, "epoch": 0, "metric": null, "save_s": 150.0}')
    assert submit.main(["--tasks-per-node", "2", "--partition", "cpu", "--time", "30", "run.name=slow"]) == 0
    err = capsys.readouterr().err
    assert "last checkpoint save of this run took 150 s" in err and "HINT: --signal-lead 330" in err
    assert submitted.exists()  # a warning, not a refusal
    assert submit.main(["--tasks-per-node", "2", "--partition", "cpu", "--time", "30", "--signal-lead", "200",
                        "run.name=slow"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_manifests_record_how_long_the_save_took(tmp_path):
    import torch

    from ddp.checkpoint import files as checkpoint_files

    began = time.perf_counter()
    manifest = checkpoint_files.save(tmp_path, {"w": torch.zeros(3)}, step=1, epoch=0, metric=None)
    took = time.perf_counter() - began
    assert 0 < manifest.save_s <= round(took, 3) + 0.001  # the save's own time, within the call (ms rounding)
    assert checkpoint_files.verify(tmp_path / manifest.file).save_s == manifest.save_s


def test_each_gpu_task_trains_on_its_own_gpu():
    """--gpus-per-node G gives G tasks per node that all see the node's G GPUs: rank r uses cuda:<local rank>."""
    from ddp.cluster.devices import Devices, choose_backend, choose_device
    from ddp.config import Backend, Parallel
    from ddp.cluster.environment import detect_environment

    devices = Devices(cuda_available=True, cuda_count=4)
    picked = []
    for local in range(4):
        env = detect_environment({"SLURM_PROCID": str(4 + local), "SLURM_LOCALID": str(local), "SLURM_NTASKS": "8",
                                  "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_ID": "5",
                                  "SLURM_JOB_NODELIST": "g[1-2]"})
        backend = choose_backend(Backend.auto, env, devices)
        picked.append((backend, str(choose_device(backend, Parallel.ddp, env, devices))))
    assert picked == [("nccl", f"cuda:{r}") for r in range(4)]


def test_sbatch_refusing_the_job_is_one_line(in_tmp, monkeypatch, capsys):
    _fake_slurm(in_tmp, monkeypatch, sbatch_error="sbatch: error: Batch job submission failed: Invalid account")
    assert submit.main(["--tasks-per-node", "2", "--partition", "cpu", "--time", "5", "--account", "x"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # (submitit lets sbatch's own stderr through first)
    assert last == "error: sbatch refused the job: sbatch: error: Batch job submission failed: Invalid account " \
                   "HINT: fix the option it names"


def test_a_module_program_is_taken_whole():
    args = submit.parse_args(["--tasks-per-node", "2", "--time", "5", "-m", "ddp.train", "train.epochs=2"])
    assert submit.split_rest(args.rest) == ([], ["-m", "ddp.train", "train.epochs=2"])
    args = submit.parse_args(["--tasks-per-node", "2", "--time", "5", "my.py", "--epochs", "3"])
    assert submit.split_rest(args.rest) == ([], ["my.py", "--epochs", "3"])


# --- --cluster local: the same job through submitit's local executor, for real (no Slurm needed) ---------

def _submit_local(cwd, *args: str):
    from tests.harness import run_cli

    return run_cli(["-m", "slurm.submit", "--time", "5", "--cluster", "local", "--wait", *args], cwd=cwd, timeout=240)


@pytest.mark.timeout(300)
def test_cluster_local_trains_the_recipe_on_two_tasks(tmp_path):
    done = _submit_local(tmp_path, "--tasks-per-node", "2", "train.epochs=1", "log.tensorboard=false")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    job_id = re.search(r"submitted job (\d+) to run on this machine", done.stdout)[1]
    assert f"job {job_id}: FINISHED" in done.stderr and "done: test accuracy" in done.stderr, done.stderr[-3000:]
    assert "squeue" not in done.stdout and f"ps -p {job_id}" in done.stdout  # no Slurm advice for a local job
    assert not list(tmp_path.rglob("%j"))  # nor a folder literally named %j
    jobs = tmp_path / "runs" / "digits" / "slurm" / "local"
    assert {f"{job_id}_{rank}_result.pkl" for rank in (0, 1)} <= {p.name for p in jobs.iterdir()}
    assert [p.name for p in (tmp_path / "runs" / "digits").glob("version_*")] == ["version_0"]  # one run, not two
    run = tmp_path / "runs" / "digits" / "version_0"
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1]
    for rank in (0, 1):
        assert f"[rank {rank}/2" in (run / "logs" / f"rank{rank}.log").read_text()  # two ranks of one job
    assert list((run / "checkpoints").glob("step-*.pt"))


@pytest.mark.timeout(300)
def test_wait_exits_non_zero_when_the_job_fails(tmp_path):
    (tmp_path / "failing.py").write_text("import sys\nprint('failing on purpose', flush=True)\nsys.exit(3)\n")
    done = _submit_local(tmp_path, "--tasks-per-node", "1", "failing.py")
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    job_id = re.search(r"submitted job (\d+) to run on this machine", done.stdout)[1]
    assert "failing on purpose" in done.stdout  # rank 0's output, streamed
    assert "rank 0 exited with code 3" in done.stderr and done.stderr.rstrip().endswith(f"job {job_id}: FAILED"), \
        done.stderr[-3000:]
