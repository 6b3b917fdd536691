"""The questionnaire: validators, derived defaults, and the real command line."""

import sys
import tomllib

import copier
import pytest
from helpers import read_answers, run_ok


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        ({"package_name": "my-pkg"}, "'my-pkg' is not a valid Python package name"),
        ({"package_name": "1abc"}, "'1abc' is not a valid Python package name"),
        ({"package_name": "class"}, "'class' is a Python keyword"),
        ({"package_name": "torch"}, "a dependency or a project folder"),
        ({"package_name": "train"}, "a dependency or a project folder"),
        # src/ comes first on sys.path: these hid the standard library, a dependency, a test helper.
        *(
            ({"package_name": name}, f"'{name}' is a Python keyword, or the name of a standard-")
            for name in ["copy", "logging", "json", "site", "yaml", "optuna", "mistakes"]
        ),
        # They pass a Python name's pattern, but make a project name pip refuses ("-", "--init--").
        ({"package_name": "_"}, "is not a valid Python package name"),
        ({"package_name": "__init__"}, "is not a valid Python package name"),
        ({"author_email": "not-an-email"}, "'not-an-email' is not an e-mail address"),
        ({"author_email": "a b@example.com"}, "is not an e-mail address"),
        # Accepted once, then refused by pip install (setuptools' e-mail check).
        ({"author_email": "a@b"}, "is not an e-mail address that packaging accepts"),
        ({"author_email": "a,b@c.d"}, "is not an e-mail address that packaging accepts"),
        ({"author_name": "  "}, "The author name must not be empty"),
        ({"project_name": "   "}, "The project name must not be empty"),
        ({"python_version": "3.9"}, "Invalid choice for 'python_version'"),
        ({"tasks": []}, "Choose at least one task"),
        ({"tasks": ["text_classification", "ner"]}, "Invalid choice"),
        ({"package_name": "evaluate"}, "a dependency or a project folder"),
    ],
    ids=lambda value: str(value) if isinstance(value, dict) else "",
)
def test_invalid_answer_is_rejected(template_src, tmp_path, answers, message):
    dst = tmp_path / "project"
    with pytest.raises(ValueError, match=message) as error:
        copier.run_copy(
            str(template_src), dst, data=answers, defaults=True, unsafe=True, quiet=True
        )
    assert next(iter(answers)) in str(error.value)  # the message names the question
    assert not dst.exists()  # nothing was rendered


def test_package_name_is_derived_from_project_name(render):
    project = render(project_name="My Cool Project!")
    assert read_answers(project)["package_name"] == "my_cool_project"
    assert (project / "src" / "my_cool_project").is_dir()


def test_cli_copy_with_defaults_asks_nothing(template_src, tmp_path):
    dst = tmp_path / "project"
    command = [sys.executable, "-m", "copier", "copy", "--defaults", "--trust", template_src, dst]
    run_ok(command, cwd=tmp_path, timeout=300)  # stdin is closed: a question would fail
    assert read_answers(dst)["package_name"] == "my_research_project"
    assert (dst / "pyproject.toml").is_file()


def test_text_answers_with_quotes_and_characters_past_the_basic_plane_make_valid_toml(render):
    """tojson wrote an emoji as a JSON surrogate pair, which TOML refuses: pip, ruff and pytest
    could not read pyproject.toml."""
    description, author = 'Fast 🚀 models, "quoted" and \\ a backslash', "Zoë 研究"
    project = render(description=description, author_name=author)
    metadata = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    assert metadata["description"] == description and metadata["authors"][0]["name"] == author
