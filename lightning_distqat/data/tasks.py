"""Per-task transforms and collation: rows of a dataset (a dict of columns) become a dict of batched numpy arrays
(the data server's process needs no torch; the trainer's client turns its copies into tensors).

Batches follow Hugging Face names: ``pixel_values``/``labels`` (image classification), ``input_ids``/
``attention_mask``/``labels`` (causal LM), ``input_values``/``attention_mask``/``labels`` (speech). Labels that a loss
should ignore are ``-100``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from lightning_distqat.config import DataConfig
from lightning_distqat.data.errors import DataSourceError

__all__ = ["TASKS", "task_class", "make_collate", "ByteTokenizer"]

Collate = Callable[[dict[str, list]], dict[str, np.ndarray]]


def _require(columns: list[str], needed: dict[str, str], source: str, task: str) -> None:
    missing = {field: col for field, col in needed.items() if col not in columns}
    if missing:
        wanted = ", ".join(f"'{col}' (DataConfig.{field})" for field, col in missing.items())
        raise DataSourceError(f"data source '{source}' has no column {wanted} needed by task '{task}'; "
                              f"its columns are {columns}. Set DataConfig.{next(iter(missing))} to one of them.")


class ImageClassification:
    """Decode, convert to ``channels``, resize to ``image_size`` (bilinear), scale to [0, 1], normalise."""

    fixed_shape = True
    """Every row becomes tensors of the same shape, so the server can keep the transformed split in one cache."""

    def __init__(self, cfg: DataConfig, columns: list[str]) -> None:
        _require(columns, {"image_column": cfg.image_column, "label_column": cfg.label_column}, cfg.source,
                 cfg.task)
        if cfg.channels not in (1, 3):
            raise DataSourceError(f"DataConfig.channels must be 1 or 3, got {cfg.channels}")
        if cfg.image_size < 1:
            raise DataSourceError(f"DataConfig.image_size must be >= 1, got {cfg.image_size}")
        self.cfg = cfg
        self.mode = "RGB" if cfg.channels == 3 else "L"
        mean, std = _per_channel(cfg.mean, cfg.channels, "mean"), _per_channel(cfg.std, cfg.channels, "std")
        self.scale = (1.0 / (255.0 * std)).reshape(1, -1, 1, 1)
        self.shift = (mean / std).reshape(1, -1, 1, 1)

    def _pixels(self, image: Any) -> np.ndarray:
        from PIL import Image

        if isinstance(image, dict):  # undecoded datasets.Image value
            image = Image.open(image["path"]) if image.get("bytes") is None else _open_bytes(image["bytes"])
        elif isinstance(image, str):
            image = Image.open(image)
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        elif not isinstance(image, Image.Image):
            raise DataSourceError(f"task 'image_classification': column '{self.cfg.image_column}' holds "
                                  f"{type(image).__name__}; expected images (PIL, path, bytes or uint8 arrays)")
        size = self.cfg.image_size
        image = image.convert(self.mode)
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.uint8)
        return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)

    def __call__(self, rows: dict[str, list]) -> dict[str, np.ndarray]:
        # contiguous NCHW (np.stack of transposed views would keep a channels-last layout)
        pixels = np.ascontiguousarray(np.stack([self._pixels(img) for img in rows[self.cfg.image_column]]))
        labels = rows[self.cfg.label_column]
        if not all(isinstance(v, (int, np.integer)) for v in labels):
            raise DataSourceError(f"task 'image_classification': column '{self.cfg.label_column}' must hold integer "
                                  f"class ids, got {type(labels[0]).__name__}")
        return {"pixel_values": pixels.astype(np.float32) * self.scale - self.shift,
                "labels": np.asarray(labels, dtype=np.int64)}


def _open_bytes(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data))


def _per_channel(values: list[float], channels: int, name: str) -> np.ndarray:
    if len(values) not in (1, channels):
        raise DataSourceError(f"DataConfig.{name} needs 1 or {channels} values, got {values}")
    t = np.broadcast_to(np.asarray(values, dtype=np.float32), (channels,)).copy()
    if name == "std" and bool((t <= 0).any()):
        raise DataSourceError(f"DataConfig.std must be > 0, got {values}")
    return t


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0-255, padding id 256, so ``vocab_size`` is 257. Needs no files."""

    vocab_size = 257
    pad_token_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def _load_tokenizer(cfg: DataConfig):
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    except Exception as e:
        raise DataSourceError(f"DataConfig.tokenizer '{cfg.tokenizer}' could not be loaded ({type(e).__name__}: "
                              f"{e}); use 'bytes' or a transformers tokenizer name or local folder") from e
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise DataSourceError(f"tokenizer '{cfg.tokenizer}' has neither a padding nor an end-of-text token")
        tok.pad_token = tok.eos_token
    return tok


