"""Training: the self-distillation objective that teaches a masktok adapter multi-token prediction."""

from .config import MaskTokTrainingConfig
from .objective import DistillationOutput, distillation_step
from .trainer import MaskTokTrainer

__all__ = [
    "DistillationOutput",
    "MaskTokTrainer",
    "MaskTokTrainingConfig",
    "distillation_step",
]
