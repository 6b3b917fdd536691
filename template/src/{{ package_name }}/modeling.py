"""Models and tokenizers, the same for every task: your own nn.Module, a pretrained hub id or folder, or a
transformers architecture built from scratch (the `model` config says which; see config.ModelConfig)."""

import difflib
import functools
import inspect
import json
import logging
import os
import re
import textwrap
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch.nn.parameter import UninitializedParameter
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from .config import ConfigError, import_target, model_folder, user_path
from .errors import warn
from .records import WEIGHTS_FILE

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")


@contextmanager
def loading(name_or_path: str) -> Iterator[None]:
    """What goes wrong while loading a model folder or hub id, as one message naming the key and the bad file."""
    try:
        yield
    except SafetensorError as error:
        folder = user_path(name_or_path)
        bad = [str(path) for path in sorted(folder.glob("*.safetensors")) if not _readable(path)]
        raise ConfigError(
            f"model.name_or_path={name_or_path}: {', '.join(bad) or 'a weight file'} is truncated or corrupt "
            f"({error}); export or copy the model again"
        ) from None
    except ImportError as error:  # a model class of an optional package (natten, timm, ...) not installed here
        raise ConfigError(
            f"model.name_or_path={name_or_path} needs a package that is not installed here: {in_short(error)}"
        ) from None
    except OSError as error:  # a folder without config.json, a hub id that is not there or not reachable
        elsewhere = "" if user_path(name_or_path).exists() else "no such folder here, and from the hub: "
        raise ConfigError(f"model.name_or_path={name_or_path}: {elsewhere}{error}") from None


def in_short(error: Exception, limit: int = 300) -> str:
    """An error's message on one line, cut to `limit` characters (not every class transformers has)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _readable(path: Path) -> bool:
    try:
        with safe_open(path, "pt"):
            return True
    except SafetensorError:
        return False


@contextmanager
def refused_config(what: str) -> Iterator[None]:
    """A value of model.config that the model refuses while it is built (0 attention heads, a hidden size that the
    heads do not divide, ...) as a ConfigError naming model.config, not a traceback from inside the model."""
    try:
        with warnings.catch_warnings():  # a size of 0: refuse_empty_layers says so, torch's init warning adds nothing
            warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
            yield
    except ImportError as error:
        raise ConfigError(f"{what} needs a package that is not installed here: {in_short(error)}") from None
    except Exception as error:  # ValueError, ZeroDivisionError, KeyError, ...: the model's code, on this config
        raise ConfigError(
            f"model.config does not make {what}: {type(error).__name__}: {in_short(error)} (HYDRA_FULL_ERROR=1 shows "
            "where)"
        ) from error


def build_own_module(cfg: DictConfig, task_kwargs: dict) -> torch.nn.Module:
    """Your own module class, built with `model.config` as keyword arguments, plus those of `task_kwargs`
    (num_labels, vocab_size, ...) that its __init__ takes (all of them for a **kwargs); its weights come from
    `model.name_or_path` if set."""
    module_class = import_target("model._target_", cfg._target_)
    accepted = inspect.signature(module_class).parameters
    takes_any = any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in accepted.values())
    kwargs = {name: value for name, value in task_kwargs.items() if takes_any or name in accepted}
    own = OmegaConf.to_container(cfg.config, resolve=True)
    refuse_task_keys(own, kwargs)
    kwargs.update(own)
    try:
        inspect.signature(module_class).bind(**kwargs)
    except TypeError as error:
        raise ConfigError(
            f"model.config does not fit {cfg._target_}{inspect.signature(module_class)}: {error} "
            f"(given: {sorted(kwargs)})"
        ) from None
    refuse_wrong_types(module_class, own, cfg._target_)
    folder = None if cfg.name_or_path is None else model_folder(cfg.name_or_path)
    if cfg.name_or_path is not None and (folder is None or (folder / "config.json").is_file()):
        # A hub id or a save_pretrained folder: meant for a transformers model, not for this module.
        raise ConfigError(
            f"model.name_or_path={cfg.name_or_path} with model._target_={cfg._target_}: your own module loads only "
            f"its own weights ({WEIGHTS_FILE} of a train.py export); for a pretrained transformers model choose "
            f"model=pretrained model.name_or_path={cfg.name_or_path}"
        )
    with refused_config(cfg._target_):
        module = module_class(**kwargs)
    lazy = [name for name, tensor in module.named_parameters() if isinstance(tensor, UninitializedParameter)]
    if lazy:  # their sizes come with the first forward pass, after the optimizer and the checks would need them
        raise ConfigError(
            f"model._target_={cfg._target_} has lazy layers (nn.LazyLinear, ...), whose weights are made at the first "
            f"forward pass ({', '.join(lazy[:4])}): give those layers their input sizes (nn.Linear(in, out), say)"
        )
    if folder is not None:
        with loading(cfg.name_or_path):
            weights = load_file(folder / WEIGHTS_FILE)
        try:
            module.load_state_dict(weights)
        except RuntimeError as error:  # names or sizes that differ: the first line says which class, the rest which
            differences = textwrap.shorten(" ".join(str(error).split("\n")[1:]), 300, placeholder=" ...")
            raise ConfigError(
                f"model.name_or_path={cfg.name_or_path}: its weights do not fit the {cfg._target_} that model.config "
                f"and the data build ({differences}); give the model.config it was trained with, and data with the "
                "labels (and the vocabulary) it was trained on"
            ) from None
    return module


def in_own_memory(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its weights copied where torch would have put them. from_pretrained leaves them 16 bytes past
    the 64-byte boundaries that torch aligns its own memory to, and on a CPU the kernels then take other paths: the
    same weights computed other last digits (a regression head's RMSE in the 9th digit), so an exported model did
    not evaluate to what training reported. (A model bound for a GPU gets an aligned copy there anyway.)"""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() % 64:
            tensor.data = tensor.data.clone()
    return model


