"""lightning-distqat: train one LightningModule across a swarm of volunteer machines.

``Trainer(strategy=DistqatStrategy(stages=[...]))`` runs the named submodules on hivemind experts.

Importing this package is cheap: its public names are loaded on first use (PEP 562), so an expert process or the data
server's child never pays for Lightning. ``Trainer(strategy="distqat")`` resolves once this package is imported: the
name is registered with Lightning's strategy registry as soon as Lightning loads it (at once if it already has).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any, Optional, Sequence


__version__ = "0.1.0"

_EXPORTS = {
    "DistqatStrategy": "lightning_distqat.strategy",
    "DiLoCoConfig": "lightning_distqat.diloco.config",
    "SwarmConfig": "lightning_distqat.config",
    "ExpertConfig": "lightning_distqat.config",
    "DataConfig": "lightning_distqat.config",
    "QuantConfig": "lightning_distqat.config",
    "SharedMemoryDataModule": "lightning_distqat.data.datamodule",
    "DataServer": "lightning_distqat.data.server",
    "DataServerError": "lightning_distqat.data.errors",
    "DataSourceError": "lightning_distqat.data.errors",
    "SwarmMetrics": "lightning_distqat.callbacks",
    "TrainingSummary": "lightning_distqat.callbacks",
    "ExpertError": "lightning_distqat.swarm.remote",
    "ExpertUnavailableError": "lightning_distqat.swarm.remote",
    "PipelineUnavailableError": "lightning_distqat.swarm.client",
    "ExpertStartupError": "lightning_distqat.swarm.embedded",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from lightning_distqat.callbacks import SwarmMetrics, TrainingSummary
    from lightning_distqat.config import DataConfig, ExpertConfig, QuantConfig, SwarmConfig
    from lightning_distqat.data.datamodule import SharedMemoryDataModule
    from lightning_distqat.data.errors import DataServerError, DataSourceError
    from lightning_distqat.data.server import DataServer
    from lightning_distqat.diloco.config import DiLoCoConfig
    from lightning_distqat.strategy import DistqatStrategy
    from lightning_distqat.swarm.client import PipelineUnavailableError
    from lightning_distqat.swarm.embedded import ExpertStartupError
    from lightning_distqat.swarm.remote import ExpertError, ExpertUnavailableError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_distqat' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


# ---------------------------------------------------------------------- Trainer(strategy="distqat")
_REGISTRY_MODULE = "lightning.pytorch.strategies"


def _register(registry: Any) -> None:
    """Register ``"distqat"`` with a factory that imports the strategy when a Trainer asks for it (Lightning calls a
    strategy class's ``register_strategies`` only for its own strategies)."""
    if "distqat" not in registry:

        def _make(**kwargs: Any) -> Any:
            from lightning_distqat.strategy import DistqatStrategy

            return DistqatStrategy(**kwargs)

        registry.register("distqat", _make, description="Pipeline stages on hivemind swarm experts (lightning-distqat)")


class _RegisterOnLoad(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Registers the strategy name right after Lightning has built its strategy registry (a one-shot import hook)."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None) -> Any:
        if fullname != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader  # the module is Lightning's own again
        _register(module.StrategyRegistry)


if _REGISTRY_MODULE in sys.modules:
    _register(sys.modules[_REGISTRY_MODULE].StrategyRegistry)
elif not any(isinstance(finder, _RegisterOnLoad) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOnLoad())
