"""Fault-shaped corruption sets in ACR: the worst case of each box is the first-order optimum over the box
(brute force over its vertices), stays inside it, ``actual`` writes ``fault(w)`` bit for bit, the worst
flips are the best K-subset, steps restore bitwise, and bad input stops with one error naming the argument."""

import functools
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from acr_optim import ACR, parse_fault
from acr_optim.fault_sets import fault_set
from acr_optim.faults import cast_step, quantization_step


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(12, 8, generator=gen), torch.randint(0, 3, (12,), generator=gen)


def backward(net, x, y):
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    return loss


def perturbed_weights(spec, mode="worst", radius=1.0, seed=0):
    """The weights of :func:`model` inside ``perturbed()``, the clean ones, and their gradients."""
    net = model(seed)
    acr = ACR(torch.optim.SGD(net.parameters(), lr=0.1), fault=spec, fault_mode=mode, fault_radius=radius)
    backward(net, *batch())
    clean = [p.detach().clone() for p in net.parameters()]
    grads = [p.grad.clone() for p in net.parameters()]
    with acr.perturbed() as active:
        assert active
        inside = [p.detach().clone() for p in net.parameters()]
        gain = acr.last_first_order_gain
    assert all(torch.equal(p, c) for p, c in zip(net.parameters(), clean))  # restored bit for bit
    return inside, clean, grads, gain


def corrupt(spec, mode, w, g):
    """``w + a`` for one tensor, the set's ``apply_`` on a copy."""
    corrupted = w.clone()
    fault_set(spec, mode, 1.0).apply_([corrupted], [g])
    return corrupted


def box_step(spec, w):
    fault = parse_fault(spec)
    if fault.kind == "quantize":
        return quantization_step(w, fault.settings["bits"], fault.settings["granularity"])
    return cast_step(w, fault.settings["dtype"])


@given(
    values=st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=8, max_size=8),
    grads=st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=8, max_size=8),
    spec=st.sampled_from(["int4", "int3:g2", "int2:tensor", "bf16", "fp8_e4m3"]),
)
@settings(max_examples=60, deadline=None)
def test_worst_box_corruption_is_the_best_vertex_and_inside_the_box(values, grads, spec):
    w, g = torch.tensor(values).view(2, 4), torch.tensor(grads).view(2, 4)
    a = corrupt(spec, "worst", w, g).double() - w.double()
    half = box_step(spec, w).double() / 2
    v = w.double() + a
    assert (a.abs() <= half + torch.finfo(w.dtype).eps * v.abs()).all()  # w + a rounds once, in w's dtype
    best = max(
        (torch.tensor(signs).view(2, 4).double() * half * g.double()).sum().item()
        for signs in itertools.product((-1.0, 1.0), repeat=8)
    )
    assert (a * g.double()).sum().item() == pytest.approx(best, rel=1e-5, abs=1e-9)


