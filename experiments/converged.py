#!/usr/bin/env python
"""Finding 3 at convergence (paper Table 2): three model families trained until validation loss stops improving.

Families (``--family``, ``lab.tasks.Family``), each a small model trained from scratch in plain PyTorch by the lab's
plateau-stopped loop (``lab.loop.plateau_fit``: the ``ACR`` optimizer driven directly, no Trainer):

- ``lstm``, the paper's LM family: a subword LSTM LM (tied embedding, dropout) on WikiText-2;
- ``gpt2``: the tiny GPT-2 of the other experiments (``TINY_GPT2`` at ``--width``/``--layers``), with dropout;
- ``marian``: the tiny Marian of the other experiments on Multi30k De->En, with dropout and label smoothing.

The LMs train on the first ``1 - --heldout`` of WikiText-2's ``valid.txt`` (lines), stop on the held-out
rest, and are scored on the first ``--test-blocks`` blocks of ``test.txt``; Marian trains on ``train``,
stops on ``val`` and is scored by BLEU (beam search, ``--beams``) on ``test_2016_flickr``. Test data is
never used for a choice. Early stopping: the held-out loss is measured every ``--eval-every`` steps; an
evaluation that does not beat the best by ``--min-delta`` multiplies the learning rate by ``--lr-decay``,
and ``--patience`` such evaluations in a row stop the run; the best checkpoint is restored. Scores: the
loss (and the test metric) clean and under the gradient corruption (paper Eq. 10, L2, whole model) at
``--eval-eps``; and, for the AdamW runs, finding 2 on the converged model: the held-out loss increase when one
component type (one layer) alone takes the gradient corruption under the paper's protocol
(``lab.fragility.paper_view``: L-inf on the 10 (100) entries of largest ``|gradient|``, eps 0.05-1).

Runs, in order (cheapest information first; every finished run writes
``--results/converged/<family>/<run id>.json`` and a run whose record exists is skipped; a run in progress saves
its training state under ``--cache`` at every evaluation and a killed one goes on from there, so the script
resumes where it stopped, to the step):

1. the sweep, seed ``--seed``: AdamW and ``ACR(AdamW, eps, p=2, alpha=0.5)`` for eps in ``--sweep-eps``;
2. the final rows, seeds ``--seed .. --seed + --num-seeds - 1``, with ``eps*`` the sweep's eps of
   lowest held-out loss: ``adamw``, ``acr`` (``eps*``, alpha 0.5), ``acr_inf`` (``p = inf`` with
   ``eps* / sqrt(N)``, the same L2 norm when every entry moves), ``sam`` (``p = 2, alpha = 1``,
   ``rho = eps*``) and ``adamw_2x`` (AdamW with twice the patience and step cap: ACR's two passes a
   step as extra search for the baseline).

``--final-eps`` starts the final rows at a given eps while the sweep is still running (a bet on its outcome, so
that sweep and final rows run side by side); once every sweep point has a record, the sweep's choice is used, and
``summarize.py`` tabulates only the final rows at it.  ``--device cuda`` trains and scores on a GPU (models are
initialised on the CPU, so a seed gives the same initial weights and data order on either device; the device is
part of a record's ``environment``, not of its settings).  A planned study of final rows (``experiments/plans/``)
runs ``--seeds`` (``--arms`` of them) alone at the sweep's eps, names ``--plan`` in every record and may score
``--faults`` beside the corruption.  ``--commit`` commits each record as it is written::

    OMP_NUM_THREADS=1 python experiments/converged.py --family lstm --commit
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from acr_optim.faults import parse_fault
from acr_optim.probe import probe
from acr_optim.probe.metrics import MetricFn
from lab import cli, loop, methods, tasks
from lab.fragility import fragility_rows, paper_view
from lab.methods import Method, final_methods
from lab.records import (
    chosen_eps,
    claim,
    commit_record,
    config_key,
    load_records,
    record_path,
    release,
    write_record,
)

FINDING = "converged"
FAMILIES = ("lstm", "gpt2", "marian")
FINAL_ARMS = ("adamw", "acr", "sam", "acr_inf", "adamw_2x")
PLANS = Path(__file__).resolve().parent / "plans"
# Per family: model size, regularisation, optimisation and evaluation grid (flags override them).
DEFAULTS: dict[str, dict[str, Any]] = {
    "lstm": {"width": 64, "layers": 2, "dropout": 0.1, "lr": 1e-2, "eval_eps": [0.25, 0.5, 1.0, 2.0]},
    "gpt2": {"width": 128, "layers": 2, "dropout": 0.1, "lr": 2e-3, "eval_eps": [0.25, 0.5, 1.0, 2.0]},
    "marian": {
        "width": 128,
        "layers": 2,
        "dropout": 0.1,
        "label_smoothing": 0.1,
        "lr": 2e-3,
        "batch_size": 64,
        "eval_every": 200,
        # At 6,000 steps (13 epochs) AdamW was still improving (the pilot in experiments/results/pilots/):
        # the cap is a guard here, patience is what stops a run.
        "max_steps": 20000,
        "eval_eps": [0.25, 0.5, 1.0],
    },
}


def training_loss(model: nn.Module, batch: dict[str, Tensor], smoothing: float) -> Tensor:
    """The model's own loss, or (``smoothing > 0``, seq2seq) cross-entropy with label smoothing over the label tokens."""
    out = model(**batch)
    if smoothing == 0:
        return out["loss"]
    logits = out["logits"]
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), batch["labels"].reshape(-1), ignore_index=-100, label_smoothing=smoothing
    )


