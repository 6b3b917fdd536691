"""What every run records for comparisons (metrics.jsonl) and report.py's table and curves, from real run folders:
a `python train.py -m` multirun of the toy run at three learning rates, run as a user would (in this process)."""

import csv
import importlib
import json
import math
import shutil
import sys

import matplotlib.image
import pytest
import torch
import yaml
from conftest import PACKAGE, TASKS, run_in_process

LEARNING_RATES = ["1e-4", "1e-3", "1e-2"]
STEPS = [
    "trainer.max_steps=12",
    "trainer.log_every_n_steps=2",
    "trainer.eval_every_n_steps=4",
    "checks.enabled=false",
]


@pytest.fixture
def multirun(toy_overrides, tmp_path, capsys):
    """A multirun folder of three toy runs that differ only in the learning rate."""
    folder = tmp_path / "multirun"
    toy = [override for override in toy_overrides if not override.startswith("optimizer.lr=")]
    lrs = f"optimizer.lr={','.join(LEARNING_RATES)}"
    code, output = run_in_process("train.py", ["-m", *toy, *STEPS, lrs, f"hydra.sweep.dir={folder}"], capsys)
    assert code == 0, output
    return folder


def lines_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def eval_metrics(line: dict) -> dict:
    """The metrics of an evaluation's line of metrics.jsonl, named as metrics.json names them."""
    return {key.removeprefix("eval/"): value for key, value in line.items() if key.startswith("eval/")}


def test_a_run_that_ends_between_evaluations_evaluates_its_final_model(pkg, make_config, toy_overrides, tmp_path):
    result = pkg.loop.train(make_config(*toy_overrides, *STEPS, "trainer.max_steps=6"), tmp_path)
    evals = [line for line in lines_of(tmp_path) if "eval/loss" in line]
    assert [line["step"] for line in evals] == [4, 6] and result["metrics"] == eval_metrics(evals[-1])


def check_metrics_file(run_dir):
    """The lines of one toy run (lr 1e-4) of the multirun: training steps, evaluations, the summary last."""
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    lines = lines_of(run_dir)
    train = [line for line in lines if "train/loss" in line]
    evals = [line for line in lines if "eval/loss" in line]
    assert [line["step"] for line in train] == list(range(2, 13, 2))
    # every 4 steps; the run ends on step 12's evaluation, so the exported model is not evaluated twice
    assert [line["step"] for line in evals] == [4, 8, 12]
    for line in train:
        assert line["train/lr"] == pytest.approx(1e-4) and math.isfinite(line["train/loss"])
        # examples/s times s/step is the examples of one optimizer step: the batch (the toy has whole batches only)
        examples_per_step = config["data"]["batch_size"] * config["trainer"]["gradient_accumulation_steps"]
        assert line["perf/examples_per_s"] * line["perf/seconds_per_step"] == pytest.approx(examples_per_step)
        assert 0 <= line["perf/data_wait_fraction"] <= 1
        assert line["perf/peak_rss_gb"] > 0  # on CPU the process's peak resident set size
        assert line["elapsed"] >= 0 and line["time"] > 0
    assert lines[-1]["summary"] == json.loads((run_dir / "metrics.json").read_text())
    assert lines[-1]["summary"]["mode"] in ("min", "max")
    assert lines[-1]["summary"]["metrics"] == eval_metrics(evals[-1])


