"""Your own module (model._target_) as a researcher first writes it, for every task: the mistakes that trained without
an error, or failed late with a traceback, are refused before the first step with one message naming the fix."""

import importlib

import pytest
import torch
from conftest import PACKAGE, TASKS, compose_config, run_in_process


class Scores(torch.nn.Module):
    """Your own module of any task: one learnt score per class or token, at every position the task labels ([B,
    classes] for a classifier, [B, T, vocabulary] for texts out). The arguments make the mistakes of the tests."""

    def __init__(
        self,
        extra_outputs: int = 0,
        reads_ahead: bool = False,
        own_loss: bool = False,
        returns: str = "tensor",
        lazy: bool = False,
        frozen: bool = False,
        **sizes,
    ):
        super().__init__()
        self.outputs = (sizes.get("num_labels") or sizes["vocab_size"]) + extra_outputs
        self.per_token = "num_labels" not in sizes
        self.bias = torch.nn.Parameter(torch.zeros(self.outputs))
        self.ahead = torch.nn.LazyLinear(1) if lazy else torch.nn.Linear(1, 1)
        if frozen:
            self.requires_grad_(False)
        self.reads_ahead, self.own_loss, self.returns = reads_ahead, own_loss, returns

    def forward(self, **inputs):
        # The sequence it predicts: the labels a task of texts out passes, else the tokens of a language model.
        sequence = inputs.get("labels", inputs.get("input_ids"))
        first = next(iter(inputs.values()))
        shape = sequence.shape if self.per_token else first.shape[:1]
        scores = self.bias.expand(*shape, self.outputs)
        if self.reads_ahead:  # every position sees the last one: the answer it is to give
            scores = scores + self.ahead(sequence[:, -1:, None].clamp(min=0).float())
        if self.returns == "tuple":
            return (scores,)
        if self.own_loss:
            return {"logits": scores, "loss": scores.sum()}
        return {"logits": scores} if self.returns == "dict" else scores

    def generate(self, input_ids, attention_mask, max_new_tokens, num_beams, do_sample):
        return input_ids  # a task of texts out asks for one


import_target = importlib.import_module(f"{PACKAGE}.config").import_target


def own_module(toy: list, tmp_path, *config: str) -> list:
    target = f"model._target_={__name__}.Scores"
    return [*toy, "model.name_or_path=null", "model.model_type=null", target, *config, f"hydra.run.dir={tmp_path}"]


def predicts_in_order(task: str) -> bool:
    """Whether the task predicts a sequence in order (Task.predicted_in_order): a position must not read ahead."""
    return import_target("task._target_", compose_config(f"task={task}").task._target_).predicted_in_order is not None


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize(
    "config, message",
    [
        # A 4-way head for 3 classes trained without a word; a narrower one failed at the first evaluation.
        (["+model.config.extra_outputs=1"], "and the task has"),
        (["+model.config.reads_ahead=true"], "so it reads what it is to predict"),
        (["+model.config.returns=tuple"], "the model returned a tuple without logits"),
        (["+model.config.lazy=true"], "has lazy layers (nn.LazyLinear, ...)"),
        (["+model.config.frozen=true"], "has no trainable parameters"),
        (["+model.config.extra_outputs=abc"], "model.config.extra_outputs='abc' is a str, and"),
        (["+model.config.own_loss=yes"], "model.config.own_loss='yes' is a str, and"),
    ],
)
def test_own_module_mistakes_are_refused_before_the_first_step(task, config, message, toys, tmp_path, capsys):
    if "reads_ahead" in config[0] and not predicts_in_order(task):
        pytest.skip("a classifier predicts no sequence: nothing to read ahead")
    code, output = run_in_process("train.py", own_module(toys(task), tmp_path / "run", *config), capsys)
    assert code == 1 and message in output, output
    assert "Traceback" not in output and not (tmp_path / "run" / "checkpoints").exists(), output


@pytest.mark.parametrize("task", TASKS)
def test_own_module_that_returns_a_dict_trains_and_its_own_loss_is_said_to_go_unused(task, toys, tmp_path, capsys):
    for name, config, warned in [
        ("dict", "+model.config.returns=dict", False),
        ("loss", "+model.config.own_loss=true", True),
    ]:
        args = own_module(toys(task), tmp_path / name, config, "trainer.max_steps=2")
        code, output = run_in_process("train.py", args, capsys)
        assert code == 0, output
        assert ("returns a loss of its own, which goes unused" in output) == warned, output
