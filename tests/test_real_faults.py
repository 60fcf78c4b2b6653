"""Finding 4's committed records (experiments/results/real_faults/) load, and docs/results.md shows what they make.

The section between ``<!-- table:real_faults -->`` and ``<!-- /table -->`` must be exactly
what ``experiments/real_faults.py --summarize`` builds from the records; after new records,
``python experiments/real_faults.py --summarize --write-docs`` brings the page up to date.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lab import docs
from lab.records import load_records

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

import real_faults


def test_records_hold_every_fault_row():
    records = load_records(real_faults.FINDING)
    assert records, "no real_faults records committed"
    for record in records:
        assert record["method"] in real_faults.LABELS
        rows = [r for r in record["rows"] if r["eps"] is None]
        assert [r["corruption"] for r in rows] == list(real_faults.FAULTS)
        assert [r["eps"] for r in record["rows"] if r["eps"] is not None] == record["settings"]["eval_eps"]
        for row in rows:
            stochastic = row["corruption"].startswith("flip:")
            assert row["trials"] == (record["settings"]["trials"] if stochastic else 1)


def test_docs_section_is_what_summarize_builds():
    records = [r for r in load_records(real_faults.FINDING) if r["task"] == "lm"]
    assert docs.sections(real_faults.DOCS.read_text())[real_faults.FINDING] == real_faults.section(records)
