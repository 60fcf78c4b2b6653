"""acr-optim: robustness of neural networks to parameter corruption (Sun et al., AAAI 2021)."""

from typing import TYPE_CHECKING

from . import faults
from .corruption import (
    LpCorruption,
    NonFiniteGradientError,
    first_order_gain,
    gradient_corruption,
    random_corruption,
    top_n_indices,
)
from .faults import (
    Fault,
    bit_flip_error,
    cast_error,
    parse_fault,
    pruning_error,
    quantization_error,
    worst_bit_flips,
)
from .optimizer import ACR
from .penalty import penalized_loss
from .probe import corrupted, estimate_indicator

if TYPE_CHECKING:  # for type checkers and the API reference; imported lazily by __getattr__ below
    from .integrations.hf import ACRCallback

__version__ = "0.1.0"

__all__ = [
    "ACR",
    "ACRCallback",
    "Fault",
    "LpCorruption",
    "NonFiniteGradientError",
    "bit_flip_error",
    "cast_error",
    "corrupted",
    "estimate_indicator",
    "faults",
    "first_order_gain",
    "gradient_corruption",
    "parse_fault",
    "penalized_loss",
    "pruning_error",
    "quantization_error",
    "random_corruption",
    "top_n_indices",
    "worst_bit_flips",
]


def __getattr__(name: str) -> object:
    # Imported on first use, so that `import acr_optim` does not import transformers.
    if name == "ACRCallback":
        from .integrations.hf import ACRCallback

        return ACRCallback
    raise AttributeError(f"module 'acr_optim' has no attribute {name!r}")
