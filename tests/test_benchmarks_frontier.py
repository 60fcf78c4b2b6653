"""benchmarks/frontier.py: every method trains on the same batches with the compute it claims (passes counted
exactly), ACR at p=2, alpha=1 is pytorch-optimizer's SAM at the same rho, runs resume from their records, and
the summary's verdicts follow its dominance rule."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("pytorch_optimizer")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "benchmarks"))

import frontier

from lab import docs


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    if not (DATA / "wikitext-2").is_dir() or not (DATA / "multi30k").is_dir():
        pytest.skip(f"{DATA} (WikiText-2 and Multi30k) is absent")
    root = tmp_path_factory.mktemp("frontier")
    command = [sys.executable, str(REPO / "benchmarks" / "frontier.py"), "--quick", "--results", str(root / "results")]
    command += ["--cache", str(root / "cache"), "--out", str(root / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    records: dict[str, dict[str, dict]] = {}  # task -> method -> record
    for r in frontier.load_records(frontier.BENCHMARK, root / "results"):
        records.setdefault(r["task"], {})[r["method"]] = r
    return root, records, first.stdout, again.stdout


def test_every_method_counts_the_passes_it_claims(quick):
    _, by_task, _, _ = quick
    assert sorted(by_task) == ["de_en", "lm"]
    # 6 steps; ACR interval 2 corrupts steps 0, 2, 4; LookSAM (k=10) computes its direction on step 0 only.
    expected = {"adamw_1x": 6, "adamw_2x": 12, "acr": 12, "acr_k2": 9, "acr_a1": 12, "sam_tuned": 12}
    expected |= {"gsam": 12, "wsam": 12, "looksam": 7}
    for records in by_task.values():
        assert {name: r["passes"] for name, r in records.items()} == expected
        assert records["adamw_2x"]["steps"] == 12 and records["acr"]["steps"] == 6
        for r in records.values():  # the whole model: one row per eval eps and per fault
            assert [row["corruption"] for row in r["rows"]] == ["gradient"] * 2 + list(frontier.FAULTS)
    assert by_task["de_en"]["acr"]["metric"] == "bleu" and by_task["lm"]["acr"]["metric"] == "perplexity"


def test_acr_at_p2_alpha1_trains_the_model_sam_trains(quick):
    _, by_task, _, _ = quick
    for records in by_task.values():
        acr, sam = records["acr_a1"], records["sam_tuned"]
        assert acr["settings"]["method"]["eps"] == sam["settings"]["method"]["rho"]
        assert acr["loss"] == pytest.approx(sam["loss"], rel=1e-5)
        assert acr["loss"] != pytest.approx(records["adamw_1x"]["loss"], rel=1e-4)  # and not AdamW's model


def test_a_second_invocation_trains_nothing(quick):
    _, _, first, again = quick
    assert first.count(": training") == 2 * len(frontier.QUICK_METHODS)
    assert ": training" not in again


def test_summary_lists_every_method_and_a_verdict_per_peer(quick):
    root, by_task, _, _ = quick
    section = frontier.main(["--quick", "--results", str(root / "results"), "--summarize"])
    for name, part in zip(["lm", "de_en"], section.split("### ")[1:]):
        assert part.startswith(f"{name}: ")
        rows = [line for line in part.split("Per peer")[0].splitlines() if line.startswith("| `")]
        assert sorted(line.split("`")[1] for line in rows) == sorted(by_task[name])
        verdicts = [line for line in part.splitlines() if line.startswith("- `")]
        assert sorted(line.split("`")[1] for line in verdicts) == ["gsam", "looksam", "sam_tuned", "wsam"]


def point(name: str, passes: float, loss: float, delta: float) -> frontier.Point:
    family = {"acr": "ACR", "ada": "AdamW"}.get(name[:3], "SAM")
    by_seed = {"loss": dict.fromkeys(range(3), loss), "eps 1": dict.fromkeys(range(3), delta)}
    return frontier.Point(name, family, 3, passes, 1.0, loss, 0.0, {"eps 1": (delta, 0)}, by_seed)


def test_dominance_needs_compute_clean_loss_and_robustness_all_no_worse():
    peer = point("sam", 2.0, 3.0, 0.5)
    assert frontier.dominates(point("acr", 2.0, 3.0, 0.5), peer, "eps 1")
    assert frontier.dominates(point("acr", 2.04, 2.9, 0.4), peer, "eps 1")  # within the 2 % compute slack
    assert not frontier.dominates(point("acr", 2.1, 2.9, 0.4), peer, "eps 1")
    assert frontier.dominates(point("acr", 1.5, 3.01, 0.4), peer, "eps 1")  # within the 0.5 % margin
    assert not frontier.dominates(point("acr", 1.5, 3.02, 0.4), peer, "eps 1")
    assert not frontier.dominates(point("acr", 1.5, 2.9, 0.51), peer, "eps 1")
    found = [point("acr_k2", 1.5, 3.1, 0.3), point("acr", 2.0, 2.9, 0.45), peer]
    assert frontier.verdicts(found, "eps 1") == ["- `sam`: dominated by `acr`."]
    found[1] = point("acr", 2.0, 3.05, 0.45)
    assert frontier.verdicts(found, "eps 1") == [
        "- `sam`: **not dominated**; the closest affordable ACR, `acr_k2`, loses on clean loss 3.100 vs 3.000."
    ]
    found[1] = point("acr", 2.0, 2.95, 0.55)  # no worse on clean loss: preferred to the more robust acr_k2
    assert frontier.verdicts(found, "eps 1") == [
        "- `sam`: **not dominated**; the closest affordable ACR, `acr`, loses on eps 1 increase 0.550 vs 0.500."
    ]


def test_dominance_counts_the_peers_with_and_without_the_margin_and_resolves_each_pair():
    peer = frontier.Point("sam", "SAM", 3, 2.0, 1.0, 3.0, 0.0, {"eps 1": (0.5, 0)}, {})
    peer.by_seed = {"loss": {0: 2.9, 1: 3.0, 2: 3.1}, "eps 1": {0: 0.4, 1: 0.5, 2: 0.6}}
    tie = point("acr", 2.0, 3.0, 0.5)  # no worse only through the margin: the seeds disagree
    tie.by_seed = {"loss": {0: 2.92, 1: 3.0, 2: 3.09}, "eps 1": {0: 0.4, 1: 0.5, 2: 0.6}}
    lines = frontier.dominance([tie, peer], "eps 1")
    assert lines[0].startswith("ACR settings dominate 1 of the 1 peer settings, 0 without the 0.5 % tie margin.")
    assert lines[0].endswith("0 of the 1 pairs on both axes.")
    assert lines[-1] == "| `sam` | `acr` | +0.003 ± 0.038 | +0.000 ± 0.000 | no | ΔL eps 1 |"
    same = point("acr_a1", 2.0, 3.0, 0.5)
    same.by_seed = {key: dict(values) for key, values in peer.by_seed.items()}  # the same runs: resolved on both
    lines = frontier.dominance([same, peer], "eps 1")
    assert lines[0].endswith("1 of the 1 pairs on both axes.") and lines[-1].endswith("| yes | both |")
    assert frontier.dominance([point("acr", 2.0, 3.2, 0.4), peer], "eps 1")[0].startswith(
        "ACR settings dominate 0 of the 1 peer settings, 0 without"
    )


def test_the_readme_section_is_the_summary_of_the_committed_records():
    if not frontier.load_records(frontier.BENCHMARK, frontier.RESULTS):
        pytest.skip("no frontier records committed yet")
    text = frontier.README.read_text()
    assert docs.sections(text)[frontier.BENCHMARK] == frontier.main(["--summarize"])


def test_a_peer_adamw_dominates_is_off_the_frontier_and_ties_stay_on_it():
    found = [point("adamw_1x", 1.0, 3.0, 0.9), point("acr", 2.0, 3.2, 0.5), point("asam", 2.0, 3.01, 0.95)]
    found.append(point("sam", 2.0, 3.2, 0.5))  # the same point as acr
    assert frontier.verdicts(found, "eps 1") == [
        (
            "- `asam`: **not dominated**; the closest affordable ACR, `acr`, loses on clean loss 3.200 vs 3.010."
            " But AdamW dominates it too (`adamw_1x`): off the frontier."
        ),
        "- `sam`: dominated by `acr`.",
    ]
    assert [q.method for q in frontier.pareto(found, "eps 1")] == ["adamw_1x", "acr", "sam"]


def test_a_mean_paired_difference_within_half_a_percent_is_a_tie():
    base = {0: 4.0, 1: 5.0, 2: 6.0}  # mean 5: the margin is 0.025
    assert frontier.no_worse(base, base)
    assert frontier.no_worse({0: 4.02, 1: 5.03, 2: 6.02}, base)  # mean difference 0.0233
    assert not frontier.no_worse({0: 4.0, 1: 5.0, 2: 6.08}, base)  # 0.0267: one bad seed is not averaged away
    assert frontier.no_worse({0: 3.5, 1: 5.2, 2: 6.2}, base)  # -0.0333: better on average


def test_records_of_other_settings_are_not_averaged_together(quick):
    acr = quick[1]["lm"]["acr"]
    other = {**acr, "seed": 1, "settings": {**acr["settings"], "steps": 7}}
    with pytest.raises(ValueError, match="acr: records with different settings"):
        frontier.points([acr, other])
