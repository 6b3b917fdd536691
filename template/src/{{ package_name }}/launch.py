"""Several processes, one run: the process group on machines without GPUs, and one run folder shared by all.

`accelerate launch` and `torchrun` start N processes and each runs `@hydra.main`. Left alone, each would name its
own run folder from the clock; here the main process picks the name and sends it to the others before Hydra starts.
"""

import os
import secrets
import shlex
import sys
from datetime import datetime

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import broadcast_object_list, get_int_from_env, parse_flag_from_env
from omegaconf import OmegaConf

from .errors import UserError, process_rank

_stamp = None  # this run's folder name, the same in every process once `share_run_stamp` ran


class LaunchError(UserError):
    """A launch that would not run as the processes it asked for."""


def world_size() -> int:
    """How many processes the launcher started (torchrun/accelerate set WORLD_SIZE, MPI its own variables)."""
    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def use_cpu(requested: bool = False) -> bool:
    """Whether the Accelerator must use the CPU: when asked, or when several processes run without CUDA GPUs.

    In the second case a GPU-less Accelerator would leave each process training alone; on the CPU they form one
    gloo group.
    """
    return requested or (world_size() > 1 and not torch.cuda.is_available())


def make_run_stamp(now: datetime | None = None) -> str:
    """`<date>/<time with microseconds>-<random>`: runs started at the same moment, even on two machines, differ."""
    return f"{now or datetime.now():%Y-%m-%d/%H-%M-%S-%f}-{secrets.token_hex(2)}"


def run_stamp() -> str:
    global _stamp
    if _stamp is None:
        _stamp = make_run_stamp()
    return _stamp


def share_run_stamp() -> str:
    """Give every process of a multi-process launch the main process's stamp. Call once, before Hydra starts.

    This starts the process group (the Accelerator reuses it), so the resolver below only reads a value and never
    waits on other processes.
    """
    global _stamp
    check_launch()
    if world_size() > 1:
        state = PartialState(cpu=use_cpu(parse_flag_from_env("ACCELERATE_USE_CPU")))
        stamp = [run_stamp() if state.is_main_process else None]
        broadcast_object_list(stamp)
        _stamp = stamp[0]
    return run_stamp()


def check_launch() -> None:
    """Refuse a launch that asked for several processes and got one.

    `accelerate launch --num_processes N` without --multi_gpu (or with --cpu) starts the script once, as a single
    process, whatever N is: the run would finish as one process and only metrics.json would tell. Its launcher then
    sets ACCELERATE_USE_CPU, and, because N > 1, MASTER_ADDR, but not WORLD_SIZE, which every launcher that really
    starts several processes sets.
    """
    launched_by_accelerate = "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ
    if launched_by_accelerate and "WORLD_SIZE" not in os.environ and world_size() == 1:
        command = shlex.join(["accelerate", "launch", "--multi_gpu", "--num_processes", "N", *sys.argv])
        raise LaunchError(
            "accelerate launch started one process, not the several --num_processes asked for: without --multi_gpu, "
            f"or with --cpu, it starts only one. Run N processes with:\n  {command}\n"
            "(on a machine without GPUs they train together on the CPU)."
        )


def unheeded_launch_options(trainer) -> list:
    """What `accelerate launch` (its flags, or its config file) asks for that the trainer config decides otherwise:
    mixed precision and torch.compile are trainer.mixed_precision's and trainer.compile's, as the run records them."""
    unheeded = []
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision not in ("no", trainer.mixed_precision.value):
        unheeded.append(
            f"mixed precision {precision} (--mixed_precision), and trainer.mixed_precision="
            f"{trainer.mixed_precision.value} decides: add trainer.mixed_precision={precision} to use it"
        )
    backend = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if backend != "no" and not trainer.compile:
        unheeded.append(
            f"torch.compile's {backend} backend (--dynamo_backend), and trainer.compile=false decides: add "
            "trainer.compile=true to compile"
        )
    return unheeded


def log_suffix() -> str:
    """'' for the main process, '_rank<N>' for the others: each process logs to its own file of the run folder."""
    rank = process_rank()
    return f"_rank{rank}" if rank else ""


def reset_accelerate_state() -> None:
    """Forget the previous run's Accelerate settings (Accelerate keeps them in process-wide singletons), so the next
    run in this process gets an Accelerator of its own config: for tools that train several runs in one process."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def gathered_ranks(accelerator) -> list:
    """Every process's rank, gathered from all of them: [0, 1, ..., N-1] when the launch trains as one group."""
    if accelerator.num_processes == 1 and world_size() > 1:
        raise LaunchError(
            f"{world_size()} processes were launched but the Accelerator sees only its own: each would train alone. "
            "On a machine without GPUs the processes join one group on the CPU (see launch.use_cpu)."
        )
    return accelerator.gather(torch.tensor([accelerator.process_index], device=accelerator.device)).tolist()


# Registered on import, so every process that runs a Hydra job can resolve them (jobs that Hydra's submitit
# launcher starts elsewhere import this package too). Cached like Hydra's ${now:}: the jobs of a sweep, resolved
# from copies of the sweep's config, keep its value.
OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True, replace=True)
OmegaConf.register_new_resolver("log_suffix", log_suffix, replace=True)
