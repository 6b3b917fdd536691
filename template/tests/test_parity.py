"""bench/parity.py runs, and this loop ends with the plain PyTorch loop's weights bit for bit (never a time)."""

import pytest
from conftest import TASKS, run_in_process


@pytest.mark.parametrize("task", TASKS)
def test_parity_bench_runs_and_this_loop_matches_plain_pytorch(task, toys, capsys):
    overrides = [override for override in toys(task) if not override.startswith("task=")]
    code, output = run_in_process(
        "bench/parity.py", ["--steps", "4", "--repeats", "1", "--task", task, *overrides], capsys
    )
    assert code == 0, output
    assert "this loop and plain PyTorch bit-identical" in output
    for row in ("plain PyTorch", "this loop", "transformers Trainer"):
        assert row in output


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("bench/parity.py", ["--repeats", "0"], "--repeats 0: the median needs at least one measured round"),
        ("bench/overfit.py", ["--repeats", "3"], "unrecognized arguments: --repeats 3"),  # it ran the benchmark
    ],
)
def test_a_bench_script_refuses_arguments_it_cannot_use(script, args, message, capsys):
    code, output = run_in_process(script, args, capsys)
    assert code == 2 and message in output and "Traceback" not in output, output
