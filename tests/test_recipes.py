"""Every shipped recipe runs unchanged but for its size: a few steps on tiny data in the real
formats (idx files, pickled CIFAR batches, a folder of PNGs), some on 2 gloo ranks; and the
fine-tuning recipes freeze, replace the head and unfreeze as they say."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ddp.train import main
from tests.harness import REPO, run_torchrun
from tests.test_datasets import _mnist_images, _write_idx_images, _write_idx_labels, cifar_root  # noqa: F401
from tests.test_datasets import write_image_folder

RECIPES = REPO / "recipes"
SMALL = ["train.epochs=1", "train.max_steps=2", "log.tensorboard=false", "log.progress=false",
         "dist.threads_per_rank=1", "data.eval_batch_size=8", "dist.timeout_s=60"]


def _epochs(run_dir: Path) -> list[dict]:
    lines = (run_dir / "version_0" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "epoch"]


def _mnist_files(root: Path, count: int = 16) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx_images(raw / "train-images-idx3-ubyte", _mnist_images(count, offset=10))
    _write_idx_labels(raw / "train-labels-idx1-ubyte", torch.arange(count).numpy() % 10)
    _write_idx_images(raw / "t10k-images-idx3-ubyte", _mnist_images(6, offset=100))
    _write_idx_labels(raw / "t10k-labels-idx1-ubyte", torch.arange(6).numpy() % 10)
    return root


def fake_hub_weights(torch_home: Path, name: str = "resnet18") -> dict[str, torch.Tensor]:
    """torchvision's architecture with seeded random weights, saved where the hub cache keeps the
    real ImageNet file (same file name): stands in for the 45 MB download."""
    from torchvision.models import get_model, get_model_weights

    torch.manual_seed(123)
    state = get_model(name, weights=None).state_dict()
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / get_model_weights(name).DEFAULT.url.rsplit("/", 1)[-1])
    return state


def _check_finished(run_dir: Path, recipe: str, steps: int = 2) -> None:
    epochs = _epochs(run_dir)
    assert epochs[-1]["step"] == steps and epochs[-1]["test_loss"] == epochs[-1]["test_loss"]  # not NaN
    recorded = yaml.safe_load((run_dir / "version_0" / "recipe.yaml").read_text())
    assert recorded["model"]["name"] == yaml.safe_load((RECIPES / recipe).read_text())["model"]["name"]


@pytest.mark.parametrize("recipe", ["mnist_mlp.yaml", "synthetic.yaml"])
def test_recipe_on_two_gloo_ranks(recipe, tmp_path):
    data = ["data.root=" + str(_mnist_files(tmp_path / "data")), "data.batch_size=4"] if "mnist" in recipe else \
        ["data.synthetic_train=32", "data.synthetic_test=8", "data.batch_size=4"]
    done = run_torchrun(2, ["-m", "ddp.train", "--recipe", str(RECIPES / recipe), "run.name=smoke", *SMALL, *data],
                        cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_finished(tmp_path / "runs" / "smoke", recipe)


def test_mnist_cnn_recipe(in_tmp):
    assert main(["--recipe", str(RECIPES / "mnist_cnn.yaml"), "data.root=" + str(_mnist_files(in_tmp / "d")),
                 "data.batch_size=4", "run.name=smoke", *SMALL]) == 0
    _check_finished(in_tmp / "runs" / "smoke", "mnist_cnn.yaml")


@pytest.mark.parametrize("recipe", ["cifar10_cnn.yaml", "cifar10_resnet18.yaml"])
def test_cifar10_recipes(recipe, cifar_root, monkeypatch):  # noqa: F811 - the fixture
    root, _ = cifar_root
    monkeypatch.chdir(root)
    assert main(["--recipe", str(RECIPES / recipe), f"data.root={root}", "data.batch_size=4", "run.name=smoke",
                 "optim.warmup_steps=0", *SMALL]) == 0
    _check_finished(root / "runs" / "smoke", recipe)


def _finetune(tmp_path: Path, monkeypatch, recipe: str, *extra: str) -> Path:
    monkeypatch.chdir(tmp_path)
    images = write_image_folder(tmp_path / "images", per_class=4, size=20)
    assert main(["--recipe", str(RECIPES / recipe), f"data.root={images}", "data.image_size=32",
                 "data.batch_size=4", "run.name=smoke", *SMALL, *extra]) == 0
    return tmp_path / "runs" / "smoke"


def _final_checkpoint(run_dir: Path) -> dict:
    newest = sorted((run_dir / "version_0" / "checkpoints").glob("step-*.pt"))[-1]
    return torch.load(newest, map_location="cpu", weights_only=False)


def test_finetune_resnet18_freezes_the_backbone_and_trains_a_new_head(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    imagenet = fake_hub_weights(tmp_path / "torch_home")
    run_dir = _finetune(tmp_path, monkeypatch, "finetune_resnet18.yaml", "model.unfreeze_after_epochs=-1")
    _check_finished(run_dir, "finetune_resnet18.yaml")
    saved = _final_checkpoint(run_dir)
    weights = saved["model"]
    backbone = [k for k in imagenet if not k.startswith("fc.") and "running_" not in k and "num_batches" not in k]
    assert all(torch.equal(weights[k], imagenet[k]) for k in backbone)  # frozen: bitwise the cached weights
    assert weights["fc.weight"].shape == (2, 512)  # a new head for the folder's 2 classes

    from ddp.config import load_recipe
    from ddp.model.finetune import torchvision_model
    from ddp.engine.seeding import seed_everything

    seed_everything(0, False)
    initial_head = torchvision_model(load_recipe(RECIPES / "finetune_resnet18.yaml").model, 2).fc.weight
    assert not torch.equal(weights["fc.weight"], initial_head)  # the head trained
    assert sum(len(g["params"]) for g in saved["optimizer"]["param_groups"]) == 2  # fc.weight, fc.bias only


def test_finetune_resnet18_unfreezes_after_the_configured_epoch(tmp_path, monkeypatch):
    """unfreeze_after_epochs=1: the backbone is bitwise the cached weights after epoch 1 (while the
    head trained), and every backbone layer has moved after epoch 2."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    imagenet = fake_hub_weights(tmp_path / "torch_home")
    run_dir = _finetune(tmp_path, monkeypatch, "finetune_resnet18.yaml", "model.unfreeze_after_epochs=1",
                        "train.epochs=2", "train.max_steps=4", "data.batch_size=4")
    assert [e["step"] for e in _epochs(run_dir)] == [2, 4]
    checkpoints = run_dir / "version_0" / "checkpoints"
    after_1, after_2 = (torch.load(checkpoints / f"step-0000000{step}.pt", map_location="cpu",
                                   weights_only=False)["model"] for step in (2, 4))
    backbone = [k for k in imagenet if not k.startswith("fc.") and "running_" not in k and "num_batches" not in k]
    assert len(backbone) == 60
    changed_in_1 = [k for k in backbone if not torch.equal(after_1[k], imagenet[k])]
    assert changed_in_1 == []  # frozen through epoch 1
    from ddp.config import load_recipe
    from ddp.engine.seeding import seed_everything
    from ddp.model.finetune import torchvision_model

    seed_everything(0, False)
    initial_head = torchvision_model(load_recipe(RECIPES / "finetune_resnet18.yaml").model, 2).fc.weight
    assert not torch.equal(after_1["fc.weight"], initial_head)  # while the head trained
    unchanged_in_2 = [k for k in backbone if torch.equal(after_2[k], after_1[k])]
    assert unchanged_in_2 == []  # every backbone tensor trained in epoch 2


