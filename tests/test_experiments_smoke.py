"""The experiment scripts (experiments/*.py) run end to end on a tiny budget and write consistent tables.

They read the real corpora in ../shared/data and skip when it is absent.  Models here are tiny
(width 16, one layer, a few steps): these tests check the plumbing and the tables' invariants,
not the findings.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sacrebleu")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
if not (DATA / "multi30k").is_dir() or not (DATA / "wikitext-2").is_dir():
    pytest.skip(f"{DATA} (Multi30k and WikiText-2) is absent", allow_module_level=True)
sys.path.insert(0, str(REPO / "experiments"))

import acr_training
import converged
import gradient_vs_random
import summarize
import where_fragile

from lab import docs, methods, tasks

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
    argv = ["--eps", "0.1", "1", "10", "--small-n", "20", "--trials", "3", "--pgd-steps", "2"]
    records = gradient_vs_random.main(_args(tmp_path, cache, *argv, "--results", str(tmp_path / "results")))
    assert [(r["task"], r["steps"], r["seed"], r["best_step"]) for r in records] == [
        ("de_en", 3, 0, None),
        ("lm", 3, 0, None),
    ]
    rows = [row for record in records for row in record["rows"]]
    assert len(rows) == 2 * 3 * 2 * 3  # tasks x methods x n x eps
    assert {r["draws"] for r in rows if r["method"] == "random"} == {3}
    assert {r["draws"] for r in rows if r["method"] != "random"} == {1}
    assert {r["metric"] for r in rows} == {"bleu", "perplexity"}
    key = lambda r: (r["task"], r["n"], r["eps"])
    gradient = {key(r): r["delta_loss_mean"] for r in rows if r["method"] == "gradient"}
    for r in rows:
        if r["method"] == "pgd":  # PGD keeps its best iterate, the gradient corruption being the first one
            assert r["delta_loss_mean"] >= gradient[key(r)]
        if r["task"] == "lm":  # perplexity is exp of the same mean loss
            assert r["metric_clean"] == pytest.approx(math.exp(r["loss_clean"]), rel=1e-6)
    tables = summarize.tables(tmp_path / "results")
    for task in ("de_en", "lm"):
        lines = tables[f"corruption-{task}"].splitlines()
        assert [line for line in lines if line.startswith("**")] == [
            line for line in lines if line.startswith(f"**{docs.MODEL[task]}, n = ")
        ]
        assert len(lines) == 2 * (4 + 3) + 1  # per n: caption, blank, header, rule, 3 eps; a blank between
    figures = summarize.figures(tmp_path / "results", tmp_path)
    assert [p.name for p in figures[:2]] == ["de_en_corruption.png", "lm_corruption.png"]
    assert all(p.stat().st_size > 0 for p in figures[:2])


def test_where_fragile(tmp_path, cache):
    argv = ["--eps", "1", "2", "--paper-eps", "0.1", "1", "--paper-n-type", "3", "--paper-n-layer", "5"]
    records = where_fragile.main(_args(tmp_path, cache, *argv, "--results", str(tmp_path / "results")))
    assert [r["task"] for r in records] == ["de_en", "lm"]
    for record in records:
        rows = record["rows"]
        assert (record["steps"], record["seed"], record["best_step"]) == (3, 0, None)
        if record["task"] == "de_en":  # 200 training pairs (the LM's 200 lines make another number of blocks)
            assert record["epochs"] == pytest.approx(3 * 8 / 200)
        for by, n in (("type", 3), ("layer", 5)):
            at = [r for r in rows if r["by"] == by]
            groups = dict.fromkeys(r["group"] for r in at)
            total = sum({r["group"]: r["num_params"] for r in at}.values())  # the groups partition the parameters
            assert len(at) == len(groups) * (2 + 2 + 2)  # paper, same_eps, per_param views x 2 eps each
            assert {(r["view"], r["p"], r["n"], r["eps"]) for r in at} == {
                *(("paper", math.inf, n, e) for e in (0.1, 1.0)),
                *((view, 2.0, None, e) for view in ("same_eps", "per_param") for e in (1.0, 2.0)),
            }
            for r in at:
                scale = math.sqrt(r["num_params"] / total) if r["view"] == "per_param" else 1.0
                assert r["eps_applied"] == pytest.approx(r["eps"] * scale, rel=1e-12)
        assert "norm" in {r["group"] for r in rows if r["by"] == "type"}
    paths = sorted((tmp_path / "results" / "where_fragile").glob("*/*.json"))
    assert [p.parent.name for p in paths] == ["de_en", "lm"]
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert where_fragile.main(_args(tmp_path, cache, *argv, "--results", str(tmp_path / "results"))) == records
    assert [p.stat().st_mtime_ns for p in paths] == stamps  # existing records are skipped, not rewritten
    assert sorted(summarize.tables(tmp_path / "results")) == sorted(
        n for n in summarize.TABLES if n.startswith("fragile-")
    )
    figures = summarize.figures(tmp_path / "results", tmp_path)
    assert len(figures) == 2 * 2 * 3 and all(p.stat().st_size > 0 for p in figures)


CONVERGED = ["--width", "16", "--layers", "1", "--eval-every", "2", "--patience", "1", "--max-steps", "4"]
CONVERGED += ["--num-seeds", "1", "--vocab", "200", "--batch-size", "8", "--threads", "1"]


def test_converged(tmp_path, cache):
    argv = [*CONVERGED, "--sweep-eps", "0.1", "0.5", "--eval-eps", "1"]
    common = ["--data", str(DATA), "--cache", str(cache), "--results", str(tmp_path), "--block-size", "16"]
    common += ["--test-blocks", "64", "--heldout", "0.02"]
    records = converged.main([*common, *argv])
    chosen = min((r for r in records if r["method"] == "acr"), key=lambda r: r["validation"]["loss"])
    eps = chosen["settings"]["method"]["eps"]
    num_params = records[0]["num_params"]
    # The final rows equal to sweep runs (seed 0 AdamW, ACR at the chosen eps) are not run again.
    assert [(r["method"], r["settings"]["stage"]) for r in records] == [
        ("adamw", "sweep"),
        ("acr", "sweep"),
        ("acr", "sweep"),
        ("sam", "final"),
        ("acr_inf", "final"),
        ("adamw_2x", "final"),
    ]
    methods = {r["method"]: r["settings"]["method"] for r in records}
    adamw_ppl, acr_ppl, inf_ppl = (r["test"]["perplexity"] for r in (records[0], chosen, records[4]))
    inf_eps = eps / math.sqrt(num_params)
    assert methods["acr_inf"] == {"name": "acr_inf", "eps": inf_eps, "p": math.inf, "alpha": 0.5, "budget": 1}
    assert methods["sam"] == {"name": "sam", "eps": eps, "p": 2.0, "alpha": 1.0, "budget": 1}
    assert methods["adamw_2x"] == {"name": "adamw_2x", "eps": None, "p": 2.0, "alpha": 0.5, "budget": 2}
    for r in records:
        cap = 8 if r["method"] == "adamw_2x" else 4
        assert (r["task"], r["metric"], r["settings"]["family"]) == ("lstm", "perplexity", "lstm")
        assert 2 <= r["best_step"] <= r["steps"] <= cap and r["steps"] % 2 == 0
        assert r["test"]["perplexity"] == pytest.approx(math.exp(r["test"]["loss"]), rel=1e-6)
        assert [c["eps"] for c in r["test"]["corrupted"]] == [1.0]
        assert set(r["validation"]) == {"loss", "corrupted"}  # held-out data: losses only
    # Finding 2 on the converged AdamW model: the paper's protocol, each group alone, on the held-out data.
    assert [bool(r["fragility"]) for r in records] == [True, False, False, False, False, False]
    fragility = records[0]["fragility"]
    assert {(f["by"], f["group"]) for f in fragility} == {
        *(("type", g) for g in ("embedding", "other", "feed_forward")),  # the LSTM's weights are "other"
        *(("layer", g) for g in ("embed", "lstm", "out")),
    }
    for f in fragility:
        assert (f["view"], f["p"], f["n"]) == ("paper", math.inf, {"type": 10, "layer": 100}[f["by"]])
        assert f["loss_clean"] == pytest.approx(records[0]["validation"]["loss"], rel=1e-6)
    assert sorted({f["eps"] for f in fragility}) == where_fragile.PAPER_EPS
    assert len(list(tmp_path.glob("converged/lstm/*.json"))) == 6
    assert converged.main([*common, *argv]) == []  # every run has its record: nothing to do
    tables = summarize.tables(tmp_path)
    assert {n for n in tables if n.startswith("converged-")} == {
        "converged-lstm-sweep",
        "converged-lstm",
        "converged-lstm-runs",
        "converged-lstm-fragile",
    }
    fragile = tables["converged-lstm-fragile"].splitlines()
    assert fragile[0] == "**lstm, AdamW at convergence (held-out ΔL, mean of 1 run)**, n = 10, L-inf"
    at = {(f["by"], f["group"], f["eps"]): f["delta_loss"] for f in records[0]["fragility"]}
    assert fragile[2:4] == ["| eps | embedding | other | feed_forward | most fragile |", "|---|---|---|---|---|"]
    cells = fragile[6].removeprefix("| ").removesuffix(" |").split(" | ")  # eps 0.2, the paper's Transformer eps
    assert cells[0] == "0.2"
    assert [float(c) for c in cells[1:4]] == [
        pytest.approx(at["type", g, 0.2], rel=5e-3)
        for g in ("embedding", "other", "feed_forward")  # 3 digits
    ]
    assert cells[4] == max(("embedding", "other", "feed_forward"), key=lambda g: at["type", g, 0.2])
    assert summarize.figures(tmp_path, tmp_path) == [tmp_path / "converged_lstm.png"]
    sweep = tables["converged-lstm-sweep"].splitlines()
    assert [line.split(" | ")[0] for line in sweep[2:]] == [
        "| adamw",
        "| acr (eps 0.1, p 2, alpha 0.5)",
        "| acr (eps 0.5, p 2, alpha 0.5)",
    ]
    # A final row run at another eps (--final-eps, a bet on the sweep that lost) stays out of the final table.
    lost_bet = json.loads(next(tmp_path.glob("converged/lstm/sam-*.json")).read_text())
    lost_bet["settings"]["method"]["eps"] = 3 * eps
    (tmp_path / "converged" / "lstm" / "sam-seed0-lostbet.json").write_text(json.dumps(lost_bet))
    assert summarize.tables(tmp_path)["converged-lstm"] == tables["converged-lstm"]
    final = [line.split(" | ") for line in tables["converged-lstm"].splitlines()[2:]]
    delta = {r["method"]: r["test"]["corrupted"][0]["delta_loss"] for r in (*records[3:], records[0], chosen)}
    sam_ppl = records[3]["test"]["perplexity"]
    assert [(row[0], row[1], row[-4], row[-2]) for row in final] == [  # the paired columns (Welch's beside them)
        ("| adamw", "1", "-", "-"),
        *(
            (label, "1", f"{ppl - adamw_ppl:+.2f} (1 seed)", f"{delta[m] - delta['adamw']:+.3f} (1 seed)")
            for m, label, ppl in (
                ("acr", f"| acr (eps {eps:.3g}, p 2, alpha 0.5)", acr_ppl),
                ("acr_inf", f"| acr_inf (eps {inf_eps:.3g}, p inf, alpha 0.5)", inf_ppl),
                ("sam", f"| sam (eps {eps:g}, p 2, alpha 1)", sam_ppl),
                ("adamw_2x", "| adamw_2x", records[5]["test"]["perplexity"]),
            )
        ),
    ]
    # A run on a GPU pairs with the AdamW run of its seed on that GPU (the same arithmetic); an AdamW run of a seed on
    # another device is one more AdamW run.
    for record, name, shift in ((records[0], "adamw", 1.0), (records[3], "sam", 1.5)):
        twin = {**record, "environment": {**record["environment"], "device": "cuda: NVIDIA H200"}}
        twin["test"] = {**record["test"], "perplexity": record["test"]["perplexity"] + shift}
        (tmp_path / "converged" / "lstm" / f"{name}-seed0.h200.json").write_text(json.dumps(twin))
    tables = summarize.tables(tmp_path)
    rows = {row[0]: row for row in (line.split(" | ") for line in tables["converged-lstm"].splitlines()[2:])}
    # with two devices: paired on the same device, paired across devices, Welch; then ΔL paired and Welch
    acr = rows[final[1][0]]
    assert rows["| adamw"][1] == "2" and (acr[-5], acr[-2]) == (final[1][-4], final[1][-2])  # ACR (CPU): CPU AdamW
    sam = rows[final[3][0]]
    assert sam[1] == "2" and sam[-5].startswith(f"{sam_ppl - adamw_ppl + 0.25:+.2f} ± ") and "(2 seeds" in sam[-5]
    assert [line.split(" | ")[-2:] for line in tables["converged-lstm-sweep"].splitlines()[2:4]] == [
        [f"{records[0]['train_seconds']:.0f}", "cpu |"],
        [f"{records[0]['train_seconds']:.0f}", "H200 |"],
    ]


def test_converged_final_eps_runs_the_final_rows_beside_the_sweep_until_it_has_chosen(tmp_path):
    argv = ["--data", str(DATA), "--results", str(tmp_path), "--sweep-eps", "0.1", "0.5"]
    num_params = 10_000

    def final_rows(*extra: str) -> list[tuple[str, float | None, int]]:
        plan = converged.plan(converged.arguments([*argv, "--num-seeds", "2", *extra]), num_params)
        return [(m.name, m.eps, seed) for m, seed, stage in plan if stage == "final"]

    every = ["adamw", "acr", "sam", "acr_inf", "adamw_2x"]
    assert [m for m, _, _ in final_rows()] == ["adamw", "adamw", "adamw_2x", "adamw_2x"]  # no eps yet
    bet = final_rows("--final-eps", "0.5")
    assert [m for m, _, seed in bet if seed == 0] == every
    assert {(m, e) for m, e, _ in bet} >= {("acr", 0.5), ("sam", 0.5), ("acr_inf", 0.5 / math.sqrt(num_params))}

    def sweep_record(eps: float, loss: float) -> None:
        record = {"task": "lstm", "method": "acr", "validation": {"loss": loss}}
        record["settings"] = {"stage": "sweep", "method": {"eps": eps}}
        (tmp_path / "converged" / "lstm").mkdir(parents=True, exist_ok=True)
        (tmp_path / "converged" / "lstm" / f"acr-{eps}.json").write_text(json.dumps(record))

    sweep_record(0.5, 4.0)
    assert final_rows("--final-eps", "0.5") == bet  # the sweep is unfinished: the bet stands
    sweep_record(0.1, 3.9)
    assert {(m, e) for m, e, _ in final_rows("--final-eps", "0.5") if m in ("acr", "sam")} == {
        ("acr", 0.1),
        ("sam", 0.1),
    }  # the sweep has chosen: its eps replaces the bet


def test_workers_split_the_plan(tmp_path, cache):
    argv = [*CONVERGED, "--sweep-eps", "0.1", "--eval-eps", "1", "--data", str(DATA), "--cache", str(cache)]
    argv += ["--results", str(tmp_path / "results"), "--block-size", "16", "--test-blocks", "16", "--heldout", "0.02"]
    script = REPO / "experiments" / "workers.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(script), "2", "600", str(tmp_path / "logs"), *argv],
        check=False,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "workers: 2 for 600s, MPS off" and lines[1].startswith("workers: stopped after")
    recorded = sorted(p.stem for p in (tmp_path / "results" / "converged" / "lstm").glob("*.json"))
    assert [r.split("-seed")[0] for r in recorded] == ["acr", "acr_inf", "adamw", "adamw_2x", "sam"]
    written = [line.split(":")[0] for line in lines[2:] if " -> " in line]
    assert sorted(written) == recorded  # every run once, by one worker or the other
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {"worker-1.log", "worker-2.log"}
    assert not list((tmp_path / "results").glob("**/*.claim"))


def _identical(a: object, b: object) -> bool:
    """Bitwise the same tensors, in the same nesting of dicts and sequences, with equal other entries (strings)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_identical, a, b))
    return a == b


