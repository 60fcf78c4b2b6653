"""Parameter-vulnerability probing (Sun et al., AAAI 2021, Sec. 3): how much can a corruption of
norm ``eps`` (at most ``n`` entries) raise the loss, and which parameters are most fragile.

>>> from acr_optim.probe import estimate_indicator, probe, corrupted
>>> result = estimate_indicator(model, batches, eps=0.1, method="gradient")  # doctest: +SKIP
>>> table = probe(model, batches, eps=[0.01, 0.1], method=["gradient", "random"], by="layer")  # doctest: +SKIP
>>> table.to_markdown("probe.md"); table.heatmap("heatmap.png")  # doctest: +SKIP
"""

from .groups import GroupBy, group_parameters, parameter_type
from .indicator import (
    METHODS,
    CorruptionResolutionWarning,
    IndicatorResult,
    corrupted,
    default_loss,
    estimate_indicator,
    preserved,
)
from .report import ProbeTable
from .sweep import probe

__all__ = [
    "METHODS",
    "CorruptionResolutionWarning",
    "GroupBy",
    "IndicatorResult",
    "ProbeTable",
    "corrupted",
    "default_loss",
    "estimate_indicator",
    "group_parameters",
    "parameter_type",
    "preserved",
    "probe",
]
