"""Preflight checks: cheap sanity checks before the first optimizer step of a fresh run.

Each catches a bug that otherwise shows hours into a run, or never: out-of-range inputs, a badly initialized
head, an evaluation that crashes, parameters cut off from the loss, a setup that cannot learn, a checkpoint
that does not restore. Each is switched by `checks.<name>`. A check fails only on what is surely a bug, with a
PreflightError that names what it expected, what it saw and the key that turns it off; where a valid model can
look the same (parameters its forward never uses, a tiny model that learns slowly) it logs a warning instead.

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

import numpy as np
import torch
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, gather_object, load, set_seed
from safetensors.torch import load_file
from torch.utils._pytree import tree_leaves_with_path, tree_map

from . import checkpoints
from .errors import ModelError, UserError
from .metrics_log import readable

logger = get_logger(__name__)

TEMP_FOLDER = ".preflight_checkpoint"  # inside the run folder, removed after the round trip
# Sharded or compiled-graph backends keep parameters and optimizer state where these checks cannot see them.
UNSUPPORTED = {DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA}
OVERFIT_EVERY = 10  # overfit_batch measures the loss every this many steps and stops once it reached the target
SLOW_DROP = 0.1  # a loss that fell by at least this fraction, short of the target, learns slowly: a warning


class PreflightError(UserError, RuntimeError):
    """A preflight check failed; the message names the check, what it expected, what it saw, the off switch."""


def verdict(accelerator, check: str, expected: str, saw: str | None) -> None:
    """Raise on every process when the check failed on any (`saw` is None where it passed).

    A process that raised alone would leave the others waiting forever in their next collective.
    """
    failures = [(rank, seen) for rank, seen in enumerate(gather_object([saw])) if seen is not None]
    if failures:
        rank, seen = failures[0]
        if accelerator.num_processes > 1:
            seen += f" on process {rank} ({len(failures)} of {accelerator.num_processes} failed)"
        fail(check, expected, seen)


def fail(check: str, expected: str, saw: str):
    off = f"(Turn it off with checks.{check}=false.)"
    raise PreflightError(f"preflight check {check} failed: expected {expected}; saw {saw}. {off}")


def warn(check: str, text: str) -> None:
    logger.warning(f"preflight {check} warning: {text} (checks.{check}=false turns the check off)")


def _listed(items: list, limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


# Snapshots of the training state -------------------------------------------------------------------------


def snapshot(run) -> dict:
    """A CPU copy (aliasing no live tensor) of everything `accelerator.save_state` writes for the loop's `run`."""
    accelerator = run.accelerator
    state = {
        "model": accelerator.unwrap_model(run.model).state_dict(),
        "unsaved_buffers": unsaved_buffers(accelerator.unwrap_model(run.model)),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": None if accelerator.scaler is None else accelerator.scaler.state_dict(),
        "rng": {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        },
        "step": accelerator.step,  # Accelerate's micro-batch counter, which decides accumulation cycles
    }
    return tree_map(lambda value: value.detach().to("cpu", copy=True) if torch.is_tensor(value) else value, state)


def restore(run, saved: dict) -> None:
    """Load a snapshot back (it is used up: the optimizer may keep its tensors)."""
    accelerator, model = run.accelerator, run.accelerator.unwrap_model(run.model)
    model.load_state_dict(saved["model"])
    with torch.no_grad():
        for name, value in saved["unsaved_buffers"].items():
            model.get_buffer(name).copy_(value)
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(saved["scaler"])
    random.setstate(saved["rng"]["python"])
    np.random.set_state(saved["rng"]["numpy"])
    torch.set_rng_state(saved["rng"]["torch"])
    torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    accelerator.step = saved["step"]


def unsaved_buffers(model) -> dict:
    """The buffers that state_dict leaves out (registered with persistent=False), by name."""
    saved = model.state_dict(keep_vars=True)
    return {name: buffer for name, buffer in model.named_buffers() if name not in saved}


def _same(expected, actual) -> bool:
    """Equal bit for bit (so NaN equals NaN, and 0.0 differs from -0.0)."""
    if torch.is_tensor(expected) and torch.is_tensor(actual):
        bits = [t.detach().reshape(-1).contiguous().view(torch.uint8) for t in (expected, actual)]
        return expected.dtype == actual.dtype and expected.shape == actual.shape and torch.equal(*bits)
    if isinstance(expected, np.ndarray) and isinstance(actual, np.ndarray):
        return expected.dtype == actual.dtype and np.array_equal(expected, actual)
    return type(expected) is type(actual) and expected == actual


