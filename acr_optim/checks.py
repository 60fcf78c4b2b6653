"""Argument checks shared by the optimizer, the corruption maths, the probes, the fault models and the callback.

Each returns the value (as the type the caller computes with) or raises one ``TypeError`` /
``ValueError`` that names the argument (``name``) and its allowed range.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_alpha", "check_eps", "check_fraction", "check_int", "check_n", "check_p"]


def check_eps(eps: float, *, allow_zero: bool = False, name: str = "eps") -> float:
    """Return ``eps`` as a float, or raise ``ValueError`` unless it is finite and > 0 (>= 0 if allowed)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(eps).__name__}")
    lower_ok = eps >= 0 if allow_zero else eps > 0
    if not (math.isfinite(eps) and lower_ok):
        allowed = "finite and >= 0" if allow_zero else "finite and > 0"
        raise ValueError(f"{name} must be {allowed}, got {eps!r}")
    return float(eps)


def check_p(p: float, name: str = "p") -> float:
    """Return ``p`` as a float, or raise ``ValueError`` unless ``1 <= p <= inf``."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a real number in [1, inf], got {type(p).__name__}")
    if math.isnan(p) or p < 1:
        raise ValueError(f"{name} must satisfy 1 <= {name} <= inf, got {p!r}")
    return float(p)


def check_n(n: int | None, name: str = "n") -> int | None:
    """Return ``n``, or raise unless it is None (no L0 limit) or a positive int."""
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be a positive int or None, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name} must be a positive int (>= 1) or None, got {n!r}")
    return n


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """Return ``alpha`` as a float, or raise ``ValueError`` unless ``0 <= alpha <= 1``."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{name} must be a real number in [0, 1], got {type(alpha).__name__}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"{name} must satisfy 0 <= {name} <= 1, got {alpha!r}")
    return float(alpha)


def check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    """Return ``value``, or raise unless it is an int ``>= low`` (and ``<= high`` when given)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_fraction(value: Any, name: str, closed: bool) -> float:
    """Return ``value`` as a float, or raise unless it is a real number in [0, 1] (``closed``) or [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (0 <= value <= 1 if closed else 0 <= value < 1):
        raise ValueError(f"{name} must be in [0, 1{']' if closed else ')'}, got {value!r}")
    return float(value)
