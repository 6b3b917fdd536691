"""The end-to-end test: the real entry point, the real config, a pretrained-style model, 100% accuracy."""


def test_tiny_model_overfits_to_100_percent_and_is_bit_for_bit_deterministic(pkg, make_config, toy_overrides, tmp_path):
    first = pkg.loop.train(make_config(*toy_overrides), tmp_path / "first")
    assert first["metrics"]["accuracy"] == 1.0, first["metrics"]
    assert first["losses"][-1] < first["losses"][0] / 5

    second = pkg.loop.train(make_config(*toy_overrides), tmp_path / "second")
    assert second["losses"] == first["losses"]  # same seed: bit-identical, not merely close