def test_converged_run_resumes_bit_for_bit(tmp_path, cache, monkeypatch):
    # Every evaluation after the first fails to improve by --min-delta 10: the lr decays after the resumption too.
    argv = [*CONVERGED, "--data", str(DATA), "--cache", str(cache), "--block-size", "16", "--heldout", "0.02"]
    args = converged.arguments([*argv, "--max-steps", "8", "--patience", "9", "--min-delta", "10"])
    data = tasks.lm_family(args)
    method = methods.acr("acr", 0.5)  # ACR's and AdamW's state, dropout's RNG

    def fit(checkpoint: Path, init_seed: int) -> tuple[torch.nn.Module, dict]:
        torch.manual_seed(init_seed)
        model = data.new_model()
        return model, converged.fit(model, data, method, 0, args, checkpoint)

    whole, fitted = fit(tmp_path / "whole.pt", 0)
    evaluations = []

    def killed_at_third(model, batches):
        evaluations.append(None)
        if len(evaluations) == 3:
            raise KeyboardInterrupt
        return mean_loss(model, batches)

    mean_loss = converged.mean_loss
    monkeypatch.setattr(converged, "mean_loss", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "stopped.pt", 0)
    monkeypatch.undo()
    resumed, refitted = fit(tmp_path / "stopped.pt", 1)  # another init and RNG: the checkpoint replaces both
    assert {k: v for k, v in refitted.items() if k != "train_seconds"} == {
        **{k: v for k, v in fitted.items() if k != "train_seconds"},
        "resumed_at": [4],
    }
    assert fitted["resumed_at"] == [] and fitted["steps"] == 8 and fitted["best_step"] == 2
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the best checkpoint, from before the kill
    # The state after the last step, saved at the last evaluation: the weights, AdamW's moments and decayed lr,
    # the data order and the RNG are those of the run that was never stopped.
    saved = [torch.load(tmp_path / name) for name in ("whole.pt", "stopped.pt")]
    for key in ("model", "optimizer", "order", "rng", "queue", "step", "bad"):
        assert _identical(saved[0][key], saved[1][key]), key
    assert saved[1]["optimizer"]["param_groups"][0]["lr"] == args.lr * args.lr_decay**3
    # A run in progress goes on only on the device it trained on: its record names one.
    assert saved[1]["device"] == "cpu"
    torch.save({**saved[1], "device": "cuda"}, tmp_path / "stopped.pt")
    with pytest.raises(SystemExit, match=r"--device cpu: .*stopped.pt holds a run in progress on cuda.*--device cuda"):
        fit(tmp_path / "stopped.pt", 0)


