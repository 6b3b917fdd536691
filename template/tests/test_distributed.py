"""Several processes: one process group even without GPUs, one run folder per run, every validation example counted
once, and the same training as one process; the launch configs for GPUs and Slurm."""

import json
import socket
from datetime import datetime
from pathlib import Path

import pytest
import torch
from accelerate.commands import accelerate_cli
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType
from conftest import CHECKS_ON, CONFIG_DIR, PROJECT_ROOT, TASKS, ForkedScript, toy_overrides_for, wait_all
from safetensors.torch import load_file


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_processes(cwd: Path, overrides: list) -> None:
    """The plain `accelerate launch --multi_gpu --num_processes 2 train.py ...`, on a machine without GPUs. The
    launcher is forked from this process (its imports are paid already) and starts the two processes as always."""
    options = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    options += ["--dynamo_backend", "no", "--main_process_port", str(free_port())]
    arguments = ["launch", *options, str(PROJECT_ROOT / "train.py"), *overrides]
    launcher = ForkedScript(accelerate_cli.__file__, arguments, cwd / "launch.out", cwd, {"CUDA_VISIBLE_DEVICES": ""})
    assert launcher.wait() == 0, launcher.tail()


def fork_two_ranks(cwd: Path, overrides: list, script: str = "train.py", check: bool = True) -> tuple:
    """The two processes of that launch, forked from this one with the variables torchrun gives its ranks: what
    the ranks do is the same, and the test below runs the real command once. Each `accelerate launch` costs
    seconds of imports per process; a fork costs none. The first failing rank's exit status (0 unless
    check=False) and both ranks' output."""
    world = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [
        ForkedScript(
            script,
            overrides,
            cwd / f"{Path(script).stem}_rank{rank}.out",
            cwd,
            {**world, "RANK": str(rank), "LOCAL_RANK": str(rank), "ACCELERATE_USE_CPU": "1"},
        )
        for rank in range(2)
    ]
    statuses = wait_all(ranks)
    output = "\n".join(rank.tail() for rank in ranks)
    assert statuses == [0, 0] or not check, output
    return next((status for status in statuses if status), 0), output


