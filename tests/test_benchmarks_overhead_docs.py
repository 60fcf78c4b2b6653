"""benchmarks/README.md's generated fault-overhead table is what the committed run gives."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytorch_optimizer")  # overhead.py's SAM peer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import overhead

from lab import docs


def test_the_fault_overhead_table_is_the_committed_runs():
    result = json.loads((REPO / "benchmarks" / "results" / "overhead_faults_cpu.json").read_text())
    table = overhead.fault_overhead_table(result)
    assert docs.sections((REPO / "benchmarks" / "README.md").read_text())[overhead.FAULT_DOCS] == table
    assert "| acr fault=int4:g32 worst |" in table and "| acr p=2 a=0.5 n=all |" in table
