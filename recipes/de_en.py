#!/usr/bin/env python
"""German -> English translation with ACR (or a baseline), evaluated with BLEU clean and under
parameter corruption.

With no arguments it trains a tiny Marian-style model from scratch on the small corpus shipped in
``recipes/data/de_en_small`` with a tokenizer trained on the spot; a few minutes on a laptop CPU::

    accelerate launch recipes/de_en.py

Line-aligned files (one sentence a line, gzip or not) are given by prefix, ``PREFIX.de`` +
``PREFIX.en``, or by the source file, its ``.en`` partner being found next to it::

    accelerate launch recipes/de_en.py --train_file ../shared/data/multi30k/train \\
        --validation_file ../shared/data/multi30k/val --test_file ../shared/data/multi30k/test_2016_flickr.de.gz

JSON lines with a ``translation`` column, and hub datasets, work as in the Hugging Face examples::

    accelerate launch recipes/de_en.py --model_name_or_path Helsinki-NLP/opus-mt-de-en \\
        --dataset_name wmt/wmt16 --dataset_config_name de-en --max_train_samples 20000 --learning_rate 2e-5

Every ``Seq2SeqTrainingArguments`` option works (``--num_train_epochs``, ``--bf16``, ...); the
recipe's own defaults are the ``DEFAULTS`` below.  ``--no_acr`` trains the baseline.  Results go to
``output_dir``: the model, ``all_results.json``/``eval_results.json`` (with the BLEU under
corruption, see ``--corruption_eval_eps``) and a model card ``README.md``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar

import numpy as np
import torch
from _common import (
    EMBEDDED_DATA,
    TINY_MARIAN,
    RecipeArguments,
    acr_optimizer,
    apply_lora,
    evaluate_robustness,
    evaluation_batches,
    fault_rows,
    load_splits,
    local_tokenizer,
    parse_arguments,
    robustness_block,
    robustness_rows,
    seq2seq_from_config,
    summary,
    train_and_save,
    train_sentencepiece_style_tokenizer,
    trainer_evaluation,
    trainer_training,
    write_card,
)
from transformers import (
    AutoConfig,
    DataCollatorForSeq2Seq,
    MarianConfig,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    set_seed,
)

from acr_optim.data import load_parallel
from acr_optim.errors import exit_on_usage_error
from acr_optim.integrations.evaluate import corpus_bleu
from acr_optim.integrations.models import load_model, load_tokenizer

# The recipe's defaults for transformers' options, in place of the Trainer's (--help shows them); any can be overridden.
DEFAULTS = {
    "output_dir": "outputs/de_en",
    "num_train_epochs": 25.0,
    "learning_rate": 2e-3,
    "warmup_steps": 100,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "predict_with_generate": True,
    "generation_max_length": 64,
    "generation_num_beams": 4,
    "logging_steps": 50,
    "save_strategy": "no",
    "report_to": "none",
    **({} if torch.cuda.is_available() else {"dataloader_pin_memory": False}),  # nothing to pin for on a CPU
}

# How to load and run the trained model, for its model card ({path}: its folder; {example}: a source sentence).
USAGE = """from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{path}")
model = AutoModelForSeq2SeqLM.from_pretrained("{path}")
batch = tokenizer(["{example}"], return_tensors="pt")
print(tokenizer.batch_decode(model.generate(**batch, num_beams=4, max_new_tokens=64), skip_special_tokens=True))"""


@dataclass
class TranslationDataArguments:
    """The translation direction and the length limits: the recipe's own section of ``--help``."""

    _argument_group_name: ClassVar[str] = "translation"

    source_lang: str = field(default="de", metadata={"help": "Source language code (file suffix, dict key)."})
    target_lang: str = field(default="en", metadata={"help": "Target language code."})
    max_source_length: int = field(default=128, metadata={"help": "Truncate sources to this many tokens."})
    max_target_length: int = field(default=128, metadata={"help": "Truncate targets to this many tokens."})


@dataclass
class TranslationArguments(RecipeArguments, TranslationDataArguments):
    """Every option of the recipe's own (``Seq2SeqTrainingArguments`` aside), checked together."""


