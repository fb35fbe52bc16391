"""The data server's pure logic (epoch order, tasks, loading) and an in-process server with real shared memory."""

from __future__ import annotations

import json
import os
from collections import Counter

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_distqat import DataConfig, DataServer, DataServerError, DataSourceError, SharedMemoryDataModule
from lightning_distqat.data.client import DataClient
from lightning_distqat.data.order import buffered_shuffle, epoch_batches, share_length, trainer_share
from lightning_distqat.data.sources import load_splits
from lightning_distqat.data.tasks import make_collate


# ---------------------------------------------------------------------- order
@pytest.mark.parametrize("n,buffer", [(1000, 64), (1000, 1), (1000, 5000), (7, 3)])
def test_buffered_shuffle_is_a_bounded_permutation(n, buffer):
    order = buffered_shuffle(n, buffer, seed=1)
    assert sorted(order.tolist()) == list(range(n))
    positions = np.empty(n, dtype=np.int64)
    positions[order] = np.arange(n)
    if buffer < n:
        assert (positions >= np.arange(n) - (buffer - 1)).all(), "a sample moved earlier than the buffer allows"
    assert np.array_equal(order, buffered_shuffle(n, buffer, seed=1))
    if buffer > 1:
        assert not np.array_equal(order, buffered_shuffle(n, buffer, seed=2))


@pytest.mark.parametrize("drop_last", [False, True])
def test_trainers_share_an_epoch_exactly_once(drop_last):
    batches = epoch_batches(103, 8, seed=0, epoch=2, shuffle_buffer=30, drop_last=drop_last)
    seen = Counter()
    for tid in range(3):
        share = trainer_share(len(batches), 3, tid)
        assert len(share) == share_length(len(batches), 3, tid)
        for j in share:
            seen.update(batches[j].tolist())
    assert max(seen.values()) == 1
    assert len(seen) == (96 if drop_last else 103)
    other_epoch = epoch_batches(103, 8, seed=0, epoch=3, shuffle_buffer=30, drop_last=drop_last)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other_epoch))


# ---------------------------------------------------------------------- tasks
def test_image_classification_collate():
    cfg = DataConfig(task="image_classification", image_size=16, channels=3, mean=[0.5], std=[0.25])
    collate = make_collate(cfg, ["image", "label"])
    images = [np.full((8, 8), 255, dtype=np.uint8), np.zeros((8, 8), dtype=np.uint8)]
    batch = collate({"image": images, "label": [3, 4]})
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["pixel_values"].flags["C_CONTIGUOUS"]
    assert batch["pixel_values"].dtype == np.float32
    assert np.allclose(batch["pixel_values"][0], 2.0) and np.allclose(batch["pixel_values"][1], -2.0)  # (1 - .5) / .25
    assert batch["labels"].tolist() == [3, 4]
    with pytest.raises(DataSourceError, match="integer class ids"):
        collate({"image": images, "label": ["cat", "dog"]})


def test_causal_lm_collate_with_bytes():
    collate = make_collate(DataConfig(task="causal_lm", seq_len=6), ["text"])
    batch = collate({"text": ["hi", "hello world"]})
    assert batch["input_ids"].tolist() == [[104, 105, 256, 256, 256, 256], list(b"hello ")]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0, 0, 0], [1] * 6]
    assert batch["labels"].tolist() == [[104, 105, -100, -100, -100, -100], list(b"hello ")]


def test_causal_lm_with_a_local_transformers_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the cat sat on the mat"] * 3, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]", unk_token="[UNK]").save_pretrained(tmp_path)
    batch = make_collate(DataConfig(task="causal_lm", seq_len=5, tokenizer=str(tmp_path)), ["text"])(
        {"text": ["the cat", "the mat sat on the cat"]})
    eos = PreTrainedTokenizerFast.from_pretrained(tmp_path).eos_token_id
    assert batch["input_ids"].shape == (2, 5)
    assert batch["input_ids"][0, 2:].tolist() == [eos] * 3 and batch["labels"][0, 2:].tolist() == [-100] * 3
    assert batch["attention_mask"].sum().item() == 7


