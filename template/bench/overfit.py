"""Time the end-to-end overfit test: its training part in-process, then the whole test file under pytest.

python bench/overfit.py
"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    start = time.perf_counter()
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from conftest import (
        PACKAGE,
        compose_config,
        overfit_overrides,
        reset_accelerate_state,
        save_tiny_model,
        write_toy_csv,
    )

    train = __import__(f"{PACKAGE}.loop", fromlist=["train"]).train
    imports = time.perf_counter() - start

    rows = [("imports (torch, transformers, accelerate, datasets, hydra)", imports)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        overrides = overfit_overrides(save_tiny_model(tmp / "model"), write_toy_csv(tmp / "toy.csv"))
        for run in ("first", "second"):
            begin = time.perf_counter()
            result = train(compose_config(*overrides), tmp / run)
            rows.append((f"{run} training run: train() end to end", time.perf_counter() - begin))
            rows.append((f"{run} training run: optimizer steps only ({result['step']})", result["train_seconds"]))
            rows.append((f"{run} training run: final accuracy (not seconds)", result["metrics"]["accuracy"]))
            reset_accelerate_state()

    begin = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_overfit.py"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    rows.append(("whole test file under pytest, process start to exit", time.perf_counter() - begin))

    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:8.3f}")
    print(done.stdout.strip().splitlines()[-1])
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
