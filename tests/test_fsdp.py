"""dist.parallel=fsdp on real Gloo ranks: FSDP2 equals one process with the global batch, resumes
exactly, at the same and at another world size, from its sharded checkpoints and from DDP's files
(and DDP from its), and refuses what it cannot run in one line.

Kept to three spawned jobs (2, 4, then 2 ranks) that run several trainings each: process start-up,
not training, is what costs here.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ddp.checkpoint import files
from ddp.cluster.environment import ClusterEnv, SingleProcessEnv
from ddp.config import Parallel, load_recipe
from ddp.errors import DDPError
from ddp.model.sharding import find_blocks
from ddp.model.zoo import digits_cnn, resnet18
from tests.harness import free_port, run_cli, spawn_ranks

GLOBAL_BATCH = 64
COMMON = ["log.tensorboard=false", "log.progress=false", "optim.schedule=none",  # lr fixed: runs of other lengths agree
          "data.eval_batch_size=179"]  # 359 test digits: 2 batches on rank 0, 1 on rank 1 (lockstep evaluation)
MLP = ["model.name=mnist_mlp", "data.name=synthetic", "data.synthetic_shape=[1,8,8]", "data.synthetic_train=256",
       "data.synthetic_test=64", "train.accumulate=2", "model.freeze=[1.*]", "model.unfreeze_after_epochs=1",
       "train.epochs=2"]  # 8 optimizer steps per epoch at a global batch of 16 × 2 micro-batches


def _digits(run_dir, batch: int, steps: int, *extra: str):
    return load_recipe(None, [f"data.batch_size={batch}", f"train.max_steps={steps}", f"run.dir={run_dir}",
                              "checkpoint.keep=20", *COMMON, *extra])


def _mlp(run_dir, batch: int, clip: float, *extra: str):
    return load_recipe(None, [f"data.batch_size={batch}", f"train.clip_grad_norm={clip}", f"run.dir={run_dir}",
                              *COMMON, *MLP, *extra])


def _numpy(state_dict) -> dict[str, np.ndarray]:
    return {name: tensor.numpy() for name, tensor in state_dict.items()}


def _own_loop(env, run_dir: str, parallel: str) -> tuple[dict[str, np.ndarray], dict]:
    """A loop of your own on ``ddp.run.Run`` with a BatchNorm model initialised differently on each
    rank: the optimizer made before ``prepare`` (which shards the model under FSDP), an exact
    ``evaluate`` on 33 samples (2 batches on rank 0, 1 on rank 1), a ``save``. Returns the final
    weights and buffers and the last logged record."""
    from torch.nn import functional as F
    from torch.utils.data import TensorDataset

    from ddp.checkpoint.full_state import whole_weights
    from ddp.cluster.devices import Devices, Placement
    from ddp.run import Run

    generator = torch.Generator().manual_seed(1)
    train = TensorDataset(torch.randn(64, 8, generator=generator), torch.randint(0, 2, (64,), generator=generator))
    test = TensorDataset(torch.randn(33, 8, generator=generator), torch.randint(0, 2, (33,), generator=generator))
    torch.manual_seed(env.rank)  # prepare must start every rank from rank 0's weights
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    recipe = load_recipe(None, [f"dist.parallel={parallel}", "model.name=own", "data.name=own", "train.epochs=2",
                                f"run.dir={run_dir}", "log.tensorboard=false", "log.progress=false"])
    placement = Placement("gloo", torch.device("cpu"), "test")
    with Run(recipe, env, placement, Devices(False, 0), torch.get_num_threads()).open() as run:
        model, optimizer = run.prepare(model, optimizer)
        loader = run.loader(train, batch_size=32 // run.world_size)
        run.resume(model, optimizer)
        for epoch in run.epochs():
            for inputs, targets in loader:
                optimizer.zero_grad()
                F.cross_entropy(model(inputs), targets).backward()
                optimizer.step()
            run.log(epoch=epoch + 1, **run.evaluate(model, test, batch_size=16))
            run.save(model, optimizer)
        return _numpy(whole_weights(model)), dict(run.state.last_record)


def _fsdp_jobs(env, tmp: str, ports: list[int]):
    """Every training of the 2-rank job, in the same ranks (each on a new port): returns the final
    weights (and last epoch record) of each, by name."""
    from ddp.runner import execute

    world, out = env.world_size, {}
    batch = GLOBAL_BATCH // world
    plan = [("straight", _digits(f"{tmp}/straight", batch, 4, "dist.parallel=fsdp"))]
    if world == 4:
        plan += [("sharded@2", _digits(f"{tmp}/sharded", batch, 2, "dist.parallel=fsdp"))]  # 4 ranks' shards
    if world == 2:
        plan += [("fsdp@2", _digits(f"{tmp}/chain", batch, 2, "dist.parallel=fsdp")),  # stops, sharded checkpoint
                 ("fsdp@4", _digits(f"{tmp}/chain", batch, 4, "dist.parallel=fsdp",  # shards → FSDP, writes a file
                                    "checkpoint.format=file")),
                 ("ddp@5", _digits(f"{tmp}/chain", batch, 5, "dist.parallel=ddp")),  # FSDP file → DDP
                 ("fsdp@6", _digits(f"{tmp}/chain", batch, 6, "dist.parallel=fsdp")),  # DDP file → FSDP shards
                 ("mlp", _mlp(f"{tmp}/mlp", 16 // world, 0.05, "dist.parallel=fsdp")),
                 ("auto", _digits(f"{tmp}/auto", batch, 2, "dist.parallel=fsdp", "data.batch_size=auto",
                                  "memory.cache=''"))]  # no probe cache: each rank's trials
    for (name, recipe), port in zip(plan, ports):
        result = execute(recipe, replace(env, master_port=port))
        out[name] = (_numpy(result.state_dict), result.metrics)
    if world == 2:
        for parallel, port in zip(("fsdp", "ddp"), ports[-2:]):
            out[f"own {parallel}"] = _own_loop(replace(env, master_port=port), f"{tmp}/own_{parallel}", parallel)
    return out


def _resumes_at_2(env, tmp: str, ports: list[int]):
    """At 2 ranks: FSDP resumes 4 ranks' shards, DDP resumes one process's shards; FSDP and DDP
    save every step in the background (checkpoint.async_save)."""
    from ddp.runner import execute

    saving = ["checkpoint.every_steps=1", "checkpoint.async_save=true"]
    plan = [("fsdp 4→2", _digits(f"{tmp}/to2", GLOBAL_BATCH // 2, 3, "dist.parallel=fsdp")),
            ("ddp 1→2", _digits(f"{tmp}/to1", GLOBAL_BATCH // 2, 4, "dist.parallel=ddp")),
            ("async fsdp", _digits(f"{tmp}/async_fsdp", GLOBAL_BATCH // 2, 4, "dist.parallel=fsdp", *saving)),
            ("async ddp", _digits(f"{tmp}/async_ddp", GLOBAL_BATCH // 2, 4, "dist.parallel=ddp", *saving))]
    return {name: _numpy(execute(recipe, replace(env, master_port=port)).state_dict)
            for (name, recipe), port in zip(plan, ports)}


def _single(recipe) -> tuple[dict[str, np.ndarray], dict]:
    from ddp.runner import execute

    result = execute(recipe, SingleProcessEnv())
    return _numpy(result.state_dict), result.metrics


def _at_step(run_dir, step: int) -> dict[str, np.ndarray]:
    """The weights a checkpoint of a run in ``run_dir`` holds, read as a plain state_dict."""
    path = next(run_dir.glob(f"version_*/checkpoints/step-{step:08d}.pt"))
    return _numpy(torch.load(path, map_location="cpu", weights_only=True)["model"])


def _assert_close(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], what: str, atol: float = 1e-5) -> float:
    assert got.keys() == expected.keys(), what
    worst = max(float(np.abs(got[k] - expected[k]).max()) for k in expected)
    assert worst <= atol, f"{what}: max abs difference {worst:.3g} > {atol}"
    print(f"{what}: max abs difference {worst:.3g}")  # shown with pytest -s
    return worst


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process with the global batch: digits to step 6 (a checkpoint after every step), the
    first 4 steps alone (evaluated there), and the MLP with and without clipping."""
    tmp = tmp_path_factory.mktemp("single")
    digits, record4 = _single(_digits(tmp / "d4", GLOBAL_BATCH, 4))
    _single(_digits(tmp / "d6", GLOBAL_BATCH, 6, "checkpoint.every_steps=1"))
    mlp = _single(_mlp(tmp / "mlp", 16, 0.05, "dist.parallel=fsdp"))[0]  # one rank under fsdp: unwrapped
    unclipped = _single(_mlp(tmp / "free", 16, 0.0))[0]
    return {"digits@4": digits, "record@4": record4, "digits@3": _at_step(tmp / "d6", 3),
            "digits@5": _at_step(tmp / "d6", 5),
            "digits@6": _at_step(tmp / "d6", 6), "mlp": mlp, "unclipped": unclipped}


