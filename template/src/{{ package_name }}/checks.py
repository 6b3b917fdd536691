"""Preflight checks: cheap sanity checks before the first optimizer step of a fresh run.

Each catches a bug that otherwise shows hours into a run, or never: out-of-range inputs, a badly initialized
head, an evaluation that crashes, parameters cut off from the loss, a setup that cannot learn, a checkpoint
that does not restore. Each is switched by `checks.<name>` and fails with a PreflightError that names what
it expected, what it saw and the key that turns it off.

Every check puts the training state back as it found it (model, optimizer, scheduler, gradient scaler,
gradients, RNGs, step counter, train/eval mode) and draws its batches from a fresh pass over the
dataloaders, so a run with checks is bit-identical to the same run without them.
"""

import math
import random
import shutil
import time
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, gather_object, load
from omegaconf import DictConfig
from safetensors.torch import load_file

from . import checkpoints
from .errors import UserError
from .tasks.base import Task

logger = get_logger(__name__)

TEMP_FOLDER = ".preflight_checkpoint"  # inside the run folder, removed after the round trip
# Sharded or compiled-graph backends keep parameters and optimizer state where these checks cannot see them.
UNSUPPORTED = {DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA}


class PreflightError(UserError, RuntimeError):
    """A preflight check failed; the message names the check, what it expected, what it saw, the off switch."""


def failure_message(check: str, expected: str, saw: str) -> str:
    return f"preflight check {check} failed: expected {expected}; saw {saw}. (Turn it off with checks.{check}=false.)"


def verdict(accelerator: Accelerator, check: str, expected: str, saw: str | None) -> None:
    """Raise on every process when the check failed on any (`saw` is None where it passed).

    A process that raised alone would leave the others waiting forever in their next collective.
    """
    failures = [(rank, seen) for rank, seen in enumerate(gather_object([saw])) if seen is not None]
    if failures:
        rank, seen = failures[0]
        where = f" on process {rank} ({len(failures)} of {accelerator.num_processes} failed)"
        raise PreflightError(failure_message(check, expected, seen + (where if accelerator.num_processes > 1 else "")))


# Snapshots of the training state -------------------------------------------------------------------------


