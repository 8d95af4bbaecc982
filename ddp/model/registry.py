"""Names in a recipe → the code they mean: a built-in registry entry or your own ``module:attr``.

``model.name``, ``data.name`` and ``train.loss`` take a built-in name (``mnist_cnn``) or an import
path resolved with the standard library (``pkgutil.resolve_name``: ``mypkg.models:MyNet`` or
``mypkg.models.MyNet``). ``check_recipe`` imports and checks every named callable and its ``args``
(``inspect.signature(...).bind_partial``) without building anything; ``build_*`` call them and
check what they return. Every failure is one ``ConfigError`` naming the key, the path and the fix,
raised before any process group forms. Any rank may call these functions; none communicates.
"""

from __future__ import annotations

import inspect
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import default_collate

from ddp.model import finetune
from ddp.config import DataConfig, ModelConfig, Recipe, TrainConfig
from ddp.data.datasets import DATASETS, Splits
from ddp.errors import ConfigError
from ddp.model.zoo import MODELS

LOSSES = ("cross_entropy", "mse")
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_IMPORT_FIX = "check the spelling, and that the package is importable here (pip install -e it, or add its directory to PYTHONPATH)"


def is_import_path(name: str) -> bool:
    """``mypkg.models:MyNet`` / ``mypkg.models.MyNet`` (built-in names have neither ':' nor '.')."""
    return ":" in name or "." in name


@dataclass
class Given:
    """A model and data handed over in code (``ddp.fit``) instead of named in the recipe."""

    model: Any = None  # an nn.Module, or a callable returning one (called with **model.args)
    data: Any = None  # a (train, test) pair of Datasets, or a callable returning one (**data.args)


def check_recipe(recipe: Recipe, given: Given | None = None) -> None:
    """Every name in the recipe resolves, and every ``args`` mapping fits its callable."""
    given = given or Given()
    if given.model is None:
        _check_name("model.name", recipe.model.name, MODELS, recipe.model.args, "model.args")
    elif callable(given.model) and not isinstance(given.model, nn.Module):  # ddp.fit(model=MyNet, model__args=...)
        _check_args("model", _name_of(given.model), given.model, recipe.model.args, "model.args", ())
    if given.data is None:
        _check_name("data.name", recipe.data.name, DATASETS, recipe.data.args, "data.args")
    elif callable(given.data) and not isinstance(given.data, (tuple, list)):
        _check_args("data", _name_of(given.data), given.data, recipe.data.args, "data.args", ())
    _check_name("train.loss", recipe.train.loss, LOSSES, {}, "", leading=(None, None))
    if recipe.train.metrics:
        _check_name("train.metrics", recipe.train.metrics, (), {}, "", leading=(None, None))
    if recipe.model.pretrained and recipe.model.name not in PRETRAINABLE:
        raise ConfigError(f"model.pretrained=true, but model.name={recipe.model.name!r} has no torchvision weights.",
                          f"use model.name={' or '.join(PRETRAINABLE)}, or model.weights=<state_dict file>")
    if recipe.model.args and not is_import_path(recipe.model.name) and given.model is None:
        raise ConfigError(f"model.args={dict(recipe.model.args)} given to the built-in model {recipe.model.name!r}.",
                          "model.args is for your own model (model.name=mypkg.models:MyNet); remove it")
    if recipe.data.args and not is_import_path(recipe.data.name) and given.data is None:
        raise ConfigError(f"data.args={dict(recipe.data.args)} given to the built-in dataset {recipe.data.name!r}.",
                          "data.args is for your own data function (data.name=mypkg.data:build); remove it")


PRETRAINABLE = tuple(finetune.HEADS)  # built-in models with torchvision ImageNet weights


def _check_name(key: str, name: str, builtins: Mapping[str, Any] | tuple[str, ...], args: Mapping[str, Any],
                args_key: str, leading: tuple[Any, ...] = ()) -> None:
    if not is_import_path(name):
        if name not in builtins:
            choose = f"choose one of: {', '.join(builtins)}; or " if builtins else ""
            raise ConfigError(f"{key}={name!r} is not known.", f"{choose}name your own as mypkg.module:attr")
        return
    target = resolve(key, name)
    if not callable(target):
        raise ConfigError(f"{key}={name!r} is a {type(target).__name__}, not a class or function.",
                          f"point {key} at a class or function")
    _check_args(key, name, target, args, args_key, leading)


