#!/usr/bin/env python
"""Markdown tables (for docs/results.md) from the outputs of experiments/run_all.sh.

    python experiments/summarize.py [outputs/experiments] > tables.md

Reads ``gradient_vs_random/*/corruption.csv``, ``where_fragile/*/summary.json``,
``acr_training/*/table.csv`` and ``acr_training/*/sweep.csv``; missing ones are skipped.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _pm(mean: str, std: str, digits: int = 2) -> str:
    m, s = float(mean), float(std)
    return f"{m:.{digits}f}" if s == 0 else f"{m:.{digits}f} ± {s:.{digits}f}"


def _g(x: str | float) -> str:
    return f"{float(x):.3g}"


def _by_task(render):
    """Apply ``render(rows)`` to each task's rows of a CSV file."""

    def per_task(path: Path) -> list[str]:
        rows = _read(path)
        return [
            line
            for task in dict.fromkeys(r["task"] for r in rows)
            for line in render([r for r in rows if r["task"] == task])
        ]

    return per_task


@_by_task
def gradient_vs_random(rows: list[dict[str, str]]) -> list[str]:
    out = []
    for n in dict.fromkeys(r["n"] for r in rows):
        at = {(r["method"], r["eps"]): r for r in rows if r["n"] == n}
        first = rows[0]
        metric = first["metric"]
        out += [
            (
                f"**{first['task']}, n = {n}** (clean {metric} {float(first['metric_clean']):.2f}, "
                f"clean loss {float(first['loss_clean']):.3f}; random: mean ± std over "
                f"{at['random', first['eps']]['draws']} draws)"
            ),
            "",
            f"| eps | {metric} gradient | {metric} PGD | {metric} random | ΔL gradient | ΔL PGD | ΔL random | ΔL gradient / random |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for eps in dict.fromkeys(r["eps"] for r in rows if r["n"] == n):
            g, p, r = at["gradient", eps], at["pgd", eps], at["random", eps]
            ratio = (
                float(g["delta_loss_mean"]) / float(r["delta_loss_mean"])
                if float(r["delta_loss_mean"]) > 0
                else float("nan")
            )
            out.append(
                f"| {_g(eps)} | {_g(g['metric_mean'])} | {_g(p['metric_mean'])} | "
                f"{_g(r['metric_mean'])} ± {_g(r['metric_std'])} | {_g(g['delta_loss_mean'])} | {_g(p['delta_loss_mean'])} | "
                f"{_g(r['delta_loss_mean'])} ± {_g(r['delta_loss_std'])} | {ratio:.3g} |"
            )
        out.append("")
    return out


def where_fragile(path: Path) -> list[str]:
    ranking = json.loads(path.read_text())["ranking"]
    out = []
    for task, by_views in ranking.items():
        for by, views in by_views.items():
            out += [f"**{task}, by {by}** (groups from most to least fragile, ΔL in brackets)", ""]
            out += ["| eps | same eps per group | same RMS change per entry |", "|---|---|---|"]
            for eps in views["same_eps"]:
                cells = []
                for view in ("same_eps", "per_param"):
                    at = views[view][eps]
                    cells.append(", ".join(f"{g} ({d:.3g})" for g, d in zip(at["order"], at["delta_loss"])))
                out.append(f"| {eps} | {cells[0]} | {cells[1]} |")
            out.append("")
    return out


@_by_task
def acr_table(rows: list[dict[str, str]]) -> list[str]:
    eps_values = list(dict.fromkeys(r["eps"] for r in rows))
    metric = rows[0]["metric"]
    head = " | ".join("clean" if float(e) == 0 else f"eps {_g(e)}" for e in eps_values)
    out = [
        f"**{rows[0]['task']}**: {metric}, mean ± std over {rows[0]['seeds']} seeds",
        "",
        f"| recipe | steps | train s | {head} |",
        "|---|---|---|" + "---|" * len(eps_values),
    ]
    for key in dict.fromkeys((r["recipe"], r["steps"]) for r in rows):
        at = {r["eps"]: r for r in rows if (r["recipe"], r["steps"]) == key}
        cells = " | ".join(_pm(at[e]["metric_mean"], at[e]["metric_std"]) for e in eps_values)
        out.append(f"| {key[0]} | {key[1]} | {float(at[eps_values[0]]['train_seconds_mean']):.0f} | {cells} |")
    return out + [""]


@_by_task
def sweep(rows: list[dict[str, str]]) -> list[str]:
    eps_values = list(dict.fromkeys(r["eps"] for r in rows))
    metric = rows[0]["metric"]
    head = " | ".join("clean" if float(e) == 0 else f"eps {_g(e)}" for e in eps_values)
    out = [f"**sweep, {rows[0]['task']}, seed {rows[0]['seed']}**: {metric}", "", f"| sweep | recipe | {head} |"]
    out.append("|---|---|" + "---|" * len(eps_values))
    for key in dict.fromkeys((r["sweep"], r["recipe"]) for r in rows):
        at = {r["eps"]: r for r in rows if (r["sweep"], r["recipe"]) == key}
        out.append(
            f"| {key[0]} | {key[1]} | " + " | ".join(f"{float(at[e]['metric_value']):.2f}" for e in eps_values) + " |"
        )
    return out + [""]


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0] if argv else "outputs/experiments")
    lines: list[str] = []
    for section, pattern, render in [
        ("Finding 1: gradient vs random corruption", "gradient_vs_random/*/corruption.csv", gradient_vs_random),
        ("Finding 2: where models are fragile", "where_fragile/*/summary.json", where_fragile),
        ("Finding 3: ACR training", "acr_training/*/table.csv", acr_table),
        ("Sweep", "acr_training/*/sweep.csv", sweep),
    ]:
        files = sorted(root.glob(pattern))
        if files:
            lines += [f"### {section}", ""]
            for path in files:
                lines += render(path)
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
