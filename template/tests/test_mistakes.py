"""Mistakes a user makes, one row each: the command, its exit code, a line of the message it must print, and what
must still be on disk afterwards. An expected failure is one short block (what was wrong, what is allowed, which key
to change), never a traceback, and a failed command changes no file that was there before it."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, TASKS, run_in_process, run_script

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
    task: str | None = None  # the task whose toy TOY stands for (skipped where the project lacks it); None: default
    launcher: list = field(default_factory=list)  # runs `<launcher> script args` (a subprocess), e.g. accelerate
    interrupt_after: str | None = None  # Ctrl-C (SIGINT) once the output shows this line (a subprocess)


def train_script_first(*args: str) -> Callable:
    """A `prepare` that runs train.py on the toy run into {tmp}/run first (plus `args`): the mistake's run folder,
    with what Hydra writes too (.hydra/config.yaml, train.log)."""

    def prepare(tmp: Path, toy: list, pkg, make_config) -> None:
        code, output = run_in_process(
            "train.py", [*toy, *[a.format(tmp=tmp) for a in args], f"hydra.run.dir={tmp / 'run'}"]
        )
        assert code == 0, output

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


def write(files: dict) -> Callable:
    """A `prepare` that writes these files (name -> text) into the row's folder."""

    def prepare(tmp: Path, toy: list, pkg, make_config) -> None:
        for name, text in files.items():
            (tmp / name).write_text(text)

    return prepare


def copy_toy_model(keep: tuple = ("config.json", "model.safetensors"), truncate: str | None = None) -> Callable:
    """A `prepare` that copies the toy's saved model into {tmp}/model, only the files `keep` names, and cuts the
    file `truncate` to half its size."""

    def prepare(tmp: Path, toy: list, pkg, make_config) -> None:
        source = next(arg.split("=", 1)[1].strip("'") for arg in toy if arg.startswith("model.name_or_path="))
        shutil.copytree(source, tmp / "model", ignore=lambda _, names: [name for name in names if name not in keep])
        if truncate:
            path = tmp / "model" / truncate
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return prepare


GOOD_CSV = "text,label\naeiou,1\nbcdfg,0\n"
TEXT = "text_classification"  # the rows on data files write its columns (text, label)


def bad_data(name: str, message: str, train: str = GOOD_CSV, validation: str = GOOD_CSV, suffix: str = ".csv"):
    """A row whose training and validation files hold these texts."""
    files = {f"train{suffix}": train, f"validation{suffix}": validation}
    args = [TOY, *(f"data.files.{file.removesuffix(suffix)}={{tmp}}/{file}" for file in files)]
    return Mistake(name, args, message, prepare=write(files), task=TEXT)


TOKENIZER_TASKS = ["text_classification", "causal_lm", "seq2seq"]  # the tasks that load model.name_or_path's tokenizer
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]
LONG_RUN = [TOY, "trainer.max_steps=100000", "checks.enabled=false"]  # still training when Ctrl-C comes

