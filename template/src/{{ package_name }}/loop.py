"""The training loop on Hugging Face Accelerate. Read it top to bottom: `train` is setup, preflight checks, fit
and finish. The loop knows the task contract (tasks/base.py), never a task by name."""

import functools
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import accelerate.optimizer
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.tracking import get_available_trackers
from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin, set_seed
from omegaconf import DictConfig, OmegaConf, open_dict
from safetensors.torch import load_model
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import checkpoints, launch, profiling, run_folder
from .checks import run_preflight_checks
from .config import (
    ConfigError,
    KeepPolicy,
    MetricMode,
    ModelConfig,
    NonFiniteLoss,
    Tracker,
    TrainerConfig,
    build_task,
    idle_settings,
    import_target,
    model_folder,
    override_key,
    to_container,
    user_path,
    validate,
)
from .data import DataError, described, make_dataloaders, make_eval_dataloader, training_subset
from .errors import Interrupted, ModelError, UserError, sigterm_stops_like_ctrl_c
from .metrics_log import MetricsFile, Throughput, append_start, append_stop, append_summary, readable
from .modeling import refuse_untrained, saved_labels
from .optim import build_optimizer, build_scheduler, keep_configured_settings
from .records import METRICS_FILE, task_name, to_json
from .tasks.base import Task, refuse_what_the_model_cannot_take

logger = get_logger(__name__)

