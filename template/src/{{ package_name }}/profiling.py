"""trainer.profile=true: the PyTorch profiler over a window of optimizer steps, through Accelerate's profiling support
(ProfileKwargs, accelerator.profile). Each process writes the window's trace into <run folder>/profile/ (Chrome trace
format: https://ui.perfetto.dev or chrome://tracing open it, and so does TensorBoard's profiler plugin); the main
process logs the operators that took the most time, and the share of the window spent waiting for data, into the run's
log (train.log)."""

import contextlib
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import ProfileKwargs

logger = get_logger(__name__)

TOP_OPERATORS = 15
WARMUP_STEPS = 1  # profiled but not recorded: the profiler's own start-up cost stays out of the window
# torch.utils.data.DataLoader names the time its iterator takes to hand out a batch so (record_function).
DATA_EVENT = "enumerate(DataLoader)"
# One per profiler.step() (the loop calls it once per optimizer step): ProfilerStep#<n>, ProfilerStep* once averaged.
STEP_EVENT = "ProfilerStep"
NOT_PROFILING = SimpleNamespace(step=lambda: None)


@contextlib.contextmanager
def profiled(accelerator: Accelerator, trainer, run_dir: Path, first_step: int):
    """accelerator.profile() over the window of `window` when trainer.profile is true, else a stand-in: either way
    the loop calls `step()` on what this yields after each optimizer step."""
    if not trainer.profile:
        yield NOT_PROFILING
        return
    with accelerator.profile(window(trainer, run_dir, first_step)) as profiler:
        yield profiler
    if profiler.step_num <= trainer.profile_wait + WARMUP_STEPS:
        logger.warning(
            f"trainer.profile: this run took {profiler.step_num} optimizer steps, too few to reach the profiled window "
            f"after trainer.profile_wait={trainer.profile_wait} (+ {WARMUP_STEPS} warm-up): nothing was profiled; "
            "lower trainer.profile_wait"
        )


def window(trainer, run_dir: Path, first_step: int) -> ProfileKwargs:
    """The profiler of trainer.profile_steps optimizer steps after trainer.profile_wait (+ 1 warm-up) steps of this run,
    which starts after optimizer step `first_step` (0, or the step a resume continues from)."""
    on_gpu = torch.cuda.is_available() and not trainer.cpu
    start = first_step + trainer.profile_wait + WARMUP_STEPS + 1
    steps = f"steps {start}-{start + trainer.profile_steps - 1}"
    return ProfileKwargs(
        activities=["cpu", "cuda"] if on_gpu else ["cpu"],
        schedule_option={
            "wait": trainer.profile_wait,
            "warmup": WARMUP_STEPS,
            "active": trainer.profile_steps,
            "repeat": 1,
        },
        on_trace_ready=lambda profiler: report(profiler, run_dir / "profile", steps, on_gpu),
        record_shapes=True,
    )


def report(profiler: torch.profiler.profile, folder: Path, steps: str, on_gpu: bool) -> None:
    """Write this process's trace; log the top operators and the data wait of the window (main process)."""
    folder.mkdir(parents=True, exist_ok=True)
    # The .pt.trace.json suffix is what TensorBoard's profiler plugin looks for (tensorboard --logdir <run folder>).
    trace = folder / f"rank{PartialState().process_index}.pt.trace.json"
    profiler.export_chrome_trace(str(trace))
    events = profiler.key_averages()
    step_time = sum(event.cpu_time_total for event in events if event.key.startswith(STEP_EVENT))
    data_time = sum(event.cpu_time_total for event in events if event.key.startswith(DATA_EVENT))
    device = "device" if on_gpu else "cpu"
    table = events.table(sort_by=f"self_{device}_time_total", row_limit=TOP_OPERATORS)
    logger.info(
        f"profile of {steps} (trace: {trace}): {data_time / max(step_time, 1):.1%} of their time waiting for data; "
        f"the {TOP_OPERATORS} operators with the most self {device} time:\n{table}"
    )
