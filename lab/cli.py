"""The command line every experiment and benchmark shares: argument types with the library's own checks, the
common flags (:func:`parser`) and the set-up before the runs (:func:`setup`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from acr_optim.corruption import check_eps, check_n
from acr_optim.optimizer import check_alpha
from lab.records import RESULTS
from lab.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


def positive_int(text: str) -> int:
    """An int >= 1: a size, a count, a number of steps."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """An int >= 0: a seed."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """A float > 0 (``acr_optim.corruption.check_eps``): an eps, a learning rate."""
    try:
        return check_eps(float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def unit_float(text: str) -> float:
    """A float in ``(0, 1]`` (``acr_optim.optimizer.check_alpha``): ACR's alpha."""
    try:
        return check_alpha(float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def fraction(text: str) -> float:
    """A float in ``[0, 1)``: a dropout or label-smoothing probability, a held-out share."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """A float >= 0: a tolerance, a weight decay."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a float >= 0, got {text}")
    return value


def device(text: str) -> torch.device:
    """A torch device that this machine has: ``cpu``, ``cuda``, ``cuda:1``, ..."""
    try:
        dev = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"must be a torch device such as cpu or cuda, got {text}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu or a cuda device, got {text}")
    return dev


def n_value(text: str) -> int | None:
    """``all`` (no L0 limit) or a positive int."""
    if text == "all":
        return None
    try:
        return check_n(int(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"n must be 'all' or an int >= 1, got {text}: {err}") from None


def parser(description: str, out: str, fixed_budget: bool = True) -> argparse.ArgumentParser:
    """Arguments every experiment takes: data, seed, model size, output; with ``fixed_budget`` (every script but
    converged.py, which has its own data splits and stopping rule) also tasks, steps and data sizes."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with multi30k/ and wikitext-2/")
    ap.add_argument("--seed", type=int, default=0, help="seed of model init, batch order and random corruptions")
    ap.add_argument("--batch-size", type=positive_int, default=32)
    ap.add_argument("--lr", type=positive_float, default=2e-3, help="AdamW peak learning rate")
    ap.add_argument("--width", type=positive_int, default=128, help="d_model (Marian) / n_embd (GPT-2)")
    ap.add_argument("--layers", type=positive_int, default=2, help="encoder and decoder layers / GPT-2 layers")
    ap.add_argument("--vocab", type=positive_int, default=2000, help="size of the locally trained tokenizer")
    if fixed_budget:
        ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
        ap.add_argument("--steps", type=positive_int, default=1500, help="training budget in optimizer steps")
        ap.add_argument("--max-train", type=positive_int, default=None, help="keep the first N training pairs / lines")
        ap.add_argument("--eval-size", type=positive_int, default=200, help="validation pairs (de_en) / blocks (lm)")
    ap.add_argument("--block-size", type=positive_int, default=64, help="LM sequence length")
    ap.add_argument("--threads", type=positive_int, default=2, help="torch.set_num_threads")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "experiments" / out)
    ap.add_argument(
        "--results", type=Path, default=RESULTS, help="where run records go (a run whose record exists is skipped)"
    )
    ap.add_argument(
        "--cache",
        type=Path,
        default=REPO / "outputs" / "experiments" / "cache",
        help="trained models and tokenizers, shared by the experiments (a run with the same settings is reused)",
    )
    return ap


def setup(args: argparse.Namespace) -> None:
    """Before a script's runs: torch's thread count, the output and cache folders, and a check that ``--data`` exists."""
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    if not args.data.is_dir():
        raise SystemExit(f"--data {args.data}: no such folder (expected multi30k/ and wikitext-2/ in it)")
