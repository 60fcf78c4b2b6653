"""The parameter-vulnerability indicator of Sun et al. (AAAI 2021) and the corruption context manager.

For parameters ``w``, loss ``L`` (mean of the per-batch losses over a fixed list of batches) and
the constraint set ``S = {a : ||a||_p = eps, ||a||_0 <= n}``, the indicator is

    I(w) = max_{a in S} L(w + a) - L(w).

:func:`estimate_indicator` lower-bounds it by measuring ``L(w + a) - L(w)`` for an ``a`` in ``S``:

- ``"gradient"``: ``a`` is the first-order optimum (paper Eq. 10) built from ``g = grad L(w)``;
  its predicted increase is ``a.g = eps * ||top_n(g)||_{p*}`` (Eq. 11).
- ``"random"``: ``a`` is the same closed form applied to ``r ~ N(0, I)`` (Eq. 5), averaged over
  ``trials`` draws (mean, std, max reported).
- ``"pgd"``: projected gradient ascent started at the gradient corruption ``a_0``.  With
  ``u_t = sgn(a_t) |a_t / eps|^(p-1)`` (the dual point of ``a_t``, unit ``p*``-norm) and
  ``d_t = g(w + a_t) / ||g(w + a_t)||_{p*}``, each step is

      a_{t+1} = C(u_t + step_size * d_t),

  where ``C`` is the closed form of :func:`~acr_optim.corruption.gradient_corruption` (top-n,
  then ``eps``-normalised in ``L_p``).  For ``p = 2``, ``u_t = a_t / eps`` and ``C`` *is* the
  Euclidean projection onto ``S`` (keep the ``n`` largest entries, rescale to norm ``eps``), so
  this is exact PGD with a normalised step.  For other ``p``, ``C`` is the closed-form map of a
  direction onto ``S`` (the point of ``S`` most aligned with it), used in place of a Euclidean
  projection; every iterate is in ``S``.  The best measured iterate is returned, so ``pgd`` is
  never below ``gradient`` (``a_0`` is one of the candidates).

Every function here runs the model in eval mode and gives it back bit-exact (parameters,
buffers, ``.training``, ``requires_grad`` and ``.grad``), also on exceptions and
``KeyboardInterrupt``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_eps, check_int, check_n, check_p
from ..corruption import dual_exponent, gradient_corruption, random_corruption
from .merged import probe_target

__all__ = [
    "METHODS",
    "CorruptionResolutionWarning",
    "IndicatorResult",
    "LossFn",
    "Measurement",
    "MetricFn",
    "as_batches",
    "check_indicator_settings",
    "check_method",
    "corrupted",
    "default_loss",
    "estimate",
    "estimate_indicator",
    "lp_norm",
    "preserved",
    "select_params",
]

LossFn = Callable[[nn.Module, Any], Tensor]
MetricFn = Callable[[nn.Module, Sequence[Any]], "float | Mapping[str, float]"]
METHODS = ("gradient", "random", "pgd")


class CorruptionResolutionWarning(UserWarning):
    """A corruption is (partly) below the resolution of the parameter dtype and rounds away."""


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    """``model(**batch).loss`` for a dict batch (Hugging Face models given ``labels``)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"the default loss_fn needs dict batches (model(**batch).loss); got {type(batch).__name__}")
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError("model(**batch) returned no loss: put labels in the batches or pass loss_fn")
    return loss


