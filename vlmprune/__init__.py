"""vlmprune: training-free vision-token pruning for transformers' vision-language models, in one line.

    model = vlmprune.patch(model, method="uniform", keep=0.25)
    vlmprune.unpatch(model)

Importing this package imports torch and nothing heavy beyond it: no transformers models, no lmms-eval, no
datasets, no patching.
"""

from __future__ import annotations

from .api import (
    get_config,
    is_patched,
    last_stats,
    list_methods,
    list_supported_models,
    make_config,
    patch,
    patched,
    unpatch,
)
from .config import PruneConfig
from .errors import (
    AlreadyPatchedError,
    ConfigError,
    LabelsWhilePruningError,
    NotPatchedError,
    PatchBypassedError,
    PlaceholderMismatchError,
    UnknownMethodError,
    UnsupportedInputError,
    UnsupportedModelError,
    UnsupportedVersionError,
    VlmpruneError,
)
from .methods.damro import DamroConfig
from .methods.fastv import FastVConfig
from .methods.fastvlm import FastVLMConfig
from .methods.hiprune import HiPruneConfig
from .methods.pool import PoolConfig
from .methods.random import RandomConfig
from .methods.uniform import UniformConfig
from .methods.visionzip import VisionZipConfig
from .methods.vqtoken import VQTokenConfig

__version__ = "0.1.0"

__all__ = [
    "patch",
    "unpatch",
    "patched",
    "is_patched",
    "last_stats",
    "get_config",
    "make_config",
    "list_methods",
    "list_supported_models",
    "PruneConfig",
    "RandomConfig",
    "UniformConfig",
    "PoolConfig",
    "HiPruneConfig",
    "VisionZipConfig",
    "FastVConfig",
    "VQTokenConfig",
    "DamroConfig",
    "FastVLMConfig",
    "VlmpruneError",
    "UnknownMethodError",
    "UnsupportedModelError",
    "UnsupportedVersionError",
    "ConfigError",
    "AlreadyPatchedError",
    "NotPatchedError",
    "PlaceholderMismatchError",
    "LabelsWhilePruningError",
    "PatchBypassedError",
    "UnsupportedInputError",
    "__version__",
]
