"""Parameter-corruption maths of Sun et al., "Exploring the Vulnerability of Deep Neural
Networks: A Study of Parameter Corruption" (AAAI 2021).

A list of tensors is treated as one flat vector ``x`` (the parameters of a model, or a chosen
subset).  The corruption constraint set is

    S = {a : ||a||_p = eps, ||a||_0 <= n},   1 <= p <= inf,   n = None meaning "no L0 limit".

With ``h = top_n(x)`` (the ``n`` entries of largest magnitude, others zero), ``p* = p/(p-1)``
the dual exponent and ``q = 1/(p-1)``, the first-order optimal corruption (paper Eq. 10) is

    a = eps * sgn(h) * |h|^q / || |h|^q ||_p  =  eps * sgn(h) * (|h| / ||h||_{p*})^q

and its first-order loss increase is ``a.g = eps * ||h||_{p*}`` (Eq. 11).  Special cases:
``p = 2``: ``eps * h / ||h||_2``; ``p = inf``: ``eps * sgn(h)``; ``p = 1``: all of ``eps`` on
the single entry of largest ``|x|`` (the limit p -> 1).

Everything here is a pure function of its inputs; the optimizer, the probes and the Trainer
callback all build on it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from .checks import check_eps, check_n, check_p

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "LpCorruption",
    "NonFiniteGradientError",
    "check_eps",
    "check_n",
    "check_p",
    "dual_exponent",
    "first_order_gain",
    "gather",
    "gradient_corruption",
    "random_corruption",
    "support",
    "top_n_indices",
]

INF = math.inf


class NonFiniteGradientError(ValueError):
    """The vector a corruption is built from contains inf or NaN."""


def dual_exponent(p: float) -> float:
    """``p* = p / (p - 1)``, the exponent of the dual norm (``1* = inf``, ``inf* = 1``)."""
    if p == 1:
        return INF
    if p == INF:
        return 1.0
    return p / (p - 1)


def top_n_indices(tensors: Sequence[Tensor], n: int) -> list[Tensor]:
    """Flat (row-major) indices of the ``n`` entries of largest magnitude over all ``tensors`` together.

    Returns one int64 index tensor per input tensor (possibly empty, sorted), exactly
    ``min(n, total)`` indices in all; ties at the cut are broken deterministically, and NaN counts
    as the largest magnitude (as in ``torch.topk``).

    Exact threshold selection in about one pass: a fixed-seed sample of ``|x|`` gives a threshold
    ``tau`` just below the ``n``-th largest magnitude with overwhelming probability (the sample's
    order statistic ``4`` standard deviations above the expected rank); one pass over the tensors
    collects the candidates ``|x| > tau`` (about ``n + 4 sqrt(n k / s)`` of them for ``s``
    samples) and a ``topk`` among them gives the exact top-n.  If fewer than ``n`` lie above
    ``tau``, entries equal to ``tau`` fill up, and a ``tau`` that turns out too high is lowered and
    the pass repeated (rare).  Memory: the candidates, plus one ``|x|`` and one mask buffer of at
    most ``2**20`` elements (the tensors are scanned in chunks); no concatenated copy of the
    tensors.  The global RNG is not touched.
    """
    n = check_n(n)
    tensors = [t.detach() for t in tensors]
    device = tensors[0].device if tensors else torch.device("cpu")
    sizes = [t.numel() for t in tensors]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    total = offsets[-1]
    if total == 0:
        return [torch.empty(0, dtype=torch.long, device=t.device) for t in tensors]
    n = min(n, total)
    sample = _magnitude_sample(tensors, total)
    rank = n * sample.numel() / total
    rank = math.ceil(rank + 4 * math.sqrt(rank) + 1)
    while True:
        if rank > sample.numel():
            tau = -INF
        else:
            tau = sample.kthvalue(sample.numel() - rank + 1).values.item()
        chosen = _above(tensors, offsets, tau, n, device)
        if chosen is not None:
            break
        rank *= 4
    chosen = chosen.sort().values
    bounds = torch.searchsorted(chosen, torch.tensor(offsets, device=device)).tolist()
    return [(chosen[bounds[i] : bounds[i + 1]] - offsets[i]).to(t.device) for i, t in enumerate(tensors)]


_SAMPLE_SIZE = 1 << 16


def _magnitude_sample(tensors: Sequence[Tensor], total: int) -> Tensor:
    """``|x|`` at about ``_SAMPLE_SIZE`` positions drawn uniformly (fixed seed, with replacement), float32/64."""
    acc = _accumulation_dtype(tensors)
    device = tensors[0].device
    parts, generators = [], {}
    for t in tensors:
        if t.numel() == 0:
            continue
        count = math.ceil(_SAMPLE_SIZE * t.numel() / total)
        if t.device not in generators:
            generators[t.device] = torch.Generator(t.device).manual_seed(0)
        pos = torch.randint(t.numel(), (count,), generator=generators[t.device], device=t.device)
        parts.append(t.reshape(-1).index_select(0, pos).abs().to(device, acc))
    sample = torch.cat(parts)
    return torch.where(sample.isnan(), torch.inf, sample)


_CHUNK = 1 << 20  # elements scanned at a time: bounds the selection's scratch memory


def _chunks(tensors: Sequence[Tensor], offsets: list[int]) -> Iterator[tuple[Tensor, int]]:
    """Flat pieces of at most ``_CHUNK`` elements of every tensor, with their global offsets."""
    for t, offset in zip(tensors, offsets):
        flat = t.reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            yield flat[start : start + _CHUNK], offset + start


def _above(tensors: Sequence[Tensor], offsets: list[int], tau: float, n: int, device: torch.device) -> Tensor | None:
    """Global flat indices of the top ``n`` given that it lies in ``|x| >= tau``; None when fewer than ``n`` do."""
    acc = _accumulation_dtype(tensors)
    values, indices = [], []
    # one |x| and one mask buffer per dtype and device, reused chunk after chunk: fresh large
    # temporaries cost page faults on CPU
    scratch: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}
    size = min(_CHUNK, max(t.numel() for t in tensors))
    for part, offset in _chunks(tensors, offsets):
        key = (part.dtype, part.device)
        if key not in scratch:
            scratch[key] = (part.new_empty(size), torch.empty(size, dtype=torch.bool, device=part.device))
        mag, mask = (buf[: part.numel()] for buf in scratch[key])
        torch.abs(part, out=mag)
        idx = torch.le(mag, tau, out=mask).logical_not_().nonzero().squeeze(1)  # ``not <=`` also keeps NaN
        values.append(mag.index_select(0, idx).to(device, acc))
        indices.append(idx.to(device) + offset)
    values, indices = torch.cat(values), torch.cat(indices)
    if values.numel() >= n:
        if values.numel() > n:
            indices = indices.index_select(0, torch.topk(values, n, sorted=False).indices)
        return indices
    missing = n - values.numel()
    ties = []
    for part, offset in _chunks(tensors, offsets):
        if missing == 0:
            break
        idx = (part.abs() == tau).nonzero().squeeze(1)[:missing]
        ties.append(idx.to(device) + offset)
        missing -= idx.numel()
    if missing > 0:
        return None
    return torch.cat([indices, *ties])


def _accumulation_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _norm(
    tensors: Sequence[Tensor],
    ord: float,
    group: ProcessGroup | None = None,
    device: torch.device | None = None,
    scale: float | None = None,
) -> float:
    """``||x||_ord`` (of ``x * scale`` if given) of the flat vector formed by ``tensors``, at least in float32.

    With ``group``, ``tensors`` are this process's shards of the vector (possibly none) and the
    norm is combined over the group's processes (``sum |x|^ord``, or the max, in float64).
    """
    tensors = [t for t in tensors if t.numel() > 0]
    device = tensors[0].device if tensors else device
    if tensors and scale is None:
        per_tensor = torch._foreach_norm(tensors, ord, dtype=_accumulation_dtype(tensors))
    else:  # rescaling holds one scaled temporary at a time
        per_tensor = [torch.linalg.vector_norm(t.to(_accumulation_dtype(tensors)) * scale, ord) for t in tensors]
    local = torch.linalg.vector_norm(torch.stack([v.to(device) for v in per_tensor]), ord) if tensors else None
    if group is None:
        return local.item()
    part = torch.zeros((), dtype=torch.float64, device=device) if local is None else local.double()
    if ord == INF:
        dist.all_reduce(part, op=dist.ReduceOp.MAX, group=group)
        return part.item()
    part = part**ord
    dist.all_reduce(part, group=group)
    return part.item() ** (1 / ord)


@dataclass(frozen=True)
class LpCorruption:
    """The closed form ``a = eps * sgn(h) * (|h| / ||h||_{p*})^(1/(p-1))`` planned on a vector ``h``.

    ``plan`` computes the one global statistic ``D = ||h||_{p*}``, first directly and, if that
    overflows or underflows float32, as ``m * ||h/m||_{p*}`` with ``m = max|h|``; ``D`` is kept as
    the pair ``(inv_m, m_over_d)`` so ``|h|/D = |h| * inv_m * m_over_d`` never leaves float range.
    """

    eps: float
    p: float
    inv_m: float
    m_over_d: float

    @classmethod
    def plan(
        cls,
        h: Sequence[Tensor],
        eps: float,
        p: float,
        group: ProcessGroup | None = None,
        device: torch.device | None = None,
    ) -> LpCorruption | None:
        """Plan the corruption of ``h``; ``None`` when ``h == 0``.

        Raises :class:`NonFiniteGradientError` when ``h`` holds inf or NaN.  Costs one pass
        over ``h`` and one host synchronisation (two passes when rescaling is needed).  With a
        process ``group``, ``h`` holds this process's shards of the vector (FSDP2): every
        reduction is combined over the group, so all its processes reach the same plan (and must
        all call this; ``device`` places the collectives when this process holds no elements).
        """
        h = [t for t in h if t.numel() > 0]
        if not h and group is None:
            return None
        dual = dual_exponent(p)
        fin = torch.finfo(_accumulation_dtype(h))
        d = _norm(h, dual, group, device)
        # Direct D is exact unless sum |h|^{p*} overflowed or its small terms fell below the normal
        # range while they still mattered (relative loss < total * tiny / D^{p*}, kept below eps).
        total = sum(t.numel() for t in h)
        if group is not None:
            count = torch.tensor(float(total), dtype=torch.float64, device=h[0].device if h else device)
            dist.all_reduce(count, group=group)
            total = int(count.item())
        underflow_floor = math.log(total * fin.tiny / fin.eps)
        if 0 < d < INF and (dual == INF or dual * math.log(d) > underflow_floor):
            return cls(eps, p, 1.0, 1.0 / d)
        m = _norm(h, INF, group, device)
        if not math.isfinite(m):
            raise NonFiniteGradientError("cannot build a corruption from a vector holding inf or NaN")
        if m == 0:
            return None
        inv_m = 1.0 / m
        return cls(eps, p, inv_m, 1.0 / _norm(h, dual, group, device, scale=inv_m))

    @property
    def dual_norm(self) -> float:
        """``D = ||h||_{p*}`` (may be ``inf`` in Python floats only when h is near float32 max)."""
        return 1.0 / (self.inv_m * self.m_over_d)

    @property
    def linear_scale(self) -> float | None:
        """``s`` with ``a = s * h`` when the corruption is linear in ``h`` (``p = 2``, no rescaling), else None."""
        return self.eps * self.m_over_d if self.p == 2 and self.inv_m == 1.0 else None

    @property
    def gain(self) -> float:
        """First-order loss increase ``a.h = eps * ||h||_{p*}`` (paper Eq. 11)."""
        return self.eps * self.dual_norm

    def values(self, h: Sequence[Tensor]) -> list[Tensor]:
        """The corruption of ``h`` as new tensors shaped like ``h`` (see :meth:`write_`)."""
        out = [torch.empty_like(t) for t in h]
        self.write_(out, h)
        return out

    def write_(self, out: Sequence[Tensor], h: Sequence[Tensor]) -> None:
        """Overwrite ``out`` (same shapes as ``h``) with the corruption; ``out`` may alias nothing in ``h``."""
        out, h = list(out), list(h)
        torch._foreach_copy_(out, h)
        if self.p == INF or self.p == 1:  # p = 1 only ever reaches here on a single selected entry
            torch._foreach_sign_(out)
            torch._foreach_mul_(out, self.eps)
            return
        if self.inv_m != 1.0:
            torch._foreach_mul_(out, self.inv_m)
        if self.p == 2:
            torch._foreach_mul_(out, self.eps * self.m_over_d)
            return
        q = 1.0 / (self.p - 1.0)
        torch._foreach_abs_(out)
        torch._foreach_mul_(out, self.m_over_d)
        torch._foreach_pow_(out, q)
        torch._foreach_mul_(out, self.eps)
        for o, t in zip(out, h):
            torch.copysign(o, t, out=o)


def support(tensors: Sequence[Tensor], n: int | None, p: float) -> list[Tensor] | None:
    """The entries the corruption of ``S = {||a||_p = eps, ||a||_0 <= n}`` may move: flat indices of the
    ``n`` largest ``|x|`` (one for ``p = 1``, whose optimum is a single vertex), or ``None`` when every
    entry may move."""
    if p == 1:
        n = 1
    if n is None or n >= sum(t.numel() for t in tensors):
        return None
    return top_n_indices(tensors, n)


def gather(tensors: Sequence[Tensor], indices: Sequence[Tensor]) -> list[Tensor]:
    """``[t.flatten()[i] for t, i]``: the entries of each tensor at its flat ``indices`` (detached)."""
    return [t.detach().reshape(-1)[i] for t, i in zip(tensors, indices)]


def gradient_corruption(grads: Sequence[Tensor], eps: float, p: float = 2, n: int | None = None) -> list[Tensor]:
    """First-order optimal corruption ``a`` in ``S = {||a||_p = eps, ||a||_0 <= n}`` (paper Eq. 10).

    ``a = eps * sgn(h) * |h|^(1/(p-1)) / || |h|^(1/(p-1)) ||_p`` with ``h = top_n(g)`` chosen
    globally across all ``grads``.  Returns new tensors shaped like ``grads``.  A zero gradient
    gives a zero corruption; a non-finite one raises :class:`NonFiniteGradientError`.

    Memory: the output, plus for ``n < total`` the top-n selection of :func:`top_n_indices`.
    """
    eps, p, n = check_eps(eps), check_p(p), check_n(n)
    grads = [g.detach() for g in grads]
    out = [torch.zeros(g.shape, dtype=g.dtype, device=g.device) for g in grads]
    indices = support(grads, n, p)
    h = grads if indices is None else gather(grads, indices)
    plan = LpCorruption.plan(h, eps, p)
    if plan is None:
        return out
    if indices is None:
        plan.write_(out, h)
    else:
        for o, i, v in zip(out, indices, plan.values(h)):
            o.view(-1)[i] = v
    return out


def random_corruption(
    like: Sequence[Tensor],
    eps: float,
    p: float = 2,
    n: int | None = None,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Random corruption (paper Eq. 5): the closed form of :func:`gradient_corruption` on ``r ~ N(0, I)``.

    ``r`` has the shapes, dtypes and devices of ``like``; pass a seeded ``torch.Generator`` (on
    the tensors' device) for reproducible draws.
    """
    eps, p, n = check_eps(eps), check_p(p), check_n(n)
    r = [
        torch.randn(t.shape, generator=generator, dtype=t.dtype if t.is_floating_point() else None, device=t.device)
        for t in like
    ]
    return gradient_corruption(r, eps, p, n)


