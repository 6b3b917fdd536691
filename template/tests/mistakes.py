"""The mistakes table's row type and the helpers that prepare a row's folder; test_mistakes.py holds the rows every
project has, and each task's test file (tests/test_task_<task>.py) the rows of its own, in `MISTAKES`."""

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import transformers
from conftest import run_in_process, toy_model
from transformers import AutoConfig

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
    on_disk: list = field(default_factory=list)  # paths under {tmp} that must exist afterwards
    task: str | None = None  # the task whose toy TOY stands for (set for the rows of a task's file); None: the default
    launcher: list = field(default_factory=list)  # runs `<launcher> script args` in a process of its own
    interrupt_after: str | None = None  # Ctrl-C (a real SIGINT) once the run's train.log shows this line
    transformers: bool = False  # about a transformers model: skipped where the toy's model is your own module


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def train_script_first(*args: str, cut_short: str | list | None = None) -> Callable:
    """A `prepare` that runs train.py on the toy run into {tmp}/run first (plus `args`): the mistake's run folder,
    with what Hydra writes too (.hydra/config.yaml, train.log); then cuts the run's file `cut_short` (or each of a
    list) to half."""

    def prepare(tmp: Path, toy: list, pkg, make_config) -> None:
        code, output = run_in_process(
            "train.py", [*toy, *[a.format(tmp=tmp) for a in args], f"hydra.run.dir={tmp / 'run'}"]
        )
        assert code == 0, output
        for path in [cut_short] if isinstance(cut_short, str) else cut_short or []:
            truncate(tmp / "run" / path)

    return prepare


def write(files: dict) -> Callable:
    """A `prepare` that writes these files (name -> text) into the row's folder."""

    def prepare(tmp: Path, toy: list, pkg, make_config) -> None:
        for name, text in files.items():
            (tmp / name).write_text(text)

    return prepare


def copy_toy_model(
    keep: tuple | None = None, drop: tuple = (), cut_short: str | None = None, model_type: str | None = None
) -> Callable:
    """A `prepare` that copies the toy's saved model into {tmp}/model: only the files `keep` names (all if None)
    but those `drop` names; then cuts the file `cut_short` to half its size, or gives its config.json `model_type`."""

    def prepare(tmp: Path, toy: list, pkg, make_config) -> None:
        source = toy_model(toy)
        left_out = [name for name in os.listdir(source) if name in drop or (keep is not None and name not in keep)]
        shutil.copytree(source, tmp / "model", ignore=lambda *_: left_out)
        if cut_short:
            truncate(tmp / "model" / cut_short)
        if model_type:
            config = json.loads((tmp / "model" / "config.json").read_text())
            (tmp / "model" / "config.json").write_text(json.dumps({**config, "model_type": model_type}))

    return prepare


def tokenizer_rows() -> list:
    """The rows of a task that loads the tokenizer saved with the model: a model folder without one is refused, and
    one whose tokenizer gives ids past the model's embedding table, by train.py and evaluate.py alike."""
    return [
        Mistake(
            "model folder without tokenizer",
            [TOY, "model.name_or_path={tmp}/model"],
            "/model has no tokenizer files",
            prepare=copy_toy_model(keep=("config.json", "model.safetensors", "generation_config.json")),
        ),
        *(
            Mistake(  # checks.enabled=false (the toy's): the preflight check of a few batches would see it too
                f"tokenizer of more ids than the model's embedding table ({script})",
                [TOY, "model.name_or_path={tmp}/model"],
                "has 4 rows in its embedding table: its tokenizer is not the one it was trained with",
                script=script,
                prepare=embedding_table_cut_to(4),  # fewer than any text's ids
            )
            for script in ("train.py", "evaluate.py")
        ),
    ]


def embedding_table_cut_to(rows: int) -> Callable:
    """A `prepare` that copies the toy's saved model into {tmp}/model with its embedding table cut to `rows` rows, as
    if its tokenizer had gained tokens since without resize_token_embeddings."""

    def prepare(tmp: Path, toy: list, pkg, make_config) -> None:
        copy_toy_model()(tmp, toy, pkg, make_config)
        architecture = AutoConfig.from_pretrained(tmp / "model").architectures[0]
        model = getattr(transformers, architecture).from_pretrained(tmp / "model")
        model.resize_token_embeddings(rows)
        model.save_pretrained(tmp / "model")

    return prepare


def beyond_memory(group: str, width: str = "hidden_size", feed_forward: str = "intermediate_size") -> "Mistake":
    """The row of a task's tiny model group (configs/model/<group>) built from scratch 65536 wide: some 100B
    parameters, more memory than any machine has. Without a check, the kernel killed the run without a word."""
    sizes = [f"model.config.{width}=65536", f"model.config.{feed_forward}=262144"]
    return Mistake(
        "a model from scratch beyond this machine's memory",
        [TOY, f"model={group}", "model.name_or_path=null", *sizes],
        "GiB of float32 weights, more than the ",
    )


def set_by_the_task(setting: str) -> "Mistake":
    """The row of a task whose model from scratch gets `setting`, a key=value of model.config, from the task itself:
    another value would be overridden without a word."""
    return Mistake(
        "model.config key that the task sets",
        [TOY, "model.name_or_path=null", f"+model.config.{setting}"],
        f"model.config sets what the task sets itself, from its data, its tokenizer or a task.* setting: {setting} (",
    )