def test_fsdp_at_2_ranks_trains_resumes_and_shares_checkpoints_with_ddp(tmp_path, single):
    ranks = spawn_ranks(_fsdp_jobs, 2, str(tmp_path), [free_port() for _ in range(9)], init_group=False, timeout=180)
    runs = ranks[0]
    for name in runs:  # every rank ends with the same whole weights (BatchNorm statistics are each rank's own)
        weights = [k for k in runs[name][0] if "running_" not in k and "num_batches" not in k]
        for other in ranks[1:]:
            assert all(np.array_equal(other[name][0][k], runs[name][0][k]) for k in weights), name
    straight, record = runs["straight"]
    _assert_close(straight, single["digits@4"], "FSDP at 2 ranks vs one process")
    assert record["test_loss"] == pytest.approx(single["record@4"]["test_loss"], abs=1e-5)  # exact evaluation
    assert record["test_acc"] == single["record@4"]["test_acc"] and record["test_count"] == 359
    # resumed from its own checkpoint at step 2: the same weights as the run that never stopped
    assert all(np.array_equal(runs["fsdp@4"][0][k], straight[k]) for k in straight)
    _assert_close(runs["ddp@5"][0], single["digits@5"], "a DDP run resumed from an FSDP checkpoint")
    _assert_close(runs["fsdp@6"][0], single["digits@6"], "an FSDP run resumed from a DDP checkpoint")
    # accumulation, clipping that bites (the unclipped run ends elsewhere), freeze then unfreeze
    _assert_close(runs["mlp"][0], single["mlp"], "FSDP MLP, accumulate=2, clip_grad_norm=0.05")
    assert max(float(np.abs(single["mlp"][k] - single["unclipped"][k]).max()) for k in single["mlp"]) > 1e-3
    # your own loop with BatchNorm: FSDP (the optimizer made before run.prepare follows the shards)
    # trains and evaluates as DDP does, from rank 0's initial weights, with rank 0's buffers
    (fsdp, fsdp_record), (ddp, ddp_record) = runs["own fsdp"], runs["own ddp"]
    _assert_close(fsdp, ddp, "your own loop with BatchNorm: FSDP vs DDP at 2 ranks", atol=1e-6)
    assert fsdp_record["count"] == 33 and fsdp_record["loss"] == pytest.approx(ddp_record["loss"], abs=1e-6)
    assert (tmp_path / "own_fsdp" / "version_0" / "checkpoints" / "latest").is_file()
    # FSDP's file checkpoint (checkpoint.format=file) is a plain state_dict: it loads into the unwrapped model
    chain = next((tmp_path / "chain").glob("version_*/checkpoints"))
    model = digits_cnn((1, 8, 8), 10)
    model.load_state_dict(torch.load(chain / "step-00000004.pt", map_location="cpu", weights_only=True)["model"])
    assert (chain / "latest").read_text().strip() == "step-00000006.dcp"
    assert _export(chain.parent, tmp_path / "fsdp6.pt").keys() == straight.keys()
    # data.batch_size=auto under FSDP: each rank's trial steps sit on the sharded state; the agreed batch trained
    auto = next((tmp_path / "auto").glob("version_*"))
    probe = json.loads((auto / "memory_probe.json").read_text())
    assert [r["shards"] for r in probe["ranks"]] == [2, 2] and all('"parallel": "fsdp"' in r["cache_key"]
                                                                   for r in probe["ranks"])
    for rank in probe["ranks"]:
        parts = rank["estimate_mb"]
        sharded = sum(parts[k] for k in ("parameters", "gradients", "optimizer", "gathered", "data_on_device"))
        assert rank["probes"]["train"]["state_mb"] == pytest.approx(sharded, abs=0.01)
    assert f"batch_size: {probe['agreed']['batch_size']}\n" in (auto / "recipe.yaml").read_text()


