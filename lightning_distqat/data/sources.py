"""Loading a dataset once: Hugging Face ``datasets`` by hub name, or local files and folders, or bundled data."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from lightning_distqat.config import DataConfig
from lightning_distqat.data.errors import DataSourceError

__all__ = ["Splits", "load_splits", "BUILTIN_SOURCES"]

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

_FILE_BUILDERS = {
    ".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text",
}
BUILTIN_SOURCES = ("sklearn-digits", "synthetic-spoken-digits", "synthetic-stories")
_EXPECTED = ("a folder written by Dataset.save_to_disk, an image folder (one subfolder per class), a .parquet/.arrow/"
             ".json/.jsonl/.csv/.txt file or a folder of them, a Hugging Face dataset name, or one of "
             + ", ".join(BUILTIN_SOURCES))


@dataclass
class Splits:
    """What the server serves: the training split and, optionally, a validation split."""

    train: "datasets.Dataset"
    val: Optional["datasets.Dataset"] = None


def load_splits(cfg: DataConfig) -> Splits:
    """Load ``cfg.split`` (and the validation split or held-out fraction) of ``cfg.source``.

    Raises :class:`DataSourceError` naming the source and what was expected when it cannot be loaded.
    """
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataSourceError(f"DataConfig.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    train = _load(cfg, cfg.split)
    val = None
    if cfg.val_split is not None:
        val = _load(cfg, cfg.val_split)
    elif cfg.val_fraction > 0:
        if len(train) < 2:
            raise DataSourceError(f"data source '{cfg.source}' has {len(train)} rows: too few to hold out "
                                  f"val_fraction={cfg.val_fraction}")
        parts = train.train_test_split(test_size=cfg.val_fraction, seed=cfg.seed, shuffle=True)
        train, val = parts["train"], parts["test"]
    for name, ds in (("train", train), ("validation", val)):
        if ds is not None and len(ds) == 0:
            raise DataSourceError(f"data source '{cfg.source}': the {name} split is empty")
    return Splits(train=train, val=val)


def _load(cfg: DataConfig, split: str):
    if cfg.source == "sklearn-digits":
        return _sklearn_digits(split)
    if cfg.source in ("synthetic-spoken-digits", "synthetic-stories"):
        return _synthetic(cfg, split)
    path = os.path.expanduser(cfg.source)
    if os.path.exists(path):
        return _load_local(path, split, cfg)
    if _looks_like_path(cfg.source):
        raise DataSourceError(f"data source '{cfg.source}': no such file or folder; expected {_EXPECTED}")
    return _load_hub(cfg, split)


def _looks_like_path(source: str) -> bool:
    return (source.startswith(("/", "./", "../", "~")) or os.path.splitext(source)[1] in _FILE_BUILDERS
            or source.count("/") > 1)


def _select_split(loaded, split: str, source: str):
    import datasets

    if isinstance(loaded, (datasets.DatasetDict, dict)):
        if split not in loaded:
            raise DataSourceError(f"data source '{source}' has no split '{split}'; available: {', '.join(loaded)}")
        return loaded[split]
    return loaded


def _load_local(path: str, split: str, cfg: DataConfig):
    import datasets

    try:
        if os.path.isdir(path):
            if any(os.path.exists(os.path.join(path, marker)) for marker in ("dataset_dict.json", "state.json")):
                return _select_split(datasets.load_from_disk(path), split, cfg.source)
            return _select_split(datasets.load_dataset(path, cfg.subset), split, cfg.source)
        builder = _FILE_BUILDERS.get(os.path.splitext(path)[1].lower())
        if builder is None:
            raise DataSourceError(f"data source '{cfg.source}': unknown file type; expected {_EXPECTED}")
        return datasets.load_dataset(builder, data_files={split: [path]}, split=split)
    except DataSourceError:
        raise
    except Exception as e:  # datasets raises many types for unreadable files
        raise DataSourceError(f"data source '{cfg.source}' could not be read as a dataset ({type(e).__name__}: "
                              f"{e}); expected {_EXPECTED}") from e


def _load_hub(cfg: DataConfig, split: str):
    import datasets

    log.info("DataServer: loading '%s' (split %s) through the Hugging Face Hub", cfg.source, split)
    try:
        return datasets.load_dataset(cfg.source, cfg.subset, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataSourceError(f"data source '{cfg.source}' has no split '{split}': {e}") from e
        raise DataSourceError(f"unknown dataset '{cfg.source}': {e}") from e
    except Exception as e:
        raise DataSourceError(
            f"unknown dataset '{cfg.source}': it is not a local path and the Hugging Face Hub could not provide it "
            f"({type(e).__name__}: {e}); expected {_EXPECTED}") from e


def _synthetic(cfg: DataConfig, split: str):
    """A data set made here (data/synthetic.py), written once to the user's cache folder in a format users bring
    (a save_to_disk folder with an audio column, a text file) and loaded from there like theirs."""
    from lightning_distqat.data import synthetic

    if split != "train":
        raise DataSourceError(f"data source '{cfg.source}' has one split, 'train' (got '{split}'); use val_fraction "
                              "to hold part of it out")
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "distqat")
    if cfg.source == "synthetic-spoken-digits":
        path = synthetic.spoken_digits(os.path.join(cache, f"spoken-digits-{cfg.sampling_rate}"),
                                       sampling_rate=cfg.sampling_rate)
    else:
        path = synthetic.short_stories(os.path.join(cache, "short-stories.txt"))
    return _load_local(path, split, cfg)


def _sklearn_digits(split: str):
    """scikit-learn's 1797 handwritten 8x8 digit scans as an image dataset (ships with scikit-learn: no download)."""
    import datasets
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if split != "train":
        raise DataSourceError(f"data source 'sklearn-digits' has one split, 'train' (got '{split}'); use "
                              f"val_fraction to hold part of it out")
    digits = load_digits()
    images = [Image.fromarray((img * 16).clip(0, 255).astype(np.uint8), mode="L") for img in digits.images]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    return datasets.Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
