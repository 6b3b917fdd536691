"""Mistakes a user makes, one row each: the command, its exit code, a line of the message it must print, and what
must still be on disk afterwards. An expected failure is one short block (what was wrong, what is allowed, which key
to change), never a traceback, and a failed command changes no file that was there before it."""

import hashlib
import os
import runpy
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, run_script

TOY = "<toy>"  # in a row's args: the default task's toy overrides go here


@dataclass
class Mistake:
    name: str
    args: list  # Hydra overrides; "{tmp}" is the row's own folder, TOY the toy run's overrides
    message: str  # a fragment the output must contain
    code: int = 1  # the exit status
    script: str = "train.py"
    # Writes what the row needs into its folder before the command (a run to resume, a broken file, ...).
    prepare: Callable | None = None
    subprocess: bool = False  # a real process: for what only one shows (a launcher, signals, a second import)
    on_disk: list = field(default_factory=list)  # paths under {tmp} that must exist afterwards


def train_first(*args: str) -> Callable:
    """A `prepare` that trains the toy run into {tmp}/run first (plus `args`), as the mistake's run folder."""

    def prepare(tmp: Path, toy: list, pkg, make_config) -> None:
        pkg.loop.train(make_config(*toy, *[a.format(tmp=tmp) for a in args]), tmp / "run")

    return prepare


def train_script_first(*args: str) -> Callable:
    """A `prepare` that runs train.py on the toy run into {tmp}/run first (plus `args`): the mistake's run folder,
    with what Hydra writes too (.hydra/config.yaml, train.log)."""

    def prepare(tmp: Path, toy: list, pkg, make_config) -> None:
        command = ["train.py", *toy, *[a.format(tmp=tmp) for a in args], f"hydra.run.dir={tmp / 'run'}"]
        argv, sys.argv = sys.argv, command
        try:
            runpy.run_path(str(PROJECT_ROOT / "train.py"), run_name="__main__")
        finally:
            sys.argv = argv

    return prepare


CHECKPOINTED = ["trainer.max_steps=4", "checkpoint.every_n_steps=2"]  # a run folder with checkpoints to resume
NONFINITE = ["optimizer.lr=1e30", "trainer.max_grad_norm=0", "checks.overfit_batch=false"]  # NaN from step 2 on

MISTAKES = [
    # Config: typos and values that compose but make no sense, refused before any compute and any run folder.
    Mistake("unknown key", ["trainer.max_step=10"], "Could not override 'trainer.max_step'"),
    Mistake("out of range", [TOY, "optimizer.lr=-1"], "optimizer.lr=-1.0 is out of range: it must be > 0"),
    Mistake("enum typo", [TOY, "trainer.mixed_precision=bf61"], "Invalid value 'bf61'"),
    Mistake(
        "monitor contradicts mode",
        [TOY, "checkpoint.monitor=loss", "checkpoint.mode=max"],
        "checkpoint.mode=max contradicts checkpoint.monitor=loss",
    ),
    # Run folders, resume and non-finite losses
    Mistake(
        "fresh run into a run's folder",
        [TOY, *CHECKPOINTED],
        "holds another run (checkpoints/step_00000004, model, metrics.json), and this run starts from scratch",
        prepare=train_script_first(*CHECKPOINTED),
        on_disk=["run/.hydra/config.yaml", "run/checkpoints/step_00000004"],
    ),
    Mistake(
        "resume=latest where there is no checkpoint",  # a finished run without checkpoints: it would start over
        [TOY, "resume=latest"],
        "holds another run (model, metrics.json), and this run starts from scratch",
        prepare=train_script_first(),
    ),
    Mistake(
        "resume with another batch size",
        [TOY, "trainer.max_steps=6", "resume=latest", "data.batch_size=4"],
        "data.batch_size: 8 -> 4",
        prepare=train_script_first(*CHECKPOINTED),
    ),
    Mistake(
        "resume with another model",
        [TOY, "trainer.max_steps=6", "resume=latest", "model.name_or_path=null"],  # a new model from scratch
        "/model -> None\n",
        prepare=train_script_first(*CHECKPOINTED),
    ),
    Mistake(
        "resume with a change accepted on purpose",
        [TOY, "trainer.max_steps=6", "resume=latest", "data.batch_size=4", "resume_allow=[data.batch_size]"],
        "resuming with changes that resume_allow accepts: data.batch_size: 8 -> 4",
        code=0,
        prepare=train_script_first(*CHECKPOINTED),
    ),
    Mistake(
        "evaluate into a training run's folder",  # it would overwrite the run's metrics.json
        [TOY, "model.name_or_path={tmp}/run/model"],
        "holds another run (model, metrics.json)",
        script="evaluate.py",
        prepare=train_script_first(),
    ),
    Mistake(
        "skipping non-finite losses at nearly every step",
        [TOY, *NONFINITE, "trainer.max_steps=10", "trainer.nonfinite_loss=skip", "trainer.max_nonfinite_skips=3"],
        "3 updates were skipped already, all that trainer.max_nonfinite_skips allows",
    ),
]


def files_and_digests(folder: Path) -> dict:
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.rglob("*") if path.is_file()}


def run_in_process(script: str, args: list, capsys) -> tuple:
    """Run a project script as `python script args` would, in this process (imports are paid once): exit status
    and output."""
    argv, sys.argv = sys.argv, [script, *args]
    try:
        runpy.run_path(str(PROJECT_ROOT / script), run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)  # what the interpreter prints for sys.exit("message")
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("mistake", MISTAKES, ids=lambda mistake: mistake.name)
def test_mistake_gets_one_clear_message_and_loses_nothing(mistake, toy_overrides, pkg, make_config, tmp_path, capsys):
    if mistake.prepare is not None:
        mistake.prepare(tmp_path, toy_overrides, pkg, make_config)
    before = files_and_digests(tmp_path)
    args = []
    for arg in mistake.args:
        args += toy_overrides if arg == TOY else [arg.format(tmp=tmp_path)]
    args.append(f"hydra.run.dir={tmp_path / 'run'}")  # a run folder of the row's own, also for in-process runs
    if mistake.subprocess:
        result = run_script(mistake.script, *args)
        code, output = result.returncode, result.stdout + result.stderr
    else:
        capsys.readouterr()  # drop what `prepare` printed
        code, output = run_in_process(mistake.script, args, capsys)

    assert code == mistake.code, output
    assert mistake.message in output, output
    assert "Traceback" not in output, output
    for path in mistake.on_disk:
        assert (tmp_path / path.format(tmp=tmp_path)).exists(), path
    if code != 0:  # a failure loses nothing: every file is still there, byte for byte
        after = files_and_digests(tmp_path)
        assert {path: after.get(path) for path in before} == before


def test_a_run_folder_in_use_refuses_a_second_run(pkg, toy_overrides, make_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train_script_first("trainer.max_steps=2")(tmp_path, toy_overrides, pkg, make_config)  # signs run.lock: our pid
    before = files_and_digests(run_dir)
    # The lock is per open file: taken again here, it stands for that run still going on, as in another process.
    lock = pkg.run_folder.acquire(run_dir)
    try:
        code, output = run_in_process("train.py", [*toy_overrides, "resume=latest", f"hydra.run.dir={run_dir}"], capsys)
    finally:
        lock.close()
    assert code == 1 and f"is in use by another run (pid and host: {os.getpid()} " in output, output
    assert "Traceback" not in output
    assert files_and_digests(run_dir) == before  # no new file (.hydra/ stays the first run's), none changed