def _export(run: Path, dest: Path) -> dict[str, np.ndarray]:
    """``python -m ddp.export`` of the run's latest checkpoint, read back with ``torch.load``."""
    from ddp.export import main as export_main

    assert export_main([str(run), str(dest)]) == 0
    return _numpy(torch.load(dest, map_location="cpu", weights_only=True))


def test_fsdp_at_4_ranks_equals_one_process_and_its_shards_resume_at_2_and_at_1(tmp_path, single):
    ranks = spawn_ranks(_fsdp_jobs, 4, str(tmp_path), [free_port() for _ in range(2)], init_group=False, timeout=180)
    _assert_close(ranks[0]["straight"][0], single["digits@4"], "FSDP at 4 ranks vs one process")
    assert all(np.array_equal(r["straight"][0][k], ranks[0]["straight"][0][k]) for r in ranks for k in r["straight"][0])
    shards = next((tmp_path / "sharded").glob("version_*/checkpoints"))
    assert sorted(p.name for p in (shards / "step-00000002.dcp").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp", "train_state.pt"]
    for copy in ("to1", "to2"):
        shutil.copytree(tmp_path / "sharded", tmp_path / copy)
    # 4 → 1: one process (FSDP at one rank trains unwrapped) continues from the 4 ranks' shards
    one, _ = _single(_digits(tmp_path / "to1", GLOBAL_BATCH, 3, "dist.parallel=fsdp"))
    _assert_close(one, single["digits@3"], "4 ranks' shards resumed by one process, step 3")
    # 4 → 2 under FSDP, and 1 → 2 under DDP (one process's shards, read whole by each rank)
    two = spawn_ranks(_resumes_at_2, 2, str(tmp_path), [free_port() for _ in range(4)], init_group=False,
                      timeout=120)[0]
    _assert_close(two["fsdp 4→2"], single["digits@3"], "4 ranks' shards resumed at 2 ranks, step 3")
    _assert_close(two["ddp 1→2"], single["digits@4"], "one process's shards resumed by DDP at 2 ranks, step 4")
    # the export of the 2 ranks' shards is those ranks' final weights, bit for bit
    exported = _export(tmp_path / "to2" / "version_0", tmp_path / "to2.pt")
    assert all(np.array_equal(exported[k], two["fsdp 4→2"][k]) for k in two["fsdp 4→2"])
    # saves in the background change nothing: the same weights, every checkpoint whole, the last one the final weights
    for parallel, suffix in (("fsdp", ".dcp"), ("ddp", ".pt")):
        weights = two[f"async {parallel}"]
        _assert_close(weights, single["digits@4"], f"{parallel} at 2 ranks saving every step in the background")
        checkpoints = tmp_path / f"async_{parallel}" / "version_0" / "checkpoints"
        assert [files.verify(checkpoints / f"step-{step:08d}{suffix}").step for step in (1, 2, 3, 4)] == [1, 2, 3, 4]
        assert (checkpoints / "latest").read_text().strip() == f"step-00000004{suffix}"
        last = _export(checkpoints.parent, tmp_path / f"async_{parallel}.pt")
        assert all(np.array_equal(last[k], weights[k]) for k in weights), parallel


# --- which blocks are sharded ----------------------------------------------------------------

class TwoLayers(nn.Module):  # a user model without containers: its children with parameters
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.act, self.head = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)