def differences(expected: dict, actual: dict) -> list:
    """The places (such as `model.<weight name>`, `rng.torch`, `step`) where two snapshots differ."""
    leaves = [
        {".".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path): leaf for path, leaf in found}
        for found in (tree_leaves_with_path(expected), tree_leaves_with_path(actual))
    ]
    return [place for place in leaves[0] | leaves[1] if not _same(leaves[0].get(place), leaves[1].get(place))]


@contextmanager
def preserved(run):
    """Run the body, then put the whole training state back: the run goes on as if the body never ran."""
    accelerator, model = run.accelerator, run.model
    saved = snapshot(run)
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    training, sync_gradients = model.training, accelerator.sync_gradients
    accelerator.sync_gradients = True  # outside `accumulate`: every optimizer.step() in the body really steps
    try:
        yield
    finally:
        restore(run, saved)
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
def eval_loss(task, model, batches: list) -> float:
    """The task's mean loss per labelled item over `batches` with dropout off, leaving the model's mode as it was."""
    training = model.training
    model.eval()
    try:
        return (sum(task.loss(model, batch) for batch in batches) / sum(task.labelled(b) for b in batches)).item()
    finally:
        model.train(training)


def mean_over_processes(run, value: float) -> float:
    """The mean of `value` over all processes: every process then takes the same decision."""
    return run.accelerator.reduce(torch.tensor(value, device=run.accelerator.device), reduction="mean").item()


