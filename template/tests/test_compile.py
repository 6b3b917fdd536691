"""trainer.compile=true: a compiled run passes the preflight checks, trains, checkpoints and exports; its checkpoint
resumes without compile, and its export loads with from_pretrained."""

import math

import pytest
import torch
from conftest import reset_accelerate_state
from safetensors.torch import load_file
from test_distributed import fork_two_ranks


@pytest.mark.slow  # compiling on a CPU takes a minute or more
def test_compiled_run_checkpoints_resumes_and_exports_a_loadable_model(pkg, make_config, toy_overrides, tmp_path):
    overrides = [*toy_overrides, "trainer.max_steps=4", "checkpoint.every_n_steps=2"]
    trained = pkg.loop.train(make_config(*overrides, "trainer.compile=true"), tmp_path / "run")
    assert trained["step"] == 4 and all(math.isfinite(loss) for loss in trained["losses"])
    names = set(load_file(tmp_path / "run" / "model" / "model.safetensors"))
    assert names and not [name for name in names if "_orig_mod" in name]  # an uncompiled model's names

    reset_accelerate_state()  # the export loads with from_pretrained and scores what training reported
    exported = [*overrides, f"model.name_or_path='{tmp_path / 'run' / 'model'}'"]
    result = pkg.loop.evaluate_saved(make_config(*exported, config_name="evaluate"), tmp_path / "evaluation")
    assert result["metrics"] == pytest.approx(trained["metrics"], rel=1e-4)  # compiled kernels round differently

    reset_accelerate_state()  # the compiled run's checkpoint resumes in a run without compile
    resumed = pkg.loop.train(make_config(*overrides, "trainer.max_steps=6", "resume=latest"), tmp_path / "run")
    assert resumed["step"] == 6 and len(resumed["losses"]) == 2


@pytest.mark.slow  # two processes compiling on a CPU: minutes
def test_compiled_model_trains_on_two_processes_as_the_uncompiled_one_does(toy_overrides, tmp_path):
    # DDP over a compiled model: Dynamo splits the graph at DDP's gradient buckets (its DDPOptimizer), and each rank
    # compiles its own. Both ranks must still train the same model as without compile, checkpoint and export it.
    overrides = [*toy_overrides, "trainer.max_steps=4", "checkpoint.every_n_steps=2", "data.batch_size=4"]
    fork_two_ranks(tmp_path, [*overrides, "trainer.compile=true", f"hydra.run.dir='{tmp_path / 'compiled'}'"])
    fork_two_ranks(tmp_path, [*overrides, f"hydra.run.dir='{tmp_path / 'eager'}'"])
    compiled, eager = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("compiled", "eager"))
    assert compiled.keys() == eager.keys()
    assert all(torch.allclose(compiled[name], eager[name], rtol=0, atol=1e-5) for name in eager)
    assert (tmp_path / "compiled" / "checkpoints" / "step_00000004").is_dir()
