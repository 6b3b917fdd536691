"""sweep.py: an Optuna study over `loop.train`. Each trial is a run folder (trial_NNN) inside the sweep's folder; it
reports the monitored metric at each evaluation, and the pruner stops the clearly losing ones.

The study lives in a storage (study.db in the sweep's folder unless sweep.storage names another): run sweep.py again
on the same folder and it goes on where it stopped; start it on several machines or processes with the same folder
(or the same storage URL) and they share the trials.
"""

import logging
import math
import os
import time
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import optuna
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError

from . import launch
from .checks import PreflightError
from .config import (
    ConfigError,
    ParamType,
    PrunerName,
    SamplerName,
    SearchDimension,
    SweepConfig,
    TrainConfig,
    build_task,
    override_key,
    range_problems,
    to_container,
    unknown_key,
    validate,
)
from .errors import OutOfMemory, UserError, reported
from .loop import EarlyStopping, NonFiniteLossError, train
from .metrics_log import append_stop
from .optim import unread_settings
from .records import METRICS_FILE
from .runs import flatten

logger = logging.getLogger(__name__)

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
# Training keys that a resumed sweep, or a joining worker, may set otherwise: they change how a trial is logged or
# checked, not what it learns (any other change makes its trials incomparable with the study's).
JOIN_SAFE = (
    "resume_allow",
    "trainer.log_with",
    "trainer.tracker_project",
    "trainer.log_every_n_steps",
    "trainer.cpu",
    "data.num_workers",
    "data.eval_batch_size",
    "checks",
)


def search_space(params: DictConfig, prefix: str = "") -> dict:
    """{config key: SearchDimension} from sweep.params, whose keys nest (optimizer: {lr: ...}) or are dotted."""
    space = {}
    for key, value in params.items():
        path = f"{prefix}{key}"
        if not isinstance(value, DictConfig):
            raise ConfigError(
                f"sweep.params.{path}={value}: expected a search dimension such as "
                "{type: float, low: 1e-4, high: 1e-2, log: true} or {type: categorical, choices: [16, 32]}"
            )
        if not isinstance(value.get("type"), str):  # a config group: the dimensions are below
            space.update(search_space(value, path + "."))
            continue
        try:
            dimension = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SearchDimension), value))
        except OmegaConfBaseException as error:
            raise ConfigError(f"sweep.params.{path}: {str(error).splitlines()[0]}") from None
        space[path] = dimension
    return space


def dimension_problems(key: str, dimension: SearchDimension, sampler: SamplerName) -> list:
    where = f"sweep.params.{key}"
    if dimension.type == ParamType.categorical:
        return [] if dimension.choices else [f"{where}: type categorical needs a non-empty list of choices"]
    if dimension.low is None or dimension.high is None or not dimension.low <= dimension.high:
        return [f"{where}: type {dimension.type.value} needs low <= high (it has {dimension.low} and {dimension.high})"]
    if dimension.log and dimension.low <= 0:
        return [f"{where}: log: true needs low > 0"]
    bounds = {"low": dimension.low, "high": dimension.high, "step": dimension.step}
    if dimension.type == ParamType.int and any(value is not None and value != int(value) for value in bounds.values()):
        given = ", ".join(f"{name}={value}" for name, value in bounds.items() if value is not None)
        return [f"{where}: type int needs whole numbers ({given}); type float for fractions"]
    try:  # what Optuna refuses of a range (a step with log: true, a step <= 0) is known before any trial runs
        if dimension.type == ParamType.int:
            step = 1 if dimension.step is None else int(dimension.step)
            optuna.distributions.IntDistribution(int(dimension.low), int(dimension.high), log=dimension.log, step=step)
        else:
            optuna.distributions.FloatDistribution(
                dimension.low, dimension.high, log=dimension.log, step=dimension.step
            )
    except ValueError as error:
        return [f"{where}: {error}"]
    if sampler == SamplerName.grid and dimension.step is None:
        return [f"{where}: sampler=grid needs a step for a {dimension.type.value} range, or type categorical"]
    return []


def grid_values(dimension: SearchDimension) -> list:
    if dimension.type == ParamType.categorical:
        return list(dimension.choices)
    # The points low, low + step, ... up to high and no further (Optuna's own ranges end there too); a step that
    # divides the range up to rounding (0.1 / 0.02) reaches high itself.
    count = math.floor((dimension.high - dimension.low) / dimension.step + 1e-9) + 1
    values = [dimension.low + i * dimension.step for i in range(count)]
    return [int(value) for value in values] if dimension.type == ParamType.int else values


