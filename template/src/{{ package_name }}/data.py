"""Loading what every task shares: local files, a hub dataset or a task's built-in one; the train/validation
split; the dataloaders. What the examples hold (columns, tokens, pixels) is the task's business."""

import glob
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    Value,
    concatenate_datasets,
    load_dataset,
    load_from_disk,
)
from datasets.utils import logging as datasets_logging
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from .config import user_path
from .errors import UserError, warn

logger = logging.getLogger(__name__)

# A file's extension -> the datasets builder that reads it, and that builder's options. Plain text: one row per
# paragraph (blank lines separate them) in a column "text", for the language-model tasks.
FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
# csv: only an empty cell is missing; pandas' default also takes NA, null, None, nan, n/a, ... for one (a region code,
# the German word "null"), and a filled cell was refused as empty.
CSV_CELLS = {"keep_default_na": False, "na_values": [""]}
FORMAT_OPTIONS = {".csv": CSV_CELLS, ".tsv": {"sep": "\t", **CSV_CELLS}, ".txt": {"sample_by": "paragraph"}}
COMPRESSIONS = (".gz", ".bz2", ".xz")  # datasets decompresses these: train.csv.gz is a csv file
NOT_UTF8 = "not UTF-8 text (Latin-1 or Windows-1252, say): save the file as UTF-8"


def file_type(path: Path) -> str:
    """The extension that says how a file is read: .csv for train.csv and train.csv.gz alike ('' for none)."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


class DataError(UserError, ValueError):
    """A data file or dataset that cannot be used as it is; the message names the file, row and column."""


def saved_to_disk(path: Path) -> bool:
    """Whether `path` is a folder that datasets' `save_to_disk` wrote: a Dataset, or a DatasetDict of splits."""
    return path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


def load_file(split: str, path: Path) -> Dataset:
    """One split's file, or a DataError naming the file and, where it can, the line that is wrong."""
    if saved_to_disk(path):
        saved = load_from_disk(str(path))
        if isinstance(saved, DatasetDict):
            raise DataError(
                f"data.files.{split}={path} holds the splits {list(saved)} of a DatasetDict (save_to_disk): give "
                f"data.name={path}, or data.files.{split}={path}/<split>"
            )
        return saved
    kind = file_type(path)
    file_format, options = FILE_FORMATS[kind], FORMAT_OPTIONS.get(kind, {})
    verbosity = datasets_logging.get_verbosity()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)  # its log of the parser error would come first
    try:
        return load_dataset(file_format, data_files=str(path), split="train", **options)
    except Exception as error:  # datasets wraps the parser's error (pandas, pyarrow) in its own
        raise DataError(f"data.files.{split}={path}: {_file_problem(path, file_format, error)}") from error
    finally:
        datasets_logging.set_verbosity(verbosity)


def matching(split: str, path: Path, is_train: bool) -> list:
    """The files of data.files.<split>: the file or folder itself, or the files that a pattern matches (shards such
    as train-*.parquet, or data/**/*.csv), in name order."""
    leave_out = "" if is_train else f" (or leave the split out: ~data.files.{split})"
    if not any(character in str(path) for character in "*?["):
        if not path.exists():
            raise DataError(f"data.files.{split}: no such file or folder: {path}{leave_out}")
        return [path]
    found = sorted(Path(name) for name in glob.glob(str(path), recursive=True) if Path(name).is_file())
    if not found:
        raise DataError(f"data.files.{split}={path}: no file matches the pattern{leave_out}")
    return found