MISTAKES += [
    # Config keys that the `+` and `++` forms add (Hydra's own message for the plain form suggests `+`).
    Mistake("unknown key added", ["+trainer.max_step=10"], "trainer.max_step is not a config key: did you mean "),
    Mistake("unknown key forced", ["++trainer.max_step=10"], "did you mean trainer.max_steps?"),
    Mistake("key at the wrong level", ["+max_steps=10"], "max_steps is not a config key: did you mean trainer.max_st"),
    Mistake(
        "unknown evaluate key", ["+splti=test"], "splti is not a config key: did you mean split?", script="evaluate.py"
    ),
    Mistake(
        "unknown task option",
        [TOY, "+task.max_lenght=3"],
        "task.max_lenght is not an option of TextClassification: did you mean task.max_length?",
        task=TEXT,
    ),
    # Data files (the text task's columns): each message names the file, and the row and column where there is one.
    bad_data(
        "empty text cell",
        "train.csv: row 2 has an empty cell in column 'text' (task.text_column)",
        train="text,label\naeiou,1\n,0\nbcdfg,0\n",
    ),
    bad_data(
        "empty label cell",
        "validation.csv: row 1 has an empty cell in column 'label' (task.label_column)",
        validation="text,label\naeiou,\n",
    ),
    bad_data(
        "header-only file",
        "validation.csv: the file has no rows (is it empty, or only a header?)",
        validation="text,label\n",
    ),
    bad_data("empty file", "train.csv: the file has no rows", train=""),
    bad_data(
        "ragged csv",
        "train.csv: cannot be read as csv: Error tokenizing data. C error: Expected 2 fields in line 3, saw 3",
        train="text,label\naeiou,1\nbc,dfg,0\n",
    ),
    bad_data(
        "malformed json line",
        "train.jsonl: line 2 is not valid JSON",
        suffix=".jsonl",
        train='{"text": "aeiou", "label": 1}\n{"text": "bcdfg", label: 0}\n',
        validation='{"text": "aeiou", "label": 1}\n',
    ),
    bad_data(
        "missing column",
        "train.csv has no column 'text'; its columns are ['sentence', 'label'] (set task.text_column)",
        train="sentence,label\naeiou,1\nbcdfg,0\n",
    ),
    bad_data(
        "fractional labels",
        "train.csv: column 'label' (task.label_column) holds numbers with fractions, e.g. [0.5",
        train="text,label\naeiou,0.5\nbcdfg,1.5\n",
    ),
    bad_data(
        "validation label never trained on",
        "validation.csv: the validation split has labels in column "
        "'label' (task.label_column) that the training split (data.files.train=",
        validation="text,label\naeiou,1\nxyz,2\n",
    ),
    bad_data(
        "single training class",
        "train.csv: the training split has a single class in column 'label' (task.label_column): ['1']",
        train="text,label\naeiou,1\naaa,1\n",
        validation="text,label\nae,1\n",
    ),
    Mistake(
        "mixed file formats",
        [TOY, "data.files.train={tmp}/train.csv", "data.files.validation={tmp}/validation.jsonl"],
        "data.files must all have one of the extensions",
        prepare=write({"train.csv": GOOD_CSV, "validation.jsonl": '{"text": "aeiou", "label": 1}\n'}),
        task=TEXT,
    ),
    Mistake("missing data file", [TOY, "data.files.train={tmp}/none.csv"], "data.files.train: no such file", task=TEXT),
    # Models: a path that is not there, a folder with a file missing or cut short.
    Mistake("relative model path", [TOY, "model.name_or_path=outputs/nothing/model"], ": no such folder"),
    Mistake("dotted model path", [TOY, "model.name_or_path=./nothing"], "model.name_or_path=./nothing: no such folder"),
    Mistake("hub id not there", [TOY, "model.name_or_path=no-such-model"], "no such folder here, and from the hub"),
    *[
        Mistake(
            f"model folder without tokenizer ({task})",
            [TOY, "model.name_or_path={tmp}/model"],
            "/model has no tokenizer files",
            prepare=copy_toy_model(),
            task=task,
        )
        for task in TOKENIZER_TASKS
    ],
    Mistake(
        "model folder without config.json",
        [TOY, "model.name_or_path={tmp}/model"],
        "/model has no config.json, so it is not a save_pretrained folder",
        prepare=copy_toy_model(keep=("model.safetensors", "tokenizer_config.json", "special_tokens_map.json")),
        task=TEXT,
    ),
    Mistake(
        "model folder without weights",
        [TOY, "model.name_or_path={tmp}/model"],
        "/model: Error no file named model.safetensors",
        prepare=copy_toy_model(keep=("config.json", "tokenizer_config.json")),
        task=TEXT,
    ),
    Mistake(
        "truncated weight file",
        [TOY, "model.name_or_path={tmp}/model"],
        "/model/model.safetensors is truncated or corrupt",
        prepare=copy_toy_model(
            keep=("config.json", "model.safetensors", "tokenizer_config.json"), truncate="model.safetensors"
        ),
        task=TEXT,
    ),
    # Checkpoints and what evaluate.py loads.
    Mistake("resume from a missing folder", [TOY, "resume={tmp}/nothing"], "/nothing: no such folder"),
    Mistake(
        "evaluate a missing checkpoint", [TOY, "checkpoint_path={tmp}/nothing"], "no such folder", script="evaluate.py"
    ),
    Mistake(
        "evaluate a model folder as a checkpoint",
        [TOY, "checkpoint_path={tmp}/model"],
        "is not a complete checkpoint: it has no trainer_state.json",
        script="evaluate.py",
        prepare=copy_toy_model(),
    ),
    Mistake(
        "evaluate a missing model", [TOY, "model.name_or_path={tmp}/nothing"], "no such folder", script="evaluate.py"
    ),
    # Preflight: a check that fails names itself and its off switch.
    Mistake(
        "preflight check fails",
        [TOY, "checks.overfit_steps=1", "checks.overfit_factor=100"],
        "preflight check overfit_batch failed",
    ),
    # Launch: `accelerate launch --num_processes 2` without --multi_gpu (or with --cpu) starts one process.
    Mistake(
        "two processes without --multi_gpu",
        [TOY],
        "accelerate launch --multi_gpu --num_processes N train.py",
        launcher=[*ACCELERATE_LAUNCH, "--num_processes", "2"],
    ),
    Mistake(
        "two processes with --cpu",
        [TOY],
        "without --multi_gpu, or with --cpu, it starts only one",
        launcher=[*ACCELERATE_LAUNCH, "--cpu", "--num_processes", "2"],
    ),
    # Interrupts: Ctrl-C says where the run stopped and what a resume would continue from.
    Mistake(
        "ctrl-c after a checkpoint",
        [*LONG_RUN, "checkpoint.every_n_steps=2"],
        "`resume=latest hydra.run.dir=",
        code=130,
        interrupt_after="checkpoint saved",
    ),
    Mistake(
        "ctrl-c before any checkpoint",
        [TOY, "trainer.max_steps=100000"],
        "no checkpoint yet, so a rerun starts over",
        code=130,
        interrupt_after="preflight checks passed",
    ),
]


