"""The committed run records (experiments/results/) load, and docs/results.md shows what they make.

Every table of ``experiments/summarize.py`` between ``<!-- table:NAME -->`` and ``<!-- /table -->`` in
docs/results.md must be exactly what it prints from the records; after new records,
``python experiments/summarize.py --write-docs`` brings the page up to date.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from lab.records import RESULTS, chosen_eps, load_records

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

import summarize

COMMON = {"finding", "task", "settings", "seed", "steps", "epochs", "best_step", "train_seconds", "environment"}


def test_records_load_where_they_belong():
    paths = sorted(RESULTS.glob("*/*/*.json"))
    assert {p.parent.parent.name for p in paths} >= {"gradient_vs_random", "where_fragile"}
    for finding in {p.parent.parent.name for p in paths}:
        for record in load_records(finding):
            assert COMMON <= set(record), sorted(COMMON - set(record))
            assert record["finding"] == finding


def test_where_fragile_records_hold_every_view():
    records = load_records("where_fragile")
    assert [(r["task"], r["steps"], r["seed"]) for r in records] == [("de_en", 600, 0), ("lm", 500, 0)]
    for record in records:
        for by, n in (("type", 10), ("layer", 100)):
            rows = [r for r in record["rows"] if r["by"] == by]
            groups = {r["group"] for r in rows}
            paper = {(r["group"], r["eps"]) for r in rows if r["view"] == "paper"}
            assert paper == {(g, e) for g in groups for e in (0.05, 0.1, 0.2, 0.5, 1.0)}
            assert {(r["p"], r["n"]) for r in rows if r["view"] == "paper"} == {(math.inf, n)}
            for view in ("same_eps", "per_param"):
                l2 = {(r["group"], r["eps"], r["p"], r["n"]) for r in rows if r["view"] == view}
                assert l2 == {(g, e, 2.0, None) for g in groups for e in (0.1, 0.3, 1.0, 3.0, 10.0)}


def test_docs_tables_are_what_summarize_prints():
    text = summarize.DOCS.read_text()
    in_docs = summarize.docs_tables(text)
    generated = summarize.tables()
    assert {name for name in generated if name.startswith(("corruption-", "fragile-"))} <= set(in_docs)
    assert in_docs == {name: generated[name] for name in in_docs}
    assert summarize.fill_docs(text, generated) == text


def test_converged_records_are_complete_runs():
    records = load_records("converged")
    assert {r["task"] for r in records} <= {"lstm", "gpt2", "marian"}
    for r in records:
        settings = r["settings"]
        assert r["task"] == settings["family"] and r["method"] == settings["method"]["name"]
        assert r["stopped"] in ("patience", "step cap")
        assert 0 < r["best_step"] <= r["steps"] <= settings["max_steps"] * settings["method"]["budget"]
        assert r["steps"] % settings["eval_every"] == 0 and r["best_step"] % settings["eval_every"] == 0
        metric = r["metric"]
        assert [c["eps"] for c in r["test"]["corrupted"]] == settings["eval_eps"]
        assert all(metric in c for c in r["test"]["corrupted"])
        assert [c["eps"] for c in r["validation"]["corrupted"]] == settings["eval_eps"]
        if metric == "perplexity":
            assert r["test"]["perplexity"] == pytest.approx(math.exp(r["test"]["loss"]), rel=1e-12)
    # Every family with records has its seed-0 AdamW sweep run (the reference of every paired difference).
    for family in {r["task"] for r in records}:
        assert any(r["task"] == family and r["method"] == "adamw" and r["seed"] == 0 for r in records)


def test_chosen_eps_waits_for_the_whole_grid():
    def sweep(eps, loss, stage="sweep", method="acr"):
        return {"method": method, "settings": {"stage": stage, "method": {"eps": eps}}, "validation": {"loss": loss}}

    records = [sweep(None, 4.0, method="adamw"), sweep(0.1, 4.3), sweep(1.0, 4.2), sweep(3.0, 4.1, stage="final")]
    assert chosen_eps(records) == 1.0  # the final-stage run is no sweep point
    assert chosen_eps(records, [0.1, 1.0]) == 1.0
    assert chosen_eps(records, [0.1, 1.0, 3.0]) is None  # eps 3 has no sweep record yet
    assert chosen_eps(records[:1]) is None
