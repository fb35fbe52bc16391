"""The trainer's side of the swarm: its DHT node (``dht``), the stage directory and leases (``client``), the
pipeline it holds (``pipeline``), the remote proxy of a stage (``remote``), the wire format (``messages``), the
embedded experts (``embedded``) and the start-to-stop session of a trainer (``membership``).

Nothing here imports the strategy."""

from lightning_distqat import _hivemind  # noqa: F401  (imports hivemind quietly, before any submodule does)