def test_pretrained_without_cached_weights_is_refused_never_a_random_init(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "images", per_class=1)
    assert main(["--recipe", str(RECIPES / "finetune_resnet18.yaml"), f"data.root={tmp_path / 'images'}"]) == 2
    err = capsys.readouterr().err
    assert "resnet18-f37072fd.pth is not in the torch hub cache" in err and "model.weights=" in err
    assert err.count("\n") == 1 and not (tmp_path / "runs").exists()


def test_model_weights_file_is_where_a_torchvision_model_starts_without_the_hub_cache(tmp_path, monkeypatch):
    """model.weights=<file> for resnet18 with an empty torch hub: the frozen backbone is bitwise the
    file's weights (not the hub's, not a random init)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    from torchvision.models import get_model

    torch.manual_seed(7)
    own = get_model("resnet18", weights=None).state_dict()
    torch.save(own, tmp_path / "mine.pth")
    run_dir = _finetune(tmp_path, monkeypatch, "finetune_resnet18.yaml", "model.unfreeze_after_epochs=-1",
                        f"model.weights={tmp_path / 'mine.pth'}", "train.max_steps=1")
    weights = _final_checkpoint(run_dir)["model"]
    backbone = [k for k in own if not k.startswith("fc.") and "running_" not in k and "num_batches" not in k]
    assert len(backbone) == 60 and all(torch.equal(weights[k], own[k]) for k in backbone)


def test_model_weights_file_is_where_your_own_model_starts_and_a_missing_one_is_refused(in_tmp, monkeypatch,
                                                                                       capsys):
    from ddp.engine.trainer import Trainer
    from ddp.model.parallel import unwrap_model
    from ddp.model.zoo import digits_cnn

    torch.manual_seed(7)
    own = digits_cnn((1, 8, 8), 10).state_dict()
    torch.save(own, in_tmp / "mine.pt")
    started = []
    original = Trainer._run_batch

    def first_batch(self, inputs, targets, sums):
        if not started:
            started.append({k: v.clone() for k, v in unwrap_model(self.parts.model).state_dict().items()})
        return original(self, inputs, targets, sums)

    monkeypatch.setattr(Trainer, "_run_batch", first_batch)
    quiet = ["log.progress=false", "log.tensorboard=false", "train.max_steps=1"]
    assert main([*quiet, f"model.weights={in_tmp / 'mine.pt'}", "run.name=mine"]) == 0
    assert started[0].keys() == own.keys() and all(torch.equal(started[0][k], own[k]) for k in own)
    capsys.readouterr()
    assert main([*quiet, f"model.weights={in_tmp / 'nope.pt'}", "run.name=nope"]) == 2
    err = capsys.readouterr().err
    assert "model.weights: weights file" in err and "nope.pt' not found" in err and err.count("\n") == 1
    assert not (in_tmp / "runs" / "nope").exists()


def test_a_freeze_pattern_matching_nothing_is_refused_in_one_line(in_tmp, capsys):
    assert main(["model.freeze=[0.*, nothing.*]", "log.progress=false", "log.tensorboard=false"]) == 2
    err = capsys.readouterr().err
    assert "model.freeze pattern 'nothing.*' matches no parameter" in err and err.count("\n") == 1
    assert "Traceback" not in err and not (in_tmp / "runs").exists()


def test_finetune_vgg16_recipe_trains_the_classifier_only(tmp_path, monkeypatch):
    """VGG-16 at 32×32 without the 528 MB ImageNet file (model.pretrained=false): the freeze
    patterns, the head and the loop are the recipe's own."""
    run_dir = _finetune(tmp_path, monkeypatch, "finetune_vgg16.yaml", "model.pretrained=false", "train.max_steps=1")
    _check_finished(run_dir, "finetune_vgg16.yaml", steps=1)
    saved = _final_checkpoint(run_dir)
    assert saved["model"]["classifier.6.weight"].shape == (2, 4096)
    assert sum(len(g["params"]) for g in saved["optimizer"]["param_groups"]) == 6  # 3 linear layers × (w, b)



