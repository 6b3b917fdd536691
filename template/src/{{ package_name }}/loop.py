"""The training loop on Hugging Face Accelerate. Read it top to bottom: `train` is the whole run."""

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from omegaconf import DictConfig
from tqdm.auto import tqdm

from . import checkpoints
from .checks import run_preflight_checks
from .config import Tracker, to_container, validate
from .data import load_splits, make_dataloaders, tokenize
from .model import build_model, build_tokenizer
from .optim import build_optimizer, build_scheduler

logger = get_logger(__name__)


def make_accelerator(cfg: DictConfig, run_dir: Path) -> Accelerator:
    return Accelerator(
        cpu=cfg.cpu,
        mixed_precision=cfg.mixed_precision.value,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.log_with == Tracker.none else cfg.log_with.value,
        project_dir=str(run_dir),
        # A sampler seeded from the config, so a resumed run sees the same batches in the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


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
    """Mean loss and accuracy over every validation example exactly once, across all processes."""
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
    return {"loss": total_loss / count, "accuracy": correct / count}


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train as the config says, writing checkpoints, logs and the exported model under `run_dir`."""
    validate(cfg)
    run_dir = Path(run_dir)
    checkpoint_dir = run_dir / "checkpoints"
    accelerator = make_accelerator(cfg.trainer, run_dir)
    seed = cfg.trainer.seed
    set_seed(seed, deterministic=cfg.trainer.deterministic)

    # Data, then the model (seeded right before it is built, so its random init is reproducible).
    tokenizer = build_tokenizer(cfg.model)
    with accelerator.main_process_first():  # the main process fills the datasets cache first
        splits = load_splits(cfg.data, seed)
        tokenized = tokenize(splits, cfg.data, tokenizer)
    train_dl, eval_dl = make_dataloaders(tokenized, cfg.data, tokenizer, seed)
    set_seed(seed, deterministic=cfg.trainer.deterministic)
    labels = splits["train"].features[cfg.data.label_column].names
    model = build_model(cfg.model, labels, tokenizer, cfg.data.max_length)
    optimizer = build_optimizer(cfg.optimizer, model)
    scheduler = build_scheduler(cfg.scheduler, optimizer, cfg.trainer.max_steps)
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    # Not prepared: we step it once per optimizer step ourselves; registered so checkpoints hold it.
    accelerator.register_for_checkpointing(scheduler)

    state = {"step": 0, "batches_seen": 0, "seed": seed, "metrics": {}}
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

    accelerator.init_trackers(cfg.trainer.tracker_project, config=flat_hparams(cfg))
    progress = tqdm(total=cfg.trainer.max_steps, initial=state["step"], disable=not accelerator.is_local_main_process)
    step_losses, cycle_losses = [], []
    start = time.perf_counter()
    model.train()
    while state["step"] < cfg.trainer.max_steps:
        epoch, done_in_epoch = divmod(state["batches_seen"], len(train_dl))
        train_dl.set_epoch(epoch)  # reshuffles with the seed + epoch: same order after a resume
        batches = accelerator.skip_first_batches(train_dl, done_in_epoch) if done_in_epoch else train_dl
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.trainer.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.trainer.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            state["batches_seen"] += 1
            cycle_losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue  # mid accumulation cycle: no optimizer step was taken

            # One optimizer step is done.
            scheduler.step()
            state["step"] += 1
            step = state["step"]
            step_losses.append(torch.stack(cycle_losses).mean().item())
            cycle_losses = []
            progress.update(1)
            if step % cfg.trainer.log_every_n_steps == 0:
                accelerator.log({"train/loss": step_losses[-1], "train/lr": scheduler.get_last_lr()[0]}, step=step)
                progress.set_postfix(loss=f"{step_losses[-1]:.4f}")
            if cfg.trainer.eval_every_n_steps and step % cfg.trainer.eval_every_n_steps == 0:
                state["metrics"] = evaluate(model, eval_dl, accelerator)
                accelerator.log({f"eval/{k}": v for k, v in state["metrics"].items()}, step=step)
            if cfg.checkpoint.every_n_steps and step % cfg.checkpoint.every_n_steps == 0:
                checkpoints.save(accelerator, checkpoint_dir, state)
                if accelerator.is_main_process:
                    checkpoints.prune(checkpoint_dir, cfg.checkpoint)
            if step >= cfg.trainer.max_steps:
                break
    progress.close()
    train_seconds = time.perf_counter() - start

    state["metrics"] = evaluate(model, eval_dl, accelerator)
    accelerator.log({f"eval/{k}": v for k, v in state["metrics"].items()}, step=state["step"])
    checkpoints.export(accelerator, model, tokenizer, run_dir / "model")
    accelerator.end_training()
    result = {"step": state["step"], "metrics": state["metrics"], "train_seconds": train_seconds}
    if accelerator.is_main_process:
        (run_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    accelerator.print(
        f"step {state['step']}: validation accuracy {state['metrics']['accuracy']:.4f}, "
        f"loss {state['metrics']['loss']:.4f} ({train_seconds:.1f}s of training); model in {run_dir / 'model'}"
    )
    return {**result, "losses": step_losses}
