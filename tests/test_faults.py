"""Fault models: each one's defining property, bit-exact in the stored format, the torchao cross-check, seeds, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from acr_optim.faults import (
    CAST_DTYPES,
    GRAMMAR,
    bit_flip_error,
    cast_error,
    parse_fault,
    pruning_error,
    quantization_error,
    worst_bit_flips,
)

INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.int8: torch.int8}
EXPONENT = {torch.float32: 0x7F800000, torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(INT[t.dtype]).long() & ((1 << (8 * t.element_size())) - 1)


def popcount(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor([int(v).bit_count() for v in x])


def weights(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)


def int8_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 codes of torchao's symmetric scheme, computed here independently, and the row scales."""
    rows = w.reshape(w.shape[0], -1).float()
    scale = (rows.abs().amax(1, keepdim=True) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
    return (rows * (1.0 / scale)).round().clamp(-128, 127).to(torch.int8), scale


# -- quantization ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    rows=st.integers(1, 5),
    groups=st.integers(1, 4),
    size=st.sampled_from([1, 4, 8]),
    granularity=st.sampled_from(["tensor", "channel", "group"]),
    seed=st.integers(0, 2**16),
)
def test_quantization_lands_on_the_grid_within_half_a_step(bits, rows, groups, size, granularity, seed):
    w = weights(rows, groups * size, seed=seed)
    w[0, 0] = 0.0
    g = size if granularity == "group" else granularity
    d = quantization_error([w], bits, g)[0]
    faulty = w + d
    assert torch.equal(faulty - w, d)  # the delta carries the quantized value exactly
    shape = {"tensor": (1, 1, -1), "channel": (rows, 1, -1), "group": (rows, groups, size)}[granularity]
    blocks, errors = w.reshape(shape), d.reshape(shape)
    scale = (blocks.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 0.5)).clamp(min=torch.finfo(w.dtype).tiny)
    codes = (faulty.reshape(shape).double() / scale.double()).round().float()
    assert torch.equal(faulty.reshape(shape), codes * scale)  # w' = q s, q an integer
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    assert (errors.abs() <= scale / 2 * (1 + 2**-14)).all()  # s/2, up to the rounding of s = max|w| / half
    assert len(codes.unique()) <= 2**bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("bits", "granularity"), [(8, "channel"), (8, "tensor"), (8, 32), (4, "channel"), (4, 32), (2, 16)]
)
def test_quantization_equals_torchao_dequantized_weights(bits, granularity, dtype):
    quantization = pytest.importorskip("torchao.quantization")
    if bits == 8:
        kind = {"channel": quantization.PerRow(), "tensor": quantization.PerTensor()}
        config = quantization.Int8WeightOnlyConfig(granularity=kind.get(granularity) or quantization.PerGroup(32))
    else:
        kind = quantization.PerAxis(0) if granularity == "channel" else quantization.PerGroup(granularity)
        config = quantization.IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=kind)
    linear = torch.nn.Linear(64, 8, bias=False).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(weights(8, 64, dtype=dtype))
        linear.weight[0] = 0  # a zero row and a tiny row hit the scale floors
        linear.weight[1] *= 1e-4
    w = linear.weight.detach().clone()
    quantization.quantize_(linear, config)
    assert torch.equal(quantization_error([w], bits, granularity)[0], linear.weight.dequantize() - w)


def test_quantization_refuses_groups_that_do_not_divide_a_row():
    with pytest.raises(ValueError, match="granularity .*32 must divide the row length 48"):
        quantization_error([torch.zeros(4, 48)], 4, 32)


# -- casts ----------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(-400, 400, width=32), min_size=1, max_size=20))
def test_cast_error_is_the_round_trip_in_range(values):
    w = torch.tensor(values)
    for dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2):
        d = cast_error([w], dtype)[0]
        assert torch.equal(d, w.to(dtype).to(torch.float32) - w)
        assert torch.equal(w + d, w.to(dtype).to(torch.float32))