@pytest.mark.parametrize("family", ["gpt2", "marian"])
def test_converged_families(tmp_path, cache, family):
    argv = [*CONVERGED, "--family", family, "--sweep-eps", "0.1", "--eval-eps", "0.5", "1", "--test-blocks", "8"]
    argv += ["--data", str(DATA), "--cache", str(cache), "--results", str(tmp_path), "--beams", "2"]
    if family == "gpt2":
        argv += ["--block-size", "16", "--heldout", "0.02"]
    records = converged.main(argv)
    assert [(r["method"], r["seed"]) for r in records] == [
        ("adamw", 0),
        ("acr", 0),
        ("sam", 0),
        ("acr_inf", 0),
        ("adamw_2x", 0),
    ]
    metric = {"gpt2": "perplexity", "marian": "bleu"}[family]
    for r in records:
        assert (r["task"], r["metric"], r["settings"]["family"]) == (family, metric, family)
        assert r["settings"]["label_smoothing"] == (0.1 if family == "marian" else 0.0)
        assert r["settings"]["dropout"] == 0.1
        assert [c["eps"] for c in r["test"]["corrupted"]] == [0.5, 1.0]
        assert all(metric in c for c in r["test"]["corrupted"]) and metric in r["test"]
        assert 0 <= r["test"][metric] and (metric == "bleu") == (r["test"][metric] <= 100)
    groups = {f["group"] for f in records[0]["fragility"] if f["by"] == "type"}
    assert groups == {"embedding", "attention", "feed_forward", "norm"}
    model = converged.arguments(argv)
    assert (model.width, model.dropout) == (16, 0.1)
    tables = summarize.tables(tmp_path)
    final = tables[f"converged-{family}"].splitlines()
    assert "| rank of norm |" in tables[f"converged-{family}-fragile"].splitlines()[2]
    assert summarize.figures(tmp_path, tmp_path) == [tmp_path / f"converged_{family}.png"]
    assert final[0].startswith(f"| method | runs | best step | test {summarize.SHORT[metric]} |")
    assert [line.split(" | ")[0] for line in final[2:]][-1] == "| adamw_2x"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--family", "gpt2", "--label-smoothing", "0.1"], "--label-smoothing 0.1: only the marian family"),
        (["--dropout", "1"], "argument --dropout: must be in [0, 1), got 1"),
        (["--heldout", "-0.1"], "argument --heldout: must be in [0, 1), got -0.1"),
        (["--min-delta", "-1"], "argument --min-delta: must be a float >= 0, got -1"),
        (["--lr-decay", "1.5"], "argument --lr-decay:"),
        (["--steps", "100"], "unrecognized arguments: --steps 100"),  # the fixed-budget flags do not apply here
        (["--final-eps", "-1"], "argument --final-eps:"),
        (["--device", "tpu"], "argument --device: must be a torch device such as cpu or cuda, got tpu"),
        (["--device", "mps"], "argument --device: must be cpu or a cuda device, got mps"),
        pytest.param(
            ["--device", "cuda"],
            "argument --device: cuda: this machine has no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device"),
        ),
    ],
)
def test_converged_refuses_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit):
        converged.arguments(argv)
    assert message in capsys.readouterr().err


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