# What from_pretrained reported of each model it loaded: its missing and mismatched weights, by transformers' own
# names (it renames some weights as it saves and loads them, and rebuilds some it never saves: Marian's positions).
LOADING_REPORTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def refuse_untrained(model: torch.nn.Module, name_or_path: str) -> None:
    """evaluate.py scores the weights a folder holds. from_pretrained starts anew, with a warning at most, any layer
    the folder has no fitting weights for: refuse a model built for this data with layers of other sizes (a
    vocabulary of another size; ignore_mismatched_sizes, what a fine-tune wants), or with layers the folder lacks (a
    classifier's folder loaded as a language model)."""
    folder = model_folder(name_or_path)
    if folder is None:  # a hub id: nothing here to compare with
        return
    report = LOADING_REPORTS.get(model)
    if report is not None:
        changed = [f"{name} {list(saved)} -> {list(built)}" for name, saved, built in sorted(report["mismatched_keys"])]
        missing = list(report["missing_keys"])
    else:  # your own module, whose export holds its state_dict's names
        changed, missing = _untrained_own_weights(model, folder)
    if changed:
        raise ConfigError(
            f"model.name_or_path={name_or_path}: the model built for this data has other shapes than the saved one "
            f"({', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''}), so those layers would score untrained: "
            "give data with the labels (and the vocabulary) the model was trained on"
        )
    if missing:
        config_file = folder / "config.json"  # none for your own module's export
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        kind, built_kind = ", ".join(config.get("architectures") or []), type(model).__name__
        why = (
            "its weight files lack them: export or copy the model again"
            if kind == built_kind
            else f"it holds {kind or 'a model'} for another task or architecture: give a model this task trained"
        )
        raise ConfigError(
            f"model.name_or_path={name_or_path} has no weights for {len(missing)} parameters of {built_kind} "
            f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}), which would score untrained; {why}"
        )


def _untrained_own_weights(model: torch.nn.Module, folder: Path) -> tuple:
    """The weights of `model` that the folder's safetensors files hold at other shapes, and those they lack."""
    built = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    changed, saved = [], set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as weights:
            for name in weights.keys():
                saved.add(name)
                shape = weights.get_slice(name).get_shape()
                if name in built and built[name] != shape:
                    changed.append(f"{name} {shape} -> {built[name]}")
    # Tied weights are saved under one of their names.
    names = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    missing = [group[0] for group in names.values() if not saved.intersection(group)] if saved else []
    return changed, missing


def saved_labels(name_or_path: str | None) -> list | None:
    """The label names a local model folder was trained for (None for a hub id, or where none were saved)."""
    folder = None if name_or_path is None else model_folder(name_or_path)
    if folder is None:
        return None
    config_file = folder / "config.json"  # none for your own module's export
    return _label_names(folder, json.loads(config_file.read_text()) if config_file.is_file() else None)


