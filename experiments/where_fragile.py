#!/usr/bin/env python
"""Finding 2 (paper Figure 4): which parameters are the most fragile, by component type and by layer.

For the tiny Marian (Multi30k De->En) and GPT-2 (WikiText-2) models (trained, or reused from
``--cache``), each parameter group (``acr_optim.probe`` groupings ``type`` and ``layer``) is
corrupted alone with the gradient-based corruption (paper Eq. 10) and the loss increase
``L(w + a) - L(w)`` on held-out data is recorded, under three ways of giving the groups a budget:

- ``paper``: the paper's protocol (Figure 4 caption): ``p = inf`` with ``n`` corrupted entries,
  ``n = 10`` by type and ``n = 100`` by layer, eps in ``--paper-eps``; every group moves its
  ``n`` entries of largest ``|gradient|`` by ``eps`` each.
- ``same_eps``: ``p = 2`` over all entries of the group, every group ``||a||_2 = eps``.  A small
  group (a LayerNorm has ``2 d`` entries) then takes the whole budget on few entries.
- ``per_param``: ``p = 2`` over all entries, group ``g`` with ``N_g`` of the model's ``N``
  entries gets ``eps_g = eps * sqrt(N_g / N)``, i.e. the same root-mean-square change per entry,
  ``eps / sqrt(N)``, in every group (the density of a whole-model corruption of norm ``eps``).

Writes one record per task, ``--results/where_fragile/<task>/<run id>.json`` (skipped when it
exists); ``experiments/summarize.py`` makes the tables and heatmaps from the records::

    python experiments/where_fragile.py --tasks lm --steps 500 --threads 1
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from lab import cli, loop, tasks
from lab.fragility import PAPER_EPS, PAPER_N, View, fragility_rows, paper_view

FINDING = "where_fragile"
DEFAULT_EPS = [0.1, 0.3, 1.0, 3.0, 10.0]


def views(by: str, eps: list[float], paper_eps: list[float], paper_n: dict[str, int]) -> list[View]:
    """The three budgets of this finding for grouping ``by``: the paper's, the same L2 eps, the same RMS per entry."""
    return [
        paper_view(by, paper_eps, paper_n),
        View("same_eps", 2.0, None, False, tuple(eps)),
        View("per_param", 2.0, None, True, tuple(eps)),
    ]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Train (or reuse) each task's model, probe it, write its record; returns the records."""
    ap = cli.parser(__doc__.splitlines()[1], FINDING)
    ap.add_argument("--eps", type=cli.positive_float, nargs="+", default=DEFAULT_EPS, help="L2 norms (nominal)")
    ap.add_argument("--paper-eps", type=cli.positive_float, nargs="+", default=PAPER_EPS, help="L-inf eps, paper view")
    ap.add_argument("--paper-n-type", type=cli.positive_int, default=PAPER_N["type"], help="n by type, paper view")
    ap.add_argument("--paper-n-layer", type=cli.positive_int, default=PAPER_N["layer"], help="n by layer, paper view")
    ap.add_argument("--by", nargs="+", choices=["type", "layer"], default=["type", "layer"])
    args = ap.parse_args(argv)
    cli.setup(args)
    paper_n = {"type": args.paper_n_type, "layer": args.paper_n_layer}
    task_views = {by: views(by, args.eps, args.paper_eps, paper_n) for by in args.by}

    def rows(task: tasks.Task, model: Any) -> list[dict[str, Any]]:
        return [
            row
            for by, vs in task_views.items()
            for view in vs
            for row in fragility_rows(task.eval_batches, model, by, view)
        ]

    views_settings = {"views": {by: [asdict(v) for v in vs] for by, vs in task_views.items()}}
    return loop.fixed_budget_runs(FINDING, args, views_settings, rows)


if __name__ == "__main__":
    main()
