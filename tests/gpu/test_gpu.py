"""GPU checks on one CUDA GPU, on real processes (``bash tests/gpu/run.sh``; ≤ 8 minutes on one H200).

a. the default recipe under ``torchrun --nproc_per_node=1``: NCCL, cuda:0, ≥ 97% test accuracy;
b. SIGTERM mid-run, then the same command: final weights bit for bit those of an uninterrupted run;
c. ``data.batch_size=auto`` against the real out-of-memory boundary (found by bisection);
d. fp16 (+GradScaler) and bf16 learn;
f. ``dist.parallel=dp`` on one GPU;
g. two torchrun ranks on the one GPU: NCCL refused in one line (ranks exit 2), auto → Gloo on the
   CPU with a warning saying why;
e. ``train.channels_last``, ``dist.sync_bn``, ``train.compile`` each train at world 1;
h. speed ratios side by side (printed and recorded, never asserted).

Each check is skipped without CUDA (see conftest.py); ``GPU_CHECK_ON_CPU=1`` runs them on the CPU
as a smoke test of the checks themselves, smaller, without their CUDA-only assertions.
Timeouts are per check; the order puts the slow, least critical ones last.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from ddp.engine.stop import EXIT_PREEMPTED
from tests.gpu.checks import (BACKEND, CUDA, DEVICE, QUIET, RESULTS, SLOW, SMOKE, console, epochs, final_acc, finish,
                              kill, latest_checkpoint, model_tensors, placement, run, start, tail, train, version)
from tests.harness import free_port
from tests.test_lifecycle import _wait_for_steps

pytestmark = pytest.mark.gpu
HERE = Path(__file__).resolve().parent


def limit(seconds: float):
    """The check's time limit (pytest-timeout), × SLOW in the CPU smoke mode."""
    return pytest.mark.timeout(seconds * SLOW)


def smoke(gpu_value, cpu_value):
    """The GPU check's size, or the smaller one of the CPU smoke mode."""
    return cpu_value if SMOKE and not CUDA else gpu_value


# ---------------------------------------------------------------- a. one GPU, NCCL, default recipe

@limit(150)
def test_a_default_recipe_nccl_world1(tmp_path, figure):
    done = train(tmp_path, *smoke((), ("train.epochs=3",)), ranks=1, timeout=140)
    assert done.returncode == 0, tail(done)
    backend, device = placement(console(done))
    acc = final_acc(version(tmp_path))
    figure("acc", f"{acc:.4f}")
    figure("backend", backend)
    figure("device", device)
    assert (backend, device) == (BACKEND, DEVICE)
    assert acc >= smoke(0.97, 0.8)


# ---------------------------------------------------------------- b. SIGTERM, resume: bit for bit

@limit(180)
def test_b_sigterm_resume_bit_exact(tmp_path, figure):
    common = ("train.deterministic=true", f"train.epochs={smoke(30, 4)}", "log.every_steps=10")
    args = ["-m", "ddp.train", *QUIET, *common]
    straight_dir, stopped_dir = tmp_path / "straight", tmp_path / "stopped"
    straight_dir.mkdir(), stopped_dir.mkdir()
    with (tmp_path / "straight.log").open("w") as straight_log, (tmp_path / "stopped.log").open("w") as stopped_log:
        straight = start(args, straight_dir, stdout=straight_log, stderr=subprocess.STDOUT)
        stopped = start(args, stopped_dir, stdout=stopped_log, stderr=subprocess.STDOUT)
        try:
            _wait_for_steps(version(stopped_dir) / "metrics.jsonl", stopped, 3, timeout=90 * SLOW)
            stopped.send_signal(signal.SIGTERM)
            finish(stopped, timeout=90)
            straight_done = finish(straight, timeout=150)
        finally:
            kill(stopped), kill(straight)
    stopped_text = (tmp_path / "stopped.log").read_text()
    assert stopped.returncode == EXIT_PREEMPTED, stopped_text[-3000:]
    assert straight_done.returncode == 0, (tmp_path / "straight.log").read_text()[-3000:]
    stop_step = int(re.search(r"stopped by SIGTERM at step (\d+)", stopped_text).group(1))
    figure("stopped_at_step", stop_step)
    resumed = train(stopped_dir, *common, timeout=120)
    assert resumed.returncode == 0, tail(resumed)
    assert "resumed from" in console(resumed), tail(resumed)
    ours, theirs = latest_checkpoint(version(stopped_dir)), latest_checkpoint(version(straight_dir))
    assert ours.name == theirs.name  # the same final step
    figure("final", ours.name)
    resumed_weights, straight_weights = model_tensors(ours), model_tensors(theirs)
    assert resumed_weights.keys() == straight_weights.keys()
    same = [name for name in straight_weights if torch.equal(resumed_weights[name], straight_weights[name])]
    figure("equal_tensors", f"{len(same)}/{len(straight_weights)}")
    figure("device", placement(stopped_text)[1])
    assert len(same) == len(straight_weights), f"differ: {sorted(set(straight_weights) - set(same))}"


