"""Example model families, each a LightningModule with named stage paths (``STAGES``)."""

from lightning_distqat.models.gpt_neo import GPTNeoLM
from lightning_distqat.models.mlp import MLPClassifier
from lightning_distqat.models.resnet import ResNetClassifier
from lightning_distqat.models.wav2vec2 import Wav2Vec2CTC

__all__ = ["GPTNeoLM", "MLPClassifier", "ResNetClassifier", "Wav2Vec2CTC"]
