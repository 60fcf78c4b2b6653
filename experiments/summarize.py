#!/usr/bin/env python
"""The generated tables (and figures) of docs/results.md, from the run records in ``experiments/results/``.

    python experiments/summarize.py               # print every table
    python experiments/summarize.py --write-docs  # rewrite them in docs/results.md, and redraw the figures

In the markdown a generated table sits between ``<!-- table:NAME -->`` and ``<!-- /table -->``;
``--write-docs`` replaces what is between the markers and nothing else, and
tests/test_experiments_records.py checks that the committed page is what this prints.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import RESULTS, load_records

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results.md"
FIGURES = DOCS.parent / "images" / "results"
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.DOTALL)
MODEL = {"de_en": "Marian", "lm": "GPT-2"}
VIEW = {
    "paper": "paper: L-inf, n entries",
    "same_eps": "L2, all entries, same eps",
    "per_param": "L2, all entries, same RMS per entry",
}


def _g(x: float) -> str:
    return f"{x:.3g}"


def _eps_rows(record: dict[str, Any], by: str, view: str) -> dict[float, list[dict[str, Any]]]:
    """``{eps: rows}`` of one grouping and view, each list from most to least fragile (largest loss increase first)."""
    out: dict[float, list[dict[str, Any]]] = {}
    for row in record["rows"]:
        if (row["by"], row["view"]) == (by, view):
            out.setdefault(row["eps"], []).append(row)
    return {eps: sorted(rows, key=lambda r: -r["delta_loss"]) for eps, rows in sorted(out.items())}


def _rank(rows: list[dict[str, Any]], group: str) -> str:
    return f"{[r['group'] for r in rows].index(group) + 1} of {len(rows)}"


def fragile_paper(records: list[dict[str, Any]], by: str) -> str:
    """ΔL of every group under the paper's protocol, one line per (model, eps)."""
    lines = []
    for record in records:
        at = _eps_rows(record, by, "paper")
        groups = list(dict.fromkeys(r["group"] for r in record["rows"] if r["by"] == by))
        n = next(iter(at.values()))[0]["n"]
        lines += [
            f"**{MODEL[record['task']]}**, n = {n}, L-inf",
            "",
            "| eps | " + " | ".join(groups) + " | most fragile" + (" | rank of norm |" if by == "type" else " |"),
            "|---|" + "---|" * (len(groups) + 1 + (by == "type")),
        ]
        for eps, rows in at.items():
            delta = {r["group"]: r["delta_loss"] for r in rows}
            cells = [f"{eps:g}", *(_g(delta[g]) for g in groups), rows[0]["group"]]
            if by == "type":
                cells.append(_rank(rows, "norm"))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines[:-1])


def fragile_l2(records: list[dict[str, Any]], by: str) -> str:
    """The L2 views: ranking at eps 1, and (by type) where ``norm`` ranks at every eps."""
    grid = sorted({eps for r in records for eps in _eps_rows(r, by, "same_eps")})
    tail = " | rank of norm at eps " + ", ".join(f"{e:g}" for e in grid) if by == "type" else ""
    lines = [f"| model | budget | most to least fragile at eps 1 (ΔL){tail} |", "|---|---|---|" + "---|" * bool(tail)]
    for record in records:
        for view in ("same_eps", "per_param"):
            at = _eps_rows(record, by, view)
            ranking = ", ".join(f"{r['group']} {_g(r['delta_loss'])}" for r in at[1.0])
            cells = [MODEL[record["task"]], VIEW[view], ranking]
            if by == "type":
                cells.append(", ".join(_rank(at[eps], "norm").split()[0] for eps in grid))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fragile_runs(records: list[dict[str, Any]]) -> str:
    """The probed models: training budget, time and clean loss on the evaluation data."""
    lines = [
        "| model | parameters | steps | epochs | train s | probe s | final train loss | clean eval loss | eval data |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        cells = [
            MODEL[r["task"]],
            f"{r['num_params']:,}",
            str(r["steps"]),
            f"{r['epochs']:.2f}",
            f"{r['train_seconds']:.0f}",
            f"{r['probe_seconds']:.0f}",
            f"{r['final_train_loss']:.3f}",
            f"{r['rows'][0]['loss_clean']:.3f}",
            r["eval_data"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


TABLES: dict[str, tuple[str, Callable[[list[dict[str, Any]]], str]]] = {
    "fragile-runs": ("where_fragile", fragile_runs),
    "fragile-type-paper": ("where_fragile", lambda rs: fragile_paper(rs, "type")),
    "fragile-layer-paper": ("where_fragile", lambda rs: fragile_paper(rs, "layer")),
    "fragile-type-l2": ("where_fragile", lambda rs: fragile_l2(rs, "type")),
    "fragile-layer-l2": ("where_fragile", lambda rs: fragile_l2(rs, "layer")),
}


def tables(root: Path = RESULTS) -> dict[str, str]:
    """Every table whose finding has records, by name."""
    out = {}
    for name, (finding, render) in TABLES.items():
        records = load_records(finding, root)
        if records:
            out[name] = render(records)
    return out


def fill_docs(text: str, generated: dict[str, str]) -> str:
    """``text`` with the body of every marked table replaced by ``generated[name]``."""

    def body(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in generated:
            raise KeyError(f"docs table {name!r}: no records make it (known: {sorted(generated)})")
        return f"{match[1]}{generated[name]}\n{match[4]}"

    return BLOCK.sub(body, text)


def docs_tables(text: str) -> dict[str, str]:
    """The marked tables of a markdown text, by name (bodies without the final newline)."""
    return {m["name"]: m["body"].removesuffix("\n") for m in BLOCK.finditer(text)}


def figures(root: Path = RESULTS, folder: Path = FIGURES) -> list[Path]:
    """The heatmaps of finding 2, ``<task>_<by>_<view>.png``, from the records."""
    from acr_optim.probe import ProbeTable

    paths = []
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
                title=f"{MODEL[record['task']]}: ΔL, gradient corruption of one {by} group (p={p}, n={n}), {VIEW[view]}",
            )
            paths.append(path)
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
            print(f"<!-- table:{name} -->\n{table}\n<!-- /table -->\n")
    return generated


if __name__ == "__main__":
    main()
