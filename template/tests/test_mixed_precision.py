"""Mixed precision: bf16 really runs (also on a CPU) and trains like fp32. fp16 without a GPU: see test_config.py."""

import pytest
import torch
from conftest import reset_accelerate_state
from safetensors.torch import load_file


def test_bf16_autocasts_and_its_losses_track_fp32(pkg, make_config, toy_overrides, tmp_path):
    fp32 = pkg.loop.train(make_config(*toy_overrides), tmp_path / "fp32")
    reset_accelerate_state()  # the next Accelerator has another mixed precision
    bf16 = pkg.loop.train(make_config(*toy_overrides, "trainer.mixed_precision=bf16"), tmp_path / "bf16")
    assert bf16["losses"] != fp32["losses"]  # autocast is on: fp16 on a CPU, by contrast, silently computes in fp32
    # bfloat16 keeps 8 bits of mantissa (0.4% relative): its rounding, and the drift of the weights it causes, grow
    # with the loss. Measured over these 40 steps: a classifier (losses 0.69 to 0.007) at most 1.5e-3 apart; a
    # byte-level language model (losses 5.6 to 2.5) at most 0.025 apart (1.0% of the loss), its final metrics 0.6%.
    # 1e-2 + 2% of the loss leaves room for other CPUs and still catches a run that diverges.
    assert all(abs(a - b) < 1e-2 + 2e-2 * abs(b) for a, b in zip(bf16["losses"], fp32["losses"]))
    assert bf16["metrics"][bf16["monitor"]] == pytest.approx(fp32["metrics"][fp32["monitor"]], rel=2e-2)
    weights = load_file(tmp_path / "bf16" / "model" / "model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())  # autocast leaves fp32 master weights
