"""A run folder belongs to one run. A run that would start from scratch in a folder that holds another run's outputs is
refused (it would mix its checkpoints with the old ones, and prune the wrong ones); so is a second run started into a
folder while a run is using it (a lock); and a resume whose config changes what the checkpoint's run was trained on,
or whose training data is not the data it trained on (loop.setup checks that, once the data is loaded).

All of this happens in a Hydra callback, before Hydra writes the new run's .hydra/*.yaml and log over the old ones: a
refused run changes nothing on disk. `loop.setup` repeats the checks for code that calls `loop.train` directly.
"""

import fcntl
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict

from . import checkpoints, launch
from .config import ConfigError, to_container, user_path
from .errors import UserError, process_rank, warn
from .records import task_name

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"  # locked by the main process while a run uses the folder; it holds that run's pid and host
OUTPUTS = ("model", "best_model", "metrics.json")  # what a run leaves besides checkpoints

# Config keys (or whole groups) that a resumed run may change: they steer what happens from now on without making the
# run a different one. Every other key must match the checkpoint's run. Among the refused: the data and its order
# (data.*, trainer.seed, data.batch_size, trainer.gradient_accumulation_steps and the number of processes all decide
# which examples come next), the model and the task, optimizer.* and scheduler.* (the checkpoint's optimizer and
# schedule states replace them on load, so a change would be silently ignored), checkpoint.monitor and .mode (the
# best value so far is of the old metric) and trainer.mixed_precision.
RESUME_SAFE = (
    "resume",
    "resume_allow",
    "trainer.max_steps",  # unless the schedule decays over it (see resume_problems)
    "trainer.eval_every_n_steps",
    "trainer.log_every_n_steps",
    "trainer.max_grad_norm",
    "trainer.nonfinite_loss",
    "trainer.max_nonfinite_skips",
    "trainer.early_stopping_patience",
    "trainer.early_stopping_min_delta",
    "trainer.log_with",
    "trainer.tracker_project",
    "trainer.deterministic",
    "trainer.cpu",
    "trainer.profile",
    "trainer.compile",  # compiled in place: the checkpoint's parameter names are the same
    "trainer.profile_wait",
    "trainer.profile_steps",
    "checkpoint.every_n_steps",
    "checkpoint.keep",
    "checkpoint.keep_count",
    "checks",  # they run on fresh runs only
    "data.eval_batch_size",
    "data.num_workers",
)
DECAYING_SCHEDULES = ("linear", "cosine")  # their learning rate at a step depends on trainer.max_steps


# Run folder -> its .hydra/*.yaml as they were before Hydra wrote this run's over them (ClaimRunFolder, on a resume).
PREVIOUS_CONFIG: dict = {}


class RunFolderError(ConfigError):
    """A run folder that another run holds or uses, or a resume that would not continue the checkpoint's run."""


def _matches(key: str, patterns) -> bool:
    return any(key == pattern or key.startswith(pattern + ".") for pattern in patterns)


def _flat(node: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):  # an empty one adds no key: {} and no value at all are the same
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def resume_problems(saved: dict, new: dict, allowed=()) -> list:
    """The changes from the checkpoint's config `saved` to `new` that break the resume, as "key: old -> new".
    Both are plain configs (config.to_container) plus their "num_processes"; `allowed` accepts keys or groups."""
    old_values, new_values = _flat(saved), _flat(new)
    problems = []
    for key in sorted(old_values.keys() | new_values.keys()):
        old, value = old_values.get(key, "(unset)"), new_values.get(key, "(unset)")
        if old == value or _matches(key, allowed):
            continue
        safe = _matches(key, RESUME_SAFE)
        if key == "trainer.max_steps" and new_values.get("scheduler.name") in DECAYING_SCHEDULES:
            safe = False  # the schedule would jump to where a run of the new length would be
        if not safe:
            problems.append(f"{key}: {old} -> {value}")
    return problems