# ---------------------------------------------------------------- c. auto batch size vs the real OOM boundary

LEAVE_MB = 6144  # what the ballast leaves free (the other processes' CUDA contexts come out of it)
OOM_RECIPE = ("model.name=cifar_resnet18", "data.name=synthetic", "data.synthetic_shape=[3,32,32]",
              "data.synthetic_train=2048", "data.synthetic_test=256", "train.epochs=2", "run.name=oom",
              "memory.cache=''", "memory.fraction=1.0")
OOM_SMOKE = ("model.name=mnist_cnn", "data.name=synthetic", "data.synthetic_shape=[1,28,28]",
             "data.synthetic_train=256", "data.synthetic_test=64", "train.epochs=1", "run.name=oom",
             "memory.cache=''", "memory.budget_mb=96")


@contextmanager
def ballast(leave_mb: int):
    """A process holding all but ``leave_mb`` of the GPU's free memory while the block runs (it
    holds it until its stdin closes; it is killed in any case)."""
    proc = start([str(HERE / "ballast.py"), str(leave_mb)], HERE, stdin=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        assert line, f"the ballast process did not start: {proc.stderr.read()[-2000:]}"
        yield json.loads(line)
    finally:
        kill(proc)


@limit(240)
def test_c_auto_batch_vs_real_oom_boundary(tmp_path, figure):
    """The probe's budget is ``memory.fraction × (free + its parameters)`` with "free" read from
    ``torch.cuda.mem_get_info`` (+ PyTorch's unused cache): ``CudaReader.room``, ``resolve._budget``.
    A ballast process holds all but 6 GiB of the H200, so the bisection here and the probe in the
    training run see the same free memory and the same real limit (cudaMalloc fails beyond it),
    within seconds instead of minutes. The bisection holds what training holds (the dataset's tensors
    on the GPU too), so its boundary is the largest batch a training run can really take.
    ``memory.fraction=1.0``: the probe's verify steps then aim at 99% (policy.AIM) of all the free
    memory and back off after an out-of-memory trial, so the assertion is pick ≥ 0.95 × boundary.
    (At the default 0.9 they aim at 0.99 × 0.9 of it, i.e. at most ~0.89 × boundary: not comparable.)
    Then the run trains 2 epochs at the pick and must never run out of memory (exit 0, no
    OutOfMemoryError; out-of-memory *trials* inside the probe are allowed and counted)."""
    recipe = smoke(OOM_RECIPE, OOM_SMOKE)
    with (ballast(LEAVE_MB) if CUDA else _nothing()) as held:
        found = run([str(HERE / "oom_boundary.py"), *smoke((), ("--fake-cap=48",)), *recipe], tmp_path, timeout=120)
        assert found.returncode == 0, tail(found)
        bound = json.loads(found.stdout.strip().splitlines()[-1])
        done = train(tmp_path, *recipe, "data.batch_size=auto", timeout=150)
    out = console(done)
    figure("free_mb", held.get("free_mb"))
    figure("boundary", bound["boundary"])
    figure("first_oom", bound["first_oom"])
    figure("bisect_s", bound["seconds"])
    run_dir = version(tmp_path, "oom")
    probe_file = run_dir / "memory_probe.json"
    assert probe_file.exists(), f"no memory_probe.json: {tail(done)}"
    probe = json.loads(probe_file.read_text())
    pick = probe["agreed"]["batch_size"]
    rows = probe["ranks"][0].get("probes", {}).get("train", {}).get("table", [])
    figure("pick", pick)
    figure("pick/boundary", f"{pick / bound['boundary']:.3f}")
    figure("budget_mb", probe["ranks"][0].get("budget_mb"))
    figure("probe_steps", len(rows))
    figure("probe_ooms", sum(row["result"] == "out of memory" for row in rows))
    assert done.returncode == 0, tail(done)  # trained at the pick: never ran out of memory
    assert "CUDA out of memory" not in out and "OutOfMemoryError" not in out
    assert "OutOfMemoryError" not in (run_dir / "logs" / "rank0.log").read_text()
    assert len(epochs(run_dir)) == smoke(2, 1)
    assert bound["first_oom"] is not None, f"no out-of-memory below {bound['limit']} samples: the check is mis-sized"
    if CUDA:
        assert pick >= 0.95 * bound["boundary"], f"pick {pick} < 95% of the real boundary {bound['boundary']}"


@contextmanager
def _nothing():
    yield {}


# ---------------------------------------------------------------- d. mixed precision learns

@limit(90)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_d_mixed_precision_learns(tmp_path, figure, precision):
    if precision == "fp16" and not CUDA:
        pytest.skip("fp16 needs CUDA (refused on a CPU by design)")
    done = train(tmp_path, f"train.precision={precision}", f"train.epochs={smoke(3, 1)}", timeout=80)
    assert done.returncode == 0, tail(done)
    acc = final_acc(version(tmp_path))
    figure("acc", f"{acc:.4f}")
    figure("device", placement(console(done))[1])
    assert placement(console(done))[1] == DEVICE
    if precision == "fp16":
        scaler = torch.load(latest_checkpoint(version(tmp_path)), map_location="cpu", weights_only=True)["scaler"]
        assert scaler and scaler.get("scale", 0) > 0  # the GradScaler ran and was saved
        figure("loss_scale", scaler.get("scale"))
    assert acc >= smoke(0.8, 0.5)  # chance is 0.1


# ---------------------------------------------------------------- f. DataParallel on one GPU

@limit(90)
def test_f_dataparallel_one_gpu(tmp_path, figure):
    done = train(tmp_path, "dist.parallel=dp", *smoke((), ("train.epochs=2",)), timeout=80)
    assert done.returncode == 0, tail(done)
    acc = final_acc(version(tmp_path))
    figure("acc", f"{acc:.4f}")
    figure("device", placement(console(done))[1])
    assert placement(console(done))[1] == DEVICE
    assert acc >= smoke(0.97, 0.7)


# ---------------------------------------------------------------- g. two ranks, one GPU

def _our_tracebacks(text: str) -> list[str]:
    """Traceback frames from this repository's code (torchrun's own ChildFailedError traceback is not ours)."""
    return re.findall(r'File "[^"]*[/\\](?:ddp|launch)[/\\][^"]*"', text)


@limit(120)
def test_g_two_ranks_one_gpu_nccl_refused(tmp_path, figure):
    """Under torchrun every rank sees the one GPU: ranks would share it, which NCCL cannot do. Each rank
    refuses before any process group (exit 2; rank 0 says it in one line). torchrun itself then exits 1
    with its own ChildFailedError summary naming the ranks' exit codes — that traceback is torchrun's."""
    started = time.monotonic()
    done = train(tmp_path, "dist.backend=nccl", ranks=2, timeout=90)
    seconds = time.monotonic() - started
    out = console(done)
    root = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", out, re.S)
    codes = set(re.findall(r"exitcode\s*:\s*(-?\d+)", out))
    figure("torchrun_exit", done.returncode)
    figure("root_cause_exit", root.group(1) if root else "?")
    figure("seconds", f"{seconds:.1f}")
    assert done.returncode != 0, out[-3000:]
    # the first rank to fail exits 2; torchrun then SIGTERMs any rank still running (-15)
    assert root and root.group(1) == "2" and codes <= {"2", "-15"}, f"rank exit codes {codes}: {out[-3000:]}"
    assert not _our_tracebacks(out), out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"{len(errors)} error lines: {out[-3000:]}"
    figure("line", repr(errors[0][:160]))
    if CUDA:
        assert "share" in errors[0].lower() and "GPU" in errors[0], errors[0]
    # the same two ranks started by hand with torchrun's variables: each process's own exit code
    port = free_port()
    procs = [start(["-m", "ddp.train", *QUIET, "dist.backend=nccl"], tmp_path, RANK=str(r), LOCAL_RANK=str(r),
                   WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port)) for r in (0, 1)]
    results = [finish(proc, timeout=60) for proc in procs]
    figure("by_hand_exits", ",".join(str(r.returncode) for r in results))
    assert [r.returncode for r in results] == [2, 2], f"exit codes {[r.returncode for r in results]}: " + \
        " | ".join(tail(r, 1500) for r in results)
    both = "".join(console(r) for r in results)
    assert "Traceback" not in both, both[-3000:]
    assert len([line for line in both.splitlines() if line.startswith("error:")]) == 1, both[-3000:]
    if CUDA:
        assert sum("share" in line.lower() for line in both.splitlines()) == 1, both[-3000:]


