"""The config schema: dataclasses registered in Hydra's ConfigStore.

Every option with a fixed set of values is an Enum, so Hydra rejects a typo at compose time
with the key and the list of valid values. Numeric ranges are declared next to each field
(`bounded`) and checked by `validate` before any model is built.
"""

import difflib
import functools
import importlib
import operator
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, ListConfig, OmegaConf, read_write
from omegaconf.errors import (
    ConfigKeyError,
    GrammarParseError,
    InterpolationResolutionError,
    OmegaConfBaseException,
    ValidationError,
)

from . import launch
from .errors import UserError, reported
from .records import STATE_FILE, WEIGHTS_FILE
from .runs import flatten


class MixedPrecision(Enum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class OptimizerName(Enum):
    adamw = "adamw"
    adam = "adam"
    sgd = "sgd"


class SchedulerName(Enum):
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    linear = "linear"
    cosine = "cosine"


class KeepPolicy(Enum):
    latest = "latest"  # the newest `keep` checkpoints
    best = "best"  # the single best by `monitor`, plus the newest (to resume from)
    top_k = "top_k"  # the best `keep` by `monitor`, plus the newest


class MetricMode(Enum):
    min = "min"
    max = "max"


class NonFiniteLoss(Enum):
    # raise with the step and the last finite loss; checkpoints stay untouched. Checked when the run logs, evaluates
    # or saves, not at every step: no host-device synchronization per step
    stop = "stop"
    skip = "skip"  # drop that update, count it, go on (checked at every step: the update waits for it)


class Tracker(Enum):
    tensorboard = "tensorboard"
    wandb = "wandb"
    mlflow = "mlflow"
    aim = "aim"
    none = "none"


class SamplerName(Enum):
    tpe = "tpe"  # Optuna's default: a model of which values did well, after n_startup_trials random ones
    random = "random"
    grid = "grid"  # every combination once (choices, or ranges with a step); the sweep ends when all are done


class PrunerName(Enum):
    none = "none"
    median = "median"  # stop a trial whose metric is worse than the median of earlier trials at the same step
    successive_halving = "successive_halving"
    hyperband = "hyperband"


class ParamType(Enum):
    float = "float"
    int = "int"
    categorical = "categorical"


def bounded(
    default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None
) -> Any:
    """A dataclass field whose value must be >= `ge` or > `gt`, and <= `le` or < `lt` (checked by `validate`)."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt})


LIMITS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}


SEED_MAX = 2**32 - 1  # numpy's generators take seeds in [0, 2**32 - 1], and set_seed seeds them too


@dataclass
class ModelConfig:
    """Where the model comes from (modeling.py); the first of these that is set decides."""

    # Your own torch.nn.Module ("package.module.Class"), built with `config` as its keyword arguments;
    # with name_or_path, its weights are loaded from that folder's model.safetensors (a train.py export).
    _target_: str | None = None
    # A hub id or a local folder: pretrained weights and their tokenizer or image processor.
    name_or_path: str | None = None
    # A transformers architecture built from scratch: AutoConfig.for_model(model_type, **config).
    model_type: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Where the examples come from; what they hold (columns, lengths) is the task's business."""

    # A hub dataset id for datasets.load_dataset, or a built-in dataset of the task (its `builtin_datasets`).
    name: str | None = None
    subset: str | None = None
    # Local files per split, e.g. {train: train.csv, validation: val.csv}, or patterns ({train: "train-*.parquet"});
    # csv, tsv, json(l), parquet or txt (a paragraph per row, in a column "text"); or image folders
    # (<folder>/<label>/<image files>, datasets' imagefolder). Empty, not null, when unused: OmegaConf cannot merge
    # `data.files={train: ...}` into a null.
    files: dict[str, str] | None = field(default_factory=dict)
    train_split: str = "train"
    # The split to validate on; null, or a dataset with no split but train_split: hold out eval_fraction of train.
    eval_split: str | None = "validation"
    eval_fraction: float = bounded(0.1, gt=0, lt=1)
    # Train on part of the training split: a fraction (at most 1) or a count of examples (more than 1), drawn from
    # trainer.seed, stratified by class for classifiers; null: all of it. Validation stays whole (a proxy run's
    # metrics stay comparable with a full run's). Applied after the task prepared the data: labels and vocabulary
    # come from the whole split.
    train_subset: float | None = None
    batch_size: int = bounded(32, ge=1)
    eval_batch_size: int = bounded(64, ge=1)
    num_workers: int = bounded(0, ge=0)


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = bounded(1e-3, gt=0)
    weight_decay: float = bounded(0.01, ge=0)
    beta1: float = bounded(0.9, ge=0, lt=1)  # Adam's moment decays: torch refuses 1 and above
    beta2: float = bounded(0.999, ge=0, lt=1)
    eps: float = bounded(1e-8, gt=0)
    momentum: float = bounded(0.9, ge=0)  # sgd only


@dataclass
class SchedulerConfig:
    name: SchedulerName = SchedulerName.linear
    warmup_steps: int = bounded(0, ge=0)


@dataclass
class TrainerConfig:
    max_steps: int = bounded(1000, ge=1)  # optimizer steps
    seed: int = bounded(42, ge=0, le=SEED_MAX)
    deterministic: bool = False
    mixed_precision: MixedPrecision = MixedPrecision.no
    gradient_accumulation_steps: int = bounded(1, ge=1)
    max_grad_norm: float = bounded(1.0, ge=0)  # 0 turns clipping off
    eval_every_n_steps: int = bounded(100, ge=0)  # 0: only at the end
    log_every_n_steps: int = bounded(10, ge=1)
    nonfinite_loss: NonFiniteLoss = NonFiniteLoss.stop
    # With nonfinite_loss=skip: the most updates the whole run may drop; one more stops it like nonfinite_loss=stop.
    max_nonfinite_skips: int = bounded(10, ge=0)
    # Stop when `checkpoint.monitor` has not improved by more than min_delta for `patience`
    # evaluations in a row (0 turns early stopping off).
    early_stopping_patience: int = bounded(0, ge=0)
    early_stopping_min_delta: float = bounded(0.0, ge=0)
    log_with: Tracker = Tracker.tensorboard
    tracker_project: str = "train"
    cpu: bool = False  # force the CPU even when a GPU is present
    # Multi-process (DDP) runs of a model whose forward leaves some parameters unused (the gradient_flow check
    # names them) need true; it costs an extra pass over the graph each step, so it is off unless asked for.
    find_unused_parameters: bool = False
    # torch.compile the model: the first steps (and the first evaluation) compile, later ones may run faster.
    compile: bool = False
    # Profile a window of optimizer steps with the PyTorch profiler (profiling.py): a trace in <run folder>/profile/,
    # the top operators and the share of time waiting for data in train.log. Off: no cost.
    profile: bool = False
    profile_wait: int = bounded(10, ge=0)  # steps before the window (the first ones pay one-time costs)
    profile_steps: int = bounded(5, ge=1)  # steps in the window


@dataclass
class CheckpointConfig:
    every_n_steps: int = bounded(0, ge=0)  # 0: no periodic checkpoints
    keep: KeepPolicy = KeepPolicy.latest
    keep_count: int = bounded(2, ge=1)
    # A metric of the task, for keep=best/top_k and early stopping; null: the task's main metric.
    monitor: str | None = None
    mode: MetricMode | None = None  # null: what the metric calls better (min for loss, max for accuracy)


@dataclass
class ChecksConfig:
    """Preflight checks before the first optimizer step (see checks.py); each key turns one on or off."""

    enabled: bool = True  # false skips them all
    inputs: bool = True
    init_loss: bool = True
    init_loss_batches: int = bounded(2, ge=1)
    init_loss_tolerance: float = bounded(0.5, gt=0)  # |loss - ln(classes)| <= tolerance * ln(classes)
    validation: bool = True
    validation_batches: int = bounded(2, ge=1)
    gradient_flow: bool = True
    overfit_batch: bool = True
    overfit_examples: int = bounded(8, ge=1)  # the first examples of a training batch
    overfit_steps: int = bounded(200, ge=1)  # at most; the check stops once the loss reached the target
    overfit_factor: float = bounded(1.5, gt=1)  # their loss should fall to at most initial / factor
    checkpoint_round_trip: bool = True


@dataclass
class TrainConfig:
    # The task: `_target_` names its class (a tasks.base.Task); the other keys are its fields.
    task: dict[str, Any] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    # "latest" (newest checkpoint of this run folder, if any) or a checkpoint folder.
    resume: str | None = None
    # Keys (or groups) a resume may change although the checkpoint's run had other values (run_folder.RESUME_SAFE).
    resume_allow: list[str] = field(default_factory=list)


@dataclass
class EvaluateConfig(TrainConfig):
    """evaluate.py: the training config, plus what to evaluate."""

    split: str = "validation"  # a split of the dataset (the held-out part of train is "validation")
    # A checkpoint folder (checkpoints/step_XXXXXXXX): its weights, with the task and model of its run.
    # Without it, the model is the `model` config: model.name_or_path=<run folder>/model for an exported one.
    checkpoint_path: str | None = None


@dataclass
class SearchDimension:
    """One swept config key: a float or int range from low to high (log-uniform with log: true, on a grid of `step`
    when set), or a list of choices (type: categorical)."""

    type: ParamType = ParamType.float
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None


@dataclass
class SweepConfig:
    """sweep.py: an Optuna study over the training config (see configs/sweep/)."""

    n_trials: int = bounded(20, ge=1)  # finished trials (complete or pruned) of the whole study, all workers together
    sampler: SamplerName = SamplerName.tpe
    pruner: PrunerName = PrunerName.median
    # The sampler's; leave null when several workers share the study (they would agree).
    seed: int | None = bounded(None, ge=0, le=SEED_MAX)
    n_startup_trials: int = bounded(5, ge=0)  # trials before TPE models the results and the median pruner prunes
    n_warmup_steps: int = bounded(0, ge=0)  # median pruner: no pruning before this optimizer step
    # successive_halving and hyperband: the fewest optimizer steps a trial gets (null: trainer.eval_every_n_steps),
    # and by how much each rung cuts the trials that go on.
    min_resource: int | None = None
    reduction_factor: int = bounded(3, ge=2)
    # The search space: config keys (nested, or dotted) mapped to a SearchDimension, e.g.
    # optimizer: {lr: {type: float, low: 1e-4, high: 1e-2, log: true}}.
    params: dict[str, Any] = field(default_factory=dict)
    # An Optuna storage URL (sqlite:///..., postgresql://...); null: study.db in the sweep's folder.
    storage: str | None = None
    study_name: str = "sweep"


@dataclass
class SweepAppConfig(TrainConfig):
    """sweep.py: the training config of every trial, plus the sweep."""

    sweep: SweepConfig = field(default_factory=SweepConfig)


class ConfigError(UserError, ValueError):
    """A config value that composes but makes no sense."""


def refuse(problems: list) -> None:
    """Every problem found, in one ConfigError."""
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def unresolvable(node: DictConfig | ListConfig, prefix: str = "", keys: list | None = None) -> list:
    """Each value whose interpolation (`${oc.env:DATA_DIR}/train.csv`, `${trainer.max_steps}`) cannot be resolved,
    with why: OmegaConf would raise it, with a traceback, where the value is first used. Hydra's own node is left
    out: ValidateConfig checks the run or sweep folder, which is what Hydra resolves of it before the run. `keys`:
    only these keys of `node`."""
    problems = []
    for key in keys or (node.keys() if isinstance(node, DictConfig) else range(len(node))):
        if prefix or key != "hydra":
            try:
                value = node[key]
            except (InterpolationResolutionError, GrammarParseError) as error:
                raw = node._get_node(key)._value()
                why = re.sub(r"^\w+ raised while resolving interpolation: ", "", str(error).splitlines()[0])
                problems.append(f"{prefix}{key}={raw} cannot be resolved: {why}")
                continue
            if isinstance(value, DictConfig | ListConfig):
                problems += unresolvable(value, f"{prefix}{key}.")
    return problems


def _unknown_keys(node: DictConfig, prefix: str, everywhere: list) -> list:
    """Keys that are not fields of the node's schema dataclass, as `+key=value` and `++key=value` add them (the
    plain form fails at compose time), so a typo never passes silently. Free-form nodes (`task`, whose keys
    build_task checks, and `model.config`) have no schema and are skipped. `everywhere` holds every key of the
    schema, dotted, for a key given at the wrong level."""
    schema = OmegaConf.get_type(node)
    if not is_dataclass(schema):
        return []
    names = [f.name for f in fields(schema)]
    problems = [_not_a_key(prefix, str(key), names, everywhere) for key in node.keys() if key not in [*names, "hydra"]]
    for name in names:
        child = node._get_node(name)
        if isinstance(child, DictConfig):
            problems += _unknown_keys(child, f"{prefix}{name}.", everywhere)
    return problems


def _not_a_key(prefix: str, key: str, names: list, everywhere: list) -> str:
    """`<prefix><key> is not a config key`, with the key of `names` (or of the whole schema, `everywhere`) it is
    likely to be, or else the keys there are."""
    close = difflib.get_close_matches(key, names, n=1)
    elsewhere = [path for path in everywhere if path.rsplit(".", 1)[-1] == key]
    suggestion = prefix + close[0] if close else (elsewhere or [None])[0]
    hint = f"did you mean {suggestion}?" if suggestion else f"the keys here are {names}"
    return f"{prefix}{key} is not a config key: {hint}"


def override_key(override: str) -> str:
    """The key that a command-line override sets: "optimizer.lr" of "optimizer.lr=1e-3", "+a.b=1" and "~a.b"."""
    return override.lstrip("+~").partition("=")[0]


def refuse_unknown_overrides(schema: Any, config_dir: Path, overrides: list) -> None:
    """A command-line `key=value` whose key is not in the schema is a ConfigError naming the key it is likely to be.
    Hydra refuses it too, but advises `+key=value`, which adds the typo (and validation then refuses it): right
    only for the free-form nodes (`task`, `model.config`, `data.files`), whose keys, like Hydra's own (`hydra.*`)
    and the groups outside the schema (`experiment=`), are left to Hydra. Options (-m) and +, ++ and ~ are too."""
    groups = [path.name for path in Path(config_dir).iterdir() if path.is_dir()]
    given = [match[1] for override in overrides if (match := re.match(r"([A-Za-z_][\w.]*)=", override))]
    refuse([problem for key in given if (problem := unknown_key(schema, key, [*groups, "hydra"]))])


def unknown_key(schema: Any, key: str, allowed: list = (), shown_as: str = "") -> str | None:
    """What is wrong with the dotted `key` of a schema dataclass (see _not_a_key), or None: a key of the schema, a
    key under one of its free-form nodes, or a first part in `allowed`. `shown_as`: a prefix to name the key
    with (the sweep's `sweep.params.`), suggestions included."""
    node, prefix = schema, shown_as
    for part in key.split("."):
        if not is_dataclass(node):
            return None  # a free-form node
        types = {f.name: f.type for f in fields(node)}
        if part not in types:
            if prefix == shown_as and part in allowed:  # at the top, where the groups outside the schema are
                return None
            return _not_a_key(prefix, part, list(types), [shown_as + path for path in _schema_keys(schema)])
        node, prefix = types[part], f"{prefix}{part}."
    return None


def _schema_keys(schema: Any, prefix: str = "") -> list:
    """Every key of a schema dataclass, dotted: ["model._target_", ..., "trainer.max_steps", ...]."""
    keys = []
    for f in fields(schema):
        keys += _schema_keys(f.type, f"{prefix}{f.name}.") if is_dataclass(f.type) else [prefix + f.name]
    return keys


def range_problems(schema: Any, node: DictConfig, prefix: str) -> list:
    problems = []
    for f in fields(schema):
        value, key = node[f.name], prefix + f.name
        if is_dataclass(f.type):
            problems += range_problems(f.type, value, key + ".")
        elif value is None:  # null, where the field allows it: no number to check
            continue
        else:
            for name, (sign, holds) in LIMITS.items():
                limit = f.metadata.get(name)
                if limit is not None and not holds(value, limit):
                    problems.append(f"{key}={value} is out of range: it must be {sign} {limit}")
                    break
    return problems


def build_task(node: DictConfig) -> Any:
    """The task object of the `task` node: its class (`task._target_`, a tasks.base.Task) is a dataclass whose
    fields are the node's other keys, so a typo or a value of the wrong type fails like any other config error."""
    target = node.get("_target_")
    if not target:
        raise ConfigError("task._target_ is not set: choose a task with task=<name> (the files in configs/task/)")
    task_class = import_target("task._target_", target)
    refuse_bad_metrics(task_class)
    options = {key: value for key, value in node.items() if key != "_target_"}
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(task_class), options))
    except ConfigKeyError as error:
        keys = [f.name for f in fields(task_class)]
        close = difflib.get_close_matches(str(error.key), keys, n=1)
        hint = f"did you mean task.{close[0]}?" if close else f"it has {keys}"
        raise ConfigError(f"task.{error.key} is not an option of {task_class.__name__}: {hint}") from None
    except ValidationError as error:
        raise ConfigError(f"task.{error.key}: {str(error).splitlines()[0]}") from None


