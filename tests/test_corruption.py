"""The corruption maths: constraint, optimality, first-order gain, Theorem 1, numerics, validation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from acr_optim import (
    NonFiniteGradientError,
    first_order_gain,
    gradient_corruption,
    random_corruption,
    top_n_indices,
)

PS = [1.0, 1.5, 2.0, 3.0, math.inf]


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def lp(x, p):
    return torch.linalg.vector_norm(x.double(), p).item()


@st.composite
def gradients(draw, dtype=torch.float64):
    shapes = draw(st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3), min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = 10.0 ** draw(st.integers(-8, 8))
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype) * scale for s in shapes]


def feasible_budget(grads, n, p):
    total = sum(g.numel() for g in grads)
    return 1 if p == 1 else min(total, n or total)


@settings(max_examples=150, deadline=None)
@given(grads=gradients(), p=st.sampled_from(PS), n=st.one_of(st.none(), st.integers(1, 40)), eps=st.floats(1e-3, 10))
def test_constraint_gain_and_optimality(grads, p, n, eps):
    a = gradient_corruption(grads, eps, p, n)
    assert [x.shape for x in a] == [g.shape for g in grads]
    fa, fg = flat(a), flat(grads)
    assert lp(fa, p) == pytest.approx(eps, rel=1e-9)
    assert (fa != 0).sum().item() <= feasible_budget(grads, n, p)
    gain = first_order_gain(grads, eps, p, n).item()
    assert (fa.double() @ fg).item() == pytest.approx(gain, rel=1e-5)
    # Hoelder: no feasible b does better than a to first order.
    gen = torch.Generator().manual_seed(0)
    k = fg.numel()
    budget = feasible_budget(grads, n, p)
    for _ in range(100):
        support = torch.randperm(k, generator=gen)[: torch.randint(1, budget + 1, (1,), generator=gen).item()]
        b = torch.zeros(k, dtype=torch.float64)
        b[support] = torch.randn(support.numel(), generator=gen, dtype=torch.float64)
        b *= eps / lp(b, p)
        assert (b @ fg).item() <= gain * (1 + 1e-9)


@settings(max_examples=60, deadline=None)
@given(grads=gradients(torch.float32), p=st.sampled_from(PS), n=st.integers(1, 12))
def test_support_is_the_global_top_n(grads, p, n):
    fg = flat(grads)
    budget = feasible_budget(grads, n, p)
    a = flat(gradient_corruption(grads, 0.5, p, n))
    support = set(torch.nonzero(a).flatten().tolist())
    assert len(support) == budget
    threshold = fg.abs().sort(descending=True).values[budget - 1]
    assert all(fg[i].abs() >= threshold for i in support)
    assert torch.equal(torch.sign(a[list(support)]), torch.sign(fg[list(support)]))


def test_closed_forms_of_the_special_cases():
    g = [torch.tensor([3.0, -4.0]), torch.tensor([[0.0, 1.0]])]
    a2 = flat(gradient_corruption(g, 2.0, p=2))
    torch.testing.assert_close(a2, 2.0 * flat(g) / flat(g).norm(), rtol=0, atol=0)
    ainf = flat(gradient_corruption(g, 0.1, p=math.inf))
    assert torch.equal(ainf, 0.1 * torch.sign(flat(g)))
    ainf2 = flat(gradient_corruption(g, 0.1, p=math.inf, n=2))
    assert torch.equal(ainf2, torch.tensor([0.1, -0.1, 0.0, 0.0]))
    a1 = flat(gradient_corruption(g, 0.7, p=1))
    assert torch.equal(a1, torch.tensor([0.0, -0.7, 0.0, 0.0]))
    assert first_order_gain(g, 0.7, p=1).item() == pytest.approx(0.7 * 4)
    assert first_order_gain(g, 0.1, p=math.inf).item() == pytest.approx(0.1 * 8)
    assert first_order_gain(g, 2.0, p=2).item() == pytest.approx(2.0 * math.sqrt(26))


@pytest.mark.parametrize("p", [1.0001, 1.01, 1.5, 2.0, 3.0, 50.0, math.inf])
@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1.0, 1e12, 1e30])
def test_huge_tiny_and_near_one_p_stay_exact(p, scale):
    gen = torch.Generator().manual_seed(1)
    g = [torch.randn(40, generator=gen) * scale, torch.randn(3, 3, generator=gen) * scale]
    a = gradient_corruption(g, 0.25, p)
    fa = flat(a)
    assert torch.isfinite(fa).all()
    assert lp(fa, p) == pytest.approx(0.25, rel=1e-5)
    gain = first_order_gain(g, 0.25, p).item()
    assert math.isfinite(gain)
    assert (fa.double() @ flat(g).double()).item() == pytest.approx(gain, rel=1e-4)


def test_zero_gradient_gives_zero_corruption_and_nonfinite_raises():
    for p in PS:
        a = gradient_corruption([torch.zeros(3), torch.zeros(2, 2)], 0.1, p, n=2)
        assert all(torch.equal(x, torch.zeros_like(x)) for x in a)
        assert first_order_gain([torch.zeros(3)], 0.1, p).item() == 0.0
    for bad in (math.inf, -math.inf, math.nan):
        with pytest.raises(NonFiniteGradientError):
            gradient_corruption([torch.tensor([1.0, bad])], 0.1)
        with pytest.raises(NonFiniteGradientError):
            first_order_gain([torch.tensor([1.0, bad])], 0.1)


def test_bf16_gradients_are_supported():
    g = [torch.randn(64, generator=torch.Generator().manual_seed(0)).bfloat16()]
    a = gradient_corruption(g, 0.5, 2)[0]
    assert a.dtype == torch.bfloat16
    assert lp(a.float(), 2) == pytest.approx(0.5, rel=1e-2)


@settings(max_examples=40, deadline=None)
@given(grads=gradients(torch.float32), n=st.integers(1, 30))
def test_top_n_indices_matches_a_concatenated_topk(grads, n):
    fg = flat(grads).abs()
    idx = top_n_indices(grads, n)
    assert sum(i.numel() for i in idx) == min(n, fg.numel())
    offsets = torch.tensor([0] + [g.numel() for g in grads]).cumsum(0)
    chosen = torch.cat([i + offsets[j] for j, i in enumerate(idx)])
    reference = torch.topk(fg, min(n, fg.numel())).values
    torch.testing.assert_close(fg[chosen].sort().values, reference.sort().values, rtol=0, atol=0)


def test_random_corruption_is_feasible_and_reproducible():
    like = [torch.empty(5, 7), torch.empty(11)]
    for p in PS:
        for n in (None, 4):
            a = random_corruption(like, 0.3, p, n, generator=torch.Generator().manual_seed(3))
            b = random_corruption(like, 0.3, p, n, generator=torch.Generator().manual_seed(3))
            assert all(torch.equal(x, y) for x, y in zip(a, b))
            fa = flat(a)
            assert lp(fa, p) == pytest.approx(0.3, rel=1e-5)
            assert (fa != 0).sum().item() <= (1 if p == 1 else (n or fa.numel()))
    c = random_corruption(like, 0.3, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(flat(a), flat(c))


def _eta_samples(k, trials, seed):
    """eta = |a.g| / (eps ||g||_2) for random corruptions of a fixed g in R^k (paper Theorem 1, p = 2)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, generator=gen, dtype=torch.float64)
    etas = []
    for _ in range(trials):
        a = random_corruption([g], 0.5, p=2, generator=gen)[0]
        etas.append(abs((a @ g).item()) / (0.5 * g.norm().item()))
    return etas


