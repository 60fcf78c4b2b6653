"""The ACR optimizer: equivalences, exact restore, groups, state, schedulers, AMP, validation."""

import copy
import math

import pytest
import torch
from torch import nn

from acr_optim import ACR, gradient_corruption, penalized_loss


def make_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3))


def batches(steps=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(steps)]


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def make_closure(model, x, y, calls=None):
    def closure():
        if calls is not None:
            calls.append(1)
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    return closure


def run(model, optimizer, data, calls=None):
    losses = []
    for x, y in data:
        optimizer.zero_grad()
        losses.append(optimizer.step(make_closure(model, x, y, calls)).item())
    return losses


def assert_params_equal(a, b):
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize(
    "make_base",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
    ],
)
def test_alpha_zero_is_the_base_optimizer_bit_for_bit(make_base):
    ref, model = make_model(dropout=0.2), make_model(dropout=0.2)
    data = batches()
    torch.manual_seed(5)
    ref_losses = run(ref, make_base(ref.parameters()), data)
    torch.manual_seed(5)
    calls = []
    losses = run(model, ACR(make_base(model.parameters()), eps=0.3, alpha=0.0), data, calls)
    assert losses == ref_losses
    assert len(calls) == len(data)
    assert_params_equal(ref, model)


def reference_step(model, base, x, y, eps, alpha):
    """Plain two-pass reference: both gradients kept, explicit mixture; p = 2, n = None."""
    params = list(model.parameters())
    base.zero_grad()
    loss_of(model, x, y).backward()
    clean = [p.grad.clone() for p in params]
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in clean]))
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, clean):
            p.add_(g * (eps / norm))
    base.zero_grad()
    loss_of(model, x, y).backward()
    with torch.no_grad():
        for p, w, g in zip(params, saved, clean):
            p.copy_(w)
            p.grad = (1 - alpha) * g + alpha * p.grad
    base.step()


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.2])
def test_matches_an_explicit_two_pass_reference(alpha):
    # alpha = 1 is SAM with rho = eps.
    ref, model = make_model(), make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.5)
    opt = ACR(torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5), eps=0.05, p=2, alpha=alpha)
    for x, y in batches(10):
        reference_step(ref, ref_opt, x, y, 0.05, alpha)
        opt.zero_grad()
        opt.step(make_closure(model, x, y))
    for pr, pm in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(pm, pr, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("n", [None, 5, 100])
def test_the_corrupted_pass_sees_exactly_w_plus_a(p, n):
    # n = 5 stores indices and old values; n = 100 (of 163) keeps a dense backup.
    model = make_model()
    opt = ACR(torch.optim.SGD(model.parameters(), lr=0.1), eps=0.1, p=p, alpha=0.5, n=n)
    x, y = batches(1)[0]
    seen = []

    def closure():
        if seen:  # second call: the weights must be w + a exactly
            seen.append([q.detach().clone() for q in model.parameters()])
        else:
            seen.append(None)
        loss = loss_of(model, x, y)
        loss.backward()
        if seen[-1] is None:
            a = gradient_corruption([q.grad for q in model.parameters()], 0.1, p, n)
            expected.extend(w.detach() + d for w, d in zip(model.parameters(), a))
        return loss

    expected = []
    before = [q.detach().clone() for q in model.parameters()]
    opt.step(closure)
    for got, want in zip(seen[1], expected):
        if p == 2 and n is None:  # dense p = 2 perturbs with one fused w + s*g: within an ulp of w + (s*g)
            torch.testing.assert_close(got, want, rtol=1.2e-7, atol=0)
        else:
            assert torch.equal(got, want)
    changed = sum((g != w).sum().item() for g, w in zip(seen[1], before))
    assert 0 < changed <= (1 if p == 1 else (n or 10**9))


@pytest.mark.parametrize("p, n", [(2.0, None), (math.inf, None), (3.0, None), (2.0, 7), (1.0, None), (2.0, 150)])
def test_weights_are_restored_bit_exactly_after_100_steps(p, n):
    model = make_model()
    start = copy.deepcopy(model)
    opt = ACR(torch.optim.SGD(model.parameters(), lr=0.0), eps=0.37, p=p, alpha=0.5, n=n)
    data = batches(4)
    for i in range(100):
        x, y = data[i % 4]
        opt.zero_grad()
        opt.step(make_closure(model, x, y))
    assert_params_equal(start, model)


def test_two_phase_api_equals_the_closure_api_bit_for_bit():
    a, b = make_model(), make_model()
    opt_a = ACR(torch.optim.AdamW(a.parameters(), lr=1e-2), eps=0.1, alpha=0.7)
    opt_b = ACR(torch.optim.AdamW(b.parameters(), lr=1e-2), eps=0.1, alpha=0.7)
    for x, y in batches():
        opt_a.zero_grad()
        opt_a.step(make_closure(a, x, y))
        opt_b.zero_grad()
        loss_of(b, x, y).backward()
        with opt_b.perturbed() as active:
            assert active and opt_b.is_perturbed
            loss_of(b, x, y).backward()
        assert not opt_b.is_perturbed
        opt_b.step()
    assert_params_equal(a, b)


def test_closure_call_count_and_step_without_closure():
    model = make_model()
    opt = ACR(torch.optim.SGD(model.parameters(), lr=0.1), eps=0.1)
    calls = []
    run(model, opt, batches(3), calls)
    assert len(calls) == 6
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    x, y = batches(1)[0]
    opt.zero_grad()
    loss_of(model, x, y).backward()
    assert opt.perturb()
    with pytest.raises(RuntimeError, match="perturb"):
        opt.perturb()
    loss_of(model, x, y).backward()
    opt.step()  # restores, then steps
    assert not opt.is_perturbed


def test_zero_grad_in_the_closure_is_ignored_while_perturbed_and_model_reset_is_caught():
    a, b = make_model(), make_model()
    opt_a = ACR(torch.optim.SGD(a.parameters(), lr=0.1), eps=0.1)
    opt_b = ACR(torch.optim.SGD(b.parameters(), lr=0.1), eps=0.1)
    x, y = batches(1)[0]

    def torch_style_closure():  # the LBFGS convention: zero_grad inside the closure
        opt_b.zero_grad()
        loss = loss_of(b, x, y)
        loss.backward()
        return loss

    opt_a.zero_grad()
    opt_a.step(make_closure(a, x, y))
    opt_b.step(torch_style_closure)
    assert_params_equal(a, b)

    c = make_model()
    before = copy.deepcopy(c)
    opt_c = ACR(torch.optim.SGD(c.parameters(), lr=0.1), eps=0.1)

    def resetting_closure():
        c.zero_grad()
        loss = loss_of(c, x, y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="reset"):
        opt_c.step(resetting_closure)
    assert_params_equal(before, c)  # restored, and no step taken


def test_exception_in_the_corrupted_pass_restores_the_weights():
    model = make_model()
    before = copy.deepcopy(model)
    opt = ACR(torch.optim.SGD(model.parameters(), lr=0.1), eps=0.5)
    x, y = batches(1)[0]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert_params_equal(before, model)
    assert not opt.is_perturbed


def test_group_overrides_eps_zero_and_frozen_parameters():
    model = make_model()
    first, last = model[0], model[3]
    first.bias.requires_grad_(False)
    base = torch.optim.SGD(
        [{"params": [first.weight, first.bias]}, {"params": last.parameters(), "acr_eps": 0.0, "acr_alpha": 1.0}], lr=0.1
    )
    opt = ACR(base, eps=0.2, alpha=0.5)
    assert [g["acr_eps"] for g in base.param_groups] == [0.2, 0.0]
    assert base.param_groups[0]["acr_alpha"] == 0.5
    x, y = batches(1)[0]
    snapshots = []

    def closure():
        snapshots.append([q.detach().clone() for q in model.parameters()])
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    opt.step(closure)
    clean, corrupted = snapshots
    names = [n for n, _ in model.named_parameters()]
    diff = {n: not torch.equal(a, b) for n, a, b in zip(names, clean, corrupted)}
    assert diff == {"0.weight": True, "0.bias": False, "3.weight": False, "3.bias": False}
    assert first.bias.grad is None


def test_parameters_without_a_clean_gradient_keep_none():
    model = make_model()
    extra = nn.Parameter(torch.ones(4))
    opt = ACR(torch.optim.SGD([*model.parameters(), extra], lr=0.1), eps=0.1)
    calls = []
    x, y = batches(1)[0]

    def closure():  # extra only takes part in the corrupted pass
        calls.append(1)
        loss = loss_of(model, x, y) + (extra.sum() if len(calls) == 2 else 0)
        loss.backward()
        return loss

    opt.step(closure)
    assert extra.grad is None
    assert torch.equal(extra, torch.ones(4))


def test_add_param_group_scheduler_and_state_dict_are_shared():
    model = make_model()
    base = torch.optim.AdamW(model[0].parameters(), lr=1e-2)
    opt = ACR(base, eps=0.1, p=math.inf)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    opt.add_param_group({"params": model[3].parameters(), "acr_alpha": 0.25})
    assert len(base.param_groups) == 2 and base.param_groups[1]["acr_alpha"] == 0.25
    assert base.param_groups[1]["acr_p"] == math.inf and "betas" in base.param_groups[1]
    assert base.param_groups[1]["eps"] == 1e-8  # Adam's own eps is untouched
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    run(model, opt, batches(2))
    sched.step()
    assert [g["lr"] for g in base.param_groups] == [5e-3, 5e-3]
    with pytest.raises(ValueError, match="alpha"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "acr_alpha": 2.0})