def refuse_bad_metrics(task_class: type) -> None:
    """A task class's `metrics` (name -> MetricMode, "loss" among them) and `main_metric` (one of them), checked
    before any run: a mode given as "max" or a main metric not declared failed with a traceback later."""
    name, metrics = task_class.__name__, task_class.metrics
    modes = [f"{metric}: {mode!r}" for metric, mode in metrics.items() if not isinstance(mode, MetricMode)]
    if modes:
        raise ConfigError(
            f"{name}.metrics gives {', '.join(modes)}: give each metric MetricMode.max or MetricMode.min (config.py)"
        )
    if "loss" not in metrics or task_class.main_metric not in metrics:
        raise ConfigError(
            f'{name}.metrics declares {sorted(metrics)}: it must hold "loss" (the non-finite guard reads it) and '
            f"{name}.main_metric={task_class.main_metric!r}"
        )


def import_target(key: str, target: str) -> type:
    """The class that the config key `key` names, "package.module.Class", or a ConfigError: a name that is not there,
    or a module that imports a package not installed here. Any other error of the module's code is raised as it is:
    its traceback is what you need to mend it."""
    module_name, _, name = target.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else None
    except ModuleNotFoundError as error:
        if error.name is not None and not f"{module_name}.".startswith(f"{error.name}."):  # its own import
            raise ConfigError(
                f"{key}={target}: its module imports {error.name!r}, which is not installed here ({error})"
            ) from None
        module = None
    if module is None:
        raise ConfigError(
            f"{key}={target}: no module {module_name or target!r} can be imported; give package.module.Class of a "
            "module that Python finds (in src/, beside the command, or installed)"
        )
    if not isinstance(getattr(module, name, None), type):
        classes = [
            attr for attr, value in vars(module).items() if isinstance(value, type) and value.__module__ == module_name
        ]
        close = difflib.get_close_matches(name, classes, n=1)
        hint = f"did you mean {module_name}.{close[0]}?" if close else f"its classes are {sorted(classes)}"
        raise ConfigError(f"{key}={target}: module {module_name} has no class {name!r}; {hint}")
    return getattr(module, name)


