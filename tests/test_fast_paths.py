"""The threshold top-n selection and the alpha = 0.5 shortcut give exactly what the plain definitions give."""

import math

import pytest
import torch
from torch import nn

from acr_optim import ACR, corruption, top_n_indices


def concatenated_top_values(tensors, n):
    flat = torch.cat([t.reshape(-1) for t in tensors]).abs()
    return torch.topk(flat, min(n, flat.numel())).values.sort().values


def chosen_values(tensors, idx):
    assert all(torch.equal(i, i.sort().values) for i in idx)
    values = torch.cat([t.reshape(-1)[i].abs() for t, i in zip(tensors, idx)])
    assert sum(i.unique().numel() for i in idx) == values.numel()  # no index twice
    return values.sort().values


def large_gradients(kind):
    gen = torch.Generator().manual_seed(3)
    shapes = [(300, 257), (257,), (64, 3, 3, 3), (1,), (0,), (5000,)]
    ts = [torch.randn(s, generator=gen) for s in shapes]
    if kind == "mostly_zero":  # like an embedding gradient: most rows untouched
        ts[0][20:] = 0
        ts[5][100:] = 0
    elif kind == "ties":  # few distinct magnitudes: the cut falls inside a block of equal values
        ts = [torch.randint(-3, 4, t.shape, generator=gen).float() for t in ts]
    elif kind == "heavy_tail":
        ts = [t ** 9 for t in ts]
    return ts


@pytest.mark.parametrize("chunk", [None, 1000])  # None: the default chunk, larger than every tensor here
@pytest.mark.parametrize("kind", ["gaussian", "mostly_zero", "ties", "heavy_tail"])
@pytest.mark.parametrize("n", [1, 7, 800, 10_000, 60_000, 82_000, 10**6])
def test_threshold_selection_equals_a_concatenated_topk(kind, n, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(corruption, "_CHUNK", chunk)
    ts = large_gradients(kind)
    idx = top_n_indices(ts, n)
    assert [i.numel() for i in idx][4] == 0
    assert sum(i.numel() for i in idx) == min(n, sum(t.numel() for t in ts))
    assert torch.equal(chosen_values(ts, idx), concatenated_top_values(ts, n))


def test_selection_is_deterministic_keeps_the_global_rng_and_counts_nan_as_largest():
    ts = large_gradients("gaussian")
    torch.manual_seed(0)
    first = top_n_indices(ts, 500)
    after = torch.rand(1)
    torch.manual_seed(0)
    second = top_n_indices(ts, 500)
    assert torch.equal(torch.rand(1), after)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    ts[2].view(-1)[17] = math.nan
    ts[0].view(-1)[5] = -math.inf
    idx = top_n_indices(ts, 2)
    assert idx[0].tolist() == [5] and idx[2].tolist() == [17]


def test_bf16_and_mixed_dtypes_select_exactly():
    ts = large_gradients("gaussian")
    mixed = [ts[0].bfloat16(), ts[1], ts[5].double()]
    idx = top_n_indices(mixed, 3000)
    reference = [t.double() for t in mixed]
    assert torch.equal(chosen_values(reference, idx), concatenated_top_values(reference, 3000))


def test_alpha_half_mixes_the_gradients_bit_exactly():
    torch.manual_seed(0)
    model = nn.Linear(7, 3)
    x, y = torch.randn(16, 7), torch.randint(0, 3, (16,))
    opt = ACR(torch.optim.SGD(model.parameters(), lr=0.1), eps=0.2, alpha=0.5)
    nn.functional.cross_entropy(model(x), y).backward()
    clean = [p.grad.clone() for p in model.parameters()]
    with opt.perturbed():
        loss = nn.functional.cross_entropy(model(x), y)
        at_corrupted = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        loss.backward()
        accumulated = [p.grad.clone() for p in model.parameters()]
    for p, c, g, s in zip(model.parameters(), clean, at_corrupted, accumulated):
        assert torch.equal(s, c + g)  # the clean gradient was left unscaled: (1 - 0.5) / 0.5 = 1
        assert torch.equal(p.grad, s * 0.5)


def test_alpha_one_drops_the_clean_gradient_and_zero_fills_parameters_the_corrupted_pass_missed():
    torch.manual_seed(0)
    used, skipped = nn.Linear(5, 2), nn.Linear(5, 2)
    params = [*used.parameters(), *skipped.parameters()]
    x = torch.randn(8, 5)
    opt = ACR(torch.optim.SGD(params, lr=0.1), eps=0.3, alpha=1.0)
    (used(x).square().sum() + skipped(x).square().sum()).backward()
    assert opt.perturb()
    assert all(p.grad is None for p in params)  # the clean gradient is not held during the corrupted pass
    used(x).square().sum().backward()
    at_corrupted = [p.grad.clone() for p in used.parameters()]
    opt.restore()
    assert all(torch.equal(p.grad, g) for p, g in zip(used.parameters(), at_corrupted))
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in skipped.parameters())
