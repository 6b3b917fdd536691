"""Mixed precision: bf16 really runs (also on a CPU) and trains like fp32. fp16 without a GPU: see test_config.py."""

import torch
from conftest import reset_accelerate_state
from safetensors.torch import load_file

# Tolerances measured on every task's toy run with 24 (text) or 6 (image, causal LM, sequence-to-sequence) model
# inits, bf16 against fp32. Over the first 10 steps the losses stay within 0.34% of each other (largest: the image
# toy). Later, training amplifies the rounding: one text init drifted 2.4e-2 apart at step 27 (which once failed a
# fixed 1e-2 bound when the toy's init depended on the tests that ran before it), one causal-LM init 0.48 (16%), yet
# every init ends at the same accuracy, and perplexities stay within 3.3%. So: tight where rounding alone acts, and
# the same destination: final validation losses apart by at most a tenth of the loss the runs start from (measured
# on 4 inits of each task: at most 0.15%, a causal LM's; a relative bound on the metric would fail a metric that
# heads for 0, a regression's error, where bf16's rounding is a floor).
EARLY_STEPS, EARLY_RELATIVE = 10, 1e-2
FINAL_LOSS_SHARE = 0.1


def test_bf16_autocasts_and_its_losses_track_fp32(pkg, make_config, toy_overrides, tmp_path):
    fp32 = pkg.loop.train(make_config(*toy_overrides), tmp_path / "fp32")
    reset_accelerate_state()  # the next Accelerator has another mixed precision
    bf16 = pkg.loop.train(make_config(*toy_overrides, "trainer.mixed_precision=bf16"), tmp_path / "bf16")
    assert bf16["losses"] != fp32["losses"]  # autocast is on: fp16 on a CPU, by contrast, silently computes in fp32
    early = zip(bf16["losses"][:EARLY_STEPS], fp32["losses"][:EARLY_STEPS])
    assert all(abs(a - b) <= EARLY_RELATIVE * abs(b) for a, b in early), (bf16["losses"], fp32["losses"])
    final = bf16["metrics"]["loss"], fp32["metrics"]["loss"]
    assert abs(final[0] - final[1]) <= FINAL_LOSS_SHARE * fp32["losses"][0], (final, fp32["losses"][0])
    weights = load_file(tmp_path / "bf16" / "model" / "model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())  # autocast leaves fp32 master weights


def test_the_config_decides_and_says_so_when_accelerate_launch_asks_for_other_precision_or_compile(
    pkg, make_config, tmp_path, monkeypatch, caplog
):
    # What `accelerate launch --mixed_precision bf16 --dynamo_backend inductor` (or a default config file of
    # `accelerate config`) passes on to the processes it starts.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    accelerator = pkg.loop.make_accelerator(make_config("trainer.log_with=none").trainer, tmp_path)
    assert accelerator.mixed_precision == "no" and accelerator.state.dynamo_plugin.backend.value == "NO"
    assert "accelerate launch asks for mixed precision bf16 (--mixed_precision), and trainer.mixed_precision=no" in (
        caplog.text
    )
    assert "add trainer.mixed_precision=bf16 to use it" in caplog.text
    assert "add trainer.compile=true to compile" in caplog.text