def test_quantization_and_cast_errors_lie_in_their_boxes():
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(0)) * 3
    for spec in ("int8", "int4:g8", "int3:tensor", "int2", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2"):
        error = parse_fault(spec).deltas([w])[0]
        # w' = q s is rounded once in float32: the box holds up to one ulp of w
        assert (error.abs() <= box_step(spec, w) / 2 + torch.finfo(w.dtype).eps * w.abs()).all(), spec


@pytest.mark.parametrize("spec", ["int4:g8", "int8", "bf16", "prune:0.5", "flip-worst:3:int8"])
def test_actual_writes_the_faulty_weights_bit_for_bit(spec):
    inside, clean, grads, _ = perturbed_weights(spec, "actual")
    fault = parse_fault(spec)
    expected = fault.values(clean, grads if fault.uses_grads else None)
    assert all(torch.equal(a, b) for a, b in zip(inside, expected))
    assert torch.equal(inside[1], clean[1]) and torch.equal(inside[3], clean[3])  # biases: not targeted without :all


@pytest.mark.parametrize("spec", ["int4:g8", "fp16"])
@pytest.mark.parametrize("radius", [1.0, 0.25])
def test_worst_and_random_boxes_at_a_radius(spec, radius):
    inside, clean, grads, gain = perturbed_weights(spec, "worst", radius)
    for w, v, g in zip(clean[::2], inside[::2], grads[::2]):
        half = box_step(spec, w) / 2 * radius
        rounding = torch.finfo(w.dtype).eps * v.double().abs()  # w + a rounds once, to the float nearest it
        assert ((v.double() - w.double()) - half.double() * g.sign()).abs().le(rounding).all()
    expected = sum(
        (box_step(spec, w).double() / 2 * radius * g.double().abs()).sum().item()
        for w, g in zip(clean[::2], grads[::2])
    )
    assert gain == pytest.approx(expected, rel=1e-5)
    torch.manual_seed(3)
    inside, clean, _, _ = perturbed_weights(spec, "random", radius)
    for w, v in zip(clean[::2], inside[::2]):
        half = box_step(spec, w) / 2 * radius
        rounding = torch.finfo(w.dtype).eps * v.double().abs()
        assert ((v.double() - w.double()).abs() - half.double()).abs().le(rounding).all()  # on the box's surface
        assert 0.3 < (v > w).float().mean() < 0.7  # random signs


def test_worst_flips_are_the_best_k_subset_of_single_flips():
    inside, clean, grads, _ = perturbed_weights("flips:2:int8", "worst")
    assert all(torch.equal(a, b) for a, b in zip(inside, parse_fault("flip-worst:2:int8").values(clean, grads)))
    # brute force on one int8 row of 5 weights: every pair of single-bit flips in two distinct weights
    gen = torch.Generator().manual_seed(3)
    w, g = torch.randn(1, 5, generator=gen), torch.randn(1, 5, generator=gen)
    step = quantization_step(w, 8, "channel")
    dequantized = parse_fault("int8").values([w])[0]
    codes = (dequantized / step).round().long()

    def flipped(i, bit):
        code = ((int(codes[0, i]) & 0xFF) ^ (1 << bit)) - (
            256 if ((int(codes[0, i]) & 0xFF) ^ (1 << bit)) >= 128 else 0
        )
        return code * step[0, i].item()

    single = {
        (i, bit): g[0, i].item() * (flipped(i, bit) - dequantized[0, i].item()) for i in range(5) for bit in range(8)
    }
    best = max(single[a] + single[b] for a, b in itertools.combinations(single, 2) if a[0] != b[0])
    a = corrupt("flips:2:int8", "worst", w, g) - dequantized
    assert int((a != 0).sum()) == 2
    assert (a * g).sum().item() == pytest.approx(best, rel=1e-5)


def test_random_flips_are_a_draw_of_the_fault_and_restore_bitwise():
    torch.manual_seed(5)
    inside, clean, _, _ = perturbed_weights("flips:4:int8", "random")
    changed = sum(int((a != c).sum()) for a, c in zip(inside, clean))
    quantized = parse_fault("int8").values(clean)
    moved = sum(int((a != q).sum()) for a, q in zip(inside, quantized))
    assert changed > 4 and moved == 4  # int8 storage: every weight quantized, then 4 of them flipped


def test_training_restores_exactly_and_alpha_zero_is_the_base_bit_for_bit():
    results = []
    for alpha, spec in ((0.0, "int4:g8"), (None, None), (0.5, "int4:g8")):
        net = model()
        base = torch.optim.AdamW(net.parameters(), lr=1e-2)
        optimizer = base if alpha is None else ACR(base, alpha=alpha, fault=spec)
        for step in range(5):
            x, y = batch(step)
            optimizer.zero_grad()
            optimizer.step(functools.partial(backward, net, x, y))
        results.append([p.detach().clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1]))
    assert not all(torch.equal(a, b) for a, b in zip(results[2], results[1]))


def test_actual_with_alpha_one_is_quantization_aware_training_with_a_straight_through_gradient():
    net, reference = model(), model()
    acr = ACR(torch.optim.SGD(net.parameters(), lr=0.1), alpha=1.0, fault="int4:g8", fault_mode="actual")
    plain = torch.optim.SGD(reference.parameters(), lr=0.1)
    fault = parse_fault("int4:g8")
    for step in range(3):
        x, y = batch(step)
        acr.zero_grad()
        acr.step(functools.partial(backward, net, x, y))
        # the reference: the gradient at the quantized weights, applied to the float weights
        plain.zero_grad()
        floats = [p.detach().clone() for p in reference.parameters()]
        with torch.no_grad():
            for p, v in zip(reference.parameters(), fault.values(floats)):
                p.copy_(v)
        backward(reference, x, y)
        with torch.no_grad():
            for p, w in zip(reference.parameters(), floats):
                p.copy_(w)
        plain.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), reference.parameters()))


def test_param_groups_may_carry_their_own_fault_and_lp_stays_the_default():
    net = model()
    weights, biases = [net[0].weight, net[2].weight], [net[0].bias, net[2].bias]
    acr = ACR(
        torch.optim.SGD(
            [{"params": weights, "acr_fault": "int8", "acr_fault_mode": "actual"}, {"params": biases}], lr=0.1
        ),
        eps=0.1,
    )
    backward(net, *batch())
    clean = [p.detach().clone() for p in weights + biases]
    with acr.perturbed():
        assert all(torch.equal(p, q) for p, q in zip(weights, parse_fault("int8").values(clean[:2])))
        moved = torch.cat([(p - c).flatten() for p, c in zip(biases, clean[2:])])
        assert moved.norm().item() == pytest.approx(0.1, rel=1e-5)  # the biases: the L2 ball of eps 0.1
    state = acr.state_dict()
    assert state["param_groups"][0]["acr_fault"] == "int8" and state["param_groups"][1]["acr_fault"] is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fault": "int9"}, "bits must be in 2..8"),
        ({"fault": "zap"}, "unknown fault 'zap'"),
        ({"fault": "int4", "fault_mode": "best"}, "fault_mode must be one of 'worst', 'actual', 'random'"),
        ({"fault": "int4", "fault_radius": 0}, "fault_radius must be finite and > 0"),
        ({"fault": "flips:3:int8", "fault_radius": 0.5}, "fault_radius scales the half-step box"),
        ({"fault": "int4", "fault_mode": "actual", "fault_radius": 2}, "with fault 'int4' and fault_mode 'actual'"),
        ({"fault": "flip:1e-3:int8"}, "name a count"),
        ({"fault": "prune:0.5", "fault_mode": "random"}, "pruning has no random draw"),
        (
            {"fault": "int4:g5"},
            r"group size 5 must divide the row length 8 of parameter 0 \(shape \(16, 8\)\) in param group 0",
        ),
        ({"fault": "int4", "n": 10}, "n applies to the Lp ball"),
    ],
)
def test_bad_fault_settings_stop_with_one_error_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ACR(torch.optim.SGD(model().parameters(), lr=0.1), **kwargs)


