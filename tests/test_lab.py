"""lab (the research tier's package): the statistics and the generated-section convention every summary uses."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("scipy")

from lab import docs, stats


def test_mean_std():
    assert stats.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert stats.mean_std([4.0]) == (4.0, 0.0)
    assert math.isnan(stats.mean_std([1.0, math.inf])[1])
    assert docs.mean_std([1.0, 2.0, 3.0], ".2f") == "2.00 ± 1.00"
    assert docs.mean_std([1.0], ".1f") == "1.0"


def test_t_interval_matches_scipy():
    from scipy.stats import ttest_1samp

    diffs = [0.3, -0.1, 0.5, 0.2]
    mean, half = stats.t_interval(diffs)
    ci = ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    assert mean == pytest.approx((ci.low + ci.high) / 2) and half == pytest.approx((ci.high - ci.low) / 2)
    assert stats.t_interval([0.4]) == (0.4, math.inf)
    assert docs.interval(mean, half, ".3f") == f"+0.225 ± {half:.3f}"


def test_welch_and_holm():
    diff, half, p = stats.welch([1.0, 1.2, 1.1], [0.0, 0.1, 0.2])
    assert diff == pytest.approx(1.0) and 0 < half < 1 and p < 0.01
    assert stats.holm([0.01, 0.04, 0.03]) == 1  # 0.01 <= 0.05 / 3, then 0.03 > 0.05 / 2
    assert stats.holm([0.001, 0.02, 0.04]) == 3
    assert stats.holm([0.2]) == 0 and stats.holm([]) == 0


def test_fill_replaces_only_the_named_sections():
    begin, end = docs.markers("a")
    text = f"head\n{docs.block('a', 'old')}\nmid\n{docs.block('b', 'keep')}\ntail\n"
    assert docs.sections(text) == {"a": "old", "b": "keep"}
    assert docs.fill(text, {"a": "new"}) == f"head\n{begin}\nnew\n{end}\nmid\n{docs.block('b', 'keep')}\ntail\n"
    with pytest.raises(KeyError):
        docs.fill(text, {"c": "lost"})


def test_stepper_counts_every_pass_and_refuses_an_unknown_driver():
    import torch

    from acr_optim import ACR
    from lab.loop import Stepper

    class Regression(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3, 1)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), y)}

    batch = {"x": torch.randn(8, 3), "y": torch.randn(8)}
    model = Regression()
    plain = Stepper(model, torch.optim.AdamW(model.parameters()), "plain")
    acr = Stepper(model, ACR(torch.optim.AdamW(model.parameters()), eps=0.1), "closure")
    for _ in range(3):
        assert plain(batch) is not None and acr(batch) is not None
    assert (plain.passes, acr.passes) == (3, 6)  # ACR: the clean and the corrupted pass
    with pytest.raises(ValueError, match="driver"):
        Stepper(model, torch.optim.AdamW(model.parameters()), "twice")


def test_share_intervals_bootstrap_and_exact():
    assert stats.bootstrap_share([True] * 4) == (1.0, 1.0)
    assert stats.bootstrap_share([True, False] * 3) == stats.bootstrap_share([True, False] * 3)  # fixed seed
    low, high = stats.bootstrap_share([True] + [False] * 5)
    assert low == 0.0 and 1 / 6 < high <= 4 / 6
    # Clopper-Pearson at 0 of n: [0, 1 - (alpha/2)^(1/n)]; symmetric at n of n
    assert stats.clopper_pearson(0, 3) == (0.0, pytest.approx(1 - 0.025 ** (1 / 3)))
    assert stats.clopper_pearson(3, 3) == (pytest.approx(0.025 ** (1 / 3)), 1.0)
    low, high = stats.clopper_pearson(1, 6)
    assert 0 < low < 1 / 6 < high < 1