def _cpu_copy(value):
    """A deep copy with every tensor copied to the CPU: a snapshot must not alias live state."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _cpu_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(item) for item in value)
    if isinstance(value, np.ndarray):
        return value.copy()
    return value  # numbers, strings, None: immutable


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


def snapshot(accelerator: Accelerator, model, optimizer, scheduler) -> dict:
    """A CPU copy of everything `accelerator.save_state` writes for this loop."""
    return _cpu_copy(
        {
            "model": accelerator.unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": None if accelerator.scaler is None else accelerator.scaler.state_dict(),
            "rng": rng_states(),
            "step": accelerator.step,  # Accelerate's micro-batch counter, which decides accumulation cycles
        }
    )


def restore(accelerator: Accelerator, model, optimizer, scheduler, saved: dict) -> None:
    accelerator.unwrap_model(model).load_state_dict(saved["model"])
    # load_state_dict may keep what it is given (tensors already on the right device): give it copies.
    optimizer.load_state_dict(_cpu_copy(saved["optimizer"]))
    scheduler.load_state_dict(_cpu_copy(saved["scheduler"]))
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(saved["scaler"])
    set_rng_states(saved["rng"])
    accelerator.step = saved["step"]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).contiguous().view(torch.uint8)


def differences(expected, actual, path: str = "") -> list:
    """The paths where two snapshots differ, bit for bit (so NaN equals NaN, and 0.0 differs from -0.0)."""
    if torch.is_tensor(expected) and torch.is_tensor(actual):
        same = expected.dtype == actual.dtype and expected.shape == actual.shape
        return [] if same and torch.equal(_bits(expected), _bits(actual)) else [path]
    if isinstance(expected, np.ndarray) and isinstance(actual, np.ndarray):
        return [] if expected.dtype == actual.dtype and np.array_equal(expected, actual) else [path]
    if isinstance(expected, dict) and isinstance(actual, dict):
        if expected.keys() != actual.keys():
            return [f"{path} (keys {sorted(map(str, expected))} != {sorted(map(str, actual))})"]
        keys = {key: f"{path}.{key}" if path else str(key) for key in expected}
        return [found for key, where in keys.items() for found in differences(expected[key], actual[key], where)]
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)) and len(expected) == len(actual):
        return [found for i, pair in enumerate(zip(expected, actual)) for found in differences(*pair, f"{path}[{i}]")]
    return [] if type(expected) is type(actual) and expected == actual else [path]


def _listed(items: list, limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


@contextmanager
def preserved(accelerator: Accelerator, model, optimizer, scheduler):
    """Run the body, then put the whole training state back: the run goes on as if the body never ran."""
    saved = snapshot(accelerator, model, optimizer, scheduler)
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    training, sync_gradients = model.training, accelerator.sync_gradients
    accelerator.sync_gradients = True  # outside `accumulate`: every optimizer.step() in the body really steps
    try:
        yield
    finally:
        restore(accelerator, model, optimizer, scheduler, saved)
        for parameter, grad in zip(model.parameters(), grads):
            parameter.grad = grad
        model.train(training)
        accelerator.sync_gradients = sync_gradients


# Batches and steps ---------------------------------------------------------------------------------------


def take_batches(dataloader, count: int) -> list:
    """The first `count` batches of a fresh pass over `dataloader`, leaving no trace on the run.

    Starting a pass draws a seed from the loader's generator (or the global RNG, when it has none), and a
    prepared dataloader registers itself with Accelerate's gradient state until its pass ends: undo both.
    """
    generator = getattr(dataloader, "generator", None)
    generator_state = None if generator is None else generator.get_state()
    torch_state = torch.get_rng_state()
    iterator = iter(dataloader)
    batches = list(islice(iterator, count))
    del iterator  # stops worker processes, if any
    if hasattr(dataloader, "end"):
        dataloader.end()
    torch.set_rng_state(torch_state)
    if generator is not None:
        generator.set_state(generator_state)
    return batches


@torch.no_grad()
def eval_loss(task: Task, model, batches: list) -> float:
    """The task's mean loss per labelled item over `batches` with dropout off, leaving the model's mode as it was."""
    training = model.training
    model.eval()
    try:
        return (sum(task.loss(model, batch) for batch in batches) / sum(task.labelled(b) for b in batches)).item()
    finally:
        model.train(training)


def train_step(accelerator: Accelerator, task: Task, model, optimizer, batch: dict, max_grad_norm: float) -> None:
    """One optimizer step on `batch`, taken as the loop takes it (the batch is a whole accumulation cycle)."""
    loss = task.loss(model, batch) / task.labelled(batch)
    # accelerator.backward divides by the accumulation steps; here one batch is the whole cycle.
    accelerator.backward(loss * accelerator.gradient_accumulation_steps)
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()


# The checks: each returns a one-line summary for the log, or raises PreflightError -------------------------


def check_inputs(accelerator: Accelerator, task: Task, model, batches: list) -> str:
    """The task's input check on every batch (token ids inside the embedding table, labels in range, finite
    values), before any forward pass: on a GPU an out-of-range id or label stops the process with an opaque
    device-side assert instead of an error message."""
    unwrapped = accelerator.unwrap_model(model)
    problems = (task.input_problem(unwrapped, batch) for batch in batches)
    expected = (
        f"token ids inside the embedding table, finite values, and labels in [0, {task.num_outputs(unwrapped)}) "
        f"or ignored, in {len(batches)} batches"
    )
    verdict(accelerator, "inputs", expected, next((p for p in problems if p is not None), None))
    return f"{len(batches)} batches"


def check_init_loss(cfg: DictConfig, accelerator: Accelerator, task: Task, model, batches: list) -> str:
    """The untrained model predicts about uniformly, so its loss is near ln(number of outputs) (the task's
    `expected_init_loss`: classes for a classifier, the vocabulary for generated text).

    A pretrained body with a new random head predicts about uniformly too. Far off means a broken head, a
    wrong label count, or labels that leak into the inputs; a head trained before is also far off.
    """
    uniform = task.expected_init_loss(accelerator.unwrap_model(model))
    if uniform is None:
        return "skipped: the task expects no particular loss from this model (a pretrained one)"
    loss = eval_loss(task, model, batches)
    loss = accelerator.reduce(torch.tensor(loss, device=accelerator.device), reduction="mean").item()
    tolerance = cfg.init_loss_tolerance * uniform
    expected = (
        f"the mean loss of the untrained model on {len(batches)} training batches within {tolerance:.4g} of "
        f"{uniform:.4g} = ln({math.exp(uniform):.0f}), the loss of uniform predictions "
        f"(checks.init_loss_tolerance={cfg.init_loss_tolerance} of it)"
    )
    verdict(accelerator, "init_loss", expected, None if abs(loss - uniform) <= tolerance else f"{loss:.4g}")
    return f"loss {loss:.4f}, uniform {uniform:.4f}"


def check_validation(accelerator: Accelerator, model, batches: list, evaluate) -> str:
    """The loop's own `evaluate` runs end to end on a few validation batches and every metric is finite."""
    expected = f"the evaluation to run end to end on {len(batches)} validation batches with finite metrics"
    training = model.training
    try:
        metrics = evaluate(model, batches)
    except Exception as error:
        # Not gathered: the other processes may be stuck in the evaluation's collectives already.
        raise PreflightError(failure_message("validation", expected, f"{type(error).__name__}: {error}")) from error
    finally:
        model.train(training)
    bad = {name: value for name, value in metrics.items() if not math.isfinite(value)}
    verdict(accelerator, "validation", expected, f"{bad}" if bad else None)
    return ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())


