"""Checkpoints: full training state through Accelerate's save_state/load_state, written atomically,
verified on load, pruned by a keep policy; and the final export as a CPU `save_pretrained` folder."""

import hashlib
import json
import logging
import shutil
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import accelerate
import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import load as safe_load
from omegaconf import DictConfig
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers.utils import logging as transformers_logging

from .config import KeepPolicy, MetricMode, user_path
from .errors import UserError
from .records import RUN_CONFIG_FILE, STATE_FILE, WEIGHTS_FILE, to_json

logger = get_logger(__name__)


class _TiedWeightsNote(logging.Filter):
    """Drops Accelerate's warning at each checkpoint of a model with tied weights ("Removed shared tensor
    {'lm_head.weight'} while saving ... check by verifying that you don't receive any warning while reloading"): load
    ties them again, and verifies every tensor. The logger's other warnings stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()  # after Accelerate's "[RANK 0] "


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNote())

PREFIX = "step_"


class CorruptCheckpointError(UserError, RuntimeError):
    """A checkpoint folder whose files do not match what was written."""


class CheckpointMismatchError(UserError, RuntimeError):
    """A sound checkpoint whose state does not fit what the code builds now."""


class WriteError(UserError, OSError):
    """A checkpoint or export that the disk refused: full, over a quota or a file size limit, read-only."""


# How torch.save's stream writer words a write that the disk refused: "PytorchStreamWriter failed writing file", or
# "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534" after "basic_ios::clear: iostream error".
TORCH_WRITE_FAILURES = ("writ", "inline_container", "iostream error")


def _refused_write(error: BaseException | None) -> bool:
    """Whether `error`, or an error it comes from, is a write that the disk refused."""
    while error is not None:
        words = str(error)
        if isinstance(error, OSError | SafetensorError) or (
            isinstance(error, RuntimeError) and any(failure in words for failure in TORCH_WRITE_FAILURES)
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def written(what: str, folder: Path) -> Iterator[None]:
    """Writing `what` into `folder`; a write the disk refuses is a WriteError naming both, and the folder, which
    holds part of it only, is removed (the space it took is free again)."""
    try:
        yield
    except (OSError, SafetensorError, RuntimeError) as error:
        if not _refused_write(error):
            raise
        shutil.rmtree(folder, ignore_errors=True)
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
        raise WriteError(
            f"could not write {what} into {folder.parent}: {reason}; free space there, or choose another hydra.run.dir "
            "(the checkpoints written before are untouched)"
        ) from error


def versions() -> dict:
    return {lib.__name__: lib.__version__ for lib in (torch, transformers, accelerate, datasets)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checksums(folder: Path) -> dict:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STATE_FILE)
    return {str(p.relative_to(folder)): _sha256(p) for p in files}


def save(
    accelerator: Accelerator, folder: Path, trainer_state: dict, config: dict | None = None, labels: list | None = None
) -> Path:
    """Save model, optimizer, scheduler, RNG and sampler states, and a JSON record of the run.

    The record (trainer state, seed, library versions, resolved config, a classifier's labels, checksums of every
    file) is written last, into a temporary folder that is renamed when complete: a crash mid-save never leaves a
    folder that looks like a checkpoint.
    """
    final = folder / f"{PREFIX}{trainer_state['step']:08d}"
    partial = folder / f".partial_{final.name}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    with written("a checkpoint", partial):
        accelerator.save_state(str(partial))  # every process takes part (sharded FSDP/DeepSpeed states)
    # save_state returns without waiting for the others: each process still writes its own RNG state file.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        record = {
            "trainer": trainer_state,
            "seed": trainer_state.get("seed"),
            "versions": versions(),
            "config": config,
            "labels": labels,
            "num_processes": accelerator.num_processes,  # the data order of a resume depends on it
            "checksums": _checksums(partial),
        }
        with written("a checkpoint", partial):
            (partial / STATE_FILE).write_text(to_json(record, indent=2))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    accelerator.wait_for_everyone()
    return final


def read_record(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def verify(path: Path) -> dict:
    """Return the checkpoint's record, or raise CorruptCheckpointError naming the bad files."""
    if not (path / STATE_FILE).is_file():
        raise CorruptCheckpointError(
            f"{path} is not a complete checkpoint: it has no {STATE_FILE} (checkpoints are the folders "
            f"<run folder>/checkpoints/{PREFIX}XXXXXXXX; an exported model folder is loaded with model.name_or_path)"
        )
    try:
        record = read_record(path)
        expected = record["checksums"]
    except (json.JSONDecodeError, KeyError) as error:
        raise CorruptCheckpointError(f"{path}/{STATE_FILE} is unreadable: {error}") from error
    actual = _checksums(path)
    bad = sorted(name for name in expected.keys() | actual.keys() if expected.get(name) != actual.get(name))
    if bad:
        raise CorruptCheckpointError(
            f"checkpoint {path} is truncated or corrupt: these files differ from when it was saved: {bad}"
        )
    return record


