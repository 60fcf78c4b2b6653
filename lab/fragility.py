"""Finding 2's measurement, shared by ``experiments/where_fragile.py`` (fixed budget) and ``experiments/converged.py``
(converged AdamW models): the gradient corruption of one parameter group at a time, under a budget (:class:`View`);
the paper's budget is :func:`paper_view`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from acr_optim.probe import group_parameters, probe

PAPER_EPS = [0.05, 0.1, 0.2, 0.5, 1.0]
PAPER_N = {"type": 10, "layer": 100}


@dataclass(frozen=True)
class View:
    """One way to budget the corruption of a group: ``L_p`` norm ``eps`` on at most ``n`` entries;
    ``rms`` scales eps by ``sqrt(N_g / N)`` (the same RMS change per entry in every group)."""

    name: str
    p: float
    n: int | None
    rms: bool
    eps: tuple[float, ...]


def paper_view(by: str, paper_eps: list[float] = PAPER_EPS, paper_n: dict[str, int] = PAPER_N) -> View:
    """The paper's budget (Figure 4 caption): ``p = inf`` on the ``n`` entries of largest ``|gradient|``."""
    return View("paper", math.inf, paper_n[by], False, tuple(paper_eps))


def fragility_rows(batches: list[Any], model: Any, by: str, view: View) -> list[dict[str, Any]]:
    """The gradient corruption of each ``by`` group alone, one row per (group, eps) under ``view``, on ``batches``."""
    groups = group_parameters(model, by)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sizes = dict(model.named_parameters())
    rows = []
    for group, names in groups.items():
        size = sum(sizes[name].numel() for name in names)
        scale = math.sqrt(size / total) if view.rms else 1.0
        eps = [e * scale for e in view.eps]
        table = probe(model, batches, eps=eps, p=view.p, n=view.n, params=names, by="all")
        for nominal, row in zip(view.eps, table.rows):
            rows.append(
                {
                    "by": by,
                    "view": view.name,
                    "group": group,
                    "num_params": size,
                    "method": row["method"],
                    "p": view.p,
                    "n": view.n,
                    "eps": nominal,
                    "eps_applied": row["eps"],
                    "loss_clean": row["loss_clean"],
                    "delta_loss": row["delta_loss"],
                    "first_order": row["first_order"],
                }
            )
    return rows
