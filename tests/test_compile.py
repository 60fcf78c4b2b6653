"""ACR with torch.compile: a compiled model (CPU inductor) trains to the eager model's weights, compiled once;
the Trainer's ``torch_compile=True`` with ACRCallback is the eager run bit for bit."""

import functools

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from acr_optim import ACR


@pytest.fixture
def dynamo():
    """A fresh dynamo cache that raises on any recompilation (a guard failing on a frame compiled before)."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))


def train_acr(model, forward, steps=20):
    """``steps`` ACR steps (SGD with momentum) of ``forward`` (the model, or its compiled version) on 4 batches of 16."""
    x = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.randn(4, 16, 4, generator=torch.Generator().manual_seed(2))
    optimizer = ACR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), eps=0.05, alpha=0.5)

    def closure(batch):
        loss = nn.functional.mse_loss(forward(x[batch]), y[batch])
        loss.backward()
        return loss

    for step in range(steps):
        optimizer.zero_grad()
        optimizer.step(functools.partial(closure, step % 4))
    return [p.detach() for p in model.parameters()]


@pytest.mark.slow  # inductor compiles forward and backward: ~20 s on 2 CPU cores
def test_acr_on_a_compiled_model_matches_eager_and_compiles_once(dynamo):
    eager = mlp()
    model = mlp()
    counter = CompileCounterWithBackend("inductor")
    compiled = train_acr(model, torch.compile(model, backend=counter))
    # 40 forward/backward passes (clean and corrupted), 20 weight restores: one compilation, no recompilation
    assert counter.frame_count == 1
    for a, b in zip(train_acr(eager, eager), compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_trainer_torch_compile_with_the_callback_is_bitwise_the_eager_run(tmp_path, dynamo):
    """``TrainingArguments(torch_compile=True)``: the Trainer compiles the model and ACRCallback replays the step on
    it.  The ``aot_eager`` backend (dynamo + AOTAutograd, eager kernels) keeps the test fast and the result exact."""
    pytest.importorskip("transformers")
    from test_hf_callback import ACR_KEYS, make_model, train, weights

    from acr_optim.integrations.hf import ACRCallback

    runs = []
    for compile_settings in ({}, {"torch_compile": True, "torch_compile_backend": "aot_eager"}):
        model = make_model()
        trainer = train(tmp_path, model, callback=ACRCallback(eps=0.1, alpha=0.5), max_steps=4, **compile_settings)
        runs.append((weights(model), trainer))
    (eager, eager_trainer), (compiled, compiled_trainer) = runs
    assert type(compiled_trainer.model_wrapped).__name__ == "OptimizedModule"
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    for a, b in zip(eager_trainer.state.log_history[:-1], compiled_trainer.state.log_history[:-1]):
        assert {key: a[key] for key in ACR_KEYS | {"loss"}} == {key: b[key] for key in ACR_KEYS | {"loss"}}