def test_speech_collate_pads_and_normalises():
    cfg = DataConfig(task="speech", sampling_rate=100, max_audio_seconds=0.5)
    collate = make_collate(cfg, ["audio", "text"])
    rng = np.random.default_rng(0)
    batch = collate({"audio": [{"array": rng.normal(3, 2, 80), "sampling_rate": 100}, rng.normal(0, 1, 30).tolist()],
                     "text": ["Ab", "c"]})
    assert batch["input_values"].shape == (2, 50)  # cut to 0.5 s, padded to the longest
    assert batch["attention_mask"].sum(1).tolist() == [50, 30]
    assert abs(batch["input_values"][0].mean().item()) < 1e-5
    assert batch["labels"].tolist() == [[ord("a") + 1, ord("b") + 1], [ord("c") + 1, -100]]
    with pytest.raises(DataSourceError, match="expected DataConfig.sampling_rate=100"):
        collate({"audio": [{"array": [0.0] * 10, "sampling_rate": 16000}], "text": ["x"]})


def test_missing_column_and_unknown_task_are_named():
    with pytest.raises(DataSourceError) as e:
        make_collate(DataConfig(source="mine.csv", task="causal_lm", text_column="body"), ["text", "id"])
    assert "'body' (DataConfig.text_column)" in str(e.value) and "['text', 'id']" in str(e.value)
    with pytest.raises(DataSourceError, match="DataConfig.task 'translation' is unknown"):
        make_collate(DataConfig(task="translation"), ["text"])


# ---------------------------------------------------------------------- loading
def _text_rows(n: int) -> list[dict]:
    return [{"text": f"sample number {i}", "id": i} for i in range(n)]


def _write(tmp_path, kind: str) -> str:
    import datasets

    rows = _text_rows(12)
    if kind == "txt":
        path = tmp_path / "corpus.txt"
        path.write_text("\n".join(r["text"] for r in rows) + "\n")
    elif kind == "jsonl":
        path = tmp_path / "rows.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif kind == "csv":
        path = tmp_path / "rows.csv"
        path.write_text("text,id\n" + "\n".join(f"{r['text']},{r['id']}" for r in rows))
    elif kind == "parquet":
        path = tmp_path / "rows.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "save_to_disk":
        path = tmp_path / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    elif kind == "folder":
        path = tmp_path / "folder"
        path.mkdir()
        datasets.Dataset.from_list(rows).to_json(str(path / "train.jsonl"))
    return str(path)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv", "parquet", "save_to_disk", "folder"])
def test_local_text_sources(tmp_path, kind):
    splits = load_splits(DataConfig(source=_write(tmp_path, kind), task="causal_lm"))
    assert len(splits.train) == 12
    assert splits.train[3]["text"] == "sample number 3"


def test_image_folder_source(tmp_path):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (10, 12), (200 if label == "cat" else 20, i * 40, 0)).save(
                tmp_path / "images" / label / f"{i}.png")
    cfg = DataConfig(source=str(tmp_path / "images"), task="image_classification", image_size=4)
    splits = load_splits(cfg)
    assert len(splits.train) == 6
    batch = make_collate(cfg, splits.train.column_names)(splits.train[:6])
    assert batch["pixel_values"].shape == (6, 3, 4, 4) and sorted(batch["labels"].tolist()) == [0, 0, 0, 1, 1, 1]


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(DataSourceError, match=r"'/nonexistent/corpus\.txt': no such file or folder; expected"):
        load_splits(DataConfig(source="/nonexistent/corpus.txt"))
    with pytest.raises(DataSourceError, match="unknown dataset 'nobody/no-such-dataset'"):
        load_splits(DataConfig(source="nobody/no-such-dataset"))  # offline in tests: HF_HUB_OFFLINE=1
    with pytest.raises(DataSourceError, match="has no split 'validation'; available: train"):
        load_splits(DataConfig(source=_write(tmp_path, "save_to_disk"), val_split="validation"))
    with pytest.raises(DataSourceError, match="has one split, 'train'"):
        load_splits(DataConfig(source="sklearn-digits", split="test"))


# ---------------------------------------------------------------------- an in-process server
def _server_cfg(tmp_path, **kw) -> DataConfig:
    base = dict(source="sklearn-digits", image_size=8, channels=1, batch_size=100, shuffle_buffer=300,
                address=f"/tmp/dq-{os.getpid()}-{tmp_path.name[-12:]}.sock")
    return DataConfig(**{**base, **kw})


