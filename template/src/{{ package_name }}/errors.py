"""Expected failures: a bad config, data file, model folder or checkpoint, a failed preflight check, a non-finite
loss, Ctrl-C. Each is a UserError whose message says what was wrong, what is allowed and which key to change;
`reported` prints it as one short block and exits non-zero, without the traceback (HYDRA_FULL_ERROR=1 shows it)."""

import errno
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from accelerate.utils import get_int_from_env


class UserError(Exception):
    """A failure the user can fix; its message is all they need to read."""

    exit_code = 1


class ModelError(UserError):
    """The model cannot run on the task's batches: a layer of another width, an image size or a number of channels
    that differs from the data's, inputs it does not take."""

    @classmethod
    def of(cls, error: Exception, where: str) -> "ModelError":
        what = next(iter(str(error).strip().splitlines()), "")
        return cls(f"the model raised {type(error).__name__} on {where}: {what} (HYDRA_FULL_ERROR=1 shows where)")


class OutOfMemory(UserError):
    """An allocation that failed, on the GPU or the CPU, while training or evaluating."""

    @classmethod
    def within(cls, error: BaseException | None) -> "OutOfMemory | None":
        """The OutOfMemory of the failed allocation that `error` is or comes from (a step may have worded it as a
        failure of its own, a preflight check or a model that cannot run): Python's MemoryError, torch's
        OutOfMemoryError (CUDA, MPS), the RuntimeError of torch's CPU allocator. None if there is none."""
        while error is not None:
            words = str(error)
            if not isinstance(error, UserError) and (
                isinstance(error, MemoryError)
                or (isinstance(error, RuntimeError) and ("out of memory" in words or "can't allocate memory" in words))
            ):
                what = next(iter(words.strip().splitlines()), type(error).__name__)
                return cls(
                    f"out of memory: {what.rstrip('.')}. Lower data.batch_size (trainer.gradient_accumulation_steps=N "
                    "keeps the batch of each optimizer step), data.eval_batch_size where an evaluation ran out, or the "
                    "model's sizes; trainer.mixed_precision=bf16 halves the activations' memory. The checkpoints "
                    "written so far are untouched"
                )
            error = error.__cause__ or error.__context__
        return None


class Interrupted(UserError):
    """Ctrl-C (SIGINT) or SIGTERM, with where the run stopped and what a resume would continue from."""

    exit_code = 130  # what shells report for a process stopped by SIGINT

    @classmethod
    def of(cls, signal_error: KeyboardInterrupt, where: str = "") -> "Interrupted":
        """The Interrupted of a KeyboardInterrupt (Ctrl-C) or Terminated (SIGTERM: exit status 143)."""
        sigterm = isinstance(signal_error, Terminated)
        stopped = cls(f"{'terminated (SIGTERM)' if sigterm else 'interrupted (Ctrl-C)'}{where}")
        stopped.exit_code = 143 if sigterm else 130
        return stopped


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster's time limit or preemption, scancel, kill) where the run is: Python's default would end
    the process at once, without a word; this ends it as Ctrl-C does, with where it stopped."""


@contextmanager
def sigterm_stops_like_ctrl_c() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated in the main thread (signals are handled there only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def process_rank() -> int:
    """This process's rank in a multi-process launch (torchrun/accelerate set RANK, MPI its own variables); 0 alone."""
    return get_int_from_env(["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"], 0)


def warn(logger: logging.Logger, message: str) -> None:
    """A warning about the config, from the main process only (each process would repeat it). A plain logger, not
    Accelerate's: that one fails where no Accelerate state exists (the parity benchmark's plain PyTorch loop)."""
    if process_rank() == 0:
        logger.warning(message)


# A write that the disk refuses: full, over a quota or the file size limit (ulimit -f), a read-only file system.
DISK_REFUSED = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


# What a process group's other processes get from gloo or NCCL when the main process stopped (a data error raised
# inside main_process_first, say) while they waited for it at a barrier.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


@contextmanager
def reported() -> Iterator[None]:
    """Turn a UserError, Ctrl-C, a write the disk refused or memory that ran out inside the block into "Error:
    <message>" on stderr and SystemExit: 1 (130 for Ctrl-C). In a multi-process launch only the main process prints
    (every process raises the same error), but any process whose memory ran out says so, with its rank."""
    try:
        yield
    except (UserError, KeyboardInterrupt, OSError, MemoryError, RuntimeError) as error:
        if (ran_out := OutOfMemory.within(error)) is not None:
            error = ran_out
        elif isinstance(error, KeyboardInterrupt):
            error = Interrupted.of(error)
        elif isinstance(error, OSError) and not isinstance(error, UserError):
            if error.errno not in DISK_REFUSED:
                raise
            error = UserError(f"could not write {error.filename or 'a file'}: {error.strerror}; free space there")
        elif not isinstance(error, UserError):
            if process_rank() and any(sign in str(error) for sign in PEER_GONE):
                raise SystemExit(1) from None  # the main process stopped, and says why: this rank did not crash
            raise
        rank = process_rank()
        if rank == 0 or isinstance(error, OutOfMemory):  # memory runs out in one process, not in all of them
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                traceback.print_exc()
            message = f"Error{f' (rank {rank})' if rank else ''}: {error}"
            print(message, file=sys.stderr, flush=True)
            log_to_files(message)
        raise SystemExit(error.exit_code) from None


def log_to_files(message: str) -> None:
    """`message` into the log files only (the run's train.log says why it ended; the screen has it already). A file
    that cannot be written to (a full disk: the error being said, maybe) is passed over without a word."""
    record = logging.makeLogRecord({"name": __name__, "levelno": logging.ERROR, "levelname": "ERROR", "msg": message})
    raising, logging.raiseExceptions = logging.raiseExceptions, False  # else a failed write prints a traceback
    try:
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
    finally:
        logging.raiseExceptions = raising


FAILED_JOBS: list = []  # the run folders of the jobs of `train.py -m` that failed


@contextmanager
def reported_job(run_dir, multirun: bool) -> Iterator[None]:
    """reported() for one run of train.py. In a multirun (-m) a job that fails is said and listed, and the next job
    runs, as Hydra's launcher goes on after other errors (a SystemExit stopped the sweep); Ctrl-C stops it."""
    try:
        with reported():
            yield
    except SystemExit as stop:
        if not multirun or stop.code in (0, Interrupted.exit_code):
            raise
        FAILED_JOBS.append(str(run_dir))


def exit_if_jobs_failed() -> None:
    """After `train.py -m`: exit 1, naming the folders of the jobs that failed, if any did (and forget them: a
    process may run train.py again, as the tests do)."""
    failed = FAILED_JOBS.copy()
    FAILED_JOBS.clear()
    if failed:
        if process_rank() == 0:
            print(f"Error: {len(failed)} job(s) failed, each said why above: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)
