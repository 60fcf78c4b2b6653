#!/usr/bin/env python
"""Finding 3 at convergence (paper Table 2): an LSTM language model trained until validation loss stops improving.

The paper's LM family, in plain PyTorch and driven by this script's own loop (no Trainer): a
subword LSTM LM (byte-level BPE trained on the training text, tied input/output embedding,
dropout) on WikiText-2: trained on the first ``1 - --heldout`` of ``valid.txt`` (lines), early
stopping on the held-out rest (evaluated every ``--eval-every`` steps; stop after ``--patience``
evaluations without improvement, best checkpoint restored), scored on ``test.txt`` (never used
for a choice), clean and under the gradient corruption (paper Eq. 10, L2, whole model) at
``--eval-eps``.

Runs, in order (cheapest information first; every finished run writes
``--results/converged/lstm/<run id>.json`` and a run whose record exists is skipped, so the
script resumes where it stopped):

1. the sweep, seed ``--seed``: AdamW and ``ACR(AdamW, eps, p=2, alpha=0.5)`` for eps in ``--sweep-eps``;
2. the final rows, seeds ``--seed .. --seed + --num-seeds - 1``, with ``eps*`` the sweep's eps of
   lowest held-out loss: ``adamw``, ``acr`` (``eps*``, alpha 0.5), ``acr_inf`` (``p = inf`` with
   ``eps* / sqrt(N)``, the same L2 norm when every entry moves), ``sam`` (``p = 2, alpha = 1``,
   ``rho = eps*``) and ``adamw_2x`` (AdamW with twice the patience and step cap: ACR's two passes a
   step as extra search for the baseline).

``--commit`` commits each record as it is written::

    OMP_NUM_THREADS=1 python experiments/converged.py --threads 1 --commit
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _shared as S
from _common import load_text_file, train_byte_level_tokenizer
from records import chosen_eps, commit_record, load_records, record_path, write_record

from acr_optim import ACR
from acr_optim.probe import probe
from acr_optim.probe.metrics import perplexity

FINDING = "converged"
TASK = "lstm"


class LSTMLM(nn.Module):
    """Embedding -> dropout -> LSTM -> dropout -> tied output layer; ``forward`` returns ``{"loss", "logits"}``
    (next-token cross-entropy when ``labels`` are given), so ``acr_optim.probe``'s default loss applies."""

    def __init__(self, vocab: int, width: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(width, width, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.out = nn.Linear(width, vocab)
        self.out.weight = self.embed.weight
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.zeros_(self.out.bias)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, **_: Any) -> dict[str, Tensor]:
        hidden, _ = self.lstm(self.drop(self.embed(input_ids)))
        logits = self.out(self.drop(hidden))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)
            )
        return out


@dataclass(frozen=True)
class Method:
    """A training recipe: AdamW (``eps=None``) or ``ACR(AdamW, eps, p, alpha)``; ``budget`` scales patience and step cap."""

    name: str
    eps: float | None = None
    p: float = 2.0
    alpha: float = 0.5
    budget: int = 1


@dataclass
class Data:
    train: list[dict[str, list[int]]]
    heldout: list[dict[str, Tensor]]
    test: list[dict[str, Tensor]]
    vocab: int


def load_data(args: argparse.Namespace) -> Data:
    """WikiText-2: ``valid.txt`` split by lines into training and held-out text, ``test.txt`` for the score."""
    folder = args.data / "wikitext-2"
    lines = list(load_text_file(str(folder / "valid.txt.gz"), "--data")["text"])
    test = list(load_text_file(str(folder / "test.txt.gz"), "--data")["text"])
    cut = round(len(lines) * (1 - args.heldout))
    key = S.config_key({"vocab": args.vocab, "heldout": args.heldout})
    tokenizer = S.cached_tokenizer(
        args.cache / f"tokenizer-{TASK}-{key}", train_byte_level_tokenizer, lines[:cut], args.vocab
    )

    def batches(texts: list[str], limit: int | None = None) -> list[dict[str, Tensor]]:
        blocks = S.lm_blocks(tokenizer, texts, args.block_size)[:limit]
        return [S.stack(blocks[i : i + args.batch_size]) for i in range(0, len(blocks), args.batch_size)]

    return Data(
        S.lm_blocks(tokenizer, lines[:cut], args.block_size),
        batches(lines[cut:]),
        batches(test, args.test_blocks),
        len(tokenizer),
    )