def load_files(split: str, pattern: Path, paths: list) -> Dataset:
    """The files of one split (`paths`, which `pattern` matched) as one dataset, read file by file so that a
    message names the file that is wrong."""
    parts = [load_file(split, path) for path in paths]
    # Shards of one split often differ in columns nobody reads (an optional field some files lack, or that is empty
    # throughout one file): keep the columns every file has, cast to the first file's types where they cast.
    shared = [column for column in parts[0].column_names if all(column in part.column_names for part in parts)]
    left_out = sorted({column for part in parts for column in part.column_names} - set(shared))
    if left_out:
        warn(logger, f"data.files.{split}={pattern}: columns not in every file are left out: {left_out}")
    parts = [part.select_columns(shared) for part in parts]
    features = parts[0].features.copy()  # the first file's types, but where a column is all null there
    for column in shared:
        typed = [part.features[column] for part in parts if getattr(part.features[column], "dtype", "") != "null"]
        features[column] = typed[0] if typed else features[column]
    for index, (path, part) in enumerate(zip(paths, parts)):
        try:
            parts[index] = part if part.features == features else part.cast(features)
        except (ValueError, TypeError, pa.ArrowException):
            raise DataError(
                f"data.files.{split}={pattern}: its files differ in column types: {paths[0].name} has "
                f"{_columns(parts[0])}, {path.name} has {_columns(part)}; make them the same, or name the files of "
                "each kind under a split of their own"
            ) from None
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _columns(dataset: Dataset) -> dict:
    """Column name -> type: string, int64, ... (Arrow's large_string is a string too)."""
    features = dataset.features.items()
    return {name: str(getattr(feature, "dtype", feature)).removeprefix("large_") for name, feature in features}


def _file_problem(path: Path, file_format: str, error: Exception) -> str:
    if not path.is_file():  # gone since load_raw looked
        return "no such file"
    if "corresponds to no data" in str(error) or path.stat().st_size == 0:
        return "the file has no rows (is it empty, or only a header?)"
    cause = error
    while not isinstance(cause, UnicodeDecodeError) and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, UnicodeDecodeError):
        return f"it is {NOT_UTF8}"
    if file_format == "json" and path.suffix.lower() not in COMPRESSIONS:
        with path.open() as lines:
            for number, line in enumerate(lines, 1):
                try:
                    if line.strip():
                        json.loads(line)
                except json.JSONDecodeError as bad:
                    return f"line {number} is not valid JSON ({bad.msg}); a .jsonl file holds one JSON object a line"
    cause = error.__cause__ or error
    return f"cannot be read as {file_format}: {str(cause).strip()}"


def load_raw(cfg: DictConfig, builtin: dict) -> DatasetDict:
    """The dataset of the `data` config: local files per split, a task's built-in dataset, or a hub id. Each split
    records where it came from (`source`), for messages about its rows."""
    if cfg.files:
        files = {split: user_path(path) for split, path in cfg.files.items()}
        matched = {split: matching(split, path, split == cfg.train_split) for split, path in files.items()}
        # Image folders, <folder>/<label>/<image files>; not the folders that save_to_disk writes.
        if all(path.is_dir() and not saved_to_disk(path) for path in files.values()):
            metadata = {split: any(path.glob("metadata.*")) for split, path in files.items()}  # a file of labels
            for split, path in files.items():
                if not metadata[split]:
                    refuse_images_off_class_folders(split, path)
            # Labels from the class subfolders, also where there is one class only (datasets would drop the column,
            # and the task would report a missing column, not a single class); not with a metadata file of labels.
            by_class = not any(metadata.values())
            patterns = {split: str(path / "**") for split, path in files.items()}
            try:
                raw = load_dataset("imagefolder", data_files=patterns, drop_labels=False if by_class else None)
            except ValueError as error:  # 'Instruction "train" corresponds to no data'
                if "corresponds to no data" not in str(error):
                    raise
                raise DataError(
                    f"data.files: a split folder holds no image that datasets reads in its class folders (folders that "
                    f"are links are not followed): {str(error).splitlines()[0]}"
                ) from None
        else:
            for split, path in files.items():
                folder = path.is_dir() and not saved_to_disk(path)
                data_files = sorted(p for p in path.iterdir() if file_type(p) in FILE_FORMATS) if folder else []
                if data_files:
                    raise DataError(
                        f"data.files.{split}={path} is a folder of data files: give a pattern, data.files.{split}="
                        f"{path}/*{''.join(data_files[0].suffixes)} (a folder is an image folder, and then every split "
                        "must be one)"
                    )
            for split, paths in matched.items():  # each file is read by its own format: train.csv, val.jsonl
                unknown = [path for path in paths if file_type(path) not in FILE_FORMATS and not saved_to_disk(path)]
                if unknown:
                    raise DataError(
                        f"data.files.{split}={unknown[0]}: a data file has one of the extensions "
                        f"{sorted(FILE_FORMATS)} (also compressed: {', '.join(COMPRESSIONS)}), or is a folder that "
                        "save_to_disk wrote; a split of images is a folder, and then every split must be one"
                    )
            raw = DatasetDict({split: load_files(split, files[split], paths) for split, paths in matched.items()})
        sources = {split: f"data.files.{split}={path}" for split, path in files.items()}
        for split, paths in matched.items():
            if len(paths) > 1:
                sources[split] += f" ({len(paths)} files, rows counted on from one to the next)"
    else:
        raw = builtin[cfg.name]() if cfg.name in builtin else load_hub_dataset(cfg, builtin)
        sources = {split: f"split {split} of data.name={cfg.name}" for split in raw}
    for split, dataset in raw.items():
        dataset.info.description = sources[split]  # kept through map, cast and train_test_split
    return raw


