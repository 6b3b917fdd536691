"""sweep.py, run as a user would (in this process): an Optuna study of toy runs, each a run folder in the sweep's
folder; a pruner that provably prunes, a sweep that resumes where it stopped, and report.py on the sweep's folder."""

import importlib
import json

import optuna
import pytest
from conftest import PACKAGE, ForkedScript, run_in_process, wait_all

STEPS = [
    "trainer.max_steps=12",
    "trainer.eval_every_n_steps=4",
    "trainer.log_every_n_steps=2",
    "checks.enabled=false",  # the overfit_batch check fails at the tiny learning rates these trials use on purpose
    "checkpoint.monitor=loss",  # falls at every evaluation of a learning run, whatever the task
]
LR_ONLY = [  # the learning rate, from far too low to high; the default space's weight decay left out
    "sweep.params.optimizer.lr.low=1e-8",
    "sweep.params.optimizer.lr.high=1e-1",
    "~sweep.params.optimizer.weight_decay",
]


def lines_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def study_of(folder):
    return optuna.load_study(study_name="sweep", storage=f"sqlite:///{folder / 'study.db'}")


def sweep(folder, toy_overrides, capsys, *overrides):
    args = [*toy_overrides, *STEPS, *LR_ONLY, f"hydra.run.dir={folder}", *overrides]
    code, output = run_in_process("sweep.py", args, capsys)
    assert code == 0, output
    return output


def test_the_median_pruner_stops_trials_that_learn_nothing(toy_overrides, tmp_path, capsys):
    folder = tmp_path / "sweep"
    folder.mkdir()
    # Another client of the study's storage queues the trials in a known order (sweep.py joins the existing study):
    # two learning rates that learn, then two that barely move the weights.
    queue = optuna.create_study(study_name="sweep", storage=f"sqlite:///{folder / 'study.db'}", direction="minimize")
    for lr in (3e-3, 1e-2, 1e-8, 1e-7):
        queue.enqueue_trial({"optimizer.lr": lr})
    pruner = ["sweep.pruner=median", "sweep.n_startup_trials=2", "sweep.n_trials=4", "sweep.sampler=random"]
    output = sweep(folder, toy_overrides, capsys, *pruner)

    trials = study_of(folder).trials
    assert [trial.params["optimizer.lr"] for trial in trials] == [3e-3, 1e-2, 1e-8, 1e-7]
    assert [trial.state.name for trial in trials] == ["COMPLETE", "COMPLETE", "PRUNED", "PRUNED"]
    for trial in trials:  # each a run folder with its config and its metrics, as far as it ran
        run_dir = folder / f"trial_{trial.number:03d}"
        assert (run_dir / ".hydra" / "config.yaml").is_file()
        steps = [line["step"] for line in lines_of(run_dir) if "eval/loss" in line]
        if trial.state.name == "PRUNED":  # stopped at its first evaluation, worse than both finished trials there
            assert steps == [4] and not (run_dir / "metrics.json").exists()
            assert lines_of(run_dir)[-1]["stopped_by"] == "TrialPruned"
            finished_at_4 = [finished.intermediate_values[4] for finished in trials[:2]]
            assert trial.intermediate_values[4] > max(finished_at_4)
        else:
            assert steps == [4, 8, 12] and lines_of(run_dir)[-1]["summary"]["step"] == 12
    assert "PRUNED" in output and "best: trial" in output

    # report.py reads the sweep's folder like a multirun's: one row per trial, the learning rate as what differs.
    code, output = run_in_process("report.py", [str(folder), "--out", str(tmp_path / "report")], capsys)
    assert code == 0, output
    assert "4 runs by loss" in output and "no metrics.jsonl" not in output
    rows = output.splitlines()[2:6]
    finished = sorted((trial for trial in trials if trial.state.name == "COMPLETE"), key=lambda trial: trial.value)
    assert [row.split()[0] for row in rows[:2]] == [f"trial_{trial.number:03d}" for trial in finished]  # best first
    assert all("optimizer.lr=" in row for row in rows) and (tmp_path / "report" / "curves.png").is_file()
    assert [row.split()[-1] for row in rows] == ["done", "done", "TrialPruned", "TrialPruned"]