def exported_config(folder: Path | None) -> dict | None:
    """The config of the run whose export `folder` is (None: not a train.py export, or one of older code)."""
    path = None if folder is None else folder / RUN_CONFIG_FILE
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def list_complete(folder: Path) -> list:
    """Checkpoint folders that finished saving, oldest first (not yet verified)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{PREFIX}*") if p.is_dir() and (p / STATE_FILE).is_file())


def resolve_resume(resume: str | None, folder: Path) -> Path | None:
    """The checkpoint to resume from: None, the newest good one of `folder` ("latest"), or a given one."""
    if resume is None:
        return None
    if resume != "latest":
        path = user_path(resume)
        verify(path)
        return path
    bad = []
    for path in reversed(list_complete(folder)):
        try:
            verify(path)
            return path
        except CorruptCheckpointError as error:
            logger.warning(f"skipping a bad checkpoint: {error}", main_process_only=True)
            bad.append(path.name)
    if bad:  # starting over would write over the run that saved them, which may be all there is of it
        raise CorruptCheckpointError(
            f"resume=latest: no checkpoint of {folder} is whole ({', '.join(bad)}; see above), so there is nothing to "
            "continue: start a new run (resume=null, in a new hydra.run.dir), or give resume=<checkpoint folder>"
        )
    return None  # nothing yet: start from scratch (so a preempted job can be requeued as it was)


@contextmanager
def fitting(path: Path, accepted: list = ()) -> Iterator[None]:
    """Loading the state of checkpoint `path`, saved by an earlier run: parameters of other names or shapes than the
    code builds now are a CheckpointMismatchError that names them, and its cause: a change of the model's config that
    resume_allow accepted (`accepted`: "key: old -> new"), else of the code."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError) as error:
        reason = textwrap.shorten(str(error), 300, placeholder=" ...")
        model_changes = [change for change in accepted if change.startswith(("model.", "task."))]
        if model_changes:
            cause = f"resume_allow accepted changes of the model that change its shapes ({'; '.join(model_changes)})"
            advice = "Resume with the checkpoint's model config"
        else:
            now, saved_with = versions(), read_record(path)["versions"]
            changed = [f"{name} {saved} -> {now[name]}" for name, saved in saved_with.items() if now[name] != saved]
            libraries = f" (or a library: {', '.join(changed)})" if changed else ""
            cause, advice = f"the model's code changed since it was saved{libraries}", "Use the code it was saved with"
        raise CheckpointMismatchError(
            f"{path}: its state does not fit what this code builds ({reason}): {cause}. {advice}, or start a new run "
            "(resume=null, in a new hydra.run.dir)"
        ) from None


def load(accelerator: Accelerator, path: Path, verified: bool = False) -> dict:
    """Restore every prepared object's state from `path`; return the trainer state saved with it. Its files are
    checked against their checksums first, unless `verified` says the caller just did (resolve_resume does).

    Accelerate loads tensors with safetensors and `weights_only` pickles: a checkpoint is data, not code.
    It only logs a failed RNG restore, so the restored generator is compared with the saved one here.
    """
    record = read_record(path) if verified else verify(path)
    accelerator.load_state(str(path))
    saved_rng = safe_load(path / f"random_states_{accelerator.process_index}.pkl")["torch_manual_seed"]
    if not torch.equal(torch.get_rng_state(), saved_rng):
        raise CorruptCheckpointError(f"{path}: the random number generator state was not restored")
    return record["trainer"]


def prune(folder: Path, cfg: DictConfig, metric: str, mode: MetricMode) -> None:
    """Delete checkpoints the keep policy does not keep; the newest one is always kept (to resume).
    `metric` and `mode` rank them for keep=best and keep=top_k."""
    found = list_complete(folder)
    keep = set(found[-cfg.keep_count :] if cfg.keep == KeepPolicy.latest else found[-1:])
    if cfg.keep != KeepPolicy.latest:
        metrics = {p: read_record(p)["trainer"]["metrics"] for p in found}
        scored = sorted(
            (p for p in found if metrics[p].get(metric) is not None),  # null: not evaluated, or not finite
            key=lambda p: metrics[p][metric],
            reverse=mode == MetricMode.max,
        )
        keep.update(scored[: 1 if cfg.keep == KeepPolicy.best else cfg.keep_count])
    for path in found:
        if path not in keep:
            shutil.rmtree(path)


def export(
    accelerator: Accelerator, model, processor, folder: Path, labels: list | None = None, config: dict | None = None
) -> None:
    """Write a `from_pretrained` folder (safetensors on CPU, config, tokenizer or image processor) on the main
    process. Your own module (no save_pretrained) gets its weights in model.safetensors, which
    `model.name_or_path=<folder>` loads back into it (modeling.build_own_module), and a classifier's `labels` in
    that file's metadata (a transformers model keeps them in its config.json). `config`, the run's, goes into
    run_config.json: evaluate.py reads the folder with the settings it was trained with (task.*, your module's
    model.config, the seed that drew a held-out validation split), which no weight records.

    Every process calls this: `get_state_dict` gathers the full state dict when the model is sharded
    (FSDP, DeepSpeed ZeRO-3).
    """
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        with written("the model", folder):
            write_model(accelerator.unwrap_model(model), processor, folder, state_dict, labels)
            if config is not None:
                (folder / RUN_CONFIG_FILE).write_text(to_json(config, indent=2))
    accelerator.wait_for_everyone()


def write_model(unwrapped, processor, folder: Path, state_dict: dict, labels: list | None) -> None:
    """export's writing, on the main process."""
    state_dict = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    if hasattr(unwrapped, "save_pretrained"):
        # Without transformers' progress bar ("Writing model shards"): the run logs where its model went.
        bars = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()
        try:
            unwrapped.save_pretrained(folder, state_dict=state_dict)
        finally:
            if bars:
                transformers_logging.enable_progress_bar()
    else:
        folder.mkdir(parents=True, exist_ok=True)
        # Copies: safetensors refuses tensors that share memory (tied weights).
        metadata = {"format": "pt"} if labels is None else {"format": "pt", "labels": json.dumps(labels)}
        save_file({name: t.clone() for name, t in state_dict.items()}, folder / WEIGHTS_FILE, metadata)
    if processor is not None:
        processor.save_pretrained(folder)
