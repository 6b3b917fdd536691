"""Mistakes a user makes, one row each: the command, its exit code, a line of the message it must print, and what
must still be on disk afterwards. An expected failure is one short block (what was wrong, what is allowed, which key
to change), never a traceback, and a failed command changes no file that was there before it."""

import hashlib
import importlib
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from accelerate.commands import accelerate_cli
from conftest import CHECKS_ON, PACKAGE, TASKS, ForkedScript, run_in_process, toy_model
from mistakes import TOY, Mistake, copy_toy_model, train_script_first, write
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

CHECKPOINTED = ["trainer.max_steps=4", "checkpoint.every_n_steps=2"]  # a run folder with checkpoints to resume
NONFINITE = ["optimizer.lr=1e30", "trainer.max_grad_norm=0", "checks.overfit_batch=false"]  # NaN from step 2 on


def own_module(target: str, *more: str) -> list:
    """The args of the toy run (and `more`) with your own module `target`, package.module.Class, from scratch."""
    return [TOY, *more, "model.name_or_path=null", "model.model_type=null", f"model._target_={target}"]


def export_of_forward_that_fails(tmp: Path, toy: list, *args) -> None:
    """A `prepare`: {tmp}/model as train.py exports ForwardThatFails (below): its one weight, and the toy's
    tokenizer or image processor."""
    copy_toy_model(drop=("model.safetensors", "config.json"))(tmp, toy, *args)
    save_file({"scale": torch.ones(1)}, tmp / "model" / "model.safetensors")


