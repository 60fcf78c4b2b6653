"""``probe``: the indicator per parameter group over grids of ``eps`` and ``n``, and real-world faults, from one gradient."""

from __future__ import annotations

import itertools
import math
import platform
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_eps, check_n
from ..faults import Fault, parse_fault
from .groups import GroupBy, group_parameters
from .indicator import (
    IndicatorResult,
    LossFn,
    Measurement,
    MetricFn,
    as_batches,
    check_indicator_settings,
    check_method,
    estimate,
    lp_norm,
    preserved,
    select_params,
)
from .merged import is_peft_model, merged_parameters, probe_target
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


def _faults(faults: str | Fault | Sequence[str | Fault]) -> list[Fault]:
    items = [faults] if isinstance(faults, (str, Fault)) else list(faults)
    return [f if isinstance(f, Fault) else parse_fault(f) for f in items]


def _input_major(model: nn.Module) -> set[int]:
    """Ids of the weights stored ``(in, out)``, the transpose of ``nn.Linear``'s: transformers' ``Conv1D`` (GPT-2)."""
    return {id(m.weight) for m in model.modules() if type(m).__name__ == "Conv1D"}


def _delta_stats(
    values: Sequence[Tensor], tensors: Sequence[Tensor], grads: Sequence[Tensor], p: float
) -> tuple[float, float, int, float]:
    """``||d||_p``, ``||d||_inf``, non-zero count and ``g.d`` of ``d = w' - w`` (float64; NaN entries count as inf)."""
    norms, maxima, l0, dot = [], [], 0, 0.0
    for v, w, g in zip(values, tensors, grads):
        d = (v.double() - w.double()).nan_to_num_(nan=math.inf, posinf=math.inf, neginf=-math.inf)
        norms.append(lp_norm([d], p))
        maxima.append(lp_norm([d], math.inf))
        l0 += int((v != w).count_nonzero())
        dot += float(torch.dot(d.reshape(-1), g.reshape(-1).double()))
    return lp_norm([torch.tensor(norms)], p), max(maxima), l0, dot


def _fault_row(
    ctx: Measurement,
    fault: Fault,
    params: Sequence[nn.Parameter],
    grads: Sequence[Tensor],
    transposed: Sequence[bool],
    loss_clean: float,
    metric_clean: dict[str, float],
    p: float,
    trials: int,
    seed: int,
) -> tuple[dict[str, Any], dict[int, Tensor]]:
    """The table row of ``fault`` on ``params`` and the deltas ``w' - w`` of its worst draw (by position in ``params``).

    Each draw writes the faulty values themselves (not ``w + d``), measures, and restores the
    parameters bit-exactly.  A NaN loss counts as ``inf`` (the fault broke the model); ``broken``
    is the share of draws with an infinite loss, and ``delta_loss_std`` is NaN when there are any.
    ``norm`` is ``||d||_p``; the row's own ``p`` is None (a fault has no norm constraint).  A fault
    that touches none of ``params`` is not measured: ``trials`` 0, ``d = 0`` (``norm``, ``norm_inf``,
    ``l0`` and ``first_order`` are 0) and NaN loss, metric and ``broken`` columns.
    """
    hit = [i for i, t in enumerate(params) if fault.targets(t)]
    row: dict[str, Any] = {
        "method": fault.name,
        "eps": None,
        "p": None,
        "n": None,
        "trials": 0,
        "loss_clean": loss_clean,
    }
    if not hit:  # the fault leaves this group as it is: nothing to measure
        row.update(loss=math.nan, delta_loss=math.nan, delta_loss_std=math.nan, delta_loss_max=math.nan)
        row.update(first_order=0.0, norm=0.0, l0=0, norm_inf=0.0, broken=math.nan)
        row.update({k: v for key, value in metric_clean.items() for k, v in ((f"{key}_clean", value), (key, math.nan))})
        return row, {}
    params, grads, transposed = [params[i] for i in hit], [grads[i] for i in hit], [transposed[i] for i in hit]
    tensors = [t.detach() for t in params]
    # quantization scales and int8 codes run along output channels: (in, out) weights go in transposed
    tensors_in, grads_in = ([t.t() if flip else t for t, flip in zip(ts, transposed)] for ts in (tensors, grads))
    generator = torch.Generator(device=tensors[0].device).manual_seed(seed)
    losses, deltas, metrics, stats, worst = [], [], [], [], []
    for _ in range(trials if fault.stochastic else 1):
        values = [v.t() if flip else v for v, flip in zip(fault.values(tensors_in, grads_in, generator), transposed)]
        loss, metric = ctx.measure(params, values, values=True)
        loss = math.inf if math.isnan(loss) else loss
        if not deltas or loss - loss_clean > max(deltas):
            worst = values
        losses.append(loss)
        deltas.append(loss - loss_clean)
        metrics.append(metric)
        stats.append(_delta_stats(values, tensors, grads, p))
    draws, at = len(deltas), deltas.index(max(deltas))
    finite = all(math.isfinite(d) for d in deltas)
    row.update(
        trials=draws,
        loss=sum(losses) / draws,
        delta_loss=sum(deltas) / draws,
        delta_loss_std=float(torch.tensor(deltas, dtype=torch.float64).std(unbiased=False)) if finite else math.nan,
        delta_loss_max=max(deltas),
        first_order=sum(s[3] for s in stats) / draws,
        norm=stats[at][0],
        l0=stats[at][2],
        norm_inf=stats[at][1],
        broken=sum(not math.isfinite(d) for d in deltas) / draws,
    )
    for key, value in metric_clean.items():
        row[f"{key}_clean"] = value
        row[key] = sum(m[key] for m in metrics) / draws
    return row, {i: (v - w) for i, v, w in zip(hit, worst, tensors)}