def refuse_images_off_class_folders(split: str, folder: Path) -> None:
    """An image folder holds <folder>/<label>/<image>: an image's class is the folder it sits in. An image elsewhere
    (at the top, in a subfolder of a class, or a folder of split folders given as one split) would get another class,
    or validation images would train, without a word."""
    import PIL.Image  # here: only image folders need it

    extensions = set(PIL.Image.registered_extensions())
    images = [path.relative_to(folder) for path in folder.rglob("*") if path.suffix.lower() in extensions]
    # What imagefolder reads: not hidden files and folders (._x.png, .ipynb_checkpoints), nor __MACOSX.
    shown = [path for path in images if not any(part.startswith((".", "__")) for part in path.parts)]
    off = [path for path in shown if len(path.parts) != 2]
    if off:
        raise DataError(
            f"data.files.{split}={folder}: {len(off)} images are not in a class folder, <folder>/<label>/<image> "
            f"(e.g. {off[0]}): an image's class is the folder it sits in; give the folder of the class folders, one "
            "per split, or move those images"
        )
    if not shown:
        raise DataError(
            f"data.files.{split}={folder} holds no image in a class folder, <folder>/<label>/<image> (folders that are "
            "links are not followed)"
        )


def load_hub_dataset(cfg: DictConfig, builtin: dict) -> DatasetDict:
    """`data.name` from the hub (or its cache), or a folder that save_to_disk wrote (load_dataset reads only some of
    those; a Dataset alone is the train split); a name that is neither there nor built in is a DataError."""
    if saved_to_disk(folder := user_path(cfg.name)):
        saved = load_from_disk(str(folder))
        return saved if isinstance(saved, DatasetDict) else DatasetDict({"train": saved})
    try:
        return load_dataset(cfg.name, cfg.subset)
    except (ConnectionError, FileNotFoundError) as error:  # offline, or no such dataset
        raise DataError(
            f"data.name={cfg.name}: not a built-in dataset of this task (those are {sorted(builtin)}) and not found "
            f"on the hub: {str(error).splitlines()[0]}"
        ) from error


def source(dataset: Dataset) -> str:
    """Where a split's rows came from: 'data.files.train=<path>', say (set by load_raw)."""
    return dataset.info.description


def described(datasets: DatasetDict, labels: list | None) -> str:
    """What a run trains and validates on, for its log: each split's examples and source, and a classifier's classes."""
    splits = "; ".join(f"{name} {len(split)} examples ({source(split)})" for name, split in datasets.items())
    classes = "" if labels is None else f"; {len(labels)} classes: {', '.join(map(str, labels[:20]))}"
    return f"data: {splits}{classes}{', ...' if labels is not None and len(labels) > 20 else ''}"