def test_state_dict_round_trip_continues_identically():
    model = make_model()
    opt = ACR(torch.optim.AdamW(model.parameters(), lr=1e-2), eps=0.1, alpha=0.5, n=20)
    data = batches(6)
    run(model, opt, data[:3])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert set(saved_opt) == {"state", "param_groups", "acr"} and saved_opt["acr"] == {"steps": 3}
    assert set(saved_opt["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}  # no ACR transients
    run(model, opt, data[3:])

    other = make_model(seed=9)
    other.load_state_dict(saved_model)
    other_opt = ACR(torch.optim.AdamW(other.parameters(), lr=0.5), eps=0.9, alpha=0.1)
    other_opt.load_state_dict(saved_opt)
    assert other_opt.param_groups is other_opt.base_optimizer.param_groups
    assert other_opt.param_groups[0]["acr_eps"] == 0.1 and other_opt.param_groups[0]["acr_n"] == 20
    assert other_opt.param_groups[0]["eps"] == 1e-8 and other_opt.param_groups[0]["lr"] == 1e-2
    run(other, other_opt, data[3:])
    assert_params_equal(model, other)


def test_loading_a_plain_base_state_dict_fills_acr_defaults():
    model = make_model()
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run(model, plain, batches(1))
    opt = ACR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), eps=0.3)
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["acr_eps"] == 0.3