def files_and_digests(folder: Path) -> dict:
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.rglob("*") if path.is_file()}


def ctrl_c_as_in_a_terminal() -> None:
    """In the child before it starts: a shell that runs a command in the background makes it ignore SIGINT, and
    children inherit that; undo it, so the script gets Ctrl-C as from a terminal however pytest was started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_process(mistake: Mistake, args: list) -> tuple:
    """Run the row's command in a process of its own (under its launcher; interrupted if the row says so)."""
    command = [*(mistake.launcher or [sys.executable]), mistake.script, *args]
    if mistake.interrupt_after is None:
        done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, env=dict(os.environ))
        return done.returncode, done.stdout + done.stderr
    process = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=ctrl_c_as_in_a_terminal,
    )
    lines = []
    for line in process.stdout:  # tqdm's bar ends in "\r", so the lines are the log's
        lines.append(line)
        if mistake.interrupt_after in line:
            process.send_signal(signal.SIGINT)
            break
    lines.append(process.communicate(timeout=300)[0])
    return process.returncode, "".join(lines)


@pytest.mark.parametrize("mistake", MISTAKES, ids=lambda mistake: mistake.name)
def test_mistake_gets_one_clear_message_and_loses_nothing(
    mistake, toys, default_task, pkg, make_config, tmp_path, capsys
):
    if mistake.task is not None and mistake.task not in TASKS:
        pytest.skip(f"the project has no {mistake.task} task")
    toy_overrides = toys(mistake.task or default_task)
    if mistake.prepare is not None:
        mistake.prepare(tmp_path, toy_overrides, pkg, make_config)
    before = files_and_digests(tmp_path)
    args = []
    for arg in mistake.args:
        args += toy_overrides if arg == TOY else [arg.format(tmp=tmp_path)]
    args.append(f"hydra.run.dir={tmp_path / 'run'}")  # a run folder of the row's own, also for in-process runs
    if mistake.launcher or mistake.interrupt_after:
        code, output = run_process(mistake, args)
    elif mistake.subprocess:
        result = run_script(mistake.script, *args)
        code, output = result.returncode, result.stdout + result.stderr
    else:
        capsys.readouterr()  # drop what `prepare` printed
        code, output = run_in_process(mistake.script, args, capsys)

    assert code == mistake.code, output
    assert mistake.message in output, output
    if mistake.launcher:  # `accelerate launch` adds its own traceback for a failed process (not with --quiet)
        output = output.split("subprocess.CalledProcessError")[0].rsplit("Traceback", 1)[0]
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


def test_full_error_shows_the_traceback_too(toy_overrides, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    args = [*toy_overrides, f"resume={tmp_path / 'nothing'}", f"hydra.run.dir={tmp_path / 'run'}"]
    code, output = run_in_process("train.py", args, capsys)
    assert code == 1
    assert "Traceback" in output and "ConfigError" in output
    assert output.rstrip().splitlines()[-1].endswith("or resume=latest with hydra.run.dir=<run folder>")
