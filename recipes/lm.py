#!/usr/bin/env python
"""Causal language-model training or fine-tuning with ACR (or a baseline), evaluated with
perplexity clean and under parameter corruption.

With no arguments it trains a tiny GPT-2 from scratch on the English side of the corpus shipped in
``recipes/data/de_en_small``, with a byte-level BPE tokenizer trained on the spot::

    accelerate launch recipes/lm.py

Text files (one line a row, gzip or not; empty lines are skipped, each line ends with the EOS
token) or JSON lines with a ``text`` column, and hub datasets, as in the Hugging Face examples::

    accelerate launch recipes/lm.py --train_file ../shared/data/wikitext-2/valid.txt.gz \\
        --validation_file ../shared/data/wikitext-2/test.txt.gz
    accelerate launch recipes/lm.py --model_name_or_path gpt2 \\
        --dataset_name Salesforce/wikitext --dataset_config_name wikitext-2-raw-v1 --learning_rate 5e-5

Without a validation set, ``--validation_split_percentage`` of the training lines are held out.
Every ``TrainingArguments`` option works; the recipe's own defaults are the ``DEFAULTS`` below.
Results go to ``output_dir``: the model, ``all_results.json``/``eval_results.json`` (with the
perplexity under corruption, see ``--corruption_eval_eps``) and a model card ``README.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from _common import (
    EMBEDDED_DATA,
    TINY_GPT2,
    RecipeArguments,
    acr_optimizer,
    apply_lora,
    describe_split,
    evaluate_robustness,
    evaluation_batches,
    fault_rows,
    load_splits,
    load_text_file,
    local_tokenizer,
    parse_arguments,
    robustness_block,
    robustness_rows,
    summary,
    train_and_save,
    train_byte_level_tokenizer,
    trainer_evaluation,
    trainer_training,
    write_card,
)
from datasets import DatasetDict
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from acr_optim.errors import UsageError, exit_on_usage_error
from acr_optim.integrations.models import load_model, load_tokenizer

# The recipe's defaults for transformers' options, in place of the Trainer's (--help shows them); any can be overridden.
DEFAULTS = {
    "output_dir": "outputs/lm",
    "num_train_epochs": 20.0,
    "learning_rate": 2e-3,
    "warmup_steps": 30,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "logging_steps": 50,
    "save_strategy": "no",
    "report_to": "none",
    **({} if torch.cuda.is_available() else {"dataloader_pin_memory": False}),  # nothing to pin for on a CPU
}

# How to load and run the trained model, for its model card ({path}: its folder; {example}: a prompt).
USAGE = """from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{path}")
model = AutoModelForCausalLM.from_pretrained("{path}")
batch = tokenizer("{example}", return_tensors="pt")
print(tokenizer.decode(model.generate(**batch, max_new_tokens=20, do_sample=False)[0]))"""


def perplexity(loss: float) -> float:
    """``exp(loss)``, ``inf`` when it overflows (a corrupted model can have a huge loss)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@dataclass
class LMDataArguments:
    """How the text is cut into training sequences: the recipe's own section of ``--help``."""

    _argument_group_name: ClassVar[str] = "language model"

    block_size: int = field(
        default=64, metadata={"help": "Training sequences: the text cut into blocks of this many tokens."}
    )


@dataclass
class LMArguments(RecipeArguments, LMDataArguments):
    """Every option of the recipe's own (``TrainingArguments`` aside), checked together."""


def load_text_splits(args: LMArguments, seed: int) -> DatasetDict:
    """``{"text": line}`` rows of train/validation/test, from the hub, files, or the English side of the embedded
    corpus (``_common.load_splits``)."""
    return load_splits(
        args,
        load_text_file,
        defaults={
            split: str(EMBEDDED_DATA / f"{name}.en")
            for split, name in [("train", "train"), ("validation", "valid"), ("test", "test")]
        },
        seed=seed,
    )


def lm_card(raw: DatasetDict, metrics: dict[str, float]) -> dict[str, Any]:
    """The language-model settings of ``_common.write_card``: task, metric, a usage prompt from the validation
    text, the test perplexity."""
    prompt = " ".join(raw["validation"][0]["text"].split()[:4]).replace('"', "'")
    return {
        "local_dataset": "de_en_small (English side)",
        "task_type": "text-generation",
        "metric_type": "perplexity",
        "metric_name": "Perplexity",
        "language": "en",
        "usage": USAGE.replace("{example}", prompt),
        "test_result": metrics.get("test_perplexity"),
    }


def lm_tokenizer(args: LMArguments, output_dir: str | Path, raw: DatasetDict) -> PreTrainedTokenizerBase:
    """``--tokenizer_name``'s or ``--model_name_or_path``'s tokenizer, else a byte-level BPE trained on the
    training texts and saved in ``output_dir``."""
    if args.tokenizer_name or args.model_name_or_path:
        what = "--tokenizer_name" if args.tokenizer_name else "--model_name_or_path"
        return load_tokenizer(args.tokenizer_name or args.model_name_or_path, what)
    return local_tokenizer(output_dir, train_byte_level_tokenizer, raw["train"]["text"], args.tokenizer_vocab_size)


