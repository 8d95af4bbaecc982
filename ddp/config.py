"""Recipes: one typed config tree loaded from YAML, with dotted ``key=value`` overrides.

OmegaConf structured configs do the merging and type checks (unknown keys, wrong types, bad enum
values); ``_check_bounds`` adds value limits declared next to each field. Every failure becomes a
one-line ``ConfigError`` that names the key and the fix. The dataclass defaults ARE the default
recipe (``recipes/digits.yaml`` restates them; a test keeps the two equal).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ddp.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def _bounded(default: Any, *, minimum: float | None = None, above: float | None = None,
             maximum: float | None = None) -> Any:
    """A dataclass field with value limits checked after merging."""
    limits = {"min": minimum, "above": above, "max": maximum}
    return field(default=default, metadata={k: v for k, v in limits.items() if v is not None})


class Backend(str, Enum):
    auto = "auto"
    nccl = "nccl"
    gloo = "gloo"


class Parallel(str, Enum):
    ddp = "ddp"
    dp = "dp"
    none = "none"


class OptimizerName(str, Enum):
    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"


class LoaderKind(str, Enum):
    auto = "auto"
    memory = "memory"
    dataloader = "dataloader"


class Schedule(str, Enum):
    none = "none"
    step = "step"
    cosine = "cosine"
    onecycle = "onecycle"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class ModelConfig:
    name: str = "digits_cnn"  # a built-in (ddp.model.zoo.MODELS) or your own: mypkg.models:MyNet
    args: Dict[str, Any] = field(default_factory=dict)  # keyword arguments for the model
    pretrained: bool = False  # built-in torchvision models: weights from the local torch hub cache
    weights: Optional[str] = None  # or a state_dict file to start from
    freeze: List[str] = field(default_factory=list)  # parameter-name patterns kept frozen, e.g. ["features.*"]
    unfreeze_after_epochs: int = _bounded(-1, minimum=-1)  # train the frozen layers from this epoch on; -1 = never


@dataclass
class DataConfig:
    name: str = "digits"  # a built-in (ddp.data.datasets.DATASETS) or your own: mypkg.data:build → (train, test)
    args: Dict[str, Any] = field(default_factory=dict)  # keyword arguments for your own data function
    root: str = "data"  # where mnist/fashion_mnist/cifar10/image_folder files live
    download: bool = False  # let torchvision fetch missing mnist/fashion_mnist/cifar10 files (needs network)
    image_size: int = _bounded(224, minimum=8)  # image_folder: images are resized and cropped to this
    batch_size: Any = 32  # per rank (int ≥ 1, or auto: probed, see ddp.memory); global = this × world size
    eval_batch_size: Any = 512  # per rank (int ≥ 1, or auto)
    test_fraction: float = _bounded(0.2, above=0.0, maximum=0.9)  # digits: held-out share
    split_seed: int = 0  # digits: the fixed train/test split
    loader: LoaderKind = LoaderKind.auto  # auto: in-memory tensors when they fit, else DataLoader
    memory_limit_mb: int = _bounded(4096, minimum=1)  # largest dataset auto keeps in (device) memory
    num_workers: int = _bounded(-1, minimum=-1)  # DataLoader workers per rank; -1 = auto
    synthetic_train: int = _bounded(4096, minimum=1)  # synthetic: samples
    synthetic_test: int = _bounded(1024, minimum=1)
    synthetic_shape: list[int] = field(default_factory=lambda: [1, 28, 28])
    synthetic_classes: int = _bounded(10, minimum=2)


@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.sgd
    lr: float = _bounded(0.05, above=0.0)
    momentum: float = _bounded(0.9, minimum=0.0, maximum=1.0)  # sgd only
    weight_decay: float = _bounded(5e-4, minimum=0.0)
    schedule: Schedule = Schedule.cosine
    step_epochs: int = _bounded(3, minimum=1)  # schedule=step: decay every N epochs
    gamma: float = _bounded(0.1, above=0.0, maximum=1.0)  # schedule=step: decay factor
    warmup_steps: int = _bounded(0, minimum=0)  # linear warm-up before the schedule
    decay_norms_and_biases: bool = False  # false: no weight decay on biases and norm weights (1-D parameters)


@dataclass
class TrainConfig:
    epochs: int = _bounded(10, minimum=1)
    max_steps: int = _bounded(-1, minimum=-1)  # stop after this many optimizer steps; -1 = no cap
    seed: int = 0
    deterministic: bool = False  # also force deterministic CUDA kernels (slower)
    resume: str = "auto"  # auto: newest valid checkpoint of the run dir | never | <checkpoint file or dir>
    loss: str = "cross_entropy"  # cross_entropy | mse | your own: mypkg.losses:focal (outputs, targets) → scalar
    label_smoothing: float = _bounded(0.0, minimum=0.0, maximum=0.99)  # cross_entropy only
    clip_grad_norm: float = _bounded(0.0, minimum=0.0)  # clip the global gradient norm to this; 0 = off
    accumulate: int = _bounded(1, minimum=1)  # micro-batches per optimizer step (DDP syncs on the last only)
    precision: Precision = Precision.fp32  # bf16: autocast (CPU or GPU); fp16: autocast + GradScaler (CUDA only)
    compile: bool = False  # torch.compile the (wrapped) model for training; evaluation runs it uncompiled
    channels_last: bool = False  # NHWC memory format for the model and 4-D inputs (faster convs on recent GPUs)


class BestMode(str, Enum):
    max = "max"
    min = "min"


@dataclass
class CheckpointConfig:
    every_steps: int = _bounded(0, minimum=0)  # save every N optimizer steps; 0 = off
    every_epochs: int = _bounded(1, minimum=0)  # save every N epochs (after evaluation); 0 = off
    keep: int = _bounded(3, minimum=2)  # newest checkpoints kept (the best one is kept besides)
    best_metric: str = "test_acc"  # epoch-record field that ranks checkpoints
    best_mode: BestMode = BestMode.max
    signal_poll_s: float = _bounded(0.25, minimum=0.0)  # ranks agree on preemption signals this often; 0 = every step


@dataclass
class DistConfig:
    backend: Backend = Backend.auto  # auto = nccl when every local rank has a GPU, else gloo
    parallel: Parallel = Parallel.ddp
    timeout_s: float = _bounded(300.0, above=0.0)  # collective timeout: a dead peer → error
    threads_per_rank: int = _bounded(0, minimum=0)  # CPU threads per rank; 0 = cores ÷ local ranks
    sync_bn: bool = False  # BatchNorm statistics over the global batch (SyncBatchNorm; CUDA only)


@dataclass
class MemoryConfig:
    """Budget for ``data.batch_size: auto`` / ``data.eval_batch_size: auto`` (see ddp.memory)."""

    fraction: float = _bounded(0.9, above=0.0, maximum=1.0)  # of the memory free when probing
    budget_mb: int = _bounded(0, minimum=0)  # params + grads + optimizer + data on device + activations per rank; 0 = use fraction
    cache: str = "runs/.probe_cache.json"  # probe results by (device, model, input, dtype, optimizer, world); '' = off


@dataclass
class RunConfig:
    name: str = "digits"
    dir: Optional[str] = None  # default: runs/<name>


@dataclass
class LogConfig:
    level: str = "INFO"
    every_steps: int = _bounded(20, minimum=1)  # step records in metrics.jsonl and TensorBoard
    progress: bool = True  # tqdm bar on rank 0 (only when the console is a terminal)
    tensorboard: bool = True


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
BEST_METRICS = ("test_acc", "test_loss", "train_acc", "train_loss")


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Defaults ← recipe file ← ``key=value`` overrides, type-checked and bounds-checked."""
    schema = OmegaConf.structured(Recipe)
    layers = [schema]
    if path is not None:
        layers.append(_read_yaml(Path(path)))
    layers.append(_parse_overrides(overrides))
    try:
        merged = OmegaConf.merge(*layers)
        recipe = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _config_error(err, source=str(path) if path else "overrides") from None
    _check_bounds(recipe)
    _check_batch_sizes(recipe)
    _check_choices(recipe)
    return recipe


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what ``--print-recipe`` prints and the run dir keeps)."""
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        known = ", ".join(sorted(str(p.relative_to(RECIPES_DIR.parent)) for p in RECIPES_DIR.glob("*.yaml")))
        raise ConfigError(f"recipe file '{path}' not found.", f"recipes shipped: {known or 'none'}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "syntax error"
        raise ConfigError(f"recipe '{path}' is not valid YAML{where}: {problem}.",
                          "fix the YAML syntax (indentation, 'key: value', quotes)") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe '{path}' must be a mapping of sections, got {type(data).__name__}.",
                          "start it with sections such as 'train:' and 'data:'")
    return OmegaConf.create(data)


def _parse_overrides(overrides: list[str] | tuple[str, ...]) -> Any:
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key or key.startswith("-"):
            raise ConfigError(f"cannot read override '{item}'.", "write overrides as key=value, e.g. train.epochs=3")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read overrides {list(overrides)}: {err}.", "write them as key=value") from None


def _config_error(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    message = str(getattr(err, "msg", err)).splitlines()[0]
    if isinstance(err, ConfigKeyError):
        return ConfigError(f"unknown key '{key}' (from {source}).", _key_hint(str(key)))
    return ConfigError(f"bad value for '{key}' (from {source}): {message.rstrip('.')}.", _type_hint(str(key)))


def _type_hint(key: str) -> str:
    """``"train.epochs"`` → ``"train.epochs takes int, e.g. train.epochs=10 (the default)"``."""
    node: Any = Recipe()
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            return f"run 'python -m ddp.train --print-recipe' to see '{key}'"
        node = getattr(node, part)
    if isinstance(node, Enum):
        choices = ", ".join(member.value for member in type(node))
        return f"{key} takes one of: {choices} (default {node.value})"
    return f"{key} takes {type(node).__name__}, e.g. {key}={node} (the default)"


def _key_hint(key: str) -> str:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(OmegaConf.structured(Recipe), parent) if parent else OmegaConf.structured(Recipe)
    valid = [str(k) for k in node.keys()] if node is not None and OmegaConf.is_dict(node) else []
    close = difflib.get_close_matches(leaf, valid, n=1)
    guess = f"did you mean '{parent + '.' if parent else ''}{close[0]}'? " if close else ""
    where = f"'{parent}'" if parent else "a recipe"
    return f"{guess}valid keys in {where}: {', '.join(valid)}"


def _check_bounds(recipe: Recipe) -> None:
    for section in dataclasses.fields(recipe):
        values = getattr(recipe, section.name)
        for item in dataclasses.fields(values):
            value = getattr(values, item.name)
            limit = _broken_limit(value, item.metadata)
            if limit:
                key = f"{section.name}.{item.name}"
                raise ConfigError(f"{key}={value} is invalid: it must be {limit}.",
                                  f"set {key} to a value {limit}")


def _broken_limit(value: Any, limits: Any) -> str | None:
    """The first limit ``value`` breaks, as text ("≥ 1"), or None."""
    if "min" in limits and value < limits["min"]:
        return f"≥ {limits['min']}"
    if "above" in limits and value <= limits["above"]:
        return f"> {limits['above']}"
    if "max" in limits and value > limits["max"]:
        return f"≤ {limits['max']}"
    return None


AUTO = "auto"


def is_auto(value: Any) -> bool:
    """True for a batch size left to the memory probe (``auto``)."""
    return isinstance(value, str) and value.strip().lower() == AUTO


def _check_batch_sizes(recipe: Recipe) -> None:
    """``data.batch_size`` / ``data.eval_batch_size``: an integer ≥ 1 or ``auto``."""
    for name in ("batch_size", "eval_batch_size"):
        value, key = getattr(recipe.data, name), f"data.{name}"
        if is_auto(value):
            setattr(recipe.data, name, AUTO)
        elif isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} is invalid: it must be an integer ≥ 1 or auto.",
                              f"e.g. {key}=32, or {key}=auto to size it from the memory budget")
        elif value < 1:
            raise ConfigError(f"{key}={value} is invalid: it must be ≥ 1 or auto.",
                              f"set {key} to a value ≥ 1, or {key}=auto")


def _check_choices(recipe: Recipe) -> None:
    """Choices config.py can check alone; model/data/loss names are checked by ``ddp.model.registry``."""
    if recipe.log.level.upper() not in LOG_LEVELS:
        raise ConfigError(f"log.level={recipe.log.level!r} is not known.", f"choose one of: {', '.join(LOG_LEVELS)}")
    if recipe.checkpoint.best_metric not in BEST_METRICS:
        raise ConfigError(f"checkpoint.best_metric={recipe.checkpoint.best_metric!r} is not an epoch metric.",
                          f"choose one of: {', '.join(BEST_METRICS)}")
    shape = recipe.data.synthetic_shape
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"data.synthetic_shape={list(shape)} is invalid: it must be [channels, height, width].",
                          "e.g. data.synthetic_shape=[3,32,32]")