def test_default_blocks_are_the_elements_of_the_outermost_containers():
    assert [type(m).__name__ for m in find_blocks(digits_cnn((1, 8, 8), 10))] == ["Conv2d", "Conv2d", "Linear",
                                                                                  "Linear"]
    resnet = resnet18((3, 32, 32), 10)
    assert [type(m).__name__ for m in find_blocks(resnet)] == ["BasicBlock"] * 8  # stem and head stay in the root
    assert [type(m).__name__ for m in find_blocks(TwoLayers())] == ["Linear", "Linear"]
    named = find_blocks(resnet, ("BasicBlock", "Conv2d"))
    assert len(named) == 8 + 20 and all(type(m).__name__ == "Conv2d" for m in named[:16])  # inner ones first


def test_fsdp_runs_on_many_ranks_each_on_its_own_gpu():
    from ddp.cluster.devices import Devices, check_parallel, place
    from ddp.cluster.environment import TorchrunEnv

    rank3 = TorchrunEnv(rank=3, local_rank=3, world_size=4, local_world_size=4)
    check_parallel(Parallel.fsdp, rank3)  # not refused, unlike dp and none
    assert place("nccl", Parallel.fsdp, rank3, Devices(True, 4)).device == torch.device("cuda", 3)  # the mesh's device