MISTAKES = [
    # Config: typos and values that compose but make no sense, refused before any compute and any run folder.
    # A key that is not in the schema: Hydra's own message advises `+key=value`, which would add the typo.
    Mistake("unknown key", ["trainer.max_step=10"], "trainer.max_step is not a config key: did you mean trainer.max_s"),
    Mistake("unknown group key", ["optimzer.lr=1e-3"], "optimzer is not a config key: did you mean optimizer?"),
    Mistake("key at the wrong level", ["max_steps=10"], "max_steps is not a config key: did you mean trainer.max_st"),
    Mistake(
        "unknown evaluate key", ["splti=test"], "splti is not a config key: did you mean split?", script="evaluate.py"
    ),
    Mistake("unknown sweep key", ["sweep.n_trial=2"], "did you mean sweep.n_trials?", script="sweep.py"),
    Mistake(  # it was refused as a resume that changed the config, and with resume_allow it evaluated something else
        "evaluate told to resume",
        [TOY, "resume={tmp}/checkpoints/step_00000002"],
        "evaluate.py continues no run; checkpoint_path=<checkpoint folder> evaluates a checkpoint",
        script="evaluate.py",
    ),
    Mistake("out of range", [TOY, "optimizer.lr=-1"], "optimizer.lr=-1.0 is out of range: it must be > 0"),
    Mistake("enum typo", [TOY, "trainer.mixed_precision=bf61"], "Invalid value 'bf61'"),
    Mistake(
        "monitor contradicts mode",
        [TOY, "checkpoint.monitor=loss", "checkpoint.mode=max"],
        "checkpoint.mode=max contradicts checkpoint.monitor=loss",
    ),
    Mistake("held-out fraction of all of train", [TOY, "data.eval_fraction=1"], "it must be < 1"),
    Mistake(  # keep=best kept checkpoints by the metrics of an older step's evaluation
        "keep=best with checkpoints that are not evaluated",
        [TOY, "checkpoint.keep=best", "checkpoint.every_n_steps=3", "trainer.eval_every_n_steps=2"],
        "trainer.eval_every_n_steps=2 does not evaluate every checkpoint (checkpoint.every_n_steps=3)",
    ),
    Mistake(  # it accepted nothing, and the resume then refused the change it was meant for
        "resume_allow misspelt",
        [TOY, "resume_allow=[data.batch_sise,checks]"],
        "resume_allow=[data.batch_sise (did you mean data.batch_size?)]: not a key or group of the config",
    ),
    Mistake(
        "early stopping without evaluations",  # TOY evaluates only at the end
        [TOY, "trainer.early_stopping_patience=2"],
        "trainer.early_stopping_patience=2 counts evaluations, and with trainer.eval_every_n_steps=0 the run",
    ),
    Mistake(  # trains, and says that early stopping has no evaluation to count (eval_every_n_steps >= max_steps)
        "early stopping with evaluations only at the end",
        [TOY, "trainer.max_steps=4", "trainer.eval_every_n_steps=50", "trainer.early_stopping_patience=1"],
        "trainer.early_stopping_patience=1 counts evaluations during training, and trainer.eval_every_n_steps=50 with",
        code=0,
    ),
    Mistake(  # trains; it ran SGD at the task's AdamW rate without a word, where optimizer=sgd brings sgd.yaml's
        "optimizer by name, not by group",
        [TOY, "optimizer.name=sgd", "trainer.max_steps=1"],
        "optimizer.name=sgd keeps the lr and weight decay of optimizer=adamw (lr ",
        code=0,
    ),
    Mistake(  # trains, and says why the learning rate stays low: a short run under a task's warmup, say
        "warmup longer than the run",
        [TOY, "scheduler=linear", "scheduler.warmup_steps=100", "trainer.max_steps=2"],
        "scheduler.warmup_steps=100 is not below trainer.max_steps=2: the learning rate never reaches optimizer.lr",
        code=0,
    ),
    # Your own module, or an architecture from scratch, that is not there: refused before any run folder.
    Mistake(
        "own module's class misspelt",
        own_module("test_mistakes.ForwardOfOtherName"),
        "module test_mistakes has no class 'ForwardOfOtherName'; did you mean test_mistakes.ForwardOfOtherNames?",
    ),
    Mistake(
        "own module's module that is not there",
        own_module("models.mine.Net"),
        "model._target_=models.mine.Net: no module 'models.mine' can be imported",
    ),
    Mistake(
        "own module that needs a package not installed here",
        own_module("test_mistakes.BuiltWithAPackageNotInstalled"),
        "needs a package that is not installed here: No module named 'a_package_not_installed_here'",
    ),
    Mistake(  # saved by a later transformers, with an architecture this one does not have
        "model of a model type unknown here",
        [TOY, "model.name_or_path={tmp}/model"],
        "cannot be read here: The checkpoint you are trying to load has model type `from_a_later_transformers`",
        prepare=copy_toy_model(model_type="from_a_later_transformers"),
        transformers=True,
    ),
    Mistake(  # checks.enabled=false (the toy's): it was a traceback from deep in the model at the first step
        "own module that fails on the task's batches, without the checks",
        own_module("test_mistakes.ForwardThatFails"),
        "the model raised RuntimeError on the first training batch (checks.enabled=true tries the model before",
    ),
    Mistake(
        "own module that fails on the data it evaluates",
        [
            TOY,
            "model.name_or_path={tmp}/model",
            "model.model_type=null",
            "model._target_=test_mistakes.ForwardThatFails",
        ],
        "the model raised RuntimeError on a batch of split validation: mat1 and mat2 shapes cannot be multiplied",
        script="evaluate.py",
        prepare=export_of_forward_that_fails,
    ),
    # Memory that runs out: said as such, with the keys that lower it, not as a model that cannot run.
    *(
        Mistake(
            f"out of memory {where}",
            [TOY, *args, "model.model_type=null", "model._target_=test_mistakes.ForwardThatRunsOutOfMemory"],
            "out of memory: [enforce fail at alloc_cpu.cpp:",
            script=script,
            prepare=export_of_forward_that_fails if script == "evaluate.py" else None,
        )
        for where, script, args in [
            ("in a preflight check", "train.py", ["model.name_or_path=null", CHECKS_ON]),
            ("at the first step", "train.py", ["model.name_or_path=null"]),
            ("in an evaluation", "evaluate.py", ["model.name_or_path={tmp}/model"]),
        ]
    ),
    Mistake(  # model_type went unused without a word where a group of your own module is the task's default
        "your own module and an architecture",
        [TOY, "model.name_or_path=null", "model._target_=test_mistakes.ForwardThatFails", "model.model_type=qwen2"],
        "model._target_=test_mistakes.ForwardThatFails (your own module) and model.model_type=qwen2 (a transformers "
        "architecture) are both set, and one model is built: model.model_type=null for your own module; for a qwen2",
    ),
    Mistake(
        "architecture misspelt",
        [TOY, "model.name_or_path=null", "model.model_type=lama"],
        "model.model_type=lama is not an architecture of this transformers (did you mean llama",
        transformers=True,
    ),
    # Run folders, resume and non-finite losses
    Mistake(
        "fresh run into a run's folder",
        [TOY, *CHECKPOINTED],
        "holds another run (checkpoints/step_00000004, model, metrics.json), and this run starts from scratch",
        prepare=train_script_first(*CHECKPOINTED),
        on_disk=["run/.hydra/config.yaml", "run/checkpoints/step_00000004"],
    ),
    Mistake(  # the row's run folder, {tmp}/run, is a file
        "run folder where a file is",
        [TOY],
        "/run cannot be a run folder (a file of that name is there); choose another",
        prepare=write({"run": "notes"}),
    ),
    Mistake(
        "resume=latest where there is no checkpoint",  # a finished run without checkpoints: it would start over
        [TOY, "resume=latest"],
        "holds another run (model, metrics.json), and this run has no checkpoint of it to continue from. A run folder "
        "holds one run: start from its model (model.name_or_path), or choose",  # not: "continue with resume=latest"
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
    Mistake(  # it started over, and wrote over the finished run's model and metrics
        "resume=latest where every checkpoint is corrupt",
        [TOY, "trainer.max_steps=6", "resume=latest"],
        "resume=latest: no checkpoint of",
        prepare=train_script_first(
            *CHECKPOINTED, cut_short=[f"checkpoints/step_0000000{step}/model.safetensors" for step in (2, 4)]
        ),
        on_disk=["run/model", "run/metrics.json"],
    ),
    Mistake(  # it resumed at step 4, trained nothing, and evaluated and exported again
        "resume with trainer.max_steps below the checkpoint's step",
        [TOY, "trainer.max_steps=2", "resume=latest"],
        "trainer.max_steps=2 is below the step of",
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
        "non-finite loss",  # trainer.nonfinite_loss=stop, the default
        [TOY, *NONFINITE, "trainer.max_steps=10"],
        "step 2: the training loss is nan; the last finite training loss was",
    ),
    Mistake(  # after its finite loss, the run's last update makes the weights huge: the outputs overflow, and the
        # training losses never show it. The model was exported, with "validation loss nan" as its result.
        "last update makes the outputs overflow",
        [TOY, *NONFINITE, "trainer.max_steps=1"],
        "the validation loss after step 1 is nan; the last finite training loss was",
    ),
    Mistake(
        "resume from a truncated checkpoint",
        [TOY, "trainer.max_steps=6", "resume={tmp}/run/checkpoints/step_00000004"],
        "is truncated or corrupt: these files differ from when it was saved: ['model.safetensors']",
        prepare=train_script_first(*CHECKPOINTED, cut_short="checkpoints/step_00000004/model.safetensors"),
    ),
    Mistake(
        "skipping non-finite losses at nearly every step",
        [TOY, *NONFINITE, "trainer.max_steps=10", "trainer.nonfinite_loss=skip", "trainer.max_nonfinite_skips=3"],
        "3 updates were skipped already, all that trainer.max_nonfinite_skips allows",
    ),
]


# A tracker this environment lacks (a project installs only its own): without the check Accelerate would leave it out
# without a word, and the run would log nowhere.
INSTALLED_TRACKERS = [choice.value for choice in importlib.import_module(f"{PACKAGE}.loop").installed_trackers()]
MISSING_TRACKERS = [name for name in ("wandb", "mlflow", "aim") if name not in INSTALLED_TRACKERS]
MISTAKES += [
    Mistake("tracker not installed", [TOY, f"trainer.log_with={name}"], f"the {name} package is not installed here")
    for name in MISSING_TRACKERS[:1]
]

ACCELERATE_LAUNCH = [accelerate_cli.__file__, "launch"]  # the `accelerate` command: its entry point's module
LONG_RUN = [TOY, "trainer.max_steps=100000", "checks.enabled=false"]  # still training when Ctrl-C comes

MISTAKES += [
    # Config keys that the `+` and `++` forms add.
    Mistake("unknown key added", ["+trainer.max_step=10"], "trainer.max_step is not a config key: did you mean "),
    Mistake("unknown key forced", ["++trainer.max_step=10"], "did you mean trainer.max_steps?"),
    Mistake("key added at the wrong level", ["+max_steps=10"], "max_steps is not a config key: did you mean trainer."),
    Mistake(
        "unknown evaluate key added",
        ["+splti=test"],
        "splti is not a config key: did you mean split?",
        script="evaluate.py",
    ),
    Mistake("missing data file", [TOY, "data.files.train={tmp}/none.csv"], "data.files.train: no such file"),
    Mistake(
        "missing validation file",
        [TOY, "data.files.validation={tmp}/none.csv"],
        "none.csv (or leave the split out: ~data.files.validation)",
    ),
    Mistake(  # held out of train instead, it would leave the data's own validation split unused
        "validation split that the data does not have",
        [TOY, "data.eval_split=valid"],
        "data.eval_split='valid' is not a split of the dataset; it has ['train', 'validation']: set data.eval_split",
    ),
    Mistake(  # the tests run offline: a hub dataset that is not in the cache is not there
        "dataset name neither built in nor on the hub",
        ["data.name=no_such_dataset", "trainer.log_with=none"],
        "data.name=no_such_dataset: not a built-in dataset of this task",
    ),
    # Files without data=files: the default data is a built-in dataset, by name. (Hydra's own message for the plain
    # form; the ++ form composes, and validation names both keys.)
    Mistake("data files without data=files", ["data.files={{train:{tmp}/t.csv}}"], "Could not override 'data.files'"),
    Mistake(
        "data files forced without data=files",
        ["++data.files={{train:{tmp}/t.csv}}"],
        "data: set exactly one of data.name (a hub or built-in dataset; now ",
    ),
    # Models: a path that is not there (a folder with a file missing or cut short: SAVED_MODEL_ROWS, below).
    Mistake(  # trains, saying what model.config does not change: a saved model keeps its saved config
        "model.config with a saved model",
        [TOY, "+model.config.dropout_of_mine=0.3", "trainer.max_steps=1"],
        "dropout_of_mine=0.3 (saved: None)",  # after the model group's keys that differ from the saved ones
        code=0,
        transformers=True,
    ),
    Mistake("relative model path", [TOY, "model.name_or_path=outputs/nothing/model"], ": no such folder"),
    Mistake("dotted model path", [TOY, "model.name_or_path=./nothing"], "model.name_or_path=./nothing: no such folder"),
    Mistake(
        "hub id not there",
        [TOY, "model.name_or_path=no-such-model"],
        "no such folder here, and from the hub",
        transformers=True,
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
    Mistake(  # it would be taken for a model folder without tokenizer or config files
        "evaluate a run folder as the model",
        [TOY, "model.name_or_path={tmp}/run"],
        "/run is a run folder: its exported model is model.name_or_path=",
        script="evaluate.py",
        prepare=train_script_first(),
    ),
    Mistake(
        "fine-tune a checkpoint as the model",
        [TOY, "model.name_or_path={tmp}/run/checkpoints/step_00000004"],
        "step_00000004 is a checkpoint, not a model folder: evaluate it with checkpoint_path=",
        prepare=train_script_first(*CHECKPOINTED),
    ),
    Mistake(  # without either, it would evaluate a model built from scratch: numbers of no model anyone trained
        "evaluate with neither a model nor a checkpoint",
        [TOY, "model.name_or_path=null"],
        "evaluate.py evaluates a trained model: give model.name_or_path=",
        script="evaluate.py",
    ),
    # Preflight: a check that fails names itself and its off switch.
    Mistake(
        "preflight check fails",
        [TOY, CHECKS_ON, "optimizer.lr=1e-12"],  # a learning rate too small to learn anything: a real bug of the setup
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
        [TOY, CHECKS_ON, "trainer.max_steps=100000"],
        "no checkpoint yet, so a rerun starts over",
        code=130,
        interrupt_after="preflight checks passed",
    ),
]


def toy_model_without_a_norm_weight(tmp: Path, toy: list, pkg, make_config) -> None:
    copy_toy_model()(tmp, toy, pkg, make_config)
    weights = load_file(tmp / "model" / "model.safetensors")
    del weights[next(name for name in sorted(weights) if "norm" in name.lower())]  # never tied to another weight
    save_file(weights, tmp / "model" / "model.safetensors", {"format": "pt"})


def toy_model_of_another_kind(tmp: Path, toy: list, pkg, make_config) -> None:
    copy_toy_model()(tmp, toy, pkg, make_config)
    AutoConfig.for_model("wav2vec2").save_pretrained(tmp / "model")  # a speech model: no task here has a class for it


# Each task's own rows (its data files, its model's parts), run on that task's toy.
# A saved model folder with a file missing, cut short or of another kind, for every task: each task loads its model
# its own way.
SAVED_MODEL_ROWS = [
    Mistake(
        "model folder without config.json",
        [TOY, "model.name_or_path={tmp}/model"],
        "/model has no config.json, so it is not a save_pretrained folder",
        prepare=copy_toy_model(drop=("config.json",)),
    ),
    Mistake(
        "model folder without weights",
        [TOY, "model.name_or_path={tmp}/model"],
        "/model: Error no file named model.safetensors",
        prepare=copy_toy_model(drop=("model.safetensors",)),
    ),
    Mistake(
        "model folder of a kind the task has no class for",
        [TOY, "model.name_or_path={tmp}/model"],
        "/model is a wav2vec2 model: AutoModelFor",
        prepare=toy_model_of_another_kind,
    ),
    Mistake(  # from_pretrained would start that layer anew, with a warning among its loading messages
        "model folder without some weights",
        [TOY, "model.name_or_path={tmp}/model"],
        "which would score untrained; its weight files lack them: export or copy the model again",
        prepare=toy_model_without_a_norm_weight,
        script="evaluate.py",
    ),
    Mistake(
        "truncated weight file",
        [TOY, "model.name_or_path={tmp}/model"],
        "/model/model.safetensors is truncated or corrupt",
        prepare=copy_toy_model(cut_short="model.safetensors"),
    ),
]


class ForwardOfOtherNames(torch.nn.Module):
    """Your own module whose forward names its input `x`, where each task passes input_ids or pixel_values. It takes
    whatever the task and the toy's model config give __init__, and has the generate() that a task of texts out
    asks for."""

    def __init__(self, **config):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.scale

    def generate(self, input_ids, attention_mask, max_new_tokens, num_beams, do_sample):
        return input_ids


class BuiltWithAPackageNotInstalled(ForwardOfOtherNames):
    """Your own module that imports an optional package as it is built, one that is not installed here."""

    def __init__(self, **config):
        import a_package_not_installed_here  # noqa: F401

        super().__init__(**config)


class ForwardThatFails(ForwardOfOtherNames):
    """Your own module that takes the task's inputs and fails on them, as a layer of the wrong width would."""

    def forward(self, **inputs):
        return torch.nn.functional.linear(torch.ones(1, 5), torch.ones(2, 3))


class PicksItsActivationByName(ForwardOfOtherNames):
    """Your own module that looks up a model.config value in a table of its own, as modules do for activations."""

    def __init__(self, activation: str = "relu", **config):
        super().__init__(**config)
        self.activation = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU}[activation]()


class ForwardThatRunsOutOfMemory(ForwardOfOtherNames):
    """Your own module whose forward asks for more memory than any machine has (4 PiB): torch's allocator refuses."""

    def forward(self, **inputs):
        return torch.empty(2**50)


# A model from scratch of a kind no task here has a class for (each task names its own Auto class), or with a key its
# architecture does not have, for every task.
SCRATCH_MODEL_ROWS = [
    Mistake(
        "architecture of a kind the task has no class for",
        [TOY, "model.name_or_path=null", "model.model_type=wav2vec2"],
        "model.model_type=wav2vec2: AutoModelFor",
        transformers=True,
    ),
    Mistake(  # transformers would keep it as a new attribute of the config, which nothing reads
        "misspelt key of an architecture from scratch",
        [TOY, "model.name_or_path=null", "+model.config.hiden_size=8"],
        "model.config.hiden_size (did you mean hidden_size",
        transformers=True,
    ),
    Mistake(  # any error its __init__ raises on model.config (a KeyError here) was a traceback, but a few kinds
        "own module that looks up a value of model.config it does not have",
        own_module("test_mistakes.PicksItsActivationByName", "+model.config.activation=swish"),
        "model.config does not make test_mistakes.PicksItsActivationByName: KeyError: 'swish' (HYDRA_FULL_ERROR=1",
    ),
    Mistake(  # it failed at the first step, with a TypeError from the loop
        "own module whose forward names its inputs otherwise",
        own_module("test_mistakes.ForwardOfOtherNames"),
        "model._target_=test_mistakes.ForwardOfOtherNames: its forward(x) cannot take what the task passes",
    ),
    Mistake(  # a shape that does not fit, say: it was a traceback from deep in the model
        "own module that fails on the task's batches",
        own_module("test_mistakes.ForwardThatFails", CHECKS_ON),
        # init_loss runs the model first, or validation where the task expects no particular initial loss
        "failed: the model raised RuntimeError on a batch of the task: mat1 and mat2",
    ),
]
for task in TASKS:
    own_rows = getattr(importlib.import_module(f"test_task_{task}"), "MISTAKES", [])
    saved = [replace(row, transformers=True) for row in SAVED_MODEL_ROWS]  # folders of save_pretrained
    MISTAKES += [replace(row, task=task) for row in saved + SCRATCH_MODEL_ROWS + own_rows]


def files_and_digests(folder: Path) -> dict:
    """Each file's digest; a log's whole content, which may only grow (a refused run logs what it found there)."""
    return {
        path: path.read_bytes() if path.suffix == ".log" else hashlib.sha256(path.read_bytes()).hexdigest()
        for path in folder.rglob("*")
        if path.is_file()
    }


def lost(before: dict, after: dict) -> list:
    """The files of `before` that are gone or changed in `after` (a log that only grew lost nothing)."""
    return [
        path
        for path, was in before.items()
        if after.get(path) != was and not (path.suffix == ".log" and after.get(path, b"").startswith(was))
    ]


def run_launched(mistake: Mistake, args: list, output: Path) -> tuple:
    """Run the row's command under its launcher, in a process of its own (forked: the launcher's imports are this
    process's), which starts the script as the launcher does."""
    launcher = ForkedScript(mistake.launcher[0], [*mistake.launcher[1:], mistake.script, *args], output)
    return launcher.wait(), output.read_text()


def run_interrupted(mistake: Mistake, args: list, log: Path, capsys) -> tuple:
    """Run the row's command in this process and press Ctrl-C once its log shows the row's line: a real SIGINT, which
    Python turns into KeyboardInterrupt wherever the run is (a new interpreter would add 5 s of imports, nothing more).
    """
    pressed, done, stuck = threading.Event(), threading.Event(), threading.Event()
    deadline = time.monotonic() + 120  # a run that never logs the line would otherwise train on and on

    def press_ctrl_c() -> None:
        while not done.wait(0.05):
            if log.is_file() and mistake.interrupt_after in log.read_text():
                os.kill(os.getpid(), signal.SIGINT)
                pressed.set()
                break
            if time.monotonic() > deadline:
                stuck.set()
                os.kill(os.getpid(), signal.SIGINT)
                break
        # Python drops a KeyboardInterrupt raised while a finalizer runs (a garbage collection, say); a person would
        # press again, and so does this, once the run is clearly still going.
        while not done.wait(10):
            os.kill(os.getpid(), signal.SIGINT)

    # A shell that runs a command in the background makes it ignore SIGINT; answer it as a terminal's process would.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    try:
        code, output = run_in_process(mistake.script, args, capsys)
    finally:
        done.set()
        presser.join()
        signal.signal(signal.SIGINT, previous)
    log_text = log.read_text() if log.is_file() else "(no log)"
    assert not stuck.is_set(), f"its log did not show {mistake.interrupt_after!r} in 120 s:\n{log_text[-3000:]}"
    assert pressed.is_set(), f"the run ended before its log showed {mistake.interrupt_after!r}:\n{output}"
    return code, output


@pytest.mark.parametrize(
    "mistake", MISTAKES, ids=lambda mistake: f"{mistake.task}: {mistake.name}" if mistake.task else mistake.name
)
def test_mistake_gets_one_clear_message_and_loses_nothing(
    mistake, toys, default_task, pkg, make_config, tmp_path, capsys
):
    toy_overrides = toys(mistake.task or default_task)
    if mistake.transformers and not (toy_model(toy_overrides) / "config.json").is_file():
        pytest.skip("a row about transformers models, and this task's toy model is your own module")
    if mistake.prepare is not None:
        mistake.prepare(tmp_path, toy_overrides, pkg, make_config)
    before = files_and_digests(tmp_path)
    args = []
    for arg in mistake.args:
        args += toy_overrides if arg == TOY else [arg.format(tmp=tmp_path)]
    args.append(f"hydra.run.dir={tmp_path / 'run'}")  # a run folder of the row's own, also for in-process runs
    capsys.readouterr()  # drop what `prepare` printed
    if mistake.launcher:
        code, output = run_launched(mistake, args, tmp_path / "launcher.out")
    elif mistake.interrupt_after:
        code, output = run_interrupted(mistake, args, tmp_path / "run" / "train.log", capsys)
    else:
        code, output = run_in_process(mistake.script, args, capsys)

    assert code == mistake.code, output
    assert mistake.message in output, output
    if mistake.launcher:  # `accelerate launch` adds its own traceback for a failed process (not with --quiet)
        output = output.split("subprocess.CalledProcessError")[0].rsplit("Traceback", 1)[0]
    assert "Traceback" not in output, output
    assert not [line for line in output.split("\n") if "%|" in line and "Error: " in line]  # not after a progress bar
    for path in mistake.on_disk:
        assert (tmp_path / path.format(tmp=tmp_path)).exists(), path
    if code != 0:  # a failure loses nothing: every file is still there, byte for byte
        assert lost(before, files_and_digests(tmp_path)) == []


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