def _label_names(folder: Path, config: dict | None) -> list | None:
    """The label names saved with a model: its config.json's id2label (`config`; None where it holds only
    transformers' defaults), or for your own module's export (no config.json) its weight file's metadata."""
    if config is None:
        with safe_open(folder / WEIGHTS_FILE, "pt") as weights:
            saved = (weights.metadata() or {}).get("labels")
        return json.loads(saved) if saved else None
    saved = config.get("id2label")
    names = [saved[key] for key in sorted(saved, key=int)] if saved else []
    return names if names and names != [f"LABEL_{i}" for i in range(len(names))] else None


def build_model(cfg: DictConfig, auto_class, pretrained_kwargs: dict, scratch_kwargs: dict) -> torch.nn.Module:
    """The model of the `model` config. `auto_class` is the task's transformers Auto class (None: a task of your own
    modules only); `pretrained_kwargs` go to its from_pretrained (a new head's labels, say), `scratch_kwargs` to the
    config of a model built from scratch (and, by name, to your own module)."""
    if cfg._target_ is not None:
        return refuse_empty_layers(build_own_module(cfg, scratch_kwargs), cfg._target_)
    if auto_class is None:
        raise ConfigError(
            "model._target_ is not set, and this task has no transformers model class: give it your own module, "
            "model._target_=<package.module.Class> (an nn.Module; model.config holds its arguments)"
        )
    own = OmegaConf.to_container(cfg.config, resolve=True)
    if cfg.name_or_path is not None:
        config = load_config(cfg.name_or_path)  # refuses a folder without config.json
        source = f"model.name_or_path={cfg.name_or_path} is a {config.model_type} model"
        refuse_other_architecture(config, auto_class, source)
        # Its saved config decides (a value that changes a layer's size would start that layer anew). model.config
        # may come from a model group, not from you: say what is not applied rather than refuse. The keys of a group
        # of another architecture (the task's default group beside a model of another kind) that this model has not
        # are the group's: naming them is noise.
        group_kind = default_config(cfg.model_type) if cfg.model_type != config.model_type else None
        ignored = [
            f"{key}={value} (saved: {getattr(config, key, None)})"
            for key, value in own.items()
            if getattr(config, key, None) != value
            and (hasattr(config, key) or group_kind is None or not has_key(group_kind, key))
        ]
        if ignored:
            warn(
                logger,
                f"model.config not applied to the saved model of model.name_or_path: {', '.join(ignored)} "
                "(model=pretrained brings no model.config)",
            )
        folder = model_folder(cfg.name_or_path)
        with loading(cfg.name_or_path):
            loaded, report = auto_class.from_pretrained(
                str(folder or cfg.name_or_path), output_loading_info=True, **pretrained_kwargs
            )
        LOADING_REPORTS[loaded] = report
        return in_own_memory(loaded)
    refuse_task_keys(own, scratch_kwargs)
    with refused_config(f"a {cfg.model_type} model"):
        config = AutoConfig.for_model(cfg.model_type, **{**own, **scratch_kwargs})
    refuse_other_architecture(config, auto_class, f"model.model_type={cfg.model_type}")
    # A key that the architecture does not know becomes a new attribute of its config, which nothing reads.
    default = default_config(cfg.model_type)
    unknown = [key for key in own if not has_key(default, key) and key in config.to_dict()]
    refuse_unknown_keys([key for key in unknown if not read_by_the_model(auto_class, config, key)], default)
    # Where a task has several classes for one model type (DeiT, LeViT: with and without a teacher), transformers
    # picks by config.architectures and fails on None, a new config's value; an empty list picks the first.
    config.architectures = config.architectures or []
    refuse_beyond_memory(auto_class, config, f"model.model_type={cfg.model_type}")
    with refused_config(f"a {cfg.model_type} model"):
        model = auto_class.from_config(config)
    return refuse_empty_layers(model, f"a {cfg.model_type} model")