def counted_per_split(counts: dict, splits: dict) -> str:
    """For a warning, "2 of the 970 of validation, ...": `counts` maps a split's name to how many of its examples
    something is true of, `splits` maps it to its examples; splits of a count of 0 are left out."""
    return ", ".join(f"{count} of the {len(splits[name])} of {name}" for name, count in counts.items() if count)


def load_splits(
    cfg: DictConfig, builtin: dict, seed: int, columns: dict, text: tuple = (), blank_refused: bool = False
) -> DatasetDict:
    """`train` and `validation` (held out of train when data.eval_split is null or the dataset has no other split),
    then any other split the dataset has (a test split, say). `columns` maps the task's config keys to the columns it
    needs: every split must have them, without empty cells; those of the keys in `text` become strings, and with
    `blank_refused` none may be only spaces (refuse_blank_text; before any split is held out, so a row number is the
    file's)."""
    raw = load_raw(cfg, builtin)
    if cfg.train_split not in raw:
        raise DataError(f"data.train_split={cfg.train_split!r} is not a split of the dataset; it has {list(raw)}")
    for name, dataset in raw.items():
        if any("." in column and column not in dataset.column_names for column in columns.values()):
            dataset = dataset.flatten()  # a field by its dotted name: translation.en of WMT's {"en": ..., "de": ...}
        require_columns(dataset, columns)
        raw[name] = as_text(dataset, {key: columns[key] for key in text})
        if blank_refused:
            refuse_blank_text(raw[name], {key: columns[key] for key in text})
    if cfg.eval_split in raw:
        splits = {"train": raw[cfg.train_split], "validation": raw[cfg.eval_split]}
    elif cfg.eval_split is not None and len(raw) > 1:  # a typo, or a split to choose: holding out would hide it
        raise DataError(
            f"data.eval_split={cfg.eval_split!r} is not a split of the dataset; it has {list(raw)}: set "
            "data.eval_split to one of them, or data.eval_split=null to hold out data.eval_fraction of train"
        )
    else:
        train = raw[cfg.train_split]
        try:
            held_out = train.train_test_split(test_size=cfg.eval_fraction, seed=seed)
        except ValueError:  # a split of one example: a text file of one paragraph, say
            raise DataError(
                f"{source(train)} has {len(train)} example(s), too few to hold out data.eval_fraction="
                f"{cfg.eval_fraction} of them for validation: give a validation split (data.files.validation=...) or "
                "more examples (a .txt file holds one per paragraph: blank lines separate them)"
            ) from None
        # Of a few examples the share rounds up: say what was held out (1 of 3 documents is no tenth).
        validation, fraction = held_out["test"], cfg.eval_fraction
        validation.info.description = (
            f"held out of {source(train)}: {len(validation)} of its {len(train)} examples (data.eval_fraction="
            f"{fraction})"
        )
        splits = {"train": held_out["train"], "validation": held_out["test"]}
    others = {name: split for name, split in raw.items() if name not in (cfg.train_split, cfg.eval_split)}
    return DatasetDict({**splits, **others})


def map_splits(splits: DatasetDict, function: Callable) -> DatasetDict:
    """`function` over batches of each split, its output in place of the split's columns. Each split's own columns:
    a split may have more than train's (an id column in one file, pandas' index in a parquet file)."""
    return DatasetDict(
        {name: split.map(function, batched=True, remove_columns=split.column_names) for name, split in splits.items()}
    )


def require_columns(dataset: Dataset, columns: dict) -> None:
    """Fail naming the file and the config key when a column is missing or has an empty cell: `columns` maps
    config keys to column names. Rows are counted from 1, after any header."""
    present = dataset.column_names
    for key, column in columns.items():
        if column not in present:
            separator = next((s for s in ";\t|" if len(present) == 1 and s in present[0]), None)
            hint = f"set {key}; every split needs the column, evaluate.py's too: it scores against it"
            if separator is not None:
                hint = f"one column: is it separated by {separator!r}, not commas?"
            raise DataError(f"{source(dataset)} has no column {column!r}; its columns are {present} ({hint})")
        cells = dataset.with_format("arrow")[column]  # Arrow: nothing decoded (images, say)
        _refuse_empty(dataset, key, column, pc.is_null(cells))