def _gradient_problems(model) -> list:
    """Trainable parameter tensors without a finite, non-zero gradient (judged per tensor: an embedding
    row of a token absent from the batch rightly gets a zero gradient)."""
    problems = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.grad is None:
            problems.append(f"{name} (no gradient: not used by the loss)")
        elif not torch.isfinite(parameter.grad).all():
            problems.append(f"{name} (non-finite gradient)")
        elif not parameter.grad.any():
            problems.append(f"{name} (zero gradient)")
    return problems


def check_gradient_flow(accelerator: Accelerator, task: Task, model, optimizer, scheduler, batch: dict) -> str:
    """After one backward pass every trainable parameter tensor has a finite, non-zero gradient."""
    with preserved(accelerator, model, optimizer, scheduler):
        model.train()
        # A plain backward: accelerator.backward would multiply by the fp16 loss scale, whose first value
        # often overflows on purpose (the scaler then lowers it): this check wants the true gradients.
        task.loss(model, batch).backward()
        problems = _gradient_problems(accelerator.unwrap_model(model))
    trainable = sum(p.requires_grad for p in model.parameters())
    expected = f"a finite, non-zero gradient in each of the {trainable} trainable parameter tensors after one backward"
    verdict(
        accelerator, "gradient_flow", expected, f"{len(problems)} without: {_listed(problems)}" if problems else None
    )
    return f"{trainable} parameter tensors"


def check_overfit_batch(
    cfg: DictConfig,
    accelerator: Accelerator,
    task: Task,
    model,
    optimizer,
    scheduler,
    batch: dict,
    max_grad_norm: float,
) -> str:
    """A few dozen optimizer steps on a few fixed examples bring their loss well down: the setup can learn."""
    batch = {key: value[: cfg.overfit_examples] for key, value in batch.items()}  # few examples memorize fastest
    with preserved(accelerator, model, optimizer, scheduler):
        # The schedule may start at 0 (warmup): train at the learning rates it scales instead.
        for group, base_lr in zip(optimizer.param_groups, getattr(scheduler, "scheduler", scheduler).base_lrs):
            group["lr"] = base_lr
        first = eval_loss(task, model, [batch])
        model.train()
        for _ in range(cfg.overfit_steps):
            train_step(accelerator, task, model, optimizer, batch, max_grad_norm)
        last = eval_loss(task, model, [batch])
    target = first / cfg.overfit_factor
    expected = (
        f"checks.overfit_steps={cfg.overfit_steps} optimizer steps at the base learning rate on the first "
        f"{len(batch['labels'])} examples of a training batch (checks.overfit_examples={cfg.overfit_examples}) "
        f"to bring their loss from {first:.4g} to at most {target:.4g} (checks.overfit_factor={cfg.overfit_factor})"
    )
    verdict(accelerator, "overfit_batch", expected, None if last <= target else f"{last:.4g}")
    return f"loss {first:.4f} -> {last:.4f} in {cfg.overfit_steps} steps"


def perturb(accelerator: Accelerator, model, optimizer, scheduler) -> None:
    """Change everything a checkpoint holds, so that a load which silently restores nothing is caught."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1)
        for state in optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value) and value.is_floating_point():
                    value.add_(1)
    scheduler.step()  # also changes the optimizer's learning rates
    if accelerator.scaler is not None:
        scaler_state = accelerator.scaler.state_dict()
        accelerator.scaler.load_state_dict({**scaler_state, "scale": scaler_state["scale"] * 2})
    accelerator.step += 1
    random.random()
    np.random.random()
    torch.rand(1)
    if accelerator.device.type == "cuda":
        torch.rand(1, device=accelerator.device)


def _telling_line(error: Exception) -> str:
    """The line that says what went wrong: torch's weights_only failures bury it under advice."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
    line = next((line for line in lines if "Unsupported global" in line), lines[0])
    return f"{type(error).__name__}: {line.split('. ')[0]}"


