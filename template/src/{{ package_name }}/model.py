"""Models and tokenizers: any `from_pretrained` name or folder, or a tiny random model built locally."""

from omegaconf import DictConfig
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    ByT5Tokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


def build_tokenizer(cfg: DictConfig) -> PreTrainedTokenizerBase:
    if cfg.name_or_path is not None:
        return AutoTokenizer.from_pretrained(cfg.name_or_path)
    # Bytes need no vocabulary file, so a tiny model trains on any text with no download.
    return ByT5Tokenizer(extra_ids=0)


def build_model(cfg: DictConfig, labels: list, tokenizer: PreTrainedTokenizerBase, max_length: int) -> PreTrainedModel:
    """A sequence classifier with one output per label (call after seeding: init is random)."""
    id2label = dict(enumerate(labels))
    label2id = {name: i for i, name in id2label.items()}
    if cfg.name_or_path is not None:
        return AutoModelForSequenceClassification.from_pretrained(
            cfg.name_or_path,
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=True,  # a new classification head for these labels
        )
    config = AutoConfig.for_model(
        cfg.model_type,
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=max_length + 2,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=len(labels),
        id2label=id2label,
        label2id=label2id,
    )
    return AutoModelForSequenceClassification.from_config(config)