@limit(150)
def test_g_two_ranks_one_gpu_auto_gloo(tmp_path, figure):
    done = train(tmp_path, "train.epochs=2", ranks=2, timeout=140)
    out = console(done)
    assert done.returncode == 0, out[-3000:]
    backend, device = placement(out)
    figure("backend", backend)
    figure("device", device)
    figure("acc", f"{final_acc(version(tmp_path)):.4f}")
    assert (backend, device) == ("gloo", "cpu")
    if CUDA:
        warnings = [line for line in out.splitlines() if "WARNING" in line and "GPU" in line]
        assert warnings, "no WARNING line saying why the ranks train on the CPU:\n" + out[-3000:]
        assert any("gloo" in line.lower() or "cpu" in line.lower() for line in warnings), warnings
        figure("warning", repr(warnings[0][-160:]))


# ---------------------------------------------------------------- e. compile, channels_last, sync_bn at world 1

@limit(240)
@pytest.mark.parametrize("option", ["channels_last", "sync_bn", "compile"])
def test_e_training_options_world1(tmp_path, figure, option):
    overrides = {
        "channels_last": ("train.channels_last=true", f"train.epochs={smoke(3, 1)}"),
        # at world 1 SyncBatchNorm is not converted (nothing to synchronise): this checks the flag on a GPU run
        "sync_bn": ("dist.sync_bn=true", "model.name=tests.gpu.bn_cnn:DigitsBN", f"train.epochs={smoke(3, 1)}"),
        # 40 steps, all full batches of the first epoch: one compilation, no dynamic-shape recompile
        "compile": ("train.compile=true", "train.epochs=1", f"train.max_steps={smoke(40, 20)}"),
    }[option]
    done = train(tmp_path, *overrides, ranks=1, timeout=230)
    assert done.returncode == 0, tail(done)
    backend, device = placement(console(done))
    records = epochs(version(tmp_path))
    acc = final_acc(version(tmp_path))
    figure("acc", f"{acc:.4f}")
    figure("device", device)
    figure("epoch1_s", f"{records[0]['epoch_time_s']:.1f}")
    assert device == DEVICE
    assert acc >= smoke(0.5 if option == "compile" else 0.8, 0.3)  # chance is 0.1


