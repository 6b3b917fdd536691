"""Does this project's loop cost anything over hand-written PyTorch? Trains the same model on the same data with the
same seed three ways and prints the median milliseconds per optimizer step of each, and its ratio to plain PyTorch:

- plain PyTorch: the loop anyone would write (no Accelerate), with the task's loss per labelled item;
- this loop: loop.train with the preflight checks off, tracker none, default logging (its train_seconds: the steps
  and their logging, not the data loading before nor the final evaluation after);
- the transformers Trainer: same optimizer, schedule, batch size, steps, clipping and loss; no evaluation, no saving,
  report_to none (its whole train() call).

A warm-up round first, then `--repeats` rounds, each running the three back to back in a rotating order (a busy
machine slows all three alike). Exits 1 if this loop and the plain loop do not end with bit-identical weights.

python bench/parity.py [--steps 300] [--repeats 5] [--task NAME] [--compile] [OVERRIDE ...]

Overrides are train.py's (model=..., data.batch_size=..., trainer.mixed_precision=bf16, ...); the model and data
are the task's defaults unless they say otherwise. --compile adds a row: this loop with trainer.compile=true, whose
time includes compiling (in its first steps, again in each run: a longer --steps shows what compiling gains).
"""

import argparse
import contextlib
import importlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
PACKAGE = next(path.parent.name for path in (ROOT / "src").glob("*/loop.py"))
config, data, errors, launch, loop, optim = (
    importlib.import_module(f"{PACKAGE}.{name}") for name in ("config", "data", "errors", "launch", "loop", "optim")
)

# What the comparison leaves out of this loop's run: checks, trackers, evaluation and checkpoints during training.
BENCH_OVERRIDES = [
    "checks.enabled=false",
    "trainer.log_with=none",
    "trainer.eval_every_n_steps=0",
    "checkpoint.every_n_steps=0",
]


def compose_config(overrides: list):
    try:
        return config.compose_train(ROOT / "configs", [*BENCH_OVERRIDES, *overrides])
    except config.ConfigError as error:  # a task, group, key or value that is not there or not allowed
        raise config.ConfigError(f"{' '.join(overrides)}: {error}") from None


class Workload:
    """The task, its training split and the config, loaded once for the plain loop and the Trainer (this loop
    loads its own, the same way)."""

    def __init__(self, cfg):
        self.cfg, seed = cfg, cfg.trainer.seed
        self.task = config.build_task(cfg.task)
        datasets = self.task.load(cfg.data, cfg.model, seed)
        self.train_set = data.training_subset(datasets["train"], cfg.data.train_subset, seed, self.task.stratify_by)
        use_gpu = torch.cuda.is_available() and not cfg.trainer.cpu
        self.device = torch.device("cuda" if use_gpu else "cpu")

    def fresh_model(self):
        """The model, optimizer and schedule, seeded as loop.setup seeds them (right before the model is built)."""
        torch.manual_seed(self.cfg.trainer.seed)
        model = self.task.build_model(self.cfg.model).to(self.device)
        optimizer = optim.build_optimizer(self.cfg.optimizer, model)
        return model, optimizer, optim.build_scheduler(self.cfg.scheduler, optimizer, self.cfg.trainer.max_steps)