def _cpu_load_problems(folder: Path) -> list:
    """Checkpoint files that do not load on the CPU without running pickled code."""
    problems = []
    for file in sorted(folder.iterdir()):
        try:
            if file.suffix == ".safetensors":
                load_file(file, device="cpu")
            elif file.suffix in {".bin", ".pkl", ".pt", ".pth"}:
                load(file, map_location="cpu", weights_only=True)  # Accelerate's loader, numpy RNG states allowed
        except Exception as error:
            problems.append(f"{file.name} ({_telling_line(error)})")
    return problems


def check_checkpoint_round_trip(
    accelerator: Accelerator,
    task: Task,
    model,
    optimizer,
    scheduler,
    batch: dict,
    folder: Path,
    trainer_state: dict,
    max_grad_norm: float,
) -> str:
    """Save the training state, scramble the live objects, load it back: everything is restored bit for
    bit (RNG states included: Accelerate only logs a failed RNG restore), and the files load on a CPU."""
    with preserved(accelerator, model, optimizer, scheduler):
        train_step(accelerator, task, model, optimizer, batch, max_grad_norm)  # so the optimizer has state to save
        saved = snapshot(accelerator, model, optimizer, scheduler)
        iteration = accelerator.project_configuration.iteration
        try:
            path = checkpoints.save(accelerator, folder, trainer_state, config={})
            perturb(accelerator, model, optimizer, scheduler)
            loaded_trainer_state = checkpoints.load(accelerator, path)
            changed = differences(saved, snapshot(accelerator, model, optimizer, scheduler))
            if loaded_trainer_state != trainer_state:
                changed.append(f"trainer state {loaded_trainer_state} (saved {trainer_state})")
            unloadable = _cpu_load_problems(path) if accelerator.is_main_process else []
        finally:
            accelerator.project_configuration.iteration = iteration  # save_state counts its calls
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                shutil.rmtree(folder, ignore_errors=True)
    saw = [f"after load_state these differ from what was saved: {_listed(changed)}"] if changed else []
    saw += [f"files that do not load on the CPU with weights_only=True: {_listed(unloadable)}"] if unloadable else []
    expected = (
        "model, optimizer, scheduler, RNG states and step counters restored bit for bit by load_state, "
        "and every file loading on the CPU"
    )
    verdict(accelerator, "checkpoint_round_trip", expected, "; ".join(saw) or None)
    return f"{len(saved['model'])} model tensors, optimizer, scheduler, RNG and counters restored"


def run_preflight_checks(
    cfg: DictConfig,
    accelerator: Accelerator,
    task: Task,
    model,
    optimizer,
    scheduler,
    train_dl,
    eval_dl,
    *,
    evaluate,
    run_dir: Path,
    trainer_state: dict,
    max_grad_norm: float,
) -> None:
    """Run the enabled checks (config group `checks`); `evaluate(model, batches)` is the loop's evaluation."""
    if not cfg.enabled:
        return
    if accelerator.distributed_type in UNSUPPORTED:
        logger.warning(f"preflight checks skipped: not supported with {accelerator.distributed_type}")
        return
    start = time.perf_counter()
    train_batches = take_batches(train_dl, cfg.init_loss_batches)
    eval_batches = take_batches(eval_dl, cfg.validation_batches) if cfg.validation else []
    batch = train_batches[0]
    # In this order: inputs before any forward pass, init_loss on the untouched model.
    checks = {
        "inputs": lambda: check_inputs(accelerator, task, model, train_batches + eval_batches),
        "init_loss": lambda: check_init_loss(cfg, accelerator, task, model, train_batches),
        "validation": lambda: check_validation(accelerator, model, eval_batches, evaluate),
        "gradient_flow": lambda: check_gradient_flow(accelerator, task, model, optimizer, scheduler, batch),
        "overfit_batch": lambda: check_overfit_batch(
            cfg, accelerator, task, model, optimizer, scheduler, batch, max_grad_norm
        ),
        "checkpoint_round_trip": lambda: check_checkpoint_round_trip(
            accelerator,
            task,
            model,
            optimizer,
            scheduler,
            batch,
            Path(run_dir) / TEMP_FOLDER,
            trainer_state,
            max_grad_norm,
        ),
    }
    for name, check in checks.items():
        if not cfg[name]:
            logger.info(f"preflight {name}: off")
            continue
        begin = time.perf_counter()
        summary = check()
        logger.info(f"preflight {name}: passed in {time.perf_counter() - begin:.2f}s ({summary})")
    logger.info(f"preflight checks passed in {time.perf_counter() - start:.2f}s")
