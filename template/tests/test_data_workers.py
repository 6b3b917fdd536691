"""How batches are loaded (data.num_workers, evaluations between the steps) changes the speed, never the run."""

import pytest
import torch
from conftest import TASKS, reset_accelerate_state
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


@pytest.mark.parametrize("task", TASKS)
def test_evaluating_during_training_does_not_change_what_is_trained(pkg, make_config, toys, tmp_path, task):
    # Dropout on (the tiny random models): each pass over the validation loader drew a seed from the global generator
    # that dropout uses, and the samples a generative task logs were generated with dropout on, drawing from it too;
    # the losses after the first evaluation depended on trainer.eval_every_n_steps.
    overrides = [o for o in toys(task) if not o.startswith("model.")] + ["trainer.max_steps=10"]
    losses = {}
    for every in (0, 3):
        run = pkg.loop.train(make_config(*overrides, f"trainer.eval_every_n_steps={every}"), tmp_path / str(every))
        losses[every] = run["losses"]
        reset_accelerate_state()
    assert losses[3] == losses[0]