def test_runs_record_metrics_and_report_compares_them(multirun, tmp_path, capsys):
    check_metrics_file(multirun / "0")

    out = tmp_path / "report"
    code, output = run_in_process("report.py", [str(multirun), "--out", str(out)], capsys)
    assert code == 0, output

    # What the runs wrote, read here on their own: the monitored metric and its best value in each run.
    summaries = {run: lines_of(multirun / run)[-1]["summary"] for run in ("0", "1", "2")}
    monitor, mode = summaries["0"]["monitor"], summaries["0"]["mode"]
    pick = min if mode == "min" else max
    best = {
        run: pick(line[f"eval/{monitor}"] for line in lines_of(multirun / run) if f"eval/{monitor}" in line)
        for run in summaries
    }
    expected_order = sorted(best, key=lambda run: best[run] if mode == "min" else -best[run])

    assert f"3 runs by {monitor}" in output
    header = next(i for i, line in enumerate(output.splitlines()) if line.startswith("run ("))
    rows = output.splitlines()[header + 1 : header + 4]
    assert [row.split()[0] for row in rows] == expected_order  # best first
    lr_of_run = dict(zip("012", LEARNING_RATES))
    for row in rows:
        run = row.split()[0]
        # The config that differs is the learning rate and nothing else.
        assert row.split()[1] == f"optimizer.lr={float(lr_of_run[run])}"
        assert f"{best[run]:.4g}" in row and " 12 " in row and row.endswith("done")

    with (out / "report.csv").open() as file:
        written = list(csv.DictReader(file))
    assert [row["run"] for row in written] == expected_order
    assert [float(row["best"]) for row in written] == [best[run] for run in expected_order]
    assert all(float(row["examples_per_s"]) > 0 and float(row["peak_memory_gb"]) > 0 for row in written)

    image = matplotlib.image.imread(out / "curves.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300

    # Run folders and sweep folders together, each run once; a single run shows its overrides.
    args = [str(multirun / "1"), str(multirun), "--out", str(out)]  # run 1 twice: counted once
    code, output = run_in_process("report.py", args, capsys)
    assert code == 0, output
    assert "3 runs by" in output

    code, output = run_in_process("report.py", [str(multirun / "2"), "--out", str(out)], capsys)
    assert code == 0, output
    assert "1 runs by" in output
    with (out / "report.csv").open() as file:
        assert "optimizer.lr=0.01" in next(csv.DictReader(file))["config"]  # a single run: its overrides

    # Runs whose files were written over are left out by name; the others are reported.
    (multirun / "1" / ".hydra" / "overrides.yaml").write_text("- [optimizer.lr\n")
    (multirun / "2" / "metrics.jsonl").write_bytes(b"\xff\xfe binary")
    code, output = run_in_process("report.py", [str(multirun), "--out", str(out)], capsys)
    assert code == 0 and "1 runs by" in output and "Traceback" not in output, output
    assert f"left out, unreadable: {multirun / '1' / '.hydra' / 'overrides.yaml'} is not valid YAML (" in output
    assert f"{multirun / '2' / 'metrics.jsonl'} is not UTF-8 text" in output
    code, output = run_in_process("report.py", [str(multirun / "1"), "--out", str(out)], capsys)
    assert code == 2 and "report.py: no run can be read: " in output and "Traceback" not in output, output


def test_report_on_a_folder_without_runs_says_what_a_run_folder_is(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, output = run_in_process("report.py", [str(tmp_path / "empty"), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "no run folder in it (a run folder holds .hydra/config.yaml and metrics.jsonl" in output
    assert "Traceback" not in output and not (tmp_path / "r").exists()

    code, output = run_in_process("report.py", [str(tmp_path / "missing")], capsys)
    assert code == 2 and "missing: no such folder" in output
    (tmp_path / "metrics.json").write_text("{}")  # a run's file, given instead of its folder
    code, output = run_in_process("report.py", [str(tmp_path / "metrics.json")], capsys)
    assert code == 2 and "metrics.json: a file, not a folder of runs" in output
    code, output = run_in_process("report.py", [str(tmp_path), "--out", str(tmp_path / "metrics.json")], capsys)
    assert code == 2 and "metrics.json is a file; give a folder for report.csv" in output
    assert (tmp_path / "metrics.json").read_text() == "{}"


@pytest.mark.skipif(len(TASKS) < 2, reason="needs a project with two tasks or more")
def test_runs_of_several_tasks_get_a_table_each_by_their_own_metric(toys, tmp_path, capsys):
    # One outputs/ folder holds every task's runs; their metrics differ, so one table would compare nothing.
    for task in TASKS[:2]:
        args = [
            *toys(task),
            "trainer.max_steps=2",
            "checks.enabled=false",
            f"hydra.run.dir={tmp_path / 'outputs' / task}",
        ]
        assert run_in_process("train.py", args, capsys)[0] == 0
    out = tmp_path / "report"
    code, output = run_in_process("report.py", [str(tmp_path / "outputs"), "--out", str(out)], capsys)
    assert code == 0, output
    for task in TASKS[:2]:
        monitor = json.loads((tmp_path / "outputs" / task / "metrics.json").read_text())["monitor"]
        assert f"task {task}:\n1 runs by {monitor}" in output
        with (out / task / "report.csv").open() as file:
            (row,) = csv.DictReader(file)
        assert row["best"] not in ("", None)  # each run is compared by a metric it has
        assert (out / task / "curves.png").is_file()


@pytest.mark.parametrize("task", TASKS)
def test_every_task_logs_throughput_and_tokens_when_it_reads_tokens(task, toys, pkg, make_config, tmp_path):
    cfg = make_config(*toys(task), "trainer.max_steps=4", "trainer.log_every_n_steps=2", "checks.enabled=false")
    pkg.loop.train(cfg, tmp_path / "run")
    train = [line for line in lines_of(tmp_path / "run") if "train/loss" in line]
    assert [line["step"] for line in train] == [2, 4]

    task_object = pkg.config.build_task(cfg.task)
    batch = task_object.collate([task_object.load(cfg.data, cfg.model, 0)["train"][0]])
    for line in train:
        assert line["perf/examples_per_s"] > 0 and line["perf/seconds_per_step"] > 0
        if "input_ids" in batch:  # every example holds at least one token
            assert line["perf/tokens_per_s"] >= line["perf/examples_per_s"]
        else:
            assert "perf/tokens_per_s" not in line


def test_a_resumed_run_counts_each_step_once_the_later_line_winning(pkg, toy_overrides, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [
        *toy_overrides,
        *STEPS[1:3],
        "trainer.max_steps=8",
        "checkpoint.every_n_steps=4",
        f"hydra.run.dir={run_dir}",
    ]
    assert run_in_process("train.py", args, capsys)[0] == 0
    # Preempted after logging step 8, before its checkpoint and export: resumed from step 4, it logs 6 and 8 again.
    shutil.rmtree(run_dir / "checkpoints" / "step_00000008")
    shutil.rmtree(run_dir / "model")
    (run_dir / "metrics.json").unlink()
    code, output = run_in_process("train.py", [*args, "resume=latest"], capsys)
    assert code == 0, output

    lines = lines_of(run_dir)
    assert [line["step"] for line in lines if "train/loss" in line] == [2, 4, 6, 8, 6, 8]
    run = pkg.runs.load_run(run_dir)
    assert [line["step"] for line in run.train] == [2, 4, 6, 8]
    assert run.train[2:] == [line for line in lines if "train/loss" in line][4:]  # the resumed run's lines
    assert [step for step, _ in run.metric("loss")] == [4, 8]
    assert run.summary == json.loads((run_dir / "metrics.json").read_text())
    # Its seconds add those of the run it resumed, up to the checkpoint (they were the last process's alone).
    resumed = pkg.checkpoints.read_record(run_dir / "checkpoints" / "step_00000004")["trainer"]
    assert 0 < resumed["train_seconds"] < run.summary["train_seconds"], (resumed, run.summary)
    assert resumed["run_seconds"] < run.summary["run_seconds"]


def test_unfinished_runs_are_ranked_by_their_monitored_metric_where_they_stand(toy_overrides, tmp_path, capsys):
    runs = tmp_path / "runs"
    # One run diverged at step 2 (its last line says what stopped it); one still runs, its lines up to step 6 of 12.
    diverged = ["trainer.log_every_n_steps=1", "optimizer.lr=1e30", "trainer.max_grad_norm=0"]
    args = [*toy_overrides, *STEPS, *diverged, f"hydra.run.dir={runs / 'diverged'}"]
    code, output = run_in_process("train.py", args, capsys)
    assert code == 1 and "step 2: the training loss is nan" in output, output
    assert run_in_process("train.py", [*toy_overrides, *STEPS, f"hydra.run.dir={runs / 'running'}"], capsys)[0] == 0
    (runs / "running" / "metrics.json").unlink()
    lines = lines_of(runs / "running")
    (runs / "running" / "metrics.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines if line["step"] <= 6)
    )

    # The first line of a run names what it is judged by: the task's main metric here, not the validation loss.
    start = lines[0]
    assert set(start) == {"step", "time", "monitor", "mode", "config"} and start["step"] == 0
    assert start["config"]["trainer"]["max_steps"] == 12  # resolved: the numbers, not the interpolations
    assert start["monitor"] != "loss"
    code, output = run_in_process("report.py", [str(runs), "--out", str(tmp_path / "report")], capsys)
    assert code == 0, output
    assert f"2 runs by {start['monitor']}" in output
    with (tmp_path / "report" / "report.csv").open() as file:
        rows = {row["run"]: row for row in csv.DictReader(file)}
    assert list(rows) == ["running", "diverged"]  # the run without an evaluation last
    running = [line for line in lines if line["step"] <= 6]
    (evaluation,) = [line for line in running if "eval/loss" in line]  # step 4's
    assert float(rows["running"]["best"]) == evaluation[f"eval/{start['monitor']}"]
    # Where each run stands: the training time of its latest line, and the step of its last line (the stop).
    assert rows["running"]["steps"] == "6" and float(rows["running"]["wall_s"]) == running[-1]["elapsed"]
    stop = lines_of(runs / "diverged")[-1]
    assert stop["stopped_by"] == "NonFiniteLossError" and rows["diverged"]["steps"] == str(stop["step"]) == "2"


def test_runs_in_different_folders_given_by_relative_paths_show_their_common_folder(
    toy_overrides, tmp_path, capsys, monkeypatch
):
    for name in ("a", "b"):
        args = [*toy_overrides, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / name / 'run'}"]
        assert run_in_process("train.py", args, capsys)[0] == 0
    monkeypatch.chdir(tmp_path)
    code, output = run_in_process("report.py", ["a/run", "b/run", "--out", "report"], capsys)
    assert code == 0 and "Traceback" not in output, output
    header = next(line for line in output.splitlines() if line.startswith("run ("))
    assert header.startswith("run (in .)"), header  # not "(in )": relative paths share no prefix
    with (tmp_path / "report" / "report.csv").open() as file:
        assert sorted(row["run"] for row in csv.DictReader(file)) == ["a/run", "b/run"]


@pytest.mark.skipif(sys.platform != "linux", reason="Linux resets the peak resident set size; elsewhere it stays")
def test_each_run_in_one_process_reports_its_own_peak_memory():
    # A sweep's trials and rank_check's runs train in one process: each run's peak, not the largest one before it.
    metrics_log = importlib.import_module(f"{PACKAGE}.metrics_log")
    cpu = torch.device("cpu")
    large = b"\x01" * 400 * 2**20  # every page written: resident
    during = metrics_log.peak_memory(cpu)["perf/peak_rss_gb"]
    del large
    assert metrics_log.peak_memory(cpu)["perf/peak_rss_gb"] == during  # a peak stays after the memory is freed
    metrics_log.reset_peak_memory(cpu)
    assert metrics_log.peak_memory(cpu)["perf/peak_rss_gb"] < during - 0.3


def test_report_compares_resolved_configs_ranks_each_metric_apart_and_passes_over_evaluations(
    toy_overrides, tmp_path, capsys, monkeypatch
):
    """.hydra/config.yaml keeps ${oc.env:...} as written: two seeds showed no config that differs. A run judged by
    another metric was ranked by the first run's. evaluate.py's folders were listed as runs that failed."""
    runs = tmp_path / "runs"
    for seed in (1, 2):
        monkeypatch.setenv("PICKED_SEED", str(seed))
        args = [*toy_overrides, *STEPS, "trainer.seed=${oc.env:PICKED_SEED}", f"hydra.run.dir={runs / f'seed{seed}'}"]
        assert run_in_process("train.py", args, capsys)[0] == 0
    args = [*toy_overrides, *STEPS, "checkpoint.monitor=loss", f"hydra.run.dir={runs / 'by_loss'}"]
    assert run_in_process("train.py", args, capsys)[0] == 0
    main_metric = json.loads((runs / "seed1" / "metrics.json").read_text())["monitor"]
    args = [*toy_overrides, f"model.name_or_path={runs / 'seed1' / 'model'}", f"hydra.run.dir={runs / 'evaluated'}"]
    assert run_in_process("evaluate.py", args, capsys)[0] == 0

    code, output = run_in_process("report.py", [str(runs), "--out", str(tmp_path / "report")], capsys)
    assert code == 0, output
    assert f", runs judged by {main_metric}:\n2 runs by {main_metric}" in output, output
    assert ", runs judged by loss:\n1 runs by loss" in output, output
    assert "trainer.seed=1" in output and "trainer.seed=2" in output, output
    assert "no metrics.jsonl" not in output and "evaluated" not in output, output
