"""What the experiment scripts share: the two tasks (Multi30k De->En translation, WikiText-2 language
modelling) built from the recipes' data loaders, tokenizers and model configs, one plain training loop
(AdamW, or ``ACR(AdamW)``) that feeds baseline and ACR runs the same batches, a model cache, and
small I/O helpers.

The recipes (``recipes/de_en.py``, ``recipes/lm.py``) train through the Hugging Face Trainer with
evaluation built in; the experiments need many short runs with exactly matched batches, the
amortized ``interval`` mode and their own evaluation grids, so they drive the optimizer directly and
import everything else (file readers, tokenizer trainers, ``TINY_MARIAN``/``TINY_GPT2``) from the recipes.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    DataCollatorForSeq2Seq,
    GPT2Config,
    MarianConfig,
    PreTrainedTokenizerFast,
    get_linear_schedule_with_warmup,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "recipes"))
from _common import load_text_file, train_byte_level_tokenizer, train_sentencepiece_style_tokenizer
from de_en import TINY_MARIAN, fit_to_tokenizer, seq2seq_from_config
from lm import TINY_GPT2

from acr_optim import ACR
from acr_optim.corruption import check_eps, check_n
from acr_optim.data import load_parallel
from acr_optim.optimizer import check_alpha
from acr_optim.probe.metrics import bleu, perplexity
from lab.records import RESULTS, read_record, record_path, write_record

TASKS = ("de_en", "lm")
MODEL_SETTINGS = ("width", "layers", "vocab", "max_train", "eval_size", "block_size")
METRIC = {"de_en": "bleu", "lm": "perplexity"}
HIGHER_IS_BETTER = {"bleu": True, "perplexity": False}


# -- command line ----------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text}")
    return value


def positive_float(text: str) -> float:
    try:
        return check_eps(float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def unit_float(text: str) -> float:
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


# -- tasks -----------------------------------------------------------------------------------------


@dataclass
class Task:
    """A tokenized corpus and how to build, batch and score a model for it."""

    name: str
    tokenizer: PreTrainedTokenizerFast
    train: list[dict[str, list[int]]]
    eval_batches: list[dict[str, torch.Tensor]]
    collate: Callable[[list[dict[str, list[int]]]], dict[str, torch.Tensor]]
    metric_fn: Callable[[nn.Module, Sequence[Any]], dict[str, float]]
    metric: str
    config: dict[str, Any]

    @property
    def eval_data(self) -> str:
        """What ``eval_batches`` hold."""
        if self.name == "de_en":
            return f"Multi30k val, first {self.config['eval_size']} pairs"
        return f"WikiText-2 test, first {self.config['eval_size']} blocks of {self.config['block_size']} tokens"

    def new_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        if self.name == "de_en":
            return seq2seq_from_config(marian_config(self.tokenizer, self.config), self.tokenizer)
        return AutoModelForCausalLM.from_config(gpt2_config(self.tokenizer, self.config))


def marian_config(tokenizer: PreTrainedTokenizerFast, cfg: dict[str, Any], dropout: float = 0.0) -> MarianConfig:
    """:data:`TINY_MARIAN` at ``cfg``'s width and depth; dropout off by default, so that ACR's clean and
    corrupted passes see the same network (the fixed-budget experiments)."""
    width, layers = cfg["width"], cfg["layers"]
    heads = max(1, width // 32)
    config = MarianConfig(
        **{
            **TINY_MARIAN,
            "d_model": width,
            "encoder_layers": layers,
            "decoder_layers": layers,
            "encoder_attention_heads": heads,
            "decoder_attention_heads": heads,
            "encoder_ffn_dim": 2 * width,
            "decoder_ffn_dim": 2 * width,
            "dropout": dropout,
        }
    )
    return fit_to_tokenizer(config, tokenizer)


def gpt2_config(tokenizer: PreTrainedTokenizerFast, cfg: dict[str, Any], dropout: float = 0.0) -> GPT2Config:
    """:data:`TINY_GPT2` at ``cfg``'s width, depth and block size; dropout off by default (as :func:`marian_config`)."""
    width = cfg["width"]
    return GPT2Config(
        **{
            **TINY_GPT2,
            "n_embd": width,
            "n_layer": cfg["layers"],
            "n_head": max(1, width // 32),
            "n_inner": 4 * width,
            "n_positions": max(TINY_GPT2["n_positions"], cfg["block_size"]),
            "resid_pdrop": dropout,
            "embd_pdrop": dropout,
            "attn_pdrop": dropout,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
    )


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def cached_tokenizer(
    folder: Path, train: Callable[[list[str], int], PreTrainedTokenizerFast], texts: list[str], vocab: int
) -> PreTrainedTokenizerFast:
    if not (folder / "tokenizer.json").is_file():
        train(texts, vocab).save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def encode_pairs(tokenizer: PreTrainedTokenizerFast, rows: list[dict[str, str]]) -> list[dict[str, list[int]]]:
    """De->En pairs as seq2seq features (source ids and mask, target ids as labels; 128 tokens at most)."""
    src = tokenizer([r["de"] for r in rows], max_length=128, truncation=True)
    tgt = tokenizer(text_target=[r["en"] for r in rows], max_length=128, truncation=True)["input_ids"]
    return [
        {"input_ids": i, "attention_mask": m, "labels": t}
        for i, m, t in zip(src["input_ids"], src["attention_mask"], tgt)
    ]


def lm_blocks(tokenizer: PreTrainedTokenizerFast, texts: list[str], size: int) -> list[dict[str, list[int]]]:
    """Each line's tokens then EOS, concatenated and cut into blocks of ``size`` (as recipes/lm.py)."""
    ids = [t for line in tokenizer(texts)["input_ids"] for t in (*line, tokenizer.eos_token_id)]
    blocks = [ids[i : i + size] for i in range(0, len(ids) - size + 1, size)]
    return [{"input_ids": b, "attention_mask": [1] * size, "labels": b} for b in blocks]


def stack(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Equal-length features as one batch of tensors."""
    return {k: torch.tensor([f[k] for f in features]) for k in features[0]}


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch of tensors on ``device`` (the same tensors where they are there already)."""
    return {k: v.to(device) for k, v in batch.items()}


def build_task(name: str, args: argparse.Namespace) -> Task:
    """The ``name`` task from ``args.data`` (tokenizer trained on its training text, cached under ``args.cache``)."""
    cfg = model_settings(args)
    cache = args.cache / f"tokenizer-{name}-{config_key(cfg)}"
    if name == "de_en":
        folder = args.data / "multi30k"
        pairs = list(load_parallel(str(folder / "train"), "de", "en")["translation"])[: args.max_train]
        val = list(load_parallel(str(folder / "val"), "de", "en")["translation"])[: args.eval_size]
        texts = [t for pair in pairs for t in (pair["de"], pair["en"])]
        tokenizer = cached_tokenizer(cache, train_sentencepiece_style_tokenizer, texts, args.vocab)

        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")
        # No model given to the collator: Marian shifts the labels into decoder_input_ids itself.
        train, eval_features = encode_pairs(tokenizer, pairs), encode_pairs(tokenizer, val)
        metric_fn = bleu(tokenizer, max_new_tokens=64, num_beams=1)
        eval_batch = 50
    else:
        folder = args.data / "wikitext-2"
        lines = list(load_text_file(str(folder / "valid.txt.gz"), "--data")["text"])[: args.max_train]
        test = list(load_text_file(str(folder / "test.txt.gz"), "--data")["text"])
        tokenizer = cached_tokenizer(cache, train_byte_level_tokenizer, lines, args.vocab)

        train = lm_blocks(tokenizer, lines, args.block_size)
        eval_features = lm_blocks(tokenizer, test[: 40 * args.eval_size], args.block_size)[: args.eval_size]
        collator = stack
        metric_fn = perplexity
        eval_batch = 32
    if not train or not eval_features:
        raise ValueError(f"{name}: no training or evaluation examples (check --max-train / --eval-size)")
    return Task(
        name=name,
        tokenizer=tokenizer,
        train=train,
        eval_batches=[collator(list(chunk)) for chunk in _chunks(eval_features, eval_batch)],
        collate=collator,
        metric_fn=metric_fn,
        metric=METRIC[name],
        config=cfg,
    )


# -- training --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """One training run: ``acr_eps=None`` is the AdamW baseline; otherwise ``ACR(AdamW, eps, alpha, interval)``
    with ``p = 2`` and no L0 limit (the whole model as one vector)."""

    seed: int
    steps: int
    batch_size: int
    lr: float
    acr_eps: float | None = None
    acr_alpha: float = 0.5
    interval: int = 1

    @property
    def label(self) -> str:
        if self.acr_eps is None:
            return "baseline"
        every = "" if self.interval == 1 else f", interval={self.interval}"
        return f"ACR(eps={self.acr_eps:g}, alpha={self.acr_alpha:g}{every})"


def config_key(obj: Any) -> str:
    """A short stable hash of a JSON-able configuration (cache folders, record ids)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def training_batches(task: Task, seed: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training batches: epoch after epoch, each a fresh permutation drawn from ``seed``
    (so every method trained from the same seed sees the same batches)."""
    order = torch.Generator().manual_seed(seed)
    while True:
        for indices in torch.randperm(len(task.train), generator=order).split(batch_size):
            yield task.collate([task.train[i] for i in indices.tolist()])


def train(task: Task, recipe: Recipe, cache_root: Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train a fresh model (init and batch order from ``recipe.seed``) for ``recipe.steps`` optimizer steps.

    AdamW (lr warmup over 5% of the steps, then linear decay to 0), wrapped in ACR for an ACR
    recipe: each corrupting step minimises ``(1 - alpha) L(w) + alpha L(w + a(w))`` with two
    forward/backward passes.  Baseline and ACR runs with the same seed see the same batches.
    Returns the model (eval mode) and ``{"train_seconds", "final_loss", ...}``; with
    ``cache_root`` a finished run is saved there and reloaded instead of retrained.
    """
    folder = None if cache_root is None else cache_root / f"{task.name}-{config_key([task.config, recipe.__dict__])}"
    if folder is not None and (folder / "run.json").is_file():
        # Into a fresh model: from_pretrained would make Marian's sinusoidal position tables trainable.
        loader = AutoModelForSeq2SeqLM if task.name == "de_en" else AutoModelForCausalLM
        model = task.new_model(recipe.seed)
        model.load_state_dict(loader.from_pretrained(folder).state_dict())
        return model.eval(), json.loads((folder / "run.json").read_text())
    model = task.new_model(recipe.seed)
    base = torch.optim.AdamW(model.parameters(), lr=recipe.lr)
    optimizer = (
        base
        if recipe.acr_eps is None
        else ACR(base, eps=recipe.acr_eps, alpha=recipe.acr_alpha, interval=recipe.interval)
    )
    schedule = get_linear_schedule_with_warmup(base, max(1, recipe.steps // 20), recipe.steps)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for batch in itertools.islice(training_batches(task, recipe.seed, recipe.batch_size), recipe.steps):

        def closure(batch: dict[str, torch.Tensor] = batch) -> torch.Tensor:
            loss = model(**batch).loss
            loss.backward()
            return loss

        optimizer.zero_grad()
        if recipe.acr_eps is None:
            loss = closure()
            optimizer.step()
        else:
            loss = optimizer.step(closure)
        schedule.step()
        losses.append(float(loss.detach()))
        if len(losses) % 100 == 0:
            print(
                f"  {recipe.label} step {len(losses)}/{recipe.steps}: {time.perf_counter() - start:.0f} s", flush=True
            )
    run = {
        "recipe": recipe.label,
        **recipe.__dict__,
        "train_seconds": time.perf_counter() - start,
        "final_loss": statistics.fmean(losses[-50:]),
        "num_params": sum(p.numel() for p in model.parameters()),
    }
    model.eval()
    if folder is not None:
        model.save_pretrained(folder)
        (folder / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    return model, run


def model_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line settings that make a task and its model (the model cache's key)."""
    return {k: getattr(args, k) for k in MODEL_SETTINGS}


def fixed_budget_runs(
    finding: str,
    args: argparse.Namespace,
    probe_settings: dict[str, Any],
    probe_rows: Callable[[Task, nn.Module], list[dict[str, Any]]],
) -> list[dict[str, Any]]:
    """For each of ``args.tasks``, the record of the model trained for ``args.steps`` from ``args.seed``
    (or reused from ``args.cache``) and measured by ``probe_rows``; a run whose record exists is read, not rerun."""
    records = []
    for name in args.tasks:
        recipe = Recipe(seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr)
        settings = {
            "model": model_settings(args),
            "recipe": {**asdict(recipe), "label": recipe.label, "optimizer": "AdamW, linear warmup 5% and decay"},
            **probe_settings,
        }
        path = record_path(finding, name, f"steps{args.steps}-seed{args.seed}-{config_key(settings)}", args.results)
        if not path.is_file():
            task = build_task(name, args)
            model, run = train(task, recipe, args.cache)
            start = time.perf_counter()
            rows = probe_rows(task, model)
            record = {
                "finding": finding,
                "task": name,
                "settings": settings,
                "seed": recipe.seed,
                "steps": recipe.steps,
                "epochs": recipe.steps * recipe.batch_size / len(task.train),
                "best_step": None,  # a fixed budget: the last step's model is probed
                "train_seconds": run["train_seconds"],
                "probe_seconds": time.perf_counter() - start,
                "final_train_loss": run["final_loss"],
                "num_params": run["num_params"],
                "eval_data": task.eval_data,
                "environment": environment(),
                "rows": rows,
            }
            write_record(path, record)
        print(f"{name}: {path}", flush=True)
        records.append(read_record(path))  # as stored (tuples become lists), also for a new record
    return records


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """Where a run ran (wall seconds compare only between runs of the same environment); with a CUDA ``device``, also
    the GPU's name."""
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    if device is not None and device.type == "cuda":
        env["device"] = f"cuda: {torch.cuda.get_device_name(device)}"
    return env


# -- output ----------------------------------------------------------------------------------------


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as CSV (union of keys, in first-seen order; ``None`` as an empty cell)."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str, allow_nan=True) + "\n")


def setup(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    if not args.data.is_dir():
        raise SystemExit(f"--data {args.data}: no such folder (expected multi30k/ and wikitext-2/ in it)")
