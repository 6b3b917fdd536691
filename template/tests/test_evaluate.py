"""evaluate.py: an exported model or a checkpoint evaluates to the metrics training reported, for every task, with
one prediction per example."""

import json
import shutil

import pytest
import torch
from conftest import TASKS, reset_accelerate_state, run_in_process, toy_model
from safetensors.torch import load_file


def read_predictions(run_dir) -> list:
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", TASKS)
def test_exported_model_and_checkpoint_evaluate_to_what_training_reported(pkg, make_config, toys, tmp_path, task):
    overrides = [*toys(task), "trainer.max_steps=6", "checkpoint.every_n_steps=6"]
    trained = pkg.loop.train(make_config(*overrides), tmp_path / "train")

    reset_accelerate_state()
    exported = [*overrides, f"model.name_or_path='{tmp_path / 'train' / 'model'}'"]
    result = pkg.loop.evaluate_saved(make_config(*exported, config_name="evaluate"), tmp_path / "exported")
    assert result["metrics"] == trained["metrics"]  # the same model on the same data: the same numbers
    assert json.loads((tmp_path / "exported" / "metrics.json").read_text())["metrics"] == trained["metrics"]
    assert len(read_predictions(tmp_path / "exported")) == trained["metrics"]["examples"]

    reset_accelerate_state()
    checkpoint = tmp_path / "train" / "checkpoints" / "step_00000006"
    # Only the data (and no tracker, as in every toy run) comes from the command line: the task and model configs are
    # the checkpoint's own.
    data = [o for o in overrides if o.startswith("data")] + ["trainer.log_with=none"]
    from_checkpoint = make_config(f"checkpoint_path='{checkpoint}'", *data, config_name="evaluate")
    result = pkg.loop.evaluate_saved(from_checkpoint, tmp_path / "checkpoint")
    assert result["metrics"] == trained["metrics"]
    assert read_predictions(tmp_path / "checkpoint") == read_predictions(tmp_path / "exported")


@pytest.mark.parametrize("task", TASKS)
def test_an_export_evaluates_with_the_seed_and_task_settings_it_was_trained_with(
    pkg, make_config, toys, tmp_path, task
):
    """evaluate.py given the model folder and the data only: the run's seed, which drew its held-out validation split
    (the command's default drew other rows, most of them trained on), the run's task.* settings and its mixed
    precision (bf16 changed the last digits of every metric) come with the export."""
    overrides = [*toys(task), "~data.files.validation", "trainer.seed=7", "trainer.max_steps=6"]
    overrides.append("trainer.mixed_precision=bf16")
    trained = pkg.loop.train(make_config(*overrides), tmp_path / "train")

    reset_accelerate_state()
    exported = f"model.name_or_path='{tmp_path / 'train' / 'model'}'"
    taken = ("task.", "trainer.seed", "trainer.mixed_precision", "model.name_or_path")
    command = [o for o in overrides if not o.startswith(taken)]
    result = pkg.loop.evaluate_saved(make_config(*command, exported, config_name="evaluate"), tmp_path / "evaluated")
    assert result["metrics"] == trained["metrics"]


@pytest.mark.parametrize("task", TASKS)
def test_a_saved_model_computes_in_memory_aligned_as_torch_aligns_its_own(pkg, make_config, toys, tmp_path, task):
    """from_pretrained leaves the weights 16 bytes off the 64-byte alignment of torch's own memory, and on a CPU the
    kernels then compute other last digits than the trained model did: a regression head's RMSE differed in the 9th
    digit, so its exported model did not evaluate to what training reported (the toys above happen to agree)."""
    model = pkg.loop.setup(make_config(*toys(task)), tmp_path / "setup").model
    assert toy_model(toys(task)).is_dir()  # the model of the toy run is a saved one
    tensors = [*model.named_parameters(), *model.named_buffers()]
    assert [name for name, tensor in tensors if tensor.data_ptr() % 64] == []


def test_evaluate_command_line_writes_metrics_and_predictions_into_its_own_folder(
    pkg, make_config, toy_overrides, tmp_path, capsys
):
    trained = pkg.loop.train(make_config(*toy_overrides), tmp_path / "train")
    reset_accelerate_state()
    run_dir = tmp_path / "evaluation"
    exported = f"model.name_or_path='{tmp_path / 'train' / 'model'}'"
    # The real evaluate.py in this process (test_distributed.py starts it in processes of their own).
    code, output = run_in_process("evaluate.py", [*toy_overrides, exported, f"hydra.run.dir={run_dir}"], capsys)
    assert code == 0, output[-4000:]
    assert json.loads((run_dir / "metrics.json").read_text())["metrics"] == trained["metrics"]
    assert (run_dir / "evaluate.log").is_file() and len(read_predictions(run_dir)) == trained["metrics"]["examples"]


