#!/usr/bin/env python
"""The generated tables (and figures) of docs/results.md, from the run records in ``experiments/results/``.

    python experiments/summarize.py               # print every table
    python experiments/summarize.py --write-docs  # rewrite them in docs/results.md, and redraw the figures

In the markdown a generated table sits between ``<!-- table:NAME -->`` and ``<!-- /table -->`` (:mod:`lab.docs`);
``--write-docs`` replaces what is between the markers and nothing else, and
tests/test_experiments_records.py checks that the committed page is what this prints.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab import docs, stats
from lab.records import RESULTS, chosen_eps, load_records

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results.md"
FIGURES = DOCS.parent / "images" / "results"
FINAL_METHODS = ("adamw", "acr", "acr_inf", "sam", "adamw_2x")
VIEW = {
    "paper": "paper: L-inf, n entries",
    "same_eps": "L2, all entries, same eps",
    "per_param": "L2, all entries, same RMS per entry",
}


def _g(x: float) -> str:
    """3 significant digits: 0.0123, 4.56, 7,890, 1.2e8 (no ``e+0`` clutter)."""
    if not math.isfinite(x):
        return str(x)
    rounded = float(f"{x:.3g}")
    if 1e3 <= abs(rounded) < 1e6:
        return f"{rounded:,.0f}"
    return f"{rounded:.3g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def corruption(records: list[dict[str, Any]], task: str) -> str | None:
    """Finding 1: metric and loss increase against eps for the gradient, PGD and random corruptions, per n."""
    record = next((r for r in records if r["task"] == task), None)
    if record is None:
        return None
    rows = record["rows"]
    first = rows[0]
    metric = first["metric"]
    lines = []
    for n in dict.fromkeys(r["n"] for r in rows):
        at = {(r["method"], r["eps"]): r for r in rows if r["n"] == n}
        draws = at["random", first["eps"]]["draws"]
        lines += [
            (
                f"**{docs.MODEL[task]}, n = {n}** (clean {metric} {first['metric_clean']:.2f}, clean loss "
                f"{first['loss_clean']:.3f}; random: mean ± std over {draws} draws)"
            ),
            "",
            (
                f"| eps | {metric} gradient | {metric} PGD | {metric} random | ΔL gradient | ΔL PGD | ΔL random "
                "| ΔL gradient / random |"
            ),
            "|---|---|---|---|---|---|---|---|",
        ]
        for eps in dict.fromkeys(r["eps"] for r in rows if r["n"] == n):
            g, pgd, rnd = at["gradient", eps], at["pgd", eps], at["random", eps]
            ratio = _g(g["delta_loss_mean"] / rnd["delta_loss_mean"]) if rnd["delta_loss_mean"] > 0 else "-"
            cells = [
                f"{eps:g}",
                _g(g["metric_mean"]),
                _g(pgd["metric_mean"]),
                f"{_g(rnd['metric_mean'])} ± {_g(rnd['metric_std'])}",
                _g(g["delta_loss_mean"]),
                _g(pgd["delta_loss_mean"]),
                f"{_g(rnd['delta_loss_mean'])} ± {_g(rnd['delta_loss_std'])}",
                ratio,
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines[:-1])


def _eps_rows(rows: list[dict[str, Any]], by: str, view: str) -> dict[float, list[dict[str, Any]]]:
    """``{eps: rows}`` of one grouping and view, each list from most to least fragile (largest loss increase first)."""
    out: dict[float, list[dict[str, Any]]] = {}
    for row in rows:
        if (row["by"], row["view"]) == (by, view):
            out.setdefault(row["eps"], []).append(row)
    return {eps: sorted(rows, key=lambda r: -r["delta_loss"]) for eps, rows in sorted(out.items())}


def _rank(rows: list[dict[str, Any]], group: str) -> str:
    return f"{[r['group'] for r in rows].index(group) + 1} of {len(rows)}"


def _paper_lines(rows: list[dict[str, Any]], by: str, title: str) -> list[str]:
    """One model's ΔL of every ``by`` group under the paper's protocol, a line per eps (and where ``norm`` ranks, with
    the most fragile group's ΔL over norm's)."""
    at = _eps_rows(rows, by, "paper")
    groups = list(dict.fromkeys(r["group"] for r in rows if r["by"] == by))
    has_norm = by == "type" and "norm" in groups
    n = next(iter(at.values()))[0]["n"]
    lines = [
        f"**{title}**, n = {n}, L-inf",
        "",
        "| eps | "
        + " | ".join(groups)
        + " | most fragile"
        + (" | rank of norm | most fragile / norm |" if has_norm else " |"),
        "|---|" + "---|" * (len(groups) + 1 + 2 * has_norm),
    ]
    for eps, ranked in at.items():
        delta = {r["group"]: r["delta_loss"] for r in ranked}
        cells = [f"{eps:g}", *(_g(delta[g]) for g in groups), ranked[0]["group"]]
        if has_norm:
            cells += [_rank(ranked, "norm"), _g(ranked[0]["delta_loss"] / delta["norm"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def fragile_paper(records: list[dict[str, Any]], by: str) -> str:
    """ΔL of every group under the paper's protocol, one line per (model, eps)."""
    lines = []
    for record in records:
        lines += [*_paper_lines(record["rows"], by, docs.MODEL[record["task"]]), ""]
    return "\n".join(lines[:-1])


