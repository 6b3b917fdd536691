"""Preflight checks: each passes on the toy setup and fails on a setup broken on purpose, with a message naming
the check, what it expected, what it saw and its off switch; and a run with checks is bit-identical to one
without."""

import importlib
import logging
import re
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import CHECKS_ON, PACKAGE, toy_model
from safetensors.torch import load_file, save_file

checks = importlib.import_module(f"{PACKAGE}.checks")
optim = importlib.import_module(f"{PACKAGE}.optim")
CHECKS = ["inputs", "init_loss", "validation", "gradient_flow", "overfit_batch", "checkpoint_round_trip"]


def assert_names_check(error, check: str, *fragments: str) -> None:
    message = str(error.value)
    assert f"preflight check {check} failed: expected " in message and "; saw " in message
    assert f"checks.{check}=false" in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture
def toy_overrides(toy_overrides):
    """The toy run, with the preflight checks that this file tests."""
    return [*toy_overrides, CHECKS_ON]


@pytest.fixture
def toy(pkg, make_config, toy_overrides, tmp_path):
    """The toy run, built and prepared by the loop's own setup, and two training batches."""

    def build(*overrides, register_scheduler=True):
        run = pkg.loop.setup(make_config(*toy_overrides, *overrides), tmp_path)
        if not register_scheduler:  # a schedule the accelerator does not know about, so checkpoints miss it
            run = replace(run, scheduler=optim.build_scheduler(run.cfg.scheduler, run.optimizer, 10))
        return SimpleNamespace(run=run, batches=checks.take_batches(run.train_dl, 2))

    return build


def test_checks_pass_and_leave_the_run_bit_identical(pkg, make_config, toy_overrides, tmp_path, caplog):
    # The tiny random model: dropout draws from the RNG, so the checks must restore it; accumulation and
    # warmup make the step counter and the schedule matter too.
    overrides = [o for o in toy_overrides if not o.startswith("model.")] + [
        "trainer.max_steps=6",
        "scheduler=linear",
        "scheduler.warmup_steps=2",
        "trainer.gradient_accumulation_steps=2",
    ]
    caplog.set_level(logging.INFO, logger=checks.__name__)
    checked = pkg.loop.train(make_config(*overrides), tmp_path / "checked")
    for name in CHECKS:
        assert re.search(f"preflight {name}: passed in", caplog.text), caplog.text
    assert not (tmp_path / "checked" / checks.TEMP_FOLDER).exists()

    unchecked = pkg.loop.train(make_config(*overrides, "checks.enabled=false"), tmp_path / "unchecked")
    assert checked["losses"] == unchecked["losses"]
    final = [load_file(tmp_path / run / "model" / "model.safetensors") for run in ("checked", "unchecked")]
    assert all(torch.equal(final[0][name], final[1][name]) for name in final[0])