def train_step(run, batch: dict) -> None:
    """One optimizer step on `batch`, taken as the loop takes it (the batch is a whole accumulation cycle)."""
    accelerator, max_grad_norm = run.accelerator, run.cfg.trainer.max_grad_norm
    loss = run.task.loss(run.model, batch) / run.task.labelled(batch)
    # accelerator.backward divides by the accumulation steps; here one batch is the whole cycle.
    accelerator.backward(loss * accelerator.gradient_accumulation_steps)
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(run.model.parameters(), max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad()


# The checks: each returns a one-line summary for the log, or raises PreflightError -------------------------


def check_inputs(run, batches: list) -> str:
    """The task's input check on every batch (tokens, with ids inside the embedding table, labels in range,
    finite values), before any forward pass: on a GPU an out-of-range id or label stops the process with an opaque
    device-side assert instead of an error message."""
    task, model = run.task, run.accelerator.unwrap_model(run.model)
    problems = (task.input_problem(model, batch) for batch in batches)
    first = batches[0].get("labels") if batches else None
    ids = first is None or not first.is_floating_point()  # class or token ids; floats are real-valued targets
    labels = f"labels in [0, {task.num_outputs(model)}) or ignored" if ids else "labels"
    expected = f"tokens with ids inside the embedding table, finite values, and {labels}, in {len(batches)} batches"
    verdict(run.accelerator, "inputs", expected, next((p for p in problems if p is not None), None))
    return f"{len(batches)} batches"


def check_init_loss(run, batches: list) -> str:
    """The untrained model's loss is near the task's `expected_init_loss`: for most tasks it predicts about
    uniformly, so ln(number of outputs) (classes for a classifier, the vocabulary for generated text).

    A pretrained body with a new random head predicts about uniformly too. Far off means a broken head, a
    wrong label count, or labels that leak into the inputs; a head trained before is also far off.
    """
    model, cfg = run.accelerator.unwrap_model(run.model), run.cfg.checks
    initial = run.task.expected_init_loss(model)
    if initial is None:
        return "skipped: the task expects no particular loss from this model (a pretrained one, say)"
    loss = mean_over_processes(run, eval_loss(run.task, run.model, batches))
    tolerance, outputs = cfg.init_loss_tolerance * initial, run.task.num_outputs(model)
    why = ", the task's expected_init_loss"
    if math.isclose(initial, math.log(outputs)):
        why = f" = ln({outputs}), the loss of uniform predictions"
    expected = (
        f"the mean loss of the untrained model on {len(batches)} training batches within {tolerance:.4g} of "
        f"{initial:.4g}{why} (checks.init_loss_tolerance={cfg.init_loss_tolerance} of it)"
    )
    verdict(run.accelerator, "init_loss", expected, None if abs(loss - initial) <= tolerance else f"{loss:.4g}")
    return f"loss {loss:.4f}, expected {initial:.4f}"


def check_validation(run, batches: list, evaluate) -> str:
    """The loop's own `evaluate` runs end to end on a few validation batches and every metric is finite."""
    expected = f"the evaluation to run end to end on {len(batches)} validation batches with finite metrics"
    training = run.model.training
    try:  # a model that cannot run fails as in the other checks (run_preflight_checks words it)
        metrics = evaluate(run.model, batches)
    finally:
        run.model.train(training)
    bad = {name: value for name, value in metrics.items() if not math.isfinite(value)}
    verdict(run.accelerator, "validation", expected, f"{bad}" if bad else None)
    return f"{readable(metrics)} on {metrics['examples']:.0f} examples"


@contextmanager
def randomly_changed(model, parameters: list, scale: float = 1.0):
    """`parameters` changed at random (reproducibly, not from the run's RNG) inside, as they were after. An
    embedding's padding row is left as it is: it is constant by design (PyTorch gives it no gradient)."""
    embeddings = (m for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None)
    padding = {id(m.weight): m.padding_idx for m in embeddings}
    originals = [parameter.detach().clone() for parameter in parameters]
    with torch.no_grad():
        for parameter in parameters:
            generator = torch.Generator(parameter.device).manual_seed(0)
            change = torch.randn(parameter.shape, generator=generator, device=parameter.device).to(parameter.dtype)
            if id(parameter) in padding:
                change[padding[id(parameter)]] = 0
            parameter.add_(change * scale)
    try:
        yield
    finally:
        with torch.no_grad():
            for parameter, original in zip(parameters, originals):
                parameter.copy_(original)


def moves_loss(task, model, parameters: list, batches: list, loss: float) -> bool:
    """Whether a random change of `parameters` moves the loss (`loss` before it): the forward uses them."""
    with randomly_changed(model, parameters):
        changed = eval_loss(task, model, batches)
    return not math.isclose(changed, loss, rel_tol=1e-5, abs_tol=1e-7)


def check_gradient_flow(run, batches: list) -> str:
    """A backward pass over a few training batches gives every trainable parameter tensor that the loss depends
    on a finite gradient.

    A tensor with no gradient, or one that is zero throughout (judged per tensor: an embedding row of an absent
    token rightly gets zero), is changed at random. If the loss stays, the forward does not use it (a pooler the
    head skips, say): a warning, and plain DDP needs find_unused_parameters for one outside the autograd graph;
    unless the loss moves once the other tensors change too: it sits behind a layer that passes nothing on yet (an
    output layer initialized to zero), which is fine. If the loss moves and the tensor is outside the graph, a bug
    cut its gradient off (a detach, a no_grad block, a write through .data): that fails. If the loss moves and the
    gradient is exactly zero, the loss is flat around it (a top-1 mixture-of-experts router, an argmax, dead
    units): it will not learn, a warning.
    """
    task, model = run.task, run.accelerator.unwrap_model(run.model)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    with preserved(run):  # which also puts back each .grad cleared here
        model.train()
        for parameter in trainable.values():
            parameter.grad = None
        # autograd.grad, not backward: DDP's gradient hooks stay out of it, so each process judges its own
        # gradients. Not accelerator.backward either, whose fp16 loss scale often overflows on purpose at first.
        total = sum(task.loss(model, batch) for batch in batches)
        found = [None] * len(trainable)  # unless some trainable parameter reaches the loss
        if total.requires_grad:
            found = torch.autograd.grad(total, list(trainable.values()), allow_unused=True)
        # A custom autograd Function may run its own backward inside and so write .grad instead (Reformer's
        # reversible layers): autograd.grad then returns None, but the parameter is in the graph all the same.
        grads = {name: p.grad if grad is None else grad for (name, p), grad in zip(trainable.items(), found)}
        nonfinite = [name for name, grad in grads.items() if grad is not None and not grad.isfinite().all()]
        silent = {name: trainable[name] for name, grad in grads.items() if grad is None or not grad.any()}
        loss = eval_loss(task, model, batches) if silent else 0.0
        unused = list(silent)  # usually all of them, found in one try; else each is tried alone
        if silent and moves_loss(task, model, list(silent.values()), batches, loss):
            unused = [name for name, p in silent.items() if not moves_loss(task, model, [p], batches, loss)]
        # In the graph with a zero gradient, changing them alone moves nothing, but it does once the other tensors
        # change: behind a layer that passes nothing on yet (an output layer initialized to zero), they learn once
        # it does.
        waiting = []
        if any(grads[name] is not None for name in unused):
            others = [p for name, p in trainable.items() if name not in silent]
            with randomly_changed(model, others, scale=0.01):
                moved_loss = eval_loss(task, model, batches)
                waiting = [
                    name
                    for name in unused
                    if grads[name] is not None and moves_loss(task, model, [trainable[name]], batches, moved_loss)
                ]
        unused = [name for name in unused if name not in waiting]
        outside_graph = [name for name in unused if grads[name] is None]  # what DDP waits for in vain
    cut = [name for name in silent if name not in unused + waiting and grads[name] is None]
    flat = [name for name in silent if name not in unused + waiting and grads[name] is not None]
    ddp_fails = outside_graph and run.accelerator.num_processes > 1 and not run.cfg.trainer.find_unused_parameters
    saw = [f"{len(nonfinite)} with a non-finite gradient: {_listed(nonfinite)}"] if nonfinite else []
    saw += [f"{len(cut)} that change the loss but get no gradient (cut off): {_listed(cut)}"] if cut else []
    saw += [f"{len(outside_graph)} unused, which DDP refuses: {_listed(outside_graph)}"] if ddp_fails else []
    expected = (
        f"a finite gradient in each of the {len(trainable)} trainable parameter tensors that the loss depends on"
        + (", and trainer.find_unused_parameters=true for unused ones" if ddp_fails else "")
    )
    verdict(run.accelerator, "gradient_flow", expected, "; ".join(saw) or None)
    if unused:
        ddp = "; a multi-process (DDP) run needs trainer.find_unused_parameters=true" if outside_graph else ""
        warn(
            "gradient_flow",
            f"{len(unused)} trainable parameter tensors get no gradient and changing them does not change the loss: "
            f"the forward does not use them ({_listed(unused)}). Fine if meant (a pooler this head skips, say); "
            f"freeze them to save optimizer memory{ddp}",
        )
    if flat:
        warn(
            "gradient_flow",
            f"{len(flat)} trainable parameter tensors change the loss but their gradient is exactly zero: the loss is "
            f"flat around them, so they will not learn ({_listed(flat)}). Expected of a hard choice (a top-1 "
            "mixture-of-experts router, an argmax); else look for dead units",
        )
    notes = [f"{len(unused)} unused"] if unused else []
    notes += [f"{len(waiting)} behind a layer that passes nothing on yet"] if waiting else []
    notes += [f"{len(flat)} with a flat loss"] if flat else []
    return ", ".join([f"{len(trainable)} parameter tensors", *notes])


def check_overfit_batch(run, batch: dict) -> str:
    """Up to checks.overfit_steps optimizer steps on a few fixed examples bring their loss down to the target:
    the setup can learn. A loss that falls, but not that far, is a warning (tiny random models of some
    architectures learn slowly at the run's learning rate); one that barely moves fails."""
    cfg, task, model, optimizer = run.cfg.checks, run.task, run.model, run.optimizer
    batch = {key: value[: cfg.overfit_examples] for key, value in batch.items()}  # few examples memorize fastest
    with preserved(run):
        # The schedule may start at 0 (warmup): train at the learning rates it scales instead.
        for group, base_lr in zip(optimizer.param_groups, getattr(run.scheduler, "scheduler", run.scheduler).base_lrs):
            group["lr"] = base_lr
        first = last = mean_over_processes(run, eval_loss(task, model, [batch]))
        target, steps = first / cfg.overfit_factor, 0
        while steps < cfg.overfit_steps and last > target:  # the same decision on every process
            model.train()
            for _ in range(min(OVERFIT_EVERY, cfg.overfit_steps - steps)):
                train_step(run, batch)
                steps += 1
            last = mean_over_processes(run, eval_loss(task, model, [batch]))
    floor = first * (1 - SLOW_DROP)
    expected = (
        f"the loss of the first {len(batch['labels'])} examples of a training batch "
        f"(checks.overfit_examples={cfg.overfit_examples}) to fall from {first:.4g} to {target:.4g} "
        f"(checks.overfit_factor={cfg.overfit_factor}), or at least to {floor:.4g} ({SLOW_DROP:.0%} lower), "
        f"within checks.overfit_steps={cfg.overfit_steps} optimizer steps at the base learning rate"
    )
    summary = f"loss {first:.4f} -> {last:.4f} in {steps} steps"
    verdict(run.accelerator, "overfit_batch", expected, None if last <= floor else summary)
    if last > target:
        warn(
            "overfit_batch",
            f"the model learns slowly: {summary}, short of the target {target:.4g}. Fine for some tiny random "
            "models; otherwise raise optimizer.lr, or checks.overfit_steps to look longer",
        )
        return f"{summary}, short of the target: the warning above"
    return summary


def perturb(run) -> None:
    """Change everything a checkpoint holds, so that a load which silently restores nothing is caught."""
    accelerator, optimizer_state = run.accelerator, run.optimizer.state.values()
    with torch.no_grad():
        for tensor in [*run.model.parameters(), *(value for state in optimizer_state for value in state.values())]:
            if torch.is_tensor(tensor) and tensor.is_floating_point():
                tensor.add_(1)
    run.scheduler.step()  # also changes the optimizer's learning rates
    if accelerator.scaler is not None:
        scaler_state = accelerator.scaler.state_dict()
        accelerator.scaler.load_state_dict({**scaler_state, "scale": scaler_state["scale"] * 2})
    accelerator.step += 1
    set_seed(random.randrange(2**31))  # every RNG: Python's, NumPy's, torch's, the GPUs'


def _cpu_load_problems(folder) -> list:
    """Checkpoint files that do not load on the CPU without running pickled code, with the line that says why
    (torch's weights_only failures bury it under advice)."""
    problems = []
    for file in sorted(folder.iterdir()):
        try:
            if file.suffix == ".safetensors":
                load_file(file, device="cpu")
            elif file.suffix in {".bin", ".pkl", ".pt", ".pth"}:
                load(file, map_location="cpu", weights_only=True)  # Accelerate's loader, numpy RNG states allowed
        except Exception as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
            line = next((line for line in lines if "Unsupported global" in line), lines[0])
            problems.append(f"{file.name} ({type(error).__name__}: {line.split('. ')[0]})")
    return problems


def check_checkpoint_round_trip(run, batch: dict) -> str:
    """Save the training state, scramble the live objects, load it back: everything is restored bit for
    bit (RNG states included: Accelerate only logs a failed RNG restore), and the files load on a CPU."""
    accelerator, folder = run.accelerator, run.run_dir / TEMP_FOLDER
    model = accelerator.unwrap_model(run.model)
    with preserved(run):
        run.model.train()  # as the loop trains (a model loads in eval mode; Reformer's backward refuses that)
        before = {name: buffer.clone() for name, buffer in unsaved_buffers(model).items()}
        train_step(run, batch)  # so the optimizer has state to save
        unsaved = [name for name, buffer in unsaved_buffers(model).items() if not _same(before[name], buffer)]
        saved = snapshot(run)
        iteration = accelerator.project_configuration.iteration
        try:
            path = checkpoints.save(accelerator, folder, run.state, config={})
            perturb(run)
            loaded_trainer_state = checkpoints.load(accelerator, path)
            changed = differences(saved, snapshot(run))
            if loaded_trainer_state != run.state:
                changed.append(f"trainer state {loaded_trainer_state} (saved {run.state})")
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
    if unsaved:
        warn(
            "checkpoint_round_trip",
            f"training changes buffers that no checkpoint or export holds ({_listed(unsaved)}): registered with "
            "persistent=False, they start anew on resume and in evaluate.py; register them persistent if they are "
            "state",
        )
    return f"{len(saved['model'])} model tensors, optimizer, scheduler, RNG and counters restored"


def run_preflight_checks(run, evaluate) -> None:
    """Run the checks that `checks` (of the loop's `run` config) turns on; `evaluate(model, batches)` is the
    loop's evaluation."""
    cfg, accelerator = run.cfg.checks, run.accelerator
    if not cfg.enabled:
        return
    if accelerator.distributed_type in UNSUPPORTED:
        logger.warning(f"preflight checks skipped: not supported with {accelerator.distributed_type}")
        return
    start = time.perf_counter()
    train_batches = take_batches(run.train_dl, cfg.init_loss_batches)
    eval_batches = take_batches(run.eval_dl, cfg.validation_batches) if cfg.validation else []
    # In this order: inputs before any forward pass, init_loss on the untouched model.
    checks = {
        "inputs": lambda: check_inputs(run, train_batches + eval_batches),
        "init_loss": lambda: check_init_loss(run, train_batches),
        "validation": lambda: check_validation(run, eval_batches, evaluate),
        "gradient_flow": lambda: check_gradient_flow(run, train_batches),
        "overfit_batch": lambda: check_overfit_batch(run, train_batches[0]),
        "checkpoint_round_trip": lambda: check_checkpoint_round_trip(run, train_batches[0]),
    }
    for name, check in checks.items():
        if not cfg[name]:
            logger.info(f"preflight {name}: off")
            continue
        begin = time.perf_counter()
        try:
            summary = check()
        except UserError:
            raise
        except Exception as error:  # the model cannot run on the task's batches: a shape, size or dtype that differs
            raise PreflightError(
                f"preflight check {name} failed: {ModelError.of(error, 'a batch of the task')}"
            ) from error
        logger.info(f"preflight {name}: passed in {time.perf_counter() - begin:.2f}s ({summary})")
    logger.info(f"preflight checks passed in {time.perf_counter() - start:.2f}s")
