"""probe(faults=...): fault rows next to the eps rows, faulty values written exactly, bit-exact restore after every row."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from acr_optim.faults import parse_fault
from acr_optim.probe import probe

FAULTS = ["int8", "int4:g8", "bf16", "fp8_e4m3", "flip:1e-3", "flips:5:int8", "flip-worst:3:mantissa", "prune:0.5:all"]


def ce_loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int32).clone()


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    x = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(0))
    return model, [{"input_ids": x[:2], "labels": x[:2]}, {"input_ids": x[2:], "labels": x[2:]}]


def test_every_fault_row_restores_the_model_bit_exactly(gpt2):
    model, batches = gpt2
    model.train()
    before = {k: bits(v) for k, v in model.named_parameters()}
    seen = []

    def check(row, deltas):
        seen.append(row["method"])
        for name, p in model.named_parameters():  # called right after each row: the weights are back
            assert torch.equal(bits(p), before[name]), (row["group"], row["method"], name)
        assert all(d.shape == dict(model.named_parameters())[k].shape for k, d in deltas.items())

    table = probe(model, batches, eps=[0.1], faults=FAULTS, by="layer", trials=2, on_corruption=check)
    groups = ["all", "wte", "wpe", "h.0", "h.1", "ln_f"]
    assert seen == [m for _ in groups for m in ["gradient", *FAULTS]]
    assert [r["group"] for r in table.rows] == [g for g in groups for _ in range(1 + len(FAULTS))]
    assert model.training and all(torch.equal(bits(p), before[k]) for k, p in model.named_parameters())
    for row in table.rows[1:]:
        if row["method"] in FAULTS:
            assert row["eps"] is None and row["n"] is None and row["p"] is None  # a fault has no norm constraint
            assert row["trials"] == (2 if parse_fault(row["method"]).stochastic else 1) or row["trials"] == 0
        else:
            assert row["p"] == 2
    int8_ln = table.select(group="ln_f", method="int8")[0]  # layer norm weights are 1-D: int8 leaves them alone
    # not measured, so not drawn as "unaffected": NaN loss columns, while d = w' - w is exactly 0
    assert int8_ln["trials"] == 0 and int8_ln["loss_clean"] == table.rows[0]["loss_clean"]
    for key in ("loss", "delta_loss", "delta_loss_std", "delta_loss_max", "broken"):
        assert math.isnan(int8_ln[key]), key
    assert (int8_ln["l0"], int8_ln["norm"], int8_ln["norm_inf"], int8_ln["first_order"]) == (0, 0.0, 0.0, 0.0)
    # every fault but "prune:0.5:all" leaves 1-D weights alone, and only ln_f holds nothing else
    assert [(r["group"], r["method"]) for r in table.rows if r["trials"] == 0] == [("ln_f", f) for f in FAULTS[:-1]]
    prune_ln = table.select(group="ln_f", method="prune:0.5:all")[0]
    assert prune_ln["trials"] == 1 and prune_ln["l0"] == 0  # :all reaches it, but its 16 smallest are the zero biases
    h0 = table.select(group="h.0", method="int4:g8")[0]
    assert 0 < h0["norm_inf"] <= h0["norm"] and h0["l0"] > 0 and h0["broken"] == 0
    assert table.config["faults"] == FAULTS


def test_faulty_values_are_written_exactly_and_match_the_fault(gpt2):
    """The weights during the faulty evaluation are Fault.values bit for bit (GPT-2's Conv1D seen as (out, in))."""
    model, batches = gpt2
    captured = []

    def capture(m, batch):
        if not torch.is_grad_enabled():  # the clean evaluation, then the faulty one
            captured.append({k: v.detach().clone() for k, v in m.named_parameters()})
        return m(**batch).loss

    names = ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"]
    for spec in ("int4:g8", "flips:7", "flip-worst:4"):
        captured.clear()
        probe(model, batches, faults=[spec], params=names, by="all", loss_fn=capture, seed=3)
        weights = [dict(model.named_parameters())[k] for k in names]
        model.eval()  # the probe's gradient: dropout off
        grads = torch.autograd.grad(sum(model(**b).loss for b in batches) / len(batches), weights)
        model.train()
        weights = [w.detach() for w in weights]
        generator = torch.Generator().manual_seed(3)
        expected = parse_fault(spec).values([w.t() for w in weights], [g.t() for g in grads], generator)
        during = captured[-1]
        for name, e in zip(names, expected):
            assert torch.equal(bits(during[name]), bits(e.t())), (spec, name)


def test_int8_quantizes_gpt2_conv1d_per_output_channel(gpt2):
    model, batches = gpt2
    w = model.transformer.h[0].mlp.c_fc.weight  # Conv1D: (in, out)
    captured = []

    def loss(m, batch):
        if not torch.is_grad_enabled():
            captured.append(m.transformer.h[0].mlp.c_fc.weight.detach().clone())
        return m(**batch).loss

    probe(model, batches, faults="int8", params=["transformer.h.0.mlp.c_fc.weight"], loss_fn=loss)
    faulty = captured[-1]
    scale = w.detach().abs().amax(0) / 127.5  # one scale per output column of the stored (in, out) matrix
    codes = (faulty.double() / scale.double()).round()
    assert torch.equal(faulty, codes.float() * scale) and codes.abs().max() <= 128


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_while_faulty_weights_are_in_place_restores_the_model(gpt2, error):
    model, batches = gpt2
    before = {k: bits(v) for k, v in model.named_parameters()}
    faulty_seen = []

    def failing(m, batch):
        faulty = not torch.equal(
            bits(m.transformer.h[0].attn.c_attn.weight), before["transformer.h.0.attn.c_attn.weight"]
        )
        faulty_seen.append(faulty)
        if faulty and len(faulty_seen) > 6:
            raise error("injected")
        return m(**batch).loss

    with pytest.raises(error, match="injected"):
        probe(model, batches, faults=["int4:g8", "flip:1e-2"], by="layer", trials=3, loss_fn=failing)
    assert faulty_seen[-1]
    assert all(torch.equal(bits(p), before[k]) for k, p in model.named_parameters())


def test_a_fault_that_breaks_the_model_is_reported_as_inf_not_raised():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(1.5)  # exponent 127: flipping bit 30 gives NaN
    x, y = torch.ones(3, 2), torch.tensor([0, 1, 0])
    table = probe(model, [(x, y)], faults=["flips:1:b30", "int8"], loss_fn=ce_loss, trials=3, by="all")
    broken, fine = table.rows
    assert broken["delta_loss"] == broken["delta_loss_max"] == broken["loss"] == math.inf
    assert broken["broken"] == 1.0 and broken["trials"] == 3 and math.isnan(broken["delta_loss_std"])
    assert broken["norm"] == broken["norm_inf"] == math.inf
    assert fine["broken"] == 0.0 and math.isfinite(fine["delta_loss"])
    assert torch.equal(model.weight, torch.full((2, 2), 1.5))


def test_tables_with_faults_write_and_draw(gpt2, tmp_path):
    model, batches = gpt2
    table = probe(model, batches, faults=["int8", "prune:0.5"], by="type")
    assert "eps" not in table.config and table.config["faults"] == ["int8", "prune:0.5"]
    md = table.to_markdown(columns=["group", "method", "eps", "p", "n", "delta_loss"])
    assert "| attention | int8 |  |  |  |" in md  # no eps, no p, and n is not "all"
    assert "| norm | int8 |  |  |  | nan |" in md  # not measured
    fig = table.fault_heatmap(tmp_path / "faults.png")
    ax = fig.axes[0]
    groups = [t.get_text() for t in ax.get_yticklabels()]
    assert groups == ["all", "embedding", "norm", "attention", "feed_forward"]
    # the norm group's weights are 1-D: neither fault touches them, and they are marked so, not drawn as a 0
    assert ax.images[0].get_array().mask[groups.index("norm")].tolist() == [True, True]
    texts = [t.get_text() for t in ax.texts]  # row by row, a column per fault
    assert [i for i, text in enumerate(texts) if text == "n/a"] == [4, 5]
    decreased = any(r["trials"] and r["delta_loss"] <= 0 for r in table.rows)  # deterministic faults: std 0
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        *(["<= 0: no increase, off the log colour scale"] if decreased else []),
        "n/a: not measured (the fault leaves these parameters unchanged)",
    ]
    assert ax.get_title() == "Loss increase L(w+a) - L(w) under real-world faults"
    assert ax.get_xlabel() == "fault (acr_optim.faults spec)"
    table.fault_heatmap(tmp_path / "one.png", value="norm", faults=["prune:0.5"])
    assert (tmp_path / "faults.png").stat().st_size > 0 and (tmp_path / "one.png").stat().st_size > 0
    with pytest.raises(ValueError, match="use fault_heatmap"):
        table.heatmap(tmp_path / "h.png", method="int8")
    with pytest.raises(ValueError, match="no fault rows"):
        table.fault_heatmap(tmp_path / "x.png", faults=["bf16"])
    mixed = probe(model, batches, eps=[0.01, 0.1], faults=["bf16"], by="all", method=["gradient", "random"])
    mixed.heatmap(tmp_path / "h.png")  # defaults skip the fault rows
    mixed.curve(tmp_path / "c.png")
    assert [r["method"] for r in mixed.rows] == ["gradient", "gradient", "random", "random", "bf16"]


def test_bad_fault_arguments_are_refused_before_any_evaluation(gpt2):
    model, batches = gpt2
    calls = []

    def loss(m, batch):
        calls.append(1)
        return m(**batch).loss

    with pytest.raises(ValueError, match="eps is required unless faults are given"):
        probe(model, batches, loss_fn=loss)
    with pytest.raises(ValueError, match="fault spec 'int4:g7x'"):
        probe(model, batches, faults=["int8", "int4:g7x"], loss_fn=loss)
    with pytest.raises(TypeError, match="fault spec must be a str"):
        probe(model, batches, faults=[4], loss_fn=loss)
    assert not calls