def suggest(trial: optuna.Trial, key: str, dimension: SearchDimension) -> Any:
    if dimension.type == ParamType.categorical:
        return trial.suggest_categorical(key, list(dimension.choices))
    if dimension.type == ParamType.int:
        low, high, step = int(dimension.low), int(dimension.high), int(dimension.step or 1)
        return trial.suggest_int(key, low, high, step=step, log=dimension.log)
    return trial.suggest_float(key, dimension.low, dimension.high, step=dimension.step, log=dimension.log)


def training_config(cfg: DictConfig) -> DictConfig:
    """The training part of sweep.py's config (everything but `sweep`), typed as train.py's."""
    names = [f.name for f in fields(TrainConfig)]
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.masked_copy(cfg, names))


def trial_config(base: DictConfig, values: dict) -> DictConfig:
    """The base training config with a trial's values, validated like any run's config."""
    cfg = base.copy()
    for key, value in values.items():
        if isinstance(OmegaConf.select(cfg, key), DictConfig):
            raise ConfigError(
                f"sweep.params.{key} names a config group, whose options are files: a sweep tries values of keys "
                f"(sweep.params.{key}.<key>); compare the group's options with rank_check.py --hypothesis "
                f'"{key}=<option>" --hypothesis ...'
            )
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as error:
            raise ConfigError(f"sweep.params.{key}: {str(error).splitlines()[0]}") from None
    validate(cfg)
    return cfg


def saved_config(sweep: DictConfig, sweep_dir: Path) -> dict | None:
    """The training config that the study's first worker recorded, if the study exists."""
    if sweep.storage is None and not (sweep_dir / "study.db").is_file():
        return None
    try:
        study = optuna.load_study(study_name=sweep.study_name, storage=connect(storage_url(sweep, sweep_dir)))
        return study.user_attrs["config"]
    except KeyError:  # no such study yet, or one that another program created
        return None


def check_joined(cfg: DictConfig, sweep_dir: Path, saved: dict, space: dict) -> None:
    """A sweep that resumes, or a worker that joins, trains its trials as the study's earlier ones were trained:
    refuse other training values (the search space, the sampler, the pruner and n_trials may change)."""
    old, new = flatten(saved), flatten(to_container(training_config(cfg)))
    allowed = [*space, *JOIN_SAFE, *cfg.resume_allow]
    changed = [
        f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not any(key == a or key.startswith(a + ".") for a in allowed)
    ]
    if changed:
        raise ConfigError(
            f"the study {cfg.sweep.study_name} in {storage_url(cfg.sweep, sweep_dir)} trained its trials with other "
            "values, and its trials would not compare:\n  " + "\n  ".join(changed) + "\nRun it with the study's "
            "values; or start a new sweep (another hydra.run.dir, or sweep.study_name); or accept the change on "
            f"purpose: resume_allow=[{','.join(change.split(':')[0] for change in changed)}]"
        )


def check_new_study(sweep: DictConfig, sweep_dir: Path) -> None:
    """A new study numbers its trials from 0: refuse a folder that holds the trial folders of another study (a
    study.db deleted, or another sweep.study_name), whose configs it would overwrite and whose metrics report.py would
    then show under the new trials' values."""
    taken = sorted(folder.name for folder in sweep_dir.glob("trial_*") if folder.is_dir())
    if not taken:
        return
    url = storage_url(sweep, sweep_dir)
    others = optuna.get_all_study_names(connect(url)) if sweep.storage or (sweep_dir / "study.db").is_file() else []
    go_on = f"; to go on with the study there: sweep.study_name={' or '.join(others)}" if others else ""
    raise ConfigError(
        f"hydra.run.dir={sweep_dir} holds the trials of another study ({', '.join(taken[:3])}"
        f"{', ...' if len(taken) > 3 else ''}), and the new study {sweep.study_name} would number its own trials from "
        f"0 in the same folders: start it in another hydra.run.dir{go_on}"
    )


def warn_of_searched_and_set(space: dict) -> None:
    """Searched keys that the command line also sets: each trial replaces the value given."""
    for override in HydraConfig.get().overrides.task if HydraConfig.initialized() else []:
        if (key := override_key(override)) in space:
            logger.warning(
                f"{override} is not what the trials train with: sweep.params.{key} searches {key}, and each trial "
                f"takes its value from the search (~sweep.params.{key} searches it no more)"
            )


