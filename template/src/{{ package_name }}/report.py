"""report.py: one table row per run and the training and validation curves of those runs on shared axes, from what
the runs wrote into their folders (runs.py reads them)."""

import argparse
import csv
import os
import statistics
import sys
from collections import Counter
from pathlib import Path

from .records import METRICS_FILE, task_name
from .runs import NoRunsError, UnreadableRunError, differing_config, find_runs, load_run

DEFAULT_MONITOR = ("loss", "min")  # every task's validation loss: for runs of older code that have not finished


def judged_by(run) -> tuple:
    """The metric a run is ranked by and which way is better: what it monitored (checkpoint.monitor, else its task's
    main metric), as its summary or its first line says; else the validation loss (runs of older code)."""
    if run.summary is not None and "mode" in run.summary:
        return run.summary["monitor"], run.summary["mode"]
    return run.monitored or DEFAULT_MONITOR


def median_of(lines: list, key: str) -> float | None:
    values = [line[key] for line in lines if line.get(key) is not None]
    return statistics.median(values) if values else None


def row(run, label: dict, monitor: str, mode: str) -> dict:
    values = [value for _, value in run.metric(monitor)]
    peaks = [line.get("perf/peak_gpu_memory_gb", line.get("perf/peak_rss_gb")) for line in run.train]
    last = max(run.train + run.evals, key=lambda line: line["step"], default={})  # an unfinished run's latest
    if run.summary is None:
        status = run.stopped_by or "unfinished"  # TrialPruned: a sweep's pruner stopped it
    else:
        status = "stopped early" if run.summary["stopped_early"] else "done"
    return {
        "run": str(run.folder),
        "config": " ".join(f"{key}={value}" for key, value in label.items()),
        "best": (min if mode == "min" else max)(values) if values else None,
        "final": values[-1] if values else None,
        "steps": run.summary["step"] if run.summary else run.last_step,
        "wall_s": run.summary["train_seconds"] if run.summary else last.get("elapsed"),
        "examples_per_s": median_of(run.train, "perf/examples_per_s"),
        "tokens_per_s": median_of(run.train, "perf/tokens_per_s"),
        "peak_memory_gb": max((peak for peak in peaks if peak is not None), default=None),
        "status": status,
    }


def best_first(entries: list, mode: str) -> list:
    """(row, ...) tuples, best first by the best value of the monitored metric; runs without one last."""
    sign = 1 if mode == "min" else -1
    return sorted(entries, key=lambda entry: (entry[0]["best"] is None, sign * (entry[0]["best"] or 0)))


def shown(value, width: int = 100) -> str:
    """A table cell: numbers to 4 significant digits, long text cut (report.csv has it whole)."""
    if value is None:
        return "-"
    if isinstance(value, str) and len(value) > width:
        return value[: width - 3] + "..."
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"  # throughput: whole numbers, no exponent
    return str(value)


def table(rows: list, headers: dict) -> str:
    cells = [list(headers.values())] + [[shown(r[key]) for key in headers] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells)


def steps_and_values(points: list) -> tuple:
    """(steps, values) for matplotlib, from (step, value) pairs; empty lists for none (a run not logged yet)."""
    return ([step for step, _ in points], [value for _, value in points])


