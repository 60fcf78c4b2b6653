"""The tasks of the experiments and benchmarks.

The two fixed-budget tasks, each one :class:`Task`: Multi30k De->En with a tiny Marian (BLEU) and WikiText-2 with a
tiny GPT-2 (perplexity).  The converged runs' families, each one :class:`Family` with train / held-out / test
splits: an LSTM LM (:class:`LSTMLM`) or the tiny GPT-2 on WikiText-2 (:func:`lm_family`), the tiny Marian on
Multi30k (:func:`marian_family`).  The data readers, tokenizer trainers and model configurations are the recipes'
own (``recipes/_common.py``, imported as ``recipes._common`` from the repository root), so an
experiment's model is the recipe's model at another size.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForSeq2Seq,
    GPT2Config,
    MarianConfig,
    PreTrainedTokenizerFast,
)

from acr_optim.data import load_parallel
from acr_optim.probe.metrics import MetricFn, bleu, perplexity
from lab.records import config_key
from recipes._common import (
    TINY_GPT2,
    TINY_MARIAN,
    fit_to_tokenizer,
    load_text_file,
    seq2seq_from_config,
    train_byte_level_tokenizer,
    train_sentencepiece_style_tokenizer,
)

TASKS = ("de_en", "lm")
MODEL_SETTINGS = ("width", "layers", "vocab", "max_train", "eval_size", "block_size")
METRIC = {"de_en": "bleu", "lm": "perplexity"}


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
        """A freshly initialised model from ``seed`` (dropout off: :func:`marian_config`, :func:`gpt2_config`)."""
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
    """``items`` in consecutive slices of ``size`` (the last one shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def cached_tokenizer(
    folder: Path, train: Callable[[list[str], int], PreTrainedTokenizerFast], texts: list[str], vocab: int
) -> PreTrainedTokenizerFast:
    """The tokenizer saved in ``folder``, trained there first by ``train(texts, vocab)`` when it is not."""
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


def model_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line settings that make a task and its model (the model cache's key)."""
    return {k: getattr(args, k) for k in MODEL_SETTINGS}


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


# -- the converged runs' families: train, held-out (for stopping) and test splits -----------------------------


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


@dataclass
class Family:
    """A corpus split three ways (train, held-out for stopping, test for the score) and the model trained on it."""

    name: str
    train: list[dict[str, list[int]]]
    collate: Callable[[list[dict[str, list[int]]]], dict[str, Tensor]]
    heldout: list[dict[str, Tensor]]
    test: list[dict[str, Tensor]]
    device: torch.device
    new_model: Callable[[], nn.Module]
    metric: str
    metric_fn: MetricFn


def lm_family(args: argparse.Namespace) -> Family:
    """WikiText-2: ``valid.txt`` split by lines into training and held-out text, ``test.txt`` for the score."""
    folder = args.data / "wikitext-2"
    lines = list(load_text_file(str(folder / "valid.txt.gz"), "--data")["text"])
    test = list(load_text_file(str(folder / "test.txt.gz"), "--data")["text"])
    cut = round(len(lines) * (1 - args.heldout))
    key = config_key({"vocab": args.vocab, "heldout": args.heldout})
    tokenizer = cached_tokenizer(
        args.cache / f"tokenizer-lstm-{key}", train_byte_level_tokenizer, lines[:cut], args.vocab
    )

    def batches(texts: list[str], limit: int | None = None) -> list[dict[str, Tensor]]:
        blocks = lm_blocks(tokenizer, texts, args.block_size)[:limit]
        return [
            to_device(stack(blocks[i : i + args.batch_size]), args.device)
            for i in range(0, len(blocks), args.batch_size)
        ]

    def new_model() -> nn.Module:
        if args.family == "lstm":
            return LSTMLM(len(tokenizer), args.width, args.layers, args.dropout)
        return AutoModelForCausalLM.from_config(gpt2_config(tokenizer, vars(args), args.dropout))

    train = lm_blocks(tokenizer, lines[:cut], args.block_size)
    heldout, scored = batches(lines[cut:]), batches(test, args.test_blocks)
    if not train or not heldout:
        raise SystemExit(
            f"--heldout {args.heldout}: leaves no training or no held-out block of {args.block_size} tokens"
        )
    return Family(args.family, train, stack, heldout, scored, args.device, new_model, "perplexity", perplexity)


def marian_family(args: argparse.Namespace) -> Family:
    """Multi30k De->En: ``train`` to train, ``val`` to stop, ``test_2016_flickr`` for BLEU."""
    folder = args.data / "multi30k"
    split = {
        name: list(load_parallel(str(folder / name), "de", "en")["translation"])
        for name in ("train", "val", "test_2016_flickr")
    }
    texts = [t for pair in split["train"] for t in (pair["de"], pair["en"])]
    tokenizer = cached_tokenizer(
        args.cache / f"tokenizer-marian-{config_key({'vocab': args.vocab})}",
        train_sentencepiece_style_tokenizer,
        texts,
        args.vocab,
    )
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")

    def batches(rows: list[dict[str, str]]) -> list[dict[str, Tensor]]:
        features = encode_pairs(tokenizer, rows)
        return [
            to_device(collate(features[i : i + args.batch_size]), args.device)
            for i in range(0, len(features), args.batch_size)
        ]

    def new_model() -> nn.Module:
        return seq2seq_from_config(marian_config(tokenizer, vars(args), args.dropout), tokenizer)

    return Family(
        "marian",
        encode_pairs(tokenizer, split["train"]),
        collate,
        batches(split["val"]),
        batches(split["test_2016_flickr"][: args.test_blocks]),
        args.device,
        new_model,
        "bleu",
        bleu(tokenizer, max_new_tokens=64, num_beams=args.beams),
    )