def unread_searched(cfg: DictConfig, space: dict) -> list:
    """Searched optimizer settings that the chosen optimizer does not read: a dimension that changes nothing."""
    if "optimizer.name" in space:
        return []
    unread = [f"optimizer.{key}" for key in unread_settings(cfg.optimizer.name)]
    return [
        f"sweep.params.{key}: optimizer.name={cfg.optimizer.name.value} does not read {key}, so its trials would "
        f"differ in nothing: search another key, or choose the optimizer that reads it (optimizer=<name>)"
        for key in space
        if key in unread
    ]


def never_pruned(cfg: DictConfig) -> list:
    """A pruner compares trials at their evaluations before the end: refuse a config that has none."""
    sweep, trainer = cfg.sweep, cfg.trainer
    if sweep.pruner == PrunerName.none:
        return []
    if not trainer.eval_every_n_steps or trainer.eval_every_n_steps >= trainer.max_steps:
        return [
            f"sweep.pruner={sweep.pruner.value} needs evaluations during training to compare trials, and "
            f"trainer.eval_every_n_steps={trainer.eval_every_n_steps} with trainer.max_steps={trainer.max_steps} "
            "evaluates only at the end: set trainer.eval_every_n_steps below trainer.max_steps, or sweep.pruner=none"
        ]
    halving = (PrunerName.successive_halving, PrunerName.hyperband)
    if sweep.pruner in halving and sweep.min_resource is not None and sweep.min_resource >= trainer.max_steps:
        return [
            f"sweep.pruner={sweep.pruner.value} first compares trials after sweep.min_resource={sweep.min_resource} "
            f"steps, and they end at trainer.max_steps={trainer.max_steps}: lower sweep.min_resource"
        ]
    return []


def check(cfg: DictConfig, sweep_dir: Path) -> dict:
    """Refuse a sweep config that could not run (before any folder or trial exists), or that would join a study of
    other training values; return its search space."""
    sweep = cfg.sweep
    problems = range_problems(SweepConfig, sweep, "sweep.")
    space = search_space(sweep.params)
    if not space:
        problems.append("sweep.params is empty: name the config keys to search, as configs/sweep/default.yaml does")
    for key, dimension in space.items():
        misspelt = unknown_key(TrainConfig, key, shown_as="sweep.params.")  # a key of train.py's config?
        problems += [misspelt] if misspelt else dimension_problems(key, dimension, sweep.sampler)
    problems += never_pruned(cfg) + unread_searched(cfg, space)
    if launch.world_size() > 1:
        problems.append(
            "sweep.py runs each trial in one process: start it with python, not accelerate launch or torchrun "
            "(several workers: start several sweep.py on the same folder)"
        )
    if problems:
        raise ConfigError("invalid sweep:\n  " + "\n  ".join(problems))
    base = training_config(cfg)
    for key, dimension in space.items():  # every end of every range, and every choice, must make a valid run
        ends = dimension.choices if dimension.type == ParamType.categorical else [dimension.low, dimension.high]
        for value in map(int, ends) if dimension.type == ParamType.int else ends:
            trial_config(base, {key: value})
    saved = saved_config(sweep, sweep_dir)
    if saved is None:
        check_new_study(sweep, sweep_dir)
    else:
        check_joined(cfg, sweep_dir, saved, space)
    return space


class CheckSweep(Callback):
    """Hydra callback: refuse a sweep that could not run before Hydra creates its folder. (No lock on the folder:
    the workers of a sweep share it; each trial has its own.)"""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns exceptions in callbacks into warnings; `reported` exits (SystemExit), which really stops it.
        with reported():
            check(config, Path(os.path.abspath(config.hydra.run.dir)))


def make_sampler(sweep: DictConfig, space: dict) -> optuna.samplers.BaseSampler:
    if sweep.sampler == SamplerName.grid:
        return optuna.samplers.GridSampler({key: grid_values(dim) for key, dim in space.items()}, seed=sweep.seed)
    if sweep.sampler == SamplerName.random:
        return optuna.samplers.RandomSampler(seed=sweep.seed)
    return optuna.samplers.TPESampler(seed=sweep.seed, n_startup_trials=sweep.n_startup_trials)


