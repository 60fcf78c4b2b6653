"""What robustness ACR's amortized mode keeps: the indicator after a short, equal-budget training run.

A byte-level GPT-2 (from config) is trained on WikiText-2 ``valid`` for the same number of
optimizer steps and the same batches with
  - AdamW (baseline),
  - ACR(AdamW) exact (every step corrupted, two passes),
  - ACR(AdamW, interval=k) amortized (every k-th step corrupted, one pass on the others),
  - the same with the last ACR correction reused on the cheap steps (LookSAM-like, prototyped
    here with the two-phase API; one extra gradient-sized buffer),
and then evaluated on held-out WikiText-2 ``test`` batches: clean loss ``L(w)`` and the measured
indicator ``L(w + a) - L(w)`` of the gradient corruption ``a = gradient_corruption(grad L(w), eps, p)``
(paper Eq. 10) at fixed ``eps`` values, plus the training wall time.

Usage:  python benchmarks/robustness.py [--data ../shared/data/wikitext-2] [--steps 300] [--seeds 0 1]
        [--train-eps 0.5] [--eval-eps 0.25 0.5 1.0] [--intervals 2 5] [--out robustness.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from acr_optim import ACR
from acr_optim.probe import probe
from lab.loop import Stepper


def load_bytes(path: Path) -> torch.Tensor:
    with gzip.open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()


def batches(tokens: torch.Tensor, count: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq, (count, batch), generator=gen)
    return [torch.stack([tokens[s : s + seq] for s in row.tolist()]) for row in starts]


def make_model(args: argparse.Namespace, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=256,
        n_positions=args.seq_len,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=max(1, args.n_embd // 32),
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def lm_loss(model: GPT2LMHeadModel, ids: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss of a batch of byte sequences."""
    return model(input_ids=ids, labels=ids).loss


def train(model, optimizer, data: list[torch.Tensor], driver: str) -> float:
    """One :class:`lab.loop.Stepper` step per batch of ``data``; returns the wall seconds."""
    model.train()
    step = Stepper(model, optimizer, driver, loss=lm_loss)
    start = time.perf_counter()
    for ids in data:
        step(ids)
    return time.perf_counter() - start


def indicator(model, data: list[torch.Tensor], eps_values: list[float], p: float) -> tuple[float, dict[str, float]]:
    """``L(w)`` and ``L(w + a) - L(w)`` for the gradient corruption at each ``eps`` (the probe: one gradient, weights
    restored exactly)."""
    table = probe(model, data, eps=eps_values, p=p, method="gradient", by="all", loss_fn=lm_loss)
    return table.rows[0]["loss_clean"], {str(row["eps"]): row["delta_loss"] for row in table.rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/wikitext-2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--p", type=float, default=2.0)
    parser.add_argument("--train-eps", type=float, default=0.5)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--eval-eps", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.data / "valid.txt.gz").exists():
        raise SystemExit(f"WikiText-2 not found under {args.data} (pass --data)")
    train_tokens, test_tokens = load_bytes(args.data / "valid.txt.gz"), load_bytes(args.data / "test.txt.gz")
    held_out = batches(test_tokens, args.eval_batches, args.batch, args.seq_len, seed=1234)

    variants = {"AdamW": (None, "plain"), "ACR exact": (1, "closure")}
    for k in args.intervals:
        variants[f"ACR amortized k={k}"] = (k, "closure")
        variants[f"ACR amortized k={k} +reuse"] = (k, "acr_reuse")
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for seed in args.seeds:
        data = batches(train_tokens, args.steps, args.batch, args.seq_len, seed=seed)
        for name, (interval, driver) in variants.items():
            model = make_model(args, seed)
            base = torch.optim.AdamW(model.parameters(), lr=args.lr)
            opt = (
                base
                if interval is None
                else ACR(base, eps=args.train_eps, p=args.p, alpha=args.alpha, interval=interval)
            )
            seconds = train(model, opt, data, driver)
            clean, gains = indicator(model, held_out, args.eval_eps, args.p)
            results[name].append({"seed": seed, "train_s": seconds, "held_out_loss": clean, "indicator": gains})
            print(f"seed {seed} {name:28s} train {seconds:6.1f}s  held-out loss {clean:.4f}  indicator {gains}")

    print(
        f"\nmeans over seeds {args.seeds}, {args.steps} steps, p={args.p:g}, train eps={args.train_eps}, alpha={args.alpha}"
    )
    header = f"{'variant':28s} {'train s':>8s} {'L(w)':>8s} " + " ".join(f"{'I@' + str(e):>9s}" for e in args.eval_eps)
    print(header)
    summary = {}
    for name, runs in results.items():
        row = {
            "train_s": statistics.fmean(r["train_s"] for r in runs),
            "held_out_loss": statistics.fmean(r["held_out_loss"] for r in runs),
            "indicator": {str(e): statistics.fmean(r["indicator"][str(e)] for r in runs) for e in args.eval_eps},
        }
        summary[name] = row
        cells = " ".join(f"{row['indicator'][str(e)]:9.4f}" for e in args.eval_eps)
        print(f"{name:28s} {row['train_s']:8.1f} {row['held_out_loss']:8.4f} {cells}")
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": summary,
        "runs": results,
    }
    result["config"]["torch"] = torch.__version__
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