def _task_problems(cfg: DictConfig) -> list:
    try:
        task = build_task(cfg.task)
    except ConfigError as error:
        return [str(error)]
    problems = range_problems(type(task), OmegaConf.structured(task), "task.")
    metrics = task.metrics
    monitor = cfg.checkpoint.monitor
    if monitor is not None and monitor not in metrics:
        problems.append(f"checkpoint.monitor={monitor} is not a metric of this task; its metrics are {list(metrics)}")
    elif cfg.checkpoint.mode not in (None, metrics[monitor or task.main_metric]):
        monitored = f"checkpoint.monitor={monitor}" if monitor else f"the task's main metric, {task.main_metric},"
        problems.append(
            f"checkpoint.mode={cfg.checkpoint.mode.value} contradicts {monitored} whose better values are "
            f"{metrics[monitor or task.main_metric].value}; leave checkpoint.mode unset (null)"
        )
    return problems


def user_path(value: str) -> Path:
    """A path from the config: ~ expanded, and a relative one taken from the folder the command was run in (Hydra's
    original working directory), also with hydra.job.chdir=true, which starts the run inside its run folder."""
    return Path(to_absolute_path(str(Path(value).expanduser())))


def model_folder(name_or_path: str) -> Path | None:
    """The local folder that `model.name_or_path` names, or None for a hub id. A path that is not there is refused
    here: transformers would take it for a hub id and fail with a repo id syntax or connection error."""
    folder = user_path(name_or_path)
    if (folder / STATE_FILE).is_file():
        raise ConfigError(
            f"model.name_or_path={name_or_path} is a checkpoint, not a model folder: evaluate it with "
            f"checkpoint_path={name_or_path}, continue its run with resume={name_or_path}, or give its run's exported "
            "model (<run folder>/model)"
        )
    exported = ("config.json", WEIGHTS_FILE)  # what an export of train.py holds
    if (folder / "model").is_dir() and not any((folder / name).is_file() for name in exported):
        raise ConfigError(
            f"model.name_or_path={name_or_path} is a run folder: its exported model is "
            f"model.name_or_path={folder / 'model'}"
        )
    if folder.is_dir():
        return folder
    if folder.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        problem = "is a file, not a folder" if folder.exists() else "no such folder"
        raise ConfigError(
            f"model.name_or_path={name_or_path}: {problem} (give a model folder, e.g. <run folder>/model, "
            "or a hub id such as namespace/name)"
        )
    return None


