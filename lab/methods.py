"""Every training method of the experiments and benchmarks, named and built one way: AdamW (at a multiple of the
step budget), ``ACR(AdamW, ...)`` in any setting, and the SAM-family peers of ``pytorch-optimizer`` around AdamW.

A :class:`Method` says how to build its optimizer (:meth:`Method.build`), how a training step drives it
(``driver``, one of :data:`lab.loop.DRIVERS`) and how much budget it gets.  :func:`final_methods` are the rows of
the converged runs (finding 3) and of finding 4, :func:`frontier_methods` those of ``benchmarks/frontier.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from acr_optim import ACR

ADAMW_WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default


@dataclass(frozen=True, eq=False)
class Method:
    """A training method.

    ``family`` is ``"AdamW"``, ``"ACR"`` or a peer's name in the tables; ``settings`` what sets it apart (ACR's
    ``eps``, ``p``, ``alpha``, ``interval`` and ``n_fraction``, the share of the weights it corrupts; a peer's
    keyword arguments; AdamW's ``budget``); ``peer`` the ``pytorch-optimizer`` class of a SAM-family peer;
    ``budget`` multiplies the step budget (and, for the converged runs, the patience).
    """

    name: str
    family: str = "AdamW"
    settings: dict[str, Any] = field(default_factory=dict)
    driver: str = "plain"
    budget: float = 1
    peer: str | None = None

    @property
    def eps(self) -> float | None:
        """ACR's training radius (``None`` for AdamW and the peers)."""
        return self.settings.get("eps") if self.family == "ACR" else None

    @property
    def p(self) -> float:
        """ACR's norm (2 unless set)."""
        return self.settings.get("p", 2.0)

    @property
    def alpha(self) -> float:
        """ACR's weight of the corrupted loss (0.5 unless set)."""
        return self.settings.get("alpha", 0.5)

    def record(self) -> dict[str, Any]:
        """How the converged and finding-4 records name the method (their run ids hash it): name, ACR's eps
        (``None`` for AdamW), p, alpha and the budget."""
        return {"name": self.name, "eps": self.eps, "p": self.p, "alpha": self.alpha, "budget": self.budget}

    def build(self, model: nn.Module, lr: float, weight_decay: float = ADAMW_WEIGHT_DECAY) -> torch.optim.Optimizer:
        """The optimizer of ``model``'s parameters: AdamW at ``lr`` and ``weight_decay``, wrapped in ACR, or the peer
        around AdamW (at ``lr`` and AdamW's other defaults)."""
        if self.peer is not None:
            return _peer(self.peer, model, lr, self.settings)
        adamw = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        if self.family != "ACR":
            return adamw
        fraction = self.settings.get("n_fraction")
        n = None if fraction is None else max(1, round(fraction * sum(p.numel() for p in model.parameters())))
        interval = self.settings.get("interval", 1)
        return ACR(adamw, eps=self.settings["eps"], p=self.p, alpha=self.alpha, n=n, interval=interval)


