"""Shared fixtures: offline Hugging Face libraries, the real Hydra config, a tiny saved model, toy data."""

import importlib
import os
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

# Nothing may touch the network, and nothing may write into the user's Hugging Face cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"
sys.path.insert(0, str(PROJECT_ROOT / "src"))
PACKAGE = next(p.parent.name for p in (PROJECT_ROOT / "src").glob("*/loop.py"))


@pytest.fixture(scope="session", autouse=True)
def hf_home(tmp_path_factory):
    """A fresh Hugging Face cache for the test session (datasets caches tokenized data there)."""
    path = tmp_path_factory.mktemp("hf_home")
    os.environ["HF_HOME"] = str(path)
    os.environ["HF_DATASETS_CACHE"] = str(path / "datasets")
    return path


def reset_accelerate_state() -> None:
    """Accelerate keeps process-wide singletons: reset them before an Accelerator with other settings."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Tests don't leak Accelerate's state into each other."""
    yield
    reset_accelerate_state()


def compose_config(*overrides: str, return_hydra_config: bool = False):
    """Compose the project's real Hydra config (configs/train.yaml) with command-line style overrides."""
    importlib.import_module(f"{PACKAGE}.config").register_configs()
    importlib.import_module(f"{PACKAGE}.launch")  # registers the resolvers that the `hydra` node uses
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=return_hydra_config)


def save_tiny_model(folder: Path) -> Path:
    """A tiny BERT and byte-level tokenizer saved with save_pretrained: loading it is the real hub path."""
    from transformers import AutoModelForSequenceClassification, BertConfig, ByT5Tokenizer

    tokenizer = ByT5Tokenizer(extra_ids=0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=2,
    )
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_toy_csv(path: Path) -> Path:
    """32 short strings; label 1 when the string is mostly vowels (a rule, not noise)."""
    rng = random.Random(0)
    rows = []
    for i in range(32):
        label = i % 2
        letters = "aeiou" * 3 + "bcdfg" if label else "bcdfgklmnp" * 2 + "ae"
        rows.append(("".join(rng.choice(letters) for _ in range(rng.randint(5, 12))), label))
    path.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    return path


def overfit_overrides(model_dir: Path, csv_path: Path) -> list:
    """The e2e configuration: the tiny saved model memorizing the toy data (train = validation)."""
    return [
        f"model.name_or_path='{model_dir}'",
        "data=files",
        f"data.files={{train:'{csv_path}',validation:'{csv_path}'}}",
        "data.batch_size=8",
        "data.max_length=16",
        "optimizer.lr=3e-3",
        "optimizer.weight_decay=0",
        "scheduler=constant",
        "trainer.max_steps=40",
        "trainer.eval_every_n_steps=0",
        "trainer.log_with=none",
        "checkpoint.every_n_steps=0",
    ]


@pytest.fixture(scope="session")
def pkg():
    """The project's package modules (tests stay free of the package name)."""
    names = ["checkpoints", "config", "data", "launch", "loop", "model"]
    return SimpleNamespace(**{name: importlib.import_module(f"{PACKAGE}.{name}") for name in names})


@pytest.fixture(scope="session")
def make_config():
    return compose_config


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def toy_csv(tmp_path_factory):
    return write_toy_csv(tmp_path_factory.mktemp("toy") / "toy.csv")


@pytest.fixture
def toy_overrides(tiny_model_dir, toy_csv):
    return overfit_overrides(tiny_model_dir, toy_csv)
