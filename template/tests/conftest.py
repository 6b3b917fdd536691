"""Shared fixtures: offline Hugging Face libraries, the real Hydra config, and each task's toy run."""

import copy
import functools
import gc
import importlib
import logging
import os
import random
import runpy
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import tqdm.std

# Nothing may touch the network, and nothing may write into the user's Hugging Face cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# `pytest -n auto` starts one worker per core: one thread each (theirs and their child processes'), or the workers'
# threads fight over the cores (on 2 cores the suite took 249 s instead of 88 s).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from hydra import compose, initialize_config_dir  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"
sys.path.insert(0, str(PROJECT_ROOT / "src"))
PACKAGE = next(p.parent.name for p in (PROJECT_ROOT / "src").glob("*/loop.py"))


@pytest.fixture(scope="session", autouse=True)
def hf_home(tmp_path_factory):
    """A fresh Hugging Face cache for the test session (datasets caches tokenized data there)."""
    path = tmp_path_factory.mktemp("hf_home")
    os.environ["HF_HOME"] = str(path)
    os.environ["HF_DATASETS_CACHE"] = str(path / "datasets")
    return path


def run_in_process(script: str, args: list, capsys=None) -> tuple:
    """Run a project script as `python script args` would, in this process (imports are paid once): exit status
    and output (what pytest's `capsys` captured; without it, the output is left to pytest)."""
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
    if capsys is None:
        return code, ""
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# Progress bars share a lock across forked processes (tqdm's multiprocessing RLock, made at the first bar). A
# ForkedScript killed with SIGKILL while it draws a bar would leave that lock taken, and this process's next bar
# would wait for it forever (seen in the SIGKILL test). The children write to files of their own: a lock per process
# is enough, so there is none across processes.
tqdm.std.TqdmDefaultWriteLock.mp_lock = None


class ForkedScript:
    """`python script args` as a process of its own, forked from this one: a real process, which a signal can kill
    and which can join a process group, that inherits this process's imports instead of paying seconds for them
    (Accelerate's debug_launcher and notebook_launcher start their processes the same way). It runs on one thread,
    as torchrun's ranks do: after a fork, OpenMP hangs in a parallel region that the parent's threads served."""

    def __init__(self, script: str, args: list, output: Path, cwd: Path = PROJECT_ROOT, env: dict | None = None):
        self.output = output  # the child's stdout and stderr
        env = {**(env or {}), "OMP_NUM_THREADS": "1"}
        self.process, self.returncode = None, None
        # A new interpreter instead where a fork is not safe: off Linux (macOS's system libraries, Windows), or once
        # this process has used CUDA, which a forked child cannot.
        if sys.platform != "linux" or torch.cuda.is_initialized():
            with open(output, "w") as file:
                command = [sys.executable, str(PROJECT_ROOT / script), *args]
                self.process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **env}, stdout=file, stderr=file)
            return
        sys.stdout.flush()
        sys.stderr.flush()
        with warnings.catch_warnings():  # Python 3.12+ warns of forking a process that has threads; the child
            warnings.simplefilter("ignore", DeprecationWarning)  # only runs the script, then exits
            self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                with open(output, "w") as file:
                    os.dup2(file.fileno(), 1)
                    os.dup2(file.fileno(), 2)
                sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
                logging.root.handlers.clear()  # earlier runs' handlers, on streams closed since: a new process has none
                os.chdir(cwd)
                os.environ.update(env)
                torch.set_num_threads(1)
                reset_accelerate_state()
                code = run_in_process(script, args)[0]
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(code)  # not pytest's exit handlers: they belong to the parent

    def wait(self, timeout: float = 300) -> int:
        """The exit status. A child still running after `timeout` seconds fails the test: it gets SIGTERM (a
        launcher then stops the processes it started), and SIGKILL a minute later."""
        status = self._status_within(timeout)
        if status is None:
            self._signal(signal.SIGTERM)
            if self._status_within(60) is None:
                self.kill()
            pytest.fail(f"{self.output.name}: still running after {timeout} s, so stopped:\n{self.tail()}")
        return status

    def kill(self) -> None:
        """SIGKILL, unless the child has ended already."""
        if self._status() is None:
            self._signal(signal.SIGKILL)
            self._status_within(60)

    def tail(self) -> str:
        return self.output.read_text()[-4000:]

    def _signal(self, number: int) -> None:
        if self.process is None:
            os.kill(self.pid, number)
        else:
            self.process.send_signal(number)

    def _status_within(self, seconds: float) -> int | None:
        deadline = time.monotonic() + seconds
        while (status := self._status()) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return status

    def _status(self) -> int | None:
        if self.returncode is None and self.process is not None:
            self.returncode = self.process.poll()
        elif self.returncode is None and (waited := os.waitpid(self.pid, os.WNOHANG))[0]:
            self.returncode = os.waitstatus_to_exitcode(waited[1])
        return self.returncode


def wait_all(scripts: list) -> list:
    """Each ForkedScript's exit status. When a wait fails the test, the others are killed: a failed test leaves no
    process behind."""
    try:
        return [script.wait() for script in scripts]
    finally:
        for script in scripts:
            script.kill()


# Accelerate keeps process-wide singletons: reset them before an Accelerator with other settings.
reset_accelerate_state = importlib.import_module(f"{PACKAGE}.launch").reset_accelerate_state


