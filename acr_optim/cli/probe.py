"""``acr-probe``: measure how fragile a trained model's parameters are, per group, over eps/n grids.

Writes to ``--output-dir``: ``probe.csv``, ``probe.md``, ``report.json`` (config + rows),
``heatmap_<method>.png`` (group x eps of the loss increase), ``curve.png`` (metric vs eps per
method, paper Figure 3), with ``--faults`` ``heatmap_faults.png`` (group x fault) and, with
``--save-corruptions``, ``corruptions.safetensors``.  Every argument is checked before anything
loads; a bad one stops it with one ``acr-probe: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from ..data import (
    builder_for,
    infer_languages,
    load_data,
    load_files,
    load_parallel,
    looks_like_path,
    parallel_files,
)
from ..errors import UsageError
from ..faults import parse_fault
from ..integrations.models import TASKS

METRICS = ("auto", "perplexity", "accuracy", "token-accuracy", "bleu", "none")
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not the uninformative ones (required options, ``None``, off switches)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error as one line naming the flag (exit status 2), not the usage summary first."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _bounded(convert: Callable[[str], Any], allowed: str, ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert(text)``, refused with "must be ``allowed``" unless ``ok``."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    return parse


_positive_int = _bounded(int, "an int >= 1", lambda v: v >= 1)
_nonnegative_int = _bounded(int, "an int >= 0", lambda v: v >= 0)
_positive_float = _bounded(float, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)
_norm_order = _bounded(float, "a number with 1 <= p <= inf ('inf' accepted)", lambda v: v >= 1)
_l0_limit = _bounded(int, "a positive int or 'all'", lambda v: v >= 1)


def _n_value(text: str) -> int | None:
    """An ``--n`` value: a positive int, or None (no L0 limit) for ``all``/``none``."""
    if text.lower() in ("all", "none"):
        return None
    return _l0_limit(text)


def _regex_pair(text: str) -> tuple[str, str]:
    """A ``--group-regex`` value: ``(pattern, group)`` of ``PATTERN=GROUP``, the pattern a valid regular expression."""
    pattern, sep, group = text.rpartition("=")
    if not sep or not pattern or not group:
        raise argparse.ArgumentTypeError(f"takes PATTERN=GROUP, got {text!r}")
    try:
        re.compile(pattern)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"{pattern!r} is not a regular expression ({err})") from None
    return pattern, group


def _device(text: str) -> str:
    """A ``--device`` value: a torch device string, a CUDA one only for a device this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def _output_dir(text: str) -> Path:
    """An ``--output-dir`` value: a folder, existing or not (not a file)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="acr-probe",
        description="Probe the vulnerability of a model's parameters to corruption (Sun et al., AAAI 2021): "
        "measure the loss increase L(w+a)-L(w) for gradient-based (worst-case, first order), random or PGD "
        "corruptions a with ||a||_p = eps and at most n non-zero entries, one parameter group at a time.",
        formatter_class=_HelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        required=True,
        help="local model folder, Hugging Face hub id, or a peft LoRA adapter folder (probed as the merged model)",
    )
    model.add_argument("--tokenizer", help="tokenizer folder or hub id (default: --model)")
    model.add_argument(
        "--task",
        choices=TASKS,
        help="model head / loss to load and evaluate (default: the one the model was saved with; a task that "
        "contradicts the model's config is refused)",
    )
    model.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow custom modelling code from the model repository (off: only trusted classes)",
    )
    model.add_argument("--revision", help="hub revision (branch, tag or commit) of the model")
    model.add_argument(
        "--merge-adapter",
        action="store_true",
        help="a LoRA adapter folder as --model: merge it into its base model before probing (the same table; "
        "--faults always merge, as deployment does)",
    )
    model.add_argument(
        "--dtype",
        default="float32",
        choices=tuple(DTYPES),
        help="parameter dtype to probe in (bf16/fp16 may round small corruptions away: a warning says so)",
    )
    model.add_argument(
        "--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="local files (.json/.jsonl/.csv, or text with one example a line: .txt, X.de, ...; .gz/.bz2/.xz "
        "compressed or not), a folder written by Dataset.save_to_disk (tokenised data is used as is), or a hub "
        "dataset name. seq2seq: a line-aligned pair by its source file (X.de[.gz], the target X.en[.gz] next to "
        "it) or by prefix with --source-lang/--target-lang, or JSON/hub rows with a 'translation' column",
    )
    data.add_argument("--data-config", help="dataset configuration name (hub datasets)")
    data.add_argument(
        "--split", help="split of a hub dataset or a saved DatasetDict (default: test); not used for local files"
    )
    data.add_argument(
        "--target-data", nargs="+", help="seq2seq: target-side text files, line-aligned with the --data files"
    )
    data.add_argument("--source-lang", help="seq2seq: source language code (file suffix, 'translation' key)")
    data.add_argument("--target-lang", help="seq2seq: target language code (file suffix, 'translation' key)")
    data.add_argument("--text-column", default="text", help="input text column (seq2seq source, classification text)")
    data.add_argument("--text-pair-column", help="second text column for sentence-pair classification")
    data.add_argument("--target-column", default="target", help="seq2seq target text column")
    data.add_argument("--label-column", default="label", help="classification label column")
    data.add_argument(
        "--max-samples",
        type=_positive_int,
        default=256,
        help="examples to use (causal-lm: blocks of --max-length tokens)",
    )
    data.add_argument(
        "--max-length", type=_positive_int, default=128, help="tokens per example (truncation / block size)"
    )
    data.add_argument("--batch-size", type=_positive_int, default=16, help="examples per forward pass")

    corruption = parser.add_argument_group("corruption")
    corruption.add_argument(
        "--eps",
        type=_positive_float,
        nargs="*",
        default=[0.01, 0.1, 1.0],
        help="grid of corruption norms ||a||_p, each finite and > 0 (none: only --faults)",
    )
    corruption.add_argument(
        "--n",
        type=_n_value,
        nargs="+",
        default=[None],
        help="grid of L0 limits (max corrupted entries per group); 'all' = no limit",
    )
    corruption.add_argument(
        "--p",
        type=_norm_order,
        default=2.0,
        help="norm order of eps and of the rows' norm column, 1 <= p <= inf ('inf' accepted)",
    )
    corruption.add_argument(
        "--methods",
        nargs="+",
        default=["gradient", "random"],
        choices=("gradient", "random", "pgd"),
        help="corruption methods",
    )
    corruption.add_argument(
        "--faults",
        nargs="+",
        default=[],
        metavar="SPEC",
        help="real-world faults measured next to the eps rows, e.g. int8 int4:g32 bf16 fp8_e4m3 flip:1e-6 "
        "flip:1e-3:int8 flips:10 flip-worst:10:mantissa prune:0.5 (see acr_optim.faults.GRAMMAR)",
    )
    corruption.add_argument(
        "--trials", type=_positive_int, default=5, help="draws per row of the random method and of random faults"
    )
    corruption.add_argument("--steps", type=_nonnegative_int, default=10, help="ascent steps (pgd)")
    corruption.add_argument("--step-size", type=_positive_float, default=0.5, help="relative ascent step (pgd)")
    corruption.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    corruption.add_argument(
        "--by",
        default="type",
        choices=("type", "layer", "all"),
        help="parameter grouping (by module type or by layer/block)",
    )
    corruption.add_argument(
        "--group-regex",
        type=_regex_pair,
        action="append",
        metavar="PATTERN=GROUP",
        help="custom grouping instead of --by (repeatable, first match wins; unmatched parameters are not probed)",
    )
    corruption.add_argument("--no-all", action="store_true", help="do not add the 'all parameters' group")

    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", required=True, type=_output_dir, help="folder for table, figures and report")
    output.add_argument(
        "--metric",
        default="auto",
        choices=METRICS,
        help="metric before/under corruption; auto: perplexity (causal-lm), accuracy "
        "(classification), token-accuracy (seq2seq); bleu: corpus BLEU of model.generate (seq2seq)",
    )
    output.add_argument(
        "--num-beams",
        "--num_beams",
        type=_positive_int,
        metavar="N",
        help="--metric bleu: beams of the decoding (1: greedy; default: the model's generation_config.num_beams, "
        "as model.generate() decodes; recipes/de_en.py scores its BLEU with 4)",
    )
    output.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        metavar="N",
        help="--metric bleu: longest translation generated (default: --max-length)",
    )
    output.add_argument(
        "--save-corruptions", action="store_true", help="also write every applied corruption to corruptions.safetensors"
    )
    output.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _load_rows(args: argparse.Namespace, task: str) -> tuple[Any, dict[str, Any]]:
    """The rows to probe on and where they came from (recorded in the report)."""
    import datasets

    first = args.data[0]
    local = Path(first).is_file() or (not Path(first).exists() and looks_like_path(first))  # a file or a prefix
    if task == "seq2seq" and not args.target_data and len(args.data) == 1 and local and builder_for(first) == "text":
        if args.source_lang is None or args.target_lang is None:
            source_lang, target_lang = infer_languages(first)
            args.source_lang, args.target_lang = args.source_lang or source_lang, args.target_lang or target_lang
        source, target = parallel_files(first, args.source_lang, args.target_lang)
        return load_parallel(first, args.source_lang, args.target_lang), {"files": [str(source), str(target)]}
    rows, source = load_data(args.data, split=args.split, config=args.data_config)
    if args.target_data:
        targets = load_files(args.target_data, "--target-data")
        if len(targets) != len(rows):
            raise UsageError(f"--target-data has {len(targets)} lines, --data {len(rows)}: they must be line-aligned")
        rows = datasets.Dataset.from_dict(
            {args.text_column: list(rows["text"]), args.target_column: list(targets["text"])}
        )
        source["target_files"] = list(args.target_data)
    return rows, source


def _seq2seq_texts(rows: Any, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Source and target texts from a ``translation`` column (hub layout) or from the text/target columns."""
    if "translation" in rows.column_names:
        pairs = rows["translation"]
        languages = sorted(pairs[0]) if len(pairs) else []
        if args.source_lang is None or args.target_lang is None:
            raise UsageError(
                f"--data has a 'translation' column with {languages}: pass --source-lang and --target-lang"
            )
        missing = [lang for lang in (args.source_lang, args.target_lang) if lang not in languages]
        if missing:
            raise UsageError(f"--data 'translation' has no language {missing[0]!r}; it has {languages}")
        return [p[args.source_lang] for p in pairs], [p[args.target_lang] for p in pairs]
    for column in (args.text_column, args.target_column):
        if column not in rows.column_names:
            raise UsageError(f"--data has no column {column!r} (columns: {rows.column_names})")
    return list(rows[args.text_column]), list(rows[args.target_column])


