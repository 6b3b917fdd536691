"""Loading what every task shares: local files, a hub dataset or a task's built-in one; the train/validation
split; the dataloaders. What the examples hold (columns, tokens, pixels) is the task's business."""

from pathlib import Path

import torch
from datasets import ClassLabel, DatasetDict, Value, load_dataset
from omegaconf import DictConfig
from torch.utils.data import DataLoader

FILE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_raw(cfg: DictConfig, builtin: dict) -> DatasetDict:
    """The dataset of the `data` config: local files per split, a task's built-in dataset, or a hub id."""
    if cfg.files is not None:
        files = {split: Path(path).expanduser() for split, path in cfg.files.items()}
        for split, path in files.items():
            if not path.exists():
                raise FileNotFoundError(f"data.files.{split}: no such file or folder: {path}")
        if all(path.is_dir() for path in files.values()):  # image folders: <folder>/<label>/<image files>
            return load_dataset("imagefolder", data_files={split: str(path / "**") for split, path in files.items()})
        suffixes = {path.suffix.lower() for path in files.values()}
        if len(suffixes) != 1 or next(iter(suffixes)) not in FILE_FORMATS:
            raise ValueError(
                f"data.files must all have one of the extensions {sorted(FILE_FORMATS)}, or all be image folders; "
                f"got {sorted(suffixes)}"
            )
        return load_dataset(FILE_FORMATS[suffixes.pop()], data_files={split: str(p) for split, p in files.items()})
    if cfg.name in builtin:
        return builtin[cfg.name]()
    return load_dataset(cfg.name, cfg.subset)


def load_splits(cfg: DictConfig, builtin: dict, seed: int) -> DatasetDict:
    """`train` and `validation` (held out of train when the dataset has no `data.eval_split`), then any other
    split the dataset has (a test split, say)."""
    raw = load_raw(cfg, builtin)
    if cfg.train_split not in raw:
        raise ValueError(f"data.train_split={cfg.train_split!r} is not a split of the dataset; it has {list(raw)}")
    if cfg.eval_split in raw:
        splits = {"train": raw[cfg.train_split], "validation": raw[cfg.eval_split]}
    else:
        held_out = raw[cfg.train_split].train_test_split(test_size=cfg.eval_fraction, seed=seed)
        splits = {"train": held_out["train"], "validation": held_out["test"]}
    others = {name: split for name, split in raw.items() if name not in (cfg.train_split, cfg.eval_split)}
    return DatasetDict({**splits, **others})


def require_columns(splits: DatasetDict, columns: dict) -> None:
    """Fail naming the config key when a column is missing: `columns` maps config keys to column names."""
    present = splits["train"].column_names
    for key, column in columns.items():
        if column not in present:
            raise ValueError(f"column {column!r} is not in the dataset; its columns are {present} (set {key})")


def make_dataloaders(datasets: DatasetDict, cfg: DictConfig, collate, seed: int):
    train = DataLoader(
        datasets["train"],
        batch_size=cfg.batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        # Its own generator: starting an epoch then draws nothing from the global RNG (which dropout
        # uses), so a run resumed mid-epoch sees the same dropout masks as an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
    )
    return train, make_eval_dataloader(datasets["validation"], cfg, collate)


def make_eval_dataloader(dataset, cfg: DictConfig, collate) -> DataLoader:
    return DataLoader(dataset, batch_size=cfg.eval_batch_size, collate_fn=collate, num_workers=cfg.num_workers)


def encode_labels(splits: DatasetDict, column: str, key: str) -> list:
    """Make `column` a ClassLabel in every split (string or number labels get ids in sorted order) and return
    the label names. Refuses labels that the training split never shows, and a training split of one class:
    both would train to a model that cannot be right (`key` is the config key that names the column)."""
    feature = splits["train"].features[column]
    if isinstance(feature, ClassLabel):
        seen = {name: set(split.unique(column)) for name, split in splits.items()}
        names = feature.names
    else:
        seen = {name: {str(value) for value in split.unique(column)} for name, split in splits.items()}
        names = sorted(set().union(*seen.values()), key=_natural)
        label = ClassLabel(names=names)
        splits = splits.cast_column(column, Value("string")) if feature.dtype != "string" else splits
        splits = splits.map(lambda row: {column: label.str2int(row[column])}).cast_column(column, label)
        seen = {name: {label.str2int(value) for value in values} for name, values in seen.items()}
    if len(seen["train"]) < 2:
        raise ValueError(f"the training split has a single class in {key}={column!r}: {sorted(seen['train'])}")
    for name, values in seen.items():
        unseen = sorted(values - seen["train"])
        if unseen:
            names_unseen = [names[i] if isinstance(i, int) else i for i in unseen]
            raise ValueError(
                f"the {name} split has labels that the training split never shows ({key}={column!r}): {names_unseen}"
            )
    return splits, names


def _natural(name: str):
    """Numbers in numeric order ("2" before "10"), then other names alphabetically."""
    return (0, float(name), "") if name.lstrip("-").replace(".", "", 1).isdigit() else (1, 0.0, name)
