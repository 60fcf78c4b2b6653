#!/usr/bin/env python
"""The frontier: which method buys the most robustness per unit of compute, and at what clean cost?

Every method trains the same model from the same seed on the same batches (``experiments/``' tiny
GPT-2 on WikiText-2, or tiny Marian on Multi30k De->En) for ``--steps`` optimizer steps, AdamW
underneath with the same learning-rate schedule, then is measured the same way:

    compute     forward/backward passes (counted) and training wall seconds (measured)
    clean       held-out loss and metric (perplexity / BLEU)
    robustness  L(w + a) - L(w) under the gradient corruption a (paper Eq. 10, L2, whole model) at
                ``--eval-eps``, and the loss increase under int4 weights and random / worst bit flips

Methods (``lab.methods.frontier_methods``): AdamW at 1x, 1.2x, 1.5x and 2x the steps (its own compute curve: the
compute-matched baselines of every 1.2-, 1.5- and 2-pass method); ACR at ``interval`` 1/2/5/10, ``p``
2/inf, ``n`` all/1 %, ``alpha`` 0.5/1, ``eps`` 1/2/5 x; and the SAM family of ``pytorch-optimizer`` (SAM, ASAM, GSAM,
WSAM, LookSAM, FriendlySAM) at their documented defaults and at ``rho`` = ACR's ``eps`` (once where
they coincide). Each (method, seed) writes a JSON record under ``--results``; a run whose record
exists is skipped, so the script resumes where it stopped. ``--summarize`` builds the table, the per-peer verdicts and
the Pareto plot from the records alone (``--write-docs``: into benchmarks/README.md)::

    pip install -r benchmarks/requirements.txt
    OMP_NUM_THREADS=1 python benchmarks/frontier.py --commit                     # ~35 min a seed
    python benchmarks/frontier.py --summarize --write-docs
    python benchmarks/frontier.py --quick --results /tmp/frontier               # smoke run, ~1 min

BSAM is left out: it is not a wrapper around AdamW but its own (SGD-like, variational) update, so
at AdamW's learning rate it is a different optimizer, not a different perturbation.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acr_optim.probe import probe
from lab import cli, docs, loop, stats, tasks
from lab.methods import Method, frontier_methods
from lab.records import commit_record, config_key, load_records, read_record, record_path, write_record

BENCHMARK = "frontier"
RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent / "README.md"
QUICK_METHODS = ["adamw_1x", "adamw_2x", "acr", "acr_k2", "acr_a1", "sam_tuned", "gsam", "wsam", "looksam"]
FAULTS = ("int4:g32", "flip:1e-3:int8", "flip-worst:10:mantissa")


# -- one run ---------------------------------------------------------------------------------------


def train(task: tasks.Task, method: Method, seed: int, steps: int, args: argparse.Namespace) -> tuple[nn.Module, dict]:
    """``steps * method.budget`` optimizer steps from ``seed`` (:func:`lab.loop.fixed_steps`); returns the model and
    the compute it took."""
    model = task.new_model(seed).train()
    optimizer = method.build(model, args.lr)
    batches = loop.training_batches(task, seed, args.batch_size)
    done = loop.fixed_steps(model, optimizer, batches, round(steps * method.budget), method.driver)
    return model.eval(), {key: done[key] for key in ("steps", "passes", "train_seconds")}


def evaluate(task: tasks.Task, model: nn.Module, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Clean loss and metric; the loss increase under the gradient corruption at each eval eps and each fault.

    The metric is computed for the clean model only: the robustness columns are loss increases, and a
    BLEU per row (a full greedy decode each) would cost more than the training run it scores.
    """
    table = probe(
        model,
        task.eval_batches,
        eps=args.eval_eps,
        method="gradient",
        faults=list(args.faults),
        by="all",
        trials=args.trials,
        seed=seed,
    )
    with torch.no_grad():
        metric = task.metric_fn(model, task.eval_batches)[task.metric]
    return {
        "loss": table.rows[0]["loss_clean"],
        "metric_value": metric,
        "rows": [{"corruption": r["method"], "eps": r.get("eps"), "delta_loss": r["delta_loss"]} for r in table.rows],
    }


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every missing (task, method, seed) run; returns every record of the requested runs."""
    records = []
    for name in args.tasks:
        task = tasks.build_task(name, args)
        num_params = sum(p.numel() for p in task.new_model(0).parameters())
        every = frontier_methods(args.acr_eps, num_params)
        unknown = set(args.methods or ()) - {m.name for m in every}
        if unknown:
            raise SystemExit(f"--methods: unknown {sorted(unknown)}; known: {', '.join(m.name for m in every)}")
        chosen = [m for m in every if not args.methods or m.name in args.methods]
        for seed, method in itertools.product(range(args.seed, args.seed + args.num_seeds), chosen):
            settings = {
                "model": tasks.model_settings(args),
                "steps": args.steps,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "method": method.settings,
                "eval_eps": args.eval_eps,
                "faults": list(args.faults),
                "trials": args.trials,
            }
            path = record_path(BENCHMARK, name, f"{method.name}-seed{seed}-{config_key(settings)}", args.results)
            if not path.is_file():
                print(f"{name} {method.name} seed {seed}: training", flush=True)
                model, compute = train(task, method, seed, args.steps, args)
                start = time.perf_counter()
                scores = evaluate(task, model, seed, args)
                record = {
                    "benchmark": BENCHMARK,
                    "task": name,
                    "method": method.name,
                    "family": method.family,
                    "settings": settings,
                    "seed": seed,
                    **compute,
                    "passes_per_step": compute["passes"] / compute["steps"],
                    "num_params": num_params,
                    "eval_seconds": time.perf_counter() - start,
                    "metric": task.metric,
                    "eval_data": task.eval_data,
                    "environment": loop.environment(),
                    **scores,
                }
                write_record(path, record)
                if args.commit:
                    commit_record(path, BENCHMARK)
            records.append(read_record(path))
            print(f"{name} {method.name} seed {seed}: {path.name}", flush=True)
    return records


# -- summary ---------------------------------------------------------------------------------------


@dataclass
class Point:
    """A method's mean over seeds: compute, clean loss and metric, loss increase per corruption."""

    method: str
    family: str
    seeds: int
    passes: float  # per AdamW-1x step count (1.0 = AdamW's compute)
    seconds: float
    loss: float
    metric: float
    delta: dict[str, tuple[float, float]]  # corruption label -> (mean, std) of the loss increase
    by_seed: dict[str, dict[int, float]]  # "loss" and each corruption label -> seed -> value, for paired tests


