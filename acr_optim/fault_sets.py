r"""Corruption sets shaped by a deployment fault: ACR trained against the fault a model will meet.

The paper defines the corruption by a constraint set ``S`` and trains against its first-order
worst case.  :mod:`acr_optim.corruption` implements the Lp ball ``{||a||_p = eps, ||a||_0 <= n}``;
here ``S`` is the error set of a fault of :func:`~acr_optim.faults.parse_fault`, and the virtual
corruption ``a`` is drawn from it in one of three modes::

    fault              error set of a weight              worst: max a.g over S      random           actual
    int<B>[:g<G>]      |a| <= r s/2 (s: its block step)   r s/2 sgn(g)               r s/2 xi         fault(w) - w
    bf16|fp16|fp8_*    |a| <= r u/2 (u: ulp at w)         r u/2 sgn(g)               r u/2 xi         fault(w) - w
    flips:K[:FMT]      K flips of stored bits             the K flips of largest g.a a draw (= actual) a draw
    flip:RATE[:FMT]    Binomial(bits, RATE) flips         (refused: name a count)    a draw (= actual) a draw
    flip-worst:K       the K worst flips                  the K worst flips          (refused)        = worst
    prune:S            a = -w on the S smallest |w|       the pruning error          (refused)        = worst

with ``xi`` uniform in ``{-1, +1}`` per weight (the paper's random corruption: ``g`` replaced by a
random direction) and ``r`` the radius factor (``fault_radius``; boxes only, since a scaled bit
flip is no bit flip).  ``sgn(g)`` is the first-order maximiser of ``a.g`` over a box, vertex by
vertex.  ``actual`` with ``alpha = 1`` is quantization-aware training with a straight-through
gradient: the gradient of ``L`` at the quantized weights is applied to the float weights.

The fault applies to the tensors it targets (weight matrices; every tensor with ``:all``); the
corrupted values are written as the fault produces them, bit for bit (for flips of the sign or
exponent ``w + (w' - w)`` may miss ``w'``), and the backup restores ``w`` exactly.  Flips of the
sign or exponent of float storage can make a weight inf or NaN; such a step is skipped as any
non-finite step: train against flips in ``int8`` storage or of ``mantissa`` bits.  Random draws
(``random``, and flips in ``actual``) use torch's global generator on the parameters' device: under
DDP each process draws its own unless all are seeded alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from .checks import check_eps
from .faults import Fault, cast_step, parse_fault, quantization_blocks, quantization_scale

__all__ = ["FAULT_MODES", "FaultSet", "check_fault_settings", "fault_set"]

FAULT_MODES = ("worst", "actual", "random")
_BOXES = ("quantize", "cast")
_CHUNK = 1 << 18  # entries of a box corrupted at a time: the direction's scratch stays in cache


@dataclass(frozen=True)
class FaultSet:
    """The error set of ``fault`` and the way ``mode`` draws the virtual corruption from it (see the module)."""

    fault: Fault
    mode: str
    radius: float

    @property
    def is_box(self) -> bool:
        """Whether ``a`` is drawn from a box (quantization or cast, ``worst``/``random``), of closed form."""
        return self.fault.kind in _BOXES and self.mode != "actual"

    def check(self, params: list[Tensor], where: str) -> None:
        """Refuse parameters the fault cannot apply to (complex ones, a group size that does not divide a row),
        naming them."""
        group = self.fault.settings.get("granularity") if self.fault.kind == "quantize" else None
        for i, p in enumerate(params):
            if not self.fault.targets(p):
                continue
            if not p.is_floating_point():
                raise ValueError(
                    f"fault {self.fault.name!r} applies to real floating-point weights; parameter {i} in {where} is "
                    f"{p.dtype}: put it in a param group without acr_fault"
                )
            cast = self.fault.settings.get("dtype") if self.fault.kind == "cast" else None
            if cast is not None and torch.finfo(cast).bits >= torch.finfo(p.dtype).bits:
                raise ValueError(
                    f"fault {self.fault.name!r}: parameter {i} in {where} is already {p.dtype}, which the cast leaves "
                    "as it is (its error set is {0}): put it in a param group without acr_fault"
                )
            cols = p[0].numel() if p.dim() >= 2 else p.numel()
            if isinstance(group, int) and cols % group:
                raise ValueError(
                    f"fault {self.fault.name!r}: the group size {group} must divide the row length {cols} of "
                    f"parameter {i} (shape {tuple(p.shape)}) in {where}; choose a group size that divides every "
                    "row, or :channel"
                )

    def apply_(self, params: list[Tensor], grads: list[Tensor]) -> tuple[float, float]:
        """``w <- w + a`` in place for each of ``params`` (all targeted by the fault); returns ``(a.g, ||a||_2)``.

        ``grads`` is the clean gradient.  Boxes are written as ``w + a`` rounded once (the worst
        case needs no exact vertex); faults are written as the values the fault produces.
        """
        if self.is_box:
            gain = square = torch.zeros((), dtype=torch.float64, device=params[0].device if params else "cpu")
            for w, g in zip(params, grads):
                target = w if w.is_contiguous() else w.contiguous()
                scratch = torch.empty(2, min(_CHUNK, w.numel()), dtype=w.dtype, device=w.device)
                for part, g_part, half in self._box_chunks(target, g.reshape(target.shape), scratch[1]):
                    a = scratch[0, : part.numel()].view(part.shape)  # cache-sized and reused: no allocation per pass
                    # worst: the vertex r s/2 sgn(g) (where g = 0 every point of the box is optimal: + r s/2)
                    sign = g_part if self.mode == "worst" else a.random_(0, 2).sub_(0.5)
                    torch.copysign(half.expand(part.shape), sign, out=a)
                    flat_a, flat_g = a.reshape(-1), g_part.reshape(-1)
                    if flat_a.dtype not in (torch.float32, torch.float64):  # the dot in float32 at least
                        flat_a, flat_g = flat_a.float(), flat_g.float()
                    gain = gain + torch.dot(flat_a, flat_g).double()
                    # every entry moves by its half-side: ||a||^2 = sum of h^2 (a block's h counts size times)
                    square = square + half.double().square().sum() * (part.numel() // half.numel())
                    part.add_(a)
                if target is not w:
                    w.copy_(target)
            return gain.item(), math.sqrt(square.item())  # of a as planned, before w + a rounds
        if self.fault.kind == "flips" and self.mode == "worst":
            values = _worst_of(self.fault).values(params, grads)
        else:
            values = self.fault.values(params, grads if self.fault.uses_grads else None)
        gains, norms = [], []
        for v, w, g in zip(values, params, grads):
            moved = v - w
            gains.append((moved * g).sum(dtype=torch.float64))
            norms.append(torch.linalg.vector_norm(moved, dtype=torch.float64))
        torch._foreach_copy_(params, values)
        return torch.stack(gains).sum().item(), torch.stack(norms).norm().item()

    def _box_chunks(self, w: Tensor, g: Tensor, scratch: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Views of ``w`` and ``g`` of about ``_CHUNK`` entries, each with its half-sides ``r s/2`` (broadcastable;
        for a cast, written into ``scratch``)."""
        settings = self.fault.settings
        if self.fault.kind == "quantize":
            blocks = quantization_blocks(w, settings["granularity"])  # a view: w is contiguous
            g_blocks = g.reshape(blocks.shape)
            half = quantization_scale(blocks, settings["bits"]).to(w.dtype).mul_(self.radius / 2)
            rows = max(1, _CHUNK // (blocks.shape[1] * blocks.shape[2]))
            for i in range(0, blocks.shape[0], rows):
                yield blocks[i : i + rows], g_blocks[i : i + rows], half[i : i + rows]
            return
        flat, g_flat = w.view(-1), g.reshape(-1)
        for i in range(0, flat.numel(), _CHUNK):
            part = flat[i : i + _CHUNK]
            half = cast_step(part, settings["dtype"], out=scratch[: part.numel()]).mul_(self.radius / 2)
            yield part, g_flat[i : i + _CHUNK], half


@lru_cache(maxsize=64)
def _worst_of(fault: Fault) -> Fault:
    """``flips:K:...`` -> ``flip-worst:K:...``: the same flips, chosen by first-order gain."""
    return parse_fault("flip-worst" + fault.name[fault.name.index(":") :])


def check_fault_settings(mode: str, radius: float) -> None:
    """Raise ``ValueError`` unless ``mode`` is one of :data:`FAULT_MODES` and ``radius`` a finite number > 0."""
    if mode not in FAULT_MODES:
        raise ValueError(f"fault_mode must be one of {', '.join(map(repr, FAULT_MODES))}, got {mode!r}")
    check_eps(radius, name="fault_radius")


@lru_cache(maxsize=64)
def fault_set(spec: str, mode: str = "worst", radius: float = 1.0) -> FaultSet:
    """The :class:`FaultSet` of a fault spec, a mode in :data:`FAULT_MODES` and a radius factor; checked here.

    Raises ``ValueError`` naming the argument for an unknown spec (with the grammar), an unknown
    mode, a radius that is not a positive number or is not 1 for a fault that is no box, and the
    combinations the module table refuses.
    """
    fault = parse_fault(spec)
    check_fault_settings(mode, radius)
    if radius != 1 and (fault.kind not in _BOXES or mode == "actual"):
        raise ValueError(
            f"fault_radius scales the half-step box of quantization and cast faults in fault_mode 'worst' or "
            f"'random'; with fault {spec!r} and fault_mode {mode!r} it must be 1, got {radius!r}"
        )
    refused = {
        ("flip", "worst"): "the worst case of random-rate flips is not defined: name a count (flips:K:...)",
        ("flip-worst", "random"): "flip-worst names the worst flips, not a random draw: use flips:K:... instead",
        ("prune", "random"): "pruning has no random draw: use fault_mode 'actual' (the pruning error)",
    }
    if (fault.kind, mode) in refused:
        raise ValueError(f"fault {spec!r} with fault_mode {mode!r}: {refused[fault.kind, mode]}")
    return FaultSet(fault, mode, float(radius))
