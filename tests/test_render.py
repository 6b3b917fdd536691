"""Checks on each render of RENDERS: lint, leftovers, answers, conditional files, metadata."""

import datetime
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from helpers import RENDERED_TESTS, RENDERS, TASKS, read_answers, run_ok

# Jinja tags left in rendered text: `{{ expression }}`, `{% statement`, `{# comment`.
# Not flagged: GitHub Actions' ${{ ... }} (removed before searching) and the escaped braces
# of Python f-strings and str.format, such as f"{{key:'{value}'}}" or "{{{x}}}".
JINJA_IN_TEXT = re.compile(r"(?<!\{)\{\{(?!\{)-?\s*[\w'\"][^{}]*\}\}|\{%-?\s|\{#-?\s")
JINJA_IN_NAME = re.compile(r"\{\{|\{%|\{#")
GITHUB_EXPRESSION = re.compile(r"\$\{\{.*?\}\}")

LICENSE_MARKERS = {
    "MIT": "Permission is hereby granted, free of charge",
    "Apache-2.0": "Version 2.0, January 2004",
    "BSD-3-Clause": "Neither the name of the copyright holder",
    "Proprietary": "All rights reserved.",
}


def files(project: Path) -> list[Path]:
    return sorted(path for path in project.rglob("*") if path.is_file())


def pyproject(project: Path) -> dict:
    return tomllib.loads((project / "pyproject.toml").read_text())


def test_ruff_check(project):
    run_ok([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=project)


def test_ruff_format(project):
    run_ok([sys.executable, "-m", "ruff", "format", "--check", "--no-cache", "."], cwd=project)


def test_no_jinja_left(project):
    leftovers = []
    for path in files(project):
        name = path.relative_to(project).as_posix()
        if JINJA_IN_NAME.search(name) or name.endswith(".jinja"):
            leftovers.append(f"{name}: file name")
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary
        for number, line in enumerate(text.splitlines(), 1):
            if JINJA_IN_TEXT.search(GITHUB_EXPRESSION.sub("", line)):
                leftovers.append(f"{name}:{number}: {line.strip()}")
    assert not leftovers, "Jinja left after rendering:\n" + "\n".join(leftovers)


def test_answers_file(project, request):
    answers = read_answers(project)
    assert answers["_src_path"]
    assert "_commit" not in answers  # rendered from a folder outside git
    given = request.node.callspec.params["project"]
    assert {key: answers[key] for key in given} == given


def test_license(project):
    answers = read_answers(project)
    text = (project / "LICENSE").read_text()
    assert LICENSE_MARKERS[answers["license"]] in text
    others = [marker for name, marker in LICENSE_MARKERS.items() if name != answers["license"]]
    assert not any(marker in text for marker in others)
    assert f"{datetime.date.today().year}" in text
    assert answers["author_name"] in text


def test_github_workflow(project):
    answers = read_answers(project)
    workflow = project / ".github" / "workflows" / "tests.yml"
    assert workflow.is_file() == answers["github_actions"]
    assert (project / ".github").exists() == answers["github_actions"]
    if answers["github_actions"]:
        jobs = yaml.safe_load(workflow.read_text())["jobs"]
        steps = [step for job in jobs.values() for step in job["steps"]]
        versions = [step["with"]["python-version"] for step in steps if "with" in step]
        assert versions == [answers["python_version"]]
        assert "dev" in pyproject(project)["project"]["optional-dependencies"]


def test_pre_commit_config(project):
    answers = read_answers(project)
    config = project / ".pre-commit-config.yaml"
    assert config.is_file() == answers["pre_commit"]
    if answers["pre_commit"]:
        repos = yaml.safe_load(config.read_text())["repos"]
        hooks = [hook["id"] for repo in repos for hook in repo["hooks"]]
        assert {"ruff-check", "ruff-format"} <= set(hooks)


def test_pyproject_and_package(project):
    answers = read_answers(project)
    metadata = pyproject(project)["project"]
    assert metadata["name"].replace("-", "_") == answers["package_name"]
    assert metadata["requires-python"] == f">={answers['python_version']}"
    assert metadata["description"] == answers["description"]
    assert (project / "src" / answers["package_name"]).is_dir()


def stems(folder: Path, pattern: str, prefix: str = "") -> list[str]:
    return sorted(path.stem.removeprefix(prefix) for path in folder.glob(pattern))


def test_only_the_chosen_tasks_leave_files(project):
    answers = read_answers(project)
    chosen = sorted(answers["tasks"])
    package = project / "src" / answers["package_name"]
    assert stems(project / "configs" / "task", "*.yaml") == chosen
    assert stems(package / "tasks", "*.py") == sorted([*chosen, "__init__", "base"])
    assert stems(project / "tests", "test_task_*.py", "test_task_") == chosen
    # python train.py runs the first chosen task
    common = yaml.safe_load((project / "configs" / "common.yaml").read_text())
    assert {"task": answers["tasks"][0]} in common["defaults"]
    others = [task for task in TASKS if task not in answers["tasks"]]
    mentions = [
        f"{path.relative_to(project)}: {task}"
        for path in files(project)
        if path.suffix in {".py", ".yaml", ".toml"}
        for task in others
        if task in path.read_text(encoding="utf-8")
    ]
    assert not mentions, "files name tasks the project does not have:\n" + "\n".join(mentions)


@pytest.mark.rendered_suite
@pytest.mark.parametrize("part", list(RENDERED_TESTS))
def test_rendered_suite(render, part):
    """The rendered project's own tests pass, offline, without installing it: in each render,
    those that it alone runs on its code (helpers.RENDERED_TESTS). Between them, every test of
    every task:
    - defaults: the whole suite of the default answers (text classification, TensorBoard);
    - aim: each other task's own tests and two-process run in a project of every task, the config
      tests, and the default command line with its tracker;
    - minimal, wandb, mlflow: the task seam's tests (training, resume, checkpoints, checks,
      evaluation, config) on the image classification, causal LM and seq2seq toys, each with its
      tracker; the tools that branch on no task (mistakes table, sweeps, report) run once, in
      defaults."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    project = render(**RENDERS[part.split(",")[0]])
    run_ok([*command, *RENDERED_TESTS[part]], cwd=project, timeout=1800)


@pytest.mark.rendered_suite
def test_rendered_slow_tests(render):
    """The generated project's slow tests (its default run leaves them out) pass too."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "slow"]
    run_ok(command, cwd=render(), timeout=1800)