# Accelerate's optimizer step asks importlib twice a step whether the lomo_optim package is installed (about 50 us
# each, over 0.5% of the demo's step on a CPU): the answer does not change while the process runs, so ask once.
accelerate.optimizer.is_lomo_available = functools.cache(accelerate.optimizer.is_lomo_available)


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or infinite."""


def installed_trackers() -> list:
    """The choices of trainer.log_with that can log here: none, and the trackers whose package is installed."""
    available = {str(tracker) for tracker in get_available_trackers()}
    return [choice for choice in Tracker if choice == Tracker.none or choice.value in available]


def make_accelerator(cfg: DictConfig, run_dir: Path) -> Accelerator:
    """The Accelerator of one run or evaluation, of its own settings: a run before it in this process (a job of
    train.py -m, a sweep's trial) left Accelerate's process-wide singletons set."""
    launch.reset_accelerate_state()
    installed = installed_trackers()
    if cfg.log_with not in installed:  # Accelerate would leave it out without a word
        raise ConfigError(
            f"trainer.log_with={cfg.log_with.value}: the {cfg.log_with.value} package is not installed here (pip "
            f"install {cfg.log_with.value}); the choices installed: {', '.join(choice.value for choice in installed)} "
            "(none: metrics.jsonl only)"
        )
    accelerator = Accelerator(
        cpu=launch.use_cpu(cfg.cpu),  # several processes on a machine without GPUs: one gloo group on the CPU
        mixed_precision=cfg.mixed_precision.value,
        dynamo_backend="no",  # trainer.compile compiles the model itself (see setup), keeping its parameter names
        # Cycles of micro-batches run on across epoch ends (see `train`), so Accelerate must not
        # force a sync at the end of each epoch.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        # metrics.jsonl always (what report.py reads), and the tracker the config names.
        log_with=[MetricsFile(run_dir / METRICS_FILE)] + ([] if cfg.log_with == Tracker.none else [cfg.log_with.value]),
        project_dir=str(run_dir),
        step_scheduler_with_optimizer=False,  # the loop steps the schedule once per optimizer step
        # A sampler seeded from the config, so a resumed run sees the same batches in the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)],
    )
    for unheeded in launch.unheeded_launch_options(cfg):
        logger.warning(f"accelerate launch asks for {unheeded}", main_process_only=True)
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


def evaluate(task: Task, model, dataloader, accelerator: Accelerator) -> tuple:
    """The task's metrics over every example of `dataloader` exactly once, across all processes, and the
    per-example records they come from (the task's `evaluate_batch`)."""
    records = []
    with evaluation_mode(model):
        for batch in dataloader:
            # gather_for_metrics drops the examples duplicated to even out the last batch across processes.
            records += accelerator.gather_for_metrics(task.evaluate_batch(model, batch), use_gather_object=True)
    metrics = task.compute_metrics(records)
    if set(metrics) != set(task.metrics):  # a missing one failed later (early stopping, keep=best), or went unseen
        raise ConfigError(
            f"{type(task).__name__}.compute_metrics returned {sorted(metrics)}, and its `metrics` declare "
            f"{sorted(task.metrics)}: return one number for each declared name"
        )
    return {**metrics, "examples": len(records)}, records


@contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode inside (no dropout: it would draw from the generator that training's dropout uses
    next), and in the mode it was in after."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def micro_batches(accelerator: Accelerator, train_dl, batches_seen: int):
    """Training batches without end, epoch after epoch, starting after `batches_seen` batches."""
    epoch, done_in_epoch = divmod(batches_seen, len(train_dl))
    while True:
        train_dl.set_epoch(epoch)  # the sampler shuffles with seed + epoch: same order after a resume
        yield from accelerator.skip_first_batches(train_dl, done_in_epoch) if done_in_epoch else train_dl
        epoch, done_in_epoch = epoch + 1, 0


def accumulate_cycle(accelerator: Accelerator, task: Task, model, cycle: list) -> tuple:
    """Forward and backward over the micro-batches of one optimizer step; return the loss sum and the
    number of labelled items of the whole cycle, summed over all processes.

    Each item weighs the same however the items fall into micro-batches and processes: the loss is
    divided by the cycle's total item count, not averaged per micro-batch (the 2024 accumulation bug,
    transformers #34191). `backward` divides by the accumulation steps and DDP averages over
    processes, so both are multiplied back.
    """
    items = sum_over_processes(accelerator, sum(task.labelled(batch) for batch in cycle))
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / items
    loss_sum = torch.zeros((), device=accelerator.device)
    for batch in cycle:
        with accelerator.accumulate(model):
            loss = task.loss(model, batch)
            accelerator.backward(loss * scale)
            loss_sum += loss.detach()
    return sum_over_processes(accelerator, loss_sum), items


def sum_over_processes(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """accelerator.reduce(tensor, "sum"), without its copy of the tensor when there is one process (every step)."""
    return tensor if accelerator.num_processes == 1 else accelerator.reduce(tensor, "sum")


@dataclass
class EarlyStopping:
    """Which metric decides (checkpoint.monitor, else the task's main one), which way is better, and when
    `patience` evaluations in a row without an improvement of more than `min_delta` stop the run (0: never).
    The best value and the count live in the trainer state, so they survive a resume."""

    metric: str
    mode: MetricMode
    patience: int
    min_delta: float

    @classmethod
    def from_config(cls, cfg: DictConfig, task: Task) -> "EarlyStopping":
        metric = cfg.checkpoint.monitor or task.main_metric
        mode = cfg.checkpoint.mode or task.metrics[metric]
        return cls(metric, mode, cfg.trainer.early_stopping_patience, cfg.trainer.early_stopping_min_delta)

    def update(self, state: dict) -> bool:
        """Record the latest evaluation in `state`; True when it is the best so far."""
        value, best, delta = state["metrics"][self.metric], state["best"], self.min_delta
        if best is None or (value < best - delta if self.mode == MetricMode.min else value > best + delta):
            state["best"], state["evals_without_improvement"] = value, 0
            return True
        state["evals_without_improvement"] += 1
        return False

    def should_stop(self, state: dict) -> bool:
        return bool(self.patience) and state["evals_without_improvement"] >= self.patience


@dataclass
class NonFiniteGuard:
    """trainer.nonfinite_loss: what a NaN or infinite training loss does. `skip` must know before each update whether
    to drop it, which costs a host-device synchronization per step (the GPU's queue runs dry while the host waits).
    `stop`, the default, keeps the losses on the device until `check`, which the loop calls before anything leaves
    the run (a log line, an evaluation, a checkpoint, the export) and which reads them in one transfer: a non-finite
    step's update has then reached only the weights in memory, which the stopped run drops."""

    trainer: TrainerConfig
    state: dict
    unchecked: list = field(default_factory=list)  # (step, its loss on the device) since the last check
    losses: list = field(default_factory=list)  # each checked step's loss, a float
    logged: int = 0  # how many of `losses` the logged means took in

    def allows_update(self, step: int, loss: torch.Tensor) -> bool:
        if self.trainer.nonfinite_loss == NonFiniteLoss.stop:
            self.unchecked.append((step, loss.detach()))
            return True
        value = loss.item()
        self.losses.append(value)
        if math.isfinite(value):
            self.state["last_finite_loss"] = value
            return True
        if self.state["skipped_steps"] >= self.trainer.max_nonfinite_skips:
            skipped = self.state["skipped_steps"]
            why = f"{skipped} updates were skipped already, all that trainer.max_nonfinite_skips allows"
            raise self.error(step, value, why, ", or raise trainer.max_nonfinite_skips")
        self.state["skipped_steps"] += 1
        logger.warning(f"step {step}: loss is {value}; update skipped ({self.state['skipped_steps']} so far)")
        return False

    def check(self) -> float | None:
        """Raise NonFiniteLossError for the first non-finite loss not checked yet; return the latest loss."""
        if self.unchecked:
            steps, values = zip(*self.unchecked)
            self.unchecked.clear()
            for step, value in zip(steps, torch.stack(values).tolist()):
                if not math.isfinite(value):
                    advice = "; or set trainer.nonfinite_loss=skip to drop such updates and go on"
                    raise self.error(step, value, "trainer.nonfinite_loss=stop", advice)
                self.state["last_finite_loss"] = value
                self.losses.append(value)
        return self.losses[-1] if self.losses else None

    def check_all(self, accelerator: Accelerator, model: torch.nn.Module) -> None:
        """check(), and that no weight is NaN or infinite: an update can overflow the weights though the loss before
        it was finite (a run's last update, say), and what leaves the run next (an evaluation, a checkpoint, the
        export) would be broken. One synchronization for all the weights, over every process (each may hold a shard)."""
        self.check()
        shards = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]  # FSDP2: this process's
        finite = torch.stack([torch.isfinite(shard).all() for shard in shards])
        broken = int(sum_over_processes(accelerator, finite.logical_not().sum().to(accelerator.device)))
        if broken:
            raise self.stopped(f"{broken} weight tensors hold NaN or inf after step {self.state['step']}")

    def mean_since_last_log(self) -> float:
        """The mean loss of the steps checked since the last call, skipped ones left out: what train/loss logs, as the
        transformers Trainer logs it (one step's loss alone is a noisier curve)."""
        finite = [loss for loss in self.losses[self.logged :] if math.isfinite(loss)]
        self.logged = len(self.losses)
        return sum(finite) / len(finite) if finite else math.nan

    def last_update_skipped(self) -> bool:
        """trainer.nonfinite_loss=skip: was the latest step's loss non-finite? Its model may be one that diverged (an
        update made the weights huge but finite), which a checkpoint must not keep in place of the ones before."""
        return bool(self.losses) and not math.isfinite(self.losses[-1])

    def check_evaluation(self, metrics: dict) -> None:
        """A validation loss of NaN or inf: the weights are finite but give outputs that are not (an update made them
        huge), and nothing of this model may leave the run."""
        if not math.isfinite(metrics.get("loss", 0.0)):
            raise self.stopped(f"the validation loss after step {self.state['step']} is {metrics['loss']}")

    def error(self, step: int, value: float, why: str, advice: str) -> NonFiniteLossError:
        return self.stopped(f"step {step}: the training loss is {value}", why, advice)

    def stopped(self, what: str, why: str = "", advice: str = "") -> NonFiniteLossError:
        return NonFiniteLossError(
            f"{what}; the last finite training loss was {self.state['last_finite_loss']}. Stopped"
            f"{f' ({why})' if why else ''}: nothing was exported, and the checkpoints written so far are untouched. "
            f"To go on: lower optimizer.lr or set trainer.max_grad_norm{advice}."
        )


@dataclass
class Clock:
    """The seconds a run has cost: those of the runs it resumes (`before`, as its checkpoint holds them) and this
    process's, since it `started` and since its training did. A resumed run's metrics.json once counted only the
    last process's part (report.py's "train s", rank_check's compute)."""

    before: dict
    started: float
    training: float | None = None

    def seconds(self) -> dict:
        now = time.perf_counter()
        training = 0.0 if self.training is None else now - self.training
        return {
            "train_seconds": self.before.get("train_seconds", 0.0) + training,
            "run_seconds": self.before.get("run_seconds", 0.0) + now - self.started,
        }


@dataclass
class Run:
    """One training run: its config and folder, the prepared objects, and the state its checkpoints hold."""

    cfg: DictConfig
    run_dir: Path
    accelerator: Accelerator
    task: Task
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_dl: object
    eval_dl: object
    stopping: EarlyStopping
    state: dict
    resumed_from: Path | None
    ranks: list  # every process's rank, gathered: [0, ..., N-1] when the launch trains as one group
    # Called with (step, metrics) after each evaluation during training; what it raises ends the run (a sweep's
    # pruner stops a losing trial so).
    on_evaluation: Callable[[int, dict], None] | None = None
    evaluated_step: int | None = None  # the step that state["metrics"] was measured at, in this process
    # cfg.trainer as a plain dataclass, for the code that runs every step: reading a key of a DictConfig costs tens
    # of microseconds, a few percent of a tiny model's step when the loop reads a handful of them.
    trainer: TrainerConfig = field(init=False)
    guard: NonFiniteGuard = field(init=False)
    clock: Clock = field(init=False)

    def __post_init__(self):
        self.trainer = OmegaConf.to_object(self.cfg.trainer)
        self.guard = NonFiniteGuard(self.trainer, self.state)
        self.clock = Clock(dict(self.state), time.perf_counter())


def new_state(seed: int, train_data: dict) -> dict:
    return {
        "train_data": train_data,  # what the run trains on (run_folder.check_same_data compares it on resume)
        "step": 0,  # optimizer steps taken
        "batches_seen": 0,  # micro-batches consumed on each process
        "seed": seed,
        "metrics": {},  # of the latest evaluation
        "best": None,  # best value of the monitored metric so far
        "evals_without_improvement": 0,
        "stopped_early": False,
        "skipped_steps": 0,  # updates dropped for a non-finite loss (trainer.nonfinite_loss=skip)
        "last_finite_loss": None,
        # Seconds up to the latest checkpoint, of every process run of it (a resume adds its own): see Clock.
        "train_seconds": 0.0,
        "run_seconds": 0.0,
    }


def setup(cfg: DictConfig, run_dir: Path) -> Run:
    """Build everything the run needs, in an order that makes it reproducible; resume if asked to."""
    validate(cfg)
    run_folder.refuse_reuse(run_dir, cfg.resume)  # train.py's Hydra callback checked already; loop.train callers not
    trainer = cfg.trainer
    if trainer.deterministic:  # needed by deterministic cuBLAS; must be set before CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    accelerator = make_accelerator(trainer, run_dir)
    for idle in idle_settings(cfg):
        logger.warning(idle, main_process_only=True)
    ranks = launch.gathered_ranks(accelerator)  # fails at once if the launched processes did not form one group
    resume_from, accepted = checkpoints.resolve_resume(cfg.resume, run_dir / "checkpoints"), []
    if resume_from is not None:  # before anything is built: a changed model fails here, not in load_state
        accepted = run_folder.check_resume(resume_from, cfg, accelerator.num_processes)
        if accepted:
            logger.warning(f"resuming with changes that resume_allow accepts: {'; '.join(accepted)}")
    seed = trainer.seed
    set_seed(seed, deterministic=trainer.deterministic)

    # Data, then the model (seeded right before it is built, so its random init is reproducible).
    task = build_task(cfg.task)
    with accelerator.main_process_first():  # the main process fills the datasets cache first
        datasets = task.load(cfg.data, cfg.model, seed)
    if resume_from is not None:  # before the model: another number of classes would not load as its state
        run_folder.check_same_labels(resume_from, checkpoints.read_record(resume_from).get("labels"), task.labels)
    datasets["train"] = training_subset(datasets["train"], cfg.data.train_subset, seed, task.stratify_by)
    logger.info(described(datasets, task.labels), main_process_only=True)
    train_dl, eval_dl = make_dataloaders(datasets, cfg.data, task.collate, seed)
    set_seed(seed, deterministic=trainer.deterministic)
    model = task.build_model(cfg.model)
    refuse_what_the_model_cannot_take(task, model, datasets, cfg.model)
    optimizer = build_optimizer(cfg.optimizer, model)
    scheduler = build_scheduler(cfg.scheduler, optimizer, trainer.max_steps)
    model, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, eval_dl, scheduler)
    if trainer.compile:
        # In place (nn.Module.compile), not Accelerator(dynamo_backend=...): that wraps the model, which prefixes every
        # parameter name with "_orig_mod.", so its checkpoints would not load into an uncompiled model (evaluate.py,
        # a resume without compile). Here names, checkpoints and the export are the same as without compile.
        model.compile()

    train_data = {"examples": len(datasets["train"]), "fingerprint": datasets["train"]._fingerprint}
    state = new_state(seed, train_data)
    if resume_from is not None:
        configured = optimizer.state_dict()  # the config's settings, which the checkpoint's replace as it loads
        with checkpoints.fitting(resume_from, accepted):  # verified by resolve_resume: no second hashing
            state = checkpoints.load(accelerator, resume_from, verified=True)
        keep_configured_settings(optimizer, scheduler, configured)
        run_folder.check_same_data(resume_from, state.get("train_data"), train_data, cfg.resume_allow)
        logger.info(f"resumed from {resume_from} at step {state['step']}", main_process_only=True)
    stopping = EarlyStopping.from_config(cfg, task)
    objects = (model, optimizer, scheduler, train_dl, eval_dl)
    return Run(cfg, run_dir, accelerator, task, *objects, stopping, state, resume_from, ranks)


def train_step(run: Run, cycle: list) -> None:
    """One optimizer step over a cycle of micro-batches; its update is applied unless run.guard drops it."""
    loss_sum, items = accumulate_cycle(run.accelerator, run.task, run.model, cycle)
    if not run.accelerator.sync_gradients:  # the optimizer would silently skip this step
        raise RuntimeError("accumulation cycle out of step with Accelerate's gradient synchronization")
    run.state["batches_seen"] += len(cycle)
    run.state["step"] += 1
    if run.guard.allows_update(run.state["step"], loss_sum / items):  # the mean over every item of the cycle
        if run.trainer.max_grad_norm > 0:
            run.accelerator.clip_grad_norm_(run.model.parameters(), run.trainer.max_grad_norm)
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad()


def evaluate_and_decide(run: Run) -> None:
    """Evaluate, log, keep the best model, and decide on early stopping together with every process."""
    accelerator, state, step = run.accelerator, run.state, run.state["step"]
    state["metrics"], _ = evaluate(run.task, run.model, run.eval_dl, accelerator)
    run.evaluated_step = step
    log_evaluation(run)
    run.guard.check_evaluation(state["metrics"])
    if run.on_evaluation is not None:
        run.on_evaluation(step, state["metrics"])
    if accelerator.is_main_process:
        with evaluation_mode(run.model):  # greedy samples of the model as evaluated, not with dropout on
            samples = run.task.samples(accelerator.unwrap_model(run.model), run.eval_dl.dataset)
        if samples:
            accelerator.log({f"samples/{k}": v for k, v in samples.items()}, step=step)
    if run.stopping.update(state) and run.cfg.checkpoint.keep != KeepPolicy.latest:
        export(run, "best_model")
    if run.stopping.should_stop(state):
        accelerator.set_trigger()
    # Every process takes the same decision (a rank that stopped alone would hang the others).
    if accelerator.check_trigger():
        state["stopped_early"] = True
        logger.info(
            f"early stopping at step {step}: {run.stopping.metric} has not improved on {state['best']} by more "
            f"than {run.stopping.min_delta} for {run.stopping.patience} evaluations",
            main_process_only=True,
        )


def save_checkpoint(run: Run) -> None:
    """A checkpoint of this step, and the keep policy's pruning of the older ones."""
    step, checkpoint_dir = run.state["step"], run.run_dir / "checkpoints"
    if run.guard.last_update_skipped():
        logger.warning(f"step {step}: no checkpoint, as its loss was not finite", main_process_only=True)
        return
    run.state.update(run.clock.seconds())
    path = checkpoints.save(run.accelerator, checkpoint_dir, run.state, to_container(run.cfg), run.task.labels)
    logger.info(f"checkpoint saved: {path}", main_process_only=True)  # the run's (the preflight check's says nothing)
    if run.accelerator.is_main_process:
        checkpoints.prune(checkpoint_dir, run.cfg.checkpoint, run.stopping.metric, run.stopping.mode)


def fit(run: Run) -> list:
    """Train until trainer.max_steps or early stopping; return the loss of every optimizer step taken."""
    cfg, accelerator, state, trainer, guard = run.cfg, run.accelerator, run.state, run.trainer, run.guard
    checkpoint_every = cfg.checkpoint.every_n_steps
    accelerator.init_trackers(trainer.tracker_project, config=flat_hparams(cfg))
    if accelerator.is_main_process:
        judged_by = run.stopping.metric, run.stopping.mode.value
        append_start(run.run_dir / METRICS_FILE, state["step"], *judged_by, to_container(cfg))
    run.model.train()
    # One optimizer step per cycle of `gradient_accumulation_steps` micro-batches. Cycles run on across
    # epoch ends, as Accelerate's own accumulation counter does (so its sync decisions match ours).
    stream = micro_batches(accelerator, run.train_dl, state["batches_seen"])
    throughput = Throughput(accelerator, run.task)
    # Log lines (an evaluation, a checkpoint) print above the bar, not after it on its line; the bar is closed
    # however the loop ends, before the profiler reports, so that what comes next (its report, a message that stops
    # the run: Ctrl-C, a non-finite loss) starts on a line of its own.
    bar = tqdm(total=trainer.max_steps, initial=state["step"], disable=not accelerator.is_local_main_process)
    profiled = profiling.profiled(accelerator, trainer, run.run_dir, state["step"])
    with logging_redirect_tqdm(), profiled as profiler, bar as progress:
        first_step = state["step"]
        while state["step"] < trainer.max_steps and not state["stopped_early"]:
            cycle = throughput.next_cycle(stream, trainer.gradient_accumulation_steps)
            try:
                train_step(run, cycle)
            except Exception as error:  # at the first step: a model that cannot run on the task's batches
                if state["step"] > first_step or isinstance(error, UserError):
                    raise
                where = "the first training batch (checks.enabled=true tries the model before training)"
                raise ModelError.of(error, where) from error
            throughput.step_done()
            profiler.step()
            step = state["step"]
            progress.update(1)
            # The guard reads the losses (and stops a non-finite run) before anything of the run is logged or saved.
            if step % trainer.log_every_n_steps == 0 or step == trainer.max_steps:  # a short run's too
                guard.check()
                loss, perf = guard.mean_since_last_log(), throughput.measure()
                accelerator.log({"train/loss": loss, "train/lr": run.scheduler.get_last_lr()[0], **perf}, step=step)
                progress.set_postfix(loss=f"{loss:.4f}", examples_per_s=f"{perf.get('perf/examples_per_s', 0):.0f}")
            if trainer.eval_every_n_steps and step % trainer.eval_every_n_steps == 0:
                guard.check_all(accelerator, run.model)
                evaluate_and_decide(run)
            if checkpoint_every and step % checkpoint_every == 0:
                guard.check_all(accelerator, run.model)
                save_checkpoint(run)
    guard.check_all(accelerator, run.model)  # before finish evaluates and exports
    return guard.losses


def export(run: Run, name: str) -> None:
    """The model as a from_pretrained folder `name` in the run folder, with the labels and the config it was trained
    with (evaluate.py reads them)."""
    checkpoints.export(
        run.accelerator, run.model, run.task.processor, run.run_dir / name, run.task.labels, to_container(run.cfg)
    )


def log_evaluation(run: Run) -> None:
    """The latest evaluation's metrics to the tracker and to the log (train.log holds every evaluation)."""
    step, metrics = run.state["step"], run.state["metrics"]
    run.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    logger.info(f"step {step}: validation {readable(metrics)}", main_process_only=True)


def end(run: Run) -> None:
    """Close the trackers (metrics.jsonl keeps every line logged) and free the model and the accelerator's memory."""
    # Free the DDP-wrapped model before end_training destroys the process group. Otherwise its reducer holds the
    # group's last reference and destroys it when train() returns, joining gloo's threads while holding the GIL
    # they may need: a hang at exit, seen about once in ten 2-process CPU runs.
    run.accelerator.free_memory()
    run.model = None
    run.accelerator.end_training()


def finish(run: Run) -> dict:
    """Evaluate the final model, export it, end the trackers and write metrics.json."""
    accelerator, state = run.accelerator, run.state
    # A run that ends on an evaluation step (the default runs, early stopping) has just evaluated this very model.
    if run.evaluated_step != state["step"]:
        state["metrics"], _ = evaluate(run.task, run.model, run.eval_dl, accelerator)
        log_evaluation(run)
        run.guard.check_evaluation(state["metrics"])
    export(run, "model")
    end(run)
    result = {
        "step": state["step"],
        "metrics": state["metrics"],
        "monitor": run.stopping.metric,
        "mode": run.stopping.mode.value,  # which way the monitored metric is better
        "stopped_early": state["stopped_early"],
        "skipped_steps": state["skipped_steps"],
        # Training, and the whole run: data, model, checks, training, final evaluation and export (what a run costs;
        # rank_check.py compares budgets by it); a resumed run's include those of the runs it resumes.
        **run.clock.seconds(),
        "num_processes": accelerator.num_processes,
        "ranks": run.ranks,
    }
    if accelerator.is_main_process:
        (run.run_dir / "metrics.json").write_text(to_json(result, indent=2))
        append_summary(run.run_dir / METRICS_FILE, result)
    shown = readable(state["metrics"])
    accelerator.print(
        f"step {state['step']}: validation {shown} ({result['train_seconds']:.1f}s of training); model in "
        f"{run.run_dir / 'model'}"
    )
    return result


def interrupted(run: Run, error: KeyboardInterrupt) -> Interrupted:
    """Ctrl-C or SIGTERM: the step the run stopped at, and the checkpoint that `resume=latest` would continue from."""
    saved = checkpoints.list_complete(run.run_dir / "checkpoints")
    resume = (
        f"`resume=latest hydra.run.dir={run.run_dir}` would continue from {saved[-1]}"
        if saved
        else "no checkpoint yet, so a rerun starts over (checkpoint.every_n_steps=N saves one every N steps)"
    )
    return Interrupted.of(error, f" at step {run.state['step']} of {run.cfg.trainer.max_steps}; {resume}")


@sigterm_stops_like_ctrl_c()  # a cluster's time limit or preemption: where the run stopped, as for Ctrl-C
def train(cfg: DictConfig, run_dir: Path, on_evaluation: Callable[[int, dict], None] | None = None) -> dict:
    """Train as the config says, writing checkpoints, logs and the exported model under `run_dir`. `on_evaluation`
    is called with (step, metrics) after each evaluation during training; an exception it raises ends the run
    cleanly (trackers closed, memory freed) and reaches the caller."""
    started = time.perf_counter()
    with run_folder.restored_if_refused(Path(run_dir)):  # a resume refused in setup leaves .hydra/ as it was
        run = setup(cfg, Path(run_dir))
    run.on_evaluation, run.clock.started = on_evaluation, started
    try:
        if run.resumed_from is None:  # a fresh run: sanity checks before the first step, leaving the run as it was
            run_preflight_checks(run, lambda model, batches: evaluate(run.task, model, batches, run.accelerator)[0])
        run.clock.training = time.perf_counter()
        losses = fit(run)
        return {**finish(run), "losses": losses}
    except BaseException as error:
        if run.model is not None:  # not ended yet: the caller may start another run in this process (a sweep)
            end(run)
        if run.accelerator.is_main_process and (run.run_dir / METRICS_FILE).exists():  # report.py shows what ended it
            append_stop(run.run_dir / METRICS_FILE, run.state["step"], error)
        if isinstance(error, KeyboardInterrupt):
            raise interrupted(run, error) from None
        raise


# The run's settings, beside task.* and model.config.*, that evaluate.py takes from a saved run unless its command
# line sets them.
RUN_SETTINGS = ("trainer.seed", "data.eval_fraction", "trainer.mixed_precision")


def take_run_settings(cfg: DictConfig, saved: dict | None, command_line: list) -> bool:
    """evaluate.py: the settings of the run that saved the model (`saved`, its config; None from older code) replace
    the command's, but for those its command line sets: the task (task.max_length, ...), the seed and fraction that
    drew a held-out validation split, the mixed precision it computed in, and the model config (a checkpoint's whole
    model; your own module's model.config, which no weight records). A transformers export keeps its architecture in
    its config.json. `command_line`: the overrides of the evaluate.py command."""
    if saved is None:
        return False
    saved, command = OmegaConf.create(saved), cfg.copy()
    given = [override_key(override) for override in command_line]
    with open_dict(cfg):  # replaced, not merged: nothing of the default task or model stays
        cfg.task = saved.task
        cfg.trainer.seed, cfg.data.eval_fraction = saved.trainer.seed, saved.data.eval_fraction
        # The precision it computed in (bf16 changes the last digits of every metric); fp16 needs a GPU here too.
        if saved.trainer.mixed_precision != "fp16" or torch.cuda.is_available():
            cfg.trainer.mixed_precision = saved.trainer.mixed_precision
        if cfg.checkpoint_path is not None:
            cfg.model = OmegaConf.merge(OmegaConf.structured(ModelConfig), saved.model)
        elif saved.model._target_ is not None:  # your own module's export: its class and arguments
            cfg.model._target_, cfg.model.model_type, cfg.model.config = saved.model._target_, None, saved.model.config
        for key in given:
            if key.startswith(("task.", "model.config.")) or key in RUN_SETTINGS:
                OmegaConf.update(cfg, key, OmegaConf.select(command, key), force_add=True)
    return True


def evaluate_saved(cfg: DictConfig, run_dir: Path, command_line: list = ()) -> dict:
    """evaluate.py: the metrics and per-example predictions of a saved model on the split `cfg.split`, written into
    `run_dir` as metrics.json and predictions.jsonl. A checkpoint (`cfg.checkpoint_path`) or a train.py export brings
    the settings of its run (take_run_settings), but for those that `command_line` sets; a checkpoint's weights
    replace the model's."""
    checkpoint = None if cfg.checkpoint_path is None else user_path(cfg.checkpoint_path)
    command_task = cfg.task._target_  # the task whose data config this command composed
    if checkpoint is not None:
        if not checkpoint.is_dir():
            raise ConfigError(f"checkpoint_path={cfg.checkpoint_path}: no such folder")
        record = checkpoints.verify(checkpoint)
        run_settings = take_run_settings(cfg, record["config"], command_line)
    else:
        folder = None if cfg.model.name_or_path is None else model_folder(cfg.model.name_or_path)
        run_settings = take_run_settings(cfg, checkpoints.exported_config(folder), command_line)
    validate(cfg)
    accelerator = make_accelerator(cfg.trainer, run_dir)
    if run_settings:
        source = checkpoint or cfg.model.name_or_path
        logger.info(f"task and model settings: those of the run of {source}", main_process_only=True)
    set_seed(cfg.trainer.seed, deterministic=cfg.trainer.deterministic)
    data = cfg.data
    if data.files and cfg.split in data.files and data.train_split not in data.files:
        with open_dict(cfg):  # a file to score alone: loading, which wants a training split, reads it as both
            data.train_split = data.eval_split = cfg.split
    task = build_task(cfg.task)
    # A classifier reads the data's labels by the names its model was trained for: a file may hold some of them.
    trained_for = task.labels = saved_labels(cfg.model.name_or_path) if checkpoint is None else record.get("labels")
    with accelerator.main_process_first():
        try:
            datasets = task.load(cfg.data, cfg.model, cfg.trainer.seed)
        except DataError as error:
            # Data of a built-in dataset of the command's own task (its default data, most likely) for a checkpoint of
            # another task: name the override that fixes it. Files or a hub dataset are the data meant.
            builtin = import_target("task._target_", command_task).builtin_datasets
            if cfg.task._target_ == command_task or cfg.data.name not in builtin:
                raise
            raise DataError(
                f"{error}\n(checkpoint_path holds a run of task={task_name(cfg.task._target_)}, and the data of this "
                f"command is task={task_name(command_task)}'s: add task={task_name(cfg.task._target_)} for the data of "
                "its task)"
            ) from None
    if trained_for is not None and task.labels != trained_for:  # a task whose `load` made its own from the data
        changes = run_folder.label_changes(trained_for, task.labels)
        raise DataError(
            f"the data's classes are not those the model was trained for ({changes}): each output would be scored "
            "as another class; evaluate on data of its classes"
        )
    # Loaded, data.train_split and data.eval_split are called train and validation (split=test may name either).
    split = {data.train_split: "train", data.eval_split: "validation"}.get(cfg.split, cfg.split)
    if split not in datasets:
        raise ConfigError(f"split={cfg.split} is not a split of this dataset; it has {list(datasets)}")
    model = task.build_model(cfg.model)
    refuse_what_the_model_cannot_take(task, model, {split: datasets[split]}, cfg.model)
    if checkpoint is None:
        refuse_untrained(model, cfg.model.name_or_path)  # the saved weights, not a head rebuilt anew
    else:
        # load_model, not load_state_dict: the checkpoint holds one of each group of tied weights (an embedding
        # shared with the output layer, say), and load_model knows the others are the same tensor.
        with checkpoints.fitting(checkpoint):
            load_model(model, checkpoint / "model.safetensors")
    model, dataloader = accelerator.prepare(model, make_eval_dataloader(datasets[split], cfg.data, task.collate))
    try:
        metrics, records = evaluate(task, model, dataloader, accelerator)
    except UserError:
        raise
    except Exception as error:  # a task.* setting that the model does not fit (another image size, say)
        raise ModelError.of(error, f"a batch of split {cfg.split}") from error
    source = str(checkpoint or cfg.model.name_or_path or cfg.model._target_ or cfg.model.model_type)
    result = {"split": cfg.split, "model": source, "metrics": metrics, "num_processes": accelerator.num_processes}
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(to_json(result, indent=2))
        with (run_dir / "predictions.jsonl").open("w") as file:
            file.writelines(to_json(record) + "\n" for record in records)
    accelerator.print(f"{cfg.split} ({metrics['examples']} examples): {readable(metrics)}; predictions in {run_dir}")
    del model  # before the process group goes, as in end(): else a 2-process evaluation can hang at exit
    accelerator.free_memory()
    accelerator.end_training()
    return {**result, "records": records}