def test_cast_saturates_at_the_largest_finite_value_and_keeps_nan():
    w = torch.tensor([[1e6, -1e6, 3e38, float("nan"), 1.0]])
    for name, limit in (("fp16", 65504.0), ("fp8_e4m3", 448.0), ("fp8_e5m2", 57344.0), ("bf16", 3.3895313892515355e38)):
        faulty = parse_fault(name).values([w])[0][0]
        expected = torch.tensor([1e6, -1e6, 3e38]).clamp(-limit, limit).to(CAST_DTYPES[name]).float()
        assert torch.equal(faulty[:3], expected), name
        assert faulty[3].isnan() and faulty[4] == 1.0
        assert torch.equal(cast_error([w], name)[0][0, :3], faulty[:3] - w[0, :3])  # rounded once: 3e38 is far


# -- bit flips ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "format", "stored"),
    [
        (torch.float32, None, torch.float32),
        (torch.bfloat16, None, torch.bfloat16),
        (torch.float32, "float16", torch.float16),
        (torch.float32, "bfloat16", torch.bfloat16),
    ],
)
@pytest.mark.parametrize("count", [0, 1, 7, 60])
def test_count_flips_change_exactly_count_weights_by_one_stored_bit(dtype, format, stored, count):
    ws = [weights(6, 5, dtype=dtype), weights(30, seed=1, dtype=dtype)]
    values = parse_fault(f"flips:{count}:{format or 'any'}:all").values(ws, generator=torch.Generator().manual_seed(3))
    changed = 0
    for w, v in zip(ws, values):
        assert v.dtype == w.dtype and v.shape == w.shape
        diff = bits_of(w.to(stored)) ^ bits_of(v.to(stored))
        assert torch.equal(v, v.to(stored).to(dtype))  # the faulty value is the stored one, read back exactly
        assert (popcount(diff[diff != 0]) == 1).all()
        changed += int((diff != 0).sum())
    assert changed == count


def test_int8_storage_flips_one_bit_of_the_codes_and_includes_the_quantization_error():
    w = weights(8, 16)
    d = bit_flip_error([w], count=5, format="int8", generator=torch.Generator().manual_seed(0))[0]
    codes, scale = int8_codes(w)
    faulty_codes = ((w + d).double() / scale.double()).round().to(torch.int8)
    assert torch.equal(w + d, faulty_codes.float() * scale)  # still on the int8 grid of every row
    diff = bits_of(codes) ^ bits_of(faulty_codes)
    assert int((diff != 0).sum()) == 5 and (popcount(diff[diff != 0]) == 1).all()
    unflipped = (diff == 0).reshape(w.shape)
    assert torch.equal((w + d)[unflipped], (w + quantization_error([w], 8)[0])[unflipped])


@pytest.mark.parametrize(
    ("bits", "allowed"),
    [("sign", 1 << 31), ("exponent", 0x7F800000), ("mantissa", (1 << 23) - 1), ("b0,5,30", 1 | 1 << 5 | 1 << 30)],
)
def test_flips_stay_in_the_selected_bits(bits, allowed):
    w = weights(50, 40)
    faulty = parse_fault(f"flip:0.05:{bits}").values([w], generator=torch.Generator().manual_seed(1))[0]
    diff = bits_of(w) ^ bits_of(faulty)
    assert diff.any() and not (diff & ~allowed).any()


def test_rate_one_flips_every_selected_bit_and_rate_zero_none():
    w = weights(7, 9)
    faulty = parse_fault("flip:1:b0,3").values([w])[0]
    assert (bits_of(w) ^ bits_of(faulty) == 0b1001).all()
    assert not bit_flip_error([w], rate=0.0, generator=torch.Generator().manual_seed(0))[0].any()


def test_rate_flips_number_about_rate_times_the_stored_bits():
    w = [weights(100, 100), weights(5000, seed=2)]
    slots = (10_000 + 5000) * 32
    counts = []
    for seed in range(20):
        values = parse_fault("flip:1e-3:all").values(w, generator=torch.Generator().manual_seed(seed))
        diffs = [bits_of(a) ^ bits_of(b) for a, b in zip(w, values)]
        counts.append(sum(int(popcount(diff[diff != 0]).sum()) for diff in diffs))
    mean, sd = 1e-3 * slots, math.sqrt(1e-3 * slots)
    assert abs(sum(counts) / 20 - mean) < 5 * sd / math.sqrt(20)


