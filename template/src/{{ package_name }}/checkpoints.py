"""Checkpoints: full training state through Accelerate's save_state/load_state, written atomically,
pruned by a keep policy; and the final export as a CPU `save_pretrained` folder."""

import json
import shutil
from pathlib import Path

import accelerate
import datasets
import torch
import transformers
from accelerate import Accelerator
from omegaconf import DictConfig

from .config import KeepPolicy, MetricMode

STATE_FILE = "trainer_state.json"  # written last: a checkpoint folder without it is incomplete
PREFIX = "step_"


def versions() -> dict:
    return {lib.__name__: lib.__version__ for lib in (torch, transformers, accelerate, datasets)}


def save(accelerator: Accelerator, folder: Path, trainer_state: dict) -> Path:
    """Save model, optimizer, scheduler, RNG and sampler states, plus `trainer_state` as JSON.

    Written into a temporary folder and renamed when complete, so a crash mid-save never leaves
    a folder that looks like a checkpoint.
    """
    final = folder / f"{PREFIX}{trainer_state['step']:08d}"
    partial = folder / f".partial_{final.name}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))  # every process takes part (sharded FSDP/DeepSpeed states)
    # save_state returns without waiting for the others: each process still writes its own RNG state file.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    accelerator.wait_for_everyone()
    return final


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def list_complete(folder: Path) -> list:
    """Complete checkpoints of a folder, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{PREFIX}*") if p.is_dir() and is_complete(p))


def resolve_resume(resume: str | None, folder: Path) -> Path | None:
    """The checkpoint to resume from: None, the newest of `folder` ("latest"), or a given folder."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_complete(folder)
        return found[-1] if found else None  # nothing yet: start from scratch (safe to requeue)
    path = Path(resume).expanduser()
    if not is_complete(path):
        raise FileNotFoundError(
            f"resume={resume}: not a complete checkpoint folder (no {STATE_FILE} in it); "
            "pass resume=latest or a folder such as <run>/checkpoints/step_00000100"
        )
    return path


def load(accelerator: Accelerator, path: Path) -> dict:
    """Restore every registered state from `path` and return its trainer state."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


def prune(folder: Path, cfg: DictConfig) -> None:
    """Delete checkpoints the keep policy does not keep; the newest one is always kept."""
    found = list_complete(folder)
    keep = set(found[-cfg.keep_count :] if cfg.keep == KeepPolicy.latest else found[-1:])
    if cfg.keep != KeepPolicy.latest:
        metrics = {p: json.loads((p / STATE_FILE).read_text()).get("metrics", {}) for p in found}
        scored = sorted(
            (p for p in found if cfg.monitor in metrics[p]),
            key=lambda p: metrics[p][cfg.monitor],
            reverse=cfg.mode == MetricMode.max,
        )
        keep.update(scored[: 1 if cfg.keep == KeepPolicy.best else cfg.keep_count])
    for path in found:
        if path not in keep:
            shutil.rmtree(path)


def export(accelerator: Accelerator, model, tokenizer, folder: Path) -> None:
    """Write a `from_pretrained` folder (safetensors on CPU, config, tokenizer) on the main process.

    `get_state_dict` gathers the full state dict when the model is sharded (FSDP, DeepSpeed ZeRO-3).
    """
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        state_dict = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
        accelerator.unwrap_model(model).save_pretrained(folder, state_dict=state_dict)
        tokenizer.save_pretrained(folder)
    accelerator.wait_for_everyone()