def _orders(cfg: DataConfig, epochs=(0,)) -> dict[tuple[int, int], list[list[int]]]:
    with DataServer(cfg):
        out = {}
        for tid in range(cfg.num_trainers):
            client = DataClient(cfg.address, tid).connect()
            try:
                for epoch in epochs:
                    client.start("train", epoch)
                    out[tid, epoch] = [b["sample_ids"].tolist() for _, b in client.batches()]
            finally:
                client.close()
        return out


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "streamed"])
def test_same_seed_same_order_other_seed_other_order(tmp_path, cache):
    first = _orders(_server_cfg(tmp_path, num_trainers=2, seed=7, cache=cache), epochs=(0, 1))
    again = _orders(_server_cfg(tmp_path, num_trainers=2, seed=7, cache=not cache), epochs=(0, 1))
    other = _orders(_server_cfg(tmp_path, num_trainers=2, seed=8, cache=cache), epochs=(0, 1))
    assert first == again, "cached and streamed servers hand out the same batches"
    for key in first:
        assert first[key] != other[key]
    assert first[0, 0] != first[0, 1], "every epoch has its own order"
    ids = [i for tid in range(2) for batch in first[tid, 0] for i in batch]
    assert sorted(ids) == list(range(1797))


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "streamed"])
def test_reconnecting_trainer_resumes_at_its_first_unfinished_batch(tmp_path, cache):
    cfg = _server_cfg(tmp_path, num_trainers=2, cache=cache)
    with DataServer(cfg):
        client = DataClient(cfg.address, 1).connect()
        assert client.start("train", 0) == (9, 0)
        got = client.batches()
        done = [next(got) for _ in range(3)]
        client.ack(0, done[0][0])
        client.ack(0, done[1][0])  # the third was handed out but never finished
        client.close()
        client = DataClient(cfg.address, 1).connect()
        try:
            assert client.start("train", 0) == (9, 2)
            rest = list(client.batches())
        finally:
            client.close()
    assert [j for j, _ in rest] == [done[2][0]] + [j for j in range(1, 18, 2)][3:]
    assert torch.equal(rest[0][1]["pixel_values"], done[2][1]["pixel_values"])


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(tmp_path):
    cfg = _server_cfg(tmp_path, num_trainers=2)
    with DataServer(cfg):
        intruder = DataClient(cfg.address, 5).connect()
        with pytest.raises(DataServerError, match=r"trainer_id 5 is out of range .*num_trainers=2"):
            intruder.start("train", 0)
        with pytest.raises(DataServerError, match="has no 'validation' split"):
            intruder.start("validation", 0)
        first = DataClient(cfg.address, 0).connect()
        first.start("train", 0)
        twin = DataClient(cfg.address, 0).connect()
        with pytest.raises(DataServerError, match="trainer_id 0 is already connected"):
            twin.start("train", 0)
        assert len(list(first.batches())) == 9
        for c in (intruder, first, twin):
            c.close()
        with pytest.raises(DataServerError, match="already listens"):
            DataServer(cfg).start()
    with pytest.raises(DataSourceError, match=r"batch_size=5000 is larger than the train split .*1797 rows"):
        DataServer(_server_cfg(tmp_path, batch_size=5000)).start()
    with pytest.raises(DataServerError, match="no data server answers"):
        DataClient(cfg.address).connect()


# ---------------------------------------------------------------------- the datamodule in a plain Trainer
class _Recorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)
        self.train_ids: list[int] = []
        self.val_ids: list[int] = []

    def training_step(self, batch, batch_idx):
        self.train_ids += batch["sample_ids"].tolist()
        return F.cross_entropy(self.layer(batch["pixel_values"].flatten(1)), batch["labels"])

    def validation_step(self, batch, batch_idx):
        self.val_ids += batch["sample_ids"].tolist()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_datamodule_with_embedded_server_in_a_plain_trainer():
    data = SharedMemoryDataModule(source="sklearn-digits", image_size=8, channels=1, batch_size=64, val_fraction=0.2)
    model = _Recorder()
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    assert data._server is None, "the embedded server stops at teardown"
    n_train = 1797 - int(np.ceil(1797 * 0.2))
    assert len(model.train_ids) == 2 * n_train and len(set(model.train_ids[:n_train])) == n_train
    assert model.train_ids[:n_train] != model.train_ids[n_train:], "the second epoch is reshuffled"
    assert sorted(set(model.val_ids)) == list(range(1797 - n_train))


def test_embedded_server_reports_bad_input_in_the_trainer():
    data = SharedMemoryDataModule(source="sklearn-digits", task="causal_lm")
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(DataSourceError, match="no column 'text' \\(DataConfig.text_column\\)"):
        trainer.fit(_Recorder(), datamodule=data)
    with pytest.raises(TypeError, match="valid options are the fields of DataConfig"):
        SharedMemoryDataModule(batchsize=3)