@pytest.mark.skipif(len(TASKS) < 2, reason="needs a project with two tasks or more")
def test_a_checkpoint_of_another_task_than_the_default_names_the_task_to_add(
    pkg, make_config, toys, default_task, tmp_path
):
    other = next(task for task in TASKS if task != default_task)
    pkg.loop.train(make_config(*toys(other), "checkpoint.every_n_steps=2", "trainer.max_steps=2"), tmp_path / "run")
    reset_accelerate_state()
    checkpoint = f"checkpoint_path='{tmp_path / 'run' / 'checkpoints' / 'step_00000002'}'"
    # The default task, with its data (not the checkpoint's task): under `pytest --task X`, X.
    cfg = make_config(f"task={default_task}", checkpoint, "trainer.log_with=none", config_name="evaluate")
    with pytest.raises(pkg.data.DataError, match=f"holds a run of task={other}, .* add task={other} for the data"):
        pkg.loop.evaluate_saved(cfg, tmp_path / "evaluated")

    # Files are the data meant: their own mistake alone (the hint blamed a label the model does not know, say, on the
    # default task's data).
    files = [o for o in toys(other) if o.startswith("data")] + [f"data.files.validation={tmp_path / 'none.csv'}"]
    cfg = make_config(f"task={default_task}", checkpoint, *files, config_name="evaluate")
    with pytest.raises(pkg.data.DataError, match="no such file") as error:
        pkg.loop.evaluate_saved(cfg, tmp_path / "files")
    assert "checkpoint_path holds a run" not in str(error.value)


@pytest.mark.parametrize(
    "override, message",
    [("split=tset", "split=tset is not a split of this dataset"), ("checkpoint_path=/no/such", "no such folder")],
)
def test_evaluate_refuses_a_split_or_checkpoint_that_is_not_there(
    pkg, make_config, toy_overrides, tmp_path, override, message
):
    cfg = make_config(*toy_overrides, override, config_name="evaluate")
    with pytest.raises(pkg.config.ConfigError, match=message):
        pkg.loop.evaluate_saved(cfg, tmp_path)


def test_an_evaluation_refused_after_hydra_made_its_folder_leaves_no_folder(
    pkg, make_config, toy_overrides, tmp_path, capsys
):
    pkg.loop.train(make_config(*toy_overrides, "trainer.max_steps=2"), tmp_path / "train")
    reset_accelerate_state()
    exported = f"model.name_or_path='{tmp_path / 'train' / 'model'}'"
    args = [*toy_overrides, exported, "split=tset", f"hydra.run.dir={tmp_path / 'evaluation'}"]
    code, output = run_in_process("evaluate.py", args, capsys)
    assert code == 1 and "split=tset is not a split of this dataset" in output, output
    assert not (tmp_path / "evaluation").exists()  # not .hydra/, evaluate.log and run.lock of an evaluation never made


def test_a_model_folder_of_older_transformers_evaluates_like_its_safetensors_twin(
    pkg, make_config, toy_overrides, tmp_path
):
    """Before version 5, transformers saved pytorch_model.bin: such a folder loads and scores as the same model (the
    checks on a folder's weights read safetensors names and must not take a .bin folder for an empty one)."""
    saved = toy_model(toy_overrides)
    if not (saved / "config.json").is_file():
        pytest.skip("the toy's model is your own module, which transformers never saved as pytorch_model.bin")
    older = shutil.copytree(saved, tmp_path / "older")
    torch.save(load_file(older / "model.safetensors"), older / "pytorch_model.bin")
    (older / "model.safetensors").unlink()
    results = []
    for folder in (saved, older):
        reset_accelerate_state()
        cfg = make_config(*toy_overrides, f"model.name_or_path='{folder}'", config_name="evaluate")
        results.append(pkg.loop.evaluate_saved(cfg, tmp_path / f"evaluated_{len(results)}")["metrics"])
    assert results[0] == results[1]


def test_a_file_evaluates_alone_under_its_own_split_name(pkg, make_config, toy_overrides, tmp_path):
    """A test file needs no training file beside it, and split= takes its own name (test, here)."""
    pkg.loop.train(make_config(*toy_overrides), tmp_path / "run")
    model = f"model.name_or_path='{tmp_path / 'run' / 'model'}'"
    both = pkg.loop.evaluate_saved(make_config(*toy_overrides, model, config_name="evaluate"), tmp_path / "both")
    validation = make_config(*toy_overrides).data.files.validation
    files = ["~data.files.train", "~data.files.validation", f"+data.files.test='{validation}'"]
    alone = make_config(*toy_overrides, model, *files, "split=test", config_name="evaluate")
    result = pkg.loop.evaluate_saved(alone, tmp_path / "alone")
    assert result["split"] == "test" and result["metrics"] == both["metrics"]


@pytest.mark.parametrize("task", TASKS)
def test_model_config_not_applied_to_a_saved_model_is_named_unless_a_group_of_another_kind_brings_it(
    pkg, make_config, toys, tmp_path, caplog, task
):
    """A saved model keeps its config: model.config values that differ from it are named in a warning, yours too.
    Keys of a model group of another architecture (the task's default group beside a model of another kind) that
    the saved model has not are the group's: naming them was noise in every such evaluation."""
    if make_config(*toys(task)).model._target_ is not None:
        pytest.skip("the toy model is your own module: model.config builds it")
    group_of_xlnet = ["model.model_type=xlnet", "+model.config.mem_len=7"]  # no toy model is an XLNet
    own = ["+model.config.output_hidden_states=true", "+model.config.dropout_of_mine=0.3", *group_of_xlnet]
    pkg.loop.evaluate_saved(make_config(*toys(task), *own, config_name="evaluate"), tmp_path / "evaluated")
    assert "model.config not applied to the saved model" in caplog.text
    assert (
        "output_hidden_states=True (saved: False)" in caplog.text and "dropout_of_mine=0.3 (saved: None)" in caplog.text
    )
    assert "mem_len" not in caplog.text
