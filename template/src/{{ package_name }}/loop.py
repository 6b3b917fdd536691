"""The training loop on Hugging Face Accelerate. Read it top to bottom: `train` is the whole run."""

import json
import math
import os
import time
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import GradientAccumulationPlugin, set_seed
from omegaconf import DictConfig
from tqdm.auto import tqdm

from . import checkpoints, launch
from .checks import run_preflight_checks
from .config import ConfigError, KeepPolicy, MetricMode, NonFiniteLoss, Tracker, to_container, validate
from .data import load_splits, make_dataloaders, tokenize
from .model import build_model, build_tokenizer
from .optim import build_optimizer, build_scheduler

logger = get_logger(__name__)
IGNORE_INDEX = -100  # label value of padding and other positions that carry no loss


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def make_accelerator(cfg: DictConfig, run_dir: Path) -> Accelerator:
    accelerator = Accelerator(
        cpu=launch.use_cpu(cfg.cpu),  # several processes on a machine without GPUs: one gloo group on the CPU
        mixed_precision=cfg.mixed_precision.value,
        # Cycles of micro-batches run on across epoch ends (see `train`), so Accelerate must not
        # force a sync at the end of each epoch.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=None if cfg.log_with == Tracker.none else cfg.log_with.value,
        project_dir=str(run_dir),
        step_scheduler_with_optimizer=False,  # the loop steps the schedule once per optimizer step
        # A sampler seeded from the config, so a resumed run sees the same batches in the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if cfg.cpu and accelerator.device.type != "cpu":  # launch.share_run_stamp started the group on the GPUs
        raise ConfigError(
            "trainer.cpu=true: this multi-process launch runs on GPUs; launch it with ACCELERATE_USE_CPU=1"
        )
    return accelerator


def flat_hparams(cfg: DictConfig) -> dict:
    """The resolved config as flat scalars, the form trackers accept for hyperparameters."""

    def flatten(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield prefix + key, value if isinstance(value, (int, float, str, bool)) else str(value)

    return dict(flatten(to_container(cfg)))


@torch.no_grad()
def evaluate(model, dataloader, accelerator: Accelerator) -> dict:
    """Mean loss and accuracy over every validation example exactly once, across all processes (`examples`)."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for batch in dataloader:
        logits = model(**batch).logits
        losses = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
        # gather_for_metrics drops the samples duplicated to even out the last batch across processes.
        preds, labels, losses = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"], losses))
        total_loss += losses.sum().item()
        correct += (preds == labels).sum().item()
        count += labels.numel()
    model.train()
    return {"loss": total_loss / count, "accuracy": correct / count, "examples": count}


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over every labelled item: examples ([B, C] logits, [B] labels) or tokens
    ([B, T, V] logits, [B, T] labels already shifted for next-token prediction, padding = -100)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def micro_batches(accelerator: Accelerator, train_dl, batches_seen: int):
    """Training batches without end, epoch after epoch, starting after `batches_seen` batches."""
    epoch, done_in_epoch = divmod(batches_seen, len(train_dl))
    while True:
        train_dl.set_epoch(epoch)  # the sampler shuffles with seed + epoch: same order after a resume
        yield from accelerator.skip_first_batches(train_dl, done_in_epoch) if done_in_epoch else train_dl
        epoch, done_in_epoch = epoch + 1, 0


def accumulate_cycle(accelerator: Accelerator, model, cycle: list) -> tuple:
    """Forward and backward over the micro-batches of one optimizer step; return the loss sum and the
    number of labelled items of the whole cycle, summed over all processes.

    Each item weighs the same however the items fall into micro-batches and processes: the loss is
    divided by the cycle's total item count, not averaged per micro-batch (the 2024 accumulation bug,
    transformers #34191). `backward` divides by the accumulation steps and DDP averages over
    processes, so both are multiplied back.
    """
    items = accelerator.reduce(sum((b["labels"] != IGNORE_INDEX).sum() for b in cycle), "sum")
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / items
    loss_sum = torch.zeros((), device=accelerator.device)
    for batch in cycle:
        with accelerator.accumulate(model):
            inputs = {name: tensor for name, tensor in batch.items() if name != "labels"}
            loss = summed_loss(model(**inputs).logits, batch["labels"])
            accelerator.backward(loss * scale)
            loss_sum += loss.detach()
    return accelerator.reduce(loss_sum, "sum"), items


def improved(value: float, best: float | None, mode: MetricMode, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == MetricMode.min else value > best + min_delta


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train as the config says, writing checkpoints, logs and the exported model under `run_dir`."""
    validate(cfg)
    run_dir = Path(run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    trainer = cfg.trainer
    if trainer.deterministic:  # needed by deterministic cuBLAS; must be set before CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    accelerator = make_accelerator(trainer, run_dir)
    ranks = launch.gathered_ranks(accelerator)  # fails at once if the launched processes did not form one group
    seed = trainer.seed
    set_seed(seed, deterministic=trainer.deterministic)

    # Data, then the model (seeded right before it is built, so its random init is reproducible).
    tokenizer = build_tokenizer(cfg.model)
    with accelerator.main_process_first():  # the main process fills the datasets cache first
        splits = load_splits(cfg.data, seed)
        tokenized = tokenize(splits, cfg.data, tokenizer)
    train_dl, eval_dl = make_dataloaders(tokenized, cfg.data, tokenizer, seed)
    set_seed(seed, deterministic=trainer.deterministic)
    labels = splits["train"].features[cfg.data.label_column].names
    model = build_model(cfg.model, labels, tokenizer, cfg.data.max_length)
    optimizer = build_optimizer(cfg.optimizer, model)
    scheduler = build_scheduler(cfg.scheduler, optimizer, trainer.max_steps)
    model, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, eval_dl, scheduler)

    state = {
        "step": 0,  # optimizer steps taken
        "batches_seen": 0,  # micro-batches consumed on each process
        "seed": seed,
        "metrics": {},  # of the latest evaluation
        "best": None,  # best value of checkpoint.monitor so far
        "evals_without_improvement": 0,
        "stopped_early": False,
        "skipped_steps": 0,  # updates dropped for a non-finite loss (trainer.nonfinite_loss=skip)
        "last_finite_loss": None,
    }
    resume_from = checkpoints.resolve_resume(cfg.resume, checkpoint_dir)
    if resume_from is not None:
        state = checkpoints.load(accelerator, resume_from)
        logger.info(f"resumed from {resume_from} at step {state['step']}", main_process_only=True)
    else:  # a fresh run: sanity checks before the first step, leaving the run as it would be without them
        run_preflight_checks(
            cfg.checks,
            accelerator,
            model,
            optimizer,
            scheduler,
            train_dl,
            eval_dl,
            evaluate=evaluate,
            run_dir=run_dir,
            trainer_state=state,
            max_grad_norm=cfg.trainer.max_grad_norm,
        )

    accelerator.init_trackers(trainer.tracker_project, config=flat_hparams(cfg))
    progress = tqdm(total=trainer.max_steps, initial=state["step"], disable=not accelerator.is_local_main_process)
    step_losses = []
    start = time.perf_counter()
    model.train()
    # One optimizer step per cycle of `gradient_accumulation_steps` micro-batches. Cycles run on across
    # epoch ends, as Accelerate's own accumulation counter does (so its sync decisions match ours).
    stream = micro_batches(accelerator, train_dl, state["batches_seen"])
    while state["step"] < trainer.max_steps and not state["stopped_early"]:
        cycle = list(islice(stream, trainer.gradient_accumulation_steps))
        loss_sum, items = accumulate_cycle(accelerator, model, cycle)
        if not accelerator.sync_gradients:  # the optimizer would silently skip this step
            raise RuntimeError("accumulation cycle out of step with Accelerate's gradient synchronization")
        state["batches_seen"] += len(cycle)
        state["step"] += 1
        step, loss = state["step"], (loss_sum / items).item()  # the mean over every item of the cycle
        if math.isfinite(loss):
            if trainer.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), trainer.max_grad_norm)
            optimizer.step()
            state["last_finite_loss"] = loss
        elif trainer.nonfinite_loss == NonFiniteLoss.skip:
            state["skipped_steps"] += 1
            logger.warning(f"step {step}: loss is {loss}; update skipped ({state['skipped_steps']} so far)")
        else:
            raise NonFiniteLossError(
                f"step {step}: the training loss is {loss}; the last finite loss was {state['last_finite_loss']} "
                f"(step {step - 1}). Checkpoints written so far are untouched. To drop such updates and go on, "
                "set trainer.nonfinite_loss=skip; else lower optimizer.lr or set trainer.max_grad_norm."
            )
        scheduler.step()
        optimizer.zero_grad()
        step_losses.append(loss)
        progress.update(1)

        if step % trainer.log_every_n_steps == 0:
            accelerator.log({"train/loss": loss, "train/lr": scheduler.get_last_lr()[0]}, step=step)
            progress.set_postfix(loss=f"{loss:.4f}")
        if trainer.eval_every_n_steps and step % trainer.eval_every_n_steps == 0:
            state["metrics"] = evaluate(model, eval_dl, accelerator)
            accelerator.log({f"eval/{k}": v for k, v in state["metrics"].items()}, step=step)
            value = state["metrics"][cfg.checkpoint.monitor.value]
            if improved(value, state["best"], cfg.checkpoint.mode, trainer.early_stopping_min_delta):
                state["best"], state["evals_without_improvement"] = value, 0
                if cfg.checkpoint.keep != KeepPolicy.latest:
                    checkpoints.export(accelerator, model, tokenizer, run_dir / "best_model")
            else:
                state["evals_without_improvement"] += 1
            patience = trainer.early_stopping_patience
            if patience and state["evals_without_improvement"] >= patience:
                accelerator.set_trigger()
            # Every process takes the same decision (a rank that stopped alone would hang the others).
            if accelerator.check_trigger():
                state["stopped_early"] = True
                logger.info(
                    f"early stopping at step {step}: {cfg.checkpoint.monitor.value} has not improved on "
                    f"{state['best']} by more than {trainer.early_stopping_min_delta} for {patience} evaluations",
                    main_process_only=True,
                )
        if cfg.checkpoint.every_n_steps and step % cfg.checkpoint.every_n_steps == 0:
            checkpoints.save(accelerator, checkpoint_dir, state, to_container(cfg))
            if accelerator.is_main_process:
                checkpoints.prune(checkpoint_dir, cfg.checkpoint)
    progress.close()
    train_seconds = time.perf_counter() - start

    state["metrics"] = evaluate(model, eval_dl, accelerator)
    accelerator.log({f"eval/{k}": v for k, v in state["metrics"].items()}, step=state["step"])
    checkpoints.export(accelerator, model, tokenizer, run_dir / "model")
    # Free the DDP-wrapped model before end_training destroys the process group. Otherwise its reducer holds the
    # group's last reference and destroys it when train() returns, joining gloo's threads while holding the GIL
    # they may need: a hang at exit, seen about once in ten 2-process CPU runs.
    accelerator.free_memory()
    del model
    accelerator.end_training()
    result = {
        "step": state["step"],
        "metrics": state["metrics"],
        "stopped_early": state["stopped_early"],
        "skipped_steps": state["skipped_steps"],
        "train_seconds": train_seconds,
        "num_processes": accelerator.num_processes,
        "ranks": ranks,
    }
    if accelerator.is_main_process:
        (run_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    accelerator.print(
        f"step {state['step']}: validation accuracy {state['metrics']['accuracy']:.4f}, "
        f"loss {state['metrics']['loss']:.4f} ({train_seconds:.1f}s of training); model in {run_dir / 'model'}"
    )
    return {**result, "losses": step_losses}
