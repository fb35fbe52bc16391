"""A Lightning ``ParallelStrategy`` for trainer processes that share no process group.

``Trainer(devices=N)`` starts N trainer processes on this machine with Lightning's subprocess launcher; each gets its
own shard of the data (``is_distributed``), and they never call torch.distributed: they meet through the swarm
(DiLoCo rounds) and a small rendezvous at start and end. Collectives are therefore local no-ops. Trainers on other
machines join the swarm with ``initial_peers`` rather than ``num_nodes``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from lightning_distqat.swarm.rendezvous import ensure_secret

__all__ = ["LocalRanksStrategy"]


class LocalRanksStrategy(ParallelStrategy):
    """N local trainer processes without torch.distributed (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._num_nodes = 1

    @property
    @override
    def root_device(self) -> torch.device:
        from lightning.pytorch.accelerators import CUDAAccelerator

        if self.parallel_devices:
            return self.parallel_devices[self.local_rank]
        return torch.device("cuda", torch.cuda.current_device()) if isinstance(self.accelerator, CUDAAccelerator) \
            else torch.device("cpu")

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        if num_nodes != 1:
            raise ValueError(f"DistqatStrategy: num_nodes={num_nodes}; trainers on other machines join the swarm with "
                             "initial_peers instead of num_nodes")
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices else 1

    @property
    def is_distributed(self) -> bool:
        """Several trainer processes (``devices=N``): Lightning then gives each its own shard of the data."""
        return self.num_processes > 1

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.local_rank)
            self.cluster_environment.set_world_size(self.num_processes)
        rank_zero_only.rank = self.global_rank

    @override
    def _configure_launcher(self) -> None:
        env = self.cluster_environment
        if self.num_processes > 1 and env is not None and not env.creates_processes_externally:
            ensure_secret()  # the ranks this process launches inherit it and sign their rendezvous with it
            self._launcher = _SubprocessScriptLauncher(env, self.num_processes, 1)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @override
    def reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean") -> Any:
        return tensor  # ranks talk only through DiLoCo rounds

    @override
    def barrier(self, name: Optional[str] = None) -> None:
        pass

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    @override
    def all_gather(self, tensor: torch.Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> torch.Tensor:
        return tensor