def make_pruner(sweep: DictConfig, trainer: DictConfig) -> optuna.pruners.BasePruner:
    """The pruner, counting resources in optimizer steps (the steps at which trials report)."""
    min_steps, factor = sweep.min_resource or trainer.eval_every_n_steps, sweep.reduction_factor
    if sweep.pruner == PrunerName.median:
        return optuna.pruners.MedianPruner(n_startup_trials=sweep.n_startup_trials, n_warmup_steps=sweep.n_warmup_steps)
    if sweep.pruner == PrunerName.successive_halving:
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_steps, reduction_factor=factor)
    if sweep.pruner == PrunerName.hyperband:
        return optuna.pruners.HyperbandPruner(min_steps, max_resource=trainer.max_steps, reduction_factor=factor)
    return optuna.pruners.NopPruner()


def storage_url(sweep: DictConfig, sweep_dir: Path) -> str:
    return sweep.storage or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"


def connect(url: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """The study's storage. A trial whose process died (no heartbeat for two minutes) is marked failed and run again
    with the same values. Workers started together race to create the tables of a new database (one of them fails on
    a unique constraint): the loser tries again and finds them made."""
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental; they have been in Optuna since 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=60,
                    grace_period=120,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
                )
        except (ArgumentError, ImportError) as error:  # a URL that is not one, or a database without its driver here
            raise ConfigError(f"sweep.storage={url}: {str(error).splitlines()[0]}") from None
        except SQLAlchemyError as error:
            if attempt == attempts - 1 or not isinstance(error, IntegrityError | OperationalError):  # not the race
                raise ConfigError(
                    f"the sweep's study in {url} cannot be opened: {str(error).splitlines()[0]} (is it an Optuna "
                    "study's database? choose another hydra.run.dir or sweep.storage)"
                ) from error
            time.sleep(0.5 * (attempt + 1))


def open_study(cfg: DictConfig, sweep_dir: Path, base: DictConfig, space: dict, direction: str) -> optuna.Study:
    """Create the study, or join it if it exists (a resumed sweep, or another worker)."""
    study = optuna.create_study(
        storage=connect(storage_url(cfg.sweep, sweep_dir)),
        study_name=cfg.sweep.study_name,
        direction="minimize" if direction == "min" else "maximize",
        sampler=make_sampler(cfg.sweep, space),
        pruner=make_pruner(cfg.sweep, cfg.trainer),
        load_if_exists=True,
    )
    if "config" not in study.user_attrs:  # what the workers that join later must train with (check_joined)
        study.set_user_attr("config", to_container(base))
    return study


def trial_folder(number: int) -> str:
    """The name of a trial's run folder in the sweep's folder: trial_000, trial_001, ..."""
    return f"trial_{number:03d}"


def write_trial_config(trial_dir: Path, cfg: DictConfig, values: dict) -> None:
    """The trial's config and overrides where train.py's Hydra writes them, so report.py reads a trial as a run."""
    hydra_dir = trial_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(to_container(cfg)))
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump([f"{key}={value}" for key, value in values.items()]))


def described(values: dict) -> str:
    """A trial's values as overrides, floats to 4 significant digits (its .hydra/overrides.yaml has them whole)."""
    shown = {key: f"{value:.4g}" if isinstance(value, float) else value for key, value in values.items()}
    return " ".join(f"{key}={value}" for key, value in shown.items())