def test_flips_are_reproducible_from_the_generator():
    w = [weights(20, 30), weights(100, seed=1)]
    for spec in ("flip:1e-3", "flips:25:int8", "flip:1e-2:bf16:exponent"):
        first, again, other = (
            parse_fault(spec).values(w, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)
        )
        assert all(torch.equal(bits_of(a), bits_of(b)) for a, b in zip(first, again))
        assert not all(torch.equal(bits_of(a), bits_of(b)) for a, b in zip(first, other))


def test_a_flip_to_inf_or_nan_is_returned_as_a_real_fault_would_leave_it():
    w = torch.tensor([[1.5, 1.0]])  # exponent 127: setting bit 30 makes the exponent all ones
    faulty = parse_fault("flips:2:b30").values([w])[0]
    assert faulty[0, 0].isnan() and faulty[0, 1].isinf()


def test_deltas_of_far_flips_round_but_values_are_exact():
    w = torch.tensor([[3.0, 0.75]])
    faulty = parse_fault("flips:2:b30").values([w])[0]  # 3.0 drops to a subnormal, 0.75 jumps to 2^127
    assert torch.equal(bits_of(faulty) ^ bits_of(w), torch.tensor([1 << 30, 1 << 30]))
    d = bit_flip_error([w], count=2, bits=[30])[0]
    assert torch.equal(d, faulty - w)
    assert (w + d)[0, 0] == 0 != faulty[0, 0]  # w + (w' - w) rounds: why the probe writes w' itself
    assert (w + d)[0, 1] == faulty[0, 1]


# -- pruning --------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.lists(st.integers(-3, 3), min_size=1, max_size=12), min_size=1, max_size=3),
    sparsity=st.sampled_from([0.0, 0.1, 0.29, 0.5, 0.7, 0.9, 0.99]),
    scope=st.sampled_from(["global", "tensor"]),
)
def test_pruning_zeros_exactly_the_smallest_magnitudes_ties_to_the_lowest_index(data, sparsity, scope):
    ws = [torch.tensor(x, dtype=torch.float32) / 4 for x in data]
    ds = pruning_error(ws, sparsity, scope)
    parts = [torch.cat([w.abs() for w in ws])] if scope == "global" else [w.abs() for w in ws]
    expected = []
    for keys in parts:
        k = math.floor(round(sparsity * 100) * keys.numel() / 100)
        mask = torch.zeros(keys.numel(), dtype=torch.bool)
        mask[torch.sort(keys, stable=True).indices[:k]] = True
        expected.append(mask)
    expected, w = torch.cat(expected), torch.cat(ws)
    assert torch.equal(torch.cat(ds), torch.where(expected, -w, 0.0))
    assert torch.equal(w + torch.cat(ds), torch.where(expected, 0.0, w))


def test_pruning_count_is_the_decimal_floor_and_nan_counts_as_largest():
    w = weights(100)
    assert int((w + pruning_error([w], 0.29)[0] == 0).sum()) == 29  # 0.29 * 100 is 28.999... in binary
    w = torch.tensor([float("nan"), 1.0, -2.0, 0.5])
    assert torch.equal(w[1:] + pruning_error([w], 0.75)[0][1:], torch.tensor([0.0, 0.0, 0.0]))
    big = weights(300_000, seed=5)  # large enough for the sampled threshold path
    faulty = big + pruning_error([big], 0.37)[0]
    assert int((faulty == 0).sum()) == 111_000
    assert faulty[faulty != 0].abs().min() >= big[faulty == 0].abs().max()


# -- worst-case flips -----------------------------------------------------------------------------


