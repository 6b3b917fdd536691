"""data.num_workers: loading batches in worker processes changes the speed, never the run."""

import torch
from conftest import reset_accelerate_state
from safetensors.torch import load_file


def test_worker_processes_give_the_run_that_loading_in_the_main_process_gives(
    pkg, make_config, toy_overrides, tmp_path
):
    # The tiny random model (dropout on) rather than the saved one: workers must not move the generator dropout uses.
    overrides = [o for o in toy_overrides if not o.startswith("model.")] + ["trainer.max_steps=10"]
    runs = {}
    for workers in (0, 2):  # 10 steps of 4 batches an epoch: the workers start again with each epoch
        runs[workers] = pkg.loop.train(make_config(*overrides, f"data.num_workers={workers}"), tmp_path / str(workers))
        reset_accelerate_state()
    assert runs[2]["losses"] == runs[0]["losses"]
    assert runs[2]["metrics"] == runs[0]["metrics"]
    weights = {workers: load_file(tmp_path / str(workers) / "model" / "model.safetensors") for workers in runs}
    assert weights[0].keys() == weights[2].keys()
    assert all(torch.equal(weights[0][name], weights[2][name]) for name in weights[0])
