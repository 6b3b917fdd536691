"""scripts/demo.py replaces only the folder it made; it once replaced any rendered project."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"


def test_demo_does_not_replace_a_project_it_did_not_make(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("demo", SCRIPT)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    project = tmp_path / "my-project"  # rendered by copier copy, and worked in since
    (project / "outputs" / "run").mkdir(parents=True)
    (project / ".copier-answers.yml").write_text("_src_path: somewhere\n")
    (project / "outputs" / "run" / "model.safetensors").write_text("weights")
    with pytest.raises(SystemExit) as stop:
        demo.main(["--dest", str(project)])
    assert stop.value.code == 2 and "was not made by scripts/demo.py" in capsys.readouterr().err
    assert (project / "outputs" / "run" / "model.safetensors").read_text() == "weights"
