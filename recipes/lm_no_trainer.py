#!/usr/bin/env python
"""Causal language-model training with ACR in a plain ``accelerate`` loop: the counterpart of ``lm.py``
without the ``Trainer``, in the manner of Hugging Face's ``run_clm_no_trainer.py``.

The same data, model, defaults and results as ``lm.py`` (perplexity clean and under parameter
corruption in ``all_results.json``, with a ``robustness`` block), from a loop that shows the
two-phase ACR API: after the accumulated clean backward of an optimizer step,
``with acr.perturbed():`` moves the weights to ``w + a(g)``, the step's micro-batches run again
(their gradients accumulate onto the clean one), and leaving the block restores ``w`` exactly
with ``(1 - alpha) g(w) + alpha g(w + a)`` in ``.grad``; then clip and step as usual::

    accelerate launch recipes/lm_no_trainer.py
    accelerate launch --multi_gpu --num_processes 2 recipes/lm_no_trainer.py --use_cpu true \\
        --mixed_precision bf16 --gradient_accumulation_steps 2 --checkpointing_steps 100
    accelerate launch recipes/lm_no_trainer.py --resume_from_checkpoint outputs/lm_no_trainer/step_100

Data and model options are ``lm.py``'s (``--train_file``, ``--model_name_or_path``, ``--acr_eps``,
``--corruption_eval_eps``, ...); the loop's own are in :class:`LoopArguments`.  As in ``lm.py`` (``ACRCallback``), the corrupted pass
replays each micro-batch from the random-number state of its clean pass, so dropout draws the same
masks (``acr_optim.replay``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from _common import (
    apply_lora,
    evaluate_robustness,
    evaluation_batches,
    fault_rows,
    parse_arguments,
    robustness_block,
    robustness_rows,
    summary,
    write_card,
)
from accelerate import Accelerator, DataLoaderConfiguration
from lm import LMArguments, causal_lm, lm_card, lm_tokenizer, load_text_splits, perplexity, tokenize_into_blocks
from torch.utils.data import DataLoader
from transformers import default_data_collator, get_scheduler, set_seed

from acr_optim import ACR
from acr_optim.errors import exit_on_usage_error
from acr_optim.replay import RNGState, replaying, rng_state


@dataclass
class LoopArguments:
    """The training loop's options; names and defaults as ``lm.py``'s ``TrainingArguments``."""

    output_dir: str = field(default="outputs/lm_no_trainer", metadata={"help": "Model, tokenizer, results."})
    seed: int = field(default=42, metadata={"help": "Seed of the weights, the shuffling and dropout."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    num_train_epochs: int = field(default=20, metadata={"help": "Epochs over the training blocks."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Optimizer steps; overrides the epochs."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Blocks a micro-batch, per process."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Blocks an evaluation batch, per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches an optimizer step."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers.get_scheduler name."})
    num_warmup_steps: int = field(default=30, metadata={"help": "Warm-up optimizer steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the (mixed) gradient to this norm; 0: off."})
    use_cpu: bool = field(
        default=False,
        metadata={"help": "Train on the CPU, also when a GPU is there (several processes: DDP over gloo)."},
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "Default: accelerate's config or `accelerate launch --mixed_precision`."}
    )
    checkpointing_steps: str | None = field(
        default=None, metadata={"help": "Save the training state every N optimizer steps (step_N) or 'epoch'."}
    )
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A step_N or epoch_N folder."})
    logging_steps: int = field(default=50, metadata={"help": "Log the losses every N optimizer steps."})
    report_to: str | None = field(default=None, metadata={"help": "accelerate trackers (tensorboard, wandb, all)."})

    def __post_init__(self) -> None:
        if self.checkpointing_steps not in (None, "epoch") and not self.checkpointing_steps.isdigit():
            raise ValueError(f"--checkpointing_steps must be a number or 'epoch', got {self.checkpointing_steps!r}")


@dataclass
class Progress:
    """Where the loop is; saved in every checkpoint (``register_for_checkpointing``) so a resume skips exactly
    the micro-batches already seen."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch: int = 0  # micro-batches of this epoch consumed

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]


def evaluate_loss(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator) -> float:
    """Mean next-token cross-entropy over the evaluation blocks of all processes.

    ``mean_b mean_t CE(logits[b, t], labels[b, t + 1])``: per block, so that the blocks accelerate
    repeats to even out the processes' batches are dropped by ``gather_for_metrics`` (a batch-mean
    loss would count them); every block has ``block_size`` tokens, so this is the mean token loss.
    """
    model.eval()
    losses = []
    with torch.no_grad():
        for batch in loader:
            logits, labels = model(**batch).logits[:, :-1].float(), batch["labels"][:, 1:]
            per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            losses.append(accelerator.gather_for_metrics(per_token.mean(1)))
    model.train()
    return torch.cat(losses).mean().item()


