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


class Policy(str, Enum):
    """What resuming a checkpoint does with a key whose value changed (``ddp.lifecycle.changes``)."""

    honoured = "honoured"  # the resumed run uses the new value; the change is logged and recorded
    refused = "refused"  # the new value would silently break the run: refused in one line naming the key
    ignored = "ignored"  # the key chooses the run rather than describes it (train.resume, run.*)


Resume = tuple[Policy, str]  # (policy, why a refused change cannot be honoured)
HONOURED: Resume = (Policy.honoured, "")
IGNORED: Resume = (Policy.ignored, "")


def refused(why: str) -> Resume:
    return Policy.refused, why


_OTHER_MODEL = "the checkpoint's weights belong to another model"
_OTHER_PARAMETERS = "the optimizer's state covers other parameters"
_OTHER_DATA = "the checkpoint was trained on other data"
_OTHER_SPLIT = "the train/test split would change"
_OTHER_OPTIMIZER = "the checkpoint holds another optimizer's state"
_OTHER_GROUPS = "the checkpoint's optimizer groups its parameters otherwise"
_SAMPLE_ORDER = "the interrupted epoch's sample order depends on it"
_OTHER_LOSS = "its logged losses and best checkpoint would no longer compare"


def setting(default: Any = dataclasses.MISSING, *, resume: Resume, per_machine: bool = False,
            factory: Any = None, minimum: float | None = None, above: float | None = None,
            maximum: float | None = None) -> Any:
    """A recipe key, with everything that decides its behaviour declared beside it: value limits
    (checked after merging), what a resume does when it changed (``resume``), and whether it may
    differ between the machines of one job (``per_machine``: paths, local parallelism, console;
    every other key must be the same on every rank, ``ddp.cluster.rendezvous``)."""
    limits = {"min": minimum, "above": above, "max": maximum}
    metadata = {**{k: v for k, v in limits.items() if v is not None}, "resume": resume, "per_machine": per_machine}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


class Backend(str, Enum):
    auto = "auto"
    nccl = "nccl"
    gloo = "gloo"


class Parallel(str, Enum):
    ddp = "ddp"
    fsdp = "fsdp"
    dp = "dp"
    none = "none"


class StallAction(str, Enum):
    report = "report"
    exit = "exit"


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
    name: str = setting("digits_cnn", resume=refused(_OTHER_MODEL))  # a built-in (ddp.model.zoo.MODELS) or your own: mypkg.models:MyNet
    args: Dict[str, Any] = setting(factory=dict, resume=refused(_OTHER_MODEL))  # keyword arguments for the model
    pretrained: bool = setting(False, resume=refused(_OTHER_MODEL))  # built-in torchvision models: weights from the local torch hub cache
    weights: Optional[str] = setting(None, resume=refused(_OTHER_MODEL))  # or a state_dict file to start from
    freeze: List[str] = setting(factory=list, resume=refused(_OTHER_PARAMETERS))  # parameter-name patterns kept frozen, e.g. ["features.*"]
    unfreeze_after_epochs: int = setting(-1, minimum=-1, resume=refused(_OTHER_PARAMETERS))  # train the frozen layers from this epoch on; -1 = never


@dataclass
class DataConfig:
    name: str = setting("digits", resume=refused(_OTHER_DATA))  # a built-in (ddp.data.datasets.DATASETS) or your own: mypkg.data:build → (train, test)
    args: Dict[str, Any] = setting(factory=dict, resume=refused(_OTHER_DATA))  # keyword arguments for your own data function
    root: str = setting("data", resume=HONOURED, per_machine=True)  # where mnist/fashion_mnist/cifar10/image_folder files live
    download: bool = setting(False, resume=HONOURED)  # let torchvision fetch missing mnist/fashion_mnist/cifar10 files (needs network)
    image_size: int = setting(224, minimum=8, resume=refused(_OTHER_DATA))  # image_folder: images are resized and cropped to this
    batch_size: Any = setting(32, resume=HONOURED)  # per rank (int ≥ 1, or auto: probed, see ddp.memory); global = this × world size
    eval_batch_size: Any = setting(512, resume=HONOURED)  # per rank (int ≥ 1, or auto)
    auto_min_steps: int = setting(20, minimum=1, resume=HONOURED)  # batch_size=auto: at most the batch that leaves this many optimizer steps per epoch
    test_fraction: float = setting(0.2, above=0.0, maximum=0.9, resume=refused(_OTHER_SPLIT))  # digits: held-out share
    split_seed: int = setting(0, resume=refused(_OTHER_SPLIT))  # digits: the fixed train/test split
    loader: LoaderKind = setting(LoaderKind.auto, resume=HONOURED)  # auto: in-memory tensors when they fit, else DataLoader
    memory_limit_mb: int = setting(4096, minimum=1, resume=HONOURED)  # largest dataset auto keeps in (device) memory
    num_workers: int = setting(-1, minimum=-1, resume=HONOURED, per_machine=True)  # DataLoader workers per rank; -1 = auto
    synthetic_train: int = setting(4096, minimum=1, resume=refused(_OTHER_DATA))  # synthetic: samples
    synthetic_test: int = setting(1024, minimum=1, resume=refused(_OTHER_DATA))
    synthetic_shape: list[int] = setting(factory=lambda: [1, 28, 28], resume=refused(_OTHER_DATA))
    synthetic_classes: int = setting(10, minimum=2, resume=refused(_OTHER_DATA))