def check_resume(checkpoint: Path, cfg: DictConfig, num_processes: int) -> list:
    """Refuse to resume from `checkpoint` with a config that changes what its run trains on; return the changes that
    `resume_allow` accepts (the caller logs them)."""
    record = checkpoints.read_record(checkpoint)
    step = record["trainer"]["step"]
    if cfg.trainer.max_steps < step:
        raise RunFolderError(
            f"resume={cfg.resume}: trainer.max_steps={cfg.trainer.max_steps} is below the step of {checkpoint}, "
            f"{step}: there is nothing left to train. Raise trainer.max_steps to go on, or evaluate the checkpoint: "
            f"python evaluate.py checkpoint_path={checkpoint}"
        )
    if record.get("config") is None:  # saved by code that did not record the config
        return []
    saved = {**record["config"], "num_processes": record.get("num_processes", num_processes)}
    if saved["task"]["_target_"] != cfg.task._target_:  # every key would differ: the one that matters, alone
        saved_task = task_name(saved["task"]["_target_"])
        raise RunFolderError(
            f"resume={cfg.resume}: {checkpoint} is a checkpoint of task={saved_task}, and this run is "
            f"task={task_name(cfg.task._target_)}: resume it with task={saved_task} (and its run's other settings), "
            "or start a new run (resume=null, in a new hydra.run.dir)"
        )
    new = {**to_container(cfg), "num_processes": num_processes}
    refused = resume_problems(saved, new, cfg.resume_allow)
    if refused:
        keys = ",".join(problem.split(":")[0] for problem in refused)
        raise RunFolderError(
            f"resume={cfg.resume}: these keys differ from the run of {checkpoint}, and a resumed run must keep them "
            "(they decide its data order, its model, or its optimizer state, which the checkpoint replaces):\n  "
            + "\n  ".join(refused)
            + "\nResume with the checkpoint's values; or start a new run (resume=null, in a new hydra.run.dir); "
            f"or accept the change on purpose: resume_allow=[{keys}]"
        )
    return resume_problems(saved, new)


def check_same_data(checkpoint: Path, saved: dict | None, now: dict, allowed) -> None:
    """Refuse a resume whose training split has another number of examples than the checkpoint's run had (a data file
    edited since, say): its sampler position would point elsewhere. Other content (datasets' fingerprint of the
    split, which also changes with how it is processed) gets a warning. resume_allow=[data] accepts either."""
    if saved is None or saved == now or any(_matches(key, ["data"]) for key in allowed):
        return  # (a checkpoint of older code records no training data)
    if saved["examples"] == now["examples"]:
        warn(
            logger,
            f"the training split differs from that of the run of {checkpoint} (the same number of examples, other "
            "content or processing): the resumed run does not repeat that run; resume_allow=[data] accepts it",
        )
        return
    raise RunFolderError(
        f"resume={checkpoint}: the training split is not the one its run trained on ({saved['examples']} examples "
        f"then, {now['examples']} now): a data file changed since, or how it is read. Resume with that data; or start "
        "a new run (resume=null, in a new hydra.run.dir); or accept the change on purpose: resume_allow=[data]"
    )


def label_changes(saved: list, now: list) -> str:
    """How the classes `now` differ from those a model was trained for, `saved` (both in id order)."""
    changes = [f"{old} -> {new}" for old, new in zip(saved, now) if old != new][:5]
    count = f"{len(saved)} classes then, {len(now)} now; " if len(saved) != len(now) else ""
    return f"{count}by position: {', '.join(changes) or 'the same first ones'}"


def check_same_labels(checkpoint: Path, saved: list | None, now: list | None) -> None:
    """Refuse a resume whose classes are not the checkpoint's (a label renamed, added or dropped in the data): each
    output of the trained head would mean another class than it learnt."""
    if saved is not None and now is not None and saved != now:
        raise RunFolderError(
            f"resume={checkpoint}: the data's classes are not those its run trained on ({label_changes(saved, now)}), "
            "and each output of the model would mean another class. Resume with that data, or start a new run "
            "(resume=null, in a new hydra.run.dir)"
        )


