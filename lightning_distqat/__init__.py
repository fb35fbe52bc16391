"""lightning-distqat: train one LightningModule across a swarm of volunteer machines.

``Trainer(strategy=DistqatStrategy(stages=[...]))`` runs the named submodules on hivemind experts. Importing this
package also registers the strategy name, so ``Trainer(strategy="distqat")`` resolves.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_distqat.config import ExpertConfig, SwarmConfig
from lightning_distqat.strategy import DistqatStrategy
from lightning_distqat.swarm.pipeline import PipelineUnavailableError
from lightning_distqat.swarm.remote import ExpertError, ExpertUnavailableError

__all__ = [
    "DistqatStrategy",
    "SwarmConfig",
    "ExpertConfig",
    "ExpertError",
    "ExpertUnavailableError",
    "PipelineUnavailableError",
]
__version__ = "0.1.0"

if DistqatStrategy.strategy_name not in StrategyRegistry:
    DistqatStrategy.register_strategies(StrategyRegistry)
