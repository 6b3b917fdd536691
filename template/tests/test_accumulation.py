"""Gradient accumulation is exact: k micro-batches of b give the update of one batch of k*b."""

import torch
from accelerate import Accelerator
from conftest import reset_accelerate_state
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

# Summing the same numbers in another order (per micro-batch, then across them) moves float32
# results by a few ulps; 1e-6 is far below any real difference (the averaging bug below is ~1e-2).
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def test_batch_8_with_4_accumulation_steps_updates_like_batch_32(pkg, make_config, toy_overrides, tmp_path):
    # A warmup schedule too: stepped per micro-batch instead of per optimizer step, it would differ.
    # SGD, not Adam: Adam divides by the gradient's own size, so ulp-level differences in near-zero gradients
    # (summation order, thread count) would become whole-step differences in those weights.
    # (SGD at its default lr learns too slowly for the preflight overfit check, which is not under test here.)
    common = [
        *toy_overrides,
        "optimizer=sgd",
        "checks.overfit_batch=false",
        "trainer.max_steps=3",
        "scheduler=linear",
        "scheduler.warmup_steps=2",
    ]
    pkg.loop.train(make_config(*common, "data.batch_size=8", "trainer.gradient_accumulation_steps=4"), tmp_path / "a")
    pkg.loop.train(make_config(*common, "data.batch_size=32", "trainer.gradient_accumulation_steps=1"), tmp_path / "b")
    accumulated, single = (load_file(tmp_path / run / "model" / "model.safetensors") for run in "ab")
    assert all(torch.allclose(accumulated[name], single[name], **TOLERANCE) for name in single)
    assert any(not torch.equal(accumulated[name], single[name]) for name in single)  # not the same code path


def tiny_lm(accumulation_steps: int) -> tuple:
    """A tiny causal LM (no dropout, same init every time) prepared by a fresh Accelerator."""
    reset_accelerate_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation_steps)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    config.bos_token_id = config.eos_token_id = 0
    return accelerator, accelerator.prepare(GPT2LMHeadModel(config))


def lm_gradients(pkg, micro_batches: list) -> dict:
    """Gradients of the tiny causal LM after one accumulation cycle over `micro_batches`."""
    accelerator, model = tiny_lm(len(micro_batches))
    # The base task's loss: cross-entropy of the logits against labels that are already shifted.
    pkg.loop.accumulate_cycle(accelerator, pkg.tasks_base.Task(), model, micro_batches)
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def padded_lm_batch(sequences: list) -> dict:
    """Right-padded inputs; labels shifted for next-token prediction, -100 where there is no next token."""
    length = max(len(s) for s in sequences)
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, tokens in enumerate(sequences):
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        attention_mask[row, : len(tokens)] = 1
        labels[row, : len(tokens) - 1] = torch.tensor(tokens[1:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_token_level_loss_is_normalized_over_the_whole_cycle(pkg):
    generator = torch.Generator().manual_seed(0)
    lengths = [3, 20, 4, 5, 18, 19, 2, 6]  # micro-batches of very different real-token counts
    sequences = [torch.randint(1, 50, (n,), generator=generator).tolist() for n in lengths]
    micro = [padded_lm_batch(sequences[i : i + 2]) for i in range(0, 8, 2)]

    accumulated = lm_gradients(pkg, micro)
    single = lm_gradients(pkg, [padded_lm_batch(sequences)])
    assert all(torch.allclose(accumulated[name], single[name], **TOLERANCE) for name in single)

    # The bug this guards against: the mean of per-micro-batch mean losses weighs tokens unequally.
    _, model = tiny_lm(1)
    for batch in micro:
        items = (batch["labels"] != -100).sum()
        (pkg.tasks_base.Task().loss(model, batch) / items / len(micro)).backward()
    naive = {name: p.grad for name, p in model.named_parameters()}
    assert not torch.allclose(naive["transformer.wte.weight"], single["transformer.wte.weight"], **TOLERANCE)