def main(argv: list[str] | None = None) -> dict[str, float]:
    args, training_args = parse_arguments(
        TranslationArguments, Seq2SeqTrainingArguments, DEFAULTS, argv, description=__doc__.split("\n\n")[0]
    )
    set_seed(training_args.seed)
    src, tgt = args.source_lang, args.target_lang

    # Data: {"translation": {"de": ..., "en": ...}} rows, from the hub, files, or the embedded corpus.
    raw = load_splits(
        args,
        partial(load_parallel, source_lang=src, target_lang=tgt),
        defaults={
            split: str(EMBEDDED_DATA / name)
            for split, name in [("train", "train"), ("validation", "valid"), ("test", "test")]
        },
        seed=training_args.seed,
    )

    # Tokenizer and model: pretrained, or from a config with a tokenizer trained on the training texts.
    if args.model_name_or_path:
        tokenizer = load_tokenizer(args.tokenizer_name or args.model_name_or_path, "--model_name_or_path")
        model, _ = load_model(args.model_name_or_path, "seq2seq", what="--model_name_or_path")
    else:
        if args.tokenizer_name:
            tokenizer = load_tokenizer(args.tokenizer_name, "--tokenizer_name")
        else:
            texts = [t for pair in raw["train"]["translation"] for t in (pair[src], pair[tgt])]
            tokenizer = local_tokenizer(
                training_args.output_dir, train_sentencepiece_style_tokenizer, texts, args.tokenizer_vocab_size
            )
        config = AutoConfig.from_pretrained(args.model_config) if args.model_config else MarianConfig(**TINY_MARIAN)
        model = seq2seq_from_config(config, tokenizer)

    # Marian, BART and T5 average their cross-entropy themselves (no self.loss_function) and ignore
    # num_items_in_batch, but take **kwargs, so the Trainer would assume they normalise over the
    # accumulated tokens and skip its division by gradient_accumulation_steps.
    if "loss_function" not in inspect.getsource(type(model).forward):
        model.accepts_loss_kwargs = False
    model = apply_lora(model, args, "SEQ_2_SEQ_LM")

    def tokenize(batch):
        pairs = batch["translation"]
        inputs = tokenizer([p[src] for p in pairs], max_length=args.max_source_length, truncation=True)
        targets = tokenizer(text_target=[p[tgt] for p in pairs], max_length=args.max_target_length, truncation=True)
        return {**inputs, "labels": targets["input_ids"]}

    with training_args.main_process_first(desc="tokenizing"):
        data = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names)

    def compute_metrics(eval_pred):
        preds = np.where(eval_pred.predictions != -100, eval_pred.predictions, tokenizer.pad_token_id)
        labels = np.where(eval_pred.label_ids != -100, eval_pred.label_ids, tokenizer.pad_token_id)
        hypotheses = [s.strip() for s in tokenizer.batch_decode(preds, skip_special_tokens=True)]
        references = [s.strip() for s in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        # Generated length: tokens before the first EOS, after the decoder start token (beam search pads with EOS).
        is_eos = preds[:, 1:] == tokenizer.eos_token_id
        lengths = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1), is_eos.shape[1])
        return {"bleu": corpus_bleu(hypotheses, references), "gen_len": float(lengths.mean())}

    # Training: ACR around AdamW, or the Trainer's own optimizer with --no_acr.
    optimizers, callbacks = acr_optimizer(model, args, training_args)
    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        compute_metrics=compute_metrics,
        optimizers=optimizers,
        callbacks=callbacks,
    )
    # the saved model decodes as the recipe scores it: generate() and acr-probe --metric bleu take these defaults
    model.generation_config.update(
        num_beams=training_args.generation_num_beams, max_length=training_args.generation_max_length
    )
    train_metrics = train_and_save(trainer, training_args)

    # Evaluation: BLEU clean, under gradient-based corruption of the weights, and under real-world faults.
    batches = evaluation_batches(
        data["validation"], training_args.per_device_eval_batch_size, trainer.data_collator, training_args.device
    )
    evaluate = trainer_evaluation(trainer, data["validation"])
    metrics = evaluate_robustness(trainer.model, batches, evaluate, args, log=trainer.is_world_process_zero())
    trainer.save_metrics("eval", metrics)  # not printed: the summary below shows them as a table
    rows, faults = robustness_rows(metrics, "bleu", args), fault_rows(metrics, "bleu", args)
    trainer.save_metrics("robustness", {"robustness": robustness_block(rows, faults, "bleu", args)})
    if "test" in data:
        test_metrics = trainer.evaluate(data["test"], metric_key_prefix="test")
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
            training=trainer_training(trainer),
            what=f"A {src} -> {tgt} translation model",
            local_dataset="de_en_small",
            task_type="translation",
            metric_type="bleu",
            metric_name="BLEU",
            language=[src, tgt],
            usage=USAGE.replace("{example}", raw["validation"][0]["translation"][src].replace('"', "'")),
            test_result=metrics.get("test_bleu"),
        )
        runtime = train_metrics["train_runtime"]
        lines = [
            f"training: {args.training_kind}, {len(data['train']):,} pairs, {runtime:.0f} s",
            f"model:    {type(model).__name__}, {model.num_parameters():,} parameters",
        ]
        if "test" in data:
            lines.append(f"test BLEU: {metrics['test_bleu']:.2f}")
        lines.append(f"results:  {training_args.output_dir}")
        print(
            summary(
                f"De -> En translation, validation BLEU ({len(data['validation'])} pairs)",
                lines,
                rows,
                faults,
                "BLEU",
                args,
            )
        )
    return metrics


if __name__ == "__main__":
    exit_on_usage_error("de_en.py", main)
