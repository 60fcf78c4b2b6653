"""estimate_indicator / corrupted / probe: the paper's claims on a trained tiny model, and exact restore."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from acr_optim.probe import CorruptionResolutionWarning, corrupted, estimate_indicator, probe


def ce_loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


@pytest.fixture(scope="module")
def trained():
    """A tanh MLP trained to near-zero loss on a linearly separable 3-class problem (smooth, 771 params)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 20, generator=gen)
    y = (x @ torch.randn(20, 3, generator=gen)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(150):
        opt.zero_grad()
        ce_loss(model, (x, y)).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model, [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]


def test_gradient_beats_random_by_a_wide_margin_at_small_eps(trained):
    model, batches = trained
    grad = estimate_indicator(model, batches, eps=1e-2, loss_fn=ce_loss)
    rand = estimate_indicator(model, batches, eps=1e-2, loss_fn=ce_loss, method="random", trials=20)
    assert rand.trials == 20 and rand.delta_loss_std > 0
    assert grad.delta_loss > 5 * rand.delta_loss_max  # even the worst of 20 random draws
    assert grad.delta_loss > 50 * abs(rand.delta_loss)


@pytest.mark.parametrize(
    ("p", "n", "eps"), [(2, None, 1.0), (2, 50, 1.0), (1.5, None, 1.0), (math.inf, 50, 0.05), (1, None, 1.0)]
)
def test_pgd_never_below_gradient_and_both_feasible(trained, p, n, eps):
    model, batches = trained
    grad = estimate_indicator(model, batches, eps=eps, p=p, n=n, loss_fn=ce_loss)
    pgd = estimate_indicator(model, batches, eps=eps, p=p, n=n, loss_fn=ce_loss, method="pgd", steps=5)
    assert pgd.delta_loss >= grad.delta_loss
    limit = 1 if p == 1 else (n or 771)
    for r in (grad, pgd):
        assert r.norm == pytest.approx(eps, rel=1e-6)
        assert 0 < r.l0 <= limit
        assert sum(int(t.count_nonzero()) for t in r.corruption.values()) == r.l0
    if p == 2:  # first order is loose at eps = 1: the ascent must find a clearly worse corruption
        assert pgd.delta_loss > 2 * grad.delta_loss


def test_first_order_prediction_becomes_exact_as_eps_shrinks(trained):
    model = copy.deepcopy(trained[0]).double()
    batches = [(x.double(), y) for x, y in trained[1]]
    errors, slopes = [], []
    for eps in (1e-2, 1e-3, 1e-4):
        r = estimate_indicator(model, batches, eps=eps, loss_fn=ce_loss)
        slopes.append(r.first_order / eps)  # a.g = eps * ||g||_2
        errors.append(abs(r.delta_loss / r.first_order - 1))
        assert errors[-1] < eps  # Theorem 2: the relative error of the first-order gain is O(eps)
    assert errors[0] > errors[1] > errors[2]
    assert slopes == pytest.approx([slopes[0]] * 3, rel=1e-12)


def _state(model):
    return {
        "params": {k: (v, v.detach().clone(), v.requires_grad) for k, v in model.named_parameters()},
        "grads": {k: (v.grad, None if v.grad is None else v.grad.clone()) for k, v in model.named_parameters()},
        "buffers": {k: (v, v.clone()) for k, v in model.named_buffers()},
        "training": [m.training for m in model.modules()],
    }


def _assert_same(model, state):
    params = dict(model.named_parameters())
    assert params.keys() == state["params"].keys()
    for k, (obj, value, requires_grad) in state["params"].items():
        assert params[k] is obj and torch.equal(obj, value) and obj.requires_grad == requires_grad
    for k, (grad, value) in state["grads"].items():
        assert params[k].grad is grad
        assert value is None or torch.equal(grad, value)
    buffers = dict(model.named_buffers())
    for k, (obj, value) in state["buffers"].items():
        assert buffers[k] is obj and torch.equal(obj, value)
    assert [m.training for m in model.modules()] == state["training"]


@pytest.fixture
def stateful():
    """BatchNorm buffers, dropout, train mode, a frozen parameter and existing .grad on some parameters."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.ReLU(), nn.Linear(8, 2))
    model.train()
    model[2].eval()
    model[0].bias.requires_grad_(False)
    x, y = torch.randn(16, 6), torch.randint(0, 2, (16,))
    ce_loss(model, (x, y)).backward()
    model[4].weight.grad = None
    return model, [(x[:8], y[:8]), (x[8:], y[8:])]


@pytest.mark.parametrize("method", ["gradient", "random", "pgd"])
def test_estimate_restores_model_bit_exactly(stateful, method):
    model, batches = stateful
    state = _state(model)
    estimate_indicator(
        model, batches, eps=0.5, method=method, loss_fn=ce_loss, trials=2, steps=2, params=[model[0].bias, "4.weight"]
    )
    _assert_same(model, state)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_probe_restores_after_error_injected_mid_probe(stateful, error):
    model, batches = stateful
    state = _state(model)
    calls = {"n": 0}
    seen_corrupted = []

    def failing_loss(m, batch):
        calls["n"] += 1
        seen_corrupted.append(not torch.equal(m[0].weight, state["params"]["0.weight"][1]))
        if calls["n"] == 9:  # gradient pass + clean pass (4 calls) then inside the 3rd corrupted evaluation
            raise error("injected")
        return ce_loss(m, batch)

    with pytest.raises(error):
        probe(model, batches, eps=[0.1, 1.0], method=["gradient", "random"], by="layer", loss_fn=failing_loss)
    assert seen_corrupted[-1]  # the error struck while the weights were corrupted
    _assert_same(model, state)


def test_corrupted_context_applies_a_and_restores_even_on_error(stateful):
    model, batches = stateful
    state = _state(model)
    a = {"0.weight": torch.full((8, 6), 0.25), "4.bias": torch.tensor([1.0, -1.0])}
    with corrupted(model, a) as m:
        assert torch.equal(m[0].weight, state["params"]["0.weight"][1] + 0.25)
        assert torch.equal(m[4].bias, state["params"]["4.bias"][1] + torch.tensor([1.0, -1.0]))
        assert torch.equal(m[4].weight, state["params"]["4.weight"][1])
    _assert_same(model, state)
    with pytest.raises(ValueError, match="injected"), corrupted(model, a):
        ce_loss(model, batches[0]).backward()  # grads accumulate in place and BatchNorm stats move
        model.eval()
        raise ValueError("injected")
    _assert_same(model, state)
    with pytest.raises(KeyError, match="nope"), corrupted(model, {"nope": torch.zeros(1)}):
        pass
    with pytest.raises(ValueError, match="shape"), corrupted(model, {"0.weight": torch.zeros(6, 8)}):
        pass


def test_probe_tied_weights_probed_once_and_restored():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.LayerNorm(4), head)
    x = torch.randint(0, 10, (3, 5))
    batches = [(x, x)]
    state = _state(model)
    table = probe(
        model, batches, eps=0.1, loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]).flatten(0, 1), b[1].flatten())
    )
    assert [(r["group"], r["num_params"]) for r in table.rows] == [("all", 48), ("embedding", 40), ("norm", 8)]
    _assert_same(model, state)


def test_probe_reuses_one_gradient_and_matches_estimate_indicator(trained):
    model, batches = trained
    passes = {"grad": 0, "eval": 0}

    def counting_loss(m, batch):
        passes["grad" if torch.is_grad_enabled() else "eval"] += 1
        return ce_loss(m, batch)

    table = probe(
        model,
        batches,
        eps=[1e-3, 1e-2, 1e-1],
        n=[None, 10],
        method=["gradient", "random"],
        by="layer",
        trials=2,
        loss_fn=counting_loss,
    )
    groups = ["all", "0", "2"]
    assert len(table.rows) == len(groups) * 2 * 2 * 3
    assert passes["grad"] == len(batches)  # one gradient for every group, eps, n and method
    assert passes["eval"] == len(batches) * (1 + len(groups) * 2 * 3 * (1 + 2))  # clean + gradient + 2 random draws
    row = table.select(group="2", method="gradient", eps=1e-2, n=10)[0]
    direct = estimate_indicator(model, batches, eps=1e-2, n=10, loss_fn=ce_loss, params=["2.weight", "2.bias"])
    assert row["delta_loss"] == direct.delta_loss and row["first_order"] == direct.first_order
    assert row["l0"] == 10 and row["num_params"] == 99


def test_half_precision_corruption_below_resolution_warns():
    torch.manual_seed(0)
    model = nn.Linear(4, 2).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    a = {"weight": torch.full((2, 4), 1e-4, dtype=torch.bfloat16)}
    with pytest.warns(CorruptionResolutionWarning, match="8 of 8 corrupted entries of bfloat16"), corrupted(model, a):
        assert torch.equal(model.weight, torch.ones(2, 4, dtype=torch.bfloat16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with corrupted(model.float(), {"weight": torch.full((2, 4), 1e-4)}):
            pass


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"eps": 0.0}, ValueError, "eps must be finite and > 0"),
        ({"eps": 0.1, "method": "adam"}, ValueError, "method must be one of"),
        ({"eps": 0.1, "p": 0.5}, ValueError, "p must satisfy 1 <= p"),
        ({"eps": 0.1, "n": 0}, ValueError, "n must be a positive int"),
        ({"eps": 0.1, "trials": 0}, ValueError, "trials must be >= 1"),
        ({"eps": 0.1, "steps": -1}, ValueError, "steps must be >= 0"),
        ({"eps": 0.1, "params": ["missing"]}, ValueError, "params must name parameters"),
    ],
)
def test_bad_arguments_are_named(trained, kwargs, error, match):
    model, batches = trained
    with pytest.raises(error, match=match):
        estimate_indicator(model, batches, loss_fn=ce_loss, **kwargs)


def test_default_loss_needs_dict_batches_with_labels(trained):
    model, batches = trained
    with pytest.raises(TypeError, match="dict batches"):
        estimate_indicator(model, batches, eps=0.1)
    with pytest.raises(ValueError, match="batches must hold at least one batch"):
        estimate_indicator(model, [], eps=0.1, loss_fn=ce_loss)


def test_pgd_stops_where_the_loss_blows_up():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.5)

    def pole(m, batch):  # L(w) = 1 / (1 - w): infinite (with infinite gradient) at w = 1
        return 1 / (1 - m.weight.sum())

    grad = estimate_indicator(model, [None], eps=0.5, loss_fn=pole)
    pgd = estimate_indicator(model, [None], eps=0.5, loss_fn=pole, method="pgd")
    assert grad.delta_loss == pgd.delta_loss == math.inf
    assert torch.equal(pgd.corruption["weight"], torch.tensor([[0.5]]))
    assert torch.equal(model.weight, torch.tensor([[0.5]]))


def test_corrupted_accepts_either_name_of_a_tied_weight_and_refuses_both():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    before = emb.weight.detach().clone()
    delta = torch.full((10, 4), 0.5)
    for name in ("0.weight", "1.weight"):  # named_parameters() lists only "0.weight"
        with corrupted(model, {name: delta}):
            assert torch.equal(head.weight, before + 0.5) and torch.equal(emb.weight, before + 0.5)
        assert torch.equal(emb.weight, before)
    twice = pytest.raises(ValueError, match="tied parameter twice: '0.weight' and '1.weight'")
    with twice, corrupted(model, {"0.weight": delta, "1.weight": delta}):
        pass
    assert torch.equal(emb.weight, before)