def test_converged_runs_a_planned_studys_final_rows_alone(tmp_path, cache):
    common = ["--data", str(DATA), "--cache", str(cache), "--results", str(tmp_path), "--block-size", "16"]
    common += ["--test-blocks", "64", "--heldout", "0.02", *CONVERGED, "--eval-eps", "1"]
    study = ["--seeds", "3", "--arms", "adamw", "acr", "--final-eps", "0.1", "--plan", "finding3-fresh-seeds.md"]
    study += ["--faults", "int8", "flip:1e-3:int8", "--trials", "2"]
    records = converged.main([*common, *study])
    # the two arms of seed 3 alone: no sweep run at --seed, no other arm
    assert [(r["method"], r["seed"], r["settings"]["stage"]) for r in records] == [
        ("adamw", 3, "final"),
        ("acr", 3, "final"),
    ]
    for r in records:
        assert r["plan"] == "finding3-fresh-seeds.md" and "plan" not in r["settings"]  # run ids as before
        for split in ("validation", "test"):
            faults = {f["fault"]: f for f in r[split]["faults"]}
            assert list(faults) == ["int8", "flip:1e-3:int8"] and faults["flip:1e-3:int8"]["trials"] == 2
            assert [c["eps"] for c in r[split]["corrupted"]] == [1.0]
    with pytest.raises(SystemExit):
        converged.main([*common, "--arms", "adamw"])  # --arms needs --seeds
    with pytest.raises(SystemExit):
        converged.main([*common, *study[:7], "--plan", "no-such-plan.md"])  # a plan must be committed first
