"""lightning-distqat: train one LightningModule across a swarm of volunteer machines.

``Trainer(strategy=DistqatStrategy(stages=[...]))`` runs the named submodules on hivemind experts. Importing this
package also registers the strategy name, so ``Trainer(strategy="distqat")`` resolves.
"""

import warnings

# hivemind's MoE layers call torch.jit.script when imported; current torch warns about that in every process.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

from lightning.pytorch.strategies import StrategyRegistry  # noqa: E402

from lightning_distqat.config import DataConfig, ExpertConfig, QuantConfig, SwarmConfig  # noqa: E402
from lightning_distqat.data import DataServer, DataServerError, DataSourceError, SharedMemoryDataModule  # noqa: E402
from lightning_distqat.diloco import DiLoCoConfig  # noqa: E402
from lightning_distqat.strategy import DistqatStrategy  # noqa: E402
from lightning_distqat.swarm.pipeline import PipelineUnavailableError  # noqa: E402
from lightning_distqat.swarm.remote import ExpertError, ExpertUnavailableError  # noqa: E402

__all__ = [
    "DistqatStrategy",
    "DiLoCoConfig",
    "SwarmConfig",
    "ExpertConfig",
    "DataConfig",
    "QuantConfig",
    "SharedMemoryDataModule",
    "DataServer",
    "DataServerError",
    "DataSourceError",
    "ExpertError",
    "ExpertUnavailableError",
    "PipelineUnavailableError",
]
__version__ = "0.1.0"

if DistqatStrategy.strategy_name not in StrategyRegistry:
    DistqatStrategy.register_strategies(StrategyRegistry)