def _label(row: dict[str, Any]) -> str:
    return f"eps {row['eps']:g}" if row["corruption"] == "gradient" else row["corruption"]


def points(records: list[dict[str, Any]]) -> list[Point]:
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    found = []
    for name, runs in by_method.items():
        if len({config_key(r["settings"]) for r in runs}) > 1:
            raise ValueError(f"{name}: records with different settings in one folder; summarize one set at a time")
        labels = [_label(row) for row in runs[0]["rows"]]
        deltas = {lab: [next(x["delta_loss"] for x in r["rows"] if _label(x) == lab) for r in runs] for lab in labels}
        found.append(
            Point(
                method=name,
                family=runs[0]["family"],
                seeds=len(runs),
                passes=statistics.fmean(r["passes"] / r["settings"]["steps"] for r in runs),
                seconds=statistics.fmean(r["train_seconds"] for r in runs),
                loss=statistics.fmean(r["loss"] for r in runs),
                metric=statistics.fmean(r["metric_value"] for r in runs),
                delta={lab: stats.mean_std(v) for lab, v in deltas.items()},
                by_seed={
                    "loss": {r["seed"]: r["loss"] for r in runs},
                    **{lab: dict(zip((r["seed"] for r in runs), v)) for lab, v in deltas.items()},
                },
            )
        )
    return sorted(
        found,
        key=lambda q: (["AdamW", "ACR"].index(q.family) if q.family in ("AdamW", "ACR") else 2, q.passes, q.method),
    )


def no_worse(a: dict[int, float], b: dict[int, float], margin: float = 0.005) -> bool:
    """``a`` is not worse (not larger) than ``b``: the mean over common seeds of ``a[s] - b[s]`` is at most
    ``margin`` (0.5 %) of ``b``'s mean. The margin absorbs the float-level drift between two implementations
    of the same step (``ACR(p=2, alpha=1)`` and SAM); it is far below the spread between seeds."""
    seeds = sorted(a.keys() & b.keys())
    return statistics.fmean(a[s] - b[s] for s in seeds) <= margin * abs(statistics.fmean(b[s] for s in seeds))


def dominates(a: Point, b: Point, robustness: str, slack: float = 0.02, margin: float = 0.005) -> bool:
    """``a`` is at least as good as ``b`` on compute (within ``slack``), clean loss and the loss increase
    ``robustness`` (:func:`no_worse`: mean paired difference within ``margin``, 0.5 %)."""
    return (
        a.passes <= b.passes * (1 + slack)
        and no_worse(a.by_seed["loss"], b.by_seed["loss"], margin)
        and no_worse(a.by_seed[robustness], b.by_seed[robustness], margin)
    )


def pareto(found: list[Point], robustness: str) -> list[Point]:
    """The methods no other method dominates with a strictly lower clean loss or loss increase (ties stay)."""

    def beaten(q: Point) -> bool:
        return any(
            dominates(o, q, robustness) and (o.loss < q.loss or o.delta[robustness][0] < q.delta[robustness][0])
            for o in found
        )

    return [q for q in found if not beaten(q)]