def save_broken_copy(overrides: list, folder: Path, change) -> Path:
    """A copy of the toy's saved model with `change` applied to every floating-point weight: a setup broken on
    purpose, saved like any other model (whatever the task and architecture)."""
    source = toy_model(overrides)
    shutil.copytree(source, folder)
    weights = load_file(source / "model.safetensors")
    changed = {name: change(t) if t.is_floating_point() else t for name, t in weights.items()}
    save_file(changed, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_init_loss_far_from_uniform_names_both_numbers(pkg, make_config, toy_overrides, tmp_path):
    broken = save_broken_copy(toy_overrides, tmp_path / "model", lambda weight: weight * 30)  # over-confident
    cfg = make_config(*toy_overrides, f"model.name_or_path='{broken}'")  # the later override wins
    run = pkg.loop.setup(cfg, tmp_path / "setup")
    initial = run.task.expected_init_loss(run.accelerator.unwrap_model(run.model))
    if initial is None:
        # A saved language model may have learnt anything (its task tests the check on a model from scratch).
        pytest.skip("the task expects no particular initial loss from a saved model")
    with pytest.raises(checks.PreflightError) as error:
        pkg.loop.train(cfg, tmp_path / "run")
    assert_names_check(error, "init_loss", "the mean loss of the untrained model", f" of {initial:.4g}")


def test_validation_with_non_finite_metrics_fails(pkg, make_config, toy_overrides, tmp_path):
    broken = save_broken_copy(toy_overrides, tmp_path / "model", lambda weight: torch.full_like(weight, float("nan")))
    cfg = make_config(*toy_overrides, f"model.name_or_path='{broken}'", "checks.init_loss=false")
    with pytest.raises(checks.PreflightError) as error:
        pkg.loop.train(cfg, tmp_path / "run")
    assert_names_check(error, "validation", "finite metrics", "'loss': nan")


def test_overfit_fails_when_the_setup_cannot_learn_and_its_switch_turns_it_off(
    pkg, make_config, toy_overrides, tmp_path
):
    with pytest.raises(checks.PreflightError) as error:
        pkg.loop.train(make_config(*toy_overrides, "optimizer.lr=1e-9", "checks.overfit_steps=20"), tmp_path / "run")
    assert_names_check(
        error, "overfit_batch", "checks.overfit_steps=20", "checks.overfit_examples=8", "checks.overfit_factor=1.5"
    )
    assert "in 20 steps" in str(error.value)

    cfg = make_config(*toy_overrides, "optimizer.lr=1e-9", "checks.overfit_batch=false")
    assert pkg.loop.train(cfg, tmp_path)["step"] == cfg.trainer.max_steps


def test_overfit_warns_when_the_loss_falls_short_of_the_target(toy, caplog):
    # A target no model reaches in 20 steps: 1e6 was reached by a tabular task's MLP.
    setup = toy("checks.overfit_steps=20", "checks.overfit_factor=1e30")
    caplog.set_level(logging.WARNING, logger=checks.__name__)
    summary = checks.check_overfit_batch(setup.run, setup.batches[0])  # logged as the check passed: not silent
    assert summary.endswith("in 20 steps, short of the target: the warning above"), summary
    assert "preflight overfit_batch warning: the model learns slowly" in caplog.text, caplog.text


def test_overfit_stops_early_once_the_target_is_reached(toy):
    setup = toy()
    summary = checks.check_overfit_batch(setup.run, setup.batches[0])
    steps = int(re.search(r"in (\d+) steps", summary).group(1))
    assert steps < 200 and steps % checks.OVERFIT_EVERY == 0, summary


def own_layer(model) -> torch.nn.Module:
    """The model's first layer with weights of its own: an embedding tied to the output layer would still get a
    gradient there."""
    layers = list(model.modules())[1:]  # not the model itself, which may hold parameters a test registered
    owners = Counter(id(parameter) for module in layers for parameter in module.parameters(recurse=False))
    return next(
        module
        for module in layers
        if (own := list(module.parameters(recurse=False))) and all(owners[id(parameter)] == 1 for parameter in own)
    )


def test_gradient_flow_warns_of_an_unused_parameter_and_fails_on_one_cut_off(toy, caplog):
    setup = toy()
    model = setup.run.accelerator.unwrap_model(setup.run.model)
    caplog.set_level(logging.WARNING, logger=checks.__name__)
    checks.check_gradient_flow(setup.run, setup.batches)
    assert "preflight gradient_flow warning" not in caplog.text  # every parameter the toy has is used

    model.register_parameter("unused", torch.nn.Parameter(torch.ones(3)))  # never used by the forward
    checks.check_gradient_flow(setup.run, setup.batches)
    assert re.search(r"preflight gradient_flow warning: 1 trainable .* \(unused\)", caplog.text), caplog.text
    assert "trainer.find_unused_parameters=true" in caplog.text

    # A bug: the first layer's output is detached, so its weights shape the loss but get no gradient.
    first = own_layer(model)
    first.register_forward_hook(lambda module, inputs, output: output.detach())
    with pytest.raises(checks.PreflightError) as error:
        checks.check_gradient_flow(setup.run, setup.batches)
    cut = [name for name, _ in first.named_parameters()]
    assert_names_check(error, "gradient_flow", "change the loss but get no gradient (cut off)", *cut)
    assert "unused" not in str(error.value).split("(cut off)")[1]  # still only a warning in one process


class OwnBackward(torch.autograd.Function):
    """As in Reformer's reversible layers: `layer`'s weights are no input of the Function, whose backward runs the
    layer again and a backward of its own. That writes their .grad; torch.autograd.grad returns None for them."""

    @staticmethod
    def forward(ctx, hidden, layer):
        ctx.save_for_backward(hidden)
        ctx.layer = layer
        return layer(hidden)  # without a graph, as in every forward of a Function

    @staticmethod
    def backward(ctx, grad_output):
        with torch.enable_grad():
            hidden = ctx.saved_tensors[0].detach().requires_grad_()
            torch.autograd.backward(ctx.layer(hidden), grad_output)
        return hidden.grad, None


class GainThroughOwnBackward(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Linear(1, 1, bias=False)

    def forward(self, hidden):
        return OwnBackward.apply(hidden, lambda x: x * self.gain.weight)


class PaddingIds(torch.nn.Module):
    """An embedding that sees only its padding id (as RoCBert's shape and pronunciation ids, which default to it)."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(3, 1, padding_idx=0)

    def forward(self, hidden):
        ids = torch.zeros(hidden.shape[:-1], dtype=torch.long, device=hidden.device)
        spread = torch.arange(hidden.shape[-1], device=hidden.device)  # not a shift, which a layer norm would undo
        return hidden + self.embedding(ids) * spread


class Top1Router(torch.nn.Module):
    """A mixture of two experts (gains), one per item, chosen by a router from the first feature. The chosen
    expert's weight is a softmax over itself: 1 whatever the router's weights, so their gradient is exactly zero,
    although changing them changes which expert is chosen."""

    def __init__(self):
        super().__init__()
        self.router = torch.nn.Linear(1, 2, bias=False)
        torch.nn.init.zeros_(self.router.weight)  # a tie: expert 0 for all; a random change splits the items
        self.experts = torch.nn.Parameter(torch.tensor([1.0, 0.5]))

    def forward(self, hidden):
        top = self.router(hidden[..., :1]).topk(1)
        weight = top.values.softmax(-1)
        return hidden * weight * self.experts[top.indices]


@pytest.mark.parametrize(
    "extra, weight, warned",
    [
        # It gets its gradient in .grad, from the backward inside: counted, and no warning.
        (GainThroughOwnBackward, "gain.weight", None),
        # The padding row is constant by design; the other rows go unused.
        (PaddingIds, "embedding.weight", "unused"),
        # It will not learn (a warning), but nothing cut its gradient off.
        (Top1Router, "router.weight", "with a flat loss"),
    ],
)
def test_gradient_flow_passes_parameters_that_autograd_grad_finds_no_gradient_for_but_no_bug_cut_off(
    toy, caplog, extra, weight, warned
):
    setup = toy()
    model = setup.run.accelerator.unwrap_model(setup.run.model)
    model.add_module("extra", extra())
    own_layer(model).register_forward_hook(lambda module, inputs, output: model.extra(output))
    name, weight = f"extra.{weight}", model.get_parameter(f"extra.{weight}")
    weight.grad = torch.full_like(weight, 7.0)
    caplog.set_level(logging.WARNING, logger=checks.__name__)
    summary = checks.check_gradient_flow(setup.run, setup.batches)
    assert torch.equal(weight.grad, torch.full_like(weight, 7.0))  # the gradients are left as they were
    warnings = [r.getMessage() for r in caplog.records if "preflight gradient_flow warning" in r.getMessage()]
    assert len(warnings) == (warned is not None), warnings
    if warned:  # naming only this tensor: the experts get a gradient as usual
        assert f", 1 {warned}" in summary and f"({name})" in warnings[0], warnings
    if warned == "with a flat loss":
        assert "exactly zero" in warnings[0] and "will not learn" in warnings[0], warnings


class CountsCalls(torch.nn.Module):
    """A count of training calls in a buffer that state_dict leaves out (persistent=False)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()), persistent=False)

    def forward(self, hidden):
        if self.training:
            self.calls += 1
        return hidden