class _Snapshot:
    """Exact copy of a model's state: values of chosen parameters, all buffers, modes, flags and grads."""

    def __init__(self, model: nn.Module, data_of: Iterable[nn.Parameter] | None = None) -> None:
        params = dict(model.named_parameters())
        chosen = params.values() if data_of is None else data_of
        self.data = {id(p): p.detach().clone() for p in chosen}
        self.slots = [
            (module, key, p, p.requires_grad, p.grad, None if p.grad is None else p.grad.detach().clone())
            for module in model.modules()
            for key, p in module._parameters.items()
            if p is not None
        ]
        self.buffers = [
            (module, key, b, b.detach().clone())
            for module in model.modules()
            for key, b in module._buffers.items()
            if b is not None
        ]
        self.modes = [(module, module.training) for module in model.modules()]

    @torch.no_grad()
    def restore_data(self, params: Iterable[nn.Parameter]) -> None:
        for p in params:
            p.copy_(self.data[id(p)])

    @torch.no_grad()
    def restore(self) -> None:
        for module, key, p, requires_grad, grad, grad_value in self.slots:
            module._parameters[key] = p
            if id(p) in self.data:
                p.copy_(self.data[id(p)])
            p.requires_grad_(requires_grad)
            if grad is not None:
                grad.copy_(grad_value)
            p.grad = grad
        for module, key, b, value in self.buffers:
            module._buffers[key] = b
            b.copy_(value)
        for module, training in self.modes:
            module.training = training


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[_Snapshot]:
    """Snapshot ``model`` (all parameter values, buffers, modes, ``requires_grad``, ``.grad``) and
    restore it bit-exactly on exit, including on exceptions and ``KeyboardInterrupt``.

    Costs one copy of the parameters, buffers and existing gradients.
    """
    snapshot = _Snapshot(model)
    try:
        yield snapshot
    finally:
        snapshot.restore()


def _resolution_check(params: Sequence[Tensor], deltas: Sequence[Tensor], before: Sequence[Tensor]) -> None:
    """Warn when more than 10% of the non-zero entries of a corruption of a half-precision parameter round away."""
    lost = total = 0
    dtypes = set()
    for p, a, old in zip(params, deltas, before):
        if not p.is_floating_point() or torch.finfo(p.dtype).eps <= torch.finfo(torch.float32).eps:
            continue
        nonzero = a != 0
        total += int(nonzero.sum())
        lost += int((nonzero & (p == old)).sum())
        dtypes.add(str(p.dtype).removeprefix("torch."))
    if total and lost > 0.1 * total:
        warnings.warn(
            f"{lost} of {total} corrupted entries of {'/'.join(sorted(dtypes))} parameters round away: the corruption "
            "is below the resolution of the parameter dtype (raise eps, lower n, or probe in float32)",
            CorruptionResolutionWarning,
            stacklevel=3,
        )


@torch.no_grad()
def _apply(params: Sequence[nn.Parameter], a: Sequence[Tensor], snapshot: _Snapshot) -> None:
    for p, delta in zip(params, a):
        p.add_(delta.to(p.dtype))
    _resolution_check(params, a, [snapshot.data[id(p)] for p in params])


@torch.no_grad()
def _write(params: Sequence[nn.Parameter], values: Sequence[Tensor]) -> None:
    for p, v in zip(params, values):
        p.copy_(v)


def _named_tensors(model: nn.Module, a: Mapping[str, Tensor]) -> tuple[list[nn.Parameter], list[Tensor]]:
    # Every name a parameter is registered under counts: a tied weight is `lm_head.weight` as well as
    # `transformer.wte.weight`, but one tensor, so naming it twice is refused rather than applied twice.
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = [name for name in a if name not in params]
    if unknown:
        raise KeyError(f"a names parameters the model does not have: {unknown[:5]}")
    seen: dict[int, str] = {}
    for name, delta in a.items():
        if id(params[name]) in seen:
            raise ValueError(f"a names one tied parameter twice: {seen[id(params[name])]!r} and {name!r}")
        seen[id(params[name])] = name
        if delta.shape != params[name].shape:
            raise ValueError(f"a[{name!r}] has shape {tuple(delta.shape)}, the parameter {tuple(params[name].shape)}")
    return [params[name] for name in a], list(a.values())


