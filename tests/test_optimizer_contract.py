"""ACR keeps every promise of a torch optimizer, around several base optimizers.

Modelled on PyTorch's own optimizer tests (``test/test_optim.py`` and
``torch/testing/_internal/common_optimizers.py``): hooks, ``defaults``, every scheduler of
``torch.optim.lr_scheduler`` and ``swa_utils``, ``weights_only`` checkpoints, deepcopy and pickle,
``zero_grad(set_to_none=False)``, parameters without gradients, mixed and complex dtypes, sparse
gradients, and module buffers (BatchNorm) left as the clean pass left them in every driving mode.

Where torch's contract cannot hold as written for a two-pass optimizer, the test says what holds
instead: the global step hooks see ACR's step and, inside it, the base optimizer's.
"""

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler, swa_utils
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from acr_optim import ACR
from acr_optim.buffers import preserved_buffers

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

BASES = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=1e-2, momentum=0.5),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=0.1),
    "lion": lambda params: pytorch_optimizer.Lion(params, lr=1e-3),
}


def cnn(seed=0):
    """A small CNN with BatchNorm (2-D and 1-D), as the paper's ResNet has it."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


def data(steps=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(steps)]


def closure_for(model, x, y):
    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def train(model, optimizer, batches, scheduler=None):
    for x, y in batches:
        optimizer.zero_grad()
        optimizer.step(closure_for(model, x, y))
        if scheduler is not None:
            scheduler.step()


def tensors(model):
    return [t.detach().clone() for t in (*model.parameters(), *model.buffers())]


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# -- defaults and hooks ----------------------------------------------------------------------------


@pytest.mark.parametrize("base", BASES)
def test_defaults_hold_the_base_defaults_and_the_acr_settings(base):
    optimizer = BASES[base](cnn().parameters())
    acr = ACR(optimizer, eps=0.1, p=2, alpha=0.5)
    assert {k: acr.defaults[k] for k in optimizer.defaults} == optimizer.defaults
    assert {k: v for k, v in acr.defaults.items() if k.startswith("acr_")} == {
        "acr_eps": 0.1,
        "acr_p": 2.0,
        "acr_alpha": 0.5,
        "acr_n": None,
        "acr_fault": None,
        "acr_fault_mode": "worst",
        "acr_fault_radius": 1.0,
    }


def test_step_hooks_fire_once_per_step_and_global_hooks_see_acr_and_its_base():
    model = cnn()
    acr = ACR(torch.optim.SGD(model.parameters(), lr=0.1), eps=0.1)
    seen = []
    handles = [
        acr.register_step_pre_hook(lambda opt, args, kwargs: seen.append(("pre", opt))),
        acr.register_step_post_hook(lambda opt, args, kwargs: seen.append(("post", opt))),
        register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(("global pre", type(opt).__name__))),
        register_optimizer_step_post_hook(lambda opt, args, kwargs: seen.append(("global post", type(opt).__name__))),
    ]
    try:
        train(model, acr, data(1))
    finally:
        for handle in handles:
            handle.remove()
    assert seen == [
        ("global pre", "ACR"),
        ("pre", acr),
        ("global pre", "SGD"),
        ("global post", "SGD"),
        ("post", acr),
        ("global post", "ACR"),
    ]


def test_state_dict_hooks_fire_and_may_rewrite_the_dict():
    model = cnn()
    acr = ACR(torch.optim.Adam(model.parameters(), lr=1e-2), eps=0.1)
    train(model, acr, data(1))
    calls = []
    acr.register_state_dict_pre_hook(lambda opt: calls.append(("save pre", opt)))
    acr.register_state_dict_post_hook(lambda opt, sd: {**sd, "note": "kept"})
    acr.register_load_state_dict_pre_hook(lambda opt, sd: calls.append(("load pre", sd.pop("note"))))
    acr.register_load_state_dict_post_hook(lambda opt: calls.append(("load post", opt)))
    state = acr.state_dict()
    assert state["note"] == "kept" and state["acr"] == {"steps": 1}
    acr.load_state_dict(state)
    assert calls == [("save pre", acr), ("load pre", "kept"), ("load post", acr)]
    assert acr.param_groups is acr.base_optimizer.param_groups and acr.state is acr.base_optimizer.state


# -- schedulers ------------------------------------------------------------------------------------

SCHEDULERS = {
    "LambdaLR": lambda opt: lr_scheduler.LambdaLR(opt, lambda step: 0.9**step),
    "MultiplicativeLR": lambda opt: lr_scheduler.MultiplicativeLR(opt, lambda step: 0.95),
    "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "MultiStepLR": lambda opt: lr_scheduler.MultiStepLR(opt, milestones=[1, 3]),
    "ConstantLR": lambda opt: lr_scheduler.ConstantLR(opt),
    "LinearLR": lambda opt: lr_scheduler.LinearLR(opt),
    "ExponentialLR": lambda opt: lr_scheduler.ExponentialLR(opt, gamma=0.8),
    "PolynomialLR": lambda opt: lr_scheduler.PolynomialLR(opt, total_iters=4),
    "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=4),
    "CosineAnnealingWarmRestarts": lambda opt: lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=2),
    "CyclicLR": lambda opt: lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=2),
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=5),
    "SequentialLR": lambda opt: lr_scheduler.SequentialLR(
        opt, [lr_scheduler.ConstantLR(opt), lr_scheduler.ExponentialLR(opt, gamma=0.9)], milestones=[2]
    ),
    "ChainedScheduler": lambda opt: lr_scheduler.ChainedScheduler(
        [lr_scheduler.ConstantLR(opt), lr_scheduler.ExponentialLR(opt, gamma=0.9)]
    ),
    "SWALR": lambda opt: swa_utils.SWALR(opt, swa_lr=0.05, anneal_epochs=2),
}


def test_every_scheduler_of_torch_is_covered():
    names = {
        name
        for name, obj in vars(lr_scheduler).items()
        if isinstance(obj, type) and issubclass(obj, lr_scheduler.LRScheduler) and obj is not lr_scheduler.LRScheduler
    }
    # ReduceLROnPlateau has its own test below; _LRScheduler is a deprecated alias
    assert names - {"ReduceLROnPlateau", "_LRScheduler"} <= set(SCHEDULERS)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("base", ["sgd-momentum", "adamw"])
def test_schedulers_at_their_defaults_drive_acr_as_its_base(name, base):
    # alpha = 0: ACR is its base bit for bit, so with the same scheduler every lr, momentum and weight agrees;
    # alpha = 0.5: the same lr (and cycled momentum/betas) trajectory as the bare base optimizer.
    runs = {}
    for label, wrap in (("base", lambda o: o), ("acr0", lambda o: ACR(o, alpha=0.0)), ("acr", lambda o: ACR(o))):
        model = cnn()
        optimizer = wrap(BASES[base](model.parameters()))
        scheduler = SCHEDULERS[name](optimizer)
        trajectory = []
        for x, y in data(5):
            optimizer.zero_grad()
            optimizer.step(closure_for(model, x, y))
            scheduler.step()
            trajectory.append([(g["lr"], g.get("momentum"), g.get("betas")) for g in optimizer.param_groups])
        runs[label] = (trajectory, tensors(model))
    assert runs["acr0"][0] == runs["base"][0] == runs["acr"][0]
    assert_bitwise(runs["acr0"][1], runs["base"][1])


def test_reduce_lr_on_plateau_and_swa_averaging():
    model = cnn()
    acr = ACR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), eps=0.1)
    plateau = lr_scheduler.ReduceLROnPlateau(acr, patience=0)
    averaged = swa_utils.AveragedModel(model)
    batches = data(3)
    for x, y in batches:
        acr.zero_grad()
        acr.step(closure_for(model, x, y))
        plateau.step(1.0)  # a metric that never improves: the lr drops after each step but the first
        averaged.update_parameters(model)
    assert [g["lr"] for g in acr.base_optimizer.param_groups] == [pytest.approx(0.1 * 0.1**2)]
    swa_utils.update_bn([x for x, _ in batches], averaged)
    assert int(averaged.module[1].num_batches_tracked) == 3


# -- checkpoints and copies ------------------------------------------------------------------------


@pytest.mark.parametrize("base", BASES)
def test_weights_only_checkpoint_resumes_bit_for_bit(base):
    batches = data(6)
    model = cnn()
    acr = ACR(BASES[base](model.parameters()), eps=0.1, alpha=0.7)
    train(model, acr, batches)
    straight = tensors(model)

    model = cnn()
    acr = ACR(BASES[base](model.parameters()), eps=0.1, alpha=0.7)
    train(model, acr, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": acr.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = cnn(seed=5)
    resumed.load_state_dict(checkpoint["model"])
    acr = ACR(BASES[base](resumed.parameters()), eps=0.1, alpha=0.7)
    acr.load_state_dict(checkpoint["optimizer"])
    train(resumed, acr, batches[3:])
    assert_bitwise(tensors(resumed), straight)


@pytest.mark.parametrize("copy_with", ["deepcopy", "pickle"])
@pytest.mark.parametrize("base", ["sgd-momentum", "adam", "rmsprop"])
def test_a_copy_of_model_and_optimizer_trains_as_the_original(base, copy_with):
    # Not pytorch-optimizer's classes: they keep settings (Lion's `maximize`, ADOPT's `clip_lambda`) outside
    # their param groups, which torch.optim.Optimizer does not pickle, so they do not survive a copy even bare.
    model = cnn()
    acr = ACR(BASES[base](model.parameters()), eps=0.1, alpha=0.5, interval=2)
    train(model, acr, data(3))
    duplicate = {"deepcopy": copy.deepcopy, "pickle": lambda obj: pickle.loads(pickle.dumps(obj))}[copy_with]
    model2, acr2 = duplicate((model, acr))
    assert acr2.param_groups is acr2.base_optimizer.param_groups and acr2.state is acr2.base_optimizer.state
    assert acr2.param_groups[0]["params"][0] is next(model2.parameters())
    batches = data(3, seed=2)
    train(model, acr, batches)
    train(model2, acr2, batches)
    assert_bitwise(tensors(model2), tensors(model))


def test_copying_while_perturbed_is_refused():
    model = cnn()
    acr = ACR(torch.optim.SGD(model.parameters(), lr=0.1), eps=0.1)
    x, y = data(1)[0]
    closure_for(model, x, y)()
    with acr.perturbed(), pytest.raises(RuntimeError, match="while the weights are perturbed"):
        pickle.dumps(acr)


# -- gradients: zeros, none, dtypes, complex, sparse -----------------------------------------------


@pytest.mark.parametrize("base", ["sgd-momentum", "adamw"])
def test_zero_grad_set_to_none_false_trains_as_set_to_none(base):
    results = []
    for set_to_none in (True, False):
        model = cnn()
        acr = ACR(BASES[base](model.parameters()), eps=0.1)
        for x, y in data(3):
            acr.zero_grad(set_to_none=set_to_none)
            acr.step(closure_for(model, x, y))
        acr.zero_grad(set_to_none=set_to_none)
        assert all((p.grad is None) == set_to_none for p in model.parameters())
        assert set_to_none or all(not p.grad.any() for p in model.parameters())
        results.append(tensors(model))
    assert_bitwise(*results)


@pytest.mark.parametrize("base", BASES)
def test_a_parameter_without_gradient_is_untouched(base):
    model = cnn()
    unused = nn.Parameter(torch.randn(5))
    acr = ACR(BASES[base]([*model.parameters(), unused]), eps=0.1)
    before = unused.detach().clone()
    state = copy.deepcopy(acr.state[unused])  # empty, or what the base sets up at construction (Adagrad's sum)
    train(model, acr, data(2))
    assert torch.equal(unused, before) and unused.grad is None
    assert acr.state[unused].keys() == state.keys() and all(
        torch.equal(acr.state[unused][k], v) for k, v in state.items()
    )


def test_mixed_dtypes_in_one_group_are_corrupted_as_one_vector_and_restored_bitwise():
    torch.manual_seed(0)
    weights = [
        nn.Parameter(torch.randn(6, 4)),
        nn.Parameter(torch.randn(6).bfloat16()),
        nn.Parameter(torch.randn(6).half()),
    ]

    def backward():
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
        out = x @ weights[0].T + weights[1].float() + weights[2].float()
        out.square().sum().backward()

    acr = ACR(torch.optim.SGD(weights, lr=0.1), eps=0.5)
    before = [w.detach().clone() for w in weights]
    backward()
    grads = [w.grad.clone() for w in weights]
    with acr.perturbed() as active:
        assert active
        moved = [(w.detach() - b).double() for w, b in zip(weights, before)]
        # ||a||_2 = eps up to the rounding of w + a in each parameter's dtype
        assert torch.cat([m.flatten() for m in moved]).norm().item() == pytest.approx(0.5, rel=1e-2)
        backward()
    assert_bitwise(list(weights), before)
    assert [w.grad.dtype for w in weights] == [torch.float32, torch.bfloat16, torch.float16]
    assert all(not torch.equal(w.grad, g) for w, g in zip(weights, grads))  # the mixture, not the clean gradient


@pytest.mark.parametrize("base", ["sgd-momentum", "adam", "adamw", "rmsprop", "adagrad"])
def test_complex_parameters_train_as_their_real_view(base):
    # torch's optimizers treat a complex number as two real ones; ACR's corruption does the same
    torch.manual_seed(0)
    z = nn.Parameter(torch.randn(5, dtype=torch.complex64))
    r = nn.Parameter(torch.view_as_real(z.detach()).clone())
    target = torch.randn(5, dtype=torch.complex64)

    def closure(complex_):
        def run():
            value = z if complex_ else torch.view_as_complex(r)
            loss = (value - target).abs().pow(2).sum() + value.real.pow(3).sum()
            loss.backward()
            return loss

        return run

    acr_z = ACR(BASES[base]([z]), eps=0.2)
    acr_r = ACR(BASES[base]([r]), eps=0.2)
    for _ in range(3):
        acr_z.zero_grad()
        acr_z.step(closure(True))
        acr_r.zero_grad()
        acr_r.step(closure(False))
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=1e-6, atol=1e-6)
    assert not torch.equal(r.detach(), torch.view_as_real(torch.randn(5, dtype=torch.complex64)))


def test_sparse_gradients_are_refused_by_name_without_touching_weights():
    torch.manual_seed(0)
    embedding = nn.Embedding(10, 4, sparse=True)
    acr = ACR(torch.optim.SGD(embedding.parameters(), lr=0.1), eps=0.1)
    before = embedding.weight.detach().clone()

    def closure():
        loss = embedding(torch.tensor([1, 2])).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=r"sparse gradients \(nn.Embedding\(sparse=True\)"):
        acr.step(closure)
    assert torch.equal(embedding.weight, before) and not acr.is_perturbed


# -- module buffers: the corrupted pass leaves them as the clean pass left them ----------------------


def clean_pass_buffers(model, x, y):
    """The buffers after the clean forward/backward alone, on a copy."""
    twin = copy.deepcopy(model)
    nn.functional.cross_entropy(twin(x), y).backward()
    return [b.clone() for b in twin.buffers()]


def step_closure(model, acr, x, y):
    acr.step(closure_for(model, x, y))


def step_two_phase(model, acr, x, y):
    nn.functional.cross_entropy(model(x), y).backward()
    with acr.perturbed() as active:
        assert active
        nn.functional.cross_entropy(model(x), y).backward()
    acr.step()


def step_methods(model, acr, x, y):
    nn.functional.cross_entropy(model(x), y).backward()
    assert acr.perturb()
    nn.functional.cross_entropy(model(x), y).backward()
    acr.restore()
    acr.step()


@pytest.mark.parametrize("drive", [step_closure, step_two_phase, step_methods])
@pytest.mark.parametrize("base", BASES)
def test_buffers_after_an_acr_step_are_those_of_the_clean_pass_bitwise(base, drive):
    model = cnn()
    acr = ACR(BASES[base](model.parameters()), eps=0.5, alpha=0.5)
    for step, (x, y) in enumerate(data(4)):
        expected = clean_pass_buffers(model, x, y)
        acr.zero_grad()
        drive(model, acr, x, y)
        assert_bitwise(list(model.buffers()), expected)
        assert int(model[1].num_batches_tracked) == step + 1


def test_with_lr_zero_running_statistics_equal_the_base_optimizers():
    # the numbers: 20 steps at lr = 0 gave num_batches_tracked 40 and another running_var under ACR
    runs = []
    for wrap in (lambda o: o, lambda o: ACR(o, eps=0.5)):
        model = cnn()
        train(model, wrap(torch.optim.AdamW(model.parameters(), lr=0.0)), data(1) * 20)
        runs.append(list(model.buffers()))
    assert_bitwise(*runs)
    assert int(runs[1][2]) == 20


def test_preserved_buffers_restores_replaced_buffers_and_nested_compiled_modules():
    model = cnn()
    x, _ = data(1)[0]
    before = [b.clone() for b in model.buffers()]
    originals = list(model.buffers())
    compiled = torch.compile(model, backend="eager")
    with preserved_buffers():
        compiled(x)
        model[1].running_mean = torch.full((4,), 7.0)  # replaced, not updated
    assert all(a is b for a, b in zip(model.buffers(), originals))
    assert_bitwise(list(model.buffers()), before)


class CNNClassifier(nn.Module):
    """:func:`cnn` in the Trainer's calling convention (keyword inputs, a ``loss`` output)."""

    def __init__(self):
        super().__init__()
        self.net = cnn()

    def forward(self, pixel_values, labels):
        logits = self.net(pixel_values)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_callback_replay_leaves_the_buffers_of_the_plain_trainer(tmp_path, accumulation):
    pytest.importorskip("transformers")
    from test_hf_callback import make_args
    from transformers import Trainer

    from acr_optim.integrations.hf import ACRCallback

    images = [{"pixel_values": x[i], "labels": y[i]} for x, y in data(2) for i in range(16)]
    buffers = {}
    for label, callbacks in (("plain", []), ("acr", [ACRCallback(eps=0.5)])):
        model = CNNClassifier()
        args = make_args(tmp_path / label, learning_rate=0.0, gradient_accumulation_steps=accumulation, max_steps=4)
        Trainer(model=model, args=args, train_dataset=images, callbacks=callbacks).train()
        buffers[label] = list(model.buffers())
    assert_bitwise(buffers["acr"], buffers["plain"])
    assert int(buffers["acr"][2]) == 4 * accumulation  # BatchNorm2d's num_batches_tracked: one per clean micro-batch


# -- the corrupted pass's random numbers: the clean pass's (acr_optim.replay) ------------------------


def test_step_closure_replays_the_clean_pass_dropout_masks_and_continues_the_stream():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.5), nn.Linear(32, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    masks = []
    model[1].register_forward_hook(lambda module, inputs, output: masks.append(output.eq(0)))
    acr = ACR(torch.optim.SGD(model.parameters(), lr=0.1), eps=0.1)
    torch.manual_seed(1)
    acr.step(closure_for(model, x, y))
    after_acr = torch.rand(3)
    assert len(masks) == 2 and torch.equal(masks[0], masks[1])  # the corrupted pass saw the clean pass's mask
    # and the stream goes on as after the clean pass alone: the plain step's next draw
    plain = copy.deepcopy(model)
    torch.manual_seed(1)
    plain(x)
    assert torch.equal(torch.rand(3), after_acr)
