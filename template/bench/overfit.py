"""Time the end-to-end overfit test of every task: its training runs in-process, then the test under pytest.

python bench/overfit.py
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help; anything else is refused
    start = time.perf_counter()
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from conftest import PACKAGE, TASKS, compose_config, reset_accelerate_state, toy_overrides_for

    train = __import__(f"{PACKAGE}.loop", fromlist=["train"]).train
    imports = time.perf_counter() - start

    rows = [("imports (torch, transformers, accelerate, datasets, hydra)", imports)]
    with tempfile.TemporaryDirectory() as tmp:
        for task in TASKS:
            overrides = toy_overrides_for(task, Path(tmp) / task)
            for run in ("first", "second"):
                begin = time.perf_counter()
                result = train(compose_config(*overrides), Path(tmp) / task / run)
                rows.append((f"{task}, {run} run: train() end to end", time.perf_counter() - begin))
                rows.append((f"{task}, {run} run: optimizer steps only ({result['step']})", result["train_seconds"]))
                metric = result["monitor"]
                rows.append((f"{task}, {run} run: final {metric} (not seconds)", result["metrics"][metric]))
                reset_accelerate_state()

    begin = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", "-k", "overfits"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    rows.append(("every overfit test under pytest, process start to exit", time.perf_counter() - begin))

    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:8.3f}")
    print(done.stdout.strip().splitlines()[-1])
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