def test_on_gpus_the_mesh_is_cuda_on_the_rank_device_with_the_asked_policies(monkeypatch):
    """The GPU path without a GPU: torch's entry points faked, what shard_model asks of them checked."""
    import torch.distributed.device_mesh as device_mesh
    import torch.distributed.fsdp as fsdp

    from ddp.config import Precision
    from ddp.model import sharding

    calls: dict = {"shard": [], "events": []}
    real_to = torch.Tensor.to

    def to(tensor, *args, **kwargs):  # the host → GPU copy: recorded, the tensor stays where it is
        if args and isinstance(args[0], torch.device) and args[0].type == "cuda":
            calls["events"].append(("to", args[0], tensor.numel()))
            return tensor
        return real_to(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.setdefault("device", device))
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    monkeypatch.setattr(device_mesh, "init_device_mesh", lambda kind, shape: calls.setdefault("mesh", (kind, shape)))

    def shard(module, **options):
        calls["shard"].append((module, options))
        calls["events"].append(("shard", module))

    monkeypatch.setattr(fsdp, "fully_shard", shard)
    monkeypatch.setattr(sharding, "_from_rank0", lambda tensors: calls["events"].append(("broadcast", len(tensors))))
    model = digits_cnn((1, 8, 8), 10)
    plan = sharding.ShardPlan(cpu_offload=True, precision=Precision.bf16)
    sharding.shard_model(model, torch.device("cuda", 2), plan)
    assert calls["device"] == torch.device("cuda", 2) and calls["mesh"] == ("cuda", (4,))
    assert [module for module, _ in calls["shard"]] == [*find_blocks(model), model]  # the blocks, then the root
    # each block goes to the GPU just before it is sharded, never the whole model at once
    expected = []
    for block in find_blocks(model):
        expected += [("to", torch.device("cuda", 2), p.numel()) for p in block.parameters()]
        expected += [("broadcast", len(list(block.parameters()))), ("shard", block)]
    assert calls["events"] == [*expected, ("broadcast", 0), ("shard", model)]
    options = calls["shard"][0][1]
    assert isinstance(options["offload_policy"], fsdp.CPUOffloadPolicy)
    assert options["mp_policy"].param_dtype == torch.bfloat16 and options["mp_policy"].reduce_dtype == torch.float32
    assert [o["reshard_after_forward"] for _, o in calls["shard"]] == [True] * 4 + [False]


def test_the_whole_parameters_an_optimizer_made_before_holds_are_freed_as_each_block_is_sharded(monkeypatch):
    """fully_shard registers its own (copied) shards; the whole parameters an optimizer made before
    still holds must not keep their data (on a GPU: every whole block) until repoint_optimizer."""
    from ddp.model import sharding

    model = digits_cnn((1, 8, 8), 10)
    held = list(model.parameters())  # what an optimizer made before sharding holds
    blocks = [{id(p) for p in block.parameters()} for block in find_blocks(model)]  # before sharding
    freed_before: list[set[int]] = []  # at each fully_shard call, the held parameters already freed

    def shard(module, **options):  # FSDP2 replaces each parameter by a shard it copied
        freed_before.append({id(p) for p in held if p.numel() == 0})
        for owner in module.modules():
            for name, param in list(owner._parameters.items()):
                if param is not None and any(param is h for h in held):
                    owner._parameters[name] = nn.Parameter(param.detach().reshape(-1)[:1].clone())

    _two_ranks_faked(monkeypatch, shard)
    sharding.shard_model(model, torch.device("cpu"), sharding.ShardPlan())
    expected = [set().union(*blocks[:k]) for k in range(len(blocks) + 1)]
    assert freed_before == expected  # each block freed before the next is sharded, the root last
    assert all(p.numel() == 0 for p in held)
    assert all(p.numel() == 1 for p in model.parameters())  # the model holds the shards


