"""Training options: accumulation, clipping, label smoothing, weight-decay groups."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ddp.runner import execute
from ddp.train import main
from tests.harness import spawn_ranks
from tests.test_recipes import _final_checkpoint


# ---------------------------------------------------------------- training options

def _one_step_change(in_tmp: Path, *extra: str) -> float:
    """Norm of the weight change after one SGD step without momentum or weight decay."""
    from ddp.config import load_recipe
    from ddp.model.registry import build_model
    from ddp.data.datasets import build_datasets
    from ddp.engine.seeding import seed_everything

    name = "clip" + str(len(list((in_tmp / "runs").glob("*"))) if (in_tmp / "runs").exists() else 0)
    overrides = ["train.max_steps=1", "train.epochs=1", "optim.momentum=0", "optim.weight_decay=0",
                 "optim.schedule=none", "optim.lr=0.5", "log.progress=false", "log.tensorboard=false",
                 f"run.name={name}", *extra]
    assert main(overrides) == 0
    recipe = load_recipe(None, overrides)
    seed_everything(0, False)
    initial = build_model(recipe.model, build_datasets(recipe.data)).state_dict()
    trained = _final_checkpoint(in_tmp / "runs" / name)["model"]
    return torch.sqrt(sum(((trained[k] - initial[k]) ** 2).sum() for k in initial)).item()


def test_clip_grad_norm_bounds_the_step(in_tmp):
    free = _one_step_change(in_tmp)
    clipped = _one_step_change(in_tmp, "train.clip_grad_norm=0.01")
    assert clipped == pytest.approx(0.5 * 0.01, rel=1e-3)  # lr × the clipped global norm
    assert free > 10 * clipped


def test_label_smoothing_reaches_the_loss():
    from ddp.model.registry import build_loss
    from ddp.config import TrainConfig

    confident = torch.tensor([[20.0, -20.0, -20.0]])
    target = torch.tensor([0])
    assert build_loss(TrainConfig())(confident, target).item() < 1e-6
    assert build_loss(TrainConfig(label_smoothing=0.3))(confident, target).item() > 5  # 0.2 of the mass on -20s


@pytest.mark.parametrize("decay_all", [False, True])
def test_no_weight_decay_on_biases_and_norms_unless_asked(decay_all):
    from torch import nn

    from ddp.config import OptimConfig
    from ddp.model.optim import build_optimizer

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    nn.init.constant_(model[0].bias, 1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, OptimConfig(lr=1.0, momentum=0.0, weight_decay=0.5,
                                                   decay_norms_and_biases=decay_all))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # with zero gradients, only weight decay moves a parameter: p ← p × (1 − lr × wd)
    after = model.state_dict()
    assert torch.allclose(after["0.weight"], before["0.weight"] * 0.5)
    for name in ("0.bias", "1.weight", "1.bias"):
        expected = before[name] * 0.5 if decay_all else before[name]
        assert torch.equal(after[name], expected), name


# ---------------------------------------------------------------- gradient accumulation

def _accumulated(env, tmp: str, batch: int, accumulate: int):
    """Train 3 optimizer steps; return the final weights and how many gradient all-reduces DDP made."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from ddp import runner
    from ddp.config import load_recipe

    calls = []
    original = runner.wrap_for_recipe

    def counting(model, *args, **kwargs):
        wrapped = original(model, *args, **kwargs)
        if hasattr(wrapped, "register_comm_hook"):
            wrapped.register_comm_hook(None, lambda state, bucket: calls.append(1) or allreduce_hook(None, bucket))
        return wrapped

    runner.wrap_for_recipe = counting
    recipe = load_recipe(None, [f"data.batch_size={batch}", f"train.accumulate={accumulate}", "train.max_steps=3",
                                f"run.dir={tmp}", "log.tensorboard=false", "log.progress=false"])
    try:
        result = execute(recipe, env)
    finally:
        runner.wrap_for_recipe = original
    return {k: v.numpy() for k, v in result.state_dict.items()}, len(calls)


def test_k_micro_steps_on_n_ranks_equal_one_step_with_the_full_batch(tmp_path):
    """2 ranks × 4 samples × 2 micro-steps == 1 process × 16 samples, for 3 optimizer steps; DDP
    all-reduces once per optimizer step (digits_cnn fits one gradient bucket), not per micro-step."""
    from ddp.cluster.environment import SingleProcessEnv

    ranks = spawn_ranks(_accumulated, 2, str(tmp_path / "acc"), 4, 2, init_group=False)
    single, _ = _accumulated(SingleProcessEnv(), str(tmp_path / "single"), 16, 1)
    for name, expected in single.items():
        np.testing.assert_allclose(ranks[0][0][name], expected, rtol=0, atol=1e-6, err_msg=name)
        assert np.array_equal(ranks[1][0][name], ranks[0][0][name]), name
    assert [syncs for _, syncs in ranks] == [3, 3]


# ---------------------------------------------------------------- mixed precision

def test_bf16_on_cpu_learns_the_digits(in_tmp):
    assert main(["train.precision=bf16", "train.epochs=2", "log.progress=false", "log.tensorboard=false",
                 "run.name=bf16"]) == 0
    import json

    lines = (in_tmp / "runs/bf16/version_0/metrics.jsonl").read_text().splitlines()
    last = [r for r in map(json.loads, lines) if r["kind"] == "epoch"][-1]
    assert last["test_acc"] > 0.8  # chance is 0.1