def fragile_l2(records: list[dict[str, Any]], by: str) -> str:
    """The L2 views: ranking at eps 1, and (by type) where ``norm`` ranks at every eps."""
    grid = sorted({eps for r in records for eps in _eps_rows(r["rows"], by, "same_eps")})
    tail = " | rank of norm at eps " + ", ".join(f"{e:g}" for e in grid) if by == "type" else ""
    lines = [f"| model | budget | most to least fragile at eps 1 (ΔL){tail} |", "|---|---|---|" + "---|" * bool(tail)]
    for record in records:
        for view in ("same_eps", "per_param"):
            at = _eps_rows(record["rows"], by, view)
            ranking = ", ".join(f"{r['group']} {_g(r['delta_loss'])}" for r in at[1.0])
            cells = [docs.MODEL[record["task"]], VIEW[view], ranking]
            if by == "type":
                cells.append(", ".join(_rank(at[eps], "norm").split()[0] for eps in grid))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fixed_budget_runs(records: list[dict[str, Any]]) -> str:
    """The probed models: training budget, time and clean loss on the evaluation data."""
    lines = [
        "| model | parameters | steps | epochs | train s | probe s | final train loss | clean eval loss | eval data |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        cells = [
            docs.MODEL[r["task"]],
            f"{r['num_params']:,}",
            str(r["steps"]),
            f"{r['epochs']:.2f}",
            f"{r['train_seconds']:.0f}",
            f"{r['probe_seconds']:.0f}",
            f"{r['final_train_loss']:.3f}",
            f"{r['rows'][0]['loss_clean']:.3f}",  # every row of a record probes the same clean model
            r["eval_data"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _at(scores: dict[str, Any], eps: float) -> dict[str, Any]:
    return next(c for c in scores["corrupted"] if c["eps"] == eps)


def _label(record: dict[str, Any]) -> str:
    m = record["settings"]["method"]
    if m["eps"] is None:
        return record["method"]
    return f"{record['method']} (eps {m['eps']:.3g}, p {m['p']:g}, alpha {m['alpha']:g})"


SHORT = {"perplexity": "ppl", "bleu": "BLEU"}


def _metric(record: dict[str, Any]) -> str:
    return record.get("metric", "perplexity")


def _device(record: dict[str, Any]) -> str:
    """Where a run trained: ``cpu``, or the GPU's name without its maker (records before ``--device`` are CPU runs)."""
    return record["environment"].get("device", "cpu").removeprefix("cuda: ").removeprefix("NVIDIA ")


def converged_sweep(records: list[dict[str, Any]], family: str) -> str | None:
    """The sweep of one converged family (one seed): every point, held-out loss and test results."""
    sweep = [r for r in records if r["task"] == family and r["settings"]["stage"] == "sweep"]
    if not sweep:
        return None
    metric, grid = _metric(sweep[0]), [c["eps"] for c in sweep[0]["test"]["corrupted"]]
    short = SHORT[metric]
    adamw = {_device(r): r for r in sweep if r["method"] == "adamw"}
    lines = [
        f"| run | best step (epochs) | stopped | held-out loss | test {short} | "
        + " | ".join(f"{short}, eps {e:g}" for e in grid)
        + f" | test ΔL, eps 1 | test {short} - AdamW (same device) | ΔL eps 1 vs AdamW (same device) "
        + "| train s | device |",
        "|---|---|---|---|---|" + "---|" * len(grid) + "---|---|---|---|---|",
    ]
    for r in sorted(sweep, key=lambda r: (r["settings"]["method"]["eps"] or 0.0, _device(r) != "cpu")):
        base = None if r["method"] == "adamw" else adamw.get(_device(r))
        delta = _at(r["test"], 1.0)["delta_loss"]
        cells = [
            _label(r),
            f"{r['best_step']} ({r['epochs']:.1f})",
            r["stopped"],
            f"{r['validation']['loss']:.4f}",
            f"{r['test'][metric]:.2f}",
            *(f"{_at(r['test'], e)[metric]:.2f}" for e in grid),
            _g(delta),
            "-" if base is None else f"{r['test'][metric] - base['test'][metric]:+.2f}",
            "-" if base is None else f"{100 * (delta / _at(base['test'], 1.0)['delta_loss'] - 1):+.0f} %",
            f"{r['train_seconds']:.0f}",
            _device(r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paired(diffs: list[float], digits: int) -> str:
    """Mean paired difference with the half-width of its 95% t-interval, and how many differences are above and below
    0."""
    if not diffs:
        return "-"
    if len(diffs) == 1:
        return f"{diffs[0]:+.{digits}f} (1 seed)"
    signs = f"{sum(d > 0 for d in diffs)} +, {sum(d < 0 for d in diffs)} -"
    return f"{docs.interval(*stats.t_interval(diffs), f'.{digits}f')} ({len(diffs)} seeds: {signs})"


def _welch(runs: list[float], base: list[float], digits: int) -> str:
    """Unpaired: the difference of the two means with the half-width of its 95% Welch interval, and Welch's p-value."""
    diff, half, p = stats.welch(runs, base)
    return f"{docs.interval(diff, half, f'.{digits}f')} (p {p:.2g})"


def _l2_eps(record: dict[str, Any]) -> float:
    """The L2 norm of a converged run's corruption when every entry moves: ``eps``, or ``eps * sqrt(N)`` for L-inf."""
    m = record["settings"]["method"]
    return m["eps"] * math.sqrt(record["num_params"]) if m["p"] == math.inf else m["eps"]


def _final_rows(records: list[dict[str, Any]], eps: float | None) -> list[dict[str, Any]]:
    """The runs of the final rows at the sweep's ``eps`` (AdamW's alone while it is ``None``): final rows run at another
    eps (``converged.py --final-eps``, a bet on the sweep that lost) are left out."""
    return [
        r
        for r in records
        if r["settings"]["method"]["eps"] is None or eps is not None and math.isclose(_l2_eps(r), eps)
    ]


Runs = dict[tuple[int, str], dict[str, Any]]  # AdamW runs by (seed, device)


def _twin(run: dict[str, Any], adamw: Runs, same_device: bool) -> dict[str, Any] | None:
    """The AdamW run of ``run``'s seed on ``run``'s device (``same_device``) or on another device, if there is one."""
    here = _device(run)
    twins = [r for (seed, device), r in adamw.items() if seed == run["seed"] and (device == here) == same_device]
    return twins[0] if twins else None


def _final(records: list[dict[str, Any]], family: str) -> tuple[list[dict[str, Any]], Runs] | None:
    """The runs of one family's final rows and its AdamW runs by ``(seed, device)``; ``None`` before ``eps*`` is
    known.  The runs of a planned study (a record naming its ``plan``) belong to that study's own tables."""
    records = [r for r in records if r["task"] == family and "plan" not in r]
    eps = chosen_eps(records)
    if eps is None:
        return None
    rows = _final_rows(records, eps)
    return rows, {(r["seed"], _device(r)): r for r in rows if r["method"] == "adamw"}


def _delta(run: dict[str, Any]) -> float:
    return _at(run["test"], 1.0)["delta_loss"]


def converged_final(records: list[dict[str, Any]], family: str) -> str | None:
    """The final rows of one family (mean ± std over runs) and their differences to AdamW, for the clean test metric
    and the test loss increase at eps 1: paired, per run against the AdamW run of the same seed on the same device (the
    same initial weights and batch order, the same arithmetic; mean ± 95% t half-width, and the signs of the
    differences); where a seed ran on two devices, the metric also against the AdamW run of the seed on the other
    device; and unpaired, against every AdamW run (difference of the means ± 95% Welch half-width, Welch's p)."""
    final = _final(records, family)
    if final is None:
        return None
    rows, adamw = final
    metric, grid = _metric(rows[0]), [c["eps"] for c in rows[0]["test"]["corrupted"]]
    short = SHORT[metric]
    two_devices = len({device for _, device in adamw}) > 1
    lines = [
        f"| method | runs | best step | test {short} | "
        + " | ".join(f"{short}, eps {e:g}" for e in grid)
        + f" | ΔL, eps 1 | {short} - AdamW (paired, 95% CI, signs)"
        + (f" | {short} - AdamW of the seed on the other device (paired)" if two_devices else "")
        + f" | {short} - AdamW (unpaired, Welch 95% CI) | ΔL eps 1 - AdamW (paired, 95% CI, signs) "
        + "| ΔL eps 1 - AdamW (unpaired, Welch 95% CI) |",
        "|---|---|---|---|" + "---|" * (len(grid) + 5 + two_devices),
    ]
    for method in FINAL_METHODS:
        runs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seed"])
        if not runs:
            continue

        def paired(value: Callable[[dict[str, Any]], float], same_device: bool, digits: int) -> str:
            twins = [] if method == "adamw" else [(r, _twin(r, adamw, same_device)) for r in runs]
            return _paired([value(r) - value(twin) for r, twin in twins if twin is not None], digits)

        def unpaired(value: Callable[[dict[str, Any]], float], digits: int) -> str:
            if method == "adamw":
                return "-"
            return _welch([value(r) for r in runs], [value(r) for r in adamw.values()], digits)

        def clean(run: dict[str, Any]) -> float:
            return run["test"][metric]

        cells = [
            _label(runs[0]),
            str(len(runs)),
            docs.mean_std([r["best_step"] for r in runs], ".0f"),
            docs.mean_std([clean(r) for r in runs], ".2f"),
            *(docs.mean_std([_at(r["test"], e)[metric] for r in runs], ".2f") for e in grid),
            docs.mean_std([_delta(r) for r in runs], ".4f"),
            paired(clean, True, 2),
            *([paired(clean, False, 2)] if two_devices else []),
            unpaired(clean, 2),
            paired(_delta, True, 3),
            unpaired(_delta, 3),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def converged_runs(records: list[dict[str, Any]], family: str) -> str | None:
    """Every run of the final rows: where it trained, its held-out loss and test results, and its differences to the
    AdamW run of its seed on its device (the pairs of the final table) and, where the seed also ran on another device,
    to that one."""
    final = _final(records, family)
    if final is None:
        return None
    rows, adamw = final
    short = SHORT[_metric(rows[0])]
    two_devices = len({device for _, device in adamw}) > 1
    lines = [
        f"| method | seed | device | best step | held-out loss | test {short} | ΔL, eps 1 "
        + f"| {short} - AdamW (same seed, same device) | ΔL eps 1 - AdamW (same seed, same device)"
        + (f" | {short} - AdamW (same seed, other device)" if two_devices else "")
        + " |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * two_devices,
    ]
    for r in sorted(rows, key=lambda r: (FINAL_METHODS.index(r["method"]), r["seed"], _device(r) != "cpu")):
        same, other = (None, None) if r["method"] == "adamw" else (_twin(r, adamw, True), _twin(r, adamw, False))
        metric = _metric(r)
        cells = [
            r["method"],
            str(r["seed"]),
            _device(r),
            str(r["best_step"]),
            f"{r['validation']['loss']:.4f}",
            f"{r['test'][metric]:.2f}",
            f"{_delta(r):.3f}",
            "-" if same is None else f"{r['test'][metric] - same['test'][metric]:+.2f}",
            "-" if same is None else f"{_delta(r) - _delta(same):+.3f}",
        ]
        if two_devices:
            cells.append("-" if other is None else f"{r['test'][metric] - other['test'][metric]:+.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def converged_fragile(records: list[dict[str, Any]], family: str) -> str | None:
    """Finding 2 at convergence: each group's held-out ΔL under the paper's protocol, by type then by layer, averaged
    over the converged AdamW seeds (the models the paper probes)."""
    runs = [
        r for r in records if r["task"] == family and r["method"] == "adamw" and "fragility" in r and "plan" not in r
    ]
    if not runs:
        return None
    cells: dict[tuple[str, str, str, float], list[float]] = {}
    for run in runs:
        for row in run["fragility"]:
            cells.setdefault((row["by"], row["view"], row["group"], row["eps"]), []).append(row["delta_loss"])
    first = runs[0]["fragility"]
    mean = [
        {**row, "delta_loss": statistics.fmean(cells[row["by"], row["view"], row["group"], row["eps"]])}
        for row in first
    ]
    title = f"{family}, AdamW at convergence (held-out ΔL, mean of {len(runs)} run{'s' * (len(runs) > 1)})"
    norm = [*_norm_per_run(runs, family), ""] if any(row["group"] == "norm" for row in first) else []  # LSTM: none
    return "\n".join([*_paper_lines(mean, "type", title), "", *norm, *_paper_lines(mean, "layer", title)])


def _norm_per_run(runs: list[dict[str, Any]], family: str) -> list[str]:
    """Where ``norm`` ranks among the types in each run at each eps (the paper's protocol), with its ΔL against the
    most fragile other type's, and in how many runs it is the most fragile."""
    at = {(r["seed"], _device(r)): _eps_rows(r["fragility"], "type", "paper") for r in runs}
    grid = list(next(iter(at.values())))
    first: dict[float, list[bool]] = {eps: [] for eps in grid}
    lines = [
        f"**{family}, rank of norm among the types in each run** (1 = most fragile; in brackets norm's held-out ΔL "
        "against the most fragile other type's)",
        "",
        "| run | " + " | ".join(f"eps {e:g}" for e in grid) + " |",
        "|---|" + "---|" * len(grid),
    ]
    for (seed, device), by_eps in sorted(at.items(), key=lambda item: (item[0][0], item[0][1] != "cpu")):
        cells = []
        for eps, ranked in by_eps.items():
            norm = next(r for r in ranked if r["group"] == "norm")
            other = next(r for r in ranked if r["group"] != "norm")
            rank = _rank(ranked, "norm").split()[0]
            first[eps].append(rank == "1")
            cells.append(f"{rank} ({_g(norm['delta_loss'])} vs {other['group']} {_g(other['delta_loss'])})")
        lines.append(f"| seed {seed}, {device} | " + " | ".join(cells) + " |")
    total = f"{sum(sum(hits) for hits in first.values())} of {len(at) * len(grid)} cells"
    counts = " | ".join(f"{sum(hits)} of {len(at)} runs" for hits in first.values())
    lines.append(f"| norm most fragile ({total}) | {counts} |")
    shares = " | ".join(
        "{:.2f}-{:.2f} (exact {:.2f}-{:.2f})".format(
            *stats.bootstrap_share(hits), *stats.clopper_pearson(sum(hits), len(hits))
        )
        for hits in first.values()
    )
    lines.append(f"| share of runs, 95 % bootstrap interval (runs resampled; exact: Clopper-Pearson) | {shares} |")
    return lines


CONVERGED = ("lstm", "gpt2", "marian")
TABLES: dict[str, tuple[str, Callable[[list[dict[str, Any]]], str | None]]] = {
    "corruption-de_en": ("gradient_vs_random", lambda rs: corruption(rs, "de_en")),
    "corruption-lm": ("gradient_vs_random", lambda rs: corruption(rs, "lm")),
    "corruption-runs": ("gradient_vs_random", fixed_budget_runs),
    "fragile-runs": ("where_fragile", fixed_budget_runs),
    "fragile-type-paper": ("where_fragile", lambda rs: fragile_paper(rs, "type")),
    "fragile-layer-paper": ("where_fragile", lambda rs: fragile_paper(rs, "layer")),
    "fragile-type-l2": ("where_fragile", lambda rs: fragile_l2(rs, "type")),
    "fragile-layer-l2": ("where_fragile", lambda rs: fragile_l2(rs, "layer")),
    **{f"converged-{f}-sweep": ("converged", lambda rs, f=f: converged_sweep(rs, f)) for f in CONVERGED},
    **{f"converged-{f}": ("converged", lambda rs, f=f: converged_final(rs, f)) for f in CONVERGED},
    **{f"converged-{f}-runs": ("converged", lambda rs, f=f: converged_runs(rs, f)) for f in CONVERGED},
    **{f"converged-{f}-fragile": ("converged", lambda rs, f=f: converged_fragile(rs, f)) for f in CONVERGED},
}


def tables(root: Path = RESULTS) -> dict[str, str]:
    """Every table whose finding has records, by name."""
    out = {}
    for name, (finding, render) in TABLES.items():
        records = load_records(finding, root)
        table = render(records) if records else None
        if table is not None:
            out[name] = table
    return out


def fill_docs(text: str, generated: dict[str, str]) -> str:
    """``text`` with the body of every table of :data:`TABLES` replaced by ``generated[name]``; a table of the page
    that no records make is an error."""
    stale = {name for name in docs.sections(text) if name in TABLES} - set(generated)
    if stale:
        raise KeyError(f"docs tables {sorted(stale)}: no records make them (known: {sorted(generated)})")
    return docs.fill(text, generated)


def docs_tables(text: str) -> dict[str, str]:
    """The tables of :data:`TABLES` on a markdown text, by name (bodies without the final newline)."""
    return {name: body for name, body in docs.sections(text).items() if name in TABLES}


def converged_plot(records: list[dict[str, Any]], family: str, path: Path) -> None:
    """Left: the sweep (seed 0), held-out loss and test loss increase at eps 1 against the training eps (AdamW
    drawn as a line per device it ran on). Right: the final rows, test metric against the evaluation eps, mean ± std
    over runs."""
    from matplotlib.figure import Figure

    records = [r for r in records if r["task"] == family]
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    sweep_ax, final_ax = fig.subplots(1, 2)
    sweep = sorted(
        (r for r in records if r["settings"]["stage"] == "sweep" and r["method"] == "acr"),
        key=lambda r: r["settings"]["method"]["eps"],
    )
    adamws = [r for r in records if r["method"] == "adamw" and r["seed"] == 0]  # one per device it ran on
    styles = [(r, style, f" ({_device(r)})" if len(adamws) > 1 else "") for r, style in zip(adamws, (":", "--"))]
    eps = [r["settings"]["method"]["eps"] for r in sweep]
    sweep_ax.plot(eps, [r["validation"]["loss"] for r in sweep], marker="o", color="C0", label="ACR held-out loss")
    for adamw, style, where in styles:
        sweep_ax.axhline(adamw["validation"]["loss"], color="C0", linestyle=style, label=f"AdamW held-out loss{where}")
    sweep_ax.set(
        xscale="log" if eps else "linear", xlabel="training eps (ACR, alpha 0.5)", ylabel="held-out loss (clean)"
    )
    twin = sweep_ax.twinx()
    twin.plot(
        eps, [_at(r["test"], 1.0)["delta_loss"] for r in sweep], marker="s", color="C3", label="ACR test ΔL, eps 1"
    )
    for adamw, style, where in styles:
        delta = _at(adamw["test"], 1.0)["delta_loss"]
        twin.axhline(delta, color="C3", linestyle=style, label=f"AdamW test ΔL, eps 1{where}")
    twin.set(ylabel="test loss increase at eval eps 1")
    handles = sweep_ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    sweep_ax.legend(handles=handles, fontsize=7, loc="upper center")
    sweep_ax.set_title(f"{family}: sweep (seed 0)", fontsize=9)
    metric = _metric(adamws[0])
    rows = _final_rows(records, chosen_eps(records))
    for method in FINAL_METHODS:
        runs = [r for r in rows if r["method"] == method]
        if not runs:
            continue
        grid = [0.0] + [c["eps"] for c in runs[0]["test"]["corrupted"]]
        values = [[r["test"][metric]] + [c[metric] for c in r["test"]["corrupted"]] for r in runs]
        mean = [statistics.fmean(col) for col in zip(*values)]
        std = [statistics.stdev(col) if len(col) > 1 else 0.0 for col in zip(*values)]
        final_ax.errorbar(
            grid, mean, yerr=std, marker="o", markersize=3, capsize=2, label=f"{_label(runs[0])} ({len(runs)})"
        )
    final_ax.set(xlabel="evaluation eps (gradient corruption, L2, whole model)", ylabel=f"test {SHORT[metric]}")
    final_ax.set_title(f"{family}: final rows, mean ± std over runs (n)", fontsize=9)
    final_ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)


def figures(root: Path = RESULTS, folder: Path = FIGURES) -> list[Path]:
    """The figures of finding 1, ``<task>_corruption.png``, the heatmaps of finding 2,
    ``<task>_<by>_<view>.png``, and of finding 3 at convergence, ``converged_<family>.png``, from the records."""
    from gradient_vs_random import plot

    from acr_optim.probe import ProbeTable

    paths = []
    for record in load_records("gradient_vs_random", root):
        paths.append(folder / f"{record['task']}_corruption.png")
        plot(record["rows"], paths[-1])
    for record in load_records("where_fragile", root):
        for by, view in dict.fromkeys((r["by"], r["view"]) for r in record["rows"]):
            rows = [r for r in record["rows"] if (r["by"], r["view"]) == (by, view)]
            p = "inf" if math.isinf(rows[0]["p"]) else f"{rows[0]['p']:g}"
            n = "all" if rows[0]["n"] is None else rows[0]["n"]
            path = folder / f"{record['task']}_{by}_{view}.png"
            ProbeTable(rows=rows).heatmap(
                path,
                method="gradient",
                n=rows[0]["n"],
                title=f"{docs.MODEL[record['task']]}: ΔL, gradient corruption of one {by} group (p={p}, n={n}), {VIEW[view]}",
            )
            paths.append(path)
    converged = load_records("converged", root)
    for family in CONVERGED:
        if any(r["task"] == family and r["method"] == "adamw" and r["seed"] == 0 for r in converged):
            paths.append(folder / f"converged_{family}.png")
            converged_plot(converged, family, paths[-1])
    return paths


def main(argv: list[str] | None = None) -> dict[str, str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the run records")
    ap.add_argument("--write-docs", action="store_true", help=f"rewrite the tables in {DOCS.name} and the figures")
    args = ap.parse_args(argv)
    generated = tables(args.results)
    if args.write_docs:
        DOCS.write_text(fill_docs(DOCS.read_text(), generated))
        for path in figures(args.results):
            print(path)
    else:
        for name, table in generated.items():
            print(f"{docs.block(name, table)}\n")
    return generated


if __name__ == "__main__":
    main()
