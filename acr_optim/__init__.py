"""acr-optim: robustness of neural networks to parameter corruption (Sun et al., AAAI 2021)."""

from .corruption import (
    LpCorruption,
    NonFiniteGradientError,
    first_order_gain,
    gradient_corruption,
    random_corruption,
    top_n_indices,
)
from .optimizer import ACR
from .penalty import penalized_loss
from .probe import corrupted, estimate_indicator

__version__ = "0.1.0"

__all__ = [
    "ACR",
    "ACRCallback",
    "LpCorruption",
    "NonFiniteGradientError",
    "corrupted",
    "estimate_indicator",
    "first_order_gain",
    "gradient_corruption",
    "penalized_loss",
    "random_corruption",
    "top_n_indices",
]


def __getattr__(name: str) -> object:
    # Imported on first use, so that `import acr_optim` does not import transformers.
    if name == "ACRCallback":
        from .integrations.hf import ACRCallback

        return ACRCallback
    raise AttributeError(f"module 'acr_optim' has no attribute {name!r}")