def _model_problems(model: DictConfig) -> list:
    if all(model[key] is None for key in ("_target_", "name_or_path", "model_type")):
        return [
            "model: set one of model._target_ (your own nn.Module), model.name_or_path (a hub id or a folder) "
            "and model.model_type (a transformers architecture from scratch), or pick one with model=<name>"
        ]
    if model._target_ is not None and model.model_type is not None:  # one of them would go unused, unsaid
        kind = model.model_type
        return [
            f"model._target_={model._target_} (your own module) and model.model_type={kind} (a transformers "
            f"architecture) are both set, and one model is built: model.model_type=null for your own module; for a "
            f"{kind} from scratch, model=pretrained model.name_or_path=null model.model_type={kind} (its model.config "
            "starts empty: +model.config.<key>=<value>)"
        ]
    try:
        if model._target_ is not None:
            import_target("model._target_", model._target_)
        if model.name_or_path is not None:
            model_folder(model.name_or_path)
        elif model._target_ is None:
            refuse_unknown_model_type(model.model_type)
    except ConfigError as error:
        return [str(error)]
    return []


def refuse_unknown_model_type(model_type: str) -> None:
    """model.model_type must name a transformers architecture (one this version knows, or one registered with it)."""
    from transformers import CONFIG_MAPPING  # here: a command refused earlier never waits for transformers

    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING), n=3)
        raise ConfigError(
            f"model.model_type={model_type} is not an architecture of this transformers "
            f"({'did you mean ' + ' or '.join(close) + '?' if close else 'its model types are in its docs'}); or "
            "pick a model group, model=<name> (configs/model/)"
        )