def test_a_trial_that_diverges_fails_in_one_line_and_the_sweep_goes_on(toy_overrides, tmp_path, capsys, caplog):
    folder = tmp_path / "sweep"
    folder.mkdir()
    queue = optuna.create_study(study_name="sweep", storage=f"sqlite:///{folder / 'study.db'}", direction="minimize")
    for lr in (1e30, 3e-3):  # the first gives a NaN loss at its second step
        queue.enqueue_trial({"optimizer.lr": lr})
    diverging = ["sweep.params.optimizer.lr.high=1e30", "trainer.max_grad_norm=0"]
    output = sweep(folder, toy_overrides, capsys, "sweep.n_trials=2", *diverging)  # two tries, failed or not

    assert [trial.state.name for trial in study_of(folder).trials] == ["FAIL", "COMPLETE"]
    assert "trial 0 failed: step 2: the training loss is nan" in output
    assert "Traceback" not in output and "best: trial 1" in output
    # Optuna's own log of the failure ("The value nan is not acceptable", or a traceback) stays out of the console.
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("optuna") and r.levelname == "WARNING"]


def test_a_trial_that_runs_out_of_memory_fails_in_one_line_and_the_sweep_goes_on(toy_overrides, tmp_path, capsys):
    folder = tmp_path / "sweep"
    own_module = [
        "model.name_or_path=null",
        "model.model_type=null",
        "model._target_=test_mistakes.ForwardThatRunsOutOfMemory",
    ]
    output = sweep(folder, toy_overrides, capsys, "sweep.n_trials=2", "checks.enabled=false", *own_module)

    assert [trial.state.name for trial in study_of(folder).trials] == ["FAIL", "FAIL"]
    assert "trial 0 failed: out of memory: " in output and "trial 1 failed: out of memory: " in output
    assert "Traceback" not in output


def test_a_sweep_folder_whose_study_is_no_database_says_so(tmp_path, capsys):
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "study.db").write_text("notes, not a database")
    code, output = run_in_process("sweep.py", [f"hydra.run.dir={folder}"], capsys)
    assert code == 1 and "Traceback" not in output, output
    assert f"the sweep's study in sqlite:///{folder / 'study.db'} cannot be opened: (sqlite3.DatabaseError)" in output
    assert (folder / "study.db").read_text() == "notes, not a database"


@pytest.mark.filterwarnings("ignore:Fixed parameter optimizer.lr")  # -1: out of range on purpose
def test_a_trial_whose_values_make_no_valid_run_fails_in_one_line_and_the_sweep_goes_on(
    toy_overrides, tmp_path, capsys
):
    folder = tmp_path / "sweep"
    folder.mkdir()
    queue = optuna.create_study(study_name="sweep", storage=f"sqlite:///{folder / 'study.db'}", direction="minimize")
    for lr in (-1.0, 3e-3):  # a queued value is tried as it is, outside the range too: -1 is no learning rate
        queue.enqueue_trial({"optimizer.lr": lr})
    fast = ["sweep.n_trials=2", "sweep.pruner=none", "trainer.max_steps=2"]
    output = sweep(folder, toy_overrides, capsys, *fast, "sweep.params.optimizer.lr.log=false")

    assert [trial.state.name for trial in study_of(folder).trials] == ["FAIL", "COMPLETE"]
    assert "trial 0 failed: invalid config: optimizer.lr=-1.0 is out of range" in output, output  # one line
    assert "Traceback" not in output and "best: trial 1" in output
    failed, complete = (line for line in output.splitlines() if line.lstrip().startswith(("0  FAIL", "1  COMPLETE")))
    assert "(failed: invalid config: optimizer.lr=-1.0 is out of range: it must be > 0)" in failed  # and why
    assert "(failed: " not in complete


@pytest.mark.filterwarnings("ignore:Fixed parameter optimizer.lr")  # -1: out of range on purpose
def test_three_trials_in_a_row_that_fail_the_same_way_stop_the_sweep(toy_overrides, tmp_path, capsys):
    folder = tmp_path / "sweep"
    folder.mkdir()
    queue = optuna.create_study(study_name="sweep", storage=f"sqlite:///{folder / 'study.db'}", direction="minimize")
    for lr in (-1.0, -1.0, -1.0, 3e-3):  # the same mistake three times: it would fail every trial after them too
        queue.enqueue_trial({"optimizer.lr": lr})
    linear = ["sweep.params.optimizer.lr.log=false", "sweep.pruner=none"]  # a log range holds no -1 at all
    args = [*toy_overrides, *STEPS, *LR_ONLY, *linear, f"hydra.run.dir={folder}", "sweep.n_trials=4"]
    code, output = run_in_process("sweep.py", args, capsys)
    assert code != 0 and "Traceback" not in output, output
    assert "3 trials in a row failed the same way, whatever their values: " in output
    assert "optimizer.lr=-1.0 is out of range" in output
    assert [trial.state.name for trial in study_of(folder).trials] == ["FAIL", "FAIL", "FAIL", "WAITING"]