class Objective:
    """One trial: sample the values, train in the trial's own folder, report each evaluation, return the metric."""

    def __init__(self, base: DictConfig, space: dict, sweep_dir: Path, monitor: str):
        self.base, self.space, self.sweep_dir, self.monitor = base, space, sweep_dir, monitor
        self.same_failures = []  # the reasons of the trials that failed in a row with the same config error

    def __call__(self, trial: optuna.Trial) -> float:
        values = {key: suggest(trial, key, dimension) for key, dimension in self.space.items()}
        trial_dir = self.sweep_dir / trial_folder(trial.number)
        if trial_dir.exists():  # check_new_study refused this before; another program started a study here since
            raise ConfigError(f"{trial_dir} holds another study's trial: start this sweep in another hydra.run.dir")
        logger.info(f"trial {trial.number}: {described(values)} in {trial_dir}")

        def report(step: int, metrics: dict) -> None:
            trial.report(metrics[self.monitor], step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{self.monitor} {metrics[self.monitor]:.4g} at step {step}")

        try:
            cfg = trial_config(self.base, values)  # a value inside a range may make no run (hidden size 63 of 4 heads)
            write_trial_config(trial_dir, cfg, values)
            result = train(cfg, trial_dir, on_evaluation=report)
        except (UserError, MemoryError, RuntimeError) as error:
            # A trial whose values make no valid run, that diverges, fails a preflight check (too low a learning rate
            # to overfit a batch, say) or runs out of memory (a batch size too large) fails and the sweep goes on:
            # its reason in one line, where Optuna would log a traceback; also in the study and the trial's folder.
            ran_out = OutOfMemory.within(error)
            if ran_out is None and not isinstance(error, UserError):
                raise
            reason = " ".join(line.strip() for line in str(ran_out or error).splitlines())  # "invalid config: ..."
            self.refuse_repeated(error, reason)
            logger.warning(f"trial {trial.number} failed: {reason}")
            trial.set_user_attr("failed", reason)
            if (trial_dir / ".hydra").is_dir() and not (trial_dir / METRICS_FILE).exists():  # train.py wrote none
                append_stop(trial_dir / METRICS_FILE, 0, ran_out or error)
            return float("nan")  # Optuna's mark of a failed trial
        finally:
            launch.reset_accelerate_state()
        self.same_failures = []
        return result["metrics"][self.monitor]

    def refuse_repeated(self, error: BaseException, reason: str, limit: int = 3) -> None:
        """Stop the sweep when `limit` trials in a row fail with the same config or data error: one that the searched
        values do not cause (a data file that is not there), which would fail every trial."""
        if isinstance(error, NonFiniteLossError | PreflightError) or not isinstance(error, UserError):
            self.same_failures = []
            return
        self.same_failures = [*self.same_failures[-(limit - 1) :], reason]
        if len(self.same_failures) == limit and len(set(self.same_failures)) == 1:
            raise type(error)(f"{limit} trials in a row failed the same way, whatever their values: {error}") from None


def summary(study: optuna.Study, monitor: str) -> str:
    """The study's trials, one line each (a pruned trial: its last reported value), and the best one."""
    lines = [f"{'trial':>5}  {'state':8}  {monitor:>10}  {'last report':>11}  values"]
    for trial in study.trials:
        step = max(trial.intermediate_values, default=None)
        value = trial.value if trial.value is not None else trial.intermediate_values.get(step)
        shown = "-" if value is None else f"{value:.4g}"
        failed = f"  (failed: {trial.user_attrs['failed']})" if "failed" in trial.user_attrs else ""
        state = trial.state.name
        lines.append(f"{trial.number:>5}  {state:8}  {shown:>10}  {step or '-':>11}  {described(trial.params)}{failed}")
    if any(trial.state == optuna.trial.TrialState.COMPLETE for trial in study.trials):
        best = study.best_trial
        exact = " ".join(f"{key}={value!r}" for key, value in best.params.items())  # to copy, not rounded
        whole = f"{trial_folder(best.number)}/.hydra/config.yaml"
        lines.append(f"best: trial {best.number}, {monitor} {best.value:.4g}: {exact} (its whole config: {whole})")
    return "\n".join(lines)


def run_sweep(cfg: DictConfig, sweep_dir: Path) -> optuna.Study:
    """Run trials until the study holds sweep.n_trials finished ones (all workers together), then print them."""
    space = check(cfg, sweep_dir)
    warn_of_searched_and_set(space)
    base = training_config(cfg)
    stopping = EarlyStopping.from_config(base, build_task(base.task))  # the monitored metric, and which way is better
    # One line per trial from this module instead, also for a failed one (Optuna would add "The value nan is not
    # acceptable" or a traceback).
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = open_study(cfg, sweep_dir, base, space, stopping.mode.value)
    remaining = cfg.sweep.n_trials - len(study.get_trials(deepcopy=False, states=FINISHED))
    print(f"study {study.study_name} in {storage_url(cfg.sweep, sweep_dir)}: {len(study.trials)} trials so far")
    if remaining > 0:
        study.optimize(
            Objective(base, space, sweep_dir, stopping.metric),
            n_trials=remaining,
            # Other workers finish trials too: stop when the study as a whole has enough.
            callbacks=[optuna.study.MaxTrialsCallback(cfg.sweep.n_trials, states=FINISHED)],
            gc_after_trial=True,
        )
    print(summary(study, stopping.metric))
    print(f"compare the trials: python report.py {sweep_dir}")
    return study