def resolve(key: str, name: str) -> Any:
    """``pkgutil.resolve_name(name)``, with failures as one line naming ``key``."""
    try:
        return pkgutil.resolve_name(name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"{key}={name!r}: no module named '{err.name}'.", _IMPORT_FIX) from None
    except AttributeError as err:
        module, _, attr = name.rpartition(":") if ":" in name else name.rpartition(".")
        raise ConfigError(f"{key}={name!r}: {_first_line(err)}.",
                          f"check that {module} defines {attr.split('.')[0]}") from None
    except ValueError as err:
        raise ConfigError(f"{key}={name!r} is not an import path ({_first_line(err)}).",
                          "write it as package.module:attr, e.g. mypkg.models:MyNet") from None
    except Exception as err:  # noqa: BLE001 - the user's module failed while importing
        raise ConfigError(f"{key}={name!r}: importing it failed with {type(err).__name__}: {_first_line(err)}.",
                          "fix the error in that module (python -c 'import ...' shows the traceback)") from None


def _check_args(key: str, name: str, target: Callable[..., Any], args: Mapping[str, Any], args_key: str,
                leading: tuple[Any, ...]) -> None:
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # some builtins have no signature: they are checked when called
        return
    try:
        signature.bind_partial(*leading, **args)
        if leading:
            signature.bind(*leading)
    except TypeError as err:
        takes = ", ".join(signature.parameters) or "nothing"
        what = f"{args_key}={dict(args)}" if args_key else f"{len(leading)} positional arguments"
        fix = f"{name} takes ({takes}): fix {args_key}" if args_key else f"{name} must take (outputs, targets)"
        raise ConfigError(f"{key}={name!r} does not accept {what}: {_first_line(err)}.", fix) from None


def _name_of(value: Any) -> str:
    return f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', type(value).__name__)}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0].rstrip(".") if text else type(err).__name__


# ---------------------------------------------------------------- building

def build_components(recipe: Recipe, given: Given, build_datasets: Callable[[DataConfig], Splits]
                     ) -> tuple[Splits, nn.Module]:
    """The data, then the model (with its weights and frozen layers, ``ddp.model.finetune``). Every rank
    builds its own; the seed is set by the caller so all ranks build the same initial weights."""
    if given.data is not None:
        splits = _splits_of(_produce(given.data, recipe.data.args), "data")
    elif is_import_path(recipe.data.name):
        splits = build_user_data(recipe.data)
    else:
        splits = build_datasets(recipe.data)
    if given.model is not None:
        model = _produce(given.model, recipe.model.args)
        _check_module("model", model)
    else:
        model = build_model(recipe.model, splits)
    finetune.prepare_model(model, recipe.model)
    return splits, model


def _produce(value: Any, args: Mapping[str, Any]) -> Any:
    return value if isinstance(value, (nn.Module, tuple, list)) or not callable(value) else value(**args)


def _check_module(what: str, model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{what} is a {type(model).__name__}, not a torch.nn.Module.",
                          "make it a class deriving from nn.Module or a function returning one")


def build_model(cfg: ModelConfig, splits: Splits) -> nn.Module:
    """The recipe's model: a built-in builder gets (shape, classes); your own gets ``**model.args``."""
    if cfg.pretrained or (cfg.weights and cfg.name in PRETRAINABLE):
        return finetune.torchvision_model(cfg, splits.classes)
    if not is_import_path(cfg.name):
        if splits.classes is None or len(splits.shape) != 3:
            raise ConfigError(f"model.name={cfg.name!r} needs images (channels, height, width) and a class count, "
                              f"but the data gives shape {splits.shape} and classes {splits.classes}.",
                              "give your train Dataset a 'classes' list and (C, H, W) tensor inputs, or use your own model")
        return MODELS[cfg.name](splits.shape, splits.classes)
    model = _call("model.name", cfg.name, cfg.args)
    _check_module(f"what model.name={cfg.name!r} returned", model)
    return model


def build_user_data(cfg: DataConfig) -> Splits:
    """Your own ``data.name`` function, called with ``**data.args``: a (train, test) pair of Datasets."""
    return _splits_of(_call("data.name", cfg.name, cfg.args), f"data.name={cfg.name!r}")


def _splits_of(result: Any, what: str) -> Splits:
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and all(map(_is_dataset, result))):
        got = f"a {len(result)}-item {type(result).__name__}" if isinstance(result, (tuple, list)) else \
            f"a {type(result).__name__}"
        raise ConfigError(f"{what} gave {got}, not (train, test) Datasets.",
                          "return a pair of map-style Datasets (with __len__ and __getitem__)")
    train, test = result
    shape = _sample_shape(train)
    classes = getattr(train, "classes", None)
    return Splits(train, test, shape, len(classes) if classes is not None else None,  # type: ignore[arg-type]
                  in_memory=False)


def build_loss(cfg: TrainConfig) -> Loss:
    """(outputs, targets) → the batch's mean loss."""
    if cfg.loss == "cross_entropy":
        return partial(F.cross_entropy, label_smoothing=cfg.label_smoothing)
    if cfg.loss == "mse":
        return F.mse_loss
    target = resolve("train.loss", cfg.loss)
    return target() if inspect.isclass(target) else target  # a class (nn.Module loss) is instantiated


