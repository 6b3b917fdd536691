"""rank_check.py: can cheap proxy runs rank hypotheses as full runs would?

Each hypothesis (a list of train.py overrides) trains twice, at the proxy budget and at the full budget, into
<out>/proxy/<i> and <out>/full/<i>; a finished run there is read back instead of trained again. The check compares
the two rankings by the monitored metric: Kendall's tau-b and Spearman's rho, whether the best hypothesis is the same,
and the compute saved, from the wall time each run measured (run_seconds in its metrics file).

The runs train one after another in this process, so the imports and the built-in datasets' caches are paid once, not
once per run (a subprocess per run would cost a proxy run's time again in imports alone).
"""

import argparse
import csv
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from . import launch, run_folder
from .config import ConfigError, compose_train, yaml_mistake
from .errors import UserError, reported
from .records import to_json
from .report import shown, table
from .runs import UnreadableRunError, is_run, load_run

BUDGETS = ("proxy", "full")


class RunFailed(UserError):
    """A run of the check stopped with an error (a failed preflight check, a diverged loss, bad data)."""


def average_ranks(values: list) -> list:
    """1-based ranks of `values` in ascending order, ties sharing the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def kendall_tau(x: list, y: list) -> float:
    """Kendall's tau-b: (concordant - discordant pairs) / sqrt(pairs untied in x * pairs untied in y)."""
    sign = lambda value: (value > 0) - (value < 0)  # noqa: E731
    pairs = [(sign(x[i] - x[j]), sign(y[i] - y[j])) for i in range(len(x)) for j in range(i)]
    untied_x, untied_y = sum(dx != 0 for dx, _ in pairs), sum(dy != 0 for _, dy in pairs)
    if not untied_x or not untied_y:
        return math.nan
    return sum(dx * dy for dx, dy in pairs) / math.sqrt(untied_x * untied_y)