def mean_loss(model: nn.Module, batches: list[dict[str, Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        return sum(float(model(**b)["loss"]) for b in batches) / len(batches)


def fit(model: nn.Module, data: Data, method: Method, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train until the held-out loss has not improved for ``patience`` evaluations (or the step cap); restore the best."""
    base = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    optimizer = base if method.eps is None else ACR(base, eps=method.eps, p=method.p, alpha=method.alpha)
    order = torch.Generator().manual_seed(seed)
    patience, max_steps = args.patience * method.budget, args.max_steps * method.budget
    best = (math.inf, 0, copy.deepcopy(model.state_dict()))
    queue: list[list[int]] = []
    step, bad, start = 0, 0, time.perf_counter()
    while step < max_steps and bad < patience:
        model.train()
        for _ in range(args.eval_every):
            if not queue:
                queue = [b.tolist() for b in torch.randperm(len(data.train), generator=order).split(args.batch_size)]
            batch = S.stack([data.train[i] for i in queue.pop()])

            def closure(batch: dict[str, Tensor] = batch) -> Tensor:
                loss = model(**batch)["loss"]
                loss.backward()
                return loss

            optimizer.zero_grad()
            if method.eps is None:
                closure()
                optimizer.step()
            else:
                optimizer.step(closure)
            step += 1
        loss = mean_loss(model, data.heldout)
        if loss < best[0]:
            best, bad = (loss, step, copy.deepcopy(model.state_dict())), 0
        else:
            bad += 1
        print(f"  {method.name} seed {seed} step {step}: held-out loss {loss:.4f} (best {best[0]:.4f} at {best[1]})")
    model.load_state_dict(best[2])
    return {
        "steps": step,
        "best_step": best[1],
        "epochs": best[1] * args.batch_size / len(data.train),
        "stopped": "patience" if bad >= patience else "step cap",
        "train_seconds": time.perf_counter() - start,
    }


def scores(model: nn.Module, batches: list[dict[str, Tensor]], eval_eps: list[float]) -> dict[str, Any]:
    """Clean loss and perplexity, then the gradient corruption of the whole model (L2) at each eps."""
    table = probe(model, batches, eps=eval_eps, by="all", metric_fn=perplexity)
    first = table.rows[0]
    return {
        "loss": first["loss_clean"],
        "perplexity": first["perplexity_clean"],
        "corrupted": [
            {"eps": r["eps"], "loss": r["loss"], "delta_loss": r["delta_loss"], "perplexity": r["perplexity"]}
            for r in table.rows
        ],
    }


def run(data: Data, method: Method, seed: int, args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = LSTMLM(data.vocab, args.width, args.layers, args.dropout)
    fitted = fit(model, data, method, seed, args)
    start = time.perf_counter()
    heldout, test = scores(model, data.heldout, args.eval_eps), scores(model, data.test, args.eval_eps)
    return {
        "finding": FINDING,
        "task": TASK,
        "method": method.name,
        "settings": settings,
        "seed": seed,
        **fitted,
        "eval_seconds": time.perf_counter() - start,
        "num_params": sum(p.numel() for p in model.parameters()),
        "validation": heldout,
        "test": test,
        "environment": S.environment(),
    }


def final_methods(eps: float, num_params: int) -> list[Method]:
    return [
        Method("adamw"),
        Method("acr", eps=eps),
        Method("acr_inf", eps=eps / math.sqrt(num_params), p=math.inf),
        Method("sam", eps=eps, alpha=1.0),
        Method("adamw_2x", budget=2),
    ]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run every missing run of the sweep, then of the final rows; returns the records written."""
    ap = S.parser(__doc__.splitlines()[1], FINDING)
    ap.set_defaults(width=128, layers=2, vocab=2000, lr=2e-3, threads=1)
    ap.add_argument("--dropout", type=float, default=0.3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--heldout", type=float, default=0.1, help="fraction of valid.txt's lines held out for stopping")
    ap.add_argument("--eval-every", type=S.positive_int, default=100, help="steps between held-out evaluations")
    ap.add_argument("--patience", type=S.positive_int, default=5, help="evaluations without improvement to stop")
    ap.add_argument("--max-steps", type=S.positive_int, default=6000, help="step cap (x2 for adamw_2x)")
    ap.add_argument("--test-blocks", type=S.positive_int, default=None, help="score on the first N test blocks (all)")
    ap.add_argument("--num-seeds", type=S.positive_int, default=3)
    ap.add_argument("--sweep-eps", type=S.positive_float, nargs="+", default=[0.03, 0.1, 0.3, 1.0])
    ap.add_argument("--eval-eps", type=S.positive_float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    ap.add_argument("--commit", action="store_true", help="git-commit each record when written")
    args = ap.parse_args(argv)
    S.setup(args)
    data = load_data(args)
    common = {
        k: getattr(args, k)
        for k in ("width", "layers", "vocab", "dropout", "lr", "weight_decay", "batch_size", "block_size", "heldout")
    }
    common |= {k: getattr(args, k) for k in ("eval_every", "patience", "max_steps", "sweep_eps", "eval_eps")}
    common["optimizer"] = "AdamW, constant lr"
    if args.test_blocks is not None:  # only when set: the ids of full-test runs stay what they were
        common["test_blocks"] = args.test_blocks
    seeds = [args.seed + i for i in range(args.num_seeds)]
    num_params = sum(p.numel() for p in LSTMLM(data.vocab, args.width, args.layers, 0.0).parameters())
    written = []
    for stage in ("sweep", "final"):
        if stage == "sweep":
            plan = [(Method("adamw"), args.seed)] + [(Method("acr", eps=e), args.seed) for e in args.sweep_eps]
        else:
            eps = chosen_eps(load_records(FINDING, args.results))
            if eps is None:
                raise SystemExit("the sweep is incomplete: no eps to choose")
            plan = [(m, seed) for seed in seeds for m in final_methods(eps, num_params)]
        for method, seed in plan:
            # A final row equal to a sweep run (seed 0 AdamW, ACR at eps*) is that run: the stage is not in the id.
            settings = {**common, "method": asdict(method), "stage": stage}
            run_id = f"{method.name}-seed{seed}-{S.config_key({**settings, 'stage': None})}"
            path = record_path(FINDING, TASK, run_id, args.results)
            if path.is_file():
                continue
            print(f"{run_id}: training", flush=True)
            record = run(data, method, seed, args, settings)
            write_record(path, record)
            written.append(record)
            print(f"{run_id}: test ppl {record['test']['perplexity']:.2f} -> {path}", flush=True)
            if args.commit:
                commit_record(path, "converged")
    return written


if __name__ == "__main__":
    main()