def test_a_new_study_in_a_folder_of_another_studys_trials_is_refused(toy_overrides, tmp_path, capsys):
    folder = tmp_path / "sweep"
    fast = ["sweep.pruner=none", "sweep.sampler=random", "trainer.max_steps=2", "sweep.n_trials=1"]
    sweep(folder, toy_overrides, capsys, *fast)
    trial = folder / "trial_000"
    kept = {name: (trial / name).read_text() for name in (".hydra/overrides.yaml", "metrics.jsonl")}

    # Another study name, or the study's database deleted: the new study's trial 0 would be trial_000 again.
    args = [*toy_overrides, *STEPS, *LR_ONLY, *fast, f"hydra.run.dir={folder}"]
    code, output = run_in_process("sweep.py", [*args, "sweep.study_name=other"], capsys)
    assert code != 0 and "holds the trials of another study (trial_000)" in output and "Traceback" not in output
    assert "to go on with the study there: sweep.study_name=sweep" in output
    assert {name: (trial / name).read_text() for name in kept} == kept
    (folder / "study.db").unlink()
    code, output = run_in_process("sweep.py", args, capsys)
    assert code != 0 and "holds the trials of another study (trial_000)" in output and "Traceback" not in output
    assert {name: (trial / name).read_text() for name in kept} == kept and not (folder / "study.db").exists()


def test_a_searched_key_set_on_the_command_line_is_warned_of(toy_overrides, tmp_path, capsys):
    # The toy sets optimizer.lr, which the sweep searches: the trials train with the searched values instead. Also
    # sgd reads optimizer.momentum, so its search is no refusal (adamw's is: see the table below).
    folder = tmp_path / "sweep"
    momentum = ["optimizer=sgd", "+sweep.params.optimizer.momentum={type:float,low:0.8,high:0.99}"]
    output = sweep(
        folder, toy_overrides, capsys, "sweep.pruner=none", "trainer.max_steps=2", "sweep.n_trials=1", *momentum
    )

    lr = next(override for override in toy_overrides if override.startswith("optimizer.lr="))
    assert f"[WARNING] - {lr} is not what the trials train with: sweep.params.optimizer.lr searches" in output
    assert output.count("is not what the trials train with") == 1  # optimizer=sgd, say, is no searched key
    (trial,) = study_of(folder).trials
    assert trial.state.name == "COMPLETE" and 0.8 <= trial.params["optimizer.momentum"] <= 0.99


def test_a_grid_ends_at_its_high_value():
    sweep_module, config = (importlib.import_module(f"{PACKAGE}.{name}") for name in ("sweep", "config"))

    def grid(kind: str, low, high, step) -> list:
        return sweep_module.grid_values(config.SearchDimension(config.ParamType[kind], low, high, step=step))

    assert grid("int", 0, 3, 2) == [0, 2]  # 4 is beyond high, and no value of the range
    assert grid("float", 0.0, 0.1, 0.06) == [0.0, 0.06]
    exact = grid("float", 0.0, 0.1, 0.02)  # a step that divides the range, up to rounding: high is a value
    assert len(exact) == 6 and exact[-1] == pytest.approx(0.1)


def test_an_interrupted_sweep_goes_on_where_it_stopped(toy_overrides, tmp_path, capsys):
    folder = tmp_path / "sweep"
    fast = ["sweep.pruner=none", "sweep.sampler=random", "sweep.seed=0", "trainer.max_steps=4"]
    sweep(folder, toy_overrides, capsys, *fast, "sweep.n_trials=2")
    first = {name: (folder / name / "metrics.jsonl").read_text() for name in ("trial_000", "trial_001")}

    output = sweep(folder, toy_overrides, capsys, *fast, "sweep.n_trials=4")  # the same folder: the same study
    assert "2 trials so far" in output
    trials = study_of(folder).trials
    assert [trial.number for trial in trials] == [0, 1, 2, 3]
    assert all(trial.state.name == "COMPLETE" for trial in trials)
    assert sorted(path.name for path in folder.glob("trial_*")) == [f"trial_00{n}" for n in range(4)]
    assert {name: (folder / name / "metrics.jsonl").read_text() for name in first} == first  # not run again

    output = sweep(folder, toy_overrides, capsys, *fast, "sweep.n_trials=4")  # nothing left to do
    assert "4 trials so far" in output and len(study_of(folder).trials) == 4

    # Trials of another seed would not compare with the study's: refused, the folder as it was.
    hydra_config = (folder / ".hydra" / "config.yaml").read_text()
    args = [*toy_overrides, *STEPS, *LR_ONLY, *fast, f"hydra.run.dir={folder}", "sweep.n_trials=5", "trainer.seed=1"]
    code, output = run_in_process("sweep.py", args, capsys)
    assert code != 0 and "trainer.seed: 42 -> 1" in output and "Traceback" not in output
    assert len(study_of(folder).trials) == 4 and (folder / ".hydra" / "config.yaml").read_text() == hydra_config


