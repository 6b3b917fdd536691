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