def _coverage(
    model: nn.Module,
    target: nn.Module,
    params: Iterable[str | nn.Parameter] | None,
    named: dict[str, nn.Parameter],
    groups: dict[str, list[str]],
) -> dict[str, Any]:
    """``params_probed``, ``params_total`` and ``params_not_probed`` (``{reason: names}``) of the report.

    ``model`` is the model given to :func:`probe`, ``target`` the one measured (its base model for a
    LoRA model), ``params`` the caller's selection, ``named`` the selected parameters and ``groups``
    the groups they went to.  The total is every parameter of the model (the merged model's for a
    LoRA model) when ``params`` is None, else every selected one; shared tensors count once.
    """
    probed_names = {name for members in groups.values() for name in members}
    probed = {id(named[name]) for name in probed_names}
    selected = {id(t) for t in named.values()}
    peft = params is None and is_peft_model(model)
    if params is not None:
        universe: dict[str, Tensor] = dict(named)
    elif peft:
        universe = dict(merged_parameters(model))
    else:
        universe = dict(target.named_parameters())
    not_probed: dict[str, list[str]] = {}
    for name, t in universe.items():
        if id(t) in probed:
            continue
        if id(t) in selected:
            reason = "in no group of `by`"
        elif peft:
            reason = "kept fixed by the model's class (e.g. sinusoidal position tables)"
        else:
            reason = "frozen (requires_grad=False; by default only trainable parameters are probed)"
        not_probed.setdefault(reason, []).append(name)
    return {
        "params_probed": sum(named[name].numel() for name in probed_names),
        "params_total": sum(t.numel() for t in universe.values()),
        "params_not_probed": not_probed,
    }