def _texts(rows: dict[str, list], column: str, task: str) -> list[str]:
    texts = rows[column]
    if not all(isinstance(t, str) for t in texts):
        raise DataSourceError(f"task '{task}': column '{column}' must hold strings, got "
                              f"{type(next(t for t in texts if not isinstance(t, str))).__name__}")
    return texts


class CausalLM:
    """Tokenise each text, truncate and pad to ``seq_len``; labels are the input ids with padding set to -100
    (the model shifts them)."""

    fixed_shape = True

    def __init__(self, cfg: DataConfig, columns: list[str]) -> None:
        _require(columns, {"text_column": cfg.text_column}, cfg.source, cfg.task)
        if cfg.seq_len < 2:
            raise DataSourceError(f"DataConfig.seq_len must be >= 2 for causal LM, got {cfg.seq_len}")
        self.cfg = cfg
        self.tokenizer = _load_tokenizer(cfg)

    def __call__(self, rows: dict[str, list]) -> dict[str, np.ndarray]:
        texts = _texts(rows, self.cfg.text_column, self.cfg.task)
        length = self.cfg.seq_len
        ids = np.full((len(texts), length), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(texts), length), dtype=np.int64)
        for i, text in enumerate(texts):
            tokens = self.tokenizer.encode(text)[:length]
            ids[i, :len(tokens)] = tokens
            mask[i, :len(tokens)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 0, -100, ids)}


class Speech:
    """Raw waveforms, cut to ``max_audio_seconds``, normalised per clip (zero mean, unit variance), zero-padded to the
    longest clip of the batch; transcripts tokenised as labels (bytes: byte + 1, so id 0 stays the CTC blank)."""

    fixed_shape = False

    def __init__(self, cfg: DataConfig, columns: list[str]) -> None:
        _require(columns, {"audio_column": cfg.audio_column, "text_column": cfg.text_column}, cfg.source, cfg.task)
        self.cfg = cfg
        self.tokenizer = _load_tokenizer(cfg)
        self.max_samples = int(cfg.max_audio_seconds * cfg.sampling_rate)

    def _waveform(self, audio: Any) -> np.ndarray:
        rate = self.cfg.sampling_rate
        if isinstance(audio, dict):
            rate = audio.get("sampling_rate", rate)
            audio = audio["array"]
        elif hasattr(audio, "get_all_samples"):  # datasets' decoded audio (torchcodec AudioDecoder)
            samples = audio.get_all_samples()
            rate, audio = samples.sample_rate, samples.data.mean(0).numpy()
        wave = np.asarray(audio, dtype=np.float32)
        if wave.ndim != 1:
            raise DataSourceError(f"task 'speech': column '{self.cfg.audio_column}' must hold mono waveforms, got "
                                  f"shape {wave.shape}")
        if rate != self.cfg.sampling_rate:
            raise DataSourceError(f"task 'speech': audio at {rate} Hz, expected DataConfig.sampling_rate="
                                  f"{self.cfg.sampling_rate}; resample the dataset or change sampling_rate")
        wave = wave[:self.max_samples]
        return (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)

    def _label_ids(self, text: str) -> list[int]:
        if isinstance(self.tokenizer, ByteTokenizer):
            return [b + 1 for b in self.tokenizer.encode(text.lower())]
        return list(self.tokenizer(text).input_ids)

    def __call__(self, rows: dict[str, list]) -> dict[str, np.ndarray]:
        waves = [self._waveform(a) for a in rows[self.cfg.audio_column]]
        labels = [self._label_ids(t) for t in _texts(rows, self.cfg.text_column, self.cfg.task)]
        longest = max(len(w) for w in waves)
        values = np.zeros((len(waves), longest), dtype=np.float32)
        mask = np.zeros((len(waves), longest), dtype=np.int64)
        for i, w in enumerate(waves):
            values[i, :len(w)] = w
            mask[i, :len(w)] = 1
        label_ids = np.full((len(labels), max(1, max(len(x) for x in labels))), -100, dtype=np.int64)
        for i, x in enumerate(labels):
            label_ids[i, :len(x)] = x
        return {"input_values": values, "attention_mask": mask, "labels": label_ids}


TASKS = {"image_classification": ImageClassification, "causal_lm": CausalLM, "speech": Speech}


def task_class(task: str) -> type:
    """The transform class of ``task``; a :class:`DataSourceError` names the valid tasks for an unknown one."""
    if task not in TASKS:
        raise DataSourceError(f"DataConfig.task '{task}' is unknown; expected one of {', '.join(TASKS)}")
    return TASKS[task]


def make_collate(cfg: DataConfig, columns: list[str]) -> Collate:
    """The transform-and-collate function of ``cfg.task`` for a dataset with ``columns``."""
    return task_class(cfg.task)(cfg, columns)