# ---------------------------------------------------------------- h. speed ratios (recorded, not asserted)

@limit(240)
def test_h_speed_ratios(tmp_path, figure):
    """Interleaved rounds (order alternating), medians of per-round ratios, images/s by ``bench.measure``'s
    rule. ours = ``torchrun --nproc_per_node=1 -m ddp.train`` (one rank: no wrapper, in-memory batches on
    the GPU); hand = tests/gpu/hand_loop.py, the tutorial loop (bench/minimal_ddp.py) on the GPU, which
    runs a plain-module segment and a DDP-at-world-1 segment in one process, order alternating."""
    from bench.measure import read_steps, throughput
    from bench.runners import OURS, launch, run_environment
    from bench.workloads import BATCH_SIZE, Workload

    steps, rounds = smoke(300, 8), int(os.environ.get("GPU_CHECK_ROUNDS", smoke(3, 1)))
    count = steps * BATCH_SIZE + 512
    workload = Workload("resnet18", "ResNet-18 (synthetic 3×32×32)", "resnet18", "synthetic", (3, 32, 32),
                        max_steps=steps, epochs=1, quick_max_steps=steps, quick_epochs=1, synthetic_train=count)
    results = []
    for index in range(rounds):
        round_dir, measured = tmp_path / f"round{index}", {}
        hand_order = "none,ddp" if index % 2 == 0 else "ddp,none"

        def ours():
            done = launch(OURS, workload, 1, False, round_dir / "ours", timeout=150 * SLOW)
            measured["ours"] = throughput(read_steps(done.steps), BATCH_SIZE)

        def hand():
            (round_dir / "hand").mkdir(parents=True)
            done = run([str(HERE / "hand_loop.py"), "--model", "resnet18", "--shape", "3,32,32", "--train", str(count),
                        "--steps", str(steps), "--order", hand_order, "--out", str(round_dir / "hand")],
                       round_dir / "hand", ranks=1, timeout=150, OMP_NUM_THREADS=run_environment(1)["OMP_NUM_THREADS"])
            assert done.returncode == 0, tail(done)
            for side in ("none", "ddp"):
                measured[side] = throughput(read_steps(round_dir / "hand" / f"{side}.jsonl"), BATCH_SIZE)

        for side in ((ours, hand) if index % 2 == 0 else (hand, ours)):
            side()
        results.append(measured)
        print(f"round {index + 1}: " + ", ".join(f"{k} {v:,.0f} img/s" for k, v in measured.items()))

    def ratio(a: str, b: str) -> str:
        values = [r[a] / r[b] for r in results]
        return f"{statistics.median(values):.3f}[{min(values):.3f}-{max(values):.3f}]"

    figure("ours/hand_none", ratio("ours", "none"))
    figure("ours/hand_ddp", ratio("ours", "ddp"))
    figure("ddp/none", ratio("ddp", "none"))
    figure("img_s", "/".join(f"{statistics.median(r[k] for r in results):,.0f}" for k in ("ours", "none", "ddp"))
           + "(ours/none/ddp)")
    figure("rounds", rounds)
    if RESULTS:
        Path(RESULTS).with_name("gpu_check_speed.json").write_text(json.dumps(
            {"workload": workload.title, "batch": BATCH_SIZE, "steps": steps, "rounds": results}, indent=1) + "\n")
    assert all(v > 0 for r in results for v in r.values()) and len(results) == rounds
