"""The CUDA/NCCL paths, shown on a CPU machine where they can fail: the ``meta`` device stands in
for a GPU's memory, torch.cuda is faked only at its boundary (count, availability, UUIDs) while
CUDA_VISIBLE_DEVICES, the backend/device rule and the rendezvous run for real, and a dispatch hook
counts host↔device copies. The GPU check itself lives in tests/gpu/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.overrides import TorchFunctionMode

from ddp.cluster import rendezvous
from ddp.checkpoint.checkpointer import Checkpointer, TrainState
from ddp.config import CheckpointConfig, load_recipe
from ddp.cluster.environment import ClusterEnv
from ddp.cluster.nccl import nccl_defaults
from tests.harness import REPO, free_port, python_env, run_cli, run_torchrun

QUIET = ("log.tensorboard=false", "log.progress=false")


# --- 1. a resume on a GPU -------------------------------------------------------------------

def test_a_resume_onto_a_gpu_reads_host_memory_and_keeps_adams_step_on_the_cpu(tmp_path):
    """On a GPU the checkpoint used to be mapped onto the device, and restoring numpy's RNG from a
    device tensor crashed every resume. The model here lives on ``meta``, a device without host
    access, like a GPU's memory."""
    model = nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    keeper = Checkpointer(CheckpointConfig(), tmp_path, load_recipe(None, []))
    keeper.save(model, optimizer, LambdaLR(optimizer, lambda step: 1.0), TrainState(global_step=1))
    expected_draw = torch.rand(3)  # the draw right after the save: a resume must restore to before it

    on_device = nn.Linear(4, 3, device="meta")
    resumed_optimizer = torch.optim.Adam(on_device.parameters())
    state = keeper.resume(tmp_path / "step-00000001.pt", on_device, resumed_optimizer)

    assert state is not None and state.global_step == 1
    assert torch.equal(torch.rand(3), expected_draw)
    for param in on_device.parameters():
        slots = resumed_optimizer.state[param]
        assert slots["step"].device.type == "cpu"  # where torch keeps it: no .item() from the GPU per step
        assert slots["exp_avg"].device.type == "meta"  # moments follow their parameter


# --- 2. the device rule across ranks: ranks that share a GPU under NCCL -------------------------

