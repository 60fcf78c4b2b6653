#!/usr/bin/env python
"""Finding 3 (paper Table 2): ACR training improves the clean metric and the metric under corruption.

For each task (tiny Marian on Multi30k De->En, tiny GPT-2 on WikiText-2) and each of
``--num-seeds`` seeds, trains with the same budget of ``--steps`` optimizer steps and the same
batches (compute budget = optimizer steps; wall times are recorded too):

- ``baseline``: AdamW,
- ``ACR``: ``ACR(AdamW, eps=--acr-eps, alpha=--acr-alpha)``, two forward/backward passes a step,
- ``ACR, interval=k`` for each ``--intervals`` k: only every k-th step corrupted (amortized mode),
- with ``--matched-baseline``: AdamW for ``2 * --steps`` steps (as many forward/backward passes
  as ACR, about the same wall time).

Every trained model is evaluated on held-out data: clean metric (BLEU / perplexity) and metric
under the gradient-based corruption (paper Eq. 10, ``p = 2``, all parameters) at ``--eval-eps``.
Then a sweep on ``--sweep-task`` with the first seed: ``eps`` over ``--sweep-eps`` at the main
alpha, and ``alpha`` over ``--sweep-alpha`` at the main eps.

Writes ``runs.csv`` (one row per model and eval eps), ``table.csv`` (mean and sample std over
seeds), ``sweep.csv`` and figures ``<task>_acr.png``, ``sweep.png`` under ``--out``::

    python experiments/acr_training.py --steps 1500 --num-seeds 3 --out outputs/experiments/acr_training
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from acr_optim.probe import probe
from lab import cli, loop, stats, tasks
from lab.methods import acr
from lab.records import write_json, write_rows


def evaluate(task: tasks.Task, model: Any, eval_eps: list[float]) -> list[dict[str, Any]]:
    """``[{eps, metric, delta_loss}]``: eps 0 is the clean model, then the gradient corruption at each eps."""
    table = probe(model, task.eval_batches, eps=eval_eps, method="gradient", by="all", metric_fn=task.metric_fn)
    first = table.rows[0]
    rows = [{"eps": 0.0, "metric_value": first[f"{task.metric}_clean"], "loss": first["loss_clean"], "delta_loss": 0.0}]
    rows += [
        {"eps": r["eps"], "metric_value": r[task.metric], "loss": r["loss"], "delta_loss": r["delta_loss"]}
        for r in table.rows
    ]
    return rows


def run_and_evaluate(task: tasks.Task, recipe: loop.Recipe, args: Any, group: str) -> list[dict[str, Any]]:
    model, run = loop.train(task, recipe, args.cache)
    print(f"{task.name} {group} {run['recipe']} seed {recipe.seed}: {run['train_seconds']:.0f} s", flush=True)
    base = {
        "task": task.name,
        "group": group,
        "recipe": run["recipe"],
        "seed": recipe.seed,
        "steps": recipe.steps,
        "acr_eps": recipe.method.eps,
        "acr_alpha": recipe.method.alpha if recipe.method.eps is not None else None,
        "interval": recipe.method.settings.get("interval", 1) if recipe.method.eps is not None else None,
        "train_seconds": run["train_seconds"],
        "final_train_loss": run["final_loss"],
        "metric": task.metric,
    }
    return [{**base, **row} for row in evaluate(task, model, args.eval_eps)]


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds of the metric, loss increase and training time, per (task, recipe, steps, eps)."""
    grouped: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        grouped[r["task"], r["recipe"], r["steps"], r["eps"]].append(r)
    out = []
    for (task, recipe, steps, eps), runs in grouped.items():
        metric_mean, metric_std = stats.mean_std([r["metric_value"] for r in runs])
        delta_mean, delta_std = stats.mean_std([r["delta_loss"] for r in runs])
        time_mean, _ = stats.mean_std([r["train_seconds"] for r in runs])
        out.append(
            {
                "task": task,
                "recipe": recipe,
                "steps": steps,
                "eps": eps,
                "seeds": len(runs),
                "metric": runs[0]["metric"],
                "metric_mean": metric_mean,
                "metric_std": metric_std,
                "delta_loss_mean": delta_mean,
                "delta_loss_std": delta_std,
                "train_seconds_mean": time_mean,
            }
        )
    return out