@pytest.mark.parametrize("task", TASKS)
def test_two_processes_train_as_one_group_in_one_folder_like_one_process(
    pkg, make_config, default_task, tmp_path, task
):
    # 33 validation examples: they split evenly neither over 2 processes nor into batches of 4.
    overrides = [
        *toy_overrides_for(task, tmp_path / "toy", validation_examples=33),
        CHECKS_ON,  # on two processes too
        "data.eval_batch_size=4",
        "trainer.max_steps=10",
        "data.batch_size=4",  # per process
    ]
    checkpointed = [*overrides, "checkpoint.every_n_steps=5"]
    # The real `accelerate launch` for the default task. What the launcher does branches on no task, so the other
    # tasks' two processes are forked, as are the later runs here (each launch costs seconds of imports).
    launch = launch_two_processes if task == default_task else fork_two_ranks
    launch(tmp_path, checkpointed)  # into the default run folder: tmp_path/outputs/<stamp>

    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, runs  # one folder for both processes, not one each
    run_dir = runs[0]
    assert {".hydra", "train.log", "train_rank1.log", "metrics.json", "model"} <= {p.name for p in run_dir.iterdir()}
    result = json.loads((run_dir / "metrics.json").read_text())
    assert result["num_processes"] == 2
    assert result["ranks"] == [0, 1]  # gathered from both processes: one group, not two lone runs
    assert result["metrics"]["examples"] == 33  # the padding that evens out the last batches is not counted
    # metrics.jsonl, from the main process only, counts the examples of both processes: 2 x 4 per optimizer step.
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (trained,) = [line for line in logged if "train/loss" in line]  # step 10 (trainer.log_every_n_steps=10)
    assert trained["perf/examples_per_s"] * trained["perf/seconds_per_step"] == pytest.approx(8)
    assert [line for line in logged if "summary" in line] == [logged[-1]] and logged[-1]["summary"] == result
    # Complete checkpoints: the main process renames a checkpoint folder only once every process wrote its part.
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step_00000005", "step_00000010"]
    assert all({"random_states_0.pkl", "random_states_1.pkl"} <= {f.name for f in p.iterdir()} for p in checkpoints)
    two = load_file(run_dir / "model" / "model.safetensors")

    # evaluate.py on two processes: each example once, the metrics that training reported for this model.
    evaluation = tmp_path / "evaluation"
    fork_two_ranks(
        tmp_path,
        [*overrides, f"model.name_or_path='{run_dir / 'model'}'", f"hydra.run.dir='{evaluation}'"],
        "evaluate.py",
    )
    evaluated = json.loads((evaluation / "metrics.json").read_text())
    assert evaluated["num_processes"] == 2 and evaluated["metrics"] == pytest.approx(result["metrics"], rel=1e-6)
    assert len((evaluation / "predictions.jsonl").read_text().splitlines()) == 33

    # Resumed on two processes from step 5, mid-epoch (4 steps per epoch): the same weights, bit for bit (each rank's
    # sampler position and random states restored).
    resumed_dir = tmp_path / "resumed"
    fork_two_ranks(tmp_path, [*checkpointed, f"hydra.run.dir='{resumed_dir}'", f"resume='{checkpoints[0]}'"])
    resumed = load_file(resumed_dir / "model" / "model.safetensors")
    assert all(torch.equal(two[name], resumed[name]) for name in two)

    # A resume refused before Hydra writes (the batch size changed): each process checks it, the main one says it.
    refused = [*checkpointed, f"hydra.run.dir='{tmp_path / 'refused'}'", f"resume='{checkpoints[0]}'"]
    status, output = fork_two_ranks(tmp_path, [*refused, "data.batch_size=2"], check=False)
    assert status == 1 and output.count("Error: resume=") == 1, output

    # On one process, on purpose: the refusal's own advice, resume_allow=[num_processes], is accepted (it was refused as
    # "not a key of the config"), and the run goes on from step 5 to the end.
    one_process = [*checkpointed, f"resume='{checkpoints[0]}'", "resume_allow=[num_processes,data.batch_size]"]
    continued = pkg.loop.train(make_config(*one_process, "data.batch_size=8"), tmp_path / "on_one_process")
    assert continued["step"] == 10

    # Accelerate deals the seeded batches of 4 out in turn (process i takes batches i, i+2, ...), so optimizer step k
    # sees batches 2k and 2k+1: what one process sees with batch 4 and 2 accumulation steps. DDP averages the two
    # gradients, accumulation adds two halves: exact halvings either way. Bit-identical when both sides use the
    # same number of threads; launched ranks get OMP_NUM_THREADS=1 (torchrun's default) and this process may use
    # more, which changes matmul rounding by ulps: compare within 1e-5 after 10 Adam steps.
    accumulated = pkg.loop.train(
        make_config(*overrides, "trainer.gradient_accumulation_steps=2"), tmp_path / "accumulated"
    )
    one = load_file(tmp_path / "accumulated" / "model" / "model.safetensors")
    assert all(torch.allclose(two[name], one[name], rtol=0, atol=1e-5) for name in two)
    # Evaluation too: the same metrics, with losses summed in another order (measured 1e-8 apart, relative).
    assert result["metrics"] == pytest.approx(accumulated["metrics"], rel=1e-6)

    # One process with batch 8 sees the same 8 examples per step, but padded to the longest of 8 rather than of 4:
    # other matrix shapes, other float rounding. Measured: at most 4.5e-7 apart after these 10 steps, while a
    # different data order (batch 4 on one process) ends 5e-2 apart. 1e-4 leaves room for other CPUs' kernels.
    pkg.loop.train(make_config(*overrides, "data.batch_size=8"), tmp_path / "large_batch")
    one = load_file(tmp_path / "large_batch" / "model" / "model.safetensors")
    assert all(torch.allclose(two[name], one[name], rtol=0, atol=1e-4) for name in two)