def test_fp16_on_a_cpu_is_refused_in_one_line(in_tmp, capsys):
    assert main(["train.precision=fp16", "dist.backend=gloo"]) == 2
    err = capsys.readouterr().err
    assert "train.precision=fp16 needs a CUDA device" in err and "bf16" in err and err.count("\n") == 1
    assert not (in_tmp / "runs").exists()


class RecordingScaler(torch.amp.GradScaler):
    """torch's own GradScaler (it runs on CPU too) standing in for the CUDA one: records each call."""

    def __init__(self):
        super().__init__("cpu", init_scale=1024.0)
        self.calls = []

    def scale(self, outputs):
        self.calls.append("scale")
        return super().scale(outputs)

    def unscale_(self, optimizer):
        self.calls.append("unscale_")
        return super().unscale_(optimizer)

    def step(self, optimizer, *args, **kwargs):
        self.calls.append("step")
        return super().step(optimizer, *args, **kwargs)

    def update(self, new_scale=None):
        self.calls.append("update")
        return super().update(new_scale)


def test_fp16_steps_go_through_the_scaler_unscaled_before_clipping(monkeypatch):
    """The fp16 path on a real GradScaler: loss scaled before backward, gradients unscaled, then
    clipped (the clip sees the true gradient norm, ~1000× smaller than the scaled one), then the
    step taken by the scaler and update: the step is lr × the clip value along the true gradient."""
    from torch import nn

    from ddp.config import load_recipe
    from ddp.engine.trainer import Trainer, TrainParts

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    inputs, targets = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    nn.functional.cross_entropy(model(inputs), targets).backward()
    true_grads = [p.grad.clone() for p in model.parameters()]
    true_norm = torch.sqrt(sum((g ** 2).sum() for g in true_grads)).item()
    clip = 0.01
    assert true_norm > 10 * clip  # the clip really clips
    model.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.parameters()]

    scaler = RecordingScaler()
    clip_norms = []
    original_clip = nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        scaler.calls.append("clip")
        clip_norms.append(torch.sqrt(sum((p.grad ** 2).sum() for p in parameters)).item())
        return original_clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(nn.utils, "clip_grad_norm_", recording_clip)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0)
    parts = TrainParts(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), None, None,
                       torch.device("cpu"), scaler=scaler)
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.parts, trainer._group, trainer._classifies = \
        load_recipe(None, [f"train.clip_grad_norm={clip}"]), parts, (0, 1), True
    trainer._prime = False  # not a resumed run
    trainer._run_batch(inputs, targets, torch.zeros(3, dtype=torch.float64))
    assert scaler.calls == ["scale", "unscale_", "clip", "step", "update"]
    assert clip_norms == [pytest.approx(true_norm, rel=1e-5)]  # the clip saw the true gradients, not ×1024
    for param, start, grad in zip(model.parameters(), before, true_grads):
        # the step actually taken: lr × clip along the true gradient (not clipped to clip/1024)
        torch.testing.assert_close(param.detach(), start - 1.0 * grad * (clip / true_norm), rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- SyncBatchNorm

def test_sync_bn_converts_every_batchnorm_and_keeps_the_checkpoint_keys():
    from torch import nn

    from ddp.model.zoo import cifar_resnet18
    from ddp.model.parallel import convert_sync_bn

    model = cifar_resnet18((3, 32, 32), 10)
    keys = list(model.state_dict())
    converted = convert_sync_bn(model, True, world_size=2)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == 20
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert list(converted.state_dict()) == keys  # checkpoints load either way
    assert convert_sync_bn(model, True, world_size=1) is model  # one rank: nothing to synchronise


def test_sync_bn_on_cpu_ranks_is_refused_before_the_group_forms(tmp_path):
    """DDP itself refuses SyncBatchNorm on CPU modules ("only work with GPU modules"): say so up front."""
    from tests.harness import run_torchrun

    done = run_torchrun(2, ["-m", "ddp.train", "dist.sync_bn=true", "train.max_steps=1"], cwd=tmp_path, timeout=120)
    assert done.returncode != 0
    assert done.stderr.count("dist.sync_bn=true needs CUDA devices") == 1, done.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- one-cycle schedule

def test_onecycle_follows_torchs_one_cycle_lr():
    from ddp.config import OptimConfig, Schedule
    from ddp.model.optim import build_scheduler

    total = 50
    ours_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4)
    ours = build_scheduler(ours_opt, OptimConfig(lr=0.4, schedule=Schedule.onecycle), 10, total)
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4)
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.4, total_steps=total, cycle_momentum=False)
    for _ in range(total):
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        ours_opt.step(), ref_opt.step(), ours.step(), ref.step()


# ---------------------------------------------------------------- torch.compile and channels_last opt-ins

def test_compile_and_channels_last_reach_the_model(in_tmp, monkeypatch):
    """torch.compile is faked (compiling on this CPU takes minutes): called once on the wrapped model;
    with channels_last the conv weights and every training batch are NHWC."""
    from torch import nn

    compiled, layouts = [], []

    def fake_compile(model, *args, **kwargs):
        compiled.append(model)
        model.register_forward_pre_hook(
            lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    assert main(["train.compile=true", "train.channels_last=true", "train.max_steps=3", "train.epochs=1",
                 "log.progress=false", "log.tensorboard=false", "run.name=cl"]) == 0
    assert len(compiled) == 1 and isinstance(compiled[0], nn.Module)
    conv = next(m for m in compiled[0].modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert layouts[:3] == [True, True, True]  # the 3 training batches (evaluation runs uncompiled)
