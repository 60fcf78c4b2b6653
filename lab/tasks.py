"""The two fixed-budget tasks of the experiments and benchmarks, each one :class:`Task`: Multi30k De->En with a
tiny Marian (BLEU) and WikiText-2 with a tiny GPT-2 (perplexity).  The data readers, tokenizer trainers and model
configurations are the recipes' own (``recipes/de_en.py``, ``recipes/lm.py``, imported as the ``recipes`` package
from the repository root), so an experiment's model is the recipe's model at another size.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForSeq2Seq,
    GPT2Config,
    MarianConfig,
    PreTrainedTokenizerFast,
)

from acr_optim.data import load_parallel
from acr_optim.probe.metrics import bleu, perplexity
from lab.records import config_key
from recipes.de_en import TINY_MARIAN, fit_to_tokenizer, seq2seq_from_config, train_sentencepiece_style_tokenizer
from recipes.lm import TINY_GPT2, load_text_file, train_byte_level_tokenizer

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
