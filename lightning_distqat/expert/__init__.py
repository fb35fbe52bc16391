"""One expert: the stage it hosts (``backend``), its RPCs (``servicer``), its lifecycle (``server``) and the entry
point of an expert started by a trainer's embedded swarm (``python -m lightning_distqat.expert``).

Nothing here imports Lightning or the strategy."""

from lightning_distqat import _hivemind  # noqa: F401  (imports hivemind quietly, before any submodule does)