def plain_pytorch(work: Workload, folder: Path) -> tuple:
    """The plain loop: seconds of its steps, and its final weights."""
    cfg, task = work.cfg.trainer, work.task
    model, optimizer, scheduler = work.fresh_model()
    autocast = torch.autocast(work.device.type, torch.bfloat16, enabled=cfg.mixed_precision.value == "bf16")
    model.train()
    start, step, epoch = time.perf_counter(), 0, 0
    while step < cfg.max_steps:
        # Shuffled from seed + epoch: the batch order of this loop's seedable sampler (Accelerate's). The loader's
        # own generator keeps its start of epoch off the global generator, which dropout draws from.
        order = torch.randperm(len(work.train_set), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        batches = torch.utils.data.DataLoader(
            work.train_set,
            batch_size=work.cfg.data.batch_size,
            sampler=order.tolist(),
            collate_fn=task.collate,
            num_workers=work.cfg.data.num_workers,
            generator=torch.Generator(),
        )
        for batch in batches:
            batch = {name: tensor.to(work.device) for name, tensor in batch.items()}
            with autocast:
                loss = task.loss(model, batch) / task.labelled(batch)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if step % cfg.log_every_n_steps == 0:
                print(f"step {step}: loss {loss.item():.4f}")
            if step == cfg.max_steps:
                break
        epoch += 1
    return time.perf_counter() - start, {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


def this_loop(work: Workload, folder: Path, cfg=None) -> tuple:
    """loop.train of `cfg` (the workload's by default) into `folder`: seconds of its steps (train_seconds), and its
    exported weights."""
    launch.reset_accelerate_state()  # the previous run's Accelerator settings must not carry over
    result = loop.train(cfg or work.cfg, folder)
    return result["train_seconds"], load_file(folder / "model" / "model.safetensors")


def transformers_trainer(work: Workload, folder: Path) -> tuple:
    """The transformers Trainer on the same model, data, optimizer, schedule and loss: seconds of train()."""
    from transformers import Trainer, TrainingArguments

    task, cfg = work.task, work.cfg.trainer

    class TaskLossTrainer(Trainer):  # the task's loss per labelled item, as the other two take it
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return task.loss(model, inputs) / task.labelled(inputs)

    model, optimizer, scheduler = work.fresh_model()
    arguments = TrainingArguments(
        output_dir=str(folder),
        per_device_train_batch_size=work.cfg.data.batch_size,
        max_steps=cfg.max_steps,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        logging_steps=cfg.log_every_n_steps,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,  # the collator needs them all
        dataloader_num_workers=work.cfg.data.num_workers,
        use_cpu=work.device.type == "cpu",
        bf16=cfg.mixed_precision.value == "bf16",
    )
    trainer = TaskLossTrainer(
        model=model,
        args=arguments,
        train_dataset=work.train_set,
        data_collator=task.collate,
        optimizers=(optimizer, scheduler),
    )
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, None


def weight_mismatches(expected: dict, got: dict) -> list:
    """Names of the tensors of `got` that are not bit-identical to those of `expected` (or missing there)."""
    return [name for name, tensor in got.items() if name not in expected or not torch.equal(expected[name], tensor)]


def table(rows: dict, steps: int) -> str:
    """Median, min and max ms per step of each way, and its ratio to plain PyTorch: of the medians, and the min and
    max of the ratios within a round (the three of a round ran back to back)."""
    plain = rows["plain PyTorch"]
    lines = [f"{'':<24}{'median ms/step':>15}{'min':>8}{'max':>8}{'vs plain':>10}{'min':>8}{'max':>8}"]
    for name, seconds in rows.items():
        ms = [1000 * s / steps for s in seconds]
        ratios = [s / p for s, p in zip(seconds, plain, strict=True)]
        ratio = statistics.median(seconds) / statistics.median(plain)
        lines.append(
            f"{name:<24}{statistics.median(ms):>15.2f}{min(ms):>8.2f}{max(ms):>8.2f}"
            f"{ratio:>9.3f}x{min(ratios):>7.3f}x{max(ratios):>7.3f}x"
        )
    return "\n".join(lines)


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (trainer.max_steps)")
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds after the warm-up")
    parser.add_argument("--task", help="a task of this project (configs/task/); default: the project's default")
    parser.add_argument("--compile", action="store_true", help="add a row: this loop with trainer.compile=true")
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. data.batch_size=32")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: the median needs at least one measured round")
    task = [f"task={args.task}"] if args.task else []
    cfg = compose_config([*task, *args.overrides, f"trainer.max_steps={args.steps}"])
    work = Workload(cfg)
    ways = {"plain PyTorch": plain_pytorch, "this loop": this_loop, "transformers Trainer": transformers_trainer}
    if args.compile:
        compiled = compose_config([*task, *args.overrides, f"trainer.max_steps={args.steps}", "trainer.compile=true"])
        ways["this loop, compiled"] = lambda work, folder: this_loop(work, folder, compiled)
    print(
        f"parity: {type(work.task).__name__}, "
        f"model {cfg.model.name_or_path or cfg.model.model_type or cfg.model._target_}, {args.steps} steps of "
        f"batch {cfg.data.batch_size}, {args.repeats} rounds after a warm-up, {work.device.type}, "
        f"{torch.get_num_threads()} threads"
    )
    seconds = {name: [] for name in ways}
    weights = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats + 1):  # round 0 is the warm-up
            names = list(ways)[round_ % len(ways) :] + list(ways)[: round_ % len(ways)]
            for name in names:
                folder = Path(tmp) / f"{round_}-{name.replace(' ', '_').replace(',', '')}"
                with contextlib.redirect_stdout(io.StringIO()):  # their progress lines; the table is what counts
                    took, weights[name] = ways[name](work, folder)
                if round_:
                    seconds[name].append(took)
    print(table(seconds, args.steps))
    mismatched = weight_mismatches(weights["plain PyTorch"], weights["this loop"])
    if mismatched:
        print(
            f"MISMATCH: this loop's final weights differ from plain PyTorch's in {len(mismatched)} tensors, e.g. "
            f"{mismatched[:3]}"
        )
        return 1
    print(f"final weights: this loop and plain PyTorch bit-identical ({len(weights['this loop'])} tensors)")
    return 0


if __name__ == "__main__":
    with errors.reported():  # a bad option or override: one short message, no traceback
        sys.exit(main())