def _resumed_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint a run with `resume` would start from, read without verifying its files (loop.setup does)."""
    if resume is None:
        return None
    if resume != "latest":
        return user_path(resume)
    found = checkpoints.list_complete(run_dir / "checkpoints")
    return found[-1] if found else None


def _readable(checkpoint: Path | None) -> bool:
    if checkpoint is None:
        return False
    try:
        checkpoints.read_record(checkpoint)
        return True
    except (OSError, ValueError):
        return False


def refuse_reuse(run_dir: Path, resume: str | None) -> None:
    """Refuse a run that would not continue the run whose outputs `run_dir` holds (the folder of each run is its own:
    a fresh run there would prune the old run's checkpoints or its own, and a later resume=latest could load either).
    """
    found = [path.name for path in checkpoints.list_complete(run_dir / "checkpoints")]
    found = [f"checkpoints/{name}" for name in found[-1:]] + [name for name in OUTPUTS if (run_dir / name).exists()]
    resumed = _resumed_checkpoint(resume, run_dir)
    continues = resumed is not None and resumed.resolve().parent == (run_dir / "checkpoints").resolve()
    if found and not continues:
        start = "starts from scratch" if resumed is None else f"resumes from another folder's checkpoint ({resumed})"
        go_on = "continue that one with resume=latest, or"
        if resume == "latest":  # given already: that run saved no checkpoint (checkpoint.every_n_steps above its end)
            start, go_on = "has no checkpoint of it to continue from", "start from its model (model.name_or_path), or"
        raise RunFolderError(
            f"hydra.run.dir={run_dir} holds another run ({', '.join(found)}), and this run {start}. "
            f"A run folder holds one run: {go_on} choose another hydra.run.dir (or leave it unset: every run gets a "
            "new folder)"
        )


@contextmanager
def restored_if_refused(run_dir: Path) -> Iterator[None]:
    """A resume refused once its checkpoint and data are loaded (loop.setup: other classes, other data, a state that
    does not fit), or a job of `train.py -m` refused its folder, leaves the run's .hydra files as they were, not as
    the refused command's."""
    try:
        yield
    except UserError:
        for name, content in PREVIOUS_CONFIG.get(run_dir.resolve(), {}).items():
            (run_dir / ".hydra" / name).write_bytes(content)
        raise


@contextmanager
def removed_if_refused(run_dir: Path) -> Iterator[None]:
    """evaluate.py: a command refused once Hydra made its folder (a split the data lacks, a checkpoint cut short) leaves
    no folder behind, as a refusal before Hydra writes leaves none; a folder with anything but Hydra's files, the log
    and the lock in it stays as it is."""
    try:
        yield
    except UserError:
        hydra_only = run_dir.is_dir() and all(
            path.name in (".hydra", LOCK_FILE) or path.suffix == ".log" for path in run_dir.iterdir()
        )
        if hydra_only and process_rank() == 0:
            shutil.rmtree(run_dir)
        raise


def acquire(run_dir: Path):
    """Lock the run folder for as long as the returned file stays open, or refuse naming the run that holds it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = (run_dir / LOCK_FILE).open("a+")
    except OSError as error:  # a file of that name, a folder this user may not write, a read-only disk, ...
        problem = "a file of that name is there" if run_dir.is_file() else error.strerror
        raise RunFolderError(f"hydra.run.dir={run_dir} cannot be a run folder ({problem}); choose another") from None
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "unknown"
        file.close()
        raise RunFolderError(
            f"hydra.run.dir={run_dir} is in use by another run (pid and host: {holder}); a run folder holds one run: "
            "wait for that run to end, or choose another hydra.run.dir"
        ) from None
    return file


def sign(lock) -> None:
    """Write this run's pid and host into the lock file it holds, for a run refused by the lock to name."""
    lock.truncate(0)
    lock.write(f"{os.getpid()} {socket.gethostname()}\n")
    lock.flush()


class ClaimRunFolder(Callback):
    """Hydra callback: refuse a run that would reuse or share another run's folder, before Hydra writes into it, and
    hold the folder's lock on the main process until the run ends."""

    def __init__(self) -> None:
        self.lock = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(os.path.abspath(config.hydra.run.dir))
        task_config = config.copy()
        with open_dict(task_config):
            del task_config["hydra"]
        main = process_rank() == 0
        try:
            if main and (run_dir / LOCK_FILE).exists():  # a folder in use is refused as such (a new folder gets no
                self.lock = acquire(run_dir)  # lock file before the checks pass: a refused run leaves no folder)
            refuse_reuse(run_dir, task_config.resume)
            resumed = _resumed_checkpoint(task_config.resume, run_dir)
            if resumed is not None and task_config.resume != "latest":  # (latest skips a bad one, as loop.setup does)
                checkpoints.verify(resumed)  # refused before Hydra writes this run's .hydra/ files over the old ones
            if _readable(resumed):  # else loop.setup verifies it and says what is wrong with it
                check_resume(resumed, task_config, launch.world_size())
            if main:
                self.lock = self.lock or acquire(run_dir)
                sign(self.lock)
                if resumed is not None:
                    saved = {path.name: path.read_bytes() for path in (run_dir / ".hydra").glob("*.yaml")}
                    PREVIOUS_CONFIG[run_dir.resolve()] = saved
        except UserError as error:
            self.on_run_end(config)
            # Hydra turns other exceptions in callbacks into warnings. The main process says why; the others, which
            # check the same, exit without repeating it.
            raise SystemExit(f"Error: {error}" if main else 1) from None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A job of `train.py -m` is claimed in loop.setup, after Hydra wrote its .hydra files over those of the run
        that its folder may hold: keep every job folder's, for a refused job to put back (restored_if_refused)."""
        for hydra_dir in Path(os.path.abspath(config.hydra.sweep.dir)).glob("**/.hydra"):
            PREVIOUS_CONFIG[hydra_dir.parent.resolve()] = {
                path.name: path.read_bytes() for path in hydra_dir.glob("*.yaml")
            }

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None
