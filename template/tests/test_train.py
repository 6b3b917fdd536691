"""The training entry point end to end: the command line, the exported model, resume."""

import json
import math
import os

import pytest
import torch
import yaml
from conftest import TASKS, run_in_process, toy_model
from safetensors.torch import load_file


def test_default_command_line_trains_evaluates_checkpoints_and_exports(pkg, make_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    overrides = ["trainer.max_steps=30", "trainer.eval_every_n_steps=15", "checkpoint.every_n_steps=10"]
    # The project's tracker, where it is installed (`pip install -e .` installs it; the template's own suite does not
    # install wandb, mlflow or aim, and train.py refuses a tracker that is not installed).
    if make_config().trainer.log_with not in pkg.loop.installed_trackers():
        overrides.append("trainer.log_with=none")
    # The real train.py in this process (a new interpreter proves nothing more here: the SIGKILL test of
    # test_checkpoints.py and the two-process test run train.py in processes of their own).
    code, output = run_in_process("train.py", [*overrides, f"hydra.run.dir={run_dir}"], capsys)
    assert code == 0, output[-4000:]
    assert "validation " in output
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 30 and math.isfinite(metrics["metrics"][metrics["monitor"]])
    # keep=latest with keep_count=2: the two newest of steps 10, 20, 30
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000020", "step_00000030"]
    assert (run_dir / "model" / "model.safetensors").is_file()
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    if config["trainer"]["log_with"] == "tensorboard":  # curves and hyperparameters, under the run folder
        assert list((run_dir / config["trainer"]["tracker_project"]).rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("accumulation", [1, 2, 3])  # 3: cycles span epoch ends
def test_resume_mid_epoch_matches_an_uninterrupted_run_bit_for_bit(
    pkg, make_config, toy_overrides, tmp_path, accumulation
):
    # The tiny random model (dropout on) rather than the saved one: resume must restore RNG states too.
    overrides = [o for o in toy_overrides if not o.startswith("model.")] + [
        "trainer.max_steps=12",
        "checkpoint.every_n_steps=5",
        "scheduler=linear",
        "scheduler.warmup_steps=3",
        f"trainer.gradient_accumulation_steps={accumulation}",
    ]
    full = pkg.loop.train(make_config(*overrides), tmp_path / "full")

    # Step 5 is mid-epoch: 4 batches per epoch, so batch 5 * accumulation is not an epoch boundary.
    step_5 = tmp_path / "full" / "checkpoints" / "step_00000005"
    resumed = pkg.loop.train(make_config(*overrides, f"resume='{step_5}'"), tmp_path / "resumed")
    assert resumed["losses"] == full["losses"][5:]
    final, final_resumed = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("full", "resumed"))
    assert all(torch.equal(final[name], final_resumed[name]) for name in final)

    latest = pkg.loop.train(make_config(*overrides, "resume=latest"), tmp_path / "full")
    assert latest["losses"] == full["losses"][10:]


def test_a_run_shorter_than_the_logging_interval_logs_its_last_step(pkg, make_config, toy_overrides, tmp_path, caplog):
    # trainer.log_every_n_steps=10 (the default) and 5 steps: no training loss or throughput at all, without a word.
    caplog.set_level("INFO")
    pkg.loop.train(make_config(*toy_overrides, "trainer.max_steps=5"), tmp_path)
    assert "data: train 32 examples (data.files.train=" in caplog.text  # what it trained on, in its log
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (trained,) = [line for line in lines if "train/loss" in line]
    assert trained["step"] == 5 and math.isfinite(trained["train/loss"]) and trained["perf/examples_per_s"] > 0


def test_the_logged_training_loss_is_the_mean_of_the_steps_since_the_last_log(
    pkg, make_config, toy_overrides, tmp_path
):
    # As the transformers Trainer logs it: one step's loss alone drew a noisier curve under the same name.
    result = pkg.loop.train(make_config(*toy_overrides, "trainer.max_steps=6", "trainer.log_every_n_steps=3"), tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = result["losses"]
    expected = [sum(losses[:3]) / 3, sum(losses[3:]) / 3]
    assert [line["train/loss"] for line in lines if "train/loss" in line] == pytest.approx(expected, rel=1e-12)


def test_resume_from_a_folder_that_is_not_a_checkpoint_says_so(pkg, make_config, toy_overrides, tmp_path):
    with pytest.raises(pkg.checkpoints.CorruptCheckpointError, match="is not a complete checkpoint"):
        pkg.loop.train(make_config(*toy_overrides, f"resume='{tmp_path}'"), tmp_path / "run")


def test_missing_data_file_names_the_key(pkg, make_config, toy_overrides, tmp_path):
    missing = tmp_path / "missing.csv"
    with pytest.raises(pkg.data.DataError, match="data.files.train: no such file"):
        pkg.loop.train(make_config(*toy_overrides, f"data.files.train='{missing}'"), tmp_path / "run")


def test_relative_paths_are_read_from_where_the_command_ran_also_with_hydra_job_chdir(
    toy_overrides, tmp_path, monkeypatch, capsys
):
    """hydra.job.chdir=true starts the run inside its run folder: the data, model, resume and checkpoint paths that
    were given relative to where the command ran must still be found (they were "no such file")."""
    toy = toy_model(toy_overrides).parent  # the toy's model folder and data files
    monkeypatch.chdir(toy)
    relative = [override.replace(f"{toy}/", "") for override in toy_overrides]
    assert relative != toy_overrides
    run = os.path.relpath(tmp_path / "run", toy)  # ../../<this test's folder>/run
    common = [*relative, "hydra.job.chdir=true", "trainer.max_steps=4", "checkpoint.every_n_steps=2"]
    for script, args in [
        ("train.py", [f"hydra.run.dir={run}"]),
        ("train.py", [f"resume={run}/checkpoints/step_00000002", f"hydra.run.dir={tmp_path / 'resumed'}"]),
        ("evaluate.py", [f"checkpoint_path={run}/checkpoints/step_00000004", f"hydra.run.dir={tmp_path / 'scored'}"]),
    ]:
        code, output = run_in_process(script, [*common, *args], capsys)
        assert code == 0, output[-3000:]
    trained, resumed = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("run", "resumed"))
    assert all(torch.equal(trained[name], resumed[name]) for name in trained)


@pytest.mark.parametrize("task", TASKS)
def test_a_training_file_with_a_column_the_validation_file_lacks_trains(pkg, make_config, toys, tmp_path, task):
    """Each split is prepared with its own columns. An extra column in one file (an id; pandas' index, which a parquet
    file written from a shuffled DataFrame holds as __index_level_0__) was a ValueError traceback: `Column to remove
    ['__index_level_0__'] not in the dataset`, the training split's columns removed from every split."""
    train = pkg.data.load_raw(make_config(*toys(task)).data, {})["train"]
    train.add_column("__index_level_0__", list(range(len(train)))).to_parquet(tmp_path / "train.parquet")
    train.to_parquet(tmp_path / "validation.parquet")  # files, both: an image folder and a file do not mix
    files = [f"data.files.{split}={tmp_path / split}.parquet" for split in ("train", "validation")]
    cfg = make_config(*toys(task), *files, "trainer.max_steps=2")
    assert pkg.loop.train(cfg, tmp_path / "run")["step"] == 2


@pytest.mark.parametrize("form", ["a DatasetDict by name", "a Dataset by name", "a Dataset per split"])
def test_a_dataset_saved_with_save_to_disk_trains(pkg, make_config, toy_overrides, tmp_path, form):
    """What a preprocessing script leaves, a folder of datasets' save_to_disk: by data.name (a DatasetDict; a Dataset
    alone is the train split) or per split by data.files. A traceback before: `Instruction "train" corresponds to no
    data`, `You are trying to load a dataset that was saved using save_to_disk`."""
    raw = pkg.data.load_raw(make_config(*toy_overrides).data, {})
    if form == "a DatasetDict by name":
        raw.save_to_disk(tmp_path / "saved")
        data = [f"data.name={tmp_path / 'saved'}", "data.files=null"]
        as_files = [f"data.files.{split}={tmp_path / 'saved'}" for split in ("train", "validation")]
        with pytest.raises(pkg.data.DataError, match="holds the splits .* of a DatasetDict .*: give data.name="):
            pkg.loop.train(make_config(*toy_overrides, *as_files), tmp_path / "files")
    elif form == "a Dataset by name":
        raw["train"].save_to_disk(tmp_path / "saved")
        data = [f"data.name={tmp_path / 'saved'}", "data.files=null", "data.eval_fraction=0.25"]
    else:
        for split in ("train", "validation"):
            raw[split].save_to_disk(tmp_path / split)
        data = [f"data.files.{split}={tmp_path / split}" for split in ("train", "validation")]
    cfg = make_config(*toy_overrides, *data, "trainer.max_steps=2")
    assert pkg.loop.train(cfg, tmp_path / "run")["step"] == 2


def test_a_multirun_goes_on_past_a_failed_job_and_a_refused_job_leaves_the_run_it_found(
    toy_overrides, tmp_path, capsys
):
    """A failed job's SystemExit ended the whole grid; a job of another mixed precision than the one before it failed
    on Accelerate's state; a refused job's .hydra files replaced those of the finished run in its folder."""
    grid = ["trainer.mixed_precision=bf16,no", "checkpoint.monitor=loss,nonsense", "trainer.max_steps=1"]
    code, output = run_in_process("train.py", ["-m", *toy_overrides, *grid, f"hydra.sweep.dir={tmp_path}"], capsys)
    assert code == 1, output
    assert output.count("checkpoint.monitor=nonsense is not a metric") == 2, output
    assert output.rstrip().endswith(f"Error: 2 job(s) failed, each said why above: {tmp_path / '1'}, {tmp_path / '3'}")
    assert [(tmp_path / job / "metrics.json").is_file() for job in "0123"] == [True, False, True, False]
    assert "checkpoint.monitor=nonsense is not a metric" in (tmp_path / "1" / "train.log").read_text()  # why it ended
    record = {path: path.read_bytes() for path in (tmp_path / "0" / ".hydra").iterdir()}
    code, output = run_in_process(
        "train.py", ["-m", *toy_overrides, "trainer.max_steps=2", f"hydra.sweep.dir={tmp_path}"], capsys
    )
    assert code == 1 and "holds another run" in output, output
    assert {path: path.read_bytes() for path in (tmp_path / "0" / ".hydra").iterdir()} == record
