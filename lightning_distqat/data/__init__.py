"""Data for trainers: the shared-memory data server (``server``, ``distqat-data``), the trainer's client (``client``)
and datamodule (``datamodule``), dataset loading (``sources``), per-task collation (``tasks``), shared memory
(``shm``) and the epoch plan (``order``). The public names are exported by ``lightning_distqat``.

This package imports nothing here: the data server's own process loads only what it uses, without Lightning."""