def mean_loss(model: nn.Module, batches: list[dict[str, Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        return sum(float(model(**b)["loss"]) for b in batches) / len(batches)


def fit(
    model: nn.Module, data: tasks.Family, method: Method, seed: int, args: argparse.Namespace, checkpoint: Path
) -> dict[str, Any]:
    """:func:`lab.loop.plateau_fit` of ``method`` on the family's training data, stopped on its held-out loss (the
    patience and the step cap times ``method.budget``), resumed from ``checkpoint`` where a run left one."""
    optimizer = method.build(model, args.lr, args.weight_decay)
    step = loop.Stepper(
        model, optimizer, method.driver, functools.partial(training_loss, smoothing=args.label_smoothing)
    )
    plateau = loop.Plateau(
        eval_every=args.eval_every,
        patience=args.patience * method.budget,
        max_steps=args.max_steps * method.budget,
        min_delta=args.min_delta,
        lr_decay=args.lr_decay,
    )
    return loop.plateau_fit(
        step,
        data.train,
        data.collate,
        args.batch_size,
        seed,
        lambda: mean_loss(model, data.heldout),
        plateau,
        checkpoint,
        data.device,
        f"{method.name} seed {seed}",
    )


def scores(
    model: nn.Module,
    batches: list[dict[str, Tensor]],
    eval_eps: list[float],
    metric_fn: MetricFn | None,
    faults: list[str] = (),
    trials: int = 1,
) -> dict[str, Any]:
    """Clean loss (and metric), then the gradient corruption of the whole model (L2) at each eps, and each of
    ``faults`` (a random one: the mean of ``trials`` draws), when given."""
    table = probe(model, batches, eps=eval_eps, by="all", metric_fn=metric_fn, faults=list(faults), trials=trials)
    first = table.rows[0]
    metrics = [k.removesuffix("_clean") for k in first if k.endswith("_clean") and k != "loss_clean"]

    def row(r: dict[str, Any]) -> dict[str, Any]:
        return {"loss": r["loss"], "delta_loss": r["delta_loss"], **{m: r[m] for m in metrics}}

    out = {
        "loss": first["loss_clean"],
        **{m: first[f"{m}_clean"] for m in metrics},
        "corrupted": [{"eps": r["eps"], **row(r)} for r in table.rows if r["method"] == "gradient"],
    }
    if faults:
        out["faults"] = [
            {"fault": r["method"], "trials": r["trials"], "delta_loss_std": r["delta_loss_std"], **row(r)}
            for r in table.rows
            if r["method"] != "gradient"
        ]
    return out


def run(
    data: tasks.Family, method: Method, seed: int, args: argparse.Namespace, settings: dict[str, Any], checkpoint: Path
) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = data.new_model().to(data.device)
    fitted = fit(model, data, method, seed, args, checkpoint)
    start = time.perf_counter()
    # Held-out data: losses only (a perplexity is their exp); the metric (BLEU decodes: slow) on the test data.
    heldout = scores(model, data.heldout, args.eval_eps, None, args.faults, args.trials)
    test = scores(model, data.test, args.eval_eps, data.metric_fn, args.faults, args.trials)
    scored = time.perf_counter()
    fragility = []  # finding 2 on the AdamW model, the one the paper probes
    if method.name == "adamw":
        fragility = [row for by in ("type", "layer") for row in fragility_rows(data.heldout, model, by, paper_view(by))]
    return {
        "finding": FINDING,
        "task": data.name,
        "method": method.name,
        "metric": data.metric,
        "settings": settings,
        "seed": seed,
        **fitted,
        "eval_seconds": scored - start,
        "probe_seconds": time.perf_counter() - scored,
        "num_params": sum(p.numel() for p in model.parameters()),
        "validation": heldout,
        "test": test,
        "fragility": fragility,
        "environment": loop.environment(data.device),
        **({"plan": args.plan} if args.plan else {}),
    }


def arguments(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with ``--family``'s :data:`DEFAULTS` under the flags."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--family", choices=FAMILIES, default="lstm")
    family = first.parse_known_args(argv)[0].family
    ap = cli.parser(__doc__.splitlines()[1], FINDING, fixed_budget=False)
    ap.add_argument("--family", choices=FAMILIES, default="lstm", help="model family (sets the defaults below)")
    ap.add_argument("--dropout", type=cli.fraction, default=0.1)
    ap.add_argument("--label-smoothing", type=cli.fraction, default=0.0, help="seq2seq training loss only (marian)")
    ap.add_argument("--weight-decay", type=cli.nonnegative_float, default=0.01)
    ap.add_argument("--heldout", type=cli.fraction, default=0.1, help="LMs: fraction of valid.txt's lines held out")
    ap.add_argument("--eval-every", type=cli.positive_int, default=100, help="steps between held-out evaluations")
    ap.add_argument(
        "--min-delta", type=cli.nonnegative_float, default=1e-3, help="held-out loss decrease that counts as improving"
    )
    ap.add_argument(
        "--lr-decay", type=cli.unit_float, default=0.5, help="lr factor after an evaluation without improving"
    )
    ap.add_argument(
        "--patience", type=cli.positive_int, default=3, help="evaluations without improving in a row to stop"
    )
    ap.add_argument("--max-steps", type=cli.positive_int, default=6000, help="step cap (x2 for adamw_2x)")
    ap.add_argument("--test-blocks", type=cli.positive_int, default=1000, help="score the first N test blocks / pairs")
    ap.add_argument("--beams", type=cli.positive_int, default=4, help="beam size of the BLEU decoding (marian)")
    ap.add_argument("--num-seeds", type=cli.positive_int, default=3)
    ap.add_argument("--sweep-eps", type=cli.positive_float, nargs="+", default=[0.1, 0.3, 1.0, 3.0, 10.0])
    ap.add_argument(
        "--final-eps",
        type=cli.positive_float,
        help="ACR eps of the final rows while the sweep is unfinished (default: wait for the sweep's choice)",
    )
    ap.add_argument("--device", type=cli.device, default="cpu", help="where to train and score: cpu, cuda, cuda:1, ...")
    ap.add_argument("--eval-eps", type=cli.positive_float, nargs="+")
    ap.add_argument("--commit", action="store_true", help="git-commit each record when written")
    study = ap.add_argument_group("a planned study of final rows (experiments/plans/)")
    study.add_argument(
        "--seeds",
        type=cli.nonnegative_int,
        nargs="+",
        help="run the final rows of these seeds only, at the sweep's eps (or --final-eps), without any sweep run",
    )
    study.add_argument("--arms", nargs="+", choices=FINAL_ARMS, help="with --seeds: only these final rows")
    study.add_argument("--plan", help="the plan the records answer to: a file of experiments/plans/, named in each")
    study.add_argument(
        "--faults",
        nargs="+",
        default=[],
        help="fault specs scored on the held-out and test data too (acr_optim.faults; random ones over --trials)",
    )
    study.add_argument("--trials", type=cli.positive_int, default=5, help="draws of each random fault")
    ap.set_defaults(threads=1, **DEFAULTS[family])
    args = ap.parse_args(argv)
    if args.label_smoothing and family != "marian":
        ap.error(f"--label-smoothing {args.label_smoothing}: only the marian family's training loss uses it")
    if args.arms and not args.seeds:
        ap.error("--arms selects final rows of --seeds: give --seeds too")
    if args.plan and not (PLANS / args.plan).is_file():
        ap.error(f"--plan {args.plan}: no such file in {PLANS} (commit the plan before its first record)")
    for spec in args.faults:
        try:
            parse_fault(spec)
        except ValueError as error:
            ap.error(f"--faults {spec}: {str(error).splitlines()[0]}")
    return args


# The settings a record keeps (and its id hashes); the sweep's grid is the plan's, not a run's: it can grow.
SETTINGS = (
    *("family", "width", "layers", "vocab", "dropout", "label_smoothing", "lr", "weight_decay", "batch_size"),
    *("block_size", "heldout", "eval_every", "min_delta", "lr_decay", "patience", "max_steps", "test_blocks"),
    *("beams", "eval_eps"),
)


def plan(args: argparse.Namespace, num_params: int) -> list[tuple[Method, int, str]]:
    """Every run of the sweep, then of the final rows, as ``(method, seed, stage)``; the final rows need the
    sweep's ``eps``, so while a sweep run is missing only the final rows without one are in the plan (all of them
    with ``--final-eps``).  With ``--seeds``: the final rows (``--arms`` of them) of those seeds alone."""
    family = [r for r in load_records(FINDING, args.results) if r["task"] == args.family]
    eps = chosen_eps(family, args.sweep_eps)
    eps = args.final_eps if eps is None else eps
    if args.seeds:
        if eps is None:
            raise SystemExit(f"--seeds: the {args.family} sweep has not chosen eps yet; give --final-eps")
        rows = [m for m in final_methods(eps, num_params) if not args.arms or m.name in args.arms]
        return [(m, seed, "final") for seed in args.seeds for m in rows]
    runs = [(methods.adamw(), args.seed, "sweep")] + [
        (methods.acr("acr", e), args.seed, "sweep") for e in args.sweep_eps
    ]
    seeds = [args.seed + i for i in range(args.num_seeds)]
    return runs + [(m, seed, "final") for m in final_methods(eps, num_params) for seed in seeds]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run every missing run of the plan; returns the records written.

    Several workers may run the same command at once: each run is claimed before it starts (``records.claim``),
    and the plan is read again after every run, so a worker that found the sweep still running elsewhere does
    the final rows without ``eps`` meanwhile and the others once the sweep's records are in."""
    args = arguments(argv)
    cli.setup(args)
    data = tasks.marian_family(args) if args.family == "marian" else tasks.lm_family(args)
    common = {k: getattr(args, k) for k in SETTINGS} | {"optimizer": "AdamW, lr decay on plateau"}
    num_params = sum(p.numel() for p in data.new_model().parameters())
    written = []
    while True:
        for method, seed, stage in plan(args, num_params):
            # A final row equal to a sweep run (seed 0 AdamW, ACR at eps*) is that run: the stage is not in the id.
            settings = {**common, "method": method.record(), "stage": stage}
            run_id = f"{method.name}-seed{seed}-{config_key({**settings, 'stage': None})}"
            path = record_path(FINDING, args.family, run_id, args.results)
            if not path.is_file() and claim(path):
                break
        else:
            return written  # every run is recorded or being run by another worker
        print(f"{run_id}: training", flush=True)
        checkpoint = args.cache / "checkpoints" / FINDING / args.family / f"{run_id}.pt"
        try:
            record = run(data, method, seed, args, settings, checkpoint)
            write_record(path, record)
            checkpoint.unlink()
        finally:
            release(path)
        written.append(record)
        print(f"{run_id}: test {data.metric} {record['test'][data.metric]:.2f} -> {path}", flush=True)
        if args.commit:
            commit_record(path, FINDING)


if __name__ == "__main__":
    main()