def first_order_gain(grads: Sequence[Tensor], eps: float, p: float = 2, n: int | None = None) -> Tensor:
    """``eps * ||top_n(g)||_{p/(p-1)}`` (paper Eq. 11): the first-order loss increase of the optimal corruption.

    Differentiable in ``grads`` (the top-n selection is treated as fixed), so it also serves as
    the penalty term of the first-order ACR objective.  0-d tensor, float32 (float64 for float64 input).
    """
    eps, p, n = check_eps(eps), check_p(p), check_n(n)
    grads = list(grads)
    indices = support([g.detach() for g in grads], n, p)
    h = grads if indices is None else [g.reshape(-1)[i] for g, i in zip(grads, indices)]
    h = [t for t in h if t.numel() > 0]
    if not h:
        return torch.zeros((), dtype=torch.float32)
    dual, device, acc = dual_exponent(p), h[0].device, _accumulation_dtype(h)
    # Scale by max|h| so large dual exponents neither overflow nor underflow; max|h| is a
    # constant factor, so the gradient is unchanged.
    m = torch.stack([t.detach().abs().max().to(device, acc) for t in h]).max()
    if not torch.isfinite(m):
        raise NonFiniteGradientError("cannot compute the gain of a vector holding inf or NaN")
    if m == 0:
        return torch.zeros((), dtype=acc, device=device)
    norms = torch.stack([torch.linalg.vector_norm(t.to(device, acc) / m, dual) for t in h])
    return eps * m * torch.linalg.vector_norm(norms, dual)