def verdicts(found: list[Point], robustness: str) -> list[str]:
    """Per peer: the ACR settings that dominate it, or else the one closest to doing so (at no more compute, the
    most robust of those no worse on clean loss, else the most robust) and where it falls short; and whether
    AdamW itself dominates the peer (then the peer buys nothing here)."""
    acr = [q for q in found if q.family == "ACR"]
    adamw = [q for q in found if q.family == "AdamW"]
    lines = []
    for peer in (q for q in found if q.family not in ("AdamW", "ACR")):
        winners = [q.method for q in acr if dominates(q, peer, robustness)]
        if winners:
            lines.append(f"- `{peer.method}`: dominated by {', '.join(f'`{w}`' for w in winners)}.")
            continue
        affordable = [q for q in acr if q.passes <= peer.passes * 1.02] or acr
        # The closest to dominating: the most robust of those no worse on clean loss, else of all.
        best = min([q for q in affordable if q.loss <= peer.loss] or affordable, key=lambda q: q.delta[robustness][0])
        short = []
        if best.loss > peer.loss:
            short.append(f"clean loss {best.loss:.3f} vs {peer.loss:.3f}")
        if best.delta[robustness][0] > peer.delta[robustness][0]:
            short.append(f"{robustness} increase {best.delta[robustness][0]:.3f} vs {peer.delta[robustness][0]:.3f}")
        if best.passes > peer.passes * 1.02:
            short.append(f"passes {best.passes:.2f} vs {peer.passes:.2f}")
        line = f"- `{peer.method}`: **not dominated**; the closest affordable ACR, `{best.method}`, loses on {'; '.join(short)}."
        baseline = [q.method for q in adamw if dominates(q, peer, robustness)]
        if baseline:
            line += f" But AdamW dominates it too ({', '.join(f'`{b}`' for b in baseline)}): off the frontier."
        lines.append(line)
    return lines


def paired(a: dict[int, float], b: dict[int, float], margin: float = 0.005) -> tuple[str, bool]:
    """``a - b`` over the common seeds as ``mean ± half-width of the 95% t interval``, and whether the interval's upper
    end is within ``margin`` of ``b``'s mean (``a`` no worse than ``b`` beyond the seed-to-seed noise)."""
    seeds = sorted(a.keys() & b.keys())
    mean, half = stats.t_interval([a[s] - b[s] for s in seeds])
    return docs.interval(mean, half, ".3f"), mean + half <= margin * abs(statistics.fmean(b[s] for s in seeds))