def save_metrics(output_dir: Path, split: str, metrics: dict[str, Any]) -> None:
    """``{split}_results.json``, merged into ``all_results.json``, as ``Trainer.save_metrics`` writes them."""
    (output_dir / f"{split}_results.json").write_text(json.dumps(metrics, indent=4, sort_keys=True))
    path = output_dir / "all_results.json"
    merged = (json.loads(path.read_text()) if path.exists() else {}) | metrics
    path.write_text(json.dumps(merged, indent=4, sort_keys=True))


def corrupted_pass(
    accelerator: Accelerator,
    model: torch.nn.Module,
    acr: ACR,
    micro_batches: list[tuple[dict[str, torch.Tensor], RNGState]],
) -> torch.Tensor | None:
    """The step's micro-batches again at ``w + a(g)``, ``g`` the accumulated clean gradient in ``.grad``,
    each from the random-number state its clean pass started from (the same dropout masks).

    Their gradients accumulate onto ``g`` (synchronised across processes on the last micro-batch only,
    as in the clean pass); on leaving ``perturbed()`` the weights are ``w`` again, bit for bit, and
    ``.grad`` holds ``(1 - alpha) g(w) + alpha g(w + a)``.  Returns the mean corrupted loss, or
    ``None`` when ACR corrupts nothing this step (then ``.grad`` is still ``g``).
    """
    with acr.perturbed() as active:
        if not active:
            return None
        losses = []
        for i, (batch, rng) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model), replaying(rng):
                loss = model(**batch).loss
                accelerator.backward(loss)
            losses.append(loss.detach())
    return torch.stack(losses).mean()