def refuse_blank_text(dataset: Dataset, columns: dict) -> None:
    """Text cells of nothing but spaces in `columns` (config keys -> column names; as_text's strings) are refused as
    empty cells are: a csv file has none there, a jsonl file keeps "" (an empty reference matches an empty output)."""
    for key, column in columns.items():
        cells = dataset.with_format("arrow")[column]
        _refuse_empty(dataset, key, column, pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(cells)), 0))


def _refuse_empty(dataset: Dataset, key: str, column: str, empty) -> None:
    """A DataError naming the first row (counted from 1, after any header) where `empty`, a boolean array, is true."""
    count = pc.sum(empty).as_py() or 0
    if count:
        row = pc.index(empty, True).as_py() + 1
        others = f" (and {count - 1} more rows)" if count > 1 else ""
        raise DataError(
            f"{source(dataset)}: row {row}{others} has an empty cell in column {column!r} ({key}); fill it or drop "
            "the row"
        )


def as_text(dataset: Dataset, columns: dict) -> Dataset:
    """The `columns` (config keys -> column names) as strings: a csv column of numbers only is read as numbers, and a
    tokenizer takes text. Lists or records there, or only blank cells (a text file of empty lines), are a DataError."""
    for key, column in columns.items():
        feature = dataset.features[column]
        if not isinstance(feature, Value):
            fields = list(feature) if isinstance(feature, dict) else getattr(feature, "languages", None)  # Translation
            inside = f"; name a field of it, {key}={column}.{fields[0]} (its fields: {fields})" if fields else ""
            if type(feature).__name__ == "Json":  # what datasets makes of a json column of several kinds of values
                feature, inside = "values of several kinds", " (numbers and strings, say): write every value as text"
            raise DataError(f"{source(dataset)}: column {column!r} ({key}) holds {feature}, not text{inside}")
        if feature.dtype not in ("string", "large_string"):
            dataset = dataset.cast_column(column, Value("string"))
        cells = dataset.with_format("arrow")[column]
        try:  # Latin-1 text, say, which pyarrow's json reader passes on unchecked: a full validation reads every byte
            cells.validate(full=True)
            blank = len(cells) and not pc.max(pc.utf8_length(pc.utf8_trim_whitespace(cells))).as_py()
        except pa.ArrowInvalid:
            raise DataError(f"{source(dataset)}: column {column!r} ({key}) is {NOT_UTF8}") from None
        if blank:
            raise DataError(f"{source(dataset)}: column {column!r} ({key}) holds no text, only blank cells")
    return dataset


def training_subset(split, size: float | None, seed: int, stratify_by: str | None = None):
    """`data.train_subset` of the training split: a fraction (at most 1) or a count of examples (more than 1), the same
    ones for the same seed. With `stratify_by` (a column of class ids) every class keeps its share, and at least one
    example while the count allows. None: the whole split."""
    if size is None:
        return split
    total = len(split)
    count = round(size * total) if size <= 1 else int(size)
    if count == total:
        return split
    if not 1 <= count <= total:
        raise DataError(
            f"data.train_subset={size} asks for {count} of the {total} training examples; "
            "give a fraction in (0, 1] or a count from 1 to the size of the training split"
        )
    rng = np.random.default_rng(seed)
    if stratify_by is None:
        return split.select(np.sort(rng.choice(total, count, replace=False)))
    _, classes = np.unique(np.asarray(split.with_format("numpy")[stratify_by]), return_inverse=True)
    members = [np.flatnonzero(classes == label) for label in range(classes.max() + 1)]
    quotas = _shares(count, np.array([len(indices) for indices in members]))
    keep = np.concatenate([rng.choice(indices, quota, replace=False) for indices, quota in zip(members, quotas)])
    return split.select(np.sort(keep))


