"""Run folders as the comparison tools (report.py, and the sweep and ranking tools) read them: from the files a run
wrote, never from numbers kept in memory.

A run folder holds .hydra/config.yaml (written by train.py) and metrics.jsonl (metrics_log.py). A sweep folder is any
folder with run folders below it, at any depth: a `python train.py -m` multirun folder, a sweep's, or a folder of
such folders.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .records import METRICS_FILE


class NoRunsError(ValueError):
    """A folder given to a comparison tool holds no run folder."""


class UnreadableRunError(NoRunsError):
    """A run folder whose config or metrics file cannot be read: not UTF-8, not YAML (written over, say)."""


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError as error:
        raise UnreadableRunError(f"{path} is not UTF-8 text") from error


def _yaml(path: Path):
    try:
        return yaml.safe_load(_text(path))
    except yaml.YAMLError as error:
        raise UnreadableRunError(f"{path} is not valid YAML ({str(error).splitlines()[0]})") from error


@dataclass
class RunRecord:
    folder: Path
    config: dict  # the run's config, flattened: "optimizer.lr" -> 0.001
    overrides: list  # the command-line overrides of the run (.hydra/overrides.yaml), if Hydra wrote them
    train: list = field(default_factory=list)  # the lines of logged training steps, in step order
    evals: list = field(default_factory=list)  # the lines of evaluations, in step order
    summary: dict | None = None  # what metrics.json holds; None while the run goes on, or if it failed
    stopped_by: str | None = None  # the exception that ended the run, when the file ends with it (metrics_log)
    last_step: int = 0  # the step of the file's last line: where an unfinished run is, or stopped
    monitored: tuple | None = None  # (metric, "min" or "max"): what the run is judged by, from its start line

    def metric(self, name: str) -> list:
        """(step, value) of an evaluation metric (`eval/<name>` in the file) over the run."""
        return [(line["step"], line[f"eval/{name}"]) for line in self.evals if line.get(f"eval/{name}") is not None]


def is_run(folder: Path) -> bool:
    return (folder / ".hydra" / "config.yaml").is_file() and (folder / METRICS_FILE).is_file()


def is_evaluation(folder: Path) -> bool:
    """A folder that evaluate.py wrote: its config has the key `split`, which train.py's has not."""
    try:
        return "split" in (_yaml(folder / ".hydra" / "config.yaml") or {})
    except UnreadableRunError:
        return False


def find_runs(paths: list) -> tuple:
    """The run folders that `paths` name or hold, each once, in the order given (and by path below a folder); and
    the folders with a config but no metrics file (a run that failed before its first logged step, or is starting)."""
    found, silent = [], []
    for path in map(Path, paths):
        if not path.is_dir():
            raise NoRunsError(f"{path}: {'a file, not a folder of runs' if path.exists() else 'no such folder'}")
        below = [path] if is_run(path) else sorted(c.parent.parent for c in path.rglob(".hydra/config.yaml"))
        runs = [folder for folder in below if is_run(folder)]
        if not runs:
            raise NoRunsError(
                f"{path}: no run folder in it (a run folder holds .hydra/config.yaml and {METRICS_FILE}, "
                "as `python train.py` writes them)"
            )
        found += [run for run in runs if run not in found]
        # A folder with runs below it is a sweep's (it has a .hydra of its own), not a run that failed; evaluate.py's
        # folders hold no metrics file at all.
        silent += [
            folder
            for folder in below
            if folder not in runs + silent
            and not any(folder in run.parents for run in runs)
            and not is_evaluation(folder)
        ]
    return found, silent


def flatten(node: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def read_lines(path: Path) -> list:
    """The JSON lines of a metrics file. A last line cut short (a run killed while writing) is left out."""
    lines = []
    for text in _text(Path(path)).splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return lines


def latest_per_step(lines: list) -> list:
    """One line per step, in step order: a resumed run logs again the steps after its checkpoint, and the later
    line (the run that went on) replaces the earlier."""
    return sorted({line["step"]: line for line in lines}.values(), key=lambda line: line["step"])


def load_run(folder: Path) -> RunRecord:
    folder = Path(folder)
    overrides_file = folder / ".hydra" / "overrides.yaml"
    overrides = (_yaml(overrides_file) or []) if overrides_file.is_file() else []
    lines = read_lines(folder / METRICS_FILE)
    # The resolved config that the latest start (or resume) logged; .hydra's as written, from older code.
    resolved = [line["config"] for line in lines if "config" in line]
    config = flatten(resolved[-1] if resolved else _yaml(folder / ".hydra" / "config.yaml") or {})
    summaries = [line["summary"] for line in lines if "summary" in line]
    return RunRecord(
        folder,
        config,
        overrides,
        train=latest_per_step([line for line in lines if "train/loss" in line]),
        evals=latest_per_step([line for line in lines if any(key.startswith("eval/") for key in line)]),
        summary=summaries[-1] if summaries else None,
        stopped_by=lines[-1].get("stopped_by") if lines else None,
        last_step=lines[-1].get("step") or 0 if lines else 0,
        monitored=next(((line["monitor"], line["mode"]) for line in lines if "monitor" in line), None),
    )


def differing_config(runs: list) -> list:
    """Per run, the config keys whose values are not the same in every run (what the runs compare), as
    {key: value}; with one run, its command-line overrides."""
    if len(runs) == 1:
        return [dict(override.lstrip("+~").partition("=")[::2] for override in runs[0].overrides)]
    # How a run was started (resume, resume_allow) is not what it trained; a key unset is one set to None.
    keys = sorted({key for run in runs for key in run.config if key not in ("resume", "resume_allow")})
    differ = [key for key in keys if len({repr(run.config.get(key)) for run in runs}) > 1]
    return [{key: run.config.get(key) for key in differ} for run in runs]
