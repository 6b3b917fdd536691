"""The config schema: dataclasses registered in Hydra's ConfigStore.

Every option with a fixed set of values is an Enum, so Hydra rejects a typo at compose time
with the key and the list of valid values. Numeric ranges are declared next to each field
(`bounded`) and checked by `validate` before any model is built.
"""

from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


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


class Metric(Enum):  # what `loop.evaluate` reports
    loss = "loss"
    accuracy = "accuracy"


class MetricMode(Enum):
    min = "min"
    max = "max"


class NonFiniteLoss(Enum):
    stop = "stop"  # raise with the step and the last finite loss; checkpoints stay untouched
    skip = "skip"  # drop that update, count it, go on


class Tracker(Enum):
    tensorboard = "tensorboard"
    wandb = "wandb"
    mlflow = "mlflow"
    aim = "aim"
    none = "none"


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None) -> Any:
    """A dataclass field whose value must be >= `ge` or > `gt` (checked by `validate`)."""
    return field(default=default, metadata={"ge": ge, "gt": gt})


@dataclass
class ModelConfig:
    # A hub id or a local folder for AutoModelForSequenceClassification.from_pretrained.
    # None builds a tiny random model from the fields below, with a byte-level tokenizer.
    name_or_path: str | None = None
    model_type: str = "bert"
    hidden_size: int = bounded(64, ge=1)
    num_layers: int = bounded(2, ge=1)
    num_heads: int = bounded(2, ge=1)
    intermediate_size: int = bounded(128, ge=1)
    dropout: float = bounded(0.1, ge=0)


@dataclass
class DataConfig:
    # A hub dataset id for datasets.load_dataset, or a built-in dataset (see data.BUILTIN).
    name: str | None = None
    subset: str | None = None
    # Local files per split, e.g. {train: train.csv, validation: val.csv}; csv, json(l) or parquet.
    files: dict[str, str] | None = None
    text_column: str = "text"
    label_column: str = "label"
    train_split: str = "train"
    eval_split: str = "validation"
    # Used when the dataset has no `eval_split`: this fraction of train is held out.
    eval_fraction: float = bounded(0.1, gt=0)
    max_length: int = bounded(128, ge=1)
    batch_size: int = bounded(32, ge=1)
    eval_batch_size: int = bounded(64, ge=1)
    num_workers: int = bounded(0, ge=0)


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = bounded(1e-3, gt=0)
    weight_decay: float = bounded(0.01, ge=0)
    beta1: float = bounded(0.9, ge=0)
    beta2: float = bounded(0.999, ge=0)
    eps: float = bounded(1e-8, gt=0)
    momentum: float = bounded(0.9, ge=0)  # sgd only


@dataclass
class SchedulerConfig:
    name: SchedulerName = SchedulerName.linear
    warmup_steps: int = bounded(0, ge=0)


@dataclass
class TrainerConfig:
    max_steps: int = bounded(1000, ge=1)  # optimizer steps
    seed: int = 42
    deterministic: bool = False
    mixed_precision: MixedPrecision = MixedPrecision.no
    gradient_accumulation_steps: int = bounded(1, ge=1)
    max_grad_norm: float = bounded(1.0, ge=0)  # 0 turns clipping off
    eval_every_n_steps: int = bounded(100, ge=0)  # 0: only at the end
    log_every_n_steps: int = bounded(10, ge=1)
    nonfinite_loss: NonFiniteLoss = NonFiniteLoss.stop
    # Stop when `checkpoint.monitor` has not improved by more than min_delta for `patience`
    # evaluations in a row (0 turns early stopping off).
    early_stopping_patience: int = bounded(0, ge=0)
    early_stopping_min_delta: float = bounded(0.0, ge=0)
    log_with: Tracker = Tracker.tensorboard
    tracker_project: str = "train"
    cpu: bool = False  # force the CPU even when a GPU is present


@dataclass
class CheckpointConfig:
    every_n_steps: int = bounded(0, ge=0)  # 0: no periodic checkpoints
    keep: KeepPolicy = KeepPolicy.latest
    keep_count: int = bounded(2, ge=1)
    monitor: Metric = Metric.accuracy  # for keep=best/top_k and early stopping
    mode: MetricMode = MetricMode.max


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
    overfit_steps: int = bounded(30, ge=1)
    overfit_factor: float = bounded(1.5, gt=1)  # their loss must fall to at most initial / factor
    checkpoint_round_trip: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    # "latest" (newest checkpoint of this run folder, if any) or a checkpoint folder.
    resume: str | None = None


class ConfigError(ValueError):
    """A config value that composes but makes no sense."""


def _range_problems(schema: Any, node: DictConfig, prefix: str) -> list:
    problems = []
    for f in fields(schema):
        value, key = node[f.name], prefix + f.name
        if is_dataclass(f.type):
            problems += _range_problems(f.type, value, key + ".")
        elif f.metadata.get("ge") is not None and not value >= f.metadata["ge"]:
            problems.append(f"{key}={value} is out of range: it must be >= {f.metadata['ge']}")
        elif f.metadata.get("gt") is not None and not value > f.metadata["gt"]:
            problems.append(f"{key}={value} is out of range: it must be > {f.metadata['gt']}")
    return problems


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming every bad value, before any compute is spent."""
    problems = _range_problems(TrainConfig, cfg, "")
    data = cfg.data
    if (data.name is None) == (data.files is None):
        problems.append(
            "data: set exactly one of data.name (a hub or built-in dataset) "
            "and data.files (local csv/json/parquet files per split)"
        )
    fp16 = cfg.trainer.mixed_precision == MixedPrecision.fp16
    if fp16 and (cfg.trainer.cpu or not torch.cuda.is_available()):
        problems.append(
            "trainer.mixed_precision=fp16 needs a CUDA GPU and none is in use here; "
            "use trainer.mixed_precision=bf16 (autocasts on CPU) or trainer.mixed_precision=no"
        )
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


class ValidateConfig(Callback):
    """Hydra callback: validate before Hydra creates the run folder, so a bad run leaves none."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            validate(config)
        except ConfigError as error:
            # Hydra turns exceptions in callbacks into warnings; SystemExit really stops the run.
            raise SystemExit(f"Error: {error}") from None


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain Python values (Enums as their names)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