def causal_lm(args: LMArguments, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """``--model_name_or_path``, or a new model from ``--model_config`` (default :data:`TINY_GPT2`) sized to ``tokenizer``."""
    if args.model_name_or_path:
        model, _ = load_model(args.model_name_or_path, "causal-lm", what="--model_name_or_path")
    else:
        config = AutoConfig.from_pretrained(args.model_config) if args.model_config else GPT2Config(**TINY_GPT2)
        config.update(
            {
                "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
            }
        )
        model = AutoModelForCausalLM.from_config(config)
    # Models such as GPT-2 leave loss_type unset (their loss still falls back to the causal-LM loss);
    # naming it lets the Trainer count num_items_in_batch over the shifted labels that loss averages over.
    if model.loss_type is None:
        model.loss_type = "ForCausalLM"
    return model


def tokenize_into_blocks(raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, args: LMArguments) -> DatasetDict:
    """Each split's lines tokenized, each followed by EOS, concatenated and cut into ``--block_size`` blocks (the
    remainder dropped); ``labels`` are the ``input_ids``.  Raises :class:`UsageError` if train or validation has
    no block."""
    block_size = args.block_size

    def tokenize_and_group(batch):
        ids = [token for line in tokenizer(batch["text"])["input_ids"] for token in [*line, tokenizer.eos_token_id]]
        blocks = [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks}

    data = raw.map(tokenize_and_group, batched=True, batch_size=1000, remove_columns=raw["train"].column_names)
    for split in ("train", "validation"):
        if len(data[split]) == 0:
            raise UsageError(
                f"{describe_split(args, split)}: shorter than one block of {block_size} tokens; lower --block_size"
            )
    return data


def main(argv: list[str] | None = None) -> dict[str, float]:
    args, training_args = parse_arguments(
        LMArguments, TrainingArguments, DEFAULTS, argv, description=__doc__.split("\n\n")[0]
    )
    set_seed(training_args.seed)

    raw = load_text_splits(args, training_args.seed)

    # Tokenizer and model: pretrained, or from a config with a tokenizer trained on the training texts.
    tokenizer = lm_tokenizer(args, training_args.output_dir, raw)
    model = apply_lora(causal_lm(args, tokenizer), args, "CAUSAL_LM")
    with training_args.main_process_first(desc="tokenizing"):
        data = tokenize_into_blocks(raw, tokenizer, args)
    block_size = args.block_size

    # Training: ACR around AdamW, or the Trainer's own optimizer with --no_acr.
    optimizers, callbacks = acr_optimizer(model, args, training_args)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        data_collator=default_data_collator,
        optimizers=optimizers,
        callbacks=callbacks,
    )
    train_metrics = train_and_save(trainer, training_args)

    # Evaluation: perplexity clean, under gradient-based corruption of the weights, and under real-world faults.
    batches = evaluation_batches(
        data["validation"], training_args.per_device_eval_batch_size, default_data_collator, training_args.device
    )
    trainer_metrics = trainer_evaluation(trainer, data["validation"])

    def evaluate() -> dict[str, float]:
        metrics = trainer_metrics()
        return metrics | {"perplexity": perplexity(metrics["loss"])}

    metrics = evaluate_robustness(trainer.model, batches, evaluate, args, log=trainer.is_world_process_zero())
    trainer.save_metrics("eval", metrics)  # not printed: the summary below shows them as a table
    rows, faults = robustness_rows(metrics, "perplexity", args), fault_rows(metrics, "perplexity", args)
    trainer.save_metrics("robustness", {"robustness": robustness_block(rows, faults, "perplexity", args)})
    if "test" in data and len(data["test"]):
        test_metrics = trainer.evaluate(data["test"], metric_key_prefix="test")
        test_metrics["test_perplexity"] = perplexity(test_metrics["test_loss"])
        trainer.log_metrics("test", test_metrics)
        trainer.save_metrics("test", test_metrics)
        metrics.update(test_metrics)

    if trainer.is_world_process_zero():
        write_card(
            training_args.output_dir,
            model,
            args,
            rows,
            faults,
            training=trainer_training(trainer) | {"block_size": block_size},
            what="A causal language model",
            **lm_card(raw, metrics),
        )
        lines = [
            (
                f"training: {args.training_kind}, {len(data['train']):,} blocks of {block_size} tokens, "
                f"{train_metrics['train_runtime']:.0f} s"
            ),
            f"model:    {type(model).__name__}, {model.num_parameters():,} parameters",
        ]
        if "test_perplexity" in metrics:
            lines.append(f"test perplexity: {metrics['test_perplexity']:.2f}")
        lines.append(f"results:  {training_args.output_dir}")
        print(
            summary(
                f"Causal LM, validation perplexity ({len(data['validation'])} blocks)",
                lines,
                rows,
                faults,
                "Perplexity",
                args,
            )
        )
    return metrics


if __name__ == "__main__":
    exit_on_usage_error("lm.py", main)