def test_memory_is_one_backup_for_dense_and_o_n_for_small_n():
    model = make_model()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    x, y = batches(1)[0]
    for n, expected in [(None, param_bytes), (4, 4 * (8 + 4))]:
        opt = ACR(torch.optim.SGD(model.parameters(), lr=0.1), eps=0.1, n=n)
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.perturb()
        assert opt.extra_memory_bytes() == expected
        opt.restore()


def test_grad_scaler_path_matches_the_unscaled_path_and_skips_overflow():
    # Power-of-two loss scaling is exact, so with fp32 compute the scaled ACR step is bitwise the unscaled one.
    a, b = make_model(), make_model()
    opt_a = ACR(torch.optim.SGD(a.parameters(), lr=0.1), eps=0.1, alpha=0.6)
    opt_b = ACR(torch.optim.SGD(b.parameters(), lr=0.1), eps=0.1, alpha=0.6)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x, y in batches(4):
        opt_a.zero_grad()
        opt_a.step(make_closure(a, x, y))
        opt_b.zero_grad()
        scaler.scale(loss_of(b, x, y)).backward()
        with opt_b.perturbed() as active:
            if active:
                scaler.scale(loss_of(b, x, y)).backward()
        scaler.step(opt_b)
        scaler.update()
    assert_params_equal(a, b)

    before = copy.deepcopy(b)
    x, y = batches(1)[0]
    opt_b.zero_grad()
    scaler.scale(loss_of(b, x, y) * float("inf")).backward()
    assert not opt_b.perturb()  # non-finite clean gradient: nothing corrupted
    assert_params_equal(before, b)
    scaler.step(opt_b)  # the scaler sees the inf and skips the step
    scaler.update()
    assert_params_equal(before, b)
    assert scaler.get_scale() == 2.0**11


