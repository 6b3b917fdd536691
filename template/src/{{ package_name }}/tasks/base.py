"""The task contract: everything that differs between tasks, in one place.

A task turns the `data` config into batches, builds the model, and says how to score it. The loop, the preflight
checks and evaluate.py call only the methods below, never a task by name, so a new task is one module here, one
config file (configs/task/<name>.yaml, whose `_target_` names the class) and one test file.

A task class is a dataclass: its fields are the keys of the `task` config node, checked like the rest of the
config (config.build_task). Methods run in this order: `load`, `build_model`, then `collate`, `loss`,
`evaluate_batch`, `compute_metrics` and `samples` as the loop needs them.
"""

import inspect
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from datasets import DatasetDict
from omegaconf import DictConfig

from ..config import ConfigError, MetricMode
from ..errors import UserError, warn

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label of positions without a loss: padding, prompts (the transformers convention)


@dataclass
class Task:
    """Subclass as a dataclass; set the class variables, and override the methods marked "override"."""

    # Metric name -> which way is better. `main_metric` is what checkpoint.monitor defaults to.
    metrics: ClassVar[dict[str, MetricMode]] = {"loss": MetricMode.min}
    main_metric: ClassVar[str] = "loss"
    # Built-in datasets, selected with data.name=<key>: name -> function(seed) returning a DatasetDict.
    builtin_datasets: ClassVar[dict] = {}
    # The column of class ids in what `load` returns, for classifiers: a data.train_subset keeps every class's share
    # of the training split. None: the subset is drawn without regard to labels.
    stratify_by: ClassVar[str | None] = None
    # For tasks that predict a sequence in order, (key, seen): the scores at position t may read batch[key] only at
    # positions before t + seen. ("input_ids", 1) for a causal LM: tokens up to t predict token t + 1; ("labels", 0)
    # for an encoder-decoder: the labels before t predict label t. Checked on your own module before it trains: one
    # that reads what it is to predict reaches a perplexity near 1 and learns nothing. None: no order.
    predicted_in_order: ClassVar[tuple | None] = None

    # Data ------------------------------------------------------------------------------------------------

    def load(self, data: DictConfig, model: DictConfig, seed: int) -> DatasetDict:
        """Override: model-ready train and validation splits (other splits may follow), tokenized or otherwise
        prepared, and set `self.processor` (the tokenizer or image processor, exported with the model) and
        whatever `build_model` needs to know about the data (labels, vocabulary)."""
        raise NotImplementedError

    processor: ClassVar[Any] = None  # set by `load`; saved beside the exported model
    # A classifier's class names in id order, set by `load`: saved with the model and its checkpoints, so that
    # evaluate.py refuses data whose labels have other names (they would be scored by position).
    labels: ClassVar[list | None] = None

    def collate(self, examples: list) -> dict:
        """Override: a batch of tensors from a list of examples. `labels` holds the targets: integers are class
        (or token) ids below `num_outputs`, IGNORE_INDEX where no loss is taken; floats are real-valued targets (a
        regression, with its own `loss`). Every other key is passed to the model's forward."""
        raise NotImplementedError

    # Model -----------------------------------------------------------------------------------------------

    def build_model(self, model: DictConfig) -> torch.nn.Module:
        """Override: the model (modeling.build_model does the three ways of the `model` config). Called after
        seeding, so random init is reproducible."""
        raise NotImplementedError

    # Scoring ---------------------------------------------------------------------------------------------

    def model_inputs(self, batch: dict) -> dict:
        """The keyword arguments of the model's forward for `batch`: all but the labels."""
        return {name: value for name, value in batch.items() if name != "labels"}

    def logits(self, model, batch: dict) -> torch.Tensor:
        """The model's output scores for `batch`, aligned with batch["labels"] ([..., classes or vocabulary])."""
        return logits_of(model(**self.model_inputs(batch)))

    def labelled(self, batch: dict) -> torch.Tensor:
        """How many labelled items (examples or tokens) the batch holds: the loss is a sum over these."""
        return (batch["labels"] != IGNORE_INDEX).sum()

    def tokens(self, batch: dict) -> torch.Tensor | None:
        """How many tokens the model reads in `batch`, for the tokens/s of the metrics file: the non-padding input
        tokens (all of `input_ids` when there is no attention mask); None for inputs that are not tokens (images).
        A count on the batch's device: the loop adds these up and reads them only when it logs."""
        ids = batch.get("input_ids")
        if ids is None:
            return None
        mask = batch.get("attention_mask")
        return ids.numel() if mask is None else mask.sum()

    def loss(self, model, batch: dict) -> torch.Tensor:
        """The loss summed over the labelled items of `batch`: the one loss of training, evaluation and the
        checks. The loop divides by the item count of the whole accumulation cycle (see loop.accumulate_cycle)."""
        logits = self.logits(model, batch)
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(),
            batch["labels"].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )

    def num_outputs(self, model) -> int:
        """Override: the number of classes a label can take (classes, or the vocabulary for generated text)."""
        raise NotImplementedError

    def expected_init_loss(self, model) -> float | None:
        """The mean loss of the untrained model: uniform predictions over `num_outputs` give ln(outputs).
        None when the model is not expected to predict uniformly (a pretrained language model)."""
        return math.log(self.num_outputs(model))

    def input_problem(self, model, batch: dict) -> str | None:
        """What is wrong with a batch before any forward pass (on a GPU a bad id is an opaque device assert):
        no tokens, token ids outside the embedding table, class ids outside [0, outputs), non-finite values. None if
        fine."""
        ids = batch.get("input_ids")
        if ids is not None and not ids.numel():  # seen with a tokenizer transformers built in place of the saved one
            return f"input_ids of shape {list(ids.shape)}: no tokens at all (does the tokenizer know these texts?)"
        rows = None if ids is None else embedding_rows(model)
        if rows is not None and (ids.min() < 0 or ids.max() >= rows):
            return f"input_ids from {ids.min().item()} to {ids.max().item()} (embedding rows: {rows})"
        for name, value in batch.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                return f"non-finite values in {name}"
        labels = batch.get("labels")
        if labels is None:
            return "a batch without labels"
        if labels.is_floating_point():  # real-valued targets: any finite value (checked above)
            return None
        real = labels[labels != IGNORE_INDEX]
        outputs = self.num_outputs(model)
        if real.numel() and (real.min() < 0 or real.max() >= outputs):
            return f"labels from {real.min().item()} to {real.max().item()} (allowed: 0 to {outputs - 1}, or ignored)"
        return None

    @torch.no_grad()
    def evaluate_batch(self, model, batch: dict) -> list:
        """Override: one JSON-ready record per example: the numbers `compute_metrics` needs and what the
        prediction was (evaluate.py writes these records as predictions.jsonl)."""
        raise NotImplementedError

    def compute_metrics(self, records: list) -> dict:
        """Override: the metrics (floats, one per name of `metrics`) over the records of every example."""
        raise NotImplementedError

    @torch.no_grad()
    def samples(self, model, dataset) -> dict:
        """A few examples of what the model produces, as text for the tracker (generative tasks); {} if none."""
        return {}