def test_complex_parameters_are_refused_by_a_fault_by_name():
    weights = [nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))]
    with pytest.raises(ValueError, match="parameter 1 in param group 0 is torch.complex64"):
        ACR(torch.optim.SGD(weights, lr=0.1), fault="int8")


def test_a_non_finite_clean_gradient_skips_the_step():
    net = model()
    acr = ACR(torch.optim.SGD(net.parameters(), lr=0.1), fault="int4:g8")
    before = [p.detach().clone() for p in net.parameters()]

    def closure():
        loss = backward(net, *batch())
        net[0].weight.grad[0, 0] = math.inf
        return loss

    with pytest.warns(RuntimeWarning, match="skipped optimizer step"):
        acr.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before)) and acr.skipped_steps == 1


def test_a_non_contiguous_weight_is_corrupted_as_its_contiguous_copy():
    gen = torch.Generator().manual_seed(0)
    w, g = torch.randn(16, 8, generator=gen).t(), torch.randn(8, 16, generator=gen)
    assert not w.is_contiguous()
    for spec in ("int4:g8", "bf16"):
        assert torch.equal(corrupt(spec, "worst", w, g), corrupt(spec, "worst", w.contiguous(), g))


@pytest.mark.parametrize(("bits", "group"), [(8, 64), (4, 32), (3, 16), (2, 64)])
def test_actual_mode_is_torchao_qat_fake_quantization_for_float32_weights(bits, group):
    # torchao's QAT fake quantizer (symmetric, per group, float32 scales) is the deployed weight of the fault for
    # float32 weights; for bf16 weights torchao's QAT keeps float32 scales where its deployment (and the fault) round
    # them to bf16, so the two differ there by design.
    qat = pytest.importorskip("torchao.quantization.qat")
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    w[1] *= 1e-4
    config = qat.IntxFakeQuantizeConfig(getattr(torch, f"int{bits}"), group_size=group, is_symmetric=True)
    expected = IntxFakeQuantizer(config)(w)
    assert torch.equal(corrupt(f"int{bits}:g{group}", "actual", w, torch.randn_like(w)), expected)


@pytest.mark.parametrize("spec", ["int4:g8", "bf16", "flips:3:int8", "prune:0.5"])
def test_the_corruption_ignores_a_loss_scale_and_runs_under_bf16_autocast(spec):
    # GradScaler scales the clean gradient by a positive factor: the worst case of every set is the same
    corrupted = []
    for scale in (1.0, 1024.0):
        net = model()
        acr = ACR(torch.optim.SGD(net.parameters(), lr=0.1), fault=spec)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(net(batch()[0]).float(), batch()[1])
        (loss * scale).backward()
        with acr.perturbed() as active:
            assert active
            corrupted.append([p.detach().clone() for p in net.parameters()])
        assert all(torch.isfinite(p).all() for p in net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(*corrupted))


def test_a_non_finite_gradient_of_an_untargeted_parameter_skips_the_step_too():
    # the bias is not quantized by int8 (1-D) but its gradient reaches the base step: it is checked too
    net = model()
    acr = ACR(torch.optim.SGD(net.parameters(), lr=0.1), fault="int8")
    before = [p.detach().clone() for p in net.parameters()]
    backward(net, *batch())
    net[0].bias.grad[0] = math.inf
    assert acr.perturb() is False
    with pytest.warns(RuntimeWarning, match="skipped optimizer step"):
        acr.step()
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


def test_a_cast_to_a_format_no_narrower_than_the_weights_is_refused_and_fault_settings_are_always_checked():
    weights = [nn.Parameter(torch.randn(4, 4).bfloat16())]
    with pytest.raises(ValueError, match="already torch.bfloat16, which the cast leaves as it is"):
        ACR(torch.optim.SGD(weights, lr=0.1), fault="bf16")
    with pytest.raises(ValueError, match="fault_mode must be one of"):
        ACR(torch.optim.SGD(model().parameters(), lr=0.1), fault_mode="wrost")  # no fault, still checked
    with pytest.raises(ValueError, match=r"param group 0 acr_fault/acr_fault_mode/acr_fault_radius: fault spec 'int9'"):
        ACR(torch.optim.SGD([{"params": model().parameters(), "acr_fault": "int9"}], lr=0.1))