def _fake_gpu_ranks(tmp_path: Path, uuids: list[str], *args: str) -> list[subprocess.CompletedProcess]:
    """Two srun-style tasks on one machine, each seeing one faked GPU (per-task binding)."""
    port = free_port()
    procs = []
    for rank, uuid in enumerate(uuids):
        env = python_env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS=str(len(uuids)),
                         SLURM_NTASKS_PER_NODE=str(len(uuids)), SLURM_NODEID="0", SLURM_JOB_ID="77",
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="0")
        procs.append(subprocess.Popen([sys.executable, str(REPO / "tests/workers/fake_gpus.py"), uuid, *QUIET, *args],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


@pytest.mark.parametrize("backend", ["auto", "nccl"])
def test_two_tasks_bound_to_the_same_gpu_are_refused_in_one_line_before_nccl_starts(tmp_path, backend):
    ranks = _fake_gpu_ranks(tmp_path, ["same-gpu", "same-gpu"], f"dist.backend={backend}")
    assert [r.returncode for r in ranks] == [2, 2], [r.stderr for r in ranks]
    said = [line for r in ranks for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert len(said) == 1, said  # once, by rank 0
    assert "ranks 0, 1 on" in said[0] and "share GPU GPU-same-gpu: NCCL cannot run two ranks on one GPU" in said[0]
    assert "dist.backend=gloo" in said[0]  # the fix is named
    assert not (tmp_path / "runs").exists()  # refused before the run dir


def test_the_gpu_check_names_every_shared_gpu_by_uuid_or_by_index_on_its_host():
    table = [("a", "GPU-1"), ("b", "GPU-1"), ("a", "0"), ("b", "0"), ("a", "0")]
    assert rendezvous.shared_gpus(table) == {"GPU-1": [0, 1], "0 of a": [2, 4]}
    assert rendezvous.shared_gpus([("a", "GPU-1"), ("a", "GPU-2")]) == {}


# --- 3. a failure on one rank reaches the others ----------------------------------------------

def test_a_failure_of_rank_0s_run_decision_is_said_by_every_rank_not_as_a_lost_peer(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "digits").write_text("a file where the run directory should be\n")
    done = run_torchrun(2, ["-m", "ddp.train", *QUIET], tmp_path, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "deciding the run directory failed on rank 0" in out, out  # rank 1 heard rank 0's cause
    assert "lost" not in out and "timed out" not in out.lower(), out


# --- 4. no host↔device copy per step ------------------------------------------------------------

class _HostTraffic(TorchFunctionMode):
    """Records every call that moves data between the host and a device tensor: host data made into
    a device tensor (``new_tensor``, ``torch.tensor``, ``.to`` of a CPU tensor), or a device value
    read on the host (``.item()``, ``.tolist()``, ``.cpu()``, ``bool()``...). On a GPU each is a
    blocking copy, so the step would wait for the GPU (or the GPU for the host)."""

    BUILD = {"new_tensor", "tensor", "as_tensor"}
    READ = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        tensors = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
        out = func(*args, **kwargs)
        on_device = isinstance(out, torch.Tensor) and out.device.type != "cpu"
        if name in self.BUILD and on_device:
            self.seen.append(f"{name}: host data copied to the device")
        elif name in ("to", "copy_", "cuda") and on_device and any(t.device.type == "cpu" for t in tensors):
            self.seen.append(f"{name}: a host tensor copied to the device")
        elif name in self.READ and any(t.device.type != "cpu" for t in tensors[:1]):
            self.seen.append(f"{name}: a device value read on the host")
        return out


def test_a_training_step_neither_reads_the_device_nor_copies_host_data_to_it():
    from ddp.engine.trainer import Trainer, TrainParts

    device = torch.device("meta")
    recipe = load_recipe(None, [])
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    parts = TrainParts(model, optimizer, LambdaLR(optimizer, lambda step: 1.0), [], [], device)
    trainer = Trainer(recipe, parts, metrics=None, checkpointer=None, stop=None)  # type: ignore[arg-type]
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    inputs, targets = torch.empty(8, 1, 8, 8, device=device), torch.zeros(8, dtype=torch.long, device=device)
    trainer._run_batch(inputs, targets, sums)  # warm: optimizer state is created on the first step
    with _HostTraffic() as traffic:
        for _ in range(2):
            trainer._run_batch(inputs, targets, sums)
    assert traffic.seen == [], traffic.seen


# --- 5. deterministic means deterministic ------------------------------------------------------

def test_deterministic_sets_cublas_workspace_and_refuses_instead_of_warning():
    code = ("import os, torch; from ddp.engine.seeding import seed_everything; seed_everything(0, True); "
            "print(os.environ['CUBLAS_WORKSPACE_CONFIG'], torch.are_deterministic_algorithms_enabled(), "
            "torch.is_deterministic_algorithms_warn_only_enabled())")
    assert run_cli(["-c", code], REPO).stdout.split() == [":4096:8", "True", "False"]
    kept = run_cli(["-c", code], REPO, CUBLAS_WORKSPACE_CONFIG=":16:8")
    assert kept.stdout.split()[0] == ":16:8"  # the user's choice wins


def test_an_op_without_a_deterministic_kernel_stops_a_deterministic_run_in_one_line(tmp_path):
    args = ["-m", "ddp.train", *QUIET, "model.name=tests.workers.put_model:PutNet", "train.max_steps=2"]
    plain = run_cli(args, tmp_path, PYTHONPATH=str(REPO))
    assert plain.returncode == 0, plain.stderr
    strict = run_cli([*args, "train.deterministic=true", "run.name=strict"], tmp_path, PYTHONPATH=str(REPO))
    assert strict.returncode == 2, strict.stderr
    errors = [line for line in strict.stderr.splitlines() if "ERROR" in line or line.startswith("error")]
    assert len(errors) == 1 and "train.deterministic=true, but put_ has no deterministic implementation" \
        in errors[0], strict.stderr
    assert "Traceback" not in strict.stderr


# --- 6. NCCL's failure handling is set on purpose --------------------------------------------------

def test_nccl_defaults_name_the_flight_recorder_dump_dir_and_keep_what_the_user_set(tmp_path):
    wanted = nccl_defaults(tmp_path / "flight_recorder")
    assert wanted["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"  # abort and raise in Python: the roll call runs
    assert wanted["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and int(wanted["TORCH_FR_BUFFER_SIZE"]) > 0
    assert wanted["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "flight_recorder" / "rank_")
    code = ("import json, os; from pathlib import Path; from ddp.cluster.nccl import export_nccl_defaults; "
            "lines = export_nccl_defaults(Path('d')); "
            "print(json.dumps([lines, {k: v for k, v in os.environ.items() if k.startswith('TORCH_')}]))")
    lines, environ = json.loads(run_cli(["-c", code], REPO, TORCH_NCCL_ASYNC_ERROR_HANDLING="1").stdout)
    assert environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert any(line.startswith("kept TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (set by you") for line in lines)
    assert environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"


# --- 7. NCCL chooses its own interface ----------------------------------------------------------

def test_a_multi_machine_start_sets_gloos_interface_and_leaves_nccls_alone(monkeypatch):
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    two_machines = ClusterEnv(rank=1, local_rank=0, world_size=2, local_world_size=1, master_addr="127.0.0.1")
    lines = rendezvous.choose_interface(two_machines, "nccl")
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    assert "NCCL_SOCKET_IFNAME" not in os.environ
    assert any("NCCL chooses its interfaces itself" in line for line in lines), lines
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    assert "kept NCCL_SOCKET_IFNAME=ib0 (set by you)" in rendezvous.choose_interface(two_machines, "nccl")
    assert os.environ["NCCL_SOCKET_IFNAME"] == "ib0"
