"""Your own model, data and loss named in the recipe (``ddp.model.registry``) or given to ``ddp.fit``.

The user code lives in a module this file writes to a temp dir and puts on PYTHONPATH, as a user's
package would be. Every wrong path, argument or return type is one line and exit 2 before training.
"""

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from ddp.train import main
from tests.harness import REPO, run_torchrun

USER_CODE = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset


    class Net(nn.Module):
        def __init__(self, width: int = 16, classes: int = 3):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, classes))

        def forward(self, x):
            return self.body(x)


    def blobs(count: int = 240, seed: int = 0):
        """Three well-separated Gaussian blobs in 4-D: (train, test)."""
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(count) % 3
        centres = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
        x = centres[labels] + torch.randn(count, 4, generator=g)
        cut = count * 3 // 4
        return TensorDataset(x[:cut], labels[:cut]), TensorDataset(x[cut:], labels[cut:])


    def regression(count: int = 64):
        x = torch.randn(count, 4, generator=torch.Generator().manual_seed(1))
        y = x.sum(dim=1, keepdim=True)
        return TensorDataset(x[:48], y[:48]), TensorDataset(x[48:], y[48:])


    def linear(width: int = 1):
        return nn.Linear(4, width)


    def half_loss(outputs, targets):
        return 0.5 * nn.functional.mse_loss(outputs, targets)


    def not_a_model():
        return {"weights": 1}


    def one_dataset():
        return blobs()[0]


    NUMBER = 3
''')

FAST = ["train.epochs=2", "data.batch_size=16", "log.tensorboard=false", "log.progress=false",
        "checkpoint.every_epochs=0", "dist.threads_per_rank=1"]


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    package = tmp_path / "code"
    package.mkdir()
    (package / "usercode.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.chdir(tmp_path)
    yield package
    sys.modules.pop("usercode", None)


def _epochs(run: str):
    records = [json.loads(line) for line in Path(f"runs/{run}/version_0/metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "epoch"]


def _recorded(run: Path) -> dict:
    return yaml.safe_load((run / "version_0" / "recipe.yaml").read_text())


def test_your_model_and_data_train_on_two_gloo_ranks(user_pkg, tmp_path):
    done = run_torchrun(2, ["-m", "ddp.train", "model.name=usercode:Net", "model.args.width=32",
                            "data.name=usercode.blobs", "data.args={count: 240}", "run.name=mine", *FAST],
                        cwd=tmp_path, timeout=180, PYTHONPATH=f"{REPO}:{user_pkg}")
    assert done.returncode == 0, done.stderr[-2000:]
    epochs = _epochs("mine")
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert epochs[-1]["test_count"] == 60 and epochs[-1]["test_acc"] > 0.9  # chance is 1/3
    assert _recorded(tmp_path / "runs/mine")["model"] == {
        "name": "usercode:Net", "args": {"width": 32}, "pretrained": False, "weights": None, "freeze": [],
        "unfreeze_after_epochs": -1}


BAD = [
    (["model.name=nomodule:Net"], "model.name='nomodule:Net': no module named 'nomodule'", "PYTHONPATH"),
    (["model.name=usercode:Nett"], "model.name='usercode:Nett': module 'usercode' has no attribute 'Nett'",
     "check that usercode defines Nett"),
    (["model.name=usercode:Net", "model.args.depth=3"], "does not accept model.args={'depth': 3}",
     "usercode:Net takes (width, classes): fix model.args"),
    (["model.name=usercode:NUMBER"], "model.name='usercode:NUMBER' is a int, not a class or function", "class"),
    (["model.name=usercode:not_a_model", "data.name=usercode:blobs"],
     "what model.name='usercode:not_a_model' returned is a dict, not a torch.nn.Module", "nn.Module"),
    (["data.name=usercode:one_dataset"], "data.name='usercode:one_dataset' gave a TensorDataset, not (train, test)",
     "pair"),
    (["data.name=usercode:blobs", "data.args.size=3"], "does not accept data.args={'size': 3}", "(count, seed)"),
    (["train.loss=usercode:linear_loss"], "has no attribute 'linear_loss'", "usercode defines linear_loss"),
    (["train.loss=usercode:one_dataset"], "train.loss='usercode:one_dataset' does not accept 2 positional",
     "must take (outputs, targets)"),
    (["model.name=vgg"], "model.name='vgg' is not known", "digits_cnn"),
    (["model.args.width=3"], "given to the built-in model 'digits_cnn'", "remove it"),
]


@pytest.mark.parametrize("overrides, problem, hint", BAD)
def test_each_wrong_path_argument_or_result_is_one_line_and_exit_2(user_pkg, tmp_path, capsys, overrides,
                                                                   problem, hint):
    assert main([*overrides, *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert problem in err and hint in err.split("HINT:")[1], err
    assert not (tmp_path / "runs").exists()


def test_a_wrong_result_under_torchrun_is_said_once_before_the_group_forms(user_pkg, tmp_path):
    done = run_torchrun(2, ["-m", "ddp.train", "model.name=usercode:not_a_model", "data.name=usercode:blobs",
                            "dist.timeout_s=20", *FAST], cwd=tmp_path, timeout=120,
                        PYTHONPATH=f"{REPO}:{user_pkg}")
    assert done.returncode != 0
    assert done.stderr.count("not a torch.nn.Module") == 1, done.stderr[-2000:]
    assert not (tmp_path / "runs").exists()  # (torchrun itself prints a traceback for a failed child)


def test_outputs_that_are_not_class_logits_report_the_loss_only(user_pkg):
    assert main(["model.name=usercode:linear", "data.name=usercode:regression", "train.loss=usercode:half_loss",
                 "optim.lr=0.01", "run.name=reg", *FAST]) == 0
    epochs = _epochs("reg")
    assert all(e["test_acc"] is None and e["train_acc"] is None for e in epochs)
    assert epochs[-1]["test_loss"] < epochs[0]["train_loss"]  # it learns: y = sum(x) is linear


def test_fit_takes_a_model_and_data_in_code(user_pkg):
    import ddp
    import usercode

    model = usercode.Net(width=8)
    result = ddp.fit(None, model=model, data=usercode.blobs(120), run__name="api", **{"train.epochs": 1},
                     data__batch_size=8, log__tensorboard=False, log__progress=False)
    assert result.exit_code == 0 and result.metrics["epoch"] == 1 and result.metrics["test_count"] == 30
    trained = {k: v for k, v in model.state_dict().items()}
    assert all(torch.equal(trained[k], result.state_dict[k]) for k in trained)  # the model given was trained
    assert _recorded(user_pkg.parent / "runs/api")["model"]["name"] == "usercode:Net"


def test_fit_refuses_a_bad_override_in_one_line(user_pkg, capsys):
    import ddp

    with pytest.raises(SystemExit) as info:
        ddp.fit(None, train__epochs=0)
    assert info.value.code == 2 and "train.epochs=0 is invalid" in capsys.readouterr().err


def test_a_built_in_model_on_your_data_without_classes_says_what_is_missing(user_pkg, capsys):
    assert main(["model.name=mnist_mlp", "data.name=usercode:blobs", *FAST]) == 2
    err = capsys.readouterr().err
    assert "model.name='mnist_mlp' needs images (channels, height, width) and a class count" in err
    assert "shape (4,) and classes None" in err and err.count("\n") == 1