def test_runs_started_at_the_same_moment_get_different_folders(pkg, make_config):
    now = datetime.now()
    assert pkg.launch.make_run_stamp(now) != pkg.launch.make_run_stamp(now)  # the random suffix tells them apart
    assert make_config(return_hydra_config=True).hydra.run.dir == f"outputs/{pkg.launch.run_stamp()}"


# name: distributed_type, num_processes, num_machines, and key options of its fsdp_config or deepspeed_config
ACCELERATE_CONFIGS = {
    "single_gpu": ("NO", 1, 1, {}),
    "ddp": ("MULTI_GPU", 8, 1, {}),
    "multi_node": ("MULTI_GPU", 16, 2, {}),
    "fsdp": (
        "FSDP",
        8,
        1,
        {
            "fsdp_version": 2,
            "fsdp_reshard_after_forward": True,  # FULL_SHARD
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": True,
        },
    ),
    "deepspeed_zero2": ("DEEPSPEED", 8, 1, {"zero_stage": 2}),
    "deepspeed_zero3": ("DEEPSPEED", 8, 1, {"zero_stage": 3, "zero3_save_16bit_model": True}),
}


def test_every_accelerate_config_file_is_checked():
    assert sorted(p.stem for p in (CONFIG_DIR / "accelerate").glob("*.yaml")) == sorted(ACCELERATE_CONFIGS)


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_accelerate_config_file_loads_with_accelerates_own_classes(name):
    distributed_type, num_processes, num_machines, options = ACCELERATE_CONFIGS[name]
    config = load_config_from_file(str(CONFIG_DIR / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type == DistributedType(distributed_type)
    assert (config.num_processes, config.num_machines) == (num_processes, num_machines)
    assert config.mixed_precision == "no"  # trainer.mixed_precision decides: the Accelerator's argument wins
    section = {**config.fsdp_config, **config.deepspeed_config}
    assert {key: section.get(key) for key in options} == options
    # `accelerate launch` turns each key of these sections into its option of that name without checking the name,
    # so a misspelt key would be ignored in silence.
    assert set(section) <= set(vars(launch_command_parser().parse_args(["train.py"])))


def test_slurm_launcher_config_composes(make_config):
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher", reason="needs the slurm extra: pip install -e .[slurm]"
    )
    launcher = make_config("hydra/launcher=slurm", return_hydra_config=True).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 1, 1)  # one process per job
    assert launcher.submitit_folder.startswith("multirun/")  # resolves: inside the sweep folder


def test_data_that_the_main_process_refuses_is_one_message_not_the_other_ranks_traceback(default_task, tmp_path):
    """The main process reads the data first (main_process_first) while the others wait at a barrier: its error left
    the others with gloo's "Connection closed by peer" and a 35-line traceback, which reads as a crash."""
    (tmp_path / "columns.csv").write_text("x,y\n1,2\n")  # none of the columns any task reads
    overrides = [*toy_overrides_for(default_task, tmp_path / "toy"), f"data.files.train='{tmp_path / 'columns.csv'}'"]
    status, output = fork_two_ranks(tmp_path, [*overrides, f"hydra.run.dir='{tmp_path / 'run'}'"], check=False)
    assert status == 1 and output.count("Error: ") == 1 and "columns.csv" in output, output
    assert "Traceback" not in output and "Connection closed" not in output


@pytest.mark.parametrize("rank", ["0", "1"])
def test_memory_that_runs_out_in_one_process_is_said_by_that_process(pkg, monkeypatch, capsys, rank):
    """On GPUs one process can run out alone, while the others wait for it: it says so itself, with its rank. An
    error that every process raises (a config value, say) is printed by the main process alone."""
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as stop, pkg.errors.reported():
        torch.empty(2**50)  # 4 PiB: torch's allocator refuses
    printed = capsys.readouterr().err
    assert stop.value.code == 1 and printed.startswith(f"Error{' (rank 1)' if rank == '1' else ''}: out of memory: ")
    with pytest.raises(SystemExit), pkg.errors.reported():
        raise pkg.config.ConfigError("a config value")
    assert capsys.readouterr().err == ("" if rank == "1" else "Error: a config value\n")
