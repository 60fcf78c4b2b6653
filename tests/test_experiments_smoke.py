"""The experiment scripts (experiments/*.py) run end to end on a tiny budget and write consistent tables.

They read the real corpora in ../shared/data and skip when it is absent.  Models here are tiny
(width 16, one layer, a few steps): these tests check the plumbing and the tables' invariants,
not the findings.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("sacrebleu")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
if not (DATA / "multi30k").is_dir() or not (DATA / "wikitext-2").is_dir():
    pytest.skip(f"{DATA} (Multi30k and WikiText-2) is absent", allow_module_level=True)
sys.path.insert(0, str(REPO / "experiments"))

import acr_training
import gradient_vs_random
import where_fragile

TINY = ["--steps", "3", "--batch-size", "8", "--width", "16", "--layers", "1", "--vocab", "200"]
TINY += ["--max-train", "200", "--eval-size", "4", "--block-size", "16", "--threads", "1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _args(out: Path, cache: Path, *extra: str) -> list[str]:
    return [*TINY, "--data", str(DATA), "--out", str(out), "--cache", str(cache), *extra]


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_gradient_vs_random(tmp_path, cache):
    eps = ["0.1", "1", "10"]
    gradient_vs_random.main(
        _args(tmp_path, cache, "--eps", *eps, "--small-n", "20", "--trials", "3", "--pgd-steps", "2")
    )
    rows = _read(tmp_path / "corruption.csv")
    assert len(rows) == 2 * 3 * 2 * 3  # tasks x methods x n x eps
    assert {r["draws"] for r in rows if r["method"] == "random"} == {"3"}
    assert {r["draws"] for r in rows if r["method"] != "random"} == {"1"}
    assert {r["metric"] for r in rows} == {"bleu", "perplexity"}
    key = lambda r: (r["task"], r["n"], r["eps"])
    gradient = {key(r): float(r["delta_loss_mean"]) for r in rows if r["method"] == "gradient"}
    for r in rows:
        if r["method"] == "pgd":  # PGD keeps its best iterate, the gradient corruption being the first one
            assert float(r["delta_loss_mean"]) >= gradient[key(r)]
        if r["task"] == "lm":  # perplexity is exp of the same mean loss
            assert float(r["metric_clean"]) == pytest.approx(math.exp(float(r["loss_clean"])), rel=1e-6)
    for task in ("de_en", "lm"):
        assert (tmp_path / f"{task}_corruption.png").stat().st_size > 0
    runs = json.loads((tmp_path / "runs.json").read_text())["runs"]
    assert [(r["task"], r["steps"], r["acr_eps"]) for r in runs] == [("de_en", 3, None), ("lm", 3, None)]


def test_where_fragile(tmp_path, cache):
    eps = [0.5, 2.0]
    summary = where_fragile.main(_args(tmp_path, cache, "--eps", *map(str, eps)))
    rows = _read(tmp_path / "fragility.csv")
    for task in ("de_en", "lm"):
        for by in ("type", "layer"):
            same = [r for r in rows if r["task"] == task and r["by"] == by and r["view"] == "same_eps"]
            groups = {r["group"]: int(r["num_params"]) for r in same}
            total = sum(groups.values())  # the groups partition the trainable parameters
            for r in rows:
                if (r["task"], r["by"]) == (task, by):
                    scale = 1.0 if r["view"] == "same_eps" else math.sqrt(int(r["num_params"]) / total)
                    assert float(r["eps_applied"]) == pytest.approx(float(r["eps"]) * scale, rel=1e-12)
            for view in ("same_eps", "per_param"):
                ranking = summary[task][by][view]
                assert sorted(ranking) == ["0.5", "2"]
                assert sorted(ranking["2"]["order"]) == sorted(groups)
                assert (tmp_path / f"{task}_{by}_{view}.png").stat().st_size > 0
        assert "norm" in summary[task]["type"]["same_eps"]["2"]["order"]


def test_acr_training(tmp_path, cache):
    argv = ["--num-seeds", "2", "--acr-eps", "0.5", "--eval-eps", "1", "4", "--intervals", "2"]
    argv += ["--sweep-eps", "0.1", "--sweep-alpha", "0.25", "--matched-baseline"]
    acr_training.main(_args(tmp_path, cache, *argv))
    runs = _read(tmp_path / "runs.csv")
    recipes = ["baseline", "ACR(eps=0.5, alpha=0.5)", "ACR(eps=0.5, alpha=0.5, interval=2)", "baseline"]
    expected = [
        (task, recipe, str(seed), str(steps), eps)
        for task in ("de_en", "lm")
        for seed in (0, 1)
        for recipe, steps in zip(recipes, (3, 3, 3, 6))
        for eps in ("0.0", "1.0", "4.0")
    ]
    assert [(r["task"], r["recipe"], r["seed"], r["steps"], r["eps"]) for r in runs] == expected
    assert {r["delta_loss"] for r in runs if r["eps"] == "0.0"} == {"0.0"}
    table = _read(tmp_path / "table.csv")
    assert len(table) == 2 * 4 * 3 and {r["seeds"] for r in table} == {"2"}
    sweep = _read(tmp_path / "sweep.csv")
    points = {(r["sweep"], r["acr_eps"], r["acr_alpha"]) for r in sweep}
    assert points == {
        ("baseline", "", ""),
        ("eps", "0.1", "0.5"),
        ("eps", "0.5", "0.5"),
        ("alpha", "0.5", "0.25"),
        ("alpha", "0.5", "0.5"),
    }
    for name in ("de_en_acr.png", "lm_acr.png", "sweep.png"):
        assert (tmp_path / name).stat().st_size > 0