def probe(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    eps: float | Sequence[float] | None = None,
    p: float = 2,
    n: int | None | Sequence[int | None] = None,
    method: str | Sequence[str] = "gradient",
    faults: str | Fault | Sequence[str | Fault] = (),
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

    ``faults`` (specs of :func:`~acr_optim.faults.parse_fault` such as ``"int4:g32"``, ``"bf16"``,
    ``"flip:1e-6"``, ``"prune:0.5"``, or :class:`~acr_optim.faults.Fault` objects) add one row per
    group and fault after the group's ``eps`` rows: ``method`` is the spec, ``eps``, ``p`` and ``n``
    are None (a fault has no norm constraint), ``trials`` the number of draws (``trials`` for
    stochastic faults, 1 otherwise), ``delta_loss`` (``_std``, ``_max``) over the draws,
    ``first_order = g.d``, ``norm = ||d||_p`` (``p`` of the call, as for the ``eps`` rows) and
    ``l0`` of the worst draw's ``d = w' - w``, plus ``norm_inf = max |d|`` (compare the norms
    with the ``eps`` of the other rows) and ``broken`` (the share of draws whose loss is inf or
    NaN).  A fault that touches none of the group's parameters (int8 on a norm group: 1-D
    weights stay in float) is not measured: ``trials`` 0, NaN loss, metric and ``broken``
    columns (``d = 0``: ``norm``, ``norm_inf``, ``l0``, ``first_order`` are 0).  A fault writes
    the faulty values themselves; ``on_corruption`` sees ``d`` (see
    :mod:`acr_optim.faults` on when ``w + d`` rounds).  Stochastic faults draw from a generator
    seeded with ``seed`` for every row.  The faults see GPT-2's ``Conv1D`` weights transposed,
    ``(out, in)`` as in ``nn.Linear``, so channels and groups are output rows and input runs.
    ``eps`` may be omitted when ``faults`` are given (no ``method`` rows then).  A LoRA ``peft``
    model is probed as its merged model, without merging
    (:func:`~acr_optim.integrations.peft.probe_target`); faults, which are not additive, need the
    merged model itself (``merge_and_unload()``).

    The table's ``config`` records the grids and settings, and which parameters were measured:
    ``params_probed`` (elements in the groups), ``params_total`` (every parameter of the model,
    of the merged model for a LoRA model, or of ``params`` when given; shared tensors once) and
    ``params_not_probed`` (``{reason: names}`` of the others: frozen ones, which the default
    ``params`` leaves out, such as Marian's fixed sinusoidal position tables; those no group of
    ``by`` takes).
    """
    fault_list = _faults(faults)
    if eps is None and not fault_list:
        raise ValueError("eps is required unless faults are given")
    eps_grid = [] if eps is None else _grid(eps, check_eps)
    n_grid = _grid(n, check_n)
    methods = _grid(method, check_method) if eps_grid else []
    p = check_indicator_settings(p, trials, steps, step_size)
    batches = as_batches(batches)
    if fault_list and is_peft_model(model):
        raise ValueError(
            "faults act on the merged weights a LoRA model deploys (quantizing W and B A apart is not quantizing "
            "W + s B A): probe model.merge_and_unload() for fault rows"
        )
    given_model, given_params = model, params
    model, params = probe_target(model, params)
    with preserved(model) as snapshot:
        model.eval()
        named = select_params(model, params)
        groups = group_parameters(model, by, names=named)
        if not groups:
            raise ValueError("by assigns none of the selected parameters to a group")
        if include_all and len(groups) > 1:
            groups = {"all": [name for members in groups.values() for name in members], **groups}
        for t in named.values():
            t.requires_grad_(True)
        ctx = Measurement(model, batches, loss_fn, metric_fn, snapshot)
        _, grads = ctx.loss_and_grad(list(named.values()))
        grad_of = dict(zip(named, grads))
        input_major = _input_major(model)
        loss_clean, metric_clean = ctx.loss(), ctx.metric()
        rows: list[dict[str, Any]] = []
        total = len(groups) * (len(methods) * len(n_grid) * len(eps_grid) + len(fault_list))
        bar = _progress_bar(total) if progress else None
        try:
            for group, names in groups.items():
                tensors = [named[k] for k in names]
                head = {"group": group, "num_params": sum(t.numel() for t in tensors)}
                for m, n_, e in itertools.product(methods, n_grid, eps_grid):
                    result: IndicatorResult = estimate(
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
                    rows.append({**head, **result.to_dict()})
                    if on_corruption is not None:
                        on_corruption(rows[-1], result.corruption)
                    if bar is not None:
                        bar.update()
                for fault in fault_list:
                    row, worst = _fault_row(
                        ctx,
                        fault,
                        tensors,
                        [grad_of[k] for k in names],
                        [id(t) in input_major for t in tensors],
                        loss_clean,
                        metric_clean,
                        p,
                        trials,
                        seed,
                    )
                    rows.append({**head, **row})
                    if on_corruption is not None:
                        on_corruption(rows[-1], {names[i]: d for i, d in worst.items()})
                    if bar is not None:
                        bar.update()
        finally:
            if bar is not None:
                bar.close()
    config: dict[str, Any] = {"model": model_name or type(model).__name__}
    if eps_grid:
        config.update(eps=eps_grid, p=p, n=n_grid, methods=methods)
    else:
        config.update(p=p)
    if fault_list:
        config.update(faults=[f.name for f in fault_list])
    config.update(
        by=by if isinstance(by, str) else "custom",
        trials=trials,
        seed=seed,
        num_batches=len(batches),
        **_coverage(given_model, model, given_params, named, groups),
        dtype=str(next(iter(named.values())).dtype).removeprefix("torch."),
        torch=torch.__version__,
        python=platform.python_version(),
    )
    if "pgd" in methods:
        config.update(steps=steps, step_size=step_size)
    return ProbeTable(rows=rows, config=config)
