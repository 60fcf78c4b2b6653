"""``probe``: the indicator per parameter group over grids of ``eps`` and ``n``, from one gradient."""

from __future__ import annotations

import itertools
import platform
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..corruption import check_eps, check_n
from .groups import GroupBy, group_parameters
from .indicator import (
    IndicatorResult,
    LossFn,
    MetricFn,
    _as_batches,
    _check_common,
    _check_method,
    _Context,
    _estimate,
    _select_params,
    preserved,
)
from .report import ProbeTable

__all__ = ["probe"]

CorruptionCallback = Callable[[dict[str, Any], dict[str, Tensor]], None]


def _grid(value: Any, check: Callable[[Any], Any]) -> list[Any]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ValueError("grids (eps, n, method) must not be empty")
    return [check(v) for v in values]


def _progress_bar(total: int) -> Any:
    from tqdm.auto import tqdm  # only needed for progress bars (the `hf` extra)

    return tqdm(total=total, desc="acr-probe", unit="row")


def probe(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    eps: float | Sequence[float],
    p: float = 2,
    n: int | None | Sequence[int | None] = None,
    method: str | Sequence[str] = "gradient",
    by: GroupBy = "type",
    include_all: bool = True,
    metric_fn: MetricFn | None = None,
    loss_fn: LossFn | None = None,
    params: Iterable[str | nn.Parameter] | None = None,
    trials: int = 1,
    seed: int = 0,
    steps: int = 10,
    step_size: float = 0.5,
    progress: bool = False,
    on_corruption: CorruptionCallback | None = None,
    model_name: str | None = None,
) -> ProbeTable:
    """Corrupt one group of parameters at a time and measure the loss (and metric) change.

    For every group of :func:`~acr_optim.probe.group_parameters` (``by``; plus an ``"all"``
    group of every selected parameter when ``include_all`` and there is more than one group),
    every ``method``, ``n`` and ``eps`` of the grids, one row of
    :meth:`IndicatorResult.to_dict` with ``group`` and ``num_params`` (the group's element
    count).  ``grad L(w)`` is computed once and restricted to each group: only evaluations
    scale with groups x methods x n x eps (``"pgd"`` adds ``steps`` gradient passes per row).
    Random draws are reseeded with ``seed`` for every row, so rows share their random
    directions across ``eps``.  ``on_corruption(row, {name: a})`` sees each applied corruption
    (the worst draw for ``"random"``).  The model comes back bit-exact, also on interruption.
    Other arguments as in :func:`~acr_optim.probe.estimate_indicator`.
    """
    eps_grid = _grid(eps, check_eps)
    n_grid = _grid(n, check_n)
    methods = _grid(method, _check_method)
    p = _check_common(p, trials, steps, step_size)
    batches = _as_batches(batches)
    with preserved(model) as snapshot:
        model.eval()
        named = _select_params(model, params)
        groups = group_parameters(model, by, names=named)
        if not groups:
            raise ValueError("by assigns none of the selected parameters to a group")
        if include_all and len(groups) > 1:
            groups = {"all": [name for members in groups.values() for name in members], **groups}
        for t in named.values():
            t.requires_grad_(True)
        ctx = _Context(model, batches, loss_fn, metric_fn, snapshot)
        _, grads = ctx.loss_and_grad(list(named.values()))
        grad_of = dict(zip(named, grads))
        loss_clean, metric_clean = ctx.loss(), ctx.metric()
        rows: list[dict[str, Any]] = []
        total = len(groups) * len(methods) * len(n_grid) * len(eps_grid)
        bar = _progress_bar(total) if progress else None
        try:
            for (group, names), m, n_, e in itertools.product(groups.items(), methods, n_grid, eps_grid):
                tensors = [named[k] for k in names]
                result: IndicatorResult = _estimate(
                    ctx,
                    tensors,
                    names,
                    [grad_of[k] for k in names],
                    loss_clean,
                    metric_clean,
                    eps=e,
                    p=p,
                    n=n_,
                    method=m,
                    trials=trials,
                    seed=seed,
                    steps=steps,
                    step_size=step_size,
                )
                row = {"group": group, "num_params": sum(t.numel() for t in tensors), **result.to_dict()}
                rows.append(row)
                if on_corruption is not None:
                    on_corruption(row, result.corruption)
                if bar is not None:
                    bar.update()
        finally:
            if bar is not None:
                bar.close()
    config = {
        "model": model_name or type(model).__name__,
        "eps": eps_grid,
        "p": p,
        "n": n_grid,
        "methods": methods,
        "by": by if isinstance(by, str) else "custom",
        "trials": trials,
        "seed": seed,
        "num_batches": len(batches),
        "params_probed": sum(t.numel() for t in named.values()),
        "dtype": str(next(iter(named.values())).dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if "pgd" in methods:
        config.update(steps=steps, step_size=step_size)
    return ProbeTable(rows=rows, config=config)