# The names transformers configs give the number of positions a model can attend to.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


def max_positions(model) -> int | None:
    """The most tokens the model reads at once, as its config states it (None: it states no limit, as T5's relative
    positions or your own module). RoBERTa-style position ids start after the padding id: those rows are not usable."""
    config = getattr(model, "config", None)
    positions = next((getattr(config, key) for key in POSITION_KEYS if getattr(config, key, None)), None)
    if positions is None or positions <= 0:  # XLNet: -1
        return None
    tables = (module for name, module in model.named_modules() if name.endswith("embeddings.position_embeddings"))
    padding = getattr(next(tables, None), "padding_idx", None)
    return positions if padding is None else positions - padding - 1


def refuse_longer_than_positions(model, lengths: dict) -> None:
    """Refuse a task whose inputs (`lengths`: task key -> tokens) reach past the model's positions: the first long
    batch would fail deep in the model (a tensor size that does not match), or read positions it never learnt."""
    positions = max_positions(model)
    key, tokens = max(lengths.items(), key=lambda item: item[1])
    if positions is not None and tokens > positions:
        raise ConfigError(
            f"{key}={tokens} is longer than the {positions} positions the model has: lower {key}, or choose a model "
            "of more positions (a model from scratch gets as many as the task's lengths need)"
        )