def _shares(count: int, sizes: np.ndarray) -> np.ndarray:
    """`count` split over groups of `sizes` in proportion (largest remainders), at least one each while count allows."""
    floor = np.ones_like(sizes) if count >= len(sizes) else np.zeros_like(sizes)
    exact = (count - floor.sum()) * (sizes - floor) / (sizes - floor).sum()
    shares = floor + np.floor(exact).astype(int)
    remainders = np.argsort(-(exact - np.floor(exact)), kind="stable")
    shares[remainders[: count - shares.sum()]] += 1
    return shares


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
    # Its own generator too: each pass over a DataLoader draws a seed for its workers, from the global RNG without
    # one, and training's dropout masks after an evaluation would depend on how often the run evaluates.
    return DataLoader(
        dataset,
        batch_size=cfg.eval_batch_size,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(0),
    )


MANY_CLASSES = 20  # more classes than this, each of one or two training examples on average, are warned of


def encode_labels(splits: DatasetDict, column: str, key: str, known: list | None = None) -> tuple:
    """Make `column` a ClassLabel in every split and return the splits and the label names: `known`, the labels a
    saved model was trained for (evaluate.py), which the data's are read by; else the data's own, in sorted order
    (numbers in numeric order). Refuses labels outside `known`; for training, labels that the training split never
    shows and a training split of one class, which would train a model that cannot be right (`key` is the config
    key that names the column)."""
    for split in splits.values():
        if not isinstance(split.features[column], Value | ClassLabel):
            raise DataError(
                f"{source(split)}: column {column!r} ({key}) holds {split.features[column]}, not one label per "
                "example; class labels are names or whole numbers (several labels per example is not built in)"
            )
    uniques = {name: split.unique(column) for name, split in splits.items()}  # one pass over each split
    splits, uniques = _without_unlabelled_splits(splits, uniques, column, key)
    for name, split in splits.items():
        fractions = [v for v in uniques[name] if isinstance(v, float) and not v.is_integer()][:3]
        if fractions:
            raise DataError(
                f"{source(split)}: column {column!r} ({key}) holds numbers with fractions, e.g. {fractions}; class "
                "labels must be names or whole numbers (is it a regression target?)"
            )
    feature = splits["train"].features[column]
    if not isinstance(feature, ClassLabel):
        _refuse_names_of_one_label(uniques, column, key)
    # Class ids mean the same in every split only where each split's ClassLabel has the same names (a split saved
    # on its own numbers its classes by what it holds): else every split is read by its label names.
    same_ids = all(
        isinstance(split.features[column], ClassLabel) and split.features[column].names == feature.names
        for split in splits.values()
    )
    if same_ids and known in (None, feature.names):
        seen = {name: set(values) for name, values in uniques.items()}
        names = feature.names
    else:
        texts = {name: set(map(_as_text(splits[name], column), values)) for name, values in uniques.items()}
        names = known or sorted(set().union(*texts.values()), key=_natural)
        if known is None and isinstance(feature, ClassLabel):  # the training split's order of its classes, first
            names = feature.names + [name for name in names if name not in feature.names]
        for name, values in texts.items():
            unknown = sorted(values - set(names), key=_natural)
            if unknown:
                raise DataError(  # evaluate.py's: its split may be a lone file, loaded as both train and validation
                    f"{source(splits[name])} has labels in column {column!r} ({key}) that the model was not trained "
                    f"for: {unknown[:10]}; it knows {names[:10]}"
                )
        label = ClassLabel(names=names)

        def by_name(text: Callable) -> Callable:
            return lambda batch: {column: label.str2int(list(map(text, batch[column])))}

        splits = DatasetDict(
            {  # one pass over each split, a batch at a time
                name: split.map(
                    by_name(_as_text(split, column)),
                    batched=True,
                    features=Features({**split.features, column: label}),
                )
                for name, split in splits.items()
            }
        )
        seen = {name: {label.str2int(value) for value in values} for name, values in texts.items()}
    if known is not None:  # evaluation: any of the model's labels may be missing from the data
        return splits, names
    train = source(splits["train"])
    if len(seen["train"]) < 2:
        raise DataError(
            f"{train}: the training split has a single class in column {column!r} ({key}): "
            f"{[names[i] for i in seen['train']]}; a classifier needs examples of at least two"
        )
    for name, values in seen.items():
        unseen = sorted(values - seen["train"])
        if not unseen:
            continue
        problem = (
            f"{source(splits[name])}: the {name} split has labels in column {column!r} ({key}) that the training "
            f"split ({train}) never shows: {[names[i] for i in unseen]}"
        )
        if name != "validation":  # a test split, which training does not read: evaluate.py scores it as it is
            warn(logger, f"{problem}; a model trained on it cannot predict them")
            continue
        raise DataError(problem)
    classes, examples = len(seen["train"]), len(splits["train"])
    if classes > MANY_CLASSES and classes > examples / 2:  # one or two examples a class: an id column, say
        warn(
            logger,
            f"{train}: column {column!r} ({key}) holds {classes} different labels in {examples} examples; is it an "
            f"id or a free text column? (a classifier learns a class from several examples of it)",
        )
    return splits, names


