"""Expected failures: a bad config, data file, model folder or checkpoint, a failed preflight check, a non-finite
loss, Ctrl-C. Each is a UserError whose message says what was wrong, what is allowed and which key to change;
`reported` prints it as one short block and exits non-zero, without the traceback (HYDRA_FULL_ERROR=1 shows it)."""

import logging
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from accelerate.utils import get_int_from_env


class UserError(Exception):
    """A failure the user can fix; its message is all they need to read."""

    exit_code = 1


class Interrupted(UserError):
    """Ctrl-C (SIGINT), with where the run stopped and what a resume would continue from."""

    exit_code = 130  # what shells report for a process stopped by SIGINT


def process_rank() -> int:
    """This process's rank in a multi-process launch (torchrun/accelerate set RANK, MPI its own variables); 0 alone."""
    return get_int_from_env(["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"], 0)


def warn(logger: logging.Logger, message: str) -> None:
    """A warning about the config, from the main process only (each process would repeat it). A plain logger, not
    Accelerate's: that one fails where no Accelerate state exists (the parity benchmark's plain PyTorch loop)."""
    if process_rank() == 0:
        logger.warning(message)


@contextmanager
def reported() -> Iterator[None]:
    """Turn a UserError or Ctrl-C inside the block into "Error: <message>" on stderr and SystemExit: 1 (130 for
    Ctrl-C). In a multi-process launch only the main process prints (every process raises the same error)."""
    try:
        yield
    except (UserError, KeyboardInterrupt) as error:
        if isinstance(error, KeyboardInterrupt):
            error = Interrupted("interrupted (Ctrl-C)")
        if process_rank() == 0:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                traceback.print_exc()
            print(f"Error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(error.exit_code) from None