def plot_table(rows: list[dict[str, Any]], path: Path) -> None:
    """Metric (mean +/- std over seeds) vs corruption eps, one line per recipe; eps 0 (clean) drawn at the left."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 3.6), layout="constrained")
    ax = fig.add_subplot()
    eps_values = sorted({r["eps"] for r in rows})
    for label in dict.fromkeys((r["recipe"], r["steps"]) for r in rows):
        line = sorted((r for r in rows if (r["recipe"], r["steps"]) == label), key=lambda r: r["eps"])
        xs = [eps_values.index(r["eps"]) for r in line]
        ax.errorbar(
            xs,
            [r["metric_mean"] for r in line],
            yerr=[r["metric_std"] for r in line],
            marker="o",
            markersize=3,
            capsize=2,
            label=f"{label[0]}, {label[1]} steps",
        )
    ax.set_xticks(range(len(eps_values)), ["clean" if e == 0 else f"{e:g}" for e in eps_values])
    ax.set_xlabel("eps of the gradient corruption (L2)")
    metric = rows[0]["metric"]
    ax.set_ylabel(metric)
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.set_title(f"{rows[0]['task']}: {metric} clean and under corruption (mean +/- std over seeds)", fontsize=8)
    ax.legend(fontsize=6)
    fig.savefig(path, dpi=110)


def plot_sweep(rows: list[dict[str, Any]], baseline: list[dict[str, Any]], path: Path) -> None:
    """Clean and corrupted metric vs train eps (left) and vs alpha (right); the baseline dashed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.4, 3.4), layout="constrained")
    axes = fig.subplots(1, 2)
    metric = rows[0]["metric"]
    for ax, key, kind in [(axes[0], "acr_eps", "eps"), (axes[1], "acr_alpha", "alpha")]:
        swept = [r for r in rows if r["sweep"] == kind]
        for eps in sorted({r["eps"] for r in swept}):
            line = sorted((r for r in swept if r["eps"] == eps), key=lambda r: r[key])
            (handle,) = ax.plot(
                [r[key] for r in line],
                [r["metric_value"] for r in line],
                marker="o",
                markersize=3,
                label="clean" if eps == 0 else f"corrupted, eps={eps:g}",
            )
            base = next(r["metric_value"] for r in baseline if r["eps"] == eps)
            ax.axhline(base, color=handle.get_color(), linestyle="--", linewidth=0.8)
        ax.set_xlabel(f"ACR training {kind}")
        if kind == "eps":
            ax.set_xscale("log")
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.set_ylabel(metric)
        ax.set_title(f"{rows[0]['task']}, seed {rows[0]['seed']} (dashed: baseline)", fontsize=8)
    axes[0].legend(fontsize=6)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = cli.parser(__doc__.splitlines()[1], "acr_training")
    ap.add_argument("--num-seeds", type=cli.positive_int, default=3, help="seeds --seed, --seed+1, ...")
    ap.add_argument("--acr-eps", type=cli.positive_float, default=0.1, help="ACR training eps (L2)")
    ap.add_argument("--acr-alpha", type=cli.unit_float, default=0.5, help="ACR weight of the corrupted loss")
    ap.add_argument("--intervals", type=cli.positive_int, nargs="*", default=[2], help="amortized ACR runs (k > 1)")
    ap.add_argument("--matched-baseline", action="store_true", help="also AdamW for 2 x --steps steps")
    ap.add_argument("--eval-eps", type=cli.positive_float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0])
    ap.add_argument("--sweep-task", choices=tasks.TASKS, default="lm", help="task of the eps/alpha sweep")
    ap.add_argument("--sweep-eps", type=cli.positive_float, nargs="*", default=[0.03, 0.3, 1.0])
    ap.add_argument("--sweep-alpha", type=cli.unit_float, nargs="*", default=[0.25, 0.75])
    args = ap.parse_args(argv)
    cli.setup(args)
    seeds = [args.seed + i for i in range(args.num_seeds)]
    common = {"batch_size": args.batch_size, "lr": args.lr}
    rows: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    built = {name: tasks.build_task(name, args) for name in dict.fromkeys([*args.tasks, args.sweep_task])}
    for name in args.tasks:
        for seed in seeds:
            recipes = [
                loop.Recipe(seed=seed, steps=args.steps, **common),
                loop.Recipe(
                    seed=seed, steps=args.steps, method=acr("acr", args.acr_eps, alpha=args.acr_alpha), **common
                ),
                *(
                    loop.Recipe(
                        seed=seed,
                        steps=args.steps,
                        method=acr(f"acr_k{k}", args.acr_eps, alpha=args.acr_alpha, interval=k),
                        **common,
                    )
                    for k in args.intervals
                    if k > 1
                ),
            ]
            if args.matched_baseline:
                recipes.append(loop.Recipe(seed=seed, steps=2 * args.steps, **common))
            for recipe in recipes:
                rows += run_and_evaluate(built[name], recipe, args, "main")
    table = aggregate(rows)
    for name in args.tasks:
        plot_table([r for r in table if r["task"] == name], args.out / f"{name}_acr.png")
    write_rows(args.out / "runs.csv", rows)
    write_rows(args.out / "table.csv", table)

    if args.sweep_eps or args.sweep_alpha:
        task, seed = built[args.sweep_task], seeds[0]
        baseline = run_and_evaluate(task, loop.Recipe(seed=seed, steps=args.steps, **common), args, "sweep")
        points = [("eps", e, args.acr_alpha) for e in sorted({*args.sweep_eps, args.acr_eps})]
        points += [("alpha", args.acr_eps, a) for a in sorted({*args.sweep_alpha, args.acr_alpha})]
        for kind, eps, alpha in points:
            recipe = loop.Recipe(seed=seed, steps=args.steps, method=acr("acr", eps, alpha=alpha), **common)
            sweep += [{"sweep": kind, **r} for r in run_and_evaluate(task, recipe, args, "sweep")]
        write_rows(args.out / "sweep.csv", [{"sweep": "baseline", **r} for r in baseline] + sweep)
        plot_sweep(sweep, baseline, args.out / "sweep.png")
    write_json(args.out / "config.json", {"args": vars(args), "seeds": seeds})
    return {"table": table, "sweep": sweep}


if __name__ == "__main__":
    main()
