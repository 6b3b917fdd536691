"""Shared constants and helpers of the template's tests."""

import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent

TASKS = ["text_classification", "image_classification", "causal_lm", "seq2seq"]

# Together these renders take every value of every question that changes files: each task alone,
# and all tasks together (then the default task is the first of the list).
RENDERS = {
    "defaults": {},
    "minimal": {
        "tasks": ["image_classification"],
        "tracker": "none",
        "github_actions": False,
        "pre_commit": False,
        "license": "Proprietary",
        "python_version": "3.12",
    },
    "wandb": {
        "tasks": ["causal_lm"],
        "tracker": "wandb",
        "license": "Apache-2.0",
        "python_version": "3.10",
    },
    "mlflow": {
        "tasks": ["seq2seq"],
        "tracker": "mlflow",
        "license": "BSD-3-Clause",
        "python_version": "3.13",
        "package_name": "mlpkg",
    },
    "aim": {
        "tasks": TASKS,
        "tracker": "aim",
        "project_name": "Vision Lab 2!",
        "description": 'Tiny "vision" models: a study',
        "author_name": "Zoë O'Brien",
        "pre_commit": False,
    },
}

OTHER_TASKS = " or ".join(TASKS[1:])  # every task but the default one (the first of TASKS)

# The generated tests that run a task's data, model, loss and metrics through the loop: training,
# resume and checkpoints, the preflight checks, evaluation, accumulation, mixed precision, data
# workers, the proxy subset, and the config of the task's defaults.
TASK_SEAM_TESTS = [
    f"tests/test_{name}.py"
    for name in [
        "train",
        "checkpoints",
        "checks",
        "evaluate",
        "config",
        "accumulation",
        "mixed_precision",
        "data_workers",
        "proxy",
    ]
]

# The generated tests that start real processes: the two-process runs, the launcher rows of the
# mistakes table, two sweep workers (the Ctrl-C rows run in the test's own process).
PROCESS_TESTS = ["tests/test_distributed.py", "tests/test_mistakes.py", "tests/test_sweep.py"]
NOT_PROCESS_TESTS = [f"--ignore={path}" for path in PROCESS_TESTS]

# Which of its own tests each render runs (pytest arguments), so that no test runs twice on the
# same code. The key names the template suite's item; the render is the key up to its comma.
# - defaults (text classification): everything, as a user of the default answers runs it; its
#   task-agnostic tools (the mistakes table, sweeps, the report, the rank check, the profiler,
#   the launch configs) branch on no task, so they run once, here;
# - aim (every task, text classification the default): the tests that name another task (each
#   task's own tests, two-process run and parity run, in a project of several tasks), the config
#   tests and the default command line (with its tracker);
# - each single-task render: the task seam's tests on its own task's toy, with its tracker, less
#   the tests that name its task (the aim render runs those).
# The longest suite, the defaults', runs as two items, smaller pieces for `make test`'s workers (one
# per core) to share.
RENDERED_TESTS = {
    "defaults": NOT_PROCESS_TESTS,
    "defaults, processes": PROCESS_TESTS,
    "minimal": [*TASK_SEAM_TESTS, "-k", "not image_classification"],
    "wandb": [*TASK_SEAM_TESTS, "-k", "not causal_lm"],
    "mlflow": [*TASK_SEAM_TESTS, "-k", "not seq2seq"],
    "aim": ["-k", f"{OTHER_TASKS} or test_config or default_command_line"],
}


def read_answers(project: Path) -> dict:
    return yaml.safe_load((project / ".copier-answers.yml").read_text())


def run_ok(command: list, cwd: Path, timeout: float = 900) -> str:
    """Run a command with no stdin; fail the test with its output unless it exits with 0."""
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{command} exited with {result.returncode}:\n{output}"
    return output
