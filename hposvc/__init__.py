"""hposvc: hyperparameter optimisation of neural-network training choices."""

from hposvc.config import TrialConfig
from hposvc.errors import HposvcError, InvalidInputError, SpecError, StorageError, TrackingError, TrainingError

__all__ = [
    "HposvcError",
    "InvalidInputError",
    "SpecError",
    "StorageError",
    "TrackingError",
    "TrainingError",
    "TrialConfig",
]