def embedding_rows(model) -> int | None:
    """The rows of the model's input embedding table (the ids it takes), None if it has none: images, or
    characters hashed into several tables (CANINE). The weight's rows, not config.vocab_size, nor
    `num_embeddings`, which quantized embeddings (I-BERT) lack."""
    try:
        weight = getattr(model.get_input_embeddings(), "weight", None)
    except (AttributeError, NotImplementedError):  # no get_input_embeddings, or none the model can name
        return None
    return None if weight is None else weight.shape[0]


def refuse_what_the_model_cannot_take(task: Task, model, splits: dict, model_config: DictConfig) -> None:
    """Before the first step (of training or evaluation): the model's forward must take the inputs the task passes,
    and its tables every id of `splits`. Either failed at the first batch that showed it, with a traceback."""
    example = next(iter(splits.values()))[0]
    inputs = task.model_inputs(task.collate([example]))
    problem = call_problem(model.forward, inputs)
    if problem is not None:
        named = f"model._target_={model_config._target_}" if model_config._target_ else "the model"
        raise ConfigError(
            f"{named}: its forward{inspect.signature(model.forward)} cannot take what the task passes, the keyword "
            f"arguments {list(inputs)} ({problem}): take them by these names (**kwargs takes those it does not use)"
        )
    _refuse_ids_past_the_model(task, model, splits, model_config.name_or_path)
    if model_config._target_ is not None:  # a transformers model is built for the task's sizes
        refuse_wrong_outputs(task, model, task.collate([example]), model_config._target_)


def refuse_wrong_outputs(task: Task, model, batch: dict, target: str) -> None:
    """Your own module's scores for a batch of one example, before anything trains: one row of `num_outputs` scores
    per label (a module built for other sizes trains a head of other classes without an error, or fails at the
    first evaluation), none that reads ahead (`predicted_in_order`); and say that a loss it returns goes unused."""
    returned = []
    hook = model.register_forward_hook(lambda module, args, output: returned.append(output))
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # as if it never ran: no dropout, no RNG drawn
            try:
                logits = task.logits(model, batch)
            except UserError:
                raise
            except Exception:  # a model that cannot run is said where it runs: the preflight checks, the first batch
                return
            labels, outputs = batch["labels"], task.num_outputs(model)
            if logits.shape[:-1] != labels.shape or logits.size(-1) != outputs:
                raise ConfigError(
                    f"model._target_={target} gives scores of shape {list(logits.shape)} for labels of shape "
                    f"{list(labels.shape)}, and the task has {outputs} classes (or tokens): give one row of {outputs} "
                    "scores per label; its __init__ gets the count by name (num_labels for classes, vocab_size for a "
                    "vocabulary) if it takes an argument so named"
                )
            ahead = task.predicted_in_order is not None and reads_ahead(task, model, batch, *task.predicted_in_order)
    finally:
        hook.remove()
        model.train(training)
    if ahead:
        raise ConfigError(
            f"model._target_={target}: its scores at a position change with {task.predicted_in_order[0]} it may not "
            "see there, so it reads what it is to predict: let each position see only those before it (a causal mask)"
        )
    output = returned[0] if returned else None  # none where a task's `logits` calls no forward of the model's own
    own_loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if own_loss is not None:
        warn(
            logger,
            f"model._target_={target} returns a loss of its own, which goes unused: the task's `loss` is the one "
            "loss of training, evaluation and the checks (a Task subclass that overrides `loss` trains with yours)",
        )


