"""What every run records for the comparison tools (report.py and those after it), which read files, never numbers
kept in memory.

metrics.jsonl, in the run folder: one JSON line per `accelerator.log` call of the loop (each logged training step,
each evaluation), with the step, the wall-clock time and the numbers logged (the same names as in TensorBoard), and
a last line `{"summary": ...}` holding what metrics.json holds. A resumed run appends to it; its repeated steps
come after the ones they replace.

The throughput numbers of the training lines (perf/*) come from `Throughput`, which adds up examples, tokens and
seconds on each process and gathers them across processes only when the loop logs: no host-device synchronization
per step beyond the one the loop already has (reading the loss).
"""

import resource
import sys
import time
from itertools import islice
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import gather_object

from .records import to_json
from .tasks.base import Task


def readable(metrics: dict) -> str:
    """Metrics for a line of the log: "accuracy 0.9000, loss 0.3500" (the count of examples is not a score)."""
    return ", ".join(f"{name} {value:.4f}" for name, value in metrics.items() if name != "examples")


def append_line(path: Path, record: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # a resumed run may start in a new folder
    with Path(path).open("a") as file:
        file.write(to_json(record) + "\n")


def append_summary(path: Path, result: dict) -> None:
    """The last line of a finished run: what metrics.json holds."""
    append_line(path, {"step": result["step"], "time": round(time.time(), 3), "summary": result})


def append_start(path: Path, step: int, monitor: str, mode: str, config: dict) -> None:
    """The first line of a run (and of each resume): the metric it is judged by, for report.py to rank runs that have
    not finished yet as they will be ranked when they have, and the resolved config (.hydra/config.yaml keeps
    interpolations such as ${oc.env:SEED} as written)."""
    line = {"step": step, "time": round(time.time(), 3), "monitor": monitor, "mode": mode, "config": config}
    append_line(path, line)


def append_stop(path: Path, step: int, error: BaseException) -> None:
    """The last line of a run that an exception ended (a sweep's pruner, a non-finite loss, Ctrl-C): what ended it."""
    stop = {"stopped_by": type(error).__name__, "reason": str(error).splitlines()[0] if str(error) else ""}
    append_line(path, {"step": step, "time": round(time.time(), 3), **stop})


class MetricsFile(GeneralTracker):
    """An Accelerate tracker that writes every logged set of numbers as a JSON line (on the main process only, as
    Accelerate calls trackers). Text (generated samples) stays with the other trackers."""

    name = "metrics_file"
    requires_logging_directory = False

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        self.started = time.time()

    @property
    def tracker(self):
        return self.path

    def start(self):
        self.started = time.time()

    def log(self, values: dict, step: int | None = None, **kwargs):
        numbers = {key: value for key, value in values.items() if value is None or isinstance(value, (int, float))}
        if numbers:
            now = time.time()
            append_line(self.path, {"step": step, "time": round(now, 3), "elapsed": now - self.started, **numbers})


def reset_peak_memory(device: torch.device) -> None:
    """Start counting the peak anew: a sweep or rank_check trains many runs in one process, each of its own peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif sys.platform == "linux":
        try:  # Linux resets the peak resident set size (VmHWM, getrusage's ru_maxrss) on this write
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:  # not allowed here: the process's peak so far
            pass


def peak_memory(device: torch.device) -> dict:
    """On a GPU the most memory tensors have taken on it (torch.cuda.max_memory_allocated); elsewhere the process's
    peak resident set size (getrusage), which counts everything the process holds, Python and libraries too."""
    if device.type == "cuda":
        return {"perf/peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"perf/peak_rss_gb": max_rss / (2**30 if sys.platform == "darwin" else 2**20)}


class Throughput:
    """Examples/s, tokens/s, seconds per optimizer step and the fraction of that time spent waiting for data, over
    the steps since the last `measure`. Only training steps count: evaluation and checkpoints are not in the time."""

    def __init__(self, accelerator: Accelerator, task: Task):
        self.accelerator, self.task = accelerator, task
        reset_peak_memory(accelerator.device)
        self._reset()

    def _reset(self) -> None:
        self.steps, self.examples, self.step_seconds, self.data_seconds = 0, 0, 0.0, 0.0
        self.tokens = None  # a count on the device, read only in `measure`

    def next_cycle(self, stream, size: int) -> list:
        """The next `size` micro-batches of `stream`, timing the wait for them and counting what they hold."""
        self.cycle_start = time.perf_counter()
        cycle = list(islice(stream, size))
        self.data_seconds += time.perf_counter() - self.cycle_start
        for batch in cycle:
            self.examples += len(batch["labels"])
            tokens = self.task.tokens(batch)
            if tokens is not None:
                self.tokens = tokens if self.tokens is None else self.tokens + tokens
        return cycle

    def step_done(self) -> None:
        self.steps += 1
        self.step_seconds += time.perf_counter() - self.cycle_start

    def measure(self) -> dict:
        """The numbers since the last call, over all processes (every process must call it: it gathers once)."""
        mine = {
            "examples": self.examples,
            "tokens": None if self.tokens is None else int(self.tokens),
            "seconds": self.step_seconds,
            "data_seconds": self.data_seconds,
            "steps": self.steps,
            "memory": peak_memory(self.accelerator.device),
        }
        every = gather_object([mine])
        self._reset()
        seconds = max(process["seconds"] for process in every)  # processes step together: the slowest sets the pace
        if not seconds:
            return {}
        numbers = {
            "perf/examples_per_s": sum(process["examples"] for process in every) / seconds,
            "perf/seconds_per_step": seconds / mine["steps"],
            "perf/data_wait_fraction": sum(p["data_seconds"] for p in every) / sum(p["seconds"] for p in every),
            # The largest process's peak (CPU: each process's own, not their sum).
            **{name: max(process["memory"][name] for process in every) for name in mine["memory"]},
        }
        if mine["tokens"] is not None:
            numbers["perf/tokens_per_s"] = sum(process["tokens"] for process in every) / seconds
        return numbers