def _two_ranks_faked(monkeypatch, shard) -> None:
    """shard_model as on rank 0 of 2, with ``shard`` for fully_shard and no mesh or broadcast."""
    import torch.distributed.device_mesh as device_mesh
    import torch.distributed.fsdp as fsdp

    from ddp.model import sharding

    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(device_mesh, "init_device_mesh", lambda kind, shape: None)
    monkeypatch.setattr(fsdp, "fully_shard", shard)
    monkeypatch.setattr(sharding, "_from_rank0", lambda tensors: None)


@pytest.mark.parametrize("rank", [0, 1])
def test_ddp_options_changed_under_fsdp_are_named_once_as_unused(monkeypatch, caplog, rank):
    from ddp.cluster import comm
    from ddp.cluster.devices import Devices
    from ddp.model.parallel import changed_ddp_options, wrap_for_recipe

    recipe = load_recipe(None, ["dist.parallel=fsdp", "dist.static_graph=true", "dist.bucket_cap_mb=10"])
    _two_ranks_faked(monkeypatch, lambda module, **options: None)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank)
    monkeypatch.setattr(comm, "world_size", lambda: 2)
    with caplog.at_level("WARNING", logger="ddp.model.sharding"):
        wrap_for_recipe(digits_cnn((1, 8, 8), 10), recipe, torch.device("cpu"), Devices(False, 0))
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == ([] if rank else ["dist.bucket_cap_mb=10, dist.static_graph=true: options of "
                                     "DistributedDataParallel, unused under dist.parallel=fsdp (remove them, or use "
                                     "dist.parallel=ddp)"])
    assert changed_ddp_options(load_recipe(None, ["dist.parallel=fsdp"]).dist) == ()  # the defaults: nothing said


# --- refusals -------------------------------------------------------------------------------

REFUSED = [
    (["dist.fsdp_cpu_offload=true"], "dist.fsdp_cpu_offload=true keeps GPU training's shards in host memory",
     "set dist.fsdp_cpu_offload=false on CPU ranks"),
    (["dist.sync_bn=true"], "dist.sync_bn=true is not supported with dist.parallel=fsdp", "dist.parallel=ddp"),
    (["train.channels_last=true"], "FSDP shards only contiguous parameters", "set train.channels_last=false"),
    (["dist.fsdp_blocks=[Block]"], "dist.fsdp_blocks names ['Block'], which no module of this model is",
     "'Conv2d', 'Linear'"),
]


@pytest.mark.parametrize("overrides, problem, hint", REFUSED)
def test_refused_before_the_process_group_forms(tmp_path, overrides, problem, hint):
    from ddp.runner import prepare

    recipe = load_recipe(None, ["dist.parallel=fsdp", f"run.dir={tmp_path}",
                                f"dist.threads_per_rank={torch.get_num_threads()}", *overrides])
    two_ranks = ClusterEnv(rank=0, local_rank=0, world_size=2, local_world_size=2, master_port=free_port())
    with pytest.raises(DDPError) as refused:
        prepare(recipe, two_ranks)  # forms no group: a refusal here needs no peer
    assert refused.value.exit_code == 2 and problem in refused.value.problem and hint in refused.value.hint
    assert not any(tmp_path.iterdir())


def test_cli_refusal_is_one_line_exit_2(tmp_path):
    done = run_cli(["-m", "ddp.train", "dist.parallel=fsdp", "dist.fsdp_blocks=[Block]"], cwd=tmp_path, timeout=60,
                   RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "Traceback" not in done.stderr
    assert "error: dist.fsdp_blocks names ['Block']" in done.stderr
    assert not (tmp_path / "runs").exists()
