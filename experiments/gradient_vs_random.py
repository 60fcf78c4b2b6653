#!/usr/bin/env python
"""Finding 1 (paper Table 1, Figure 3): gradient-based corruption does far more damage than random corruption.

Trains (or reuses from ``--cache``) a tiny Marian on Multi30k De->En and a tiny GPT-2 on WikiText-2,
then measures, on held-out data, the metric (BLEU / perplexity) and the loss increase
``L(w + a) - L(w)`` under corruptions ``a`` with ``||a||_2 = eps`` and ``||a||_0 <= n`` for

- ``gradient``: the first-order optimum (paper Eq. 10) from ``grad L(w)`` on the evaluation batches,
- ``pgd``: projected gradient ascent started there (``--pgd-steps``),
- ``random``: the same closed form applied to Gaussian noise, ``--trials`` independent draws
  (each a probe with its own seed; one draw is one direction scaled across the eps grid),
  reported as mean and sample std over the draws,

for ``n = all`` and ``n = --small-n``.  Writes one record per task,
``--results/gradient_vs_random/<task>/<run id>.json`` (skipped when it exists);
``experiments/summarize.py`` makes the tables and figures from the records::

    python experiments/gradient_vs_random.py --tasks lm --steps 500 --threads 1
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from acr_optim.probe import probe
from lab import cli, loop, stats, tasks

FINDING = "gradient_vs_random"
DEFAULT_EPS = [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]
PERPLEXITY_TOP = 1e4


def corruption_rows(task: tasks.Task, model: Any, args: Any) -> list[dict[str, Any]]:
    """One row per (method, n, eps): metric and loss increase, random as mean/std over ``args.trials`` draws."""
    ns = [None, args.small_n]
    common = {"eps": args.eps, "n": ns, "by": "all", "metric_fn": task.metric_fn, "model_name": task.name}
    tables = [probe(model, task.eval_batches, method=["gradient", "pgd"], steps=args.pgd_steps, **common)]
    tables += [
        probe(model, task.eval_batches, method="random", trials=1, seed=1000 * args.seed + t, **common)
        for t in range(args.trials)
    ]
    grouped: dict[tuple[str, int | None, float], list[dict[str, Any]]] = defaultdict(list)
    for table in tables:
        for row in table.rows:
            grouped[row["method"], row["n"], row["eps"]].append(row)
    rows = []
    for (method, n, eps), draws in grouped.items():
        metric_mean, metric_std = stats.mean_std([r[task.metric] for r in draws])
        delta_mean, delta_std = stats.mean_std([r["delta_loss"] for r in draws])
        rows.append(
            {
                "task": task.name,
                "method": method,
                "n": "all" if n is None else n,
                "eps": eps,
                "draws": len(draws),
                "metric": task.metric,
                "metric_clean": draws[0][f"{task.metric}_clean"],
                "metric_mean": metric_mean,
                "metric_std": metric_std,
                "loss_clean": draws[0]["loss_clean"],
                "delta_loss_mean": delta_mean,
                "delta_loss_std": delta_std,
                "first_order_mean": stats.mean_std([r["first_order"] for r in draws])[0],
                "params_probed": draws[0]["num_params"],
            }
        )
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """2 x 2 panels: metric (top) and loss increase (bottom) vs eps, for n = all (left) and the small n (right)."""
    from matplotlib.figure import Figure

    ns = list(dict.fromkeys(r["n"] for r in rows))
    fig = Figure(figsize=(4.2 * len(ns), 6.4), layout="constrained")
    axes = fig.subplots(2, len(ns), squeeze=False)
    metric = rows[0]["metric"]
    for col, n in enumerate(ns):
        for row_index, (key, label) in enumerate([("metric", metric), ("delta_loss", "L(w+a) - L(w)")]):
            ax = axes[row_index][col]
            log_axis = key == "delta_loss" or metric == "perplexity"
            for method in ("gradient", "pgd", "random"):
                line = sorted((r for r in rows if r["n"] == n and r["method"] == method), key=lambda r: r["eps"])
                xs = [r["eps"] for r in line]
                ys = [r[f"{key}_mean"] for r in line]
                (handle,) = ax.plot(xs, ys, marker="o", markersize=3, label=method)
                if method == "random":
                    std = [r[f"{key}_std"] for r in line]
                    lo = [y - s for y, s in zip(ys, std)]
                    hi = [y + s for y, s in zip(ys, std)]
                    ax.fill_between(
                        xs,
                        lo,
                        hi,
                        where=[low > 0 or not log_axis for low in lo],  # log axes: no band where it reaches <= 0
                        color=handle.get_color(),
                        alpha=0.25,
                        label="random +/- std",
                    )
            if key == "metric":
                clean = rows[0]["metric_clean"]
                ax.axhline(clean, color="grey", linestyle="--", linewidth=1, label="clean")
                if metric == "perplexity":  # corrupted perplexities reach 1e200: show the range that matters
                    ax.set_ylim(0.8 * clean, PERPLEXITY_TOP)
            ax.set_xscale("log")
            if log_axis:
                ax.set_yscale("log", nonpositive="mask")  # a random mean can be <= 0 at tiny eps: not drawn
            ax.set_xlabel("eps (L2 norm of the corruption)")
            ax.set_ylabel(
                label if key == "delta_loss" or metric != "perplexity" else f"{label} (axis cut at {PERPLEXITY_TOP:g})"
            )
            ax.set_title(f"{rows[0]['task']}: n = {n}", fontsize=9)
            if row_index == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Train (or reuse) each task's model, probe it, write its record; returns the records."""
    ap = cli.parser(__doc__.splitlines()[1], FINDING)
    ap.add_argument("--eps", type=cli.positive_float, nargs="+", default=DEFAULT_EPS, help="L2 norms of the corruption")
    ap.add_argument("--small-n", type=cli.n_value, default=100, help="the small L0 limit n (besides n = all)")
    ap.add_argument("--trials", type=cli.positive_int, default=5, help="random draws (>= 5 for a std)")
    ap.add_argument("--pgd-steps", type=int, default=10, help="PGD ascent steps (0 = the gradient corruption)")
    args = ap.parse_args(argv)
    cli.setup(args)
    probe_settings = {"probe": {k: getattr(args, k) for k in ("eps", "small_n", "trials", "pgd_steps")}}
    return loop.fixed_budget_runs(FINDING, args, probe_settings, lambda task, model: corruption_rows(task, model, args))


if __name__ == "__main__":
    main()
