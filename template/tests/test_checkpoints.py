"""Checkpoints survive crashes and corruption; runs stop cleanly on early stopping or a bad loss."""

import json
import re
import signal
import time

import pytest
import torch
from accelerate import Accelerator
from conftest import ForkedScript, reset_accelerate_state, run_in_process, toy_model
from safetensors.torch import load_file, save_file

STEP = "step_{:08d}"
ABSURD_LR = ["optimizer.lr=1e30", "trainer.max_grad_norm=0", "checks.overfit_batch=false"]


def final_weights(run_dir):
    return load_file(run_dir / "model" / "model.safetensors")


def assert_same_weights(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.fixture
def checkpointed(toy_overrides):
    return [*toy_overrides, "trainer.max_steps=12", "checkpoint.every_n_steps=5", "checkpoint.keep_count=5"]


@pytest.fixture
def endless(checkpointed):
    """The checkpointed toy run, still training whenever a signal comes (trainer.max_steps last)."""
    return [o for o in checkpointed if not o.startswith("trainer.max_steps")] + ["trainer.max_steps=100000"]


def test_checkpoint_records_seed_versions_config_and_checksums(pkg, make_config, checkpointed, tmp_path):
    pkg.loop.train(make_config(*checkpointed, "trainer.seed=7"), tmp_path)
    record = pkg.checkpoints.verify(tmp_path / "checkpoints" / STEP.format(10))
    assert record["seed"] == 7 and record["config"]["trainer"]["seed"] == 7
    assert set(record["versions"]) == {"torch", "transformers", "accelerate", "datasets"}
    assert record["trainer"]["step"] == 10 and "model.safetensors" in record["checksums"]


def test_corrupt_checkpoint_is_named_and_latest_falls_back_to_the_newest_good_one(
    pkg, make_config, checkpointed, tmp_path
):
    full = pkg.loop.train(make_config(*checkpointed), tmp_path)
    newest = tmp_path / "checkpoints" / STEP.format(10)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a save cut short

    with pytest.raises(pkg.checkpoints.CorruptCheckpointError, match=r"truncated or corrupt.*model\.safetensors"):
        pkg.loop.train(make_config(*checkpointed, f"resume='{newest}'"), tmp_path / "other")

    resumed = pkg.loop.train(make_config(*checkpointed, "resume=latest"), tmp_path)
    assert resumed["losses"] == full["losses"][5:]  # resumed from step 5, the newest good checkpoint


def test_a_half_written_checkpoint_is_never_resumed_from(pkg, make_config, checkpointed, tmp_path):
    full = pkg.loop.train(make_config(*checkpointed), tmp_path)
    # What a crash in the middle of save() leaves: the temporary folder, never renamed.
    partial = tmp_path / "checkpoints" / f".partial_{STEP.format(11)}"
    (tmp_path / "checkpoints" / STEP.format(10)).rename(partial)
    resumed = pkg.loop.train(make_config(*checkpointed, "resume=latest"), tmp_path)
    assert resumed["losses"] == full["losses"][5:]


@pytest.mark.parametrize("keep, kept_steps", [("latest", [7, 8]), ("best", [8]), ("top_k", [7, 8])])
def test_keep_policy(pkg, make_config, toy_overrides, tmp_path, keep, kept_steps):
    # The monitored eval loss falls at every step as the model memorizes: the best checkpoints are the newest.
    overrides = [
        *toy_overrides,
        "trainer.max_steps=8",
        "trainer.eval_every_n_steps=1",
        "checkpoint.every_n_steps=1",
        f"checkpoint.keep={keep}",
        "checkpoint.keep_count=2",
        "checkpoint.monitor=loss",  # mode: the metric's own (min)
    ]
    pkg.loop.train(make_config(*overrides), tmp_path)
    kept = pkg.checkpoints.list_complete(tmp_path / "checkpoints")
    assert [path.name for path in kept] == [STEP.format(step) for step in kept_steps]
    assert (tmp_path / "best_model" / "model.safetensors").is_file() == (keep != "latest")


@pytest.mark.parametrize("keep, ranked", [("best", 1), ("top_k", 2)])
def test_keep_policy_keeps_older_better_checkpoints_over_newer_ones(
    pkg, make_config, toy_overrides, tmp_path, keep, ranked
):
    # Ranked with "max" on a loss that falls as the model memorizes, the best checkpoints are old ones, and the
    # policy must keep them over newer ones (and the newest, to resume from).
    overrides = [*toy_overrides, "trainer.max_steps=8", "trainer.eval_every_n_steps=1", "checkpoint.every_n_steps=1"]
    pkg.loop.train(make_config(*overrides, "checkpoint.keep_count=8"), tmp_path)
    found = pkg.checkpoints.list_complete(tmp_path / "checkpoints")
    loss = {path.name: pkg.checkpoints.read_record(path)["trainer"]["metrics"]["loss"] for path in found}
    highest = sorted(loss, key=loss.get, reverse=True)[:ranked]
    assert STEP.format(8) not in highest  # else this would not test the policy

    policy = make_config(f"checkpoint.keep={keep}", "checkpoint.keep_count=2").checkpoint
    pkg.checkpoints.prune(tmp_path / "checkpoints", policy, "loss", pkg.config.MetricMode.max)
    kept = [path.name for path in pkg.checkpoints.list_complete(tmp_path / "checkpoints")]
    assert kept == sorted([*highest, STEP.format(8)])


def test_early_stopping_stops_every_process_and_is_recorded(pkg, make_config, toy_overrides, tmp_path):
    overrides = [
        *toy_overrides,
        "trainer.max_steps=40",
        "trainer.eval_every_n_steps=2",
        "trainer.early_stopping_patience=2",
        "trainer.early_stopping_min_delta=1e9",  # no metric gains this much: stop after patience
        "checkpoint.every_n_steps=2",
    ]
    result = pkg.loop.train(make_config(*overrides), tmp_path)
    assert result["stopped_early"] and result["step"] == 6  # best at step 2, no gain at 4 and 6
    record = pkg.checkpoints.read_record(tmp_path / "checkpoints" / STEP.format(6))
    assert record["trainer"]["stopped_early"] and record["trainer"]["evals_without_improvement"] == 2


def test_nonfinite_loss_stops_with_step_and_last_finite_loss_keeping_checkpoints(
    pkg, make_config, toy_overrides, tmp_path
):
    # An absurd learning rate: step 1 is finite, its update blows the weights up, step 2 is not.
    # (The preflight overfit check catches this lr before training; it is off to test the loop's own guard.)
    overrides = [*toy_overrides, *ABSURD_LR, "checkpoint.every_n_steps=1"]
    with pytest.raises(pkg.loop.NonFiniteLossError, match=r"step 2: the training loss is (nan|inf).*was \d+\.\d+"):
        pkg.loop.train(make_config(*overrides), tmp_path)
    assert [p.name for p in pkg.checkpoints.list_complete(tmp_path / "checkpoints")] == [STEP.format(1)]
    pkg.checkpoints.verify(tmp_path / "checkpoints" / STEP.format(1))


def test_nonfinite_loss_stops_before_the_next_checkpoint_even_between_log_steps(
    pkg, make_config, toy_overrides, tmp_path
):
    # trainer.nonfinite_loss=stop reads the losses when something leaves the run: here the checkpoint of step 3, long
    # before the first log step. It names the first non-finite step, and that checkpoint is never written.
    overrides = [*toy_overrides, *ABSURD_LR, "trainer.log_every_n_steps=100", "checkpoint.every_n_steps=3"]
    with pytest.raises(pkg.loop.NonFiniteLossError, match=r"step 2: the training loss is (nan|inf).*was \d+\.\d+"):
        pkg.loop.train(make_config(*overrides, "trainer.max_steps=20"), tmp_path)
    assert pkg.checkpoints.list_complete(tmp_path / "checkpoints") == []
    assert not (tmp_path / "model").exists()


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs a POSIX file size limit")
@pytest.mark.parametrize(
    "overrides, message",
    [(["checkpoint.every_n_steps=2"], "could not write a checkpoint into"), ([], "could not write the model into")],
)
def test_a_write_the_disk_refuses_is_one_message_and_leaves_no_part_behind(
    toy_overrides, tmp_path, capsys, overrides, message
):
    """A full disk, as a file size limit (ulimit -f) makes it: the weights, larger than the limit, cannot be written."""
    import resource  # POSIX only

    limit = max(16_000, (toy_model(toy_overrides) / "model.safetensors").stat().st_size // 2)
    run = tmp_path / "run"
    args = [*toy_overrides, "trainer.max_steps=2", *overrides, f"hydra.run.dir={run}"]
    # The data prepared first, unlimited: datasets' cache files of the toy data are not what this test limits.
    assert run_in_process("train.py", [*args[:-1], f"hydra.run.dir={tmp_path / 'warm'}"])[0] == 0
    ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        code, output = run_in_process("train.py", args, capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, ignored)
    assert code == 1 and f"{message} {run}" in output and "File too large" in output, output
    assert "Traceback" not in output
    assert not (run / "model").exists() and not list(run.glob("checkpoints/*"))  # no part of a checkpoint or model


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs a POSIX file size limit")
@pytest.mark.parametrize("limit", [1, 100, 1000, 20_000])
@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_a_write_the_disk_refuses_is_a_write_error_wherever_the_file_stops(pkg, tmp_path, writer, limit):
    """Under a file size limit torch.save's stream writer raised `unexpected pos 576 vs 534`, which was taken for
    another error than a write and went out as a traceback (an optimizer state larger than the limit, when the
    model's weights were not)."""
    import resource  # POSIX only

    state, folder = {"weight": torch.randn(64, 200)}, tmp_path / "checkpoint"
    folder.mkdir()
    ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with pytest.raises(pkg.checkpoints.WriteError, match=f"could not write a checkpoint into {tmp_path}: "):
            with pkg.checkpoints.written("a checkpoint", folder):
                if writer == "torch.save":
                    torch.save(state, folder / "optimizer.bin")
                else:
                    save_file(state, folder / "model.safetensors")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, ignored)
    assert not folder.exists()


def test_the_stop_guard_reads_no_loss_at_a_step_only_when_checked(pkg):
    guard = pkg.loop.NonFiniteGuard(pkg.config.TrainerConfig(), pkg.loop.new_state(seed=0, train_data={}))
    # A tensor on the meta device has no value to read: a per-step check (.item(), a host-device synchronization
    # that leaves a GPU idle) would raise here.
    assert all(guard.allows_update(step, torch.zeros((), device="meta")) for step in (1, 2, 3))
    guard.unchecked.clear()
    for step, loss in [(4, 2.5), (5, 1.5), (6, float("nan")), (7, float("inf"))]:
        assert guard.allows_update(step, torch.tensor(loss))
    with pytest.raises(pkg.loop.NonFiniteLossError, match="step 6: .* is nan; the last finite training loss was 1.5"):
        guard.check()
    assert guard.losses == [2.5, 1.5]


def test_the_guard_stops_on_weights_that_an_update_overflowed(pkg):
    """What leaves a run (an evaluation, a checkpoint, the export) is checked for weights of NaN or inf too: an
    update after a finite loss (a run's last) can overflow them, in fp16 say, and no training loss shows it."""
    guard = pkg.loop.NonFiniteGuard(pkg.config.TrainerConfig(), pkg.loop.new_state(seed=0, train_data={}))
    accelerator = Accelerator(cpu=True)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
        guard.check_all(accelerator, model)  # finite
        with torch.no_grad():
            model[1].weight[0, 1] = float("inf")
            model[0].bias[0] = float("nan")
        with pytest.raises(pkg.loop.NonFiniteLossError, match="^2 weight tensors hold NaN or inf after step 0; "):
            guard.check_all(accelerator, model)
    finally:
        reset_accelerate_state()


def strict_json(path, lines: bool = False):
    """The file's JSON (a list of its lines' with `lines`), refusing the NaN and Infinity that Python's json module
    writes and reads by default."""
    texts = path.read_text().splitlines() if lines else [path.read_text()]
    values = [json.loads(text, parse_constant=lambda name: pytest.fail(f"{path} holds {name}")) for text in texts]
    return values if lines else values[0]


def test_nonfinite_loss_can_be_skipped_and_counted(pkg, make_config, toy_overrides, tmp_path, caplog):
    overrides = [*toy_overrides, *ABSURD_LR, "trainer.max_steps=6", "checkpoint.every_n_steps=3"]
    # Step 1's update, after a finite loss, blows the weights up; steps 2 to 6 are skipped. The weights stay finite
    # but the model's outputs do not: its validation loss is nan, and it is not exported.
    with pytest.raises(pkg.loop.NonFiniteLossError, match="the validation loss after step 6 is nan; the last finite"):
        pkg.loop.train(make_config(*overrides, "trainer.nonfinite_loss=skip"), tmp_path)
    assert not (tmp_path / "model").exists()
    assert "step 6: loss is nan; update skipped (5 so far)" in caplog.text
    # Steps 3 and 6 end on a skipped update: the model that diverged is saved as no checkpoint.
    assert pkg.checkpoints.list_complete(tmp_path / "checkpoints") == []
    assert "step 3: no checkpoint, as its loss was not finite" in caplog.text
    # The logged validation loss is not finite: written as null, so every file stays valid JSON.
    logged = strict_json(tmp_path / "metrics.jsonl", lines=True)
    assert [line["eval/loss"] for line in logged if "eval/loss" in line] == [None]


def test_a_run_that_diverges_with_skipped_updates_keeps_the_checkpoints_from_before(
    pkg, make_config, toy_overrides, tmp_path
):
    every_3 = [*toy_overrides, "checkpoint.every_n_steps=3", "checkpoint.keep_count=1", "scheduler=constant"]
    pkg.loop.train(make_config(*every_3, "trainer.max_steps=3"), tmp_path)
    # Going on at a learning rate that diverges, skipping the non-finite steps: keep_count=1 would prune step 3 for
    # each newer checkpoint, all of a model that no longer works.
    diverging = [*ABSURD_LR, "trainer.nonfinite_loss=skip", "trainer.max_steps=9", "resume=latest"]
    with pytest.raises(pkg.loop.NonFiniteLossError, match="the checkpoints written so far are untouched"):
        pkg.loop.train(make_config(*every_3, *diverging, "resume_allow=[optimizer.lr]"), tmp_path)
    assert [path.name for path in pkg.checkpoints.list_complete(tmp_path / "checkpoints")] == [STEP.format(3)]


def test_skipped_updates_are_bounded_and_a_run_past_the_bound_exports_nothing(
    pkg, make_config, toy_overrides, tmp_path
):
    overrides = [*toy_overrides, *ABSURD_LR, "trainer.nonfinite_loss=skip", "trainer.max_nonfinite_skips=3"]
    with pytest.raises(pkg.loop.NonFiniteLossError, match=r"step 5: .* \(3 updates were skipped already"):
        pkg.loop.train(make_config(*overrides), tmp_path)
    assert not (tmp_path / "model").exists() and not (tmp_path / "metrics.json").exists()


def test_a_checkpoint_of_another_task_is_named_as_such_not_as_every_key_that_differs(
    pkg, make_config, toy_overrides, tmp_path
):
    pkg.loop.train(make_config(*toy_overrides, "trainer.max_steps=2", "checkpoint.every_n_steps=2"), tmp_path)
    checkpoint = tmp_path / "checkpoints" / STEP.format(2)
    other = make_config(*toy_overrides, f"resume='{checkpoint}'", "task._target_=my_tasks.Segmentation")
    with pytest.raises(pkg.run_folder.RunFolderError) as refused:
        pkg.run_folder.check_resume(checkpoint, other, num_processes=1)
    message = str(refused.value)
    assert "is a checkpoint of task=" in message and "this run is task=my_tasks.Segmentation" in message
    assert "\n" not in message  # one line, not the thirty keys in which two tasks' configs differ


def test_resume_keeps_what_the_checkpoint_trained_on_and_lets_the_rest_change(pkg, make_config):
    def changes(*overrides, num_processes=1, allowed=(), schedule="constant"):
        base = [
            f"scheduler={schedule}",
            "data.batch_size=8",
            "trainer.max_steps=100",
            "trainer.seed=1",
            "optimizer.lr=0.1",
        ]
        saved = {**pkg.config.to_container(make_config(*base)), "num_processes": 1}
        new = {**pkg.config.to_container(make_config(*base, *overrides)), "num_processes": num_processes}
        return pkg.run_folder.resume_problems(saved, new, allowed)

    safe = ["trainer.max_steps=99999", "trainer.eval_every_n_steps=7", "checkpoint.keep=best", "checks.enabled=false"]
    assert changes(*safe, "data.eval_batch_size=3", "resume=latest") == []
    assert changes("data.batch_size=4", "trainer.seed=2") == ["data.batch_size: 8 -> 4", "trainer.seed: 1 -> 2"]
    assert changes("data.batch_size=4", allowed=["data.batch_size"]) == []
    assert changes(num_processes=2) == ["num_processes: 1 -> 2"]
    assert changes("optimizer.lr=0.5") == ["optimizer.lr: 0.1 -> 0.5"]  # it changes the run: only on purpose
    assert changes("+model.config.foo=4", allowed=["model"]) == []
    assert changes("+model.config.foo=4") == ["model.config.foo: (unset) -> 4"]
    empty, one_key = {"model": {"config": {}}}, {"model": {"config": {"foo": 4}}}
    assert pkg.run_folder.resume_problems(empty, one_key) == ["model.config.foo: (unset) -> 4"]
    # A decaying schedule is laid out over trainer.max_steps: a new length would make its learning rate jump.
    assert changes("trainer.max_steps=99999", schedule="linear") == ["trainer.max_steps: 100 -> 99999"]


# An optimizer setting that a resume changes on purpose -> what the optimizer's param groups must then hold, and the
# kind of state it keeps per parameter.
ADAMW_STATE = {"step", "exp_avg", "exp_avg_sq"}
OPTIMIZER_CHANGES = {
    "optimizer.lr=1e-4": ({"lr": 1e-4}, ADAMW_STATE),  # the schedule is constant: the config's lr from now on
    "optimizer.weight_decay=0.5": ({"weight_decay": 0.5}, ADAMW_STATE),  # the group of matrices
    "optimizer.beta2=0.9": ({"betas": (0.9, 0.9)}, ADAMW_STATE),
    "optimizer=sgd": ({"momentum": 0.9}, {"momentum_buffer"}),  # another kind: adamw's moments are not its own
}


@pytest.mark.parametrize("change", sorted(OPTIMIZER_CHANGES))
def test_an_optimizer_change_that_resume_allow_accepts_takes_effect(pkg, make_config, checkpointed, change, tmp_path):
    pkg.loop.train(make_config(*checkpointed), tmp_path / "run")
    resume = [f"resume={tmp_path / 'run' / 'checkpoints' / STEP.format(5)}", "resume_allow=[optimizer]"]
    pkg.loop.train(make_config(*checkpointed, "trainer.log_every_n_steps=1", change, *resume), tmp_path / "resumed")
    optimizer = torch.load(tmp_path / "resumed" / "checkpoints" / STEP.format(10) / "optimizer.bin", weights_only=True)
    (decayed, *_), settings, state = optimizer["param_groups"], *OPTIMIZER_CHANGES[change]
    assert {key: decayed[key] for key in settings} == settings
    assert {key for parameter in optimizer["state"].values() for key in parameter} == state
    logged = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    rates = {line["train/lr"] for line in logged if "train/lr" in line}
    assert rates == {decayed["lr"]}, rates  # every step after the resume, not only in the saved state


def test_train_refuses_a_folder_of_another_run_and_a_resume_that_changes_the_run(
    pkg, make_config, checkpointed, tmp_path
):
    pkg.loop.train(make_config(*checkpointed), tmp_path)
    before = sorted(path.name for path in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(pkg.run_folder.RunFolderError, match="holds another run .* starts from scratch"):
        pkg.loop.train(make_config(*checkpointed), tmp_path)
    with pytest.raises(pkg.run_folder.RunFolderError, match="data.batch_size: 8 -> 4"):
        pkg.loop.train(make_config(*checkpointed, "resume=latest", "data.batch_size=4"), tmp_path)
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == before


def test_only_a_run_that_continues_a_folder_may_start_in_it(pkg, tmp_path):
    used, fresh = tmp_path / "used", tmp_path / "fresh"
    used.mkdir()
    (used / "metrics.json").write_text("{}")
    own, foreign = used / "checkpoints" / STEP.format(5), fresh / "checkpoints" / STEP.format(5)
    pkg.run_folder.refuse_reuse(used, str(own))
    for resume in (None, "latest", str(foreign)):
        pkg.run_folder.refuse_reuse(fresh, resume)
    with pytest.raises(pkg.run_folder.RunFolderError, match=r"holds another run \(metrics.json\).*no checkpoint of"):
        pkg.run_folder.refuse_reuse(used, "latest")  # no checkpoint to continue from
    with pytest.raises(pkg.run_folder.RunFolderError, match="resumes from another folder's checkpoint"):
        pkg.run_folder.refuse_reuse(used, str(foreign))


def test_deterministic_mode_turns_on_deterministic_algorithms(pkg, make_config, toy_overrides, tmp_path):
    try:
        first = pkg.loop.train(make_config(*toy_overrides, "trainer.deterministic=true"), tmp_path / "a")
        assert torch.are_deterministic_algorithms_enabled()
        second = pkg.loop.train(make_config(*toy_overrides, "trainer.deterministic=true"), tmp_path / "b")
        assert first["losses"] == second["losses"]
    finally:
        torch.use_deterministic_algorithms(False)


def test_sigterm_ends_a_run_as_ctrl_c_does_saying_where_it_stopped(pkg, endless, tmp_path):
    """A cluster's time limit or preemption sends SIGTERM (then SIGKILL): the run says where it stopped and what
    resume=latest continues from, and exits with 143 (Python's default ended the process without a word)."""
    run_dir = tmp_path / "terminated"
    process = ForkedScript("train.py", [*endless, f"hydra.run.dir={run_dir}"], tmp_path / "terminated.out")
    try:
        deadline = time.monotonic() + 120
        while not pkg.checkpoints.list_complete(run_dir / "checkpoints") and time.monotonic() < deadline:
            time.sleep(0.05)
        process._signal(signal.SIGTERM)
        assert process.wait() == 143, process.tail()
    finally:
        process.kill()
    assert "Error: terminated (SIGTERM) at step " in process.tail(), process.tail()
    assert f"`resume=latest hydra.run.dir={run_dir}` would continue from " in process.tail()


def test_run_killed_by_sigkill_resumes_losing_only_steps_since_its_last_checkpoint(pkg, make_config, endless, tmp_path):
    run_dir = tmp_path / "killed"
    torch.set_num_threads(1)  # the forked run's thread count here too: bit-equal arithmetic in both (reset after)
    process = ForkedScript("train.py", [*endless, f"hydra.run.dir={run_dir}"], tmp_path / "killed.out")
    try:
        deadline = time.monotonic() + 120
        while len(pkg.checkpoints.list_complete(run_dir / "checkpoints")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        process.kill()  # SIGKILL
    found = pkg.checkpoints.list_complete(run_dir / "checkpoints")
    assert len(found) >= 2, "the run made no checkpoints before the deadline"
    last = pkg.checkpoints.read_record(found[-1])["trainer"]["step"]
    # Its output, as a terminal shows it (a progress bar redraws its line after each \r): log lines above the bar.
    shown = re.split(r"[\r\n]", (tmp_path / "killed.out").read_text())
    assert [line for line in shown if "checkpoint saved" in line]
    assert not [line for line in shown if "checkpoint saved" in line and "%|" in line]

    # Resume the killed run in its own folder and go 5 steps beyond its last checkpoint...
    until = [*endless[:-1], f"trainer.max_steps={last + 5}"]
    pkg.loop.train(make_config(*until, "resume=latest"), run_dir)
    # ...which must land exactly where an uninterrupted run of the same length lands.
    pkg.loop.train(make_config(*until), tmp_path / "uninterrupted")
    assert_same_weights(final_weights(run_dir), final_weights(tmp_path / "uninterrupted"))
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == last + 5