def test_checkpoint_round_trip_warns_of_buffers_no_checkpoint_holds_and_the_checks_put_them_back(toy, caplog):
    setup = toy()
    model = setup.run.accelerator.unwrap_model(setup.run.model)
    model.add_module("extra", CountsCalls())
    own_layer(model).register_forward_hook(lambda module, inputs, output: model.extra(output))
    caplog.set_level(logging.WARNING, logger=checks.__name__)
    checks.check_checkpoint_round_trip(setup.run, setup.batches[0])
    assert model.extra.calls.item() == 0  # as before the check: a run with checks is the run without them
    assert "training changes buffers that no checkpoint or export holds (extra.calls)" in caplog.text, caplog.text


@pytest.mark.parametrize("key, value", [("labels", "outputs"), ("labels", -1), ("input_ids", 10**6)])
def test_inputs_out_of_range_fail_before_any_forward_pass(toy, key, value):
    setup = toy()
    checks.check_inputs(setup.run, setup.batches)
    if key not in setup.batches[1]:
        pytest.skip(f"this task's batches have no {key}")
    if setup.batches[1][key].is_floating_point():
        pytest.skip(f"this task's {key} are real-valued targets: no value is out of range")
    outputs = setup.run.task.num_outputs(setup.run.accelerator.unwrap_model(setup.run.model))
    value = outputs if value == "outputs" else value  # one past the last class (or token) id
    setup.batches[1][key][0, ...] = value
    with pytest.raises(checks.PreflightError) as error:
        checks.check_inputs(setup.run, setup.batches)
    seen = f"to {value}" if value > 0 else "from -1"
    expected = f"labels in [0, {outputs}) or ignored" if key == "labels" else "ids inside the embedding table"
    assert_names_check(error, "inputs", expected, seen)


