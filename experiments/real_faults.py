#!/usr/bin/env python
"""Finding 4: does corruption-resistant training buy robustness to real faults?

The finding-3 setting (tiny GPT-2 on WikiText-2, ``--steps`` optimizer steps, the same batches for
every method of a seed) trained with four methods, all at the same number of steps:

- ``adamw``: AdamW,
- ``acr``: ``ACR(AdamW, eps=--acr-eps, p=2, alpha=0.5)`` (finding 3's setting),
- ``acr_inf``: ``p = inf`` (the paper's L-inf case) with ``eps = --acr-eps / sqrt(N)``: the same L2
  norm as ``acr`` when every one of the N weights moves by the full ``eps``,
- ``sam``: ``ACR(p=2, alpha=1)`` with ``rho = --acr-eps``,

then each model is probed on the held-out blocks under the real faults of ``FAULTS``
(quantization, casts, random and worst-case bit flips, pruning; random ones over ``--trials``
draws) and, for reference, the gradient corruption (paper Eq. 10, L2, whole model) at
``--eval-eps``.  Every finished (method, seed) writes
``--results/real_faults/<task>/<run id>.json`` and a run whose record exists is skipped, so the
script resumes where it stopped.  ``--summarize`` builds the finding-4 tables and figure from the
records alone and, with ``--write-docs``, puts them into docs/results.md's generated section
``real_faults`` (:mod:`lab.docs`)::

    OMP_NUM_THREADS=1 python experiments/real_faults.py --threads 1
    python experiments/real_faults.py --summarize --write-docs
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any

from torch import nn

from acr_optim.probe import probe
from lab import cli, docs, loop, stats, tasks
from lab.methods import Method, final_methods
from lab.records import config_key, load_records, record_path, write_record

FINDING = "real_faults"
FAULTS = (
    "int8",
    "int4:g32",
    "bf16",
    "fp8_e4m3",
    "flip:1e-7",
    "flip:1e-6",
    "flip:1e-4:int8",
    "flip:1e-3:int8",
    "flip-worst:10",
    "flip-worst:10:mantissa",
    "prune:0.3",
    "prune:0.5",
    "prune:0.7",
    "prune:0.9",
)
LABELS = {"adamw": "AdamW", "acr": "ACR", "acr_inf": "ACR p=inf", "sam": "SAM"}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "results.md"
FIGURE = DOCS.parent / "images" / "results" / "lm_real_faults.png"


# -- runs ------------------------------------------------------------------------------------------


def methods(eps: float, num_params: int) -> list[Method]:
    """AdamW, ACR, ACR p=inf and SAM of ``lab.methods.final_methods`` (without its 2x-budget AdamW)."""
    return [m for m in final_methods(eps, num_params) if m.budget == 1]


def train(task: tasks.Task, method: Method, seed: int, args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`lab.loop.train` (model cache included) with ``method``."""
    recipe = loop.Recipe(seed=seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr, method=method)
    return loop.train(task, recipe, args.cache)


