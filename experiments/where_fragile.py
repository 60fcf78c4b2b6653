#!/usr/bin/env python
"""Finding 2 (paper Figure 4): which parameters are the most fragile, by component type and by layer.

For the tiny Marian (Multi30k De->En) and GPT-2 (WikiText-2) models (trained, or reused from
``--cache``), each parameter group (``acr_optim.probe`` groupings ``type`` and ``layer``) is
corrupted alone with the gradient-based corruption (paper Eq. 10, ``p = 2``, all entries of the
group) and the loss increase ``L(w + a) - L(w)`` on held-out data is recorded.  Two ways to give
the groups a comparable budget, both reported:

- ``same_eps``: every group gets the same ``||a||_2 = eps`` (the paper's protocol).  A small group
  (a LayerNorm has ``2 d`` entries) then takes the whole budget on few entries.
- ``per_param``: group ``g`` with ``N_g`` of the model's ``N`` entries gets
  ``eps_g = eps * sqrt(N_g / N)``, i.e. the same root-mean-square change per entry,
  ``eps / sqrt(N)``, in every group (the density of a whole-model corruption of norm ``eps``).

Writes ``fragility.csv``, ``summary.json`` (the most fragile group at each eps and the rank of
``norm``) and heatmaps ``<task>_<by>_<view>.png`` under ``--out``::

    python experiments/where_fragile.py --steps 1500 --out outputs/experiments/where_fragile
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _shared as S

from acr_optim.probe import ProbeTable, group_parameters, probe

DEFAULT_EPS = [0.1, 0.3, 1.0, 3.0, 10.0]
VIEWS = ("same_eps", "per_param")


def fragility_rows(task: S.Task, model: Any, by: str, eps: list[float]) -> list[dict[str, Any]]:
    """Gradient corruption of each ``by`` group alone, at ``eps`` (``same_eps``) and at ``eps sqrt(N_g/N)`` (``per_param``)."""
    groups = group_parameters(model, by)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sizes = dict(model.named_parameters())
    rows = []
    for view in VIEWS:
        for group, names in groups.items():
            size = sum(sizes[name].numel() for name in names)
            scale = 1.0 if view == "same_eps" else math.sqrt(size / total)
            table = probe(model, task.eval_batches, eps=[e * scale for e in eps], params=names, by="all")
            for nominal, row in zip(eps, table.rows):
                rows.append(
                    {
                        "task": task.name,
                        "by": by,
                        "view": view,
                        **row,
                        "group": group,
                        "num_params": size,
                        "eps": nominal,
                        "eps_applied": row["eps"],
                    }
                )
    return rows


def ranking(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per eps: groups from most to least fragile (largest loss increase first), and where ``norm`` ranks."""
    out: dict[str, Any] = {}
    for eps in sorted({r["eps"] for r in rows}):
        at = sorted((r for r in rows if r["eps"] == eps), key=lambda r: -r["delta_loss"])
        order = [r["group"] for r in at]
        out[f"{eps:g}"] = {
            "order": order,
            "delta_loss": [r["delta_loss"] for r in at],
            "norm_rank": order.index("norm") + 1 if "norm" in order else None,
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = S.parser(__doc__.splitlines()[1], "where_fragile")
    ap.add_argument("--eps", type=S.positive_float, nargs="+", default=DEFAULT_EPS, help="L2 norms (nominal)")
    ap.add_argument("--by", nargs="+", choices=["type", "layer"], default=["type", "layer"])
    args = ap.parse_args(argv)
    S.setup(args)
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for name in args.tasks:
        task = S.build_task(name, args)
        recipe = S.Recipe(seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr)
        model, _ = S.train(task, recipe, args.cache)
        for by in args.by:
            by_rows = fragility_rows(task, model, by, args.eps)
            rows += by_rows
            for view in VIEWS:
                view_rows = [r for r in by_rows if r["view"] == view]
                summary.setdefault(name, {}).setdefault(by, {})[view] = ranking(view_rows)
                ProbeTable(rows=view_rows).heatmap(
                    args.out / f"{name}_{by}_{view}.png",
                    method="gradient",
                    n=None,
                    title=f"{name}: L(w+a)-L(w), gradient corruption of one {by} group, {view.replace('_', ' ')}",
                )
        print(f"{name}: done", flush=True)
    S.write_rows(args.out / "fragility.csv", rows)
    S.write_json(args.out / "summary.json", {"args": vars(args), "ranking": summary})
    return summary


if __name__ == "__main__":
    main()
