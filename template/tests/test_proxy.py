"""Proxy runs: data.train_subset draws the same examples for the same seed, keeps each class's share for classifiers,
and the experiment=proxy preset composes, validates and trains on the subset."""

from collections import Counter

import pytest
from conftest import TASKS
from datasets import Dataset

# 6 classes of 100, 50, 30, 12, 6 and 2 examples
LABELS = [label for label, size in enumerate([100, 50, 30, 12, 6, 2]) for _ in range(size)]


def labelled():
    return Dataset.from_dict({"labels": LABELS, "index": list(range(len(LABELS)))})


@pytest.mark.parametrize("size, count", [(0.5, 100), (20, 20), (1.0, 200), (200, 200), (6, 6)])
def test_stratified_subset_keeps_every_class_share(pkg, size, count):
    subset = pkg.data.training_subset(labelled(), size, seed=1, stratify_by="labels")
    assert len(subset) == count
    shares = Counter(subset["labels"])
    assert set(shares) == set(LABELS)  # every class at least once
    full, classes = Counter(LABELS), len(set(LABELS))
    for label, examples in shares.items():  # one each, then the rest in proportion: within one example of that
        share = 1 + (count - classes) * (full[label] - 1) / (len(LABELS) - classes)
        assert abs(examples - share) < 1, (label, examples, share)
    assert len(set(subset["index"])) == count  # no example twice


def test_subset_is_the_same_for_the_same_seed_and_differs_for_another(pkg):
    draw = lambda seed, stratify: pkg.data.training_subset(labelled(), 0.25, seed, stratify)["index"]  # noqa: E731
    for stratify in ("labels", None):
        assert draw(3, stratify) == draw(3, stratify)
        assert draw(3, stratify) != draw(4, stratify)
    assert pkg.data.training_subset(labelled(), None, 3) is not None and len(draw(3, None)) == 50


@pytest.mark.parametrize("size", [201, 1e-4])
def test_subset_beyond_the_split_is_refused_naming_the_key(pkg, size):
    with pytest.raises(ValueError, match="data.train_subset"):
        pkg.data.training_subset(labelled(), size, seed=0)


@pytest.mark.parametrize("size", [-1, 2.5, 0])
def test_train_subset_that_is_no_fraction_or_count_fails_validation(pkg, make_config, size):
    with pytest.raises(pkg.config.ConfigError, match="data.train_subset"):
        pkg.config.validate(make_config(f"data.train_subset={size}"))


def test_proxy_preset_trains_on_the_subset(pkg, make_config, toy_overrides, tmp_path):
    full = make_config(*toy_overrides)
    cfg = make_config(*toy_overrides, "experiment=proxy", "data.train_subset=0.5", "trainer.max_steps=3")
    pkg.config.validate(cfg)
    assert cfg.data.train_subset == 0.5
    preset = make_config("experiment=proxy")  # what the preset turns off (the toy run turns both off too)
    assert preset.trainer.eval_every_n_steps == 0 and not preset.checks.enabled
    run = pkg.loop.setup(cfg, tmp_path / "run")
    everything = pkg.loop.setup(full, tmp_path / "full")
    assert len(run.train_dl.dataset) == round(len(everything.train_dl.dataset) * 0.5)
    assert len(run.eval_dl.dataset) == len(everything.eval_dl.dataset)  # validation stays whole


@pytest.mark.parametrize("task", TASKS)
def test_proxy_preset_composes_for_every_task(pkg, make_config, task):
    pkg.config.validate(make_config(f"task={task}", "experiment=proxy"))
