"""The methods of the converged runs (finding 3) and of finding 4, named and built one way: AdamW, or
``ACR(AdamW, eps, p, alpha)``, at a step budget."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """A training recipe: AdamW (``eps=None``) or ``ACR(AdamW, eps, p, alpha)``; ``budget`` scales patience and step cap."""

    name: str
    eps: float | None = None
    p: float = 2.0
    alpha: float = 0.5
    budget: int = 1


def final_methods(eps: float | None, num_params: int) -> list[Method]:
    """The final rows at the sweep's ``eps``, in the order they run (the comparisons that matter most complete
    first, every seed of one before the next); only the AdamW rows while the sweep is unfinished (``eps=None``)."""
    if eps is None:
        return [Method("adamw"), Method("adamw_2x", budget=2)]
    return [
        Method("adamw"),
        Method("acr", eps=eps),
        Method("sam", eps=eps, alpha=1.0),
        Method("acr_inf", eps=eps / math.sqrt(num_params), p=math.inf),
        Method("adamw_2x", budget=2),
    ]