def dominance(found: list[Point], robustness: str) -> list[str]:
    """How many peer settings an ACR setting dominates, with the 0.5 % tie margin and without it, and every dominating
    pair's paired differences on clean loss and on the loss increase ``robustness``, resolved or not."""
    peers = [q for q in found if q.family not in ("AdamW", "ACR")]
    pairs = [(peer, q) for peer in peers for q in found if q.family == "ACR" and dominates(q, peer, robustness)]
    rows, both, strict = [], 0, set()
    for peer, q in pairs:
        (loss, loss_ok), (delta, delta_ok) = (paired(q.by_seed[k], peer.by_seed[k]) for k in ("loss", robustness))
        both += loss_ok and delta_ok
        sides = [side for side, ok in (("clean loss", loss_ok), (f"ΔL {robustness}", delta_ok)) if ok]
        resolved = "both" if len(sides) == 2 else sides[0] if sides else "neither"
        exact = dominates(q, peer, robustness, margin=0.0)
        if exact:
            strict.add(peer.method)
        rows.append(f"| `{peer.method}` | `{q.method}` | {loss} | {delta} | {'yes' if exact else 'no'} | {resolved} |")
    return [
        (
            f"ACR settings dominate {len({peer.method for peer, _ in pairs})} of the {len(peers)} peer settings, "
            f"{len(strict)} without the 0.5 % tie margin. Every dominating pair, ACR setting minus peer, paired "
            "over the seeds (mean ± half-width of the 95 % t interval); *resolved* where the interval's upper end is "
            f"within the 0.5 % margin (no worse beyond the seed-to-seed noise): {both} of the {len(pairs)} pairs on "
            "both axes."
        ),
        "",
        f"| peer | ACR setting | clean loss | ΔL {robustness} | dominates without the margin | resolved |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def table(found: list[Point], metric: str) -> str:
    labels = list(found[0].delta)
    head = [
        "method",
        "family",
        "seeds",
        "passes (x AdamW)",
        "train s",
        "clean loss",
        metric,
        *(f"ΔL {lab}" for lab in labels),
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for q in found:
        cells = [
            f"`{q.method}`",
            q.family,
            str(q.seeds),
            f"{q.passes:.2f}",
            f"{q.seconds:.0f}",
            f"{q.loss:.3f}",
            f"{q.metric:.2f}",
        ]
        cells += [f"{m:.3f} ± {s:.3f}" for m, s in q.delta.values()]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(found: list[Point], robustness: str, metric: str, path: Path) -> None:
    """Robustness against compute (colour: clean metric), and robustness against clean loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"AdamW": "s", "ACR": "o"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    values = [q.metric for q in found]
    norm = matplotlib.colors.Normalize(min(values), max(values))
    for q in found:
        y = q.delta[robustness][0]
        left.scatter(q.passes, y, c=[q.metric], cmap="viridis", norm=norm, marker=markers.get(q.family, "^"), s=60)
        right.scatter(
            q.loss,
            y,
            color="C0" if q.family == "ACR" else "C3" if q.family == "AdamW" else "C2",
            marker=markers.get(q.family, "^"),
            s=60,
        )
        for ax, x in ((left, q.passes), (right, q.loss)):
            ax.annotate(q.method, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    left.set(
        xlabel="forward/backward passes per step (AdamW = 1)",
        ylabel=f"loss increase, {robustness}",
        yscale="log",
        title="robustness per compute (square AdamW, circle ACR, triangle peers)",
    )
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=left, label=f"clean {metric}")
    right.set(
        xlabel="clean held-out loss",
        ylabel=f"loss increase, {robustness}",
        yscale="log",
        title="robustness against clean quality (lower left is better)",
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(args: argparse.Namespace) -> str:
    """The markdown section of every task's records (and the figure with ``--write-docs``)."""
    parts = []
    for name in args.tasks:
        records = [r for r in load_records(BENCHMARK, args.results) if r["task"] == name]
        if not records:
            continue
        found = points(records)
        robustness = f"eps {records[0]['settings']['eval_eps'][0]:g}"
        first = records[0]
        parts += [
            (
                f"### {name}: {first['num_params']:,} parameters, {first['settings']['steps']} steps of "
                f"{first['settings']['batch_size']}, {first['eval_data']}"
            ),
            "",
            table(found, first["metric"]),
            "",
            (
                f"Per peer, against every ACR setting at no more compute, no worse clean loss and no larger loss "
                f"increase under the gradient corruption at {robustness} (mean of the per-seed differences; "
                f"within 0.5 % counts as a tie):"
            ),
            "",
            *verdicts(found, robustness),
            "",
            *dominance(found, robustness),
            "",
            f"On the Pareto frontier (passes, clean loss, loss increase at {robustness}): "
            + ", ".join(f"`{q.method}`" for q in pareto(found, robustness))
            + ".",
            "",
        ]
        figure = args.figures / f"frontier_{name}.png"
        if args.write_docs:
            plot(found, robustness, first["metric"], figure)
        parts += [f"![{name}: robustness against compute and clean loss]({os.path.relpath(figure, README.parent)})", ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> Any:
    ap = cli.parser(__doc__.splitlines()[1], BENCHMARK)
    ap.set_defaults(width=128, layers=2, vocab=2000, steps=200, threads=1, results=RESULTS, tasks=["lm", "de_en"])
    ap.add_argument("--num-seeds", type=cli.positive_int, default=3, help="seeds --seed, --seed+1, ...")
    ap.add_argument(
        "--acr-eps", type=cli.positive_float, default=0.1, help="ACR training eps (L2); the peers' tuned rho"
    )
    ap.add_argument("--eval-eps", type=cli.positive_float, nargs="+", default=[0.5, 1.0], help="gradient corruption")
    ap.add_argument("--faults", nargs="+", default=list(FAULTS), help="acr_optim.faults specs")
    ap.add_argument("--trials", type=cli.positive_int, default=3, help="draws of each random fault")
    ap.add_argument("--methods", nargs="+", default=None, help="only these method names (default: all)")
    ap.add_argument("--commit", action="store_true", help="git-commit each record as it is written")
    ap.add_argument("--quick", action="store_true", help="a tiny model, a few steps, 5 methods, 1 seed: a smoke run")
    ap.add_argument("--summarize", action="store_true", help="print the tables from the records")
    ap.add_argument("--write-docs", action="store_true", help=f"with --summarize: into {README.name} and the figure")
    ap.add_argument("--figures", type=Path, default=RESULTS, help="where --write-docs puts frontier_<task>.png")
    args = ap.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.vocab, args.max_train, args.eval_size, args.block_size = 32, 1, 300, 300, 4, 32
        args.steps, args.num_seeds, args.trials = 6, 1, 1
        args.methods = args.methods or QUICK_METHODS
    if args.summarize:
        section = summarize(args)
        print(section)
        if args.write_docs:
            README.write_text(docs.fill(README.read_text(), {BENCHMARK: section}))
        return section
    cli.setup(args)
    return run_all(args)


if __name__ == "__main__":
    main()