def _peer(name: str, model: nn.Module, lr: float, settings: dict[str, Any]) -> torch.optim.Optimizer:
    """The ``pytorch-optimizer`` class ``name`` around AdamW, constructed as its documentation says."""
    import pytorch_optimizer as po

    if name == "GSAM":  # a rho schedule is required; constant here, as for every other method
        base = torch.optim.AdamW(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(base, lambda _: 1.0)
        rho = po.ProportionScheduler(
            schedule, max_lr=lr, min_lr=0.0, max_value=settings["rho"], min_value=settings["rho"]
        )
        rest = {k: v for k, v in settings.items() if k != "rho"}
        return po.GSAM(model.parameters(), base, model, rho, **rest)
    if name == "WSAM":
        return po.WSAM(model, model.parameters(), torch.optim.AdamW, lr=lr, **settings)
    return getattr(po, name)(model.parameters(), torch.optim.AdamW, lr=lr, **settings)


def adamw(name: str = "adamw", budget: float = 1, settings: dict[str, Any] | None = None) -> Method:
    """AdamW at ``budget`` times the step budget."""
    return Method(name, "AdamW", settings or {}, "plain", budget)


def acr(name: str, eps: float, **settings: Any) -> Method:
    """``ACR(AdamW, eps, **settings)``: ``p``, ``alpha``, ``interval``, ``n_fraction``."""
    return Method(name, "ACR", {"eps": eps, **settings}, "closure")


def final_methods(eps: float | None, num_params: int) -> list[Method]:
    """The final rows at the sweep's ``eps``, in the order they run (the comparisons that matter most complete
    first, every seed of one before the next); only the AdamW rows while the sweep is unfinished (``eps=None``).
    ``sam`` is ``ACR(p=2, alpha=1)``, SAM's update; ``acr_inf`` moves every weight by ``eps / sqrt(N)`` at most, the
    same L2 length as ``acr`` when every weight moves."""
    if eps is None:
        return [adamw(), adamw("adamw_2x", budget=2)]
    return [
        adamw(),
        acr("acr", eps),
        acr("sam", eps, alpha=1.0),
        acr("acr_inf", eps / math.sqrt(num_params), p=math.inf),
        adamw("adamw_2x", budget=2),
    ]


def frontier_methods(eps: float, num_params: int) -> list[Method]:
    """Every method of ``benchmarks/frontier.py``; ``eps`` is ACR's training radius (L2) and the peers' tuned
    ``rho``: AdamW's compute curve, 11 ACR settings, six SAM-family peers at their documented defaults and at
    ``rho = eps``."""
    inf_eps = eps / math.sqrt(num_params)  # p = inf: the same L2 length when every weight moves by inf_eps
    curve = [adamw(f"adamw_{b:g}x", b, {"budget": b}) for b in (1, 1.2, 1.5, 2)]
    settings = [
        acr(name, e, **kw)
        for name, e, kw in (
            ("acr", eps, {"alpha": 0.5}),
            ("acr_k2", eps, {"alpha": 0.5, "interval": 2}),
            ("acr_k5", eps, {"alpha": 0.5, "interval": 5}),
            ("acr_k10", eps, {"alpha": 0.5, "interval": 10}),
            ("acr_inf", inf_eps, {"alpha": 0.5, "p": math.inf}),
            ("acr_n1pct", eps, {"alpha": 0.5, "n_fraction": 0.01}),
            ("acr_a1", eps, {"alpha": 1.0}),
            ("acr_a1_k5", eps, {"alpha": 1.0, "interval": 5}),
            ("acr_a1_n1pct", eps, {"alpha": 1.0, "n_fraction": 0.01}),
            # Larger radii, to reach the strongly regularised corner where LookSAM and FriendlySAM sit.
            ("acr_a1_eps2x", 2 * eps, {"alpha": 1.0}),
            ("acr_a1_k10_eps5x", 5 * eps, {"alpha": 1.0, "interval": 10}),
        )
    ]
    # (name, class, driver, documented defaults); every peer runs at those and at rho = eps.
    peers = (
        ("sam", "SAM", "sam", {"rho": 0.05}),
        ("asam", "SAM", "sam", {"rho": 0.05, "adaptive": True}),
        ("gsam", "GSAM", "gsam", {"rho": 0.05, "alpha": 0.4}),
        ("wsam", "WSAM", "closure", {"rho": 0.05, "gamma": 0.9}),
        ("looksam", "LookSAM", "looksam", {"rho": 0.1, "k": 10, "alpha": 0.7}),
        ("friendlysam", "FriendlySAM", "sam", {"rho": 0.05, "sigma": 1.0, "lmbda": 0.9}),
    )
    family = {"asam": "ASAM"}
    peer_methods = [
        Method(f"{name}{suffix}", family.get(name, cls), kw, driver, peer=cls)
        for name, cls, driver, defaults in peers
        for suffix, kw in (("", defaults), ("_tuned", {**defaults, "rho": eps}))
        if not suffix or defaults["rho"] != eps  # LookSAM's default rho already is eps: one run
    ]
    return curve + settings + peer_methods
