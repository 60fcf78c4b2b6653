"""The first-order form of the ACR objective (paper Eq. 16): ``L + lambda * ||g||_{p/(p-1)}``."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .checks import check_eps
from .corruption import first_order_gain

__all__ = ["penalized_loss"]


def penalized_loss(loss: Tensor, params: Iterable[Tensor], lam: float, p: float = 2, n: int | None = None) -> Tensor:
    r"""``loss + lam * ||top_n(grad loss)||_{p/(p-1)}``, differentiable through the gradient norm.

    This is the first-order expansion of ``max_{a in S} L(w + a)`` with ``eps = lam``
    (:func:`~acr_optim.first_order_gain`).  Calling ``.backward()`` on the result is a double
    backward: the gradient is built with ``create_graph=True``, so one call costs about one
    forward plus three backward passes and keeps the first backward's graph alive (roughly
    twice the activation memory of a plain step).  :class:`~acr_optim.ACR` reaches the same
    objective with two ordinary passes and no second-order graph; use this form when you want
    the penalty value itself, or inside a custom objective.
    """
    lam = check_eps(lam, allow_zero=True, name="lam")
    params = [w for w in params if w.requires_grad]
    if lam == 0 or not params:
        return loss
    grads = [g for g in torch.autograd.grad(loss, params, create_graph=True, allow_unused=True) if g is not None]
    if not grads:
        return loss
    return loss + first_order_gain(grads, lam, p, n).to(loss.dtype)
