"""`copier update` brings a new template version and changed answers into a project."""

import shutil

import copier
from helpers import read_answers, run_ok

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Template Tests",
    "GIT_AUTHOR_EMAIL": "tests@example.com",
    "GIT_COMMITTER_NAME": "Template Tests",
    "GIT_COMMITTER_EMAIL": "tests@example.com",
}


def commit_all(repo, message, tag=None):
    """Commit every file of `repo` (`git init` is harmless on an existing repository)."""
    run_ok(["git", "init", "-q"], cwd=repo)
    run_ok(["git", "add", "-A"], cwd=repo)
    run_ok(["git", "commit", "-q", "--no-gpg-sign", "-m", message], cwd=repo)
    if tag:
        run_ok(["git", "tag", tag], cwd=repo)


def test_update_applies_new_template_version_and_changed_answer(
    template_src, tmp_path, monkeypatch
):
    for name, value in GIT_IDENTITY.items():
        monkeypatch.setenv(name, value)
    template = tmp_path / "template-repo"
    shutil.copytree(template_src, template)
    commit_all(template, "v1", tag="v1.0.0")

    project = tmp_path / "project"
    copier.run_copy(str(template), project, defaults=True, unsafe=True, quiet=True)
    assert read_answers(project)["_commit"] == "v1.0.0"
    commit_all(project, "render v1")

    gitignore = template / "template" / ".gitignore"
    gitignore.write_text(gitignore.read_text() + "added-in-v2/\n")
    commit_all(template, "v2", tag="v2.0.0")

    copier.run_update(
        project,
        data={"license": "Apache-2.0"},
        defaults=True,
        overwrite=True,
        unsafe=True,
        quiet=True,
    )
    answers = read_answers(project)
    assert answers["_commit"] == "v2.0.0"
    assert answers["license"] == "Apache-2.0"
    assert "Version 2.0, January 2004" in (project / "LICENSE").read_text()
    assert "added-in-v2/" in (project / ".gitignore").read_text()
    conflicts = [p.name for p in project.rglob("*") if p.is_file() and p.suffix == ".rej"]
    assert not conflicts