def _without_unlabelled_splits(splits: DatasetDict, uniques: dict, column: str, key: str) -> tuple:
    """-1 in a ClassLabel column is datasets' mark of an example without a label (GLUE's test splits hide theirs so).
    A split of such examples only, other than train and validation, is left out: nothing could score it. Elsewhere
    they are a DataError: training and validation need the labels."""
    kept = dict(splits)
    for name, split in splits.items():
        if not isinstance(split.features[column], ClassLabel) or -1 not in uniques[name]:
            continue
        if name not in ("train", "validation") and uniques[name] == [-1]:
            logger.info(f"{source(split)}: no labels (-1 in column {column!r}, every row): left out, nothing scores it")
            del kept[name], uniques[name]
            continue
        unlabelled = sum(label == -1 for label in split[column])
        choose = {
            "train": "choose a labelled split for data.train_split, or ",
            "validation": "choose a labelled split for data.eval_split (null: part of train is held out), or ",
        }
        raise DataError(
            f"{source(split)}: {unlabelled} of the {len(split)} rows of the {name} split have no label (-1 in column "
            f"{column!r} ({key}), datasets' mark of a hidden label): {choose.get(name, '')}remove those rows first"
        )
    return DatasetDict(kept), uniques


def _as_text(split: Dataset, column: str) -> Callable:
    """What gives a label's name: a class id's name where the column is a ClassLabel already, a whole float's integer
    (2.0 -> "2"), else str."""
    feature = split.features[column]
    if isinstance(feature, ClassLabel):
        return feature.int2str
    if isinstance(feature, Value) and feature.dtype.startswith("float"):  # 2.0 in one file and 2 in another: one class
        return lambda value: str(int(value)) if float(value).is_integer() else str(value)
    return str


def _refuse_names_of_one_label(uniques: dict, column: str, key: str) -> None:
    """A label written two ways ('de' and 'de ') would be two classes, each with part of its examples: refused where
    only spaces differ, a warning where only upper and lower case do ('DE' and 'de' may mean two things). `uniques`:
    split name -> the split's label values."""
    names = sorted({str(value) for values in uniques.values() for value in values})
    spaced = _written_two_ways(names, str.strip)
    if spaced:
        raise DataError(
            f"labels in column {column!r} ({key}) differ only in spaces: {spaced[:3]}; each would be a class of its "
            "own: write each label one way"
        )
    cased = _written_two_ways(names, str.casefold)
    if cased:
        named = f"labels in column {column!r} ({key})"
        warn(logger, f"{named} differ only in upper and lower case: {cased[:3]}; each is a class of its own")


def _written_two_ways(names: list, same) -> list:
    """The groups of `names` that `same` maps to one value."""
    groups = {}
    for name in names:
        groups.setdefault(same(name), []).append(name)
    return [group for group in groups.values() if len(group) > 1]


def _natural(name: str):
    """Numbers in numeric order ("2" before "10"), then other names alphabetically."""
    return (0, float(name), "") if name.lstrip("-").replace(".", "", 1).isdigit() else (1, 0.0, name)