@dataclass
class OptimConfig:
    name: OptimizerName = setting(OptimizerName.sgd, resume=refused(_OTHER_OPTIMIZER))
    lr: float = setting(0.05, above=0.0, resume=HONOURED)
    momentum: float = setting(0.9, minimum=0.0, maximum=1.0, resume=HONOURED)  # sgd only
    weight_decay: float = setting(5e-4, minimum=0.0, resume=HONOURED)
    schedule: Schedule = setting(Schedule.cosine, resume=HONOURED)
    step_epochs: int = setting(3, minimum=1, resume=HONOURED)  # schedule=step: decay every N epochs
    gamma: float = setting(0.1, above=0.0, maximum=1.0, resume=HONOURED)  # schedule=step: decay factor
    warmup_steps: int = setting(0, minimum=0, resume=HONOURED)  # linear warm-up before the schedule
    decay_norms_and_biases: bool = setting(False, resume=refused(_OTHER_GROUPS))  # false: no weight decay on biases and norm weights (1-D parameters)


@dataclass
class TrainConfig:
    epochs: int = setting(10, minimum=1, resume=HONOURED)
    max_steps: int = setting(-1, minimum=-1, resume=HONOURED)  # stop after this many optimizer steps; -1 = no cap
    seed: int = setting(0, resume=refused(_SAMPLE_ORDER))
    deterministic: bool = setting(False, resume=HONOURED)  # also force deterministic CUDA kernels (slower)
    resume: str = setting("auto", resume=IGNORED)  # auto: newest valid checkpoint of the run dir | never | <checkpoint file or dir>
    loss: str = setting("cross_entropy", resume=refused(_OTHER_LOSS))  # cross_entropy | mse | your own: mypkg.losses:focal (outputs, targets) → scalar
    metrics: Optional[str] = setting(None, resume=HONOURED)  # your own: mypkg.metrics:fn (outputs, targets) → {name: per-sample values or batch mean}, reported as test_<name>
    label_smoothing: float = setting(0.0, minimum=0.0, maximum=0.99, resume=HONOURED)  # cross_entropy only
    clip_grad_norm: float = setting(0.0, minimum=0.0, resume=HONOURED)  # clip the global gradient norm to this; 0 = off
    accumulate: int = setting(1, minimum=1, resume=HONOURED)  # micro-batches per optimizer step (DDP syncs on the last only)
    precision: Precision = setting(Precision.fp32, resume=HONOURED)  # bf16: autocast (CPU or GPU); fp16: autocast + GradScaler (CUDA only)
    compile: bool = setting(False, resume=HONOURED)  # torch.compile the (wrapped) model for training; evaluation runs it uncompiled
    channels_last: bool = setting(False, resume=HONOURED)  # NHWC memory format for the model and 4-D inputs (faster convs on recent GPUs)


class BestMode(str, Enum):
    max = "max"
    min = "min"


class CheckpointFormat(str, Enum):
    auto = "auto"  # sharded under dist.parallel=fsdp, else file
    file = "file"  # one step-N.pt written by rank 0, the whole state
    sharded = "sharded"  # a step-N.dcp directory, every rank writing its shards (torch.distributed.checkpoint)


@dataclass
class CheckpointConfig:
    every_steps: int = setting(0, minimum=0, resume=HONOURED)  # save every N optimizer steps; 0 = off
    every_epochs: int = setting(1, minimum=0, resume=HONOURED)  # save every N epochs (after evaluation); 0 = off
    keep: int = setting(3, minimum=2, resume=HONOURED)  # newest checkpoints kept (the best one is kept besides)
    best_metric: str = setting("auto", resume=HONOURED)  # epoch-record field that ranks checkpoints; auto = test_acc when reported, else test_loss (lower is better)
    best_mode: BestMode = setting(BestMode.max, resume=HONOURED)  # for a named best_metric: is higher (max) or lower (min) better
    signal_poll_s: float = setting(0.25, minimum=0.0, resume=HONOURED)  # ranks agree on preemption signals this often; 0 = every step
    async_save: bool = setting(False, resume=HONOURED)  # training waits only for a host copy of the state; the write happens in the background
    format: CheckpointFormat = setting(CheckpointFormat.auto, resume=HONOURED)  # file (one .pt by rank 0), sharded (every rank writes its shards), auto = sharded under fsdp