def _causal_blocks(rows: Any, tokenizer: Any, args: argparse.Namespace) -> list[dict[str, list[int]]]:
    """Concatenate the text rows (newline-joined) and cut ``--max-samples`` blocks of ``--max-length`` tokens."""
    ids: list[int] = []
    need = args.max_samples * args.max_length
    for start in range(0, len(rows), 1000):
        ids += tokenizer("\n".join(rows[start : start + 1000][args.text_column]))["input_ids"]
        if len(ids) >= need:
            break
    blocks = [ids[i : i + args.max_length] for i in range(0, len(ids) - args.max_length + 1, args.max_length)]
    return [{"input_ids": b} for b in blocks[: args.max_samples]]


def _examples(rows: Any, tokenizer: Any, model: Any, task: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = rows.select(range(min(len(rows), args.max_samples))) if task != "causal-lm" else rows
    if "input_ids" in rows.column_names:  # tokenised (save_to_disk): used as is, truncated
        keep = [
            c for c in rows.column_names if c in ("input_ids", "attention_mask", "token_type_ids", "labels", "label")
        ]
        out = [{k: row[k] for k in keep} for row in rows.select(range(min(len(rows), args.max_samples)))]
        for ex in out:
            for k in ("input_ids", "attention_mask", "token_type_ids"):
                if k in ex:
                    ex[k] = ex[k][: args.max_length]
        return out
    if task == "causal-lm":
        if args.text_column not in rows.column_names:
            raise UsageError(f"--data has no column {args.text_column!r} (columns: {rows.column_names})")
        return _causal_blocks(rows, tokenizer, args)
    if task == "seq2seq":
        sources, targets = _seq2seq_texts(rows, args)
        enc = tokenizer(sources, text_target=targets, max_length=args.max_length, truncation=True)
        return [{k: enc[k][i] for k in ("input_ids", "attention_mask", "labels")} for i in range(len(rows))]
    texts = [list(rows[args.text_column])] + ([list(rows[args.text_pair_column])] if args.text_pair_column else [])
    enc = tokenizer(*texts, max_length=args.max_length, truncation=True)
    labels = list(rows[args.label_column])
    if labels and isinstance(labels[0], str):
        label2id = model.config.label2id
        missing = sorted(set(labels) - set(label2id))
        if missing:
            raise SystemExit(f"labels {missing[:5]} are not in the model's config.label2id {label2id}")
        labels = [label2id[label] for label in labels]
    return [{**{k: enc[k][i] for k in enc}, "labels": labels[i]} for i in range(len(rows))]


def _collator(tokenizer: Any, model: Any, task: str) -> Any:
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, DataCollatorWithPadding

    if task == "causal-lm":
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    if task == "seq2seq":
        return DataCollatorForSeq2Seq(tokenizer, model=model)
    return DataCollatorWithPadding(tokenizer)


def _decoding(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """How ``--metric bleu`` decodes, as recorded in the report: beams (``--num-beams``, else the model's
    ``generation_config``), where that number came from, and the most new tokens (``--max-new-tokens``,
    else ``--max-length``)."""
    given = args.num_beams is not None
    return {
        "num_beams": args.num_beams if given else model.generation_config.num_beams,
        "num_beams_from": "--num-beams" if given else "the model's generation_config",
        "max_new_tokens": args.max_new_tokens or args.max_length,
    }


def _metric_fn(name: str, task: str, tokenizer: Any, decoding: dict[str, Any]) -> Any:
    from acr_optim.probe import metrics

    if name == "auto":
        name = {"causal-lm": "perplexity", "classification": "accuracy", "seq2seq": "token-accuracy"}[task]
    if name == "bleu":
        return metrics.bleu(tokenizer, max_new_tokens=decoding["max_new_tokens"], num_beams=decoding["num_beams"])
    return {
        "none": None,
        "perplexity": metrics.perplexity,
        "accuracy": metrics.accuracy,
        "token-accuracy": metrics.token_accuracy(shift=task == "causal-lm"),
    }[name]


def _load_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """The model (a LoRA adapter folder: its base model with the adapter, merged for ``--merge-adapter`` or
    ``--faults``), its tokenizer and its task."""
    from ..integrations.models import fixed_parameter_names, load_model, load_tokenizer

    common = {"trust_remote_code": args.trust_remote_code, "revision": args.revision}
    adapter = Path(args.model, "adapter_config.json").is_file()
    if not adapter:
        model, task = load_model(args.model, args.task, dtype=DTYPES[args.dtype], **common)
    else:
        try:
            from peft import PeftConfig, PeftModel
        except ImportError:
            raise UsageError(
                f"--model {args.model} is a peft adapter: install the peft extra (acr-optim[peft])"
            ) from None
        base_name = PeftConfig.from_pretrained(args.model).base_model_name_or_path
        base, task = load_model(base_name, args.task, what="--model's base model", dtype=DTYPES[args.dtype], **common)
        model = PeftModel.from_pretrained(base, args.model)
        if args.merge_adapter or args.faults:  # faults act on the weights deployed: the merged ones
            model = model.merge_and_unload()
            fixed = fixed_parameter_names(model)
            for name, p in model.named_parameters():
                p.requires_grad_(name not in fixed)
    has_tokenizer = adapter and any(Path(args.model, f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    source = args.tokenizer or (args.model if not adapter or has_tokenizer else base_name)
    tokenizer = load_tokenizer(source, "--tokenizer" if args.tokenizer else "--model", **common)
    return model.to(args.device), tokenizer, task


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What the argument types cannot check alone (each value's range is checked as it is parsed)."""
    if not args.eps and not args.faults:
        parser.error("give --eps values, --faults, or both")
    for spec in args.faults:
        try:
            parse_fault(spec)
        except ValueError as err:
            parser.error(str(err))
    for flag in ("num_beams", "max_new_tokens"):
        if getattr(args, flag) is not None and args.metric != "bleu":
            parser.error(f"--{flag.replace('_', '-')} sets the decoding of --metric bleu; --metric is {args.metric}")
    if args.task is not None:
        try:
            _check_task(args, args.task)
        except UsageError as err:
            parser.error(str(err))


def _check_task(args: argparse.Namespace, task: str) -> None:
    if args.target_data and task != "seq2seq":
        raise UsageError(f"--target-data only applies to seq2seq models; --model {args.model} is {task}")
    if args.metric == "bleu" and task != "seq2seq":
        raise UsageError(f"--metric bleu needs a seq2seq model; --model {args.model} is {task}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``acr-probe`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        return _run(args)
    except UsageError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    import acr_optim
    from acr_optim.data import check_local_path
    from acr_optim.probe import probe

    check_local_path(args.model, "--model")  # fail on a mistyped path before the model loads
    if args.tokenizer:
        check_local_path(args.tokenizer, "--tokenizer")
    for spec in args.data:
        check_local_path(spec, "--data", prefix=True)
    for spec in args.target_data or []:
        check_local_path(spec, "--target-data")
    model, tokenizer, task = _load_model(args)
    _check_task(args, task)
    rows, source = _load_rows(args, task)
    examples = _examples(rows, tokenizer, model, task, args)
    if not examples:
        raise UsageError(f"--data yields no examples (the text is shorter than --max-length {args.max_length} tokens?)")
    collate = _collator(tokenizer, model, task)
    device = torch.device(args.device)
    batches = [
        {k: v.to(device) for k, v in collate(examples[i : i + args.batch_size]).items()}
        for i in range(0, len(examples), args.batch_size)
    ]
    decoding = _decoding(args, model) if args.metric == "bleu" else {}
    saved: dict[str, torch.Tensor] = {}

    def keep(row: dict[str, Any], a: dict[str, torch.Tensor]) -> None:
        n = "all" if row["n"] is None else row["n"]
        where = f"fault={row['method']}" if row["eps"] is None else f"{row['method']}/eps={row['eps']:g}/n={n}"
        prefix = f"{row['group']}/{where}"
        saved.update({f"{prefix}/{name}": t.detach().cpu().contiguous() for name, t in a.items()})

    table = probe(
        model,
        batches,
        eps=args.eps or None,
        p=args.p,
        n=args.n,
        method=args.methods,
        faults=args.faults,
        by=args.group_regex or args.by,
        include_all=not args.no_all,
        metric_fn=_metric_fn(args.metric, task, tokenizer, decoding),
        trials=args.trials,
        seed=args.seed,
        steps=args.steps,
        step_size=args.step_size,
        progress=not args.no_progress,
        on_corruption=keep if args.save_corruptions else None,
        model_name=args.model,
    )
    table.config.update(
        task=task,
        **source,
        num_examples=len(examples),
        num_tokens=sum(len(ex["input_ids"]) for ex in examples),
        max_length=args.max_length,
        batch_size=args.batch_size,
        **decoding,
        device=str(device),
        acr_optim=acr_optim.__version__,
    )
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "probe.csv")
    table.to_markdown(out / "probe.md")
    table.to_json(out / "report.json")
    if args.eps:
        for method in args.methods:
            table.heatmap(out / f"heatmap_{method}.png", method=method)
        metric = next(
            (c[: -len("_clean")] for c in table.columns if c.endswith("_clean") and c != "loss_clean"), "loss"
        )
        table.curve(out / "curve.png", value=metric)
    if args.faults:
        table.fault_heatmap(out / "heatmap_faults.png")
    if saved:
        save_file(saved, str(out / "corruptions.safetensors"), metadata={"config": json.dumps(table.config)})
    worst = max(table.rows, key=lambda r: r["delta_loss"] if not math.isnan(r["delta_loss"]) else -math.inf)
    where = f"fault {worst['method']}" if worst["eps"] is None else f"{worst['method']}, eps {worst['eps']:g}"
    print(
        f"wrote {out}: {len(table.rows)} rows; largest loss increase {worst['delta_loss']:.4g} "
        f"(group {worst['group']}, {where})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
