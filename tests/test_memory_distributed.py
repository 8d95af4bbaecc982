"""Memory probes across real ranks: one agreement, no deadlock when only some ranks run out."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ddp.config import load_recipe
from tests.harness import run_torchrun, spawn_ranks


def _probe_and_agree(env, caps, budgets):
    """Rank r probes a small MLP on a simulated device that runs out of memory above ``caps[r]``
    samples, with a budget sized for ``budgets[r]`` samples; agrees with the others, then both run
    a DDP step at the agreed size."""
    from bench.simulated_memory import SimulatedDevice
    from ddp.memory.agree import agree
    from ddp.memory.estimate import estimate_state
    from ddp.memory.trials import probe_model
    from ddp.model.zoo import mnist_mlp

    torch.manual_seed(0)
    device = SimulatedDevice(cap=budgets[env.rank], oom_above=caps[env.rank], seed=env.rank)
    model = device.attach(mnist_mlp((1, 4, 4), 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    estimate = estimate_state(model, "sgd", 0.9)
    try:
        results = probe_model(model, optimizer, (1, 4, 4), 10, device, estimate.state + device.budget(),
                              {"train": 10**6}, estimate)
        mine, error = {"train": results["train"].pick}, None
        trials = [(t.batch, t.reading is None) for t in results["train"].search.trials]
    except Exception as err:  # noqa: BLE001 - handed to agree, as the session does
        mine, error, trials = None, err, []
    try:
        agreed, _ = agree(mine, error, {})
    except Exception as err:  # noqa: BLE001 - every rank must see the same refusal
        return {"error": str(err), "trials": trials}
    ddp = nn.parallel.DistributedDataParallel(nn.Linear(16, 10))  # both ranks carry on together
    ddp(torch.randn(agreed["train"], 16)).sum().backward()
    return {"agreed": agreed["train"], "mine": mine["train"], "trials": trials}


def test_two_ranks_with_different_caps_agree_on_the_smaller_pick():
    out = spawn_ranks(_probe_and_agree, 2, [3000, 800], [3000, 800], timeout=90)
    assert out[0]["agreed"] == out[1]["agreed"] == min(out[0]["mine"], out[1]["mine"]) == out[1]["mine"]
    assert 0.95 * 800 <= out[1]["mine"] <= 800 and 0.95 * 3000 <= out[0]["mine"] <= 3000


def test_only_one_rank_out_of_memory_no_deadlock_both_continue():
    # rank 0 is limited by its budget (no OOM); rank 1's budget promises 2,000 but its device stops at 500
    out = spawn_ranks(_probe_and_agree, 2, [10**6, 500], [1000, 2000], timeout=90)
    assert not any(oom for _, oom in out[0]["trials"])
    assert any(oom for _, oom in out[1]["trials"])
    assert out[0]["agreed"] == out[1]["agreed"] == out[1]["mine"]
    assert 0.9 * 500 <= out[1]["mine"] <= 500 and 0.95 * 1000 <= out[0]["mine"] <= 1000


def test_a_refusal_on_one_rank_stops_every_rank_with_its_message():
    out = spawn_ranks(_probe_and_agree, 2, [1000, 0], [1000, 1000], timeout=90)  # rank 1: batch 1 fails
    for rank in (0, 1):
        assert "rank 1: data.batch_size=auto: the model needs" in out[rank]["error"]
        assert "out of memory at batch 1" in out[rank]["error"]


@pytest.mark.timeout(240)
def test_auto_trains_the_default_recipe_to_97_percent_on_2_ranks(tmp_path):
    done = run_torchrun(2, ["-m", "ddp.train", "data.batch_size=auto", "memory.budget_mb=12", "train.epochs=15",
                            "log.tensorboard=false"], cwd=tmp_path, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "digits" / "version_0"
    probe = json.loads((run_dir / "memory_probe.json").read_text())
    size = probe["agreed"]["batch_size"]
    assert probe["source"] == "probe" and len(probe["ranks"]) == 2
    assert load_recipe(run_dir / "recipe.yaml").data.batch_size == size and 1 <= size <= 719
    assert "memory probe on cpu" in done.stderr and "← pick" in done.stderr
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [e for e in epochs if e["kind"] == "epoch"][-1]
    print(f"auto batch size {size} per rank: test accuracy {last['test_acc']:.4f}")
    assert last["test_acc"] >= 0.97


def _publish_fails_on_rank_0(env, root, cache):
    """Both ranks probe and agree; rank 0 then cannot write memory_probe.json (the run dir lies
    under a regular file). Each rank reports what happened, and when."""
    import time
    from pathlib import Path
    from types import SimpleNamespace

    from ddp.cluster import comm
    from ddp.data.datasets import load_digits
    from ddp.memory.resolve import resolve_batch_sizes
    from ddp.model.zoo import digits_cnn
    from ddp.lifecycle.run_dir import RunDir

    recipe = load_recipe(None, ["data.batch_size=auto", "memory.budget_mb=40", f"memory.cache={cache}"])
    splits = load_digits(recipe.data)
    plan = SimpleNamespace(splits=splits, device=torch.device("cpu"), model=digits_cnn(splits.shape, splits.classes))
    try:
        resolve_batch_sizes(recipe, env, plan, RunDir(Path(root)), checkpoint=None)
        comm.barrier()  # the session's next collective
        outcome = "returned"
    except Exception as err:  # noqa: BLE001 - compared across ranks
        outcome = f"{type(err).__name__}: {err}"
    return {"outcome": outcome, "at": time.time()}


def test_a_publish_failure_on_rank_0_is_raised_on_every_rank_at_once(tmp_path):
    (tmp_path / "not_a_dir").write_text("")
    out = spawn_ranks(_publish_fails_on_rank_0, 2, str(tmp_path / "not_a_dir" / "run"), str(tmp_path / "cache.json"),
                      timeout=120)
    assert out[0]["outcome"] == out[1]["outcome"], out
    assert "memory probe's results failed on rank 0" in out[1]["outcome"] and "not_a_dir" in out[1]["outcome"]
    assert abs(out[1]["at"] - out[0]["at"]) < 10  # at once, not after the 60 s collective timeout
