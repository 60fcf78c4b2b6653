"""What the recipes share: arguments, data files, locally trained tokenizers, the default models, the ACR
optimizer, the robustness evaluation, the model card and the closing summary.

Kept next to the recipes, which import it as ``_common`` (a script's folder is on ``sys.path`` when it runs,
under ``python`` and ``accelerate launch`` alike); the lab imports it as ``recipes._common``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from accelerate import PartialState
from datasets import Dataset, DatasetDict, load_dataset
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSeq2SeqLM,
    HfArgumentParser,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from acr_optim import ACR
from acr_optim.checks import check_alpha, check_eps, check_n, check_p
from acr_optim.data import check_local_path, load_files
from acr_optim.errors import UsageError
from acr_optim.fault_sets import fault_set
from acr_optim.faults import parse_fault
from acr_optim.hub import write_model_card
from acr_optim.integrations.hf import ACRCallback
from acr_optim.probe import probe

RECIPES = Path(__file__).resolve().parent
EMBEDDED_DATA = RECIPES / "data" / "de_en_small"
# The real-world faults the recipes evaluate by default: deployment quantization and casts, int8 memory errors, pruning.
DEFAULT_FAULTS = ("int8", "int4:g32", "bf16", "fp8_e4m3", "flip:1e-6:int8", "prune:0.5")


@dataclass
class ModelArguments:
    """The model and its tokenizer, optionally with LoRA adapters: one section of the recipes' ``--help``."""

    _argument_group_name: ClassVar[str] = "model (default: the recipe's tiny model, trained from scratch)"

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained model (hub id or local path) to fine-tune."}
    )
    model_config: str | None = field(
        default=None,
        metadata={
            "help": "Config (hub id, folder or config.json) of a model trained from scratch; "
            "unset: the recipe's tiny config. Ignored with --model_name_or_path."
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained tokenizer; unset: the model's, or without --model_name_or_path one trained on "
            "the training texts and saved in output_dir."
        },
    )
    tokenizer_vocab_size: int = field(
        default=2000, metadata={"help": "Vocabulary size of a locally trained tokenizer (>= 100)."}
    )
    lora_r: int | None = field(
        default=None,
        metadata={
            "help": "Train LoRA adapters of this rank (>= 1; needs peft and --model_name_or_path), not every weight; "
            "ACR corrupts the adapters."
        },
    )
    lora_alpha: int = field(
        default=16, metadata={"help": "LoRA scale numerator (> 0): the update is lora_alpha / r * B A."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the input of the LoRA branch, in [0, 1)."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Names of the modules to adapt; unset: peft's for the architecture."}
    )


