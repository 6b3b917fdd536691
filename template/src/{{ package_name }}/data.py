"""Datasets: a hub dataset, local files, or a built-in one; tokenized with `datasets.map`
(cached between runs) and batched with dynamic padding."""

from pathlib import Path

import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

FILE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
LANGID_LANGUAGES = ["en", "de", "fr", "es", "it", "nl"]


def _langid_words(words_per_language: int):
    """Language identification of single words from the word lists that `wordfreq` ships.

    Words that occur in more than one language's list are dropped, so each word has one answer.
    Every 10th word by frequency rank is held out: the model must learn spelling, not words.
    """
    from wordfreq import top_n_list

    lists = {lang: top_n_list(lang, words_per_language) for lang in LANGID_LANGUAGES}
    counts = {}
    for words in lists.values():
        for word in set(words):
            counts[word] = counts.get(word, 0) + 1
    for label, lang in enumerate(LANGID_LANGUAGES):
        unique = [w for w in lists[lang] if counts[w] == 1 and w.isalpha() and len(w) > 1]
        for rank, word in enumerate(unique):
            yield {"text": word, "label": label, "split": "validation" if rank % 10 == 0 else "train"}


def load_langid(words_per_language: int = 3000) -> DatasetDict:
    features = Features(
        {"text": Value("string"), "label": ClassLabel(names=LANGID_LANGUAGES), "split": Value("string")}
    )
    # from_generator writes an Arrow cache keyed on the arguments, so later runs skip this.
    words = Dataset.from_generator(
        _langid_words, gen_kwargs={"words_per_language": words_per_language}, features=features
    )
    return DatasetDict(
        {
            split: words.filter(lambda row, s=split: row["split"] == s).remove_columns("split")
            for split in ["train", "validation"]
        }
    )


# Built-in datasets, selected with data.name=<key>: no download, they ship with a dependency.
BUILTIN = {"wordfreq_langid": load_langid}


def load_raw(cfg: DictConfig) -> DatasetDict:
    if cfg.files is not None:
        files = {split: str(Path(path).expanduser()) for split, path in cfg.files.items()}
        for split, path in files.items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"data.files.{split}: no such file: {path}")
        suffixes = {Path(path).suffix.lower() for path in files.values()}
        if len(suffixes) != 1 or next(iter(suffixes)) not in FILE_FORMATS:
            raise ValueError(
                f"data.files must all have one of the extensions {sorted(FILE_FORMATS)}; got {sorted(suffixes)}"
            )
        return load_dataset(FILE_FORMATS[suffixes.pop()], data_files=files)
    if cfg.name in BUILTIN:
        return BUILTIN[cfg.name]()
    return load_dataset(cfg.name, cfg.subset)


def _split(raw: DatasetDict, cfg: DictConfig, seed: int) -> DatasetDict:
    if cfg.train_split not in raw:
        raise ValueError(f"data.train_split={cfg.train_split!r} is not a split of the dataset; it has {list(raw)}")
    if cfg.eval_split in raw:
        return DatasetDict(train=raw[cfg.train_split], validation=raw[cfg.eval_split])
    held_out = raw[cfg.train_split].train_test_split(test_size=cfg.eval_fraction, seed=seed)
    return DatasetDict(train=held_out["train"], validation=held_out["test"])


def _encode_labels(splits: DatasetDict, label_column: str) -> DatasetDict:
    """Make the label column a ClassLabel (string labels get ids in sorted order)."""
    feature = splits["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        return splits
    names = sorted(set(splits["train"][label_column]) | set(splits["validation"][label_column]))
    label = ClassLabel(names=[str(name) for name in names])
    return splits.map(lambda row: {label_column: label.str2int(str(row[label_column]))}).cast_column(
        label_column, label
    )


def load_splits(cfg: DictConfig, seed: int) -> DatasetDict:
    """Train and validation splits with the configured text column and a ClassLabel label column."""
    splits = _split(load_raw(cfg), cfg, seed)
    for column in (cfg.text_column, cfg.label_column):
        if column not in splits["train"].column_names:
            raise ValueError(
                f"column {column!r} is not in the dataset; its columns are {splits['train'].column_names} "
                "(set data.text_column / data.label_column)"
            )
    return _encode_labels(splits, cfg.label_column)


def tokenize(splits: DatasetDict, cfg: DictConfig, tokenizer: PreTrainedTokenizerBase) -> DatasetDict:
    def encode(batch):
        encoded = tokenizer(batch[cfg.text_column], truncation=True, max_length=cfg.max_length)
        encoded["labels"] = batch[cfg.label_column]
        return encoded

    return splits.map(encode, batched=True, remove_columns=splits["train"].column_names)


def make_dataloaders(tokenized: DatasetDict, cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, seed: int):
    collate = DataCollatorWithPadding(tokenizer)  # pads each batch to its own longest sequence
    train = DataLoader(
        tokenized["train"],
        batch_size=cfg.batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        # Its own generator: starting an epoch then draws nothing from the global RNG (which dropout
        # uses), so a run resumed mid-epoch sees the same dropout masks as an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
    )
    evaluation = DataLoader(
        tokenized["validation"], batch_size=cfg.eval_batch_size, collate_fn=collate, num_workers=cfg.num_workers
    )
    return train, evaluation
