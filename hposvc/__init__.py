"""hposvc: hyperparameter optimisation of neural-network training choices.

A study spec (TOML) runs as an Optuna study whose trials are PyTorch training jobs, stored
in SQL and MLflow; finished studies turn into default-optimizer recommendations.

>>> import hposvc
>>> run = hposvc.run_study("studies/quickstart.toml")       # doctest: +SKIP
>>> hposvc.best_config("quickstart").config.optimizer        # doctest: +SKIP
'adam'
>>> hposvc.trials("quickstart").head()                       # doctest: +SKIP

Heavy modules (torch, optuna, mlflow) load on first use of the function that needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

from hposvc.config import TrialConfig
from hposvc.errors import HposvcError, Interrupted, InvalidInputError, SpecError, StorageError, StorageUnavailableError, TrackingError, TrainingError, TrialPruned

__all__ = [
    "Best",
    "HposvcError",
    "Interrupted",
    "InvalidInputError",
    "SpecError",
    "StorageError",
    "StorageUnavailableError",
    "StudyRun",
    "StudySpec",
    "TrackingError",
    "TrainingError",
    "TrialConfig",
    "TrialContext",
    "TrialPruned",
    "best_config",
    "build_training",
    "load_spec",
    "load_task",
    "recommend",
    "run_study",
    "run_worker",
    "studies",
    "top_k",
    "trials",
    "warm_start_configs",
]

# public name -> module that defines it; imported on first attribute access
_LAZY = {
    "Best": "hposvc.results",
    "best_config": "hposvc.results",
    "build_training": "hposvc.results",
    "studies": "hposvc.results",
    "top_k": "hposvc.results",
    "trials": "hposvc.results",
    "StudyRun": "hposvc.records",
    "run_study": "hposvc.study",
    "run_worker": "hposvc.worker",
    "StudySpec": "hposvc.spec",
    "TrialContext": "hposvc.context",
    "load_spec": "hposvc.spec",
    "load_task": "hposvc.tasks",
    "recommend": "hposvc.recommendation",
    "warm_start_configs": "hposvc.recommendation",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hposvc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