@dataclass
class DataArguments:
    """Where the data comes from and how much of it is used: one section of the recipes' ``--help``."""

    _argument_group_name: ClassVar[str] = "data (default: the recipe's own, see its docstring)"

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset, e.g. wmt/wmt16."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config, e.g. de-en."})
    train_file: str | None = field(default=None, metadata={"help": "Training data (see the recipe's docstring)."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation data, same format."})
    test_file: str | None = field(default=None, metadata={"help": "Test data, same format."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N validation examples."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep the first N test examples."})
    validation_split_percentage: int = field(
        default=5,
        metadata={"help": "Percentage of the training rows held out when there is no validation set, in [1, 50]."},
    )


@dataclass
class ACRArguments:
    """The ACR optimizer the recipes train with (around AdamW): one section of the recipes' ``--help``."""

    _argument_group_name: ClassVar[str] = (
        "ACR (training minimises (1 - alpha) L(w) + alpha L(w + a), a the worst corruption with ||a||_p = eps, "
        "or drawn from the error set of --acr_fault)"
    )

    acr_eps: float = field(
        default=0.05,
        metadata={"help": "Corruption size eps >= 0; 0 corrupts nothing: the AdamW step, bit for bit."},
    )
    acr_p: float = field(default=2.0, metadata={"help": "L_p norm of the corruption, 1 <= p <= inf."})
    acr_alpha: float = field(
        default=0.5,
        metadata={"help": "Weight of the corrupted loss, 0 <= alpha <= 1 (0: the AdamW step; 1 with p = 2: SAM)."},
    )
    acr_n: int | None = field(
        default=None,
        metadata={"help": "L0 limit: corrupt at most n >= 1 parameters, those of largest gradient; unset: all."},
    )
    acr_fault: str | None = field(
        default=None,
        metadata={
            "help": "Train against a deployment fault instead of the L_p ball (an acr_optim.faults spec: int4:g32, "
            "int8, fp8_e4m3, flips:10:int8, prune:0.5, ...); --acr_eps, --acr_p and --acr_n then do not apply."
        },
    )
    acr_fault_mode: str = field(
        default="worst",
        metadata={"help": "How the corruption is drawn from the fault's error set: worst, actual (QAT) or random."},
    )
    acr_fault_radius: float = field(
        default=1.0, metadata={"help": "Radius factor > 0 of a quantization or cast fault's box (worst, random)."}
    )
    no_acr: bool = field(default=False, metadata={"help": "Train the baseline: the Trainer's own AdamW, no ACR."})


@dataclass
class CorruptionEvalArguments:
    """How the final model is evaluated under corruption and faults: one section of the recipes' ``--help``."""

    _argument_group_name: ClassVar[str] = (
        "robustness evaluation of the final model (validation set): gradient-based corruption and real-world faults"
    )

    corruption_eval_eps: list[float] = field(
        default_factory=lambda: [0.25, 0.5, 1.0, 2.0],
        metadata={"help": "Sizes eps > 0 of the gradient-based worst-case corruption (paper Eq. 10) to evaluate at."},
    )
    corruption_eval_p: float = field(
        default=2.0, metadata={"help": "L_p norm of the evaluation corruption, 1 <= p <= inf."}
    )
    corruption_eval_n: int | None = field(
        default=None, metadata={"help": "L0 limit of the evaluation corruption, n >= 1; unset: all parameters."}
    )
    corruption_eval_faults: list[str] | None = field(
        default=None,
        metadata={
            "help": "Real-world faults the final model is evaluated under (acr_optim.faults specs: int8, int4:g32, "
            "bf16, fp8_e4m3, flip:1e-6, flips:10:int8, flip-worst:10, prune:0.5, ...); 'none' for none. Unset: "
            f"{' '.join(DEFAULT_FAULTS)}; none with --lora_r (faults act on the merged weights: probe the saved "
            "adapter with acr-probe --faults)."
        },
    )


@dataclass
class RecipeArguments(ModelArguments, DataArguments, ACRArguments, CorruptionEvalArguments):
    """Model, data, ACR and robustness-evaluation options shared by the recipes, checked together.

    Each base class is one titled section of ``--help`` (see :func:`parse_arguments`); a recipe adds
    its own section the same way, as a further base class."""

    def __post_init__(self) -> None:
        check_eps(self.acr_eps, allow_zero=True, name="--acr_eps")
        check_p(self.acr_p, name="--acr_p")
        check_alpha(self.acr_alpha, name="--acr_alpha")
        check_n(self.acr_n, name="--acr_n")
        if self.acr_fault is not None and self.lora_r is not None:
            raise ValueError(
                "--acr_fault with --lora_r: a deployment fault acts on the merged weights, not on the adapters ACR "
                "corrupts; train the adapters with the L_p ball (--acr_eps)"
            )
        if self.acr_fault is not None:
            try:
                fault_set(self.acr_fault, self.acr_fault_mode, self.acr_fault_radius)
            except ValueError as error:
                raise ValueError(
                    f"--acr_fault {self.acr_fault} (--acr_fault_mode, --acr_fault_radius): {error}"
                ) from None
        for eps in self.corruption_eval_eps:
            check_eps(eps, name="--corruption_eval_eps")
        check_p(self.corruption_eval_p, name="--corruption_eval_p")
        check_n(self.corruption_eval_n, name="--corruption_eval_n")
        if self.corruption_eval_faults is None:
            self.corruption_eval_faults = [] if self.lora_r is not None else list(DEFAULT_FAULTS)
        elif self.corruption_eval_faults == ["none"]:
            self.corruption_eval_faults = []
        elif self.lora_r is not None:
            raise ValueError(
                "--corruption_eval_faults with --lora_r: faults act on the merged weights, not on the adapters; "
                "probe the saved adapter instead (acr-probe --model OUTPUT_DIR --faults ...)"
            )
        for spec in self.corruption_eval_faults:
            parse_fault(spec)
        if self.lora_r is not None and self.lora_r < 1:
            raise ValueError(f"--lora_r must be >= 1, got {self.lora_r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"--lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_r is not None and not self.model_name_or_path:
            raise ValueError("--lora_r fine-tunes a pretrained model: give --model_name_or_path too")
        if self.lora_target_modules and self.lora_r is None:
            raise ValueError("--lora_target_modules needs --lora_r")
        if self.tokenizer_vocab_size < 100:
            raise ValueError(f"--tokenizer_vocab_size must be >= 100, got {self.tokenizer_vocab_size}")
        if self.dataset_name and (self.train_file or self.validation_file or self.test_file):
            raise ValueError("give either --dataset_name or --train_file/--validation_file/--test_file, not both")
        if not 1 <= self.validation_split_percentage <= 50:
            raise ValueError(
                f"--validation_split_percentage must be in [1, 50], got {self.validation_split_percentage}"
            )
        for flag in (
            "train_file",
            "validation_file",
            "test_file",
            "model_name_or_path",
            "model_config",
            "tokenizer_name",
        ):
            if getattr(self, flag):
                check_local_path(getattr(self, flag), f"--{flag}", prefix=flag.endswith("_file"))

    @property
    def training_kind(self) -> str:
        """``"ACR (eps=.., p=.., alpha=..)"`` or ``"baseline"``, for summaries and cards."""
        if self.no_acr:
            return "baseline"
        if self.acr_fault is not None:
            return f"ACR (fault={self.acr_fault}, {self.acr_fault_mode}, radius={self.acr_fault_radius:g}, alpha={self.acr_alpha:g})"
        n = "" if self.acr_n is None else f", n={self.acr_n}"
        return f"ACR (eps={self.acr_eps:g}, p={self.acr_p:g}, alpha={self.acr_alpha:g}{n})"

    @property
    def acr_config(self) -> dict[str, Any] | None:
        """``{"eps", "p", "alpha", "n"}`` of the ACR run (``{"fault", "fault_mode", "fault_radius", "alpha"}``
        with ``--acr_fault``), ``None`` for the baseline: the keyword arguments of :class:`~acr_optim.ACR`."""
        if self.no_acr:
            return None
        if self.acr_fault is not None:
            return {
                "fault": self.acr_fault,
                "fault_mode": self.acr_fault_mode,
                "fault_radius": self.acr_fault_radius,
                "alpha": self.acr_alpha,
            }
        return {"eps": self.acr_eps, "p": self.acr_p, "alpha": self.acr_alpha, "n": self.acr_n}


# -- data ----------------------------------------------------------------------------------------
# Files are read by acr_optim.data: the `datasets` builders, plus load_parallel pairing X.de with X.en.


def load_text_file(spec: str, name: str) -> Dataset:
    """A ``text`` dataset, one row a non-empty line, from a text file (gzip or not) or JSON lines with a
    ``text`` column; raises :class:`~acr_optim.errors.UsageError` naming ``name`` if nothing is left."""
    rows = load_files([spec], name)
    if "text" not in rows.column_names:
        raise UsageError(f"{name} {spec}: no 'text' column (columns: {rows.column_names})")
    rows = rows.filter(lambda row: row["text"].strip() != "")
    if len(rows) == 0:
        raise UsageError(f"{name} {spec}: only empty lines")
    return rows


def describe_split(args: RecipeArguments, split: str) -> str:
    """Where a split came from, for error messages: ``--train_file X``, a hub dataset's split, or the held-out rows."""
    if args.dataset_name:
        return f"--dataset_name {args.dataset_name} ({split} split)"
    spec = getattr(args, f"{split}_file") or (None if args.train_file else f"the embedded corpus ({split})")
    if spec is None:
        return f"the validation rows held out of --train_file {args.train_file}"
    return spec if spec.startswith("the ") else f"--{split}_file {spec}"


Recipe = TypeVar("Recipe", bound=RecipeArguments)
Training = TypeVar("Training")


def parse_arguments(
    recipe: type[Recipe],
    training: type[Training],
    defaults: dict[str, Any],
    argv: list[str] | None,
    description: str,
) -> tuple[Recipe, Training]:
    """``(recipe(...), training(...))`` from ``argv`` (default: the command line).

    ``defaults`` (``{option: value}``) replace the dataclasses' own defaults, in ``--help`` too.
    ``--help`` has a titled section for each base class of ``recipe`` that names one
    (``_argument_group_name``); ``training``'s options (transformers' ``TrainingArguments``) are
    under ``options``.  A value the dataclasses refuse (``ValueError`` from their checks) becomes a
    :class:`~acr_optim.errors.UsageError`.
    """
    sections = [base for base in recipe.__mro__ if "_argument_group_name" in vars(base)]
    layout = f"Options: {training.__name__} (with the recipe's defaults), then the recipe's own, by section."
    parser = HfArgumentParser([*sections, training], description=f"{description} {layout}")
    parser.set_defaults(**defaults)
    try:
        *parts, training_args = parser.parse_args_into_dataclasses(sys.argv[1:] if argv is None else argv)
        return recipe(**{name: value for part in parts for name, value in vars(part).items()}), training_args
    except ValueError as err:
        raise UsageError(str(err)) from None


def _load_raw_splits(
    args: RecipeArguments, load_file: Callable[[str, str], Dataset], defaults: dict[str, str]
) -> DatasetDict:
    """The splits as given: from the hub (``--dataset_name``), from files, or from ``defaults``."""
    if args.dataset_name:
        raw = load_dataset(args.dataset_name, args.dataset_config_name)
        if "train" not in raw:
            raise UsageError(f"--dataset_name {args.dataset_name} has no train split (it has {sorted(raw)})")
    else:
        files = {"train": args.train_file, "validation": args.validation_file, "test": args.test_file}
        if not any(files.values()):
            files = defaults
        if not files["train"]:
            raise UsageError("--train_file is needed with --validation_file/--test_file")
        raw = DatasetDict({split: load_file(spec, name=f"--{split}_file") for split, spec in files.items() if spec})
    return raw


def load_splits(
    args: RecipeArguments, load_file: Callable[[str, str], Dataset], defaults: dict[str, str], seed: int
) -> DatasetDict:
    """``train``/``validation``/``test`` from the hub (``--dataset_name``), from files, or from ``defaults``.

    ``load_file(spec, name=flag)`` reads one file argument (``flag`` names it in errors); ``defaults``
    are used when neither the hub nor any file is given.  Without a validation split,
    ``--validation_split_percentage`` of the training rows are held out (with ``seed``).  Each
    split is then cut to its ``--max_*_samples``.
    """
    with PartialState().main_process_first():  # one process builds the `datasets` cache, the others then read it
        raw = _load_raw_splits(args, load_file, defaults)
    if "validation" not in raw:
        if len(raw["train"]) < 2:
            raise UsageError("the training data has fewer than 2 rows: too few to hold a validation split out")
        held_out = raw["train"].train_test_split(test_size=args.validation_split_percentage / 100, seed=seed)
        raw["train"], raw["validation"] = held_out["train"], held_out["test"]
    return cut_to_limits(raw, args)


def cut_to_limits(splits: dict[str, Any], args: RecipeArguments) -> dict[str, Any]:
    """Each of ``splits`` (``datasets.Dataset``s, or anything with ``len`` and ``select(indices)``) cut to its first
    ``--max_train_samples``/``--max_eval_samples``/``--max_predict_samples`` rows, in place; returns ``splits``."""
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples, "test": args.max_predict_samples}
    for split, limit in limits.items():
        if split in splits and limit is not None:
            splits[split] = splits[split].select(range(min(limit, len(splits[split]))))
    return splits


# -- tokenizers ----------------------------------------------------------------------------------


def train_sentencepiece_style_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A BPE tokenizer over whitespace-marked pieces (``▁``, as SentencePiece and Marian), shared by both
    languages; every encoding ends with ``</s>``.  Special tokens: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"])
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def train_byte_level_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE tokenizer (no unknown tokens); ``<|endoftext|>`` (id 0) is bos, eos and pad."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    eot = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eot, eos_token=eot, pad_token=eot)


def local_tokenizer(
    output_dir: str | Path,
    train: Callable[[Iterable[str], int], PreTrainedTokenizerFast],
    texts: Sequence[str],
    vocab_size: int,
) -> PreTrainedTokenizerFast:
    """Train a tokenizer on the local main process, save it in ``output_dir`` (where the model goes) and load it
    everywhere, so that every process of a multi-process run uses the same vocabulary."""
    state = PartialState()
    with state.local_main_process_first():
        if state.is_local_main_process:
            train(texts, vocab_size).save_pretrained(output_dir)
        return PreTrainedTokenizerFast.from_pretrained(output_dir)


# -- the default models ----------------------------------------------------------------------------

# A tiny Marian-style Transformer for the default run: about 1M parameters with a 2,000-token vocabulary.
TINY_MARIAN = {
    "d_model": 128,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 256,
    "decoder_ffn_dim": 256,
    "max_position_embeddings": 256,
    "dropout": 0.1,
    "scale_embedding": True,
    "share_encoder_decoder_embeddings": True,
}


def fit_to_tokenizer(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """``config`` with the vocabulary and special tokens of a locally trained tokenizer; decoding starts from <pad>."""
    config.update(
        {
            "vocab_size": len(tokenizer),
            "decoder_vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "decoder_start_token_id": tokenizer.pad_token_id,
        }
    )
    return config


def seq2seq_from_config(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A new model from ``config`` sized to ``tokenizer``; generation starts from <pad> and ends with </s>
    (set on ``generation_config``: transformers before 5.1 refuses to save generation settings in the config)."""
    model = AutoModelForSeq2SeqLM.from_config(fit_to_tokenizer(config, tokenizer))
    model.generation_config.update(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
    )
    return model


# A tiny GPT-2 (about 0.4M parameters besides the embeddings) for the default run of lm.py.
TINY_GPT2 = {"n_embd": 128, "n_layer": 2, "n_head": 4, "n_inner": 512, "n_positions": 256}


# -- ACR -----------------------------------------------------------------------------------------


def acr_optimizer(
    model: torch.nn.Module, args: RecipeArguments, training_args: TrainingArguments
) -> tuple[tuple[torch.optim.Optimizer | None, None], list[TrainerCallback]]:
    """``(optimizers, callbacks)`` for the Trainer: ACR around AdamW (the Trainer's AdamW settings, one
    param group, so the corruption constraint ``||a||_p = eps`` covers the whole model), or the
    Trainer's own optimizer for ``--no_acr``.  The two are the same AdamW unless ``--weight_decay > 0``:
    the Trainer's then exempts biases and norm weights from decay, this one decays every parameter."""
    if args.no_acr:
        return (None, None), []
    base = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=training_args.learning_rate,
        betas=(training_args.adam_beta1, training_args.adam_beta2),
        eps=training_args.adam_epsilon,
        weight_decay=training_args.weight_decay,
    )
    return (ACR(base, **args.acr_config), None), [ACRCallback()]


def apply_lora(model: torch.nn.Module, args: RecipeArguments, task_type: str) -> torch.nn.Module:
    """``model`` with LoRA adapters of rank ``--lora_r`` (a ``peft`` model, base weights frozen), or ``model``
    itself without ``--lora_r``.  ``task_type`` is peft's: ``"CAUSAL_LM"`` or ``"SEQ_2_SEQ_LM"``."""
    if args.lora_r is None:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UsageError("--lora_r needs peft: pip install 'acr-optim[peft]'") from None
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, config)


# -- robustness ----------------------------------------------------------------------------------


def evaluation_batches(dataset: Dataset, batch_size: int, collate_fn: Callable, device: Any) -> list[dict[str, Any]]:
    """``dataset`` as a list of collated batches on ``device`` (the whole set, on every process)."""
    return [
        {k: v.to(device) for k, v in batch.items()} for batch in DataLoader(dataset, batch_size, collate_fn=collate_fn)
    ]


def train_and_save(trainer: Trainer, training_args: TrainingArguments) -> dict[str, float]:
    """Train (from ``--resume_from_checkpoint`` when given), save the model, the training metrics and the Trainer's
    state, then silence the per-evaluation output of the evaluations that follow (:func:`quiet_evaluations`);
    returns the training metrics."""
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    quiet_evaluations(trainer)
    return result.metrics


def quiet_evaluations(trainer: Trainer) -> None:
    """Stop the Trainer's progress bars and printed logs, for the evaluations after training: the robustness sweep
    prints one line per evaluation instead, and the recipe's summary the results (all of them go to the JSON files)."""
    for callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(callback)


def trainer_evaluation(trainer: Trainer, dataset: Dataset) -> Callable[[], dict[str, float]]:
    """``trainer.evaluate(dataset)`` as a function returning its metrics without prefix and without timings."""

    def evaluate() -> dict[str, float]:
        metrics = trainer.evaluate(dataset, metric_key_prefix="m")
        return {
            k.removeprefix("m_"): v
            for k, v in metrics.items()
            if k.startswith("m_") and not k.endswith(("_runtime", "_per_second"))
        }

    return evaluate


def evaluate_robustness(
    model: torch.nn.Module,
    batches: list[dict[str, Any]],
    evaluate: Callable[[], dict[str, float]],
    args: RecipeArguments,
    *,
    log: bool,
    metric_key_prefix: str = "eval",
) -> dict[str, float]:
    """``evaluate()`` on the clean model, at ``w + a`` for each ``--corruption_eval_eps``, and under each
    ``--corruption_eval_faults`` fault, from ONE :func:`acr_optim.probe.probe` call.

    ``a`` is the gradient-based corruption (paper Eq. 10) in ``{||a||_p = eps, ||a||_0 <= n}`` built
    from one gradient of the mean loss over ``batches`` (dropout off; the whole set on every
    process, so all processes apply the same ``a``) for the whole sweep; a fault writes the faulty
    weights themselves (one draw of a random fault, from seed 0, so every run meets the same flips).
    The weights come back bit-exactly after each evaluation.  With ``log``, a line per evaluation
    with its time.

    Returns ``{prefix}_{key}`` (clean), ``{prefix}_corrupted_eps_{eps}_{key}`` and
    ``{prefix}_fault_{spec}_{key}`` for each ``key`` of ``evaluate()``, plus ``..._loss_increase``
    (the measured ``L(w') - L(w)``) for each corruption and ``..._norm_inf``/``..._broken`` for faults.
    """
    labels = ["clean", *(f"eps {eps:g}" for eps in args.corruption_eval_eps), *args.corruption_eval_faults]
    calls: list[dict[str, float]] = []
    start = time.perf_counter()

    def metric_fn(model: torch.nn.Module, batches: Sequence[Any]) -> dict[str, float]:
        calls.append(evaluate())
        if log:
            label = labels[len(calls) - 1] if len(calls) <= len(labels) else "extra draw"
            print(f"evaluation {len(calls)}/{len(labels)} ({label}): {time.perf_counter() - start:.0f} s", flush=True)
        return calls[-1]

    table = probe(
        model,
        batches,
        eps=args.corruption_eval_eps or None,
        p=args.corruption_eval_p,
        n=args.corruption_eval_n,
        method="gradient",
        faults=args.corruption_eval_faults,
        by="all",
        metric_fn=metric_fn,
    )
    keys = list(calls[0])
    results = {f"{metric_key_prefix}_{key}": table.rows[0][f"{key}_clean"] for key in keys}
    for row in table.rows:
        name = f"corrupted_eps_{row['eps']:g}" if row["eps"] is not None else f"fault_{row['method']}"
        prefix = f"{metric_key_prefix}_{name}"
        results |= {f"{prefix}_{key}": row[key] for key in keys}
        results[f"{prefix}_loss_increase"] = row["delta_loss"]
        if row["eps"] is None:
            results |= {f"{prefix}_norm_inf": row["norm_inf"], f"{prefix}_broken": row["broken"]}
    return results


def robustness_rows(
    metrics: dict[str, float], metric: str, args: RecipeArguments, metric_key_prefix: str = "eval"
) -> list[tuple[float, float, float]]:
    """``[(eps, value of metric, loss increase L(w + a) - L(w))]`` from the evaluations in ``metrics``;
    the first row is the clean model (``eps = 0``, increase 0)."""
    rows = [(0.0, metrics[f"{metric_key_prefix}_{metric}"], 0.0)]
    for eps in args.corruption_eval_eps:
        prefix = f"{metric_key_prefix}_corrupted_eps_{eps:g}"
        rows.append((eps, metrics[f"{prefix}_{metric}"], metrics[f"{prefix}_loss_increase"]))
    return rows


def fault_rows(
    metrics: dict[str, float], metric: str, args: RecipeArguments, metric_key_prefix: str = "eval"
) -> list[tuple[str, str, float, float]]:
    """``[(spec, label, value of metric, loss increase)]`` for each ``--corruption_eval_faults`` fault."""
    rows = []
    for spec in args.corruption_eval_faults:
        prefix = f"{metric_key_prefix}_fault_{spec}"
        rows.append((spec, parse_fault(spec).label, metrics[f"{prefix}_{metric}"], metrics[f"{prefix}_loss_increase"]))
    return rows


def robustness_block(
    rows: Sequence[tuple[float, float, float]],
    faults: Sequence[tuple[str, str, float, float]],
    metric: str,
    args: RecipeArguments,
) -> dict[str, Any]:
    """The ``robustness`` entry of ``all_results.json``: the corruption's ``p``/``n``, one row per ``eps``
    and one per fault."""
    return {
        "metric": metric,
        "p": args.corruption_eval_p,
        "n": args.corruption_eval_n,
        "rows": [{"eps": eps, metric: value, "loss_increase": increase} for eps, value, increase in rows],
        "faults": [
            {"fault": spec, "label": label, metric: value, "loss_increase": increase}
            for spec, label, value, increase in faults
        ],
    }


def trainer_training(trainer: Trainer) -> dict[str, Any]:
    """The hyperparameters and the steps and epochs actually run, for the model card of a Trainer run."""
    training_args = trainer.args
    return {
        "learning_rate": training_args.learning_rate,
        "optimizer_steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 2),
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "seed": training_args.seed,
    }


def write_card(
    output_dir: str,
    model: torch.nn.Module,
    args: RecipeArguments,
    rows: Sequence[tuple[float, float, float]],
    faults: Sequence[tuple[str, str, float, float]],
    *,
    training: dict[str, Any],
    what: str,
    local_dataset: str,
    task_type: str,
    metric_type: str,
    metric_name: str,
    language: str | list[str] | None,
    usage: str,
    test_result: float | None = None,
) -> None:
    """``output_dir/README.md``: the model card of the run (see :func:`acr_optim.hub.write_model_card`);
    ``usage`` is code loading the model, with ``{path}`` standing for its folder."""
    on_hub = bool(args.dataset_name)
    dataset = args.dataset_name or (local_dataset if not args.train_file else Path(args.train_file).parent.name)
    write_model_card(
        output_dir,
        model_name=Path(output_dir).name,
        description=f"{what} ({type(model).__name__}, {model.num_parameters():,} parameters), "
        f"trained on {dataset}, {args.training_kind}.",
        task_type=task_type,
        metric_type=metric_type,
        metric_name=metric_name,
        results=rows,
        faults=faults,
        test_result=test_result,
        usage=usage.replace("{path}", str(output_dir)),
        dataset_name=dataset,
        dataset_type=dataset if on_hub else "local",
        dataset_config=args.dataset_config_name,
        hub_datasets=[args.dataset_name] if on_hub else [],
        corruption_p=args.corruption_eval_p,
        corruption_n=args.corruption_eval_n,
        acr=args.acr_config,
        base_model=args.model_name_or_path,
        language=language,
        training=training,
    )


def summary(
    title: str,
    lines: Sequence[str],
    rows: Sequence[tuple[float, float, float]],
    faults: Sequence[tuple[str, str, float, float]],
    metric: str,
    args: RecipeArguments,
) -> str:
    """A short human-readable report: the run, then the metric and the loss increase clean, under each
    corruption and under each fault."""
    n = "all" if args.corruption_eval_n is None else f"{args.corruption_eval_n:,}"
    width = max(len(title), 60)
    out = [
        "=" * width,
        title,
        "-" * width,
        *lines,
        "",
        f"Under gradient-based parameter corruption (L{args.corruption_eval_p:g} norm eps, {n} parameters):",
        f"  {'':<14} {metric:>10} {'loss increase':>15}",
    ]
    for eps, value, increase in rows:
        label = "clean" if eps == 0 else f"eps = {eps:g}"
        out.append(f"  {label:<14} {value:10.2f} {increase:15.3f}")
    if faults:
        out += ["", "Under real-world faults of the weights:"]
        out += [f"  {spec:<14} {value:10.2f} {increase:15.3f}   {label}" for spec, label, value, increase in faults]
    out.append("=" * width)
    return "\n".join(out)
