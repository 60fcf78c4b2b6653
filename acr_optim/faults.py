"""Real-world parameter faults: weight quantization, low-precision casts, bit flips and magnitude pruning.

Each fault maps weights ``w`` to the faulty weights ``w'`` a deployment or a hardware error leaves in
memory.  A list of tensors is one flat vector, as in :mod:`acr_optim.corruption`; the functions return
the deltas ``d = w' - w`` (same shapes and dtypes), so ``probe.corrupted(model, a)`` applies them, and
:meth:`Fault.values` returns ``w'`` itself.  ``w + d == w'`` exactly when ``w' = 0`` or
``w/2 <= w' <= 2w`` (Sterbenz's lemma): always for quantization and pruning, for casts unless a value
saturates, for mantissa flips; a flip that moves a weight further (sign, exponent) gives ``d = w' - w``
rounded once, and ``w + d`` may then miss ``w'`` (``w = 3`` with its top exponent bit cleared is the
subnormal ``w' = 5.9e-39``, but ``w + d`` is 0).  :func:`~acr_optim.probe.probe` therefore writes
the faulty values themselves.

- :func:`quantization_error`: symmetric round-to-nearest to ``b`` bits per block (the tensor, each
  output row, or groups of ``G`` consecutive inputs of a row), torchao's ``MappingType.SYMMETRIC``:
  ``s = max|w| / (2^(b-1) - 1/2)``, ``q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)``, ``w' = q s``.
- :func:`cast_error`: ``w' = w.to(dtype).to(w.dtype)``, saturating at the format's largest finite value.
- :func:`bit_flip_error`: flips of the stored bits, at a rate per bit or an exact count.
- :func:`pruning_error`: the ``floor(sparsity N)`` smallest ``|w|`` set to zero.
- :func:`worst_bit_flips`: the ``count`` single-bit flips of largest first-order loss increase
  ``g (w' - w)``, the discrete counterpart of the paper's Eq. (10).

:func:`parse_fault` turns a short spec (``int4:g32``, ``bf16``, ``flip:1e-6``...; see ``GRAMMAR``) into a
:class:`Fault`, which the probe applies to the weight matrices (``ndim >= 2``) unless the spec ends in
``:all``.  Everything here is a pure function of its inputs (and of the given ``generator``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from .checks import check_fraction, check_int

__all__ = [
    "CAST_DTYPES",
    "FORMATS",
    "GRAMMAR",
    "Fault",
    "bit_flip_error",
    "cast_error",
    "cast_step",
    "check_bits",
    "check_cast_dtype",
    "check_format",
    "check_granularity",
    "check_rate_count",
    "parse_fault",
    "pruning_error",
    "quantization_blocks",
    "quantization_error",
    "quantization_scale",
    "quantization_step",
    "worst_bit_flips",
]

CAST_DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
FORMATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": "int8"}
_FORMAT_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_BIT_CLASSES = ("any", "sign", "exponent", "mantissa")
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

Tensors = Sequence[Tensor]
Format = torch.dtype | str | None
Bits = str | Sequence[int]


# -- validation ----------------------------------------------------------------------------------


def _check_tensors(tensors: Tensors, name: str = "tensors") -> list[Tensor]:
    tensors = list(tensors)
    for t in tensors:
        if not isinstance(t, Tensor) or t.dtype not in _FLOAT_DTYPES:
            kind = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{name} must be float64/float32/bfloat16/float16 tensors, got {kind}")
    return [t.detach() for t in tensors]


def check_bits(bits: int) -> int:
    """Return ``bits``, or raise unless it is an int in 2..8 (the quantization width)."""
    return check_int(bits, "bits", 2, 8)


def check_granularity(granularity: str | int) -> str | int:
    """Return ``granularity``: ``"tensor"``, ``"channel"`` or a positive int group size."""
    if isinstance(granularity, str) and granularity in ("tensor", "channel"):
        return granularity
    if isinstance(granularity, int) and not isinstance(granularity, bool) and granularity >= 1:
        return granularity
    raise ValueError(f"granularity must be 'tensor', 'channel' or a group size >= 1, got {granularity!r}")


def check_format(format: Format) -> torch.dtype | str | None:
    """Return the storage format (a float dtype, ``"int8"`` or None for each tensor's own dtype)."""
    if format is None or format == "int8" or format in FORMATS.values():
        return format
    if isinstance(format, str) and _FORMAT_ALIASES.get(format, format) in FORMATS:
        return FORMATS[_FORMAT_ALIASES.get(format, format)]
    raise ValueError(f"format must be None or one of {list(FORMATS)} (or fp32/bf16/fp16), got {format!r}")


def check_cast_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Return the cast target as a dtype: bfloat16, float16, float8_e4m3fn or float8_e5m2 (or their short names)."""
    dtype = CAST_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in CAST_DTYPES.values():
        raise ValueError(f"dtype must be one of {list(CAST_DTYPES)} or the torch dtypes they name, got {dtype!r}")
    return dtype


def check_rate_count(rate: float | None, count: int | None) -> tuple[float | None, int | None]:
    """Exactly one of ``rate`` (per stored bit, in [0, 1]) and ``count`` (an int >= 0)."""
    if (rate is None) == (count is None):
        raise ValueError("give exactly one of rate (flip probability per bit) and count (number of flips)")
    if rate is not None:
        return check_fraction(rate, "rate", closed=True), None
    return None, check_int(count, "count", 0)


# -- quantization and casts ----------------------------------------------------------------------


def _row_length(w: Tensor) -> int:
    """Entries per output row: a tensor of shape ``(out, ...)`` is ``out`` rows; a 1-D one, one row."""
    return w[0].numel() if w.dim() >= 2 else w.numel()


def quantization_blocks(w: Tensor, granularity: str | int = "channel") -> Tensor:
    """``w`` as the blocks of :func:`quantization_error`, shaped ``(rows, groups, size)``, row-major.

    A view of ``w`` when it is contiguous (writing into the blocks writes into ``w``), else a copy.
    """
    rows, cols = w.numel() // _row_length(w), _row_length(w)
    if granularity == "tensor":
        blocks = w.reshape(1, 1, -1)
    else:
        size = cols if granularity == "channel" else granularity
        if cols % size:
            raise ValueError(
                f"granularity (group size) {size} must divide the row length {cols} of a tensor of shape {tuple(w.shape)}"
            )
        blocks = w.reshape(rows, cols // size, size)
    return blocks.contiguous()  # (a transposed weight is copied): codes and values come out in row-major order


def quantization_scale(blocks: Tensor, bits: int) -> Tensor:
    """The step ``s = max|w| / (2^(b-1) - 1/2)`` of each block of :func:`quantization_blocks`, shaped ``(rows, groups, 1)``.

    Mirrors torchao's SYMMETRIC ``choose_qparams_affine`` operation by operation, dtypes included:
    ``max|w|/half`` in ``w.dtype``, floored at ``eps`` and cast to the scale dtype (int8: float32
    and float32's eps, as ``Int8WeightOnlyConfig``; int2..int7: ``w.dtype`` and its smallest
    normal, as ``IntxWeightOnlyConfig``).
    """
    # amin and amax apart: the same values as aminmax, which is ~10x slower over short blocks on CPU
    lo, hi = blocks.amin(dim=-1, keepdim=True), blocks.amax(dim=-1, keepdim=True)
    if bits == 8:
        scale_dtype, floor = torch.float32, torch.finfo(torch.float32).eps
    else:
        scale_dtype, floor = blocks.dtype, torch.finfo(blocks.dtype).tiny
    return (torch.maximum(-lo, hi) / (2 ** (bits - 1) - 0.5)).clamp(min=floor).to(scale_dtype)


def _round_to_grid(w: Tensor, bits: int, granularity: str | int) -> tuple[Tensor, Tensor]:
    """Codes ``q`` (integral floats, blocks shaped ``(rows, groups, size)``) and scales ``(rows, groups, 1)``:
    torchao's ``quantize_affine``, ``w * (1/s)`` rounded half to even and clamped."""
    blocks = quantization_blocks(w, granularity)
    scale = quantization_scale(blocks, bits)
    q = blocks * (1.0 / scale)
    q.round_().clamp_(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return q, scale


def _quantized(w: Tensor, bits: int, granularity: str | int) -> Tensor:
    if w.numel() == 0:
        return w.clone()
    q, scale = _round_to_grid(w, bits, granularity)
    return q.mul_(scale).to(w.dtype).view(w.shape)


def _saturated(w: Tensor, dtype: torch.dtype) -> Tensor:
    """``w.to(dtype)`` with values beyond the format's largest finite magnitude set to it (NaN stays NaN)."""
    limit = torch.finfo(dtype).max
    if w.numel() and torch.finfo(w.dtype).max > limit:
        lo, hi = torch.aminmax(w)
        if not -limit <= lo <= hi <= limit:  # also when NaN hides the range
            w = w.clamp(-limit, limit)
    return w.to(dtype)


def _deltas(tensors: list[Tensor], values: list[Tensor]) -> list[Tensor]:
    """``w' - w``, reusing the buffers of ``w'`` (tensors left untouched come back as fresh zeros)."""
    return [torch.zeros_like(w) if v is w else v.sub_(w) for w, v in zip(tensors, values)]


def quantization_error(tensors: Tensors, bits: int, granularity: str | int = "channel") -> list[Tensor]:
    """``d = w' - w`` for symmetric round-to-nearest weight quantization to ``bits`` in 2..8.

    Per block, ``s = max|w| / (2^(b-1) - 1/2)``, ``w' = s * clamp(round(w/s), -2^(b-1), 2^(b-1)-1)``
    (round half to even), so ``|d| <= s/2``.  Blocks: ``granularity="tensor"`` (one scale),
    ``"channel"`` (one per output row: a tensor of shape ``(out, ...)`` is viewed as
    ``(out, numel/out)``; 1-D tensors are one row) or an int ``G``, groups of ``G`` consecutive
    entries of each row (``G`` must divide the row length).  This is torchao's weight-only
    quantization exactly (``Int8WeightOnlyConfig`` for 8 bits, ``IntxWeightOnlyConfig`` below;
    ``PerTensor``/``PerRow``/``PerAxis(0)``/``PerGroup(G)``, scales and dtypes as there).
    optimum-quanto's int8 uses ``s = max|w|/127`` and codes in [-127, 127] instead.
    """
    tensors, bits, granularity = _check_tensors(tensors), check_bits(bits), check_granularity(granularity)
    return _deltas(tensors, [_quantized(w, bits, granularity) for w in tensors])


def quantization_step(w: Tensor, bits: int, granularity: str | int = "channel") -> Tensor:
    """The step ``s`` of each weight's block under :func:`quantization_error`, shaped as ``w``.

    Round to nearest moves each weight by at most ``s/2``: the error set of the fault, to first
    order in ``w`` (``s`` itself depends on the block's ``max|w|``), is the box ``|d| <= s/2``.
    """
    bits, granularity = check_bits(bits), check_granularity(granularity)
    if w.numel() == 0:
        return torch.zeros_like(w)
    blocks = quantization_blocks(w.detach(), granularity)
    return quantization_scale(blocks, bits).to(w.dtype).expand(blocks.shape).reshape(w.shape)


_EXPONENT_BITS = {
    torch.float32: (torch.int32, 0x7F800000),
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float16: (torch.int16, 0x7C00),
}


def cast_step(w: Tensor, dtype: torch.dtype | str, out: Tensor | None = None) -> Tensor:
    """The spacing (one ulp) of ``dtype`` at each weight, in ``w.dtype``: ``2^(floor(log2|w|)) * finfo(dtype).eps``.

    Below the smallest normal of ``dtype`` the spacing of its subnormals.  Round to nearest moves
    each weight by at most half of it (short of saturation): the cast's error set is that box.
    ``out``: a tensor like ``w`` to write the spacing into (saves an allocation in a loop).
    """
    dtype = check_cast_dtype(dtype)
    info = torch.finfo(dtype)
    w = w.detach()
    if w.dtype in _EXPONENT_BITS:  # 2^floor(log2|w|) is w with its sign and mantissa bits cleared
        codes, mask = _EXPONENT_BITS[w.dtype]
        out = torch.empty_like(w) if out is None else out
        torch.bitwise_and(w.view(codes), mask, out=out.view(codes))
    else:
        mantissa, exponent = torch.frexp(w.float())  # |w| = m 2^e with m in [0.5, 1)
        power = torch.ldexp(mantissa.abs_().sign_().mul_(0.5), exponent)  # 0 stays 0
        out = power.to(w.dtype) if out is None else out.copy_(power)
    return out.mul_(info.eps).clamp_(min=info.smallest_normal * info.eps)


def cast_error(tensors: Tensors, dtype: torch.dtype | str) -> list[Tensor]:
    """``d = w.to(dtype).to(w.dtype) - w`` for ``dtype`` in bfloat16, float16, float8_e4m3fn, float8_e5m2.

    Round to nearest even; values beyond the format's largest finite magnitude (bf16 3.39e38,
    fp16 65504, e4m3fn 448, e5m2 57344) saturate to it instead of becoming inf (torch itself
    saturates only for e4m3fn, which has no inf); NaN stays NaN.  Values below half the smallest
    subnormal flush to zero.  A plain cast, without the per-row scaling of scaled-fp8 deployments.
    """
    tensors, dtype = _check_tensors(tensors), check_cast_dtype(dtype)
    return _deltas(tensors, [_saturated(w, dtype).to(w.dtype, copy=True) for w in tensors])


# -- stored bits ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    codes: torch.dtype  # the integer dtype holding the stored bits
    width: int
    exponent: int  # exponent bits (0: an int8 code, sign bit plus 7 value bits)

    def positions(self, bits: Bits) -> list[int]:
        """Bit positions (0 = least significant) that ``bits`` selects in this layout."""
        mantissa = self.width - 1 - self.exponent
        if isinstance(bits, str):
            if bits == "any":
                return list(range(self.width))
            if bits == "sign":
                return [self.width - 1]
            if bits in ("exponent", "mantissa") and self.exponent:
                return list(range(mantissa, self.width - 1)) if bits == "exponent" else list(range(mantissa))
            if bits in ("exponent", "mantissa"):
                raise ValueError(f"bits={bits!r} needs a float format; int8 codes have a sign bit and 7 value bits")
        elif (
            bits
            and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < self.width for b in bits)
            and len(set(bits)) == len(bits)
        ):
            return sorted(bits)
        raise ValueError(
            f"bits must be one of {_BIT_CLASSES} or distinct bit positions in 0..{self.width - 1} "
            f"(for {self.width}-bit storage), got {bits!r}"
        )

    def value(self, position: int) -> int:
        """The code with only ``position`` set, as a signed integer of this width."""
        return -(1 << position) if position == self.width - 1 else 1 << position


_LAYOUTS: dict[torch.dtype | str, _Layout] = {
    torch.float64: _Layout(torch.int64, 64, 11),
    torch.float32: _Layout(torch.int32, 32, 8),
    torch.bfloat16: _Layout(torch.int16, 16, 8),
    torch.float16: _Layout(torch.int16, 16, 5),
    "int8": _Layout(torch.int8, 8, 0),
}


@dataclass
class _Stored:
    """A tensor in its stored format: flat integer ``codes`` and how to read codes back as values."""

    codes: Tensor
    layout: _Layout
    # (codes, where they are: flat indices, a row-aligned slice of the flat codes, or None for all) -> values
    read: Callable[[Tensor, Tensor | slice | None], Tensor]


def _stored(w: Tensor, format: torch.dtype | str | None) -> _Stored:
    """``w`` stored in ``format`` (its own dtype when None): cast (saturating) or int8 codes per output row."""
    format = w.dtype if format is None else format
    if format == "int8":
        if w.numel() == 0:
            return _Stored(torch.empty(0, dtype=torch.int8, device=w.device), _LAYOUTS["int8"], lambda c, i: w.clone())
        q, scale = _round_to_grid(w, 8, "channel")
        cols, flat_scale = q.shape[-1], scale.reshape(-1)

        def read_int8(codes: Tensor, index: Tensor | slice | None) -> Tensor:
            if index is None:
                return (codes.view(q.shape).to(w.dtype) * scale).to(w.dtype).view(w.shape)
            if isinstance(index, slice):
                rows = flat_scale[index.start // cols : index.stop // cols, None]
                return (codes.view(-1, cols).to(w.dtype) * rows).to(w.dtype).view(-1)
            return (codes.to(w.dtype) * flat_scale[index // cols]).to(w.dtype)

        return _Stored(q.to(torch.int8).view(-1), _LAYOUTS["int8"], read_int8)
    if w.dtype not in (format, torch.float32, torch.float64):
        raise ValueError(f"format {format} cannot store {w.dtype} tensors: use their own dtype (format=None)")
    layout = _LAYOUTS[format]

    def read_float(codes: Tensor, index: Tensor | slice | None) -> Tensor:
        if index is None:
            return codes.view(format).to(w.dtype, copy=True).view(w.shape)
        return codes.view(format).to(w.dtype)

    return _Stored(_saturated(w, format).reshape(-1).view(layout.codes), layout, read_float)


def _distinct(total: int, k: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``k`` distinct integers drawn uniformly from ``range(total)``, sorted.

    Draws with replacement and tops up the duplicates (a uniform k-subset, since every round is
    symmetric in the integers); a permutation when ``k > total / 2``, where that would be slow.
    """
    if 2 * k > total:
        return torch.randperm(total, generator=generator, device=device)[:k].sort().values
    chosen = torch.empty(0, dtype=torch.long, device=device)
    while chosen.numel() < k:
        draw = torch.randint(total, (k - chosen.numel(),), generator=generator, device=device)
        chosen = torch.cat([chosen, draw]).unique()
    return chosen


def _offsets(sizes: Sequence[int]) -> list[int]:
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return offsets


def _split(flat: Tensor, offsets: list[int]) -> list[Tensor]:
    """Sorted global indices -> one tensor of local indices per segment ``[offsets[i], offsets[i+1])``."""
    bounds = torch.searchsorted(flat, torch.tensor(offsets, device=flat.device)).tolist()
    return [flat[bounds[i] : bounds[i + 1]] - offsets[i] for i in range(len(offsets) - 1)]


def _write_flips(stored: _Stored, index: Tensor, mask: Tensor, values: Tensor | None = None) -> Tensor:
    """The values of ``stored`` (written into ``values`` if given), the codes at flat ``index`` XOR ``mask``.

    ``index`` is sorted and may repeat (several flips of one weight).
    """
    values = stored.read(stored.codes, None) if values is None else values
    if index.numel():
        # several flips of one weight hit distinct bits: their XOR is the sum of their masks
        index, inverse = torch.unique_consecutive(index, return_inverse=True)
        total = torch.zeros(index.numel(), dtype=torch.long, device=index.device).index_add_(0, inverse, mask.long())
        codes = stored.codes[index] ^ total.to(stored.layout.codes)
        values.view(-1)[index] = stored.read(codes, index)
    return values


def _flipped(
    tensors: list[Tensor],
    rate: float | None,
    count: int | None,
    bits: Bits,
    format: torch.dtype | str | None,
    generator: torch.Generator | None,
) -> list[Tensor]:
    stores = [_stored(w, format) for w in tensors]
    positions = [s.layout.positions(bits) for s in stores]
    values = [torch.tensor([s.layout.value(b) for b in pos], dtype=torch.long) for s, pos in zip(stores, positions)]
    device = tensors[0].device if tensors else torch.device("cpu")
    if rate is not None:  # every stored bit flips independently: Binomial(S, rate) flips in distinct bit slots
        offsets = _offsets([w.numel() * len(pos) for w, pos in zip(tensors, positions)])
        total = torch.tensor(float(offsets[-1]), dtype=torch.float64, device=device)
        k = int(torch.binomial(total, torch.full_like(total, rate), generator=generator))
        slots = _split(_distinct(offsets[-1], k, generator, device), offsets)
        return [
            _write_flips(s, slot // len(pos), v.to(device)[slot % len(pos)])
            for s, slot, pos, v in zip(stores, slots, positions, values)
        ]
    offsets = _offsets([w.numel() for w in tensors])
    if count > offsets[-1]:
        raise ValueError(f"count must be <= the number of weights ({offsets[-1]}), got {count}")
    chosen = _split(_distinct(offsets[-1], count, generator, device), offsets)
    return [
        _write_flips(s, index, v.to(device)[torch.randint(len(pos), index.shape, generator=generator, device=device)])
        for s, index, pos, v in zip(stores, chosen, positions, values)
    ]


def bit_flip_error(
    tensors: Tensors,
    rate: float | None = None,
    count: int | None = None,
    bits: Bits = "any",
    format: Format = None,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """``d = w' - w`` for random flips of the stored bits of the weights.

    ``rate``: every selected bit of every weight flips independently with probability ``rate``
    (drawn as ``K ~ Binomial(S, rate)`` flips in ``K`` distinct bit slots of the ``S`` selected
    ones; a weight may get several).  ``count``: exactly ``count`` flips, in ``count`` distinct
    weights drawn uniformly over all tensors, one uniformly chosen selected bit each.  ``bits``:
    ``"any"``, ``"sign"``, ``"exponent"``, ``"mantissa"`` or a list of positions (0 = least
    significant).  ``format``: the stored representation, ``None`` (each tensor's own dtype),
    ``"float32"``, ``"bfloat16"``, ``"float16"`` (cast, saturating, from a float32/float64 tensor)
    or ``"int8"``: per-output-row int8 codes of :func:`quantization_error` (8 bits, channel; two's
    complement, bit 7 the sign), whose deltas then include the quantization error of every weight.

    A flip may produce inf or NaN (an exponent of all ones), as a real fault does; they are
    returned as they are (the probe then reports an infinite loss).  Reproducible from
    ``generator`` (on the tensors' device); memory ``O(flips)`` beyond the output.
    """
    tensors, (rate, count) = _check_tensors(tensors), check_rate_count(rate, count)
    return _deltas(tensors, _flipped(tensors, rate, count, bits, check_format(format), generator))


# -- worst-case flips ----------------------------------------------------------------------------


def _highest_bit(x: Tensor) -> Tensor:
    """The highest set bit of each ``x >= 0`` (0 where ``x == 0``), read off a float conversion.

    ``y = x & ~(x >> 1)`` keeps the highest bit and has no two adjacent ones, so converting ``y``
    to float cannot round up to the next power of 2; the float's exponent bits alone are then
    exactly that highest bit, as a float.
    """
    wide = x.dtype == torch.int64
    y = (x & ~(x >> 1)).to(torch.float64 if wide else torch.float32)
    exponent = 0x7FF0000000000000 if wide else 0x7F800000
    return (y.view(torch.int64 if wide else torch.int32) & exponent).view(y.dtype).to(x.dtype)


_CHUNK = 1 << 18  # weights scored at a time: bounds the scratch memory of worst_bit_flips and keeps it in cache


def _candidates(c: Tensor, layout: _Layout, positions: list[int], lowest: bool) -> list[Tensor]:
    """Masks of the flips that can be a weight's best: see :func:`_best_gains`.

    The highest (and with ``lowest`` the lowest) selected 0 bit and 1 bit among the non-sign bits,
    and the sign bit if selected.  A weight with no selected 0 (or 1) bit takes the other class's
    bits there, so no candidate is "no flip".
    """
    field = sum(1 << b for b in positions if b < layout.width - 1)
    masks = []
    if field:
        zeros, ones = ~c & field, c & field
        zeros, ones = zeros + (zeros == 0) * ones, ones + (ones == 0) * zeros
        masks += [_highest_bit(zeros), _highest_bit(ones)]
        if lowest:
            masks += [zeros & -zeros, ones & -ones]
    if layout.width - 1 in positions:
        masks.append(torch.full_like(c, layout.value(layout.width - 1)))
    return masks


def _gains(stored: _Stored, c: Tensor, index: Tensor | slice, w: Tensor, g: Tensor, masks: list[Tensor]) -> Tensor:
    """``g (w' - w)`` for each candidate mask (rows), in the dtype of ``w``; NaN (a flip to NaN,
    or an infinite change times a zero gradient) as ``+inf``."""
    gains = torch.stack([stored.read(c ^ m, index).to(w.dtype).sub_(w).mul_(g) for m in masks])
    return gains.nan_to_num_(nan=math.inf, posinf=math.inf, neginf=-math.inf)


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _best_gains(stored: _Stored, base: Tensor, grad: Tensor, positions: list[int], start: int, size: int) -> Tensor:
    """For the flat weights ``start:start + size``, the largest first-order gain ``g (w' - w)`` of one flip.

    Within the non-sign bits the flipped value moves monotonically with the bit position, one
    way for 0 -> 1 flips and the other way for 1 -> 0 flips (IEEE magnitudes are ordered like
    their bit patterns; int8 value bits add ``2^k``), so a weight's best flip is the sign flip or
    the highest or lowest selected 0 or 1 bit; the lowest ones only matter when every flip of the
    weight lowers the loss, and are scored for those weights alone.
    """
    acc = _accumulation(base.dtype)
    chunk = slice(start, start + size)
    c, w, g = stored.codes[chunk], base.reshape(-1)[chunk].to(acc), grad.reshape(-1)[chunk].to(acc)
    best = _gains(stored, c, chunk, w, g, _candidates(c, stored.layout, positions, lowest=False)).amax(0)
    losing = (best < 0).nonzero().squeeze(1)
    if losing.numel():
        c, index, w, g = c[losing], losing + start, w[losing], g[losing]
        best[losing] = _gains(stored, c, index, w, g, _candidates(c, stored.layout, positions, lowest=True)).amax(0)
    return best


def _best_masks(stored: _Stored, base: Tensor, grad: Tensor, positions: list[int], index: Tensor) -> Tensor:
    """The mask of the best flip of each weight at flat ``index`` (the flip whose gain :func:`_best_gains` reports)."""
    acc = _accumulation(base.dtype)
    c, w, g = stored.codes[index], base.reshape(-1)[index].to(acc), grad.reshape(-1)[index].to(acc)
    masks = torch.stack(_candidates(c, stored.layout, positions, lowest=True))
    best = _gains(stored, c, index, w, g, list(masks)).argmax(0)
    return masks.gather(0, best[None])[0]


def _worst_flipped(
    tensors: list[Tensor], grads: list[Tensor], count: int, bits: Bits, format: torch.dtype | str | None
) -> list[Tensor]:
    stores = [_stored(w, format) for w in tensors]
    positions = [s.layout.positions(bits) for s in stores]
    offsets = _offsets([w.numel() for w in tensors])
    if count > offsets[-1]:
        raise ValueError(f"count must be <= the number of weights ({offsets[-1]}), got {count}")
    device = tensors[0].device if tensors else torch.device("cpu")
    bases = [s.read(s.codes, None) for s in stores]
    # a running top-count of (gain, global index), merged chunk by chunk in index order; the stable
    # sort keeps the lowest index among equal gains
    top_gain = torch.empty(0, device=device, dtype=torch.float64)
    top_index = torch.empty(0, device=device, dtype=torch.long)
    for s, base, g, pos, offset in zip(stores, bases, grads, positions, offsets):
        size = max(1, _CHUNK // _row_length(base)) * _row_length(base)  # whole rows: one scale per row of int8
        for start in range(0, s.codes.numel(), size) if count else ():
            gain = _best_gains(s, base, g, pos, start, size).double()
            if top_gain.numel() == count:
                floor = top_gain[-1]
            elif gain.numel() > count:
                floor = torch.topk(gain, count, sorted=False).values.min()
            else:
                floor = -math.inf
            keep = (gain >= floor).nonzero().squeeze(1)  # ties with the floor stay candidates
            order = torch.sort(torch.cat([top_gain, gain[keep]]), descending=True, stable=True).indices[:count]
            top_gain = torch.cat([top_gain, gain[keep]])[order]
            top_index = torch.cat([top_index, keep + offset + start])[order]
    chosen = _split(top_index.sort().values, offsets)
    return [
        _write_flips(s, i, _best_masks(s, base, g, pos, i), base)
        for s, i, base, g, pos in zip(stores, chosen, bases, grads, positions)
    ]


def worst_bit_flips(
    tensors: Tensors, grads: Tensors, count: int, bits: Bits = "any", format: Format = None
) -> list[Tensor]:
    """``d = w' - w`` for the ``count`` single-bit flips (at most one per weight) of largest ``g (w' - w)``.

    The discrete counterpart of the paper's Eq. (10): among every flip of a selected bit of every
    weight, the ``count`` whose first-order loss increase ``g_i (w_i' - w_i)`` (in float64; for the
    int8 format, ``w`` is the dequantized weight) is largest, ties to the lowest flat index; a
    flip to NaN ranks as ``+inf``.  Its first-order gain is never below that of ``count`` random
    flips.  ``bits``/``format`` as in :func:`bit_flip_error`; deterministic.
    """
    tensors, grads = _check_tensors(tensors), _check_tensors(grads, "grads")
    if [g.shape for g in grads] != [w.shape for w in tensors]:
        raise ValueError("grads must have the shapes of tensors")
    count, format = check_int(count, "count", 0), check_format(format)
    return _deltas(tensors, _worst_flipped(tensors, grads, count, bits, format))


# -- pruning -------------------------------------------------------------------------------------

_SAMPLE = 1 << 16


def _kth_smallest(keys: list[Tensor], k: int) -> float:
    """The ``k``-th smallest (1-based) of the flat ``keys`` together (no NaN), exactly.

    A fixed-seed sample brackets it (its order statistics 4 standard deviations either side of
    the expected rank); one pass counts the keys below the bracket and gathers those inside, and
    a ``kthvalue`` among these gives the answer; a bracket that missed is widened (rare).
    """
    sizes = [t.numel() for t in keys]
    total = sum(sizes)
    generator = torch.Generator(keys[0].device).manual_seed(0)
    sample = (
        torch.cat(
            [
                t[torch.randint(n, (math.ceil(_SAMPLE * n / total),), generator=generator, device=t.device)]
                for t, n in zip(keys, sizes)
                if n
            ]
        )
        .sort()
        .values
    )
    rank = k * sample.numel() / total
    spread = 4 * math.sqrt(rank) + 1
    low_i, high_i = math.floor(rank - spread), math.ceil(rank + spread)
    low = sample[low_i].item() if low_i >= 0 else -math.inf
    high = sample[high_i].item() if high_i < sample.numel() else math.inf
    while True:
        below = sum(int(torch.count_nonzero(t < low)) for t in keys)
        if below >= k:
            low = -math.inf
            continue
        inside = torch.cat([t[(t >= low) & (t <= high)] for t in keys])
        if below + inside.numel() >= k:
            return inside.kthvalue(k - below).values.item()
        high = math.inf


def _smallest(keys: list[Tensor], k: int) -> list[Tensor]:
    """Boolean masks of the ``k`` smallest entries of the flat ``keys`` together, ties to the lowest index."""
    if k == 0:
        return [torch.zeros_like(t, dtype=torch.bool) for t in keys]
    tau = _kth_smallest(keys, k)
    masks = [t < tau for t in keys]
    missing = k - sum(int(m.count_nonzero()) for m in masks)
    for t, m in zip(keys, masks):
        if missing == 0:
            break
        ties = (t == tau).nonzero().squeeze(1)[:missing]
        m[ties] = True
        missing -= ties.numel()
    return masks


def _pruned(tensors: list[Tensor], sparsity: float, scope: str) -> list[Tensor]:
    keys = [w.abs().reshape(-1).nan_to_num_(nan=math.inf) for w in tensors]
    fraction = Fraction(repr(sparsity))  # floor(0.29 * 100) is 29, as typed, not 28 as in binary floating point
    if scope == "global":
        masks = _smallest(keys, math.floor(fraction * sum(w.numel() for w in tensors)))
    else:
        masks = [_smallest([key], math.floor(fraction * key.numel()))[0] for key in keys]
    return [w.masked_fill(m.view(w.shape), 0) for w, m in zip(tensors, masks)]


def pruning_error(tensors: Tensors, sparsity: float, scope: str = "global") -> list[Tensor]:
    """``d = -w`` on the ``floor(sparsity * N)`` entries of smallest ``|w|``, zero elsewhere (magnitude pruning).

    ``scope="global"``: ``N`` counts all tensors together and the smallest are chosen across
    them; ``"tensor"``: each tensor prunes ``floor(sparsity * n_t)`` of its own.  ``sparsity``
    in [0, 1), as typed in decimal (``0.29 * 100`` gives 29).  Ties at the cut go to the lowest
    flat index (in the order of ``tensors``); NaN counts as the largest magnitude.
    """
    tensors = _check_tensors(tensors)
    sparsity = check_fraction(sparsity, "sparsity", closed=False)
    if scope not in ("global", "tensor"):
        raise ValueError(f"scope must be 'global' or 'tensor', got {scope!r}")
    return _deltas(tensors, _pruned(tensors, sparsity, scope))


# -- specs ---------------------------------------------------------------------------------------

GRAMMAR = """\
fault specs (options after the first may come in any order; ':all' also faults 1-D parameters):
  int<B>[:channel|:tensor|:g<G>]        weights quantized to B = 2..8 bits, per output channel by default,
                                        or per tensor, or in groups of G inputs (int8, int4:g32, int4:tensor)
  bf16 | fp16 | fp8_e4m3 | fp8_e5m2     weights cast to that format (saturating)
  flip:<RATE>[:<FORMAT>][:<BITS>]       each stored bit flips with probability RATE in [0, 1] (flip:1e-6)
  flips:<COUNT>[:<FORMAT>][:<BITS>]     exactly COUNT flips in COUNT distinct weights (flips:10:int8)
  flip-worst:<COUNT>[:<FORMAT>][:<BITS>] the COUNT flips of largest first-order loss increase (flip-worst:10:mantissa)
  prune:<SPARSITY>[:global|:tensor]     the SPARSITY share of smallest |w| set to 0, across the group or per tensor
  FORMAT: fp32 | bf16 | fp16 | int8 (default: the parameters' dtype)
  BITS: any | sign | exponent | mantissa | b<i>[,<j>...] (bit positions, 0 = least significant)"""


@dataclass(frozen=True)
class Fault:
    """A parsed fault spec: ``values``/``deltas`` apply it to a list of tensors.

    ``name`` is the spec as given, ``label`` a human phrase ("int4 weights, group 32"),
    ``stochastic`` whether draws differ by ``generator`` (the probe repeats those over
    ``trials``), ``uses_grads`` whether ``grads`` is needed (worst-case flips).  Tensors with fewer
    than 2 dimensions (biases, norm weights) are left as they are unless ``include_1d``
    (``:all``): deployments quantize, cast and prune the weight matrices.
    """

    name: str
    label: str
    stochastic: bool
    uses_grads: bool
    include_1d: bool
    _apply: Callable[[list[Tensor], list[Tensor], torch.Generator | None], list[Tensor]] = field(
        repr=False, compare=False
    )
    #: ``"quantize"``, ``"cast"``, ``"flip"`` (a rate), ``"flips"`` (a count), ``"flip-worst"`` or ``"prune"``
    kind: str = ""
    #: the parsed options: ``bits``/``granularity`` (quantize), ``dtype`` (cast), ``rate``/``count``, ``bits``,
    #: ``format`` (flips), ``sparsity``/``scope`` (prune)
    settings: dict[str, Any] = field(default_factory=dict, compare=False)

    def targets(self, t: Tensor) -> bool:
        """Whether this fault changes ``t`` (weight matrices, or every tensor with ``:all``)."""
        return self.include_1d or t.dim() >= 2

    def values(
        self, tensors: Tensors, grads: Tensors | None = None, generator: torch.Generator | None = None
    ) -> list[Tensor]:
        """The faulty weights ``w'``: new tensors, bit-exact in the stored format (untargeted tensors
        come back as given, detached, not copied)."""
        return self._values(_check_tensors(tensors), grads, generator)

    def deltas(
        self, tensors: Tensors, grads: Tensors | None = None, generator: torch.Generator | None = None
    ) -> list[Tensor]:
        """``w' - w`` (zeros for untargeted tensors); see the module docstring on its exactness."""
        tensors = _check_tensors(tensors)
        return _deltas(tensors, self._values(tensors, grads, generator))

    def _values(self, tensors: list[Tensor], grads: Tensors | None, generator: torch.Generator | None) -> list[Tensor]:
        if self.uses_grads:
            if grads is None:
                raise ValueError(f"fault {self.name!r} needs grads")
            grads = _check_tensors(grads, "grads")
            if [g.shape for g in grads] != [w.shape for w in tensors]:
                raise ValueError("grads must have the shapes of tensors")
        hit = [i for i, t in enumerate(tensors) if self.targets(t)]
        out = list(tensors)
        if hit:
            faulty = self._apply(
                [tensors[i] for i in hit], [grads[i] for i in hit] if self.uses_grads else [], generator
            )
            for i, v in zip(hit, faulty):
                out[i] = v
        return out


def _bad_spec(spec: str, why: str) -> ValueError:
    return ValueError(f"fault spec {spec!r}: {why}\n{GRAMMAR}")


def _number(spec: str, text: str, what: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise _bad_spec(spec, f"{what} must be {'an int' if kind is int else 'a number'}, got {text!r}") from None


def _flip_options(spec: str, options: list[str]) -> tuple[Format, Bits, str]:
    """FORMAT and BITS options of a flip spec, and the label's suffix."""
    format: Format = None
    bits: Bits = "any"
    for option in options:
        if option in FORMATS or option in _FORMAT_ALIASES:
            format = check_format(option)
        elif option in _BIT_CLASSES:
            bits = option
        elif re.fullmatch(r"b\d+(,\d+)*", option):
            bits = [int(b) for b in option[1:].split(",")]
        else:
            raise _bad_spec(spec, f"unknown option {option!r}")
    name = {None: "", "int8": "int8"}.get(format, str(format).removeprefix("torch."))
    chosen = f"{bits} bits" if isinstance(bits, str) else "bits " + ", ".join(map(str, bits))
    where = ", ".join(x for x in (chosen if bits != "any" else "", f"{name} storage" if name else "") if x)
    return format, bits, f" ({where})" if where else ""


def parse_fault(spec: str) -> Fault:
    """The :class:`Fault` a spec names (grammar in ``GRAMMAR``); ``ValueError`` listing the grammar otherwise.

    Every option is validated here (rates, counts, bit positions, formats), so a bad spec fails
    before any model is run.
    """
    if not isinstance(spec, str):
        raise TypeError(f"a fault spec must be a str, got {type(spec).__name__}")
    name = spec.strip()
    head, *options = name.lower().split(":")
    include_1d = bool(options) and options[-1] == "all"
    if include_1d:
        options.pop()
    suffix = ", incl. 1-D parameters" if include_1d else ""

    def make(
        label: str, apply: Callable, kind: str, stochastic: bool = False, uses_grads: bool = False, **settings: Any
    ) -> Fault:
        return Fault(name, label + suffix, stochastic, uses_grads, include_1d, apply, kind, settings)

    if match := re.fullmatch(r"int(\d+)", head):
        bits = int(match[1])
        if not 2 <= bits <= 8:
            raise _bad_spec(spec, f"bits must be in 2..8, got {bits}")
        if len(options) > 1:
            raise _bad_spec(spec, "a quantization spec takes one granularity option")
        option = options[0] if options else "channel"
        if option in ("channel", "tensor"):
            granularity: str | int = option
            label = f"int{bits} weights, per {option}"
        elif re.fullmatch(r"g\d+", option) and int(option[1:]) >= 1:
            granularity = int(option[1:])
            label = f"int{bits} weights, group {granularity}"
        else:
            raise _bad_spec(spec, f"granularity must be channel, tensor or g<G> with G >= 1, got {option!r}")
        return make(
            label,
            lambda ts, gs, gen: [_quantized(w, bits, granularity) for w in ts],
            "quantize",
            bits=bits,
            granularity=granularity,
        )
    if head in CAST_DTYPES:
        if options:
            raise _bad_spec(spec, f"a cast takes no options, got {options}")
        dtype = CAST_DTYPES[head]
        label = f"{str(dtype).removeprefix('torch.').removesuffix('fn')} weights"
        return make(
            label, lambda ts, gs, gen: [_saturated(w, dtype).to(w.dtype, copy=True) for w in ts], "cast", dtype=dtype
        )
    if head in ("flip", "flips", "flip-worst"):
        if not options:
            raise _bad_spec(spec, f"{head} needs a {'rate' if head == 'flip' else 'count'}")
        number, *rest = options
        format, bits, where = _flip_options(spec, rest)
        if head == "flip":
            rate = _number(spec, number, "the flip rate", float)
            if not 0 <= rate <= 1:
                hint = f" (for {number} flips write flips:{number})" if rate > 1 else ""
                raise _bad_spec(spec, f"the flip rate must be in [0, 1], got {number}{hint}")
            _check_layouts(spec, format, bits)
            return make(
                f"random bit flips{where}, rate {rate:g}",
                lambda ts, gs, gen: _flipped(ts, rate, None, bits, format, gen),
                "flip",
                stochastic=True,
                rate=rate,
                bits=bits,
                format=format,
            )
        count = _number(spec, number, "the flip count", int)
        if count < 0:
            raise _bad_spec(spec, f"the flip count must be >= 0, got {count}")
        _check_layouts(spec, format, bits)
        if head == "flips":
            return make(
                f"{count} random bit flips{where}",
                lambda ts, gs, gen: _flipped(ts, None, count, bits, format, gen),
                "flips",
                stochastic=True,
                count=count,
                bits=bits,
                format=format,
            )
        return make(
            f"{count} worst bit flips{where}",
            lambda ts, gs, gen: _worst_flipped(ts, gs, count, bits, format),
            "flip-worst",
            uses_grads=True,
            count=count,
            bits=bits,
            format=format,
        )
    if head == "prune":
        if not options or len(options) > 2:
            raise _bad_spec(spec, "prune takes a sparsity and optionally global or tensor")
        sparsity = _number(spec, options[0], "the sparsity", float)
        if not 0 <= sparsity < 1:
            raise _bad_spec(spec, f"the sparsity must be in [0, 1), got {options[0]}")
        scope = options[1] if len(options) == 2 else "global"
        if scope not in ("global", "tensor"):
            raise _bad_spec(spec, f"the pruning scope must be global or tensor, got {scope!r}")
        label = f"{100 * sparsity:g}% magnitude pruning" + (", per tensor" if scope == "tensor" else "")
        return make(label, lambda ts, gs, gen: _pruned(ts, sparsity, scope), "prune", sparsity=sparsity, scope=scope)
    raise _bad_spec(spec, f"unknown fault {head!r}")


def _check_layouts(spec: str, format: Format, bits: Bits) -> None:
    """Refuse bits a flip spec's format cannot have, before any tensor is seen."""
    try:  # with the parameters' own dtype, positions are checked against float32 here and the dtype later
        _LAYOUTS[torch.float32 if format is None else format].positions(bits)
    except ValueError as error:
        raise _bad_spec(spec, str(error)) from None