def test_inputs_without_tokens_fail(toy):
    setup = toy()
    if "input_ids" not in setup.batches[1]:
        pytest.skip("this task's batches have no input_ids")
    setup.batches[1]["input_ids"] = setup.batches[1]["input_ids"][:, :0]  # what a tokenizer without a vocabulary gives
    with pytest.raises(checks.PreflightError) as error:
        checks.check_inputs(setup.run, setup.batches)
    assert_names_check(error, "inputs", "no tokens at all")


def test_round_trip_fails_when_the_scheduler_is_not_checkpointed(toy, tmp_path):
    setup = toy(register_scheduler=False)
    with pytest.raises(checks.PreflightError) as error:
        checks.check_checkpoint_round_trip(setup.run, setup.batches[0])
    assert_names_check(error, "checkpoint_round_trip", "scheduler.last_epoch")
    assert not (tmp_path / checks.TEMP_FOLDER).exists()


class RunNotes:
    """A checkpointed object whose state needs pickled code to load: a Path is not among torch's safe types."""

    def __init__(self):
        self.folder = Path("data")

    def state_dict(self):
        return {"folder": self.folder}

    def load_state_dict(self, state):
        self.folder = state["folder"]


def test_round_trip_fails_when_a_file_needs_pickled_code_to_load(toy, tmp_path):
    setup = toy()
    setup.run.accelerator.register_for_checkpointing(RunNotes())
    with pytest.raises(checks.PreflightError) as error:
        checks.check_checkpoint_round_trip(setup.run, setup.batches[0])
    assert_names_check(error, "checkpoint_round_trip", "do not load on the CPU with weights_only=True", "PosixPath")
    # Only the file that needs pickled code is named (the scheduler, prepared by the loop, is plain data).
    assert "custom_checkpoint_0.pkl" in str(error.value) and "scheduler.bin" not in str(error.value)


def tamper_model_file(path) -> tuple:
    """Change the smallest weight tensor (a bias or a norm: never one tied to another); return where it shows."""
    tensors = load_file(path / "model.safetensors")
    name = min((n for n, t in tensors.items() if t.is_floating_point()), key=lambda n: (tensors[n].numel(), n))
    tensors[name] += 1
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return (f"model.{name}",)


def drop_rng_file(path) -> tuple:
    (path / "random_states_0.pkl").unlink()  # Accelerate then only logs "Could not load random states"
    return ("rng.", "step")  # the step is in it


@pytest.mark.parametrize("tamper", [tamper_model_file, drop_rng_file])
def test_the_round_trip_comparison_catches_a_tampered_checkpoint(pkg, toy, tmp_path, tamper):
    setup = toy()
    run = setup.run
    checks.train_step(run, setup.batches[0])
    saved = checks.snapshot(run)
    path = pkg.checkpoints.save(run.accelerator, tmp_path / "ckpt", {"step": 1})
    pkg.checkpoints.load(run.accelerator, path)
    assert checks.differences(saved, checks.snapshot(run)) == []

    changed = tamper(path)
    with pytest.raises(pkg.checkpoints.CorruptCheckpointError):  # resume refuses it by its checksums...
        pkg.checkpoints.load(run.accelerator, path)
    checks.perturb(run)
    run.accelerator.load_state(str(path))  # ...and the round-trip comparison would catch it too
    found = checks.differences(saved, checks.snapshot(run))
    assert found and all(place.startswith(changed) for place in found), found


def test_taking_batches_leaves_the_dataloader_as_it_was(toy):
    train_dl = toy().run.train_dl
    generator_state, rng_state = train_dl.generator.get_state(), torch.get_rng_state()
    first = checks.take_batches(train_dl, 2)
    assert torch.equal(train_dl.generator.get_state(), generator_state)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert train_dl.gradient_state.active_dataloader is None  # not left registered as if mid-pass
    again = checks.take_batches(train_dl, 2)[1]
    assert all(torch.equal(again[key], first[1][key]) for key in first[1])  # whatever the inputs (ids, pixels)


@pytest.mark.parametrize(
    "override, problem",
    [
        ("checks.overfit_factor=1", "checks.overfit_factor=1.0 is out of range: it must be > 1"),
        ("checks.validation_batches=0", "checks.validation_batches=0 is out of range: it must be >= 1"),
    ],
)
def test_nonsense_check_settings_fail_validation(pkg, make_config, override, problem):
    with pytest.raises(pkg.config.ConfigError, match=re.escape(problem)):
        pkg.config.validate(make_config(override))