def test_fp16_autocast_with_grad_scaler_and_bf16_autocast_never_put_nan_in_weights():
    for dtype, scaler in [(torch.float16, torch.amp.GradScaler("cpu", init_scale=2.0**24)), (torch.bfloat16, None)]:
        model = make_model()
        opt = ACR(torch.optim.AdamW(model.parameters(), lr=1e-2), eps=0.05, alpha=0.5)
        for x, y in batches(6):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=dtype):
                loss = loss_of(model, x, y)
            (scaler.scale(loss) if scaler else loss).backward()
            with opt.perturbed() as active:
                if active:
                    with torch.autocast("cpu", dtype=dtype):
                        loss = loss_of(model, x, y)
                    (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_penalized_loss_is_the_first_order_objective():
    # L(w) = 0.5 w^T A w: g = A w, and d/dw ||g||_2 = A g / ||g||.
    torch.manual_seed(0)
    m = torch.randn(5, 5, dtype=torch.float64)
    a = m @ m.T
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    loss = 0.5 * w @ a @ w
    total = penalized_loss(loss, [w], lam=0.3, p=2)
    g = (a @ w).detach()
    assert total.item() == pytest.approx(loss.item() + 0.3 * g.norm().item(), rel=1e-12)
    (grad,) = torch.autograd.grad(total, w)
    torch.testing.assert_close(grad, g + 0.3 * a @ g / g.norm(), rtol=1e-12, atol=1e-12)
    loss_inf = 0.5 * w @ a @ w
    assert penalized_loss(loss_inf, [w], lam=0.3, p=math.inf).item() == pytest.approx(
        loss_inf.item() + 0.3 * g.abs().sum().item(), rel=1e-12
    )  # p = inf penalises the dual L1 norm
    assert penalized_loss(loss, [w], lam=0.0) is loss


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        ({"eps": -0.1}, ValueError, "eps"),
        ({"eps": math.inf}, ValueError, "eps"),
        ({"eps": math.nan}, ValueError, "eps"),
        ({"p": 0.99}, ValueError, "p"),
        ({"p": math.nan}, ValueError, "p"),
        ({"alpha": -0.01}, ValueError, "alpha"),
        ({"alpha": 1.5}, ValueError, "alpha"),
        ({"alpha": math.nan}, ValueError, "alpha"),
        ({"alpha": None}, TypeError, "alpha"),
        ({"n": 0}, ValueError, "n"),
        ({"n": 3.0}, TypeError, "n"),
    ],
)
def test_invalid_arguments_raise(kwargs, exc, name):
    model = make_model()
    with pytest.raises(exc, match=rf"\b{name}\b"):
        ACR(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_eps_zero_is_the_base_optimizer_bit_for_bit_with_one_pass():
    ref, model = make_model(), make_model()
    plain = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = ACR(torch.optim.AdamW(model.parameters(), lr=1e-2), eps=0, alpha=0.5)
    calls = []
    data = batches(4)
    run(ref, plain, data)
    run(model, opt, data, calls)
    assert len(calls) == 4
    assert_params_equal(ref, model)


@pytest.mark.parametrize("where", ["clean loss", "corrupted loss", "clean gradient (two-phase)"])
def test_non_finite_step_is_skipped_with_a_warning_and_a_counter(where):
    model = make_model()
    opt = ACR(torch.optim.AdamW(model.parameters(), lr=1e-2), eps=0.1, alpha=0.5)
    run(model, opt, batches(2))  # optimizer state exists
    before, state = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
    x, y = batches(1, seed=5)[0]
    calls = []

    def closure():
        calls.append(1)
        scale = math.inf if (where == "clean loss" or len(calls) == 2) else 1.0
        loss = loss_of(model, x, y) * scale
        loss.backward()
        return loss

    opt.zero_grad()
    with pytest.warns(RuntimeWarning, match=r"skipped optimizer step 3\b.*1 skipped so far"):
        if where == "clean gradient (two-phase)":
            closure()
            calls.clear()
            model[0].weight.grad[0, 0] = math.nan
            with opt.perturbed() as active:
                assert not active
            assert opt.step() is None
        else:
            loss = opt.step(closure)  # the clean loss, as always
            assert math.isinf(loss.item()) == (where == "clean loss")
    assert len(calls) == {"clean loss": 1, "corrupted loss": 2, "clean gradient (two-phase)": 0}[where]
    assert opt.skipped_steps == 1
    assert_params_equal(before, model)
    after = opt.state_dict()
    assert after["acr"] == state["acr"]
    for key, value in state["state"].items():
        for name, tensor in value.items():
            assert torch.equal(after["state"][key][name], tensor)
    run(model, opt, batches(1))  # training goes on: the next finite step is taken
    assert opt.skipped_steps == 1 and opt.state_dict()["acr"]["steps"] == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_invalid_base_and_group_overrides_raise():
    model = make_model()
    with pytest.raises(TypeError, match="base_optimizer"):
        ACR(list(model.parameters()), eps=0.1)
    with pytest.raises(TypeError, match="base_optimizer"):
        ACR(ACR(torch.optim.SGD(model.parameters(), lr=0.1)), eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        ACR(torch.optim.SGD([{"params": model.parameters(), "acr_eps": -1.0}], lr=0.1))
    with pytest.raises(ValueError, match="p"):
        ACR(torch.optim.SGD([{"params": model.parameters(), "acr_p": 0.5}], lr=0.1))


def test_interval_corrupts_every_kth_step_with_one_pass_on_the_others():
    model, ref = make_model(), make_model()
    opt = ACR(torch.optim.SGD(model.parameters(), lr=0.1), eps=0.1, alpha=0.5, interval=3)
    ref_opt = ACR(torch.optim.SGD(ref.parameters(), lr=0.1), eps=0.1, alpha=0.5)
    plain = torch.optim.SGD(ref.parameters(), lr=0.1)
    calls = []
    for i, (x, y) in enumerate(batches(7)):
        before = len(calls)
        assert opt.corrupts_this_step == (i % 3 == 0)
        opt.zero_grad()
        opt.step(make_closure(model, x, y, calls))
        assert len(calls) - before == (2 if i % 3 == 0 else 1)
        ref_opt.zero_grad()
        (ref_opt if i % 3 == 0 else plain).step(make_closure(ref, x, y))
    assert_params_equal(model, ref)
    # the cheap steps need neither a closure nor perturb(), and the position survives a state_dict round trip
    other = ACR(torch.optim.SGD(make_model().parameters(), lr=0.1), eps=0.1, interval=3)
    other.load_state_dict(opt.state_dict())
    assert other.corrupts_this_step == opt.corrupts_this_step is False
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    opt.step()  # a cheap step: no closure, no perturb() needed
    with pytest.raises(ValueError, match="interval"):
        ACR(torch.optim.SGD(model.parameters(), lr=0.1), interval=0)


def test_groups_sharing_settings_form_one_vector_and_overrides_split_it():
    # A weight-decay/no-decay split must not change the corruption: one vector, one constraint.
    x, y = batches(1)[0]
    seen = {}
    for name, groups, eps_other in [
        ("one", lambda m: [{"params": m.parameters()}], None),
        ("split", lambda m: [{"params": m[0].parameters(), "weight_decay": 0.1}, {"params": m[3].parameters()}], None),
        ("override", lambda m: [{"params": m[0].parameters()}, {"params": m[3].parameters(), "acr_eps": 0.3}], 0.3),
    ]:
        model = make_model()
        opt = ACR(torch.optim.SGD(groups(model), lr=0.1), eps=0.2)
        opt.zero_grad()
        loss_of(model, x, y).backward()
        grads = [q.grad.clone() for q in model.parameters()]
        before = [q.detach().clone() for q in model.parameters()]
        assert opt.perturb()
        seen[name] = [q.detach() - b for q, b in zip(model.parameters(), before)]
        if eps_other is None:
            assert opt.last_corruption_norm == 0.2
            assert opt.last_first_order_gain == pytest.approx(0.2 * torch.cat([g.flatten() for g in grads]).norm().item())
        else:
            assert opt.last_corruption_norm == pytest.approx(math.hypot(0.2, 0.3))
            first, last = seen[name][:2], seen[name][2:]
            assert lp_norm(first) == pytest.approx(0.2, rel=1e-5) and lp_norm(last) == pytest.approx(0.3, rel=1e-5)
        opt.restore()
    assert lp_norm(seen["one"]) == pytest.approx(0.2, rel=1e-5)
    for a, b in zip(seen["one"], seen["split"]):
        assert torch.equal(a, b)


def lp_norm(tensors, p=2):
    return torch.linalg.vector_norm(torch.cat([t.flatten() for t in tensors]), p).item()
