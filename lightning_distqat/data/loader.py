"""Opening a dataset for the data server, and transforming its splits once into shared memory in a process of their
own.

``python -m lightning_distqat.data.loader CONFIG_JSON PREFIX PARENT_PID`` loads the dataset, checks it, transforms every split
into one shared-memory segment each (their names start with ``PREFIX``, which names the server: it attaches to them
and unlinks them at shutdown), prints one JSON line and exits. The server that stays up for the whole run then never imports
datasets, pyarrow or PIL: about 150 MiB less of its memory for an image task. Splits whose rows have no fixed shape
(speech), or that do not fit ``cache_max_gib``, are served by the server itself, transforming batches as it goes.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import numpy as np

from lightning_distqat.config import DataConfig
from lightning_distqat.data.errors import DataServerError, DataSourceError
from lightning_distqat.data.shm import SharedTensors, remove_segments_of, segment_prefix

__all__ = ["Opened", "open_splits", "cache_in_child"]

log = logging.getLogger(__name__)
_CHUNK = 256


@dataclass
class Opened:
    """A dataset ready to serve: its splits (``train`` and maybe ``validation``) and its transform."""

    datasets: dict[str, Any]
    collate: Callable[[dict[str, list]], dict[str, np.ndarray]]

    @property
    def rows(self) -> dict[str, int]:
        """Rows per split."""
        return {split: len(ds) for split, ds in self.datasets.items()}

    def prepare(self, split: str, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The batch of rows ``ids`` of ``split``, with their ``sample_ids``."""
        batch = self.collate(self.datasets[split][ids.tolist()])
        batch["sample_ids"] = np.asarray(ids, dtype=np.int64)
        return batch


def open_splits(cfg: DataConfig) -> Opened:
    """Load ``cfg``'s splits and transform, and check them on the first rows (a bad row fails here, not in a
    trainer). Raises :class:`DataSourceError` naming the problem."""
    from lightning_distqat.data.sources import load_splits
    from lightning_distqat.data.tasks import make_collate

    splits = load_splits(cfg)
    datasets = {"train": splits.train, **({"validation": splits.val} if splits.val is not None else {})}
    rows = len(splits.train)
    if cfg.batch_size > rows:
        raise DataSourceError(f"DataConfig.batch_size={cfg.batch_size} is larger than the train split of "
                              f"'{cfg.source}' ({rows} rows); use batch_size <= {rows}")
    opened = Opened(datasets, make_collate(cfg, list(splits.train.column_names)))
    opened.prepare("train", np.arange(min(2, rows)))
    return opened


def _cache_all(cfg: DataConfig, prefix: str) -> dict[str, Any]:
    """In the loader's process: every split transformed into a segment named ``prefix...``, or ``{"uncached"}`` when
    one does not fit ``cache_max_gib``."""
    from tqdm.auto import tqdm

    opened = open_splits(cfg)
    examples = {split: opened.collate(ds[:min(2, len(ds))]) for split, ds in opened.datasets.items()}
    for split, example in examples.items():
        need = opened.rows[split] * sum(a[:1].nbytes for a in example.values())
        if need > cfg.cache_max_gib * 2**30:
            return {"uncached": f"the transformed {split} split needs {need / 2**30:.1f} GiB > cache_max_gib="
                                f"{cfg.cache_max_gib}"}
    caches: dict[str, SharedTensors] = {}
    try:
        for split, ds in opened.datasets.items():
            rows = opened.rows[split]
            cache = caches[split] = SharedTensors.create(rows, examples[split], prefix)
            with tqdm(total=rows, desc=f"DataServer: transforming {split}", unit="rows", leave=False,
                      disable=rows < 20 * _CHUNK) as bar:
                for start in range(0, rows, _CHUNK):
                    cache.fill(start, opened.collate(ds[start:start + _CHUNK]))
                    bar.update(min(_CHUNK, rows - start))
    except BaseException:
        for cache in caches.values():
            cache.close()  # unlinked: nobody will attach to them
        raise
    for cache in caches.values():
        cache.detach()  # the server attaches and owns them from now on
    return {"rows": opened.rows, "caches": {split: [c.name, c.layout] for split, c in caches.items()}}


def cache_in_child(cfg: DataConfig) -> Optional[tuple[dict[str, int], dict[str, SharedTensors]]]:
    """Run the loader for ``cfg`` in its own process and attach to the segments it filled: ``(rows per split, cache
    per split)``, or ``None`` when a split does not fit ``cache_max_gib`` (the caller then serves uncached). Raises
    :class:`DataSourceError` for bad input and :class:`DataServerError` when the loader fails otherwise or takes
    longer than ``cfg.startup_timeout``."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    tag = secrets.token_hex(3)
    process = subprocess.Popen([sys.executable, "-m", "lightning_distqat.data.loader", json.dumps(asdict(cfg)),
                                segment_prefix(os.getpid(), tag), str(os.getpid())],
                               stdout=subprocess.PIPE, env=env, text=True)
    caches: dict[str, SharedTensors] = {}
    try:
        try:
            out, _ = process.communicate(timeout=cfg.startup_timeout)
        except subprocess.TimeoutExpired:
            raise DataServerError(f"the data server could not load and transform '{cfg.source}' within "
                                  f"startup_timeout={cfg.startup_timeout}s") from None
        reply = _last_json_line(out) or {"error": "DataServerError", "message": f"the data loader exited with code "
                                                                         f"{process.returncode} (its messages are above)"}
        if "error" in reply:
            raise (DataSourceError if reply["error"] == "DataSourceError" else DataServerError)(reply["message"])
        if "uncached" in reply:
            log.info("DataServer: %s; transforming batches as they are served", reply["uncached"])
            return None
        for split, (name, layout) in reply["caches"].items():
            caches[split] = SharedTensors.attach(name, layout)
        return reply["rows"], caches
    except BaseException:
        for cache in caches.values():
            cache.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        remove_segments_of(os.getpid(), tag)  # what the loader made for us before we could attach
        raise


def _last_json_line(out: str) -> Optional[dict[str, Any]]:
    """The loader's reply: its last line, if that is a JSON object (a library may have printed before it)."""
    lines = out.strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None
    return reply if isinstance(reply, dict) else None


def main(cfg_json: str, prefix: str, parent: int) -> int:
    """The loader's process: cache every split under ``prefix`` and print the reply. Dies with ``parent``."""
    import signal

    from lightning_distqat._process import die_with_parent

    die_with_parent(signal.SIGTERM)  # its resource tracker then unlinks what it made (nothing was detached yet)
    if os.getppid() != parent:
        return 1
    logging.basicConfig(level=logging.WARNING, format="[data loader] %(levelname)s %(name)s: %(message)s")
    try:
        reply = _cache_all(DataConfig(**json.loads(cfg_json)), prefix)
    except Exception as e:  # noqa: BLE001 - reported to the server, which raises it in the trainer
        reply = {"error": type(e).__name__ if isinstance(e, (DataSourceError, DataServerError)) else "DataServerError",
                 "message": str(e) if isinstance(e, DataSourceError) else f"{type(e).__name__}: {e}"}
    print(json.dumps(reply), flush=True)
    return 0 if "error" not in reply else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
