"""rank_check.py on tiny runs: its rank statistics against scipy's, its table and scatter plot from real run folders,
finished runs reused, and bad plans refused before anything trains."""

import csv
import importlib
import json
import random

import matplotlib.image
import pytest
from conftest import CONFIG_DIR, PACKAGE, run_in_process
from scipy.stats import kendalltau, spearmanr

HYPOTHESES = ["optimizer.lr=1e-4", "optimizer.lr=1e-3", "optimizer.lr=1e-2"]
BUDGETS = ["--proxy", "trainer.max_steps=4", "--full", "trainer.max_steps=8"]
QUIET = ["checks.enabled=false", "checkpoint.monitor=loss"]  # loss: distinct values, where accuracies of toys tie


def samples_with_ties():
    generator = random.Random(0)
    for size in range(2, 9):
        for _ in range(5):
            yield [generator.choice([1, 2, 3, 4.5]) for _ in range(size)], [generator.random() for _ in range(size)]
    yield [1, 1, 2, 2, 3], [3, 3, 2, 1, 1]  # ties in both
    yield [2, 2, 2], [1, 2, 3]  # a constant input: no correlation (nan), for scipy too
    yield [0.1, 0.5, 0.2, 0.9, 0.3, 0.7], [0.2, 0.6, 0.1, 0.8, 0.4, 0.9]


@pytest.mark.filterwarnings("ignore:An input array is constant")
def test_tau_and_rho_match_scipy():
    rank_check = importlib.import_module(f"{PACKAGE}.rank_check")
    for x, y in samples_with_ties():
        assert rank_check.kendall_tau(x, y) == pytest.approx(kendalltau(x, y).statistic, abs=1e-12, nan_ok=True)
        assert rank_check.spearman_rho(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12, nan_ok=True)


def rank_check(args: list, capsys) -> tuple:
    return run_in_process("rank_check.py", args, capsys)