def refuse_beyond_memory(auto_class, config: PretrainedConfig, what: str) -> None:
    """A model from scratch whose float32 weights alone exceed the memory free here (an architecture's default
    sizes are often a 7B model's) is refused before it is built: the kernel would kill the process without a word,
    minutes later. Each process of this machine builds its own. Where it trains on this CPU, gradients and AdamW's
    two moments need three times more: a warning. Counted on the meta device, which allocates nothing."""
    try:
        with torch.device("meta"), warnings.catch_warnings():  # the real build warns where there is a reason to
            warnings.simplefilter("ignore")
            parameters = sum(tensor.numel() for tensor in auto_class.from_config(config).parameters())
    except Exception:  # a config the model refuses, or that needs real tensors: the real build says what is wrong
        return
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    weights, free = parameters * 4 * processes, psutil.virtual_memory().available
    size = f"{what} builds {parameters / 1e9:.2f}B parameters, {weights / 2**30:.1f} GiB of float32 weights"
    size += f" for {processes} processes" if processes > 1 else ""
    smaller = "give model.config smaller sizes (hidden_size, num_hidden_layers, ...; configs/model/ has small ones)"
    if weights > free:
        raise ConfigError(f"{size}, more than the {free / 2**30:.1f} GiB of memory free here; {smaller}")
    if 4 * weights > free and not torch.cuda.is_available():
        warn(
            logger,
            f"{size}; training them here needs about 4 times that, with gradients and AdamW's moments, "
            f"and {free / 2**30:.1f} GiB are free: the system may kill the run. To avoid it, {smaller}",
        )


def default_config(model_type: str | None) -> PretrainedConfig | None:
    """The config of `model_type` at its defaults, or None for no model type or one this transformers lacks. Quiet:
    some warn of their own defaults (StarCoder2's token ids, beyond its vocabulary), which are not the run's."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return AutoConfig.for_model(model_type) if model_type else None
    except ValueError:
        return None
    finally:
        transformers_logging.set_verbosity(verbosity)


def has_key(config: PretrainedConfig, key: str) -> bool:
    """Whether `config` has `key`; one that varies from layer to layer counts (transformers' configs of layers that
    differ raise on reading it for the whole model)."""
    try:
        return hasattr(config, key)
    except Exception:
        return True


def read_by_the_model(auto_class, config: PretrainedConfig, key: str) -> bool:
    """Whether the architecture's modeling code reads `key` from its config though its config class leaves it out:
    `getattr(config, "head_dim", hidden_size // heads)` (Qwen, Phi, ...), T5's `config.decoder_start_token_id`."""
    try:
        source = _module_source(auto_class._model_mapping[type(config)])
    except (KeyError, AttributeError, OSError, TypeError):
        return False
    return re.search(rf"config\.{re.escape(key)}\b|[\"']{re.escape(key)}[\"']", source) is not None


@functools.cache
def _module_source(model_class: type) -> str:
    return inspect.getsource(inspect.getmodule(model_class))


# The annotations of your own module's __init__ that a config value is checked against (a value of another type
# failed later, in the forward pass, with a message that did not name the key), and the types each accepts.
PLAIN_TYPES = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def refuse_wrong_types(module_class: type, own: dict, target: str) -> None:
    """model.config values of another type than the one the __init__ of `module_class` annotates (int, float, bool
    or str: a bool is not taken for a number, nor a number for a bool); None is left to the module."""
    parameters = inspect.signature(module_class).parameters
    for key, value in own.items():
        annotation = parameters[key].annotation if key in parameters else None
        if annotation not in PLAIN_TYPES or value is None:
            continue
        if not isinstance(value, PLAIN_TYPES[annotation]) or (type(value) is bool) != (annotation is bool):
            raise ConfigError(
                f"model.config.{key}={value!r} is a {type(value).__name__}, and {target} takes "
                f"{key}: {annotation.__name__}"
            )


def refuse_task_keys(own: dict, task_values: dict) -> None:
    """model.config keys that the task sets itself (the vocabulary size from its tokenizer, the labels from its
    data, sizes from its task.* settings) would be overridden without a word: refuse another value."""
    clashes = [
        f"{key}={own[key]} (the task: {value})"
        for key, value in task_values.items()
        if key in own and own[key] != value
    ]
    if clashes:
        raise ConfigError(
            f"model.config sets what the task sets itself, from its data, its tokenizer or a task.* setting: "
            f"{', '.join(clashes)}; remove those keys from model.config"
        )


def refuse_unknown_keys(unknown: list, config: PretrainedConfig) -> None:
    """model.config keys that `config`'s class does not have (a typo, say), with the closest key it has."""
    if unknown:
        known = [*config.to_dict(), *config.attribute_map]
        named = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            named.append(f"model.config.{key}" + (f" (did you mean {close[0]}?)" if close else ""))
        raise ConfigError(
            f"{', '.join(named)}: not a key of {type(config).__name__}, the {config.model_type} config (its keys are "
            f"in the transformers docs): correct or drop it (~model.config.{unknown[0]}), or start from a model "
            "group of this architecture (model=<name>, configs/model/)"
        )