def evaluate(task: tasks.Task, model: nn.Module, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Clean loss and metric, then one row per gradient eps and per fault (mean over draws for random faults)."""
    table = probe(
        model,
        task.eval_batches,
        eps=args.eval_eps,
        method="gradient",
        faults=list(FAULTS),
        by="all",
        metric_fn=task.metric_fn,
        trials=args.trials,
        seed=seed,
    )
    first = table.rows[0]
    keys = ("eps", "trials", "loss", "delta_loss", "delta_loss_std", "delta_loss_max", "norm", "norm_inf", "broken")
    return {
        "loss": first["loss_clean"],
        "metric_value": first[f"{task.metric}_clean"],
        "rows": [
            {"corruption": r["method"], **{k: r.get(k) for k in keys}, "metric_value": r[task.metric]}
            for r in table.rows
        ],
    }


def run(
    task: tasks.Task, method: Method, seed: int, args: argparse.Namespace, settings: dict[str, Any]
) -> dict[str, Any]:
    model, trained = train(task, method, seed, args)
    start = time.perf_counter()
    scores = evaluate(task, model, args, seed)
    return {
        "finding": FINDING,
        "task": task.name,
        "method": method.name,
        "settings": settings,
        "seed": seed,
        "steps": args.steps,
        "best_step": args.steps,  # no early stopping: the last step's model
        "epochs": args.steps * args.batch_size / len(task.train),
        "train_seconds": trained["train_seconds"],
        "final_train_loss": trained["final_loss"],
        "num_params": trained["num_params"],
        "eval_seconds": time.perf_counter() - start,
        "metric": task.metric,
        "eval_data": task.eval_data,
        **scores,
        "environment": loop.environment(),
    }


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every missing (task, seed, method) run, seed by seed; returns the records written."""
    written = []
    for name in args.tasks:
        task = tasks.build_task(name, args)
        num_params = sum(p.numel() for p in task.new_model(args.seed).parameters())
        common = {"task": task.config, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr}
        common |= {"faults": list(FAULTS), "trials": args.trials, "eval_eps": args.eval_eps}
        for seed in range(args.seed, args.seed + args.num_seeds):
            for method in methods(args.acr_eps, num_params):
                settings = {**common, "method": method.record()}
                path = record_path(FINDING, name, f"{method.name}-seed{seed}-{config_key(settings)}", args.results)
                if path.is_file():
                    continue
                print(f"{path.stem}: training / evaluating", flush=True)
                record = run(task, method, seed, args, settings)
                write_record(path, record)
                written.append(record)
                print(f"{path.stem}: done in {record['eval_seconds']:.0f} s of evaluation -> {path}", flush=True)
    return written


# -- summary ---------------------------------------------------------------------------------------


def _cell(values: list[float], fmt: str) -> str:
    """``mean ± std`` over seeds (the mean alone for one seed; ``broken`` where a seed's loss is infinite)."""
    return docs.mean_std(values, fmt) if all(math.isfinite(v) for v in values) else "broken"


def paired(diffs: list[float], fmt: str, base: float | None = None) -> str:
    """Mean of per-seed differences with the half-width of its 95% t interval; bold when it excludes 0; with ``base``
    (AdamW's mean), the mean difference relative to it."""
    if not all(math.isfinite(d) for d in diffs):
        return "broken"
    mean, half = stats.t_interval(diffs)
    relative = "" if base is None else f" ({100 * mean / base:+.0f} %)"
    if len(diffs) < 2:
        return f"{format(mean, '+' + fmt)} (1 seed){relative}"
    text = docs.interval(mean, half, fmt)
    return (f"**{text}**" if abs(mean) > half else text) + relative


def _label(corruption: str, eps: float | None) -> str:
    return f"gradient, eps {eps:g}" if eps is not None else f"`{corruption}`"


def _by_method(records: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """``{method: {seed: {row label: row}}}`` in ``LABELS`` order; the first label is ``clean`` (ΔL 0)."""
    out: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in LABELS}
    for r in records:
        rows = {_label(row["corruption"], row["eps"]): row for row in r["rows"]}
        clean = {"delta_loss": 0.0, "metric_value": r["metric_value"], "broken": 0.0}
        out[r["method"]][r["seed"]] = {"clean": clean, **rows}
    return {m: seeds for m, seeds in out.items() if seeds}


def mean_table(records: list[dict[str, Any]]) -> str:
    """Metric and loss increase (mean ± std over seeds) per corruption and method."""
    runs = _by_method(records)
    metric = records[0]["metric"]
    names = list(next(iter(next(iter(runs.values())).values())))
    head = [f"{LABELS[m]} (n={len(seeds)}): {metric} / ΔL" for m, seeds in runs.items()]
    lines = ["| corruption | " + " | ".join(head) + " |", "|---|" + "---|" * len(runs)]
    for name in names:
        cells = [_mean_cell([s[name] for s in seeds.values()], with_delta=name != "clean") for seeds in runs.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_cell(rows: list[dict[str, Any]], with_delta: bool) -> str:
    """``metric / ΔL`` over seeds, or the share of draws (all seeds) whose loss was infinite."""
    broken = statistics.fmean(r["broken"] or 0.0 for r in rows)  # None on the gradient rows
    if broken:
        return f"broken in {broken:.0%} of draws"
    metric = _cell([r["metric_value"] for r in rows], ".1f")
    return f"{metric} / {_cell([r['delta_loss'] for r in rows], '.3g')}" if with_delta else metric


def _delta_diffs(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[float]]:
    """``{(row label, method): per-seed ΔL - AdamW's ΔL}`` for every corruption row and method but AdamW."""
    runs = _by_method(records)
    adamw = runs.pop("adamw")
    return {
        (name, m): [seeds[s][name]["delta_loss"] - adamw[s][name]["delta_loss"] for s in seeds if s in adamw]
        for name in next(iter(adamw.values()))
        if name != "clean"
        for m, seeds in runs.items()
    }


def holm(records: list[dict[str, Any]], level: float = 0.05) -> str:
    """How many of the paired ΔL comparisons (every finite corruption row and method) a paired t-test keeps after
    Holm's correction for their number, at ``level``."""
    tests = sorted(
        (stats.t_test(diffs), name, m)
        for (name, m), diffs in _delta_diffs(records).items()
        if len(diffs) > 1 and all(math.isfinite(d) for d in diffs)
    )
    kept = [f"{LABELS[m]} at {name}" for _, name, m in tests[: stats.holm([p for p, _, _ in tests], level)]]
    return (
        f"Over the {len(tests)} ΔL comparisons of this table (paired t-tests), the smallest p-value is "
        f"{tests[0][0]:.2g}; Holm's correction for their number at {level:.0%} keeps {len(kept)}"
        + (f": {', '.join(kept)}." if kept else ", so every bold ΔL entry is an uncorrected result.")
    )


def paired_table(records: list[dict[str, Any]]) -> str:
    """Per-seed paired difference to AdamW of the loss increase (also relative to AdamW's mean) and of the faulty
    metric (95% t interval)."""
    runs = _by_method(records)
    adamw = runs["adamw"]
    others = [m for m in runs if m != "adamw"]
    metric = records[0]["metric"]
    head = [f"{LABELS[m]} - AdamW: ΔL / {metric}" for m in others]
    lines = ["| corruption | " + " | ".join(head) + " |", "|---|" + "---|" * len(others)]
    for name in next(iter(adamw.values())):
        cells = []
        for m in others:
            seeds = [s for s in runs[m] if s in adamw]
            dl = [runs[m][s][name]["delta_loss"] - adamw[s][name]["delta_loss"] for s in seeds]
            dm = [runs[m][s][name]["metric_value"] - adamw[s][name]["metric_value"] for s in seeds]
            base = [adamw[s][name]["delta_loss"] for s in seeds]
            finite = len(base) > 1 and all(math.isfinite(b) for b in base)
            clear = finite and statistics.fmean(base) > statistics.stdev(base)
            delta = "-" if name == "clean" else paired(dl, ".3g", statistics.fmean(base) if clear else None)
            cells.append("-" if not seeds else f"{delta} / {paired(dm, '.1f')}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Loss increase per corruption (log scale), one bar per method: mean over seeds, std as error bar; no bar
    where a draw broke the model (infinite loss)."""
    from matplotlib.figure import Figure

    runs = _by_method(records)
    names = [n for n in next(iter(next(iter(runs.values())).values())) if n != "clean"]
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(runs)
    for i, (m, seeds) in enumerate(runs.items()):
        values = [[max(s[n]["delta_loss"], 1e-6) for s in seeds.values()] for n in names]
        finite = [all(math.isfinite(x) for x in v) for v in values]
        ax.bar(
            [j + (i - (len(runs) - 1) / 2) * width for j in range(len(names))],
            [statistics.fmean(v) if ok else math.nan for v, ok in zip(values, finite)],
            width,
            yerr=[statistics.stdev(v) if ok and len(v) > 1 else 0.0 for v, ok in zip(values, finite)],
            capsize=1.5,
            label=f"{LABELS[m]} (n={len(seeds)} seeds)",
        )
    ax.set_xticks(range(len(names)), [n.strip("`") for n in names], rotation=40, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("loss increase ΔL (floored at 1e-6)")
    ax.set_title(
        f"{docs.MODEL[records[0]['task']]}: loss increase under real faults (mean ± std over seeds; no bar: model broken)",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def section(records: list[dict[str, Any]]) -> str:
    """The generated part of finding 4: both tables and the figure link."""
    return "\n\n".join(
        [
            (
                f"Metric / loss increase ΔL (mean ± std over seeds; {records[0]['eval_data']}; random faults: "
                f"mean of {records[0]['settings']['trials']} draws per seed):"
            ),
            mean_table(records),
            (
                "Paired difference to AdamW (same seed, same batches), mean ± half-width of the 95% t interval "
                "over seeds, and for ΔL the mean difference relative to AdamW's mean ΔL where that mean is larger "
                "than its seed std; **bold** where the interval excludes 0 (negative ΔL = more robust than AdamW):"
            ),
            paired_table(records),
            holm(records),
            f"![loss increase under real faults](images/results/{FIGURE.name})",
        ]
    )


def summarize(args: argparse.Namespace) -> str:
    records = load_records(FINDING, args.results)
    records = [r for r in records if r["task"] == "lm"]
    if not records:
        raise SystemExit(f"no {FINDING} records under {args.results}")
    generated = section(records)
    if args.write_docs:
        DOCS.write_text(docs.fill(DOCS.read_text(), {FINDING: generated}))
        plot(records, FIGURE)
    else:
        print(generated)
    return generated


def main(argv: list[str] | None = None) -> Any:
    ap = cli.parser(__doc__.splitlines()[1], FINDING)
    ap.set_defaults(tasks=["lm"], steps=500, threads=1)
    ap.add_argument("--num-seeds", type=cli.positive_int, default=3, help="seeds --seed, --seed+1, ...")
    ap.add_argument("--acr-eps", type=cli.positive_float, default=0.1, help="ACR / SAM training eps (L2)")
    ap.add_argument("--trials", type=cli.positive_int, default=5, help="draws of each random fault")
    ap.add_argument("--eval-eps", type=cli.positive_float, nargs="+", default=[0.5, 1.0], help="gradient corruption")
    ap.add_argument("--summarize", action="store_true", help="build the finding-4 tables from the records")
    ap.add_argument("--write-docs", action="store_true", help=f"with --summarize: write {DOCS.name} and the figure")
    args = ap.parse_args(argv)
    if args.summarize:
        return summarize(args)
    cli.setup(args)
    return run_all(args)


if __name__ == "__main__":
    main()
