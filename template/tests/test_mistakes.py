"""Mistakes a user makes, one row each: the command, its exit code, a line of the message it must print, and what
must still be on disk afterwards. An expected failure is one short block (what was wrong, what is allowed, which key
to change), never a traceback, and a failed command changes no file that was there before it."""

import hashlib
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