def _resume_allow_problems(cfg: DictConfig) -> list:
    """resume_allow entries that are no key or group of the config: a misspelt one accepts nothing."""
    absent = object()
    allowed = [key for key in cfg.get("resume_allow") or [] if key != "num_processes"]  # (a checkpoint records it)
    unknown = [key for key in allowed if OmegaConf.select(cfg, key, default=absent) is absent]
    if not unknown:  # every command is validated: the keys to suggest from are gathered only when needed
        return []
    keys = [*flatten(OmegaConf.to_container(cfg, resolve=False)), *cfg.keys()]
    named = []
    for key in unknown:
        close = difflib.get_close_matches(key, keys, n=1)
        named.append(key + (f" (did you mean {close[0]}?)" if close else ""))
    return [f"resume_allow=[{', '.join(named)}]: not a key or group of the config"]


def idle_settings(cfg: DictConfig) -> list:
    """Valid settings that this run's other settings leave without effect (for a warning: a short test run, say)."""
    trainer, idle = cfg.trainer, []
    evaluates_before_the_end = trainer.eval_every_n_steps and trainer.eval_every_n_steps < trainer.max_steps
    if trainer.early_stopping_patience and trainer.eval_every_n_steps and not evaluates_before_the_end:
        idle.append(
            f"trainer.early_stopping_patience={trainer.early_stopping_patience} counts evaluations during training, "
            f"and trainer.eval_every_n_steps={trainer.eval_every_n_steps} with trainer.max_steps={trainer.max_steps} "
            "evaluates only at the end: it never stops this run"
        )
    # optimizer.name=sgd keeps the values of the group chosen (adamw.yaml leaves lr and weight decay to the task, tuned
    # for AdamW); optimizer=sgd brings sgd.yaml's.
    group = HydraConfig.get().runtime.choices.get("optimizer") if HydraConfig.initialized() else None
    if group is not None and cfg.optimizer.name.value != group:
        idle.append(
            f"optimizer.name={cfg.optimizer.name.value} keeps the lr and weight decay of optimizer={group} "
            f"(lr {cfg.optimizer.lr}); optimizer={cfg.optimizer.name.value} brings its own file's"
        )
    return idle


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming every bad value, before any compute is spent."""
    refuse(unresolvable(cfg))
    schema = OmegaConf.get_type(cfg)
    problems = _unknown_keys(cfg, "", _schema_keys(schema)) if is_dataclass(schema) else []
    problems += range_problems(TrainConfig, cfg, "")
    problems += _task_problems(cfg) + _model_problems(cfg.model) + _resume_allow_problems(cfg)
    if "checkpoint_path" in cfg and cfg.resume is not None:  # evaluate.py's config is train.py's, plus its own keys
        problems.append(
            f"resume={cfg.resume}: evaluate.py continues no run; checkpoint_path=<checkpoint folder> evaluates a "
            "checkpoint (model.name_or_path=<run>/model an export)"
        )
    data = cfg.data
    if (data.name is None) == (not data.files):
        problems.append(
            f"data: set exactly one of data.name (a hub or built-in dataset; now {data.name}) and data.files (local "
            "csv/tsv/json/parquet/txt files or image folders per split; data=files sets it, with data.name=null)"
        )
    if "checkpoint_path" in cfg and cfg.checkpoint_path is None and cfg.model.name_or_path is None:
        problems.append(  # evaluate.py: a model nobody trained (the default's, built from scratch) is not a result
            "evaluate.py evaluates a trained model: give model.name_or_path=<run folder>/model (what train.py "
            "exported, or a hub id with model=pretrained) or checkpoint_path=<run folder>/checkpoints/step_XXXXXXXX"
        )
    if cfg.resume not in (None, "latest") and not user_path(cfg.resume).is_dir():
        problems.append(
            f"resume={cfg.resume}: no such folder; give a checkpoint folder (<run folder>/checkpoints/step_XXXXXXXX) "
            "or resume=latest with hydra.run.dir=<run folder>"
        )
    subset = data.train_subset
    if subset is not None and not (subset > 0 and (subset <= 1 or subset == int(subset))):
        problems.append(
            f"data.train_subset={subset} is neither a fraction in (0, 1] nor a whole count of examples; null: all"
        )
    checkpoint, eval_every = cfg.checkpoint, cfg.trainer.eval_every_n_steps
    if (
        checkpoint.keep != KeepPolicy.latest
        and checkpoint.every_n_steps
        and (not eval_every or checkpoint.every_n_steps % eval_every)
    ):
        problems.append(  # a checkpoint's record holds the metrics of the last evaluation, maybe of an older step
            f"checkpoint.keep={checkpoint.keep.value} ranks checkpoints by the evaluation at their step, and "
            f"trainer.eval_every_n_steps={eval_every} does not evaluate every checkpoint (checkpoint.every_n_steps="
            f"{checkpoint.every_n_steps}): make checkpoint.every_n_steps a multiple of trainer.eval_every_n_steps"
        )
    if cfg.trainer.early_stopping_patience and not cfg.trainer.eval_every_n_steps:
        problems.append(
            f"trainer.early_stopping_patience={cfg.trainer.early_stopping_patience} counts evaluations, and with "
            "trainer.eval_every_n_steps=0 the run evaluates only at its end: set trainer.eval_every_n_steps"
        )
    fp16 = cfg.trainer.mixed_precision == MixedPrecision.fp16
    if fp16 and (cfg.trainer.cpu or not torch.cuda.is_available()):
        problems.append(
            "trainer.mixed_precision=fp16 needs a CUDA GPU and none is in use here; "
            "use trainer.mixed_precision=bf16 (autocasts on CPU) or trainer.mixed_precision=no"
        )
    refuse(problems)


class ValidateConfig(Callback):
    """Hydra callback: validate before Hydra creates the run folder, so a bad run leaves none."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns exceptions in callbacks into warnings; `reported` exits (SystemExit), which really stops it.
        with reported():
            refuse(unresolvable(config.hydra.run, "hydra.run.", ["dir"]))
            # Set now what Hydra sets as the run starts, so a value that interpolates ${hydra:runtime.output_dir}
            # (or any ${hydra:...}) resolves here as it will in the run.
            with read_write(config.hydra.runtime):
                config.hydra.runtime.output_dir = os.path.abspath(str(config.hydra.run.dir))
            HydraConfig.instance().set_config(config)
            validate(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with reported():  # each job's config is validated as it starts (its sweep values differ)
            refuse(unresolvable(config.hydra.sweep, "hydra.sweep.", ["dir"]))
            if launch.world_size() > 1:  # the processes' group ends with the first job, and the second one hung
                raise ConfigError(
                    "train.py -m runs its jobs one after another in the same processes, which a multi-process launch "
                    "cannot: launch each job on its own (accelerate launch ... train.py <one job's overrides>), or "
                    "send the jobs to a cluster (-m hydra/launcher=slurm)"
                )


def yaml_mistake(error: yaml.YAMLError) -> str:
    """Where and what a YAML error is: "(line 4, column 14): expected ',' or ']', but got '<stream end>'"."""
    mark = getattr(error, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    return f"{where}: {getattr(error, 'problem', None) or error}"


def refuse_before_compose(config_dir: Path, schema: Any, overrides: list) -> None:
    """What Hydra would refuse with a traceback or a misleading hint, refused first in a message of ours: a config
    file that is not valid YAML, a command-line key that is not in the schema."""
    refuse_invalid_yaml(config_dir)
    refuse_unknown_overrides(schema, config_dir, overrides)


def refuse_invalid_yaml(config_dir: Path) -> None:
    """A config file that is not valid YAML, or that gives a key twice, is a ConfigError naming the file and line:
    Hydra would fail on it with PyYAML's traceback, forty frames deep. Every file, used by this run or not: an edit
    left half done fails now, not in the run that needs it. libyaml parses all of them in 3 ms."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, where PyYAML was built with it
    for path in sorted(Path(config_dir).rglob("*.yaml")):
        text = path.read_text()
        try:
            twice = _key_given_twice(yaml.compose(text, Loader=loader))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            lines = text.splitlines()
            line = lines[mark.line][: mark.column + 1] if mark and mark.line < len(lines) else ""
            tab = " (a tab: YAML indents with spaces)" if "\t" in line else ""
            raise ConfigError(f"{path} is not valid YAML{yaml_mistake(error)}{tab}") from None
        if twice is not None:
            mark = twice.start_mark
            raise ConfigError(
                f"{path} gives the key {twice.value!r} twice (line {mark.line + 1}, column {mark.column + 1}): keep one"
            )


def _key_given_twice(node: yaml.Node | None) -> yaml.Node | None:
    """The first key that a mapping under `node` holds twice (OmegaConf refuses such a file), or None."""
    if isinstance(node, yaml.MappingNode):
        keys = [str(key.value) for key, _ in node.value]
        repeated = next((key for i, (key, _) in enumerate(node.value) if str(key.value) in keys[:i]), None)
        if repeated is not None:
            return repeated
        children = [value for _, value in node.value]
    else:
        children = node.value if isinstance(node, yaml.SequenceNode) else []
    return next((twice for child in children if (twice := _key_given_twice(child)) is not None), None)


@functools.cache  # once per process: each store converts the dataclasses anew (the tests run scripts in-process)
def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)
    ConfigStore.instance().store(name="sweep_schema", node=SweepAppConfig)


def compose_train(config_dir: Path, overrides: list) -> DictConfig:
    """train.py's config of `overrides` composed outside train.py (rank_check.py, bench/parity.py) and validated; a
    group, key or value that is not there or not allowed is a ConfigError."""
    register_configs()
    refuse_before_compose(config_dir, TrainConfig, overrides)
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir)):
        try:
            cfg = compose(config_name="train", overrides=list(overrides))
        except (HydraException, OmegaConfBaseException) as error:
            raise ConfigError(str(error)) from None
    validate(cfg)
    return cfg


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain Python values (Enums as their names)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