def test_rank_check_ranks_real_runs_and_reuses_them(toy_overrides, pkg, tmp_path, capsys):
    out = tmp_path / "check"
    hypotheses = [arg for hypothesis in HYPOTHESES for arg in ("--hypothesis", hypothesis)]
    args = [*toy_overrides, *QUIET, *hypotheses, *BUDGETS, "--out", str(out)]
    code, output = rank_check(args, capsys)
    assert code == 0, output
    assert output.count("rank_check: training") == 6

    # The metric and wall time of each run, read from its own folder.
    runs = {(budget, i): pkg.runs.load_run(out / budget / str(i)) for budget in ("proxy", "full") for i in range(3)}
    assert {runs[key].summary["step"] for key in runs if key[0] == "proxy"} == {4}
    assert {runs[key].summary["step"] for key in runs if key[0] == "full"} == {8}
    proxy = [runs["proxy", i].summary["metrics"]["loss"] for i in range(3)]
    full = [runs["full", i].summary["metrics"]["loss"] for i in range(3)]
    summary = json.loads((out / "rank_check.json").read_text())
    assert summary["monitor"] == "loss" and summary["mode"] == "min"
    assert summary["kendall_tau"] == pytest.approx(kendalltau(proxy, full).statistic, abs=1e-12)
    assert summary["spearman_rho"] == pytest.approx(spearmanr(proxy, full).statistic, abs=1e-12)
    assert summary["same_best"] == (proxy.index(min(proxy)) == full.index(min(full)))
    seconds = {budget: sum(runs[budget, i].summary["run_seconds"] for i in range(3)) for budget in ("proxy", "full")}
    assert summary["proxy_seconds"] == pytest.approx(seconds["proxy"])
    assert summary["compute_ratio"] == pytest.approx(seconds["full"] / seconds["proxy"])
    # A run's wall time holds its training time and more (data, model, export).
    assert all(run.summary["run_seconds"] > run.summary["train_seconds"] for run in runs.values())

    with (out / "rank_check.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["hypothesis"] for row in rows] == HYPOTHESES
    assert [float(row["proxy"]) for row in rows] == pytest.approx(proxy)
    assert [float(row["full_rank"]) for row in rows] == [sorted(full).index(value) + 1 for value in full]
    assert matplotlib.image.imread(out / "rank_check.png").shape[2] in (3, 4)
    assert f"Kendall's tau {summary['kendall_tau']:.4g}" in output

    # Again: every run is read back, none trains, and the result is the same.
    before = {key: (run.folder / "metrics.jsonl").read_text() for key, run in runs.items()}
    code, output = rank_check(args, capsys)
    assert code == 0, output
    assert "rank_check: training" not in output
    assert {key: (run.folder / "metrics.jsonl").read_text() for key, run in runs.items()} == before
    assert json.loads((out / "rank_check.json").read_text()) == summary

    # A changed plan in the same folder is refused, not mixed with the old runs.
    changed = [*toy_overrides, *QUIET, "--hypothesis", "optimizer.lr=5e-3", *hypotheses[2:], *BUDGETS]
    code, output = rank_check([*changed, "--out", str(out)], capsys)
    assert code == 1
    assert "holds a run of other overrides" in output and "Traceback" not in output

    # A run written over since (not YAML any more) is named, not read as a result.
    (out / "full" / "1" / ".hydra" / "overrides.yaml").write_text("- [unclosed\n")
    code, output = rank_check(args, capsys)
    assert code == 1 and "Traceback" not in output, output
    assert "overrides.yaml is not valid YAML (" in output and f"move {out / 'full' / '1'} away" in output


PLAN = "{tmp}/plan.yaml"  # in args: a plan file holding the case's text
TINY = ["--proxy", "trainer.max_steps=1", "--full", "trainer.max_steps=2"]  # were the plan run: seconds, not minutes
TWO = ["--hypothesis", "optimizer.lr=1e-3", "--hypothesis", "optimizer.lr=1e-2"]


@pytest.mark.parametrize(
    "args, message, text",
    [
        (["--hypothesis", "optimizer.lr=1e-3"], "at least 2 hypotheses", None),
        (["--hypothesis", "optimizer.lr=1e-3", "--hypothesis", "optimizer.lr=-1"], "lr=-1.0 is out of range", None),
        (["--hypothesis", "optimizer.lr=1e-3", "--hypothesis", "optimizer.lrr=1"], "hypothesis 1 at the proxy", None),
        (["--plan", "no_such_plan.yaml"], "no such file", None),
        (["--plan", PLAN], "plan.yaml is not valid YAML (line 1, column 10): expected the node content", "common: ["),
        (["--plan", PLAN], "['hypothesis']: not keys of a plan, whose keys are", "hypothesis:\n- [optimizer.lr=1]\n"),
        (["--plan", PLAN], "plan.yaml holds a list; a plan is a mapping of the keys", "- [optimizer.lr=1]\n"),
        (  # judged by loss and by the task's metric: one ranking would mix them
            ["--hypothesis", "optimizer.lr=1e-3 checkpoint.monitor=loss", "--hypothesis", "optimizer.lr=1e-2", *TINY],
            "rank_check ranks hypotheses by one metric, and these runs are judged by several",
            None,
        ),
        (
            [*TWO, "--proxy", "trainer.max_steps=4", "--full", "trainer.max_steps=4"],
            "(and --proxy/--full) are the same: ['trainer.max_steps=4']",
            None,
        ),
    ],
)
def test_bad_plans_are_refused_before_anything_trains(toy_overrides, tmp_path, capsys, args, message, text):
    if text is not None:
        (tmp_path / "plan.yaml").write_text(text)
    args = [arg.format(tmp=tmp_path) for arg in args]
    out = tmp_path / "check"
    code, output = rank_check([*toy_overrides, *args, "--out", str(out)], capsys)
    assert code == 1
    assert message in output and "Traceback" not in output
    assert not out.exists()


def test_a_failing_run_stops_the_check_with_one_message_and_keeps_the_finished_runs(toy_overrides, tmp_path, capsys):
    out = tmp_path / "check"
    failing = "optimizer.lr=1e30 trainer.max_grad_norm=0"  # the loss is NaN from step 2 on
    args = [*toy_overrides, *QUIET, "--hypothesis", HYPOTHESES[1], "--hypothesis", failing, *BUDGETS]
    code, output = rank_check([*args, "--out", str(out)], capsys)
    assert code == 1
    assert "the proxy run 1" in output and "the training loss is nan" in output and "Traceback" not in output
    finished = (out / "proxy" / "0" / "metrics.jsonl").read_text()

    code, output = rank_check([*args, "--out", str(out)], capsys)
    assert code == 1 and output.count("rank_check: training") == 1  # only the failing run, again
    assert (out / "proxy" / "0" / "metrics.jsonl").read_text() == finished


def test_a_multi_process_launch_is_refused(toy_overrides, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, output = rank_check([*toy_overrides, "--out", str(tmp_path / "check")], capsys)
    assert code == 1 and "start it with `python`" in output and "Traceback" not in output
    assert not (tmp_path / "check").exists()


def test_the_default_plan_composes_and_validates():
    rank_check = importlib.import_module(f"{PACKAGE}.rank_check")
    plan = rank_check.read_plan(CONFIG_DIR / "rank_check" / "default.yaml", [], {"proxy": None, "full": None}, [])
    composed = rank_check.compose_all(plan, CONFIG_DIR)
    assert len(plan.hypotheses) == 6 and len(composed) == 12
    assert {cfg.trainer.max_steps for (budget, _), (_, cfg) in composed.items() if budget == "proxy"} == {300}


def test_hypotheses_that_all_tie_have_no_tau_and_are_all_best(toy_overrides, tmp_path, capsys):
    out = tmp_path / "check"
    # Two hypotheses that train the same model (they differ in how often they log): equal at both budgets.
    same = ["--hypothesis", "trainer.log_every_n_steps=1", "--hypothesis", "trainer.log_every_n_steps=2"]
    budgets = ["--proxy", "trainer.max_steps=2", "--full", "trainer.max_steps=4"]
    code, output = rank_check([*toy_overrides, *QUIET, *same, *budgets, "--out", str(out)], capsys)
    assert code == 0, output

    summary = json.loads((out / "rank_check.json").read_text())
    assert summary["kendall_tau"] is None and summary["spearman_rho"] is None  # NaN, written as null
    both = "trainer.log_every_n_steps=1 | trainer.log_every_n_steps=2"
    assert summary["best_proxy"] == summary["best_full"] == both and summary["same_best"]
    assert "(undefined: every hypothesis ties at a budget); best hypothesis the same, with ties" in output