def test_two_workers_share_one_study(toy_overrides, tmp_path):
    folder = tmp_path / "sweep"
    fast = ["sweep.pruner=none", "sweep.sampler=random", "trainer.max_steps=4", "sweep.n_trials=2"]
    args = [*toy_overrides, *STEPS, *LR_ONLY, *fast, f"hydra.run.dir={folder}"]
    workers = [ForkedScript("sweep.py", args, tmp_path / f"worker_{n}.out") for n in range(2)]  # started together
    statuses = wait_all(workers)
    assert statuses == [0, 0], [worker.tail() for worker in workers]

    trials = study_of(folder).trials
    # Each worker stops once the study holds 2 finished trials; the other may be finishing one of its own by then.
    assert all(trial.state.name == "COMPLETE" for trial in trials) and 2 <= len(trials) <= 3
    assert sorted(path.name for path in folder.glob("trial_*")) == [f"trial_{n:03d}" for n in range(len(trials))]
    assert all((folder / f"trial_{n:03d}" / "metrics.json").is_file() for n in range(len(trials)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sweep.pruner=medain"], "Invalid value 'medain'"),
        (["sweep.params.optimizer.lr.low=-1"], "sweep.params.optimizer.lr: log: true needs low > 0"),
        (["sweep.params.optimizer.lr.log=false", "sweep.params.optimizer.lr.low=0"], "optimizer.lr=0.0 is out of"),
        (["sweep.sampler=grid"], "sweep.params.optimizer.lr: sampler=grid needs a step"),
        # What Optuna refuses of a range, before any trial: it was a traceback from the first trial.
        (["+sweep.params.optimizer.lr.step=1e-4"], "optimizer.lr: The parameter `step` is not supported when `log`"),
        (["+sweep.params.optimizer.weight_decay.step=0"], "optimizer.weight_decay: `step > 0` must hold"),
        (  # it took every value to 0 (lr=0 refused as a config, the first trial's)
            ["sweep.params.optimizer.lr.type=int"],
            "sweep.params.optimizer.lr: type int needs whole numbers (low=1e-05, high=0.01); type float for fractions",
        ),
        (["+sweep.params.data.batch_size={type:int,low:8,high:64,step:0}"], "data.batch_size: `step > 0` must hold"),
        (["sweep.storage=study.db"], "sweep.storage=study.db: Could not parse SQLAlchemy URL"),  # a path, no URL
        (["sweep.seed=-1"], "sweep.seed=-1 is out of range: it must be >= 0"),
        (["trainer.eval_every_n_steps=0"], "sweep.pruner=median needs evaluations during training"),
        (  # an evaluation only at the end, where every trial has finished: nothing to prune by
            ["trainer.eval_every_n_steps=10", "trainer.max_steps=10"],
            "sweep.pruner=median needs evaluations during training",
        ),
        (
            [
                "sweep.pruner=successive_halving",
                "sweep.min_resource=10",
                "trainer.max_steps=10",
                "trainer.eval_every_n_steps=5",
            ],
            "sweep.pruner=successive_halving first compares trials after sweep.min_resource=10 steps",
        ),
        (  # adamw has no momentum: its trials would differ in nothing
            ["+sweep.params.optimizer.momentum={type:float,low:0.8,high:0.99}"],
            "sweep.params.optimizer.momentum: optimizer.name=adamw does not read optimizer.momentum",
        ),
        (  # a search over a key that train.py's config does not have: misspelt, or at the wrong level
            ["+sweep.params.optimizer.lrr={type:float,low:0.1,high:0.2}"],
            "sweep.params.optimizer.lrr is not a config key: did you mean sweep.params.optimizer.lr?",
        ),
        (["+sweep.params.lr={type:float,low:0.1,high:0.2}"], "sweep.params.lr is not a config key: did you mean "),
        (  # a group's options are files with keys of their own: not a value to set
            ["+sweep.params.scheduler={type:categorical,choices:[linear,cosine]}"],
            "sweep.params.scheduler names a config group, whose options are files: a sweep tries values of keys",
        ),
    ],
)
def test_a_sweep_that_cannot_run_says_why_and_leaves_no_folder(overrides, message, tmp_path, capsys):
    folder = tmp_path / "sweep"
    code, output = run_in_process("sweep.py", [f"hydra.run.dir={folder}", *overrides], capsys)
    assert code != 0 and message in output, output
    assert "Traceback" not in output and not folder.exists()
