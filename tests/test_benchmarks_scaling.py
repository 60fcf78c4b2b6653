"""benchmarks/scaling.py --quick: one run in a subprocess writes every model slot, ratio, bandwidth figure and
probe count to its JSON, with sensible values (the evaluation count of probe() exactly as its formula says)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("pytorch_optimizer")  # overhead.py's SAM peer (benchmarks/requirements.txt)
pytest.importorskip("rich")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"
SLOTS = {"1M", "10M", "30M", "100M", "mlp"}


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> tuple[dict, Path]:
    folder = tmp_path_factory.mktemp("scaling")
    out, figure = folder / "scaling.json", folder / "scaling.png"
    command = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--device", "cpu", "--out", str(out)]
    if importlib.util.find_spec("matplotlib") is not None:
        command += ["--plot", str(figure)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, env=env, cwd=folder)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| model | params |" in run.stdout and "probe / predicted" in run.stdout
    return json.loads(out.read_text()), figure


def test_every_slot_has_its_ratios_and_memory(result):
    data, _ = result
    assert set(data["models"]) == SLOTS
    for slot, m in data["models"].items():
        ratios = m["ratios"]
        assert set(ratios) == {"floor/AdamW", "ACR/AdamW", "ACR/floor"}, slot
        # Timings depend on the machine's load: the test checks the bookkeeping, the benchmark reports the values.
        assert all(math.isfinite(r) and r > 0 for r in ratios.values()), (slot, ratios)
        assert ratios["ACR/AdamW"] == pytest.approx(m["rows"]["acr p=2 a=0.5 n=all"]["vs_base"])
        assert m["reps"] == 3 and all(len(ts) == 3 for ts in m["samples_s"].values())
        memory = m["memory_x_params"]
        assert memory["ACR held"] == 1.0, slot  # exactly one backup of the parameters
        assert memory["ACR peak"] >= memory["ACR held"]
    params = [data["models"][slot]["params"] for slot in ("1M", "10M", "30M", "100M")]
    assert params == sorted(params)


def test_elementwise_work_against_the_bandwidth(result):
    data, _ = result
    bandwidth = data["bandwidth"]["bytes_per_s"]
    assert bandwidth > 0
    for slot, m in data["models"].items():
        e = m["elementwise"]
        assert e["bytes"] == 10 * m["params"] * 4, slot  # 10 k s, float32
        assert e["predicted_s"] == pytest.approx(e["bytes"] / bandwidth)
        for key in ("isolated_s", "norm_s", "copy_s", "add_s", "scale_s", "add_out_s"):
            assert math.isfinite(e[key]) and e[key] > 0, (slot, key)
        assert math.isfinite(e["in_step_s"])
        assert e["passes_sum_s"] == pytest.approx(e["norm_s"] + 2 * e["copy_s"] + e["add_s"] + e["scale_s"])


def test_probe_counts_its_evaluations_exactly(result):
    data, _ = result
    p = data["probe"]
    layers, n_eps, batches = p["n_layer"], len(p["eps"]), p["batches"]
    assert (p["model"], n_eps, batches) == ("100M", 3, 2)
    assert p["groups"] == layers + 3  # wte, wpe, h.0 ... h.{L-1}, ln_f
    assert p["rows"] == n_eps * (layers + 4)  # each group and "all", each eps
    assert p["gradient_calls"] == batches  # one gradient pass
    assert p["evaluations"] == p["expected_evaluations"] == batches * (1 + n_eps * (layers + 4))
    assert p["predicted_s"] == pytest.approx(p["gradient_pass_s"] + p["evaluations"] * p["evaluation_s"])
    assert 0 < p["gradient_pass_s"] < p["probe_s"]


def test_figure_and_tables_from_the_json(result, tmp_path):
    data, figure = result
    if importlib.util.find_spec("matplotlib") is not None:
        assert figure.stat().st_size > 10_000
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--from-json", str(saved)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("| MLP 1024 -> 4 x 1024 -> 10 |") == 2