def main(argv: list[str] | None = None) -> dict[str, float]:
    args, loop = parse_arguments(LMArguments, LoopArguments, {}, argv, description=__doc__.split("\n\n")[0])
    output_dir = Path(loop.output_dir)
    accelerator = Accelerator(
        cpu=loop.use_cpu,
        gradient_accumulation_steps=loop.gradient_accumulation_steps,
        mixed_precision=loop.mixed_precision,
        log_with=loop.report_to,
        project_dir=output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # each epoch's order from the seed
    )
    set_seed(loop.seed)

    raw = load_text_splits(args, loop.seed)

    # Tokenizer and model: pretrained, or from a config with a tokenizer trained (on one process) on the training texts.
    tokenizer = lm_tokenizer(args, output_dir, raw)
    model = apply_lora(causal_lm(args, tokenizer), args, "CAUSAL_LM")  # --lora_r: train (and corrupt) adapters
    with accelerator.main_process_first():
        data = tokenize_into_blocks(raw, tokenizer, args)
    train_loader = DataLoader(
        data["train"], shuffle=True, batch_size=loop.per_device_train_batch_size, collate_fn=default_data_collator
    )
    eval_loaders = {
        split: DataLoader(data[split], batch_size=loop.per_device_eval_batch_size, collate_fn=default_data_collator)
        for split in ("validation", "test")
        if split in data and len(data[split])
    }

    # Optimizer: ACR around AdamW (one param group: the constraint ||a||_p = eps covers the whole model).
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=loop.learning_rate, weight_decay=loop.weight_decay)
    if not args.no_acr:
        optimizer = ACR(optimizer, eps=args.acr_eps, p=args.acr_p, alpha=args.acr_alpha, n=args.acr_n)
    acr = optimizer if isinstance(optimizer, ACR) else None
    steps_per_epoch = math.ceil(
        math.ceil(len(train_loader) / accelerator.num_processes) / loop.gradient_accumulation_steps
    )
    max_train_steps = loop.max_train_steps or loop.num_train_epochs * steps_per_epoch
    # A prepared scheduler steps once per process at each optimizer step, hence the factors.
    scheduler = get_scheduler(
        loop.lr_scheduler_type,
        optimizer,
        num_warmup_steps=loop.num_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_loader, scheduler, *prepared = accelerator.prepare(
        model, optimizer, train_loader, scheduler, *eval_loaders.values()
    )
    eval_loaders = dict(zip(eval_loaders, prepared))
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    if loop.resume_from_checkpoint:
        accelerator.load_state(loop.resume_from_checkpoint)
    accelerator.init_trackers("lm_no_trainer", {k: str(v) for k, v in {**asdict(args), **asdict(loop)}.items()})

    # Training: the clean pass over the step's micro-batches, then (ACR) the corrupted pass, clip, step.
    start = time.perf_counter()
    micro_batches: list[tuple[dict[str, torch.Tensor], RNGState]] = []
    clean_loss = torch.zeros((), device=accelerator.device)
    window: list[torch.Tensor] = []  # (clean, corrupted) loss of each step since the last log
    train_loss_sum, first_step = torch.zeros((), device=accelerator.device), progress.step
    while progress.step < max_train_steps:
        train_loader.set_epoch(progress.epoch)
        batches = accelerator.skip_first_batches(train_loader, progress.batch) if progress.batch else train_loader
        for batch in batches:
            with accelerator.accumulate(model):
                rng = rng_state([accelerator.device])
                loss = model(**batch).loss
                accelerator.backward(loss)  # accumulates the clean gradient over the step's micro-batches
                micro_batches.append((batch, rng))
                clean_loss += loss.detach()
                if accelerator.sync_gradients:  # the step's last micro-batch: .grad holds the (all-reduced) g
                    corrupted_loss = corrupted_pass(accelerator, model, acr, micro_batches) if acr else None
                    if loop.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), loop.max_grad_norm)
                optimizer.step()  # accelerate steps only when sync_gradients
                scheduler.step()
                optimizer.zero_grad()
            progress.batch += 1
            if not accelerator.sync_gradients:
                continue
            progress.step += 1
            clean = clean_loss / len(micro_batches)
            window.append(torch.stack([clean, clean if corrupted_loss is None else corrupted_loss]))
            train_loss_sum += clean
            micro_batches, clean_loss = [], torch.zeros_like(clean_loss)
            if progress.step % loop.logging_steps == 0 or progress.step == max_train_steps:
                clean_mean, corrupted_mean = accelerator.reduce(torch.stack(window).mean(0), "mean").tolist()
                window = []
                logs = {"loss": clean_mean, "learning_rate": scheduler.get_last_lr()[0]}
                if acr is not None:  # a step ACR did not corrupt counts with its clean loss
                    logs |= {"acr/corrupted_loss": corrupted_mean, "acr/loss_gap": corrupted_mean - clean_mean}
                accelerator.log(logs, step=progress.step)
                accelerator.print(f"step {progress.step}/{max_train_steps}: {json.dumps(logs)}")
            if loop.checkpointing_steps not in (None, "epoch") and progress.step % int(loop.checkpointing_steps) == 0:
                accelerator.save_state(output_dir / f"step_{progress.step}")
            if progress.step == max_train_steps:
                break
        else:
            progress.epoch, progress.batch = progress.epoch + 1, 0
            if loop.checkpointing_steps == "epoch":
                accelerator.save_state(output_dir / f"epoch_{progress.epoch}")
    train_metrics = {
        "train_loss": accelerator.reduce(train_loss_sum, "mean").item() / max(progress.step - first_step, 1),
        "train_runtime": time.perf_counter() - start,
        "train_steps": progress.step,
        "epoch": progress.epoch + progress.batch / len(train_loader),
    }
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)
        save_metrics(output_dir, "train", train_metrics)

    # Evaluation: perplexity clean, under gradient-based corruption of the weights, and under real-world faults.
    def evaluate(split: str) -> dict[str, float]:
        loss = evaluate_loss(model, eval_loaders[split], accelerator)
        return {"loss": loss, "perplexity": perplexity(loss)}

    batches = evaluation_batches(
        data["validation"], loop.per_device_eval_batch_size, default_data_collator, accelerator.device
    )
    metrics = evaluate_robustness(
        unwrapped, batches, lambda: evaluate("validation"), args, log=accelerator.is_main_process
    )
    rows, faults = robustness_rows(metrics, "perplexity", args), fault_rows(metrics, "perplexity", args)
    if "test" in eval_loaders:
        metrics |= {f"test_{k}": v for k, v in evaluate("test").items()}
    # Free the DDP wrapper while the process group is alive, then destroy the group. Left to exit, the
    # gradient reducer can hold the group's last reference, and its destructor (GIL held) then waits
    # for gloo's worker thread, which waits for the GIL: a hang (pytorch/pytorch#56297).
    model = None
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    if accelerator.is_main_process:
        save_metrics(output_dir, "eval", {k: v for k, v in metrics.items() if not k.startswith("test_")})
        save_metrics(output_dir, "robustness", {"robustness": robustness_block(rows, faults, "perplexity", args)})
        if "test_loss" in metrics:
            save_metrics(output_dir, "test", {k: v for k, v in metrics.items() if k.startswith("test_")})
        training = {
            "learning_rate": loop.learning_rate,
            "optimizer_steps": progress.step,
            "epochs": round(train_metrics["epoch"], 2),
            "per_device_train_batch_size": loop.per_device_train_batch_size,
            "gradient_accumulation_steps": loop.gradient_accumulation_steps,
            "processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "seed": loop.seed,
            "block_size": args.block_size,
        }
        write_card(
            str(output_dir),
            unwrapped,
            args,
            rows,
            faults,
            training=training,
            what="A causal language model (trained in a plain accelerate loop)",
            **lm_card(raw, metrics),
        )
        lines = [
            (
                f"training: {args.training_kind}, {len(data['train']):,} blocks of {args.block_size} tokens, "
                f"{progress.step} steps, {train_metrics['train_runtime']:.0f} s, {accelerator.num_processes} "
                f"process(es), mixed precision {accelerator.mixed_precision}"
            ),
            f"model:    {type(unwrapped).__name__}, {unwrapped.num_parameters():,} parameters",
        ]
        if "test_perplexity" in metrics:
            lines.append(f"test perplexity: {metrics['test_perplexity']:.2f}")
        lines.append(f"results:  {output_dir}")
        title = f"Causal LM (accelerate loop), validation perplexity ({len(data['validation'])} blocks)"
        print(summary(title, lines, rows, faults, "Perplexity", args))
    return metrics | train_metrics


if __name__ == "__main__":
    exit_on_usage_error("lm_no_trainer.py", main)