def test_random_corruption_follows_theorem_1():
    # For a uniform direction on the sphere in R^k, eta^2 = cos^2 ~ Beta(1/2, (k-1)/2) (Eqs. 8-9).
    k = 40
    eta2 = [e * e for e in _eta_samples(k, 1500, seed=0)]
    assert stats.kstest(eta2, stats.beta(0.5, (k - 1) / 2).cdf).pvalue > 1e-3
    # The same test rejects the distribution of a different dimension: it has power.
    assert stats.kstest(eta2, stats.beta(0.5, (10 - 1) / 2).cdf).pvalue < 1e-6


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"eps": 0.0}, ValueError),
        ({"eps": -1.0}, ValueError),
        ({"eps": math.nan}, ValueError),
        ({"eps": math.inf}, ValueError),
        ({"eps": "0.1"}, TypeError),
        ({"p": 0.5}, ValueError),
        ({"p": math.nan}, ValueError),
        ({"p": "2"}, TypeError),
        ({"n": 0}, ValueError),
        ({"n": -3}, ValueError),
        ({"n": 2.5}, TypeError),
        ({"n": True}, TypeError),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(kwargs, exc):
    args = {"eps": 0.1, "p": 2.0, "n": None} | kwargs
    name = next(iter(kwargs))
    for fn in (gradient_corruption, first_order_gain):
        with pytest.raises(exc, match=name):
            fn([torch.ones(3)], **args)
    with pytest.raises(exc, match=name):
        random_corruption([torch.ones(3)], **args)