def assert_export_evaluates_as_trained(pkg, make_config, overrides: list, trained: dict, run_dir: Path) -> None:
    """evaluate.py scores the model that a toy run of `overrides` exported to run_dir/model to the metrics training
    reported (transformers renames some weights as it saves them, and rebuilds some it never saves)."""
    reset_accelerate_state()
    exported = make_config(*overrides, f"model.name_or_path='{run_dir / 'model'}'", config_name="evaluate")
    assert pkg.loop.evaluate_saved(exported, run_dir / "evaluated")["metrics"] == trained["metrics"]


@pytest.fixture(autouse=True)
def isolated_global_state():
    """Each test starts from the same global state, whatever ran before it and in whatever order: the random
    generators (a toy built from the generator that earlier tests left behind trains differently), torch's
    deterministic mode and thread count, Accelerate's singletons, and the root logger's handlers: a script's Hydra
    run adds a console handler on that test's captured output, closed once the test ends, and a file handler on
    that run's log."""
    threads = torch.get_num_threads()
    root = logging.getLogger()
    handlers = root.handlers[:]
    # Every run ends with Accelerate's free_memory, a full gc.collect(): over the million objects that the imports of
    # torch, transformers and the rest left, half a second each time. Frozen here (after collecting the previous
    # test's garbage), they are never scanned again, and a collection costs what the test itself allocated.
    gc.collect()
    gc.freeze()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)
    reset_accelerate_state()
    root.handlers[:] = handlers


# The schemas in Hydra's ConfigStore, once per session (the launch module, imported above, registers the resolvers
# that the `hydra` node uses).
importlib.import_module(f"{PACKAGE}.config").register_configs()


def compose_config(*overrides: str, return_hydra_config: bool = False, config_name: str = "train"):
    """Compose the project's real Hydra config (configs/train.yaml, or evaluate.yaml) with command-line overrides.
    A copy of the first composition with the same arguments: nothing under configs/ changes during a session, and a
    compose costs 0.1 s (a third of the suite's time was Hydra composing configs), a copy 2 ms."""
    return copy.deepcopy(_composed(overrides, return_hydra_config, config_name))


@functools.cache
def _composed(overrides: tuple, return_hydra_config: bool, config_name: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)


# Each task's test file, tests/test_task_<task>.py, has a `toy(folder, train_examples, validation_examples)`: it saves
# a tiny model (save_pretrained, loaded back like any hub model) and toy data into `folder` and returns the overrides
# of a run that memorizes the data in a few seconds. The task-agnostic tests run on these toys.
TASKS = sorted(path.stem.removeprefix("test_task_") for path in Path(__file__).parent.glob("test_task_*.py"))
TOY_RUN = [  # what every toy run shares: constant lr, no tracker, evaluation and checkpoints only at the end
    "checks.enabled=false",  # the preflight checks: on (CHECKS_ON) only in the tests that are about them
    "scheduler=constant",
    "optimizer.weight_decay=0",
    "trainer.eval_every_n_steps=0",
    "trainer.log_with=none",
    "checkpoint.every_n_steps=0",
]

CHECKS_ON = "checks.enabled=true"  # a toy run with the preflight checks (tests/test_checks.py, each task's own tests)


def toy_model(overrides: list) -> Path:
    """The saved model folder of a toy run: the folder its model.name_or_path override names."""
    return Path(next(o for o in overrides if o.startswith("model.name_or_path=")).split("=", 1)[1].strip("'"))


def task_name(cfg) -> str:
    """The task of a composed config: the module of its `task._target_` class."""
    return cfg.task._target_.rsplit(".", 2)[-2]


def toy_overrides_for(task: str, folder: Path, train_examples: int = 32, validation_examples: int | None = None):
    """The toy run of `task` (train = validation unless `validation_examples` asks for another count)."""
    toy = importlib.import_module(f"test_task_{task}").toy
    folder.mkdir(parents=True, exist_ok=True)
    return [f"task={task}", *TOY_RUN, *toy(folder, train_examples, validation_examples)]


def pytest_addoption(parser):
    parser.addoption(
        "--task",
        choices=TASKS,
        help="run the tests that use one task's toy (checks, resume, checkpoints, accumulation, ...) on this task "
        "instead of the default one; the tests of every task run on every task either way",
    )


@pytest.fixture(scope="session")
def default_task(request):
    """The task whose toy the task-agnostic tests run: `pytest --task <name>`, or the one that `python train.py` runs
    (the first one the project was generated with)."""
    return request.config.getoption("--task") or task_name(compose_config())


@pytest.fixture(scope="session")
def toys(tmp_path_factory):
    """toys(task) -> that task's toy overrides, built once per test session."""
    built = {}

    def get(task: str) -> list:
        if task not in built:
            built[task] = toy_overrides_for(task, tmp_path_factory.mktemp(f"toy_{task}"))
        return built[task]

    return get


@pytest.fixture
def toy_overrides(toys, default_task):
    return toys(default_task)


@pytest.fixture(scope="session")
def pkg():
    """The project's package modules (tests stay free of the package name)."""
    names = "checkpoints checks config data errors launch loop modeling optim records run_folder runs tasks.base"
    return SimpleNamespace(**{n.replace(".", "_"): importlib.import_module(f"{PACKAGE}.{n}") for n in names.split()})


@pytest.fixture(scope="session")
def make_config():
    return compose_config