def build_metrics(cfg: TrainConfig) -> Callable[[torch.Tensor, torch.Tensor], Mapping[str, Any]] | None:
    """``train.metrics``: the user's (outputs, targets) → {name: value} function, or None."""
    return resolve("train.metrics", cfg.metrics) if cfg.metrics else None


def eval_loss(cfg: TrainConfig) -> Loss | None:
    """The loss evaluation reports; None means plain cross entropy (summed exactly)."""
    return None if cfg.loss == "cross_entropy" else build_loss(cfg)


def classifies(outputs: torch.Tensor, targets: torch.Tensor) -> bool:
    """Outputs are class logits: N×C against N integer class indices (accuracy is then reported)."""
    return (outputs.dim() == 2 and targets.dim() == 1 and not targets.is_floating_point()
            and outputs.shape[0] == targets.shape[0])


def _call(key: str, name: str, args: Mapping[str, Any]) -> Any:
    target = resolve(key, name)
    try:
        return target(**args)
    except TypeError as err:
        raise ConfigError(f"{key}={name!r} failed when called with {dict(args)}: {_first_line(err)}.",
                          f"fix {key.split('.')[0]}.args to match what {name} takes") from None


def _sample_shape(dataset: Any) -> tuple[int, ...]:
    """The input shape of the first sample, when it is an (input tensor, target) pair; else ()."""
    try:
        first = dataset[0][0] if len(dataset) else None
    except Exception:  # noqa: BLE001 - any layout is allowed for your own model; built-ins check the shape
        return ()
    return tuple(first.shape) if isinstance(first, torch.Tensor) else ()


def _is_dataset(value: Any) -> bool:
    return hasattr(value, "__getitem__") and hasattr(value, "__len__") and not isinstance(value, torch.Tensor)


def check_one_batch(model: nn.Module, splits: Splits, loss: Loss, metrics: Callable[..., Any] | None = None) -> None:
    """Two training samples through the model, the loss and the metric function, on the CPU before
    any process group forms: a model that does not fit the data (input shape, class count) is one
    line naming the problem, not a raw error on every rank after the run directory exists. Runs in
    eval mode under ``no_grad`` with the RNG forked, so training starts exactly as without it."""
    if any(p.device.type == "meta" for p in model.parameters()):
        return  # nothing to run on (a model built on the meta device)
    try:
        inputs, targets = default_collate([splits.train[i] for i in range(min(2, len(splits.train)))])  # type: ignore[arg-type]
    except Exception as err:  # noqa: BLE001 - the user's dataset
        raise ConfigError(f"the training data's samples cannot be batched: {type(err).__name__}: {_first_line(err)}.",
                          "each sample must be an (input tensor, target) pair of the same shapes") from None
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            outputs = model(inputs)
            loss(outputs, targets)
            if metrics is not None:
                metrics(outputs, targets)
    except Exception as err:  # noqa: BLE001 - the user's model, data or loss
        from ddp.engine.seeding import not_deterministic

        refusal = not_deterministic(err)  # train.deterministic=true and an op without such a kernel
        if refusal is not None:
            raise refusal from None
        raise ConfigError(f"a batch of 2 training samples (inputs {list(inputs.shape)}, targets "
                          f"{list(targets.shape)}) through the model and train.loss failed: "
                          f"{type(err).__name__}: {_first_line(err)}.", _batch_hint(err, splits)) from None
    finally:
        model.train(was_training)
    classes = _class_count(splits)
    if classifies(outputs, targets) and classes is not None and outputs.shape[1] < classes:
        raise ConfigError(f"the model gives {outputs.shape[1]} outputs per sample but the training targets go up to "
                          f"class {classes - 1}: a target would be out of bounds in the loss.",
                          f"the model has fewer outputs than the data has classes ({classes}): give it {classes} "
                          "outputs (e.g. through model.args)")


def _class_count(splits: Splits) -> int | None:
    """Classes in the training data: its ``classes``, else 1 + the largest integer target of a
    TensorDataset (read without iterating)."""
    if splits.classes is not None:
        return splits.classes
    tensors = getattr(splits.train, "tensors", None)
    if tensors and len(tensors) == 2 and not tensors[1].is_floating_point() and tensors[1].numel():
        return int(tensors[1].max()) + 1
    return None


def _batch_hint(err: Exception, splits: Splits) -> str:
    text = str(err)
    if "out of bounds" in text and "arget" in text:
        return (f"the model has fewer outputs than the data has classes ({splits.classes}): set its output size "
                "(e.g. model.args) to the class count")
    if "shapes cannot be multiplied" in text or "Expected" in text and "input" in text:
        return f"the model's first layers do not take samples of shape {list(splits.shape)}: fix model.args or the data"
    return "check that the model takes the data's inputs and train.loss its outputs and targets"
