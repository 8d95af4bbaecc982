import re

import pytest
from omegaconf import OmegaConf

from ddp.config import Backend, Recipe, load_recipe, to_yaml
from ddp.errors import ConfigError
from ddp.train import main
from tests.harness import REPO, run_cli

DIGITS = REPO / "recipes" / "digits.yaml"


def test_default_recipe_file_equals_builtin_defaults():
    assert load_recipe(DIGITS) == load_recipe(None) == Recipe()


def test_every_shipped_recipe_loads():
    """Every file in recipes/ loads, and they are exactly the recipes docs/recipes.md lists."""
    paths = sorted((REPO / "recipes").glob("*.yaml"))
    table = (REPO / "docs" / "recipes.md").read_text().split("## Shipped recipes", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([\w.]+\.yaml)`", table, re.MULTILINE))
    assert {"digits.yaml", "mnist_mlp.yaml", "synthetic.yaml"} <= listed, listed
    assert {path.name for path in paths} == listed
    for path in paths:
        assert isinstance(load_recipe(path), Recipe), path


def test_overrides_are_typed():
    recipe = load_recipe(DIGITS, ["train.epochs=3", "optim.lr=0.05", "dist.backend=gloo", "run.dir=/tmp/x",
                                  "data.synthetic_shape=[3,32,32]"])
    assert recipe.train.epochs == 3 and isinstance(recipe.train.epochs, int)
    assert recipe.optim.lr == 0.05
    assert recipe.dist.backend == Backend.gloo
    assert str(recipe.run_dir) == "/tmp/x"
    assert recipe.data.synthetic_shape == [3, 32, 32]


def test_an_empty_override_of_a_text_key_is_the_empty_string():
    """A shell turns ``memory.cache=''`` into ``memory.cache=``: both turn the probe cache off, as documented;
    an optional key given nothing is unset, and a number given nothing is still refused."""
    for item in ("memory.cache=", "memory.cache=''"):
        assert load_recipe(None, [item]).memory.cache == ""
    assert load_recipe(None, ["model.weights="]).model.weights is None
    for item in ("train.epochs=", "run.name="):  # a name or number given nothing is a mistake, not a value
        with pytest.raises(ConfigError, match=item.rstrip("=")):
            load_recipe(None, [item])


def test_resolved_yaml_round_trips(tmp_path):
    recipe = load_recipe(None, ["train.epochs=4", "optim.name=adamw"])
    path = tmp_path / "r.yaml"
    path.write_text(to_yaml(recipe))
    assert load_recipe(path) == recipe
    assert OmegaConf.to_container(OmegaConf.create(to_yaml(recipe)))["optim"]["name"] == "adamw"


BAD = [
    (["train.epoch=3"], "unknown key 'train.epoch'", "did you mean 'train.epochs'"),
    (["trian.epochs=3"], "unknown key 'trian", "train"),
    (["train.epochs=abc"], "bad value for 'train.epochs'", "train.epochs takes int, e.g. train.epochs=10"),
    (["data.batch_size=0"], "data.batch_size=0 is invalid: it must be ≥ 1", "data.batch_size"),
    (["optim.lr=-0.1"], "optim.lr=-0.1 is invalid: it must be > 0.0", "optim.lr"),
    (["dist.backend=mpi"], "bad value for 'dist.backend'", "auto, nccl, gloo"),
    (["epochs"], "cannot read override 'epochs'", "key=value"),
]


@pytest.mark.parametrize("overrides, problem, hint", BAD)
def test_bad_values_name_the_key(overrides, problem, hint):
    with pytest.raises(ConfigError) as info:
        load_recipe(DIGITS, overrides)
    message = str(info.value)
    assert problem in message and hint in message and "HINT:" in message and "\n" not in message


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("recipe_text, problem", [
    ("train:\n  epochs: 3\n   seed: 1\n", "is not valid YAML at line 3"),
    ("train: [1, 2\n", "is not valid YAML"),
    ("train:\n  epochs: 0\n", "train.epochs=0 is invalid"),
    ("trainer:\n  epochs: 3\n", "unknown key 'trainer'"),
    ("- 1\n- 2\n", "must be a mapping of sections"),
])
def test_bad_recipe_files(tmp_path, capsys, recipe_text, problem):
    code = main(["--recipe", write(tmp_path / "bad.yaml", recipe_text)])
    err = capsys.readouterr().err
    assert code == 2
    assert problem in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "runs").exists()


def test_missing_recipe_file(in_tmp, capsys):
    assert main(["--recipe", "recipes/nope.yaml"]) == 2
    err = capsys.readouterr().err
    assert "recipe file 'recipes/nope.yaml' not found" in err and "recipes/digits.yaml" in err
    assert not (in_tmp / "runs").exists()


def test_print_recipe(capsys):
    assert main(["--print-recipe", "train.epochs=3"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.train.epochs == 3 and printed.data.name == "digits"


@pytest.mark.parametrize("args, problem", [
    (["data.batch_size=0"], "data.batch_size=0 is invalid"),
    (["--recipe", "missing.yaml"], "recipe file 'missing.yaml' not found"),
    (["optim.lr=-1"], "optim.lr=-1.0 is invalid"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, problem):
    done = run_cli(["-m", "ddp.train", *args], cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert problem in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


def test_cli_bad_input_under_torchrun_exits_nonzero_quickly(tmp_path):
    from tests.harness import run_torchrun

    done = run_torchrun(2, ["-m", "ddp.train", "train.epochs=0"], cwd=tmp_path, timeout=90)
    assert done.returncode != 0
    assert done.stderr.count("train.epochs=0 is invalid") == 1  # rank 0 reports, once
    assert not (tmp_path / "runs").exists()


def test_refused_backend_is_one_line_and_writes_nothing(tmp_path):
    done = run_cli(["-m", "ddp.train", "dist.backend=nccl"], cwd=tmp_path, timeout=60, CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: dist.backend=nccl but CUDA is not available on this machine. "
                                   "HINT: use dist.backend=gloo (or auto) to train on CPU")
    assert not (tmp_path / "runs").exists()


def test_every_recipe_key_declares_its_resume_policy_and_whether_it_may_differ_per_machine():
    """A new key without a declaration fails here, before it can be changed on resume unclassified."""
    import dataclasses

    from ddp.config import Policy, per_machine, resume_policy

    undeclared = [f"{section.name}.{item.name}" for section in dataclasses.fields(Recipe)
                  for item in dataclasses.fields(getattr(Recipe(), section.name))
                  if "resume" not in item.metadata or "per_machine" not in item.metadata]
    assert not undeclared, f"declare these keys with ddp.config.setting(resume=..., per_machine=...): {undeclared}"
    policy, why = resume_policy("train.seed")
    assert policy == Policy.refused and why  # a refusal says why
    assert {key for key in ("data.root", "data.num_workers", "dist.threads_per_rank", "log.level", "log.progress",
                            "optim.lr", "model.name") if per_machine(key)} == {
        "data.root", "data.num_workers", "dist.threads_per_rank", "log.level", "log.progress"}