def plot_curves(runs: list, labels: list, monitor: str, path: Path) -> None:
    """The training loss and each validation metric of every run against the step, one panel per curve."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    metrics = sorted({key[5:] for run in runs for line in run.evals for key in line if key.startswith("eval/")})
    metrics = [monitor] + [name for name in metrics if name not in (monitor, "examples")]
    figure, axes = plt.subplots(1, 1 + len(metrics), figsize=(5 * (1 + len(metrics)), 4), sharex=True, squeeze=False)
    for run, label in zip(runs, labels):
        (train_line,) = axes[0][0].plot(*steps_and_values([(line["step"], line["train/loss"]) for line in run.train]))
        train_line.set_label(label)
        for axis, name in zip(axes[0][1:], metrics):  # the same color as the run's training curve
            axis.plot(*steps_and_values(run.metric(name)), marker="o", markersize=3, color=train_line.get_color())
    axes[0][0].set_title("training loss")
    for axis, name in zip(axes[0][1:], metrics):
        axis.set_title(f"validation {name}" + (" (monitored)" if name == monitor else ""))
    for axis in axes[0]:
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    figure.legend(loc="lower center", ncol=min(3, len(runs)), fontsize="small", frameon=False)
    figure.tight_layout(rect=(0, 0.06 + 0.04 * ((len(runs) - 1) // 3), 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(paths: list, out: Path) -> list:
    """Print the table of the runs under `paths`, best first, and write report.csv and curves.png into `out`; runs
    of several tasks (an outputs/ folder, say) get a table each, and their files go into `out`/<task>/; so do a
    task's runs judged by different metrics (checkpoint.monitor), into `out`/<task>-<metric>/."""
    folders, silent = find_runs(paths)
    by_task, unreadable = {}, []
    for folder in folders:
        try:
            run = load_run(folder)
        except UnreadableRunError as error:
            unreadable.append(str(error))
            continue
        by_task.setdefault((task_of(run), judged_by(run)), []).append(run)
    if not by_task:
        raise NoRunsError(f"no run can be read: {'; '.join(unreadable)}")
    rows = []
    judged = Counter(task for task, _ in by_task)  # a task's runs judged by different metrics share no ranking
    for (task, (metric, _)), runs in by_task.items():
        several = judged[task] > 1
        if len(by_task) > 1:
            print(f"task {task}" + (f", runs judged by {metric}:" if several else ":"))
        name = f"{task}-{metric}" if several else task
        rows += report_runs(runs, out / name if len(by_task) > 1 else out)
    print("examples/s, tokens/s: median over the logged steps; peak GB: on a GPU the memory of tensors, else the")
    print("process's peak resident set size")
    if silent:
        print(f"no {METRICS_FILE} (failed before the first logged step, or starting): {', '.join(map(str, silent))}")
    if unreadable:
        print(f"left out, unreadable: {'; '.join(unreadable)}")
    return rows


def task_of(run) -> str:
    """The task a run trained, the module of its task._target_: runs of different tasks share no metric."""
    return task_name(str(run.config.get("task._target_")))


def report_runs(runs: list, out: Path) -> list:
    """The table of `runs` (one task's), best first, and its report.csv and curves.png in `out`."""
    monitor, mode = judged_by(runs[0])  # the same for all (report groups them so)
    entries = [(row(run, label, monitor, mode), run, label) for run, label in zip(runs, differing_config(runs))]
    entries = best_first(entries, mode)
    rows = [entry[0] for entry in entries]
    folders = [os.path.abspath(r["run"]) for r in rows]  # relative paths in different folders share no prefix
    base = os.path.commonpath(folders) if len(rows) > 1 else os.path.dirname(folders[0])
    for r, folder in zip(rows, folders):
        r["run"] = os.path.relpath(folder, base)
    headers = {
        "run": f"run (in {base if os.path.relpath(base).startswith('..') else os.path.relpath(base)})",
        "config": "config that differs" if len(runs) > 1 else "overrides",
        "best": f"best {monitor}",
        "final": f"final {monitor}",
        "steps": "steps",
        "wall_s": "train s",
        "examples_per_s": "examples/s",
        "tokens_per_s": "tokens/s",
        "peak_memory_gb": "peak GB",
        "status": "status",
    }
    print(f"{len(rows)} runs by {monitor} ({'lower' if mode == 'min' else 'higher'} is better):")
    print(table(rows, headers))
    out.mkdir(parents=True, exist_ok=True)
    with (out / "report.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(headers))
        writer.writeheader()
        writer.writerows(rows)
    plot_curves([run for _, run, _ in entries], [r["config"] or r["run"] for r in rows], monitor, out / "curves.png")
    print(f"wrote {out / 'report.csv'} and {out / 'curves.png'}")
    return rows


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="report.py",
        description="Compare runs: a table sorted by the monitored metric and PNG curves on shared axes. "
        "Give run folders, multirun folders or sweep folders (any folder with run folders below it).",
    )
    parser.add_argument("folders", nargs="+", metavar="RUN_OR_SWEEP_FOLDER")
    parser.add_argument("--out", type=Path, default=Path("report"), help="where report.csv and curves.png go")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        print(f"report.py: --out {args.out} is a file; give a folder for report.csv and curves.png", file=sys.stderr)
        return 2
    try:
        report(args.folders, args.out)
    except NoRunsError as error:
        print(f"report.py: {error}", file=sys.stderr)
        return 2
    return 0