def refuse_empty_layers(model: torch.nn.Module, what: str) -> torch.nn.Module:
    """A size of 0 in model.config (hidden_size, intermediate_size, channels, ...) builds layers without weights,
    which fail later (in the forward pass, a preflight check, or the checkpoint, which does not save them)."""
    empty = [f"{name} {list(tensor.shape)}" for name, tensor in model.named_parameters() if tensor.numel() == 0]
    if empty:
        raise ConfigError(
            f"model.config makes {what} with layers that have no weights (is a size 0?): {', '.join(empty[:4])}"
            + (f" and {len(empty) - 4} more" if len(empty) > 4 else "")
        )
    return model


def refuse_other_architecture(config: PretrainedConfig, auto_class, source: str) -> None:
    """A model of a kind the task's Auto class has no class for (a text model for images, an encoder-decoder as a
    causal LM, a speech model) as one message, not transformers' list of every class it knows."""
    if type(config) not in auto_class._model_mapping:  # the model types it builds, and those registered with it
        raise ConfigError(
            f"{source}: {auto_class.__name__}, this task's kind of model, has no {config.model_type} architecture "
            f"(it has {len(auto_class._model_mapping)}, listed in the transformers docs); choose a "
            "model of this task (configs/model/, or one of this kind from the hub)"
        )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a model. A local folder without tokenizer files is refused: transformers would
    quietly build one that maps every text to unknown tokens."""
    refuse_without(name_or_path, TOKENIZER_FILES, "tokenizer")
    tokenizer = _by_saved_class(name_or_path) or load_processor(AutoTokenizer, name_or_path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Decoder-only models (GPT-2, Llama, Qwen, ...) ship without a padding token, and batches need one. The end
        # of text pads, as in the transformers examples; padded positions are masked out.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _by_saved_class(name_or_path: str) -> PreTrainedTokenizerBase | None:
    """A local folder without tokenizer.json, read by the tokenizer class that its tokenizer_config.json names (or
    None). For some model types AutoTokenizer disregards that class (transformers 5: mistral, qwen2, phi3, ...) and
    reads the folder with the type's own, which wants a tokenizer.json: it fails, or builds another tokenizer without
    a word. A tokenizer written in Python (ByT5's bytes, the default of a model from scratch) never saves one."""
    folder = model_folder(name_or_path)
    if folder is None or (folder / "tokenizer.json").is_file() or not (folder / "tokenizer_config.json").is_file():
        return None
    named = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    tokenizer_class = getattr(transformers, str(named), None)
    if not (isinstance(tokenizer_class, type) and issubclass(tokenizer_class, PreTrainedTokenizerBase)):
        return None  # a class of the model's own code (auto_map): AutoTokenizer's to find
    return load_processor(tokenizer_class, name_or_path)


def load_config(name_or_path: str) -> PretrainedConfig:
    """The config saved with a model (a save_pretrained folder or a hub id), with the model's own loading messages;
    a local folder without config.json is refused."""
    folder = model_folder(name_or_path)
    if folder is not None and not (folder / "config.json").is_file():
        raise ConfigError(
            f"model.name_or_path={name_or_path} has no config.json, so it is not a save_pretrained folder "
            f"(weights of your own module, {WEIGHTS_FILE}, load with model._target_ set to its class)"
        )
    return load_processor(AutoConfig, name_or_path)


def refuse_without(name_or_path: str, files: tuple, processor: str) -> None:
    """A local model folder without any of `files`, the `processor` (tokenizer, image_processor) saved with the model:
    each model was trained on inputs prepared its own way, and no default would prepare them the same."""
    folder = model_folder(name_or_path)
    if folder is not None and not any((folder / name).is_file() for name in files):
        raise ConfigError(
            f"model.name_or_path={name_or_path} has no {processor.replace('_', ' ')} files (one of {list(files)}): "
            f"save the one the model was trained with into the model folder ({processor}.save_pretrained(folder))"
        )


def load_processor(auto_class, name_or_path: str):
    """What was saved beside a model's weights (its tokenizer, image processor, ...) through `auto_class`, with the
    same messages as the model's own loading."""
    folder = model_folder(name_or_path)
    with loading(name_or_path):
        try:
            return auto_class.from_pretrained(str(folder or name_or_path))
        except ValueError as error:  # a tokenizer that needs sentencepiece or tiktoken; a model type newer than here
            raise ConfigError(
                f"model.name_or_path={name_or_path}: its {auto_class.__name__.removeprefix('Auto')} cannot be read "
                f"here: {in_short(error)}"
            ) from None
