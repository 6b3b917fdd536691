import shutil
from collections.abc import Callable
from pathlib import Path

import copier
import pytest
from helpers import RENDERS, REPO


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory):
    """Keep Hugging Face libraries offline, with their caches in a temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        # One thread per rendered suite: with pytest-xdist, suites run side by side, one per core.
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        yield


@pytest.fixture(scope="session")
def template_src(tmp_path_factory) -> Path:
    """A copy of the working tree's template outside git.

    Given a git repository, Copier renders its latest tag (or HEAD), not the files on disk;
    rendering this copy makes every test see the template as it is being edited.
    """
    src = tmp_path_factory.mktemp("template-src")
    shutil.copy2(REPO / "copier.yml", src)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache")
    shutil.copytree(REPO / "template", src / "template", ignore=ignore)
    return src


@pytest.fixture(scope="session")
def render(template_src, tmp_path_factory) -> Callable[..., Path]:
    """render(**answers) -> the rendered project folder; each set of answers renders once."""
    cache: dict[tuple, Path] = {}

    def _render(**answers) -> Path:
        key = repr(sorted(answers.items()))  # answers may hold lists (tasks)
        if key not in cache:
            dst = tmp_path_factory.mktemp("project")
            copier.run_copy(
                str(template_src), dst, data=answers, defaults=True, unsafe=True, quiet=True
            )
            cache[key] = dst
        return cache[key]

    return _render


@pytest.fixture(params=list(RENDERS.values()), ids=list(RENDERS))
def project(request, render) -> Path:
    """The project rendered with each set of answers in RENDERS."""
    return render(**request.param)