def spearman_rho(x: list, y: list) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks."""
    rank_x, rank_y = average_ranks(x), average_ranks(y)
    mean = (len(x) + 1) / 2  # the mean of ranks 1..n, ties or not
    dx, dy = [r - mean for r in rank_x], [r - mean for r in rank_y]
    spread = math.sqrt(sum(d * d for d in dx) * sum(d * d for d in dy))
    return sum(a * b for a, b in zip(dx, dy)) / spread if spread else math.nan


@dataclass
class Plan:
    hypotheses: list  # each a list of train.py overrides
    budgets: dict  # "proxy" and "full" -> the overrides that set that budget
    common: list  # overrides of every run


def read_plan(path: Path, hypotheses: list, budgets: dict, common: list) -> Plan:
    """The plan file (configs/rank_check/*.yaml), with what the command line gives in place of its entries (budgets:
    name -> overrides, None to keep the plan's)."""
    if not Path(path).is_file():
        raise ConfigError(f"--plan {path}: no such file (the plans are in configs/rank_check/)")
    try:
        plan = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--plan {path} is not valid YAML{yaml_mistake(error)}") from None
    keys = ("hypotheses", "common", *BUDGETS)
    if not isinstance(plan, dict):
        raise ConfigError(f"--plan {path} holds a {type(plan).__name__}; a plan is a mapping of the keys {list(keys)}")
    unknown = sorted(map(str, set(plan) - set(keys)))  # a misspelt key would be left out without a word
    if unknown:
        raise ConfigError(f"--plan {path}: {unknown}: not keys of a plan, whose keys are {list(keys)}")
    chosen = hypotheses if hypotheses else plan.get("hypotheses") or []
    if len(chosen) < 2:
        raise ConfigError(f"rank_check needs at least 2 hypotheses to rank; {path} and --hypothesis give {len(chosen)}")
    budget_overrides = {
        name: overrides_of(plan.get(name) if budgets[name] is None else budgets[name]) for name in BUDGETS
    }
    if budget_overrides["proxy"] == budget_overrides["full"]:  # each run twice, and nothing learnt of a proxy
        raise ConfigError(
            f"the proxy and full budgets of {path} (and --proxy/--full) are the same: {budget_overrides['proxy']}; "
            "a proxy is a cheaper run than the full one: give proxy: and full: (trainer.max_steps=..., say)"
        )
    return Plan(
        hypotheses=[overrides_of(entry) for entry in chosen],
        budgets=budget_overrides,
        common=overrides_of(plan.get("common")) + common,
    )


def overrides_of(entry) -> list:
    """A plan entry as a list of overrides: a YAML list, or one string of them ("a=1 b=2"); nothing: []."""
    return shlex.split(entry) if isinstance(entry, str) else list(entry or [])


def run_overrides(plan: Plan, budget: str, hypothesis: list) -> list:
    """The common overrides, then the budget's, then the hypothesis's (which win where they set the same key)."""
    return [*plan.common, *plan.budgets[budget], *hypothesis]


def compose_all(plan: Plan, config_dir: Path) -> dict:
    """(budget, index) -> (overrides, config), every config composed and validated before any run starts."""
    composed = {}
    for budget in BUDGETS:
        for index, hypothesis in enumerate(plan.hypotheses):
            overrides = run_overrides(plan, budget, hypothesis)
            try:
                composed[budget, index] = overrides, compose_train(config_dir, overrides)
            except ConfigError as error:
                raise ConfigError(
                    f"hypothesis {index} at the {budget} budget ({' '.join(overrides)}): {error}"
                ) from None
    judged_by = {(cfg.task._target_, cfg.checkpoint.monitor, cfg.checkpoint.mode) for _, cfg in composed.values()}
    if len(judged_by) > 1:  # one ranking needs one metric: a task's own, or the same checkpoint.monitor for all
        raise ConfigError(
            "rank_check ranks hypotheses by one metric, and these runs are judged by several (task, "
            f"checkpoint.monitor, checkpoint.mode): {sorted(map(str, judged_by))}; compare hypotheses of one task, "
            "with one checkpoint.monitor (in common:, or in no hypothesis)"
        )
    return composed


def finished_run(folder: Path, overrides: list):
    """The run record of `folder` if a run of these overrides finished there; None if no run finished there."""
    if not is_run(folder):  # nothing there, or a run that stopped before its first log: trained (again)
        return None
    try:
        record = load_run(folder)
    except UnreadableRunError as error:  # written over since: its result cannot be trusted or read
        raise ConfigError(f"{error}: move {folder} away, and rank_check.py trains that run again") from None
    if record.overrides != overrides:
        raise ConfigError(
            f"{folder} holds a run of other overrides ({' '.join(record.overrides)}); choose another --out"
        )
    return record if record.summary is not None else None


def train_in(folder: Path, overrides: list, cfg) -> None:
    """Train one run into `folder`, writing .hydra/ as train.py does (so runs.py and report.py read it); a run
    that stopped before its end continues from its newest checkpoint, if it has one."""
    from .loop import train  # torch and transformers: only when something trains

    lock = run_folder.acquire(folder)  # another rank_check on the same --out waits for nobody: it is refused
    try:
        run_folder.sign(lock)
        (folder / ".hydra").mkdir(exist_ok=True)
        OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        cfg.resume = "latest"  # a fresh run if the folder has no checkpoint
        train(cfg, folder)  # with an Accelerator of its own settings (loop.make_accelerator)
    finally:
        lock.close()


def rank_check(plan: Plan, config_dir: Path, out: Path) -> dict:
    """Train what is missing, then print and write the comparison; returns its summary."""
    composed = compose_all(plan, config_dir)
    records = {}
    for (budget, index), (overrides, cfg) in composed.items():
        folder = out / budget / str(index)
        record = finished_run(folder, overrides)
        if record is None:
            print(f"rank_check: training {budget} run {index}: {' '.join(plan.hypotheses[index]) or '(defaults)'}")
            try:
                train_in(folder, overrides, cfg)
            except UserError as error:  # a failed check, a diverged loss, bad data, Ctrl-C
                raise RunFailed(
                    f"the {budget} run {index} ({' '.join(overrides)}) failed in {folder}: {error}\n"
                    "The finished runs are kept: run rank_check.py again after a fix, and only the rest trains"
                ) from error
            record = load_run(folder)
        records[budget, index] = record
    return compare(plan, records, out)


def compare(plan: Plan, records: dict, out: Path) -> dict:
    """The two rankings and their agreement, from the runs' summaries (the metric each run's checkpoint.monitor
    names, of its final model; the wall time each run measured); written into `out`."""
    first = records["full", 0].summary
    monitor, mode = first["monitor"], first["mode"]
    sign = 1 if mode == "min" else -1  # ranks below count from the best
    rows = []
    for index, hypothesis in enumerate(plan.hypotheses):
        row = {"index": index, "hypothesis": " ".join(hypothesis) or "(defaults)"}
        for budget in BUDGETS:
            summary = records[budget, index].summary
            row[budget] = summary["metrics"][monitor]
            row[f"{budget}_s"] = summary.get("run_seconds", summary["train_seconds"])
        rows.append(row)
    for budget in BUDGETS:
        for row, rank in zip(rows, average_ranks([sign * row[budget] for row in rows])):
            row[f"{budget}_rank"] = rank
    proxy, full = [row["proxy"] for row in rows], [row["full"] for row in rows]
    # The best at each budget: every hypothesis ranked first (several where they tie).
    top = {budget: min(row[f"{budget}_rank"] for row in rows) for budget in BUDGETS}
    best = {budget: [row for row in rows if row[f"{budget}_rank"] == top[budget]] for budget in BUDGETS}
    proxy_seconds, full_seconds = sum(row["proxy_s"] for row in rows), sum(row["full_s"] for row in rows)
    summary = {
        "monitor": monitor,
        "mode": mode,
        "kendall_tau": kendall_tau(proxy, full),
        "spearman_rho": spearman_rho(proxy, full),
        "same_best": best["proxy"] == best["full"],
        "best_proxy": " | ".join(row["hypothesis"] for row in best["proxy"]),  # tied ones apart by " | "
        "best_full": " | ".join(row["hypothesis"] for row in best["full"]),
        "proxy_seconds": proxy_seconds,
        "full_seconds": full_seconds,
        "compute_ratio": full_seconds / proxy_seconds,
        "rows": rows,
    }
    write_outputs(summary, out)
    return summary


HEADERS = {
    "index": "#",  # the run folders' names, and the labels of the scatter plot's points
    "hypothesis": "hypothesis",
    "proxy": "proxy {monitor}",
    "proxy_rank": "proxy rank",
    "full": "full {monitor}",
    "full_rank": "full rank",
    "proxy_s": "proxy s",
    "full_s": "full s",
}


def write_outputs(summary: dict, out: Path) -> None:
    headers = {key: title.format(monitor=summary["monitor"]) for key, title in HEADERS.items()}
    better = "lower" if summary["mode"] == "min" else "higher"
    print(f"{len(summary['rows'])} hypotheses by {summary['monitor']} ({better} is better; rank 1 is the best):")
    print(table(summary["rows"], headers))
    tied = " | " in summary["best_proxy"] + summary["best_full"]
    undefined = " (undefined: every hypothesis ties at a budget)" if math.isnan(summary["kendall_tau"]) else ""
    print(
        f"Kendall's tau {shown(summary['kendall_tau'])}, Spearman's rho {shown(summary['spearman_rho'])}{undefined}; "
        f"best hypothesis {'the same' if summary['same_best'] else 'differs'}{', with ties' if tied else ''} "
        f"(proxy: {summary['best_proxy']}; full: {summary['best_full']})"
    )
    print(
        f"compute: proxy runs {summary['proxy_seconds']:.1f} s, full runs {summary['full_seconds']:.1f} s "
        f"({summary['compute_ratio']:.1f}x; wall time of each whole run, as it measured it)"
    )
    out.mkdir(parents=True, exist_ok=True)
    with (out / "rank_check.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(headers))
        writer.writeheader()
        writer.writerows(summary["rows"])
    (out / "rank_check.json").write_text(to_json(summary, indent=2))
    plot_scatter(summary, out / "rank_check.png")
    print(f"wrote {out / 'rank_check.csv'}, {out / 'rank_check.json'} and {out / 'rank_check.png'}")


def plot_scatter(summary: dict, path: Path) -> None:
    """Proxy metric against full metric, one labelled point per hypothesis."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 5))
    for index, row in enumerate(summary["rows"]):
        axis.scatter(row["proxy"], row["full"], color="C0")
        axis.annotate(str(index), (row["proxy"], row["full"]), textcoords="offset points", xytext=(4, 4))
    monitor = summary["monitor"]
    axis.set_xlabel(f"proxy {monitor}")
    axis.set_ylabel(f"full {monitor}")
    axis.set_title(
        f"tau {summary['kendall_tau']:.2f}, rho {summary['spearman_rho']:.2f}, "
        f"{summary['compute_ratio']:.1f}x less compute"
    )
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(project: Path, argv: list | None = None) -> int:
    """The command line of rank_check.py; `project` is the folder that holds configs/."""
    parser = argparse.ArgumentParser(
        prog="rank_check.py",
        description="Train each hypothesis at the proxy and at the full budget (reusing finished runs) and report "
        "how well the proxy ranking matches the full one.",
    )
    parser.add_argument("overrides", nargs="*", help="train.py overrides of every run, e.g. data.batch_size=16")
    parser.add_argument("--plan", type=Path, default=project / "configs" / "rank_check" / "default.yaml")
    parser.add_argument(
        "--hypothesis",
        action="append",
        metavar="OVERRIDES",
        help='one hypothesis, e.g. --hypothesis "optimizer.lr=3e-4 scheduler.warmup_steps=50"; repeat it; '
        "replaces the plan's hypotheses",
    )
    for budget in BUDGETS:
        parser.add_argument(f"--{budget}", metavar="OVERRIDES", help=f"the overrides of the {budget} budget")
    parser.add_argument("--out", type=Path, default=Path("rank_check"), help="where the runs and results go")
    args = parser.parse_args(argv)
    with reported():  # a bad plan or a failed run: one short message, no traceback
        if launch.world_size() > 1:  # each run ends its process group: the next could not train on it
            raise UserError(
                "rank_check.py trains its runs one after another in one process: start it with `python`, not with "
                "accelerate launch or torchrun"
            )
        plan = read_plan(
            args.plan,
            args.hypothesis or [],
            {budget: getattr(args, budget) for budget in BUDGETS},
            args.overrides,
        )
        rank_check(plan, project / "configs", args.out)
    return 0