@dataclass
class DistConfig:
    backend: Backend = setting(Backend.auto, resume=HONOURED)  # auto = nccl when every local rank has a GPU, else gloo
    parallel: Parallel = setting(Parallel.ddp, resume=HONOURED)
    timeout_s: float = setting(300.0, above=0.0, resume=HONOURED)  # collective timeout: a dead peer → error
    heartbeat_timeout_s: float = setting(30.0, minimum=0.0, resume=HONOURED)  # a rank or the store silent this long ends every other rank; 0 = off
    stall_timeout_s: float = setting(0.0, minimum=0.0, resume=HONOURED)  # no rank finishes a step this long → stacks in the rank logs; 0 = auto (≥ 120 s)
    stall_action: StallAction = setting(StallAction.report, resume=HONOURED)  # after a stall report: report (wait on) or exit
    threads_per_rank: int = setting(0, minimum=0, resume=HONOURED, per_machine=True)  # CPU threads per rank; 0 = cores ÷ local ranks
    sync_bn: bool = setting(False, resume=HONOURED)  # BatchNorm statistics over the global batch (SyncBatchNorm; CUDA only)
    fsdp_blocks: List[str] = setting(factory=list, resume=HONOURED)  # parallel=fsdp: module class names sharded one by one; [] = the default rule (ddp.model.sharding)
    fsdp_reshard_after_forward: bool = setting(True, resume=HONOURED)  # parallel=fsdp: free each block's gathered parameters after its forward (gathered again in backward)
    fsdp_cpu_offload: bool = setting(False, resume=HONOURED)  # parallel=fsdp on GPUs: sharded parameters, gradients and optimizer state in host memory
    gradient_as_bucket_view: bool = setting(True, resume=HONOURED)  # DDP: gradients are views into its all-reduce buckets (one gradient copy less)
    bucket_cap_mb: float = setting(25.0, above=0.0, resume=HONOURED)  # DDP: gradient bucket size in MB (torch's default)
    static_graph: bool = setting(False, resume=HONOURED)  # DDP: the same parameters get gradients every step; not with train.accumulate > 1


@dataclass
class MemoryConfig:
    """Budget for ``data.batch_size: auto`` / ``data.eval_batch_size: auto`` (see ddp.memory)."""

    fraction: float = setting(0.9, above=0.0, maximum=1.0, resume=HONOURED)  # of the memory free when probing
    budget_mb: int = setting(0, minimum=0, resume=HONOURED)  # params + grads + optimizer + data on device + activations per rank; 0 = use fraction
    cache: str = setting("runs/.probe_cache.json", resume=HONOURED)  # probe results by (device, model, input, dtype, optimizer, world); '' = off


@dataclass
class RunConfig:
    name: str = setting("digits", resume=IGNORED)
    dir: Optional[str] = setting(None, resume=IGNORED)  # default: runs/<name>


@dataclass
class LogConfig:
    level: str = setting("INFO", resume=HONOURED, per_machine=True)
    every_steps: int = setting(20, minimum=1, resume=HONOURED)  # step records in metrics.jsonl and TensorBoard
    progress: bool = setting(True, resume=HONOURED, per_machine=True)  # tqdm bar on rank 0 (only when the console is a terminal)
    tensorboard: bool = setting(True, resume=HONOURED)


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


def _declaration(key: str) -> dataclasses.Field | None:
    """The field declaring ``key`` (a dotted recipe key; keys inside a dict-valued field, such as
    ``data.args.size``, belong to that field), or None for a key the schema does not have."""
    node: Any = Recipe
    declared: dataclasses.Field | None = None
    for part in key.split("."):
        if node is None:  # inside a dict-valued key: its declaration covers what it holds
            return declared
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            return None
        declared = fields[part]
        default = declared.default_factory() if declared.default_factory is not dataclasses.MISSING else declared.default
        node = type(default) if dataclasses.is_dataclass(default) else None
    return declared


def resume_policy(key: str) -> Resume:
    """What a resume does when ``key`` changed. A key the schema lacks is refused."""
    declared = _declaration(key)
    if declared is None or "resume" not in declared.metadata:
        return refused("resuming with another value of this key is not supported")
    return declared.metadata["resume"]