def brute_force_best(w: torch.Tensor, g: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Every single flip of every weight (float32 storage), the best first-order gain per weight."""
    codes = w.reshape(-1).view(torch.int32)
    gains = []
    for b in positions:
        mask = -(1 << 31) if b == 31 else 1 << b
        faulty = (codes ^ mask).view(torch.float32)
        gain = g.reshape(-1) * (faulty - w.reshape(-1))
        gains.append(gain.nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf))
    return torch.stack(gains).amax(0)


@pytest.mark.parametrize(
    ("bits", "positions"),
    [
        ("any", list(range(32))),
        ("mantissa", list(range(23))),
        ("sign", [31]),
        ([0, 4], [0, 4]),
        ("exponent", list(range(23, 31))),
    ],
)
@pytest.mark.parametrize("count", [1, 5, 40])
def test_worst_flips_are_the_best_single_flips_found_by_brute_force(bits, positions, count):
    w = torch.cat([weights(60, seed=4), torch.tensor([1.5, -1.25, 0.0, -0.0, 3e38, 1e-40])]).reshape(6, 11)
    g = weights(6, 11, seed=9) * 100
    g[0, :3] = 0
    d = worst_bit_flips([w], [g], count, bits=bits)[0]
    spec = f"flip-worst:{count}:{bits if isinstance(bits, str) else 'b' + ','.join(map(str, bits))}"
    faulty = parse_fault(spec).values([w], [g])[0]
    assert torch.equal(bits_of(d), bits_of(faulty - w))
    diff = bits_of(w) ^ bits_of(faulty)
    assert int((diff != 0).sum()) == count and (popcount(diff[diff != 0]) == 1).all()
    best = brute_force_best(w, g, positions)
    gains = (g.reshape(-1) * (faulty.reshape(-1) - w.reshape(-1))).nan_to_num(
        nan=math.inf, posinf=math.inf, neginf=-math.inf
    )[diff != 0]
    assert torch.equal(gains.sort(descending=True).values, best.sort(descending=True).values[:count])


def test_worst_flips_in_int8_storage_follow_the_codes():
    w, g = weights(4, 8), weights(4, 8, seed=1)
    codes, scale = int8_codes(w)
    d = worst_bit_flips([w], [g], 3, format="int8")[0]
    faulty = ((w + d).double() / scale.double()).round().to(torch.int8)
    diff = bits_of(codes) ^ bits_of(faulty)
    assert int((diff != 0).sum()) == 3
    base = codes.float() * scale
    gains = []
    for b in range(8):
        flipped = (codes ^ torch.tensor(-128 if b == 7 else 1 << b, dtype=torch.int8)).float() * scale
        gains.append((g.reshape(4, -1) * (flipped - base)).reshape(-1))
    best = torch.stack(gains).amax(0).sort(descending=True).values[:3]
    chosen = (g.reshape(4, -1) * (faulty.float() * scale - base)).reshape(-1)[diff != 0]
    assert torch.equal(chosen.sort(descending=True).values, best)


@settings(max_examples=30, deadline=None)
@given(count=st.integers(0, 40), seed=st.integers(0, 2**16), fmt=st.sampled_from(["float32", "int8", "bfloat16"]))
def test_worst_flips_beat_random_flips_to_first_order(count, seed, fmt):
    bits = "any" if fmt == "int8" else "mantissa"
    ws, gs = [weights(5, 8, seed=seed), weights(8, 3, seed=seed + 1)], [weights(5, 8, seed=seed + 2), weights(8, 3)]
    worst = worst_bit_flips(ws, gs, count, bits=bits, format=fmt)
    rand = bit_flip_error(ws, count=count, bits=bits, format=fmt, generator=torch.Generator().manual_seed(seed))
    gain = [sum(float((g.double() * d.double()).sum()) for g, d in zip(gs, ds)) for ds in (worst, rand)]
    assert gain[0] >= gain[1] - 1e-9


# -- specs and bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "label", "stochastic"),
    [
        ("int8", "int8 weights, per channel", False),
        ("int4:g32", "int4 weights, group 32", False),
        ("int4:tensor", "int4 weights, per tensor", False),
        ("bf16", "bfloat16 weights", False),
        ("fp8_e4m3", "float8_e4m3 weights", False),
        ("flip:1e-6", "random bit flips, rate 1e-06", True),
        ("flip:1e-3:int8", "random bit flips (int8 storage), rate 0.001", True),
        ("flips:10:sign", "10 random bit flips (sign bits)", True),
        ("flip-worst:10:mantissa", "10 worst bit flips (mantissa bits)", False),
        ("prune:0.5", "50% magnitude pruning", False),
        ("prune:0.3:tensor:all", "30% magnitude pruning, per tensor, incl. 1-D parameters", False),
    ],
)
def test_specs_parse_to_labelled_faults(spec, label, stochastic):
    fault = parse_fault(spec)
    assert (fault.name, fault.label, fault.stochastic) == (spec, label, stochastic)


def test_faults_leave_1d_tensors_alone_unless_all():
    w, b = weights(4, 4), weights(4, seed=1)
    assert torch.equal(parse_fault("int4").values([w, b])[1], b)
    assert not parse_fault("int4").deltas([w, b])[1].any()
    assert parse_fault("int4:all").deltas([w, b])[1].any()


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("int9", "bits must be in 2..8"),
        ("int4:g0", "granularity must be"),
        ("int4:g8:tensor", "one granularity option"),
        ("bf16:x", "a cast takes no options"),
        ("flip", "needs a rate"),
        ("flip:10", r"flip rate must be in \[0, 1\].*flips:10"),
        ("flip:abc", "must be a number"),
        ("flips:1.5", "must be an int"),
        ("flips:-1", "must be >= 0"),
        ("flips:3:b32", r"distinct bit positions in 0\.\.31"),
        ("flips:3:int8:exponent", "needs a float format"),
        ("flips:3:nibble", "unknown option 'nibble'"),
        ("prune:1", r"sparsity must be in \[0, 1\)"),
        ("prune:0.5:layer", "global or tensor"),
        ("quantize", "unknown fault"),
    ],
)
def test_bad_specs_are_refused_with_the_grammar(spec, match):
    with pytest.raises(ValueError, match=match) as info:
        parse_fault(spec)
    assert GRAMMAR in str(info.value)


W = [weights(4, 8)]
G = [weights(4, 8, seed=1)]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: quantization_error(W, 1), ValueError, r"bits must be in 2\.\.8"),
        (lambda: quantization_error(W, 4.0), TypeError, "bits must be an int"),
        (lambda: quantization_error(W, 4, "row"), ValueError, "granularity must be"),
        (lambda: quantization_error([torch.zeros(3, dtype=torch.int32)], 4), TypeError, "tensors must be float"),
        (lambda: cast_error(W, torch.float32), ValueError, "dtype must be one of"),
        (lambda: bit_flip_error(W), ValueError, "exactly one of rate"),
        (lambda: bit_flip_error(W, rate=0.1, count=1), ValueError, "exactly one of rate"),
        (lambda: bit_flip_error(W, rate=1.5), ValueError, r"rate must be in \[0, 1\]"),
        (lambda: bit_flip_error(W, count=-1), ValueError, "count must be >= 0"),
        (lambda: bit_flip_error(W, count=33), ValueError, r"count must be <= the number of weights \(32\)"),
        (lambda: bit_flip_error(W, count=1, bits="nibble"), ValueError, "bits must be one of"),
        (lambda: bit_flip_error(W, count=1, bits=[32]), ValueError, "bits must be one of"),
        (lambda: bit_flip_error(W, count=1, format="int4"), ValueError, "format must be None or one of"),
        (lambda: bit_flip_error(W, count=1, format="int8", bits="mantissa"), ValueError, "needs a float format"),
        (lambda: bit_flip_error([W[0].half()], count=1, format="bfloat16"), ValueError, "cannot store"),
        (lambda: pruning_error(W, 1.0), ValueError, r"sparsity must be in \[0, 1\)"),
        (lambda: pruning_error(W, 0.5, "layer"), ValueError, "scope must be"),
        (lambda: worst_bit_flips(W, G, 33), ValueError, r"count must be <= the number of weights"),
        (lambda: worst_bit_flips(W, [torch.zeros(3)], 1), ValueError, "grads must have the shapes"),
        (lambda: parse_fault("flip-worst:1").values(W), ValueError, "needs grads"),
    ],
)
def test_bad_input_is_refused_with_its_name(call, error, match):
    with pytest.raises(error, match=match):
        call()