@contextlib.contextmanager
def corrupted(model: nn.Module, a: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """Run a block with ``w <- w + a`` applied to the named parameters ``a`` (name -> tensor).

    A tied weight may be named by any of its names (``lm_head.weight`` or ``transformer.wte.weight``), once.

    On exit (also on exceptions and ``KeyboardInterrupt``) the model is restored bit-exactly:
    parameter values are copied back (not ``w + a - a``), and buffers, ``.training``,
    ``requires_grad`` and ``.grad`` (object and values) are as before.  Warns with
    :class:`CorruptionResolutionWarning` when the corruption rounds away in bf16/fp16.
    """
    params, deltas = _named_tensors(model, a)
    snapshot = _Snapshot(model, data_of=params)
    try:
        _apply(params, deltas, snapshot)
        yield model
    finally:
        snapshot.restore()


@dataclass
class IndicatorResult:
    """Outcome of one indicator estimate; ``delta_loss`` is the measured ``L(w + a) - L(w)``.

    For ``"random"``, ``delta_loss``/``loss``/``first_order``/``metric`` are means over the
    trials, with ``delta_loss_std`` (population std) and ``delta_loss_max``; ``corruption`` is
    the worst draw.  ``norm`` (``||a||_p``) and ``l0`` (non-zero count) are measured on ``corruption``.
    """

    method: str
    eps: float
    p: float
    n: int | None
    trials: int
    loss_clean: float
    loss: float
    delta_loss: float
    delta_loss_std: float
    delta_loss_max: float
    first_order: float
    norm: float
    l0: int
    metric_clean: dict[str, float] = field(default_factory=dict)
    metric: dict[str, float] = field(default_factory=dict)
    corruption: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Flat record (no tensors): metric ``k`` appears as ``k_clean`` and ``k``."""
        row: dict[str, Any] = {
            k: getattr(self, k)
            for k in (
                "method",
                "eps",
                "p",
                "n",
                "trials",
                "loss_clean",
                "loss",
                "delta_loss",
                "delta_loss_std",
                "delta_loss_max",
                "first_order",
                "norm",
                "l0",
            )
        }
        for key, value in self.metric_clean.items():
            row[f"{key}_clean"] = value
            row[key] = self.metric[key]
        return row


class Measurement:
    """What repeated measurements on one model and batch list share."""

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Any],
        loss_fn: LossFn | None,
        metric_fn: MetricFn | None,
        snapshot: _Snapshot,
    ) -> None:
        self.model, self.batches, self.snapshot = model, batches, snapshot
        self.loss_fn = loss_fn or default_loss
        self.metric_fn = metric_fn

    def loss(self) -> float:
        with torch.inference_mode():
            return sum(float(self.loss_fn(self.model, b)) for b in self.batches) / len(self.batches)

    def metric(self) -> dict[str, float]:
        if self.metric_fn is None:
            return {}
        with torch.inference_mode():
            value = self.metric_fn(self.model, self.batches)
        return {k: float(v) for k, v in value.items()} if isinstance(value, Mapping) else {"metric": float(value)}

    def loss_and_grad(self, params: Sequence[nn.Parameter]) -> tuple[float, list[Tensor]]:
        """``L`` and ``grad L`` w.r.t. ``params`` (``torch.autograd.grad``: ``.grad`` is not touched)."""
        grads = [torch.zeros_like(p) for p in params]
        total = 0.0
        with torch.enable_grad():
            for batch in self.batches:
                loss = self.loss_fn(self.model, batch)
                for acc, g in zip(grads, torch.autograd.grad(loss, list(params), allow_unused=True)):
                    if g is not None:
                        acc.add_(g)
                total += float(loss.detach())
        k = len(self.batches)
        return total / k, [g.div_(k) for g in grads]

    def measure(
        self, params: Sequence[nn.Parameter], a: Sequence[Tensor], with_metric: bool = True, *, values: bool = False
    ) -> tuple[float, dict[str, float]]:
        """``L(w + a)`` and the metric there (with ``values``, ``L(a)``: ``a`` holds the parameter
        values themselves, written exactly); parameters restored bit-exactly afterwards."""
        try:
            if values:
                _write(params, a)
            else:
                _apply(params, a, self.snapshot)
            return self.loss(), self.metric() if with_metric else {}
        finally:
            self.snapshot.restore_data(params)


def _dot(a: Sequence[Tensor], g: Sequence[Tensor]) -> float:
    return float(sum(torch.dot(x.reshape(-1).double(), y.reshape(-1).double()) for x, y in zip(a, g)))


def lp_norm(a: Sequence[Tensor], ord: float) -> float:
    """``||a||_ord`` of a list of tensors as one flat vector, in float64."""
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double(), ord) for t in a]), ord))


def _unit(v: list[Tensor], ord: float) -> list[Tensor]:
    norm = lp_norm(v, ord)
    return v if norm == 0 or not math.isfinite(norm) else [t / norm for t in v]


def _dual_point(a: Sequence[Tensor], eps: float, p: float) -> list[Tensor]:
    """``sgn(a) |a/eps|^(p-1)``, normalised to unit ``p*``-norm (``sgn(a)`` for ``p`` in {1, inf})."""
    if p in (1, math.inf):
        u = [t.sign() for t in a]
    else:
        u = [torch.copysign((t / eps).abs().pow(p - 1), t) for t in a]
    return _unit(u, dual_exponent(p))


def _pgd(
    ctx: Measurement,
    params: Sequence[nn.Parameter],
    a0: list[Tensor],
    eps: float,
    p: float,
    n: int | None,
    steps: int,
    step_size: float,
) -> list[Tensor]:
    """Best measured iterate of the ascent described in the module docstring (``a0`` included)."""
    dual = dual_exponent(p)
    a, best, best_loss = a0, a0, -math.inf
    for _ in range(steps):
        try:
            _apply(params, a, ctx.snapshot)
            loss, g = ctx.loss_and_grad(params)
        finally:
            ctx.snapshot.restore_data(params)
        if loss > best_loss:
            best, best_loss = a, loss
        if not math.isfinite(lp_norm(g, dual)):  # the loss surface broke down here: keep the best so far
            return best
        h = [u + step_size * d for u, d in zip(_dual_point(a, eps, p), _unit(g, dual))]
        a = gradient_corruption(h, eps, p, n)
    if steps == 0 or ctx.measure(params, a, with_metric=False)[0] > best_loss:
        best = a
    return best


def estimate(
    ctx: Measurement,
    params: Sequence[nn.Parameter],
    names: Sequence[str],
    grads: list[Tensor],
    loss_clean: float,
    metric_clean: dict[str, float],
    *,
    eps: float,
    p: float,
    n: int | None,
    method: str,
    trials: int,
    seed: int,
    steps: int,
    step_size: float,
) -> IndicatorResult:
    """One row of the indicator: the corruption ``method`` draws at ``(eps, p, n)`` measured on ``ctx``.

    ``grads`` is the clean gradient w.r.t. ``params`` (names ``names``); ``random`` averages
    ``trials`` draws seeded by ``seed``, ``pgd`` ascends ``steps`` times from the gradient point.
    The building block of :func:`estimate_indicator` and of :func:`~acr_optim.probe.probe`.
    """
    if method == "random":
        generator = torch.Generator(device=params[0].device).manual_seed(seed)
        draws = [random_corruption(params, eps, p, n, generator=generator) for _ in range(trials)]
    elif method == "gradient":
        draws = [gradient_corruption(grads, eps, p, n)]
    else:
        draws = [_pgd(ctx, params, gradient_corruption(grads, eps, p, n), eps, p, n, steps, step_size)]
    losses, metrics = zip(*(ctx.measure(params, a) for a in draws))
    deltas = torch.tensor([loss - loss_clean for loss in losses], dtype=torch.float64)
    worst = int(deltas.argmax())
    a = draws[worst]
    return IndicatorResult(
        method=method,
        eps=eps,
        p=p,
        n=n,
        trials=len(draws),
        loss_clean=loss_clean,
        loss=sum(losses) / len(losses),
        delta_loss=float(deltas.mean()),
        delta_loss_std=float(deltas.std(unbiased=False)),
        delta_loss_max=float(deltas.max()),
        first_order=sum(_dot(d, grads) for d in draws) / len(draws),
        norm=lp_norm(a, p),
        l0=sum(int(t.count_nonzero()) for t in a),
        metric_clean=metric_clean,
        metric={k: sum(m[k] for m in metrics) / len(metrics) for k in metric_clean},
        corruption={name: t.detach() for name, t in zip(names, a)},
    )


def select_params(model: nn.Module, params: Iterable[str | nn.Parameter] | None) -> dict[str, nn.Parameter]:
    """Name -> parameter for ``params`` (names or parameters of ``model``; default: all trainable)."""
    named = dict(model.named_parameters())
    if params is None:
        selected = {k: v for k, v in named.items() if v.requires_grad}
    else:
        by_id = {id(v): k for k, v in named.items()}
        selected = {}
        for item in params:
            name = item if isinstance(item, str) else by_id.get(id(item))
            if name not in named:
                raise ValueError(
                    f"params must name parameters of the model; {item if isinstance(item, str) else 'a tensor'} is not one"
                )
            selected[name] = named[name]
    if not selected:
        raise ValueError("params selects no parameters (no trainable parameters in the model?)")
    floating = {k: v for k, v in selected.items() if v.is_floating_point()}
    if len(floating) != len(selected):
        raise ValueError("params must be floating-point parameters")
    return selected


def check_indicator_settings(p: float, trials: int, steps: int, step_size: float) -> float:
    """``p`` checked and returned; ``ValueError`` naming the argument for a bad ``trials``, ``steps`` or ``step_size``."""
    p = check_p(p)
    check_int(trials, "trials", 1)
    check_int(steps, "steps", 0)
    check_eps(step_size, name="step_size")
    return p


def as_batches(batches: Iterable[Any]) -> list[Any]:
    """``batches`` as a list; ``ValueError`` when it holds none."""
    batches = list(batches)
    if not batches:
        raise ValueError("batches must hold at least one batch")
    return batches


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`METHODS`, else ``ValueError`` listing them."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def estimate_indicator(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    eps: float,
    p: float = 2,
    n: int | None = None,
    method: str = "gradient",
    loss_fn: LossFn | None = None,
    metric_fn: MetricFn | None = None,
    params: Iterable[str | nn.Parameter] | None = None,
    trials: int = 1,
    seed: int = 0,
    steps: int = 10,
    step_size: float = 0.5,
) -> IndicatorResult:
    """Measure ``L(w + a) - L(w)`` for the ``method``'s corruption ``a`` in ``{||a||_p = eps, ||a||_0 <= n}``.

    ``L`` is the mean of ``loss_fn(model, batch)`` over ``batches`` (materialised once into a
    list), in eval mode; ``loss_fn`` defaults to ``model(**batch).loss``.  ``params`` (names or
    parameters) are the ones that may be corrupted, default all trainable ones (frozen ones may
    be named: ``requires_grad`` is restored afterwards).  ``trials`` random draws use a
    ``torch.Generator`` seeded with ``seed`` on the first parameter's device; ``steps`` and
    ``step_size`` drive ``"pgd"``.  ``metric_fn(model, batches)`` (float or dict) is recorded
    before and under the corruption.  One gradient pass, plus ``steps`` more for ``"pgd"``.
    A LoRA ``peft`` model is measured as its merged model, without merging
    (:func:`~acr_optim.integrations.peft.probe_target`).
    """
    eps, n, method = check_eps(eps), check_n(n), check_method(method)
    p = check_indicator_settings(p, trials, steps, step_size)
    batches = as_batches(batches)
    model, params = probe_target(model, params)
    with preserved(model) as snapshot:
        model.eval()
        named = select_params(model, params)
        tensors = list(named.values())
        for t in tensors:
            t.requires_grad_(True)
        ctx = Measurement(model, batches, loss_fn, metric_fn, snapshot)
        _, grads = ctx.loss_and_grad(tensors)
        # L(w) is re-measured by the same inference-mode path as every L(w + a), so deltas compare like with like.
        return estimate(
            ctx,
            tensors,
            list(named),
            grads,
            ctx.loss(),
            ctx.metric(),
            eps=eps,
            p=p,
            n=n,
            method=method,
            trials=trials,
            seed=seed,
            steps=steps,
            step_size=step_size,
        )