def per_machine(key: str) -> bool:
    """True when ``key`` may differ between the machines (ranks) of one job."""
    declared = _declaration(key)
    return bool(declared is not None and declared.metadata.get("per_machine"))


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
BEST_METRICS = ("auto", "test_acc", "test_loss", "train_acc", "train_loss")


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
    _check_static_graph(recipe)
    return recipe


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what ``--print-recipe`` prints and the run dir keeps)."""
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def from_yaml(text: str, source: str = "a resolved recipe") -> Recipe:
    """The inverse of ``to_yaml``, checked like a recipe file: for a recipe that crossed a process
    or file boundary as text (a Slurm job, a checkpoint)."""
    try:
        data = yaml.safe_load(text) or {}
        merged = OmegaConf.merge(OmegaConf.structured(Recipe), OmegaConf.create(data))
        recipe = OmegaConf.to_object(merged)
    except (yaml.YAMLError, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"{source} cannot be read: {err}.", "use a recipe written by this version") from None
    _check_bounds(recipe)
    return recipe  # type: ignore[return-value]


def flat(recipe: Recipe | str) -> dict[str, Any]:
    """Every key of a recipe (or of recipe YAML, e.g. one saved in a checkpoint) as ``{"optim.lr": 0.05}``,
    values as YAML gives them: what recipe comparisons work on."""
    tree = yaml.safe_load(recipe if isinstance(recipe, str) else to_yaml(recipe)) or {}
    return _flatten(tree)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


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
    for key, value in data.items():
        if key in _sections() and value is not None and not isinstance(value, dict):
            raise _whole_section(str(key), value, f"recipe '{path}'", in_yaml=True)
    return OmegaConf.create(data)


def _sections() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Recipe))


def _whole_section(section: str, value: Any, source: str, in_yaml: bool = False) -> ConfigError:
    """``model=pkg:Net``: one value given to a whole section."""
    keys = [f.name for f in dataclasses.fields(getattr(Recipe(), section))]
    first = "name" if "name" in keys else keys[0]
    example = f"{section}: {{{first}: {value}}}" if in_yaml else f"{section}.{first}={value}"
    return ConfigError(f"'{section}' is a section of the recipe, not a value: {section}={value!r} (from {source}) "
                       f"sets none of its keys ({', '.join(keys)}).", f"set a key inside it, e.g. {example}")


def _parse_overrides(overrides: list[str] | tuple[str, ...]) -> Any:
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key or key.startswith("-"):
            raise ConfigError(f"cannot read override '{item}'.", "write overrides as key=value, e.g. train.epochs=3")
        if key in _sections():
            raise _whole_section(key, item.partition("=")[2], "overrides")
    try:
        return OmegaConf.from_dotlist([_empty_string(item) for item in overrides])
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read overrides {list(overrides)}: {err}.", "write them as key=value") from None


EMPTY_MEANS_OFF = ("memory.cache",)  # text keys whose '' is a documented value


def _empty_string(item: str) -> str:
    """``memory.cache=`` (what a shell makes of ``memory.cache=''``) is ``''``, as Hydra reads it;
    OmegaConf reads a bare ``=`` as null, which other text keys still refuse as a type error."""
    key, _, value = item.partition("=")
    return f"{key}=''" if key in EMPTY_MEANS_OFF and not value else item


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
    best = recipe.checkpoint.best_metric
    if best not in BEST_METRICS and not (recipe.train.metrics and best.startswith("test_")):
        raise ConfigError(f"checkpoint.best_metric={best!r} is not an epoch metric.",
                          f"choose one of: {', '.join(BEST_METRICS)}, or test_<name> for a name train.metrics reports")
    shape = recipe.data.synthetic_shape
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"data.synthetic_shape={list(shape)} is invalid: it must be [channels, height, width].",
                          "e.g. data.synthetic_shape=[3,32,32]")


def _check_static_graph(recipe: Recipe) -> None:
    """DDP's static graph records its first backward, which must all-reduce; with accumulation the
    first micro-batch runs under ``no_sync()`` and DDP fails inside its reducer (torch 2.14). Under
    FSDP the key is unused (``ddp.model.sharding`` says so), so nothing is refused there."""
    if recipe.dist.static_graph and recipe.train.accumulate > 1 and recipe.dist.parallel != Parallel.fsdp:
        raise ConfigError(f"dist.static_graph=true cannot be combined with train.accumulate={recipe.train.accumulate}: "
                          "DDP's static graph must all-reduce in its first backward, which accumulation skips (no_sync).",
                          "set dist.static_graph=false, or train.accumulate=1")