def reads_ahead(task: Task, model, batch: dict, key: str, seen: int) -> bool:
    """Whether changing batch[key] from the middle position on changes the scores at a position t that may read it
    only before t + `seen` (see Task.predicted_in_order)."""
    values = batch[key]
    half = values.size(1) // 2
    changed = values.clone()
    later = changed[:, half:]
    later[later != IGNORE_INDEX] = (later[later != IGNORE_INDEX] + 1) % task.num_outputs(model)
    blind = half - seen + 1  # the positions t with t + seen <= half
    before, after = (task.logits(model, {**batch, key: tensor})[:, :blind] for tensor in (values, changed))
    return not torch.allclose(before, after, rtol=1e-4, atol=1e-5)


def call_problem(function, arguments: dict) -> str | None:
    """Why `function` cannot be called with these keyword arguments (TypeError's words), or None where it can. A
    function that is not there (None) cannot."""
    try:
        inspect.signature(function).bind(**arguments)
    except (TypeError, ValueError) as error:  # ValueError: a callable without a signature
        return str(error)
    return None


def _refuse_ids_past_the_model(task: Task, model, splits: dict, name_or_path: str | None) -> None:
    """Refuse data with token ids that the model's embedding table has no row for, or class (token) ids as labels
    past its outputs, in any of `splits`: the first batch that holds one fails deep in the model (an index error; on
    a GPU, a device assert), hours into a run maybe. The preflight check `inputs` sees a few batches; this reads
    every example. Labels that are not integers are real-valued targets, without a range."""
    limits = {
        "input_ids": (embedding_rows(model), "rows in its embedding table"),
        "labels": (task.num_outputs(model), "outputs"),
    }
    for split_name, split in splits.items():
        for column, (limit, what) in limits.items():
            if limit is None or column not in split.column_names:
                continue
            values = split.with_format("arrow")[column]
            while isinstance(values.type, pa.ListType | pa.LargeListType | pa.FixedSizeListType):
                values = pc.list_flatten(values)
            if not pa.types.is_integer(values.type):
                continue
            extremes = pc.min_max(values)  # over the column as it is: a filtered copy of a large corpus is gigabytes
            low, high = extremes["min"].as_py(), extremes["max"].as_py()
            low = 0 if low == IGNORE_INDEX else low  # positions without a loss
            if high is not None and (low < 0 or high >= limit):
                raise ConfigError(
                    f"the {split_name} split holds {column} from {low} to {high}, and the model "
                    f"(model.name_or_path={name_or_path}) has {limit} {what}: its tokenizer is not the one it was "
                    "trained with, or gained tokens without model.resize_token_embeddings(len(tokenizer)); save the "
                    "model and its tokenizer together"
                )


def logits_of(output) -> torch.Tensor:
    """A model's output as logits: a transformers model's output has `.logits`; your own module may return them, or
    a dict that holds them under "logits"."""
    if torch.is_tensor(output):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is None:
        raise ConfigError(
            f"the model returned a {type(output).__name__} without logits: return the scores as a tensor, a dict "
            'with "logits", or an object with a .logits'
        )
    return logits


def example_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple:
    """Per example: the summed cross-entropy over its labelled items and their count ([B] each); labels are
    [B] (one per example) or [B, T] (one per token)."""
    labels = labels.reshape(labels.size(0), -1)
    logits = logits.reshape(labels.size(0), labels.size(1), -1).float()
    losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return losses.sum(1), (labels != IGNORE_INDEX).sum(1)


def mean_loss(records: list) -> float:
    """The mean loss per labelled item over records holding `loss` (a sum) and `items`."""
    return sum(r["loss"] for r in records) / max(1, sum(r["items"] for r in records))