def _unfreeze_on_rank(env, tmp: str, images: str, torch_home: str):
    import os

    from ddp.config import load_recipe
    from ddp.runner import execute

    os.environ["TORCH_HOME"] = torch_home  # the spawned rank's own environment (a test process)
    recipe = load_recipe(RECIPES / "finetune_resnet18.yaml", [
        f"data.root={images}", "data.image_size=32", "data.batch_size=2", "model.unfreeze_after_epochs=1",
        "train.epochs=2", f"run.dir={tmp}", "log.progress=false", "log.tensorboard=false", "data.eval_batch_size=8"])
    return {k: v.numpy() for k, v in execute(recipe, env).state_dict.items()}


def test_unfrozen_layers_stay_identical_across_ranks(tmp_path):
    """DDP only synchronises parameters that required grad when it was built: after unfreezing, the
    rebuilt DDP must average the backbone's gradients too, or the ranks' weights drift apart."""
    from tests.harness import spawn_ranks

    imagenet = fake_hub_weights(tmp_path / "torch_home")
    images = write_image_folder(tmp_path / "images", per_class=4, size=20)
    ranks = spawn_ranks(_unfreeze_on_rank, 2, str(tmp_path / "run"), str(images), str(tmp_path / "torch_home"),
                        init_group=False, timeout=180)
    name = "layer1.0.conv1.weight"
    assert not np.array_equal(ranks[0][name], imagenet[name].numpy())  # it trained in epoch 2
    parameters = [k for k in ranks[0] if "running_" not in k and "num_batches" not in k]
    assert len(parameters) == 62  # BatchNorm statistics differ per rank by design (DDP broadcasts them per forward)
    for key in parameters:
        assert np.array_equal(ranks[0][key], ranks[1][key]), key
