"""PLE-Cluster multi-task recommender trained with adaTT (adaptive task transfer).

Public names are imported lazily so that ``import ple_adatt`` is cheap and the training
core needs only torch and numpy.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "TaskAffinityComputer": "ple_adatt.transfer.adatt",
    "AdaptiveTaskTransfer": "ple_adatt.transfer.adatt",
    "PLEClusterModel": "ple_adatt.model",
    "build_model": "ple_adatt.model",
    "Trainer": "ple_adatt.training",
    "load_data_config": "ple_adatt.config",
    "load_train_config": "ple_adatt.config",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ple_adatt' has no attribute {name!r}")
