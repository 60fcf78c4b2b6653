"""The training loops of the experiments and the frontier, around one optimizer step (:class:`Stepper`): a fixed
budget of steps (:func:`fixed_steps`; with a method from a seed and a model cache, :func:`train`), or until the
held-out loss stops improving, with bitwise resume (:func:`plateau_fit`); a fixed-budget run as a record (train or
reuse the model, measure it, write the record: :func:`fixed_budget_runs`); and where a run ran (:func:`environment`)."""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, get_linear_schedule_with_warmup

from lab.methods import Method, adamw
from lab.records import config_key, read_record, record_path, write_atomically, write_record
from lab.tasks import Task, build_task, model_settings, to_device


@dataclass(frozen=True)
class Recipe:
    """One fixed-budget training run: ``method`` (:mod:`lab.methods`; AdamW by default) from ``seed`` for ``steps``
    optimizer steps of ``batch_size`` examples at peak learning rate ``lr``."""

    seed: int
    steps: int
    batch_size: int
    lr: float
    method: Method = field(default_factory=adamw)

    def key(self) -> dict[str, Any]:
        """The settings that name this run in record ids and in the model cache, as they did before runs had a
        :class:`~lab.methods.Method`: ACR's ``eps`` (``None`` for AdamW), ``alpha`` and ``interval``, and its ``p``
        only where it is not 2."""
        method = self.method
        fields = {"seed": self.seed, "steps": self.steps, "batch_size": self.batch_size, "lr": self.lr}
        fields |= {"acr_eps": method.eps, "acr_alpha": method.alpha, "interval": method.settings.get("interval", 1)}
        if method.p != 2.0:
            fields["acr_p"] = method.p
        return fields

    @property
    def label(self) -> str:
        """How the progress lines and outputs name the run."""
        method = self.method
        if method.eps is None:
            return "baseline"
        interval = method.settings.get("interval", 1)
        every = "" if interval == 1 else f", interval={interval}"
        return f"ACR(eps={method.eps:g}, alpha={method.alpha:g}{every})"


def training_batches(task: Task, seed: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training batches: epoch after epoch, each a fresh permutation drawn from ``seed``
    (so every method trained from the same seed sees the same batches)."""
    order = torch.Generator().manual_seed(seed)
    while True:
        for indices in torch.randperm(len(task.train), generator=order).split(batch_size):
            yield task.collate([task.train[i] for i in indices.tolist()])


DRIVERS = ("plain", "closure", "gsam", "sam", "looksam", "acr_reuse")
Batch = dict[str, torch.Tensor]


def model_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's own loss on ``batch`` (a Hugging Face output's ``loss``, or a dict's)."""
    return model(**batch)["loss"]


class Stepper:
    """One optimizer step at a time, driven as ``driver`` says, every forward/backward pass counted (``passes``);
    the only place the experiments and ``benchmarks/frontier.py`` call ``backward()``.

    ``driver``: ``"plain"`` (one backward, ``step()``: AdamW), ``"closure"`` (``step(closure)`` makes every pass:
    ACR, WSAM), ``"gsam"`` (the same with GSAM's ``(outputs, loss)`` closure), ``"sam"`` (the clean backward, then
    ``step(closure)``: SAM, ASAM, FriendlySAM), ``"looksam"`` (as ``"sam"``, without the clean backward on the steps
    where LookSAM reuses its last direction and zeroes it), ``"acr_reuse"`` (``ACR(interval=k)`` that, LookSAM-like,
    adds its last correction ``d = (1 - alpha) g + alpha g(w + a) - g`` to the clean gradient of the cheap steps:
    one pass there, one extra gradient-sized buffer; a prototype of ``benchmarks/robustness.py``).
    ``loss(model, batch)`` is the training loss.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        driver: str,
        loss: Callable[[nn.Module, Batch], torch.Tensor] = model_loss,
    ) -> None:
        if driver not in DRIVERS:
            raise ValueError(f"driver must be one of {DRIVERS}, got {driver!r}")
        self.model, self.optimizer, self.driver, self.loss = model, optimizer, driver, loss
        self.passes = 0
        self._correction: list[torch.Tensor] | None = None  # acr_reuse: the last ACR correction

    def __call__(self, batch: Batch) -> torch.Tensor | None:
        """Zero the gradients and make one step on ``batch``; returns the loss where the driver gives one."""

        def closure() -> torch.Tensor:
            self.passes += 1
            loss = self.loss(self.model, batch)
            loss.backward()
            return loss

        optimizer = self.optimizer
        optimizer.zero_grad()
        if self.driver == "plain":
            loss = closure()
            optimizer.step()
        elif self.driver == "gsam":  # GSAM zeroes the grads itself and wants (outputs, loss)
            loss = optimizer.step(torch.enable_grad()(lambda: (None, closure())))
        elif self.driver == "closure":
            loss = optimizer.step(closure)
        elif self.driver == "acr_reuse":
            loss = self._reuse_step(closure)
        else:  # SAM-style: the clean gradient first (LookSAM zeroes it on its reuse steps: skip it there)
            if self.driver != "looksam" or optimizer.get_step() % optimizer.k == 0:
                closure()
            loss = optimizer.step(closure)
        return loss if isinstance(loss, torch.Tensor) else None

    def _reuse_step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        optimizer = self.optimizer
        params = [q for group in optimizer.param_groups for q in group["params"] if q.requires_grad]
        loss = closure()
        if optimizer.corrupts_this_step:
            clean = [q.grad.clone() for q in params]
            with optimizer.perturbed() as active:
                if active:
                    closure()
            if active:
                self._correction = torch._foreach_sub([q.grad for q in params], clean)
        elif self._correction is not None:
            torch._foreach_add_([q.grad for q in params], self._correction)
        optimizer.step()
        return loss


def fixed_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    total: int,
    driver: str = "closure",
    label: str | None = None,
) -> dict[str, Any]:
    """``total`` optimizer steps (:class:`Stepper`) on the next ``total`` of ``batches``, the learning rate warmed up
    over 5 % of them, then decayed linearly to 0 (on the base optimizer of a wrapper); the one loop every
    fixed-budget run trains with.

    Returns ``{"steps", "passes", "train_seconds", "losses"}``: every forward/backward pass is counted, and
    ``losses`` holds the loss of each step whose driver returns one; with ``label``, a progress line every 100 steps.
    """
    step = Stepper(model, optimizer, driver)
    base = getattr(optimizer, "base_optimizer", optimizer)
    schedule = get_linear_schedule_with_warmup(base, max(1, total // 20), total)
    losses = []
    start = time.perf_counter()
    for done, batch in enumerate(itertools.islice(batches, total), 1):
        loss = step(batch)
        schedule.step()
        if loss is not None:
            losses.append(float(loss.detach()))
        if label is not None and done % 100 == 0:
            print(f"  {label} step {done}/{total}: {time.perf_counter() - start:.0f} s", flush=True)
    return {"steps": total, "passes": step.passes, "train_seconds": time.perf_counter() - start, "losses": losses}


@dataclass(frozen=True)
class Plateau:
    """When a plateau-stopped run is evaluated, slowed down and stopped: the held-out loss every ``eval_every`` steps;
    an evaluation that does not beat the best by ``min_delta`` multiplies the learning rate by ``lr_decay``, and
    ``patience`` of them in a row, or ``max_steps`` steps, end the run."""

    eval_every: int
    patience: int
    max_steps: int
    min_delta: float
    lr_decay: float


def plateau_fit(
    step: Stepper,
    train: Sequence[dict[str, list[int]]],
    collate: Callable[[list[dict[str, list[int]]]], Batch],
    batch_size: int,
    seed: int,
    heldout_loss: Callable[[], float],
    plateau: Plateau,
    checkpoint: Path,
    device: torch.device | str = "cpu",
    label: str = "run",
) -> dict[str, Any]:
    """Train ``step.model`` on batches of ``train`` (a fresh permutation from ``seed`` each epoch, on ``device``)
    until :class:`Plateau` stops it; restore the best checkpoint (lowest ``heldout_loss()``).

    After every evaluation the whole training state (model, optimizer, best checkpoint, data order, RNG) is saved to
    ``checkpoint``; a run that finds it there goes on from it, bit for bit the run that was stopped (on the device it
    trained on).  Returns ``{"steps", "best_step", "epochs", "stopped", "train_seconds", "resumed_at"}``."""
    model = step.model
    order = torch.Generator().manual_seed(seed)
    optimizer, device = step.optimizer, torch.device(device)
    state: dict[str, Any] = {"step": 0, "bad": 0, "queue": [], "seconds": 0.0, "resumes": []}
    state["best"] = {"loss": math.inf, "step": 0, "model": copy.deepcopy(model.state_dict())}
    if checkpoint.is_file():
        saved = torch.load(checkpoint)
        if (trained_on := saved.pop("device", "cpu")) != device.type:
            raise SystemExit(
                f"--device {device}: {checkpoint} holds a run in progress on {trained_on}, and a record names one "
                f"device: resume it with --device {trained_on}, or delete the file to start the run again"
            )
        model.load_state_dict(saved.pop("model"))
        optimizer.load_state_dict(saved.pop("optimizer"))
        order.set_state(saved.pop("order"))
        torch.set_rng_state(saved.pop("rng"))
        if device.type == "cuda":  # dropout's RNG there
            torch.cuda.set_rng_state(saved.pop("cuda_rng"), device)
        state = saved | {"resumes": [*saved["resumes"], saved["step"]]}
        print(f"  {label}: resumed at step {state['step']} from {checkpoint}")
    best, queue = state["best"], state["queue"]
    start = time.perf_counter() - state["seconds"]
    while state["step"] < plateau.max_steps and state["bad"] < plateau.patience:
        model.train()
        for _ in range(plateau.eval_every):
            if not queue:
                queue += [b.tolist() for b in torch.randperm(len(train), generator=order).split(batch_size)]
            batch = to_device(collate([train[i] for i in queue.pop()]), device)
            step(batch)
            state["step"] += 1
        loss = heldout_loss()
        if loss < best["loss"] - plateau.min_delta:
            best |= {"loss": loss, "step": state["step"], "model": copy.deepcopy(model.state_dict())}
            state["bad"] = 0
        else:
            state["bad"] += 1
            for group in optimizer.param_groups:  # ACR's are its base optimizer's
                group["lr"] *= plateau.lr_decay
        print(f"  {label} step {state['step']}: held-out loss {loss:.4f}", end=" ")
        print(f"(best {best['loss']:.4f} at {best['step']})")
        state["seconds"] = time.perf_counter() - start
        training = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        training |= {"order": order.get_state(), "rng": torch.get_rng_state(), "device": device.type}
        if device.type == "cuda":
            training["cuda_rng"] = torch.cuda.get_rng_state(device)
        write_atomically(checkpoint, functools.partial(torch.save, state | training))
    model.load_state_dict(best["model"])
    return {
        "steps": state["step"],
        "best_step": best["step"],
        "epochs": best["step"] * batch_size / len(train),
        "stopped": "patience" if state["bad"] >= plateau.patience else "step cap",
        "train_seconds": time.perf_counter() - start,
        "resumed_at": state["resumes"],
    }


def train(task: Task, recipe: Recipe, cache_root: Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train a fresh model (init and batch order from ``recipe.seed``) for ``recipe.steps`` optimizer steps.

    AdamW (lr warmup over 5% of the steps, then linear decay to 0), wrapped in ACR for an ACR
    method: each corrupting step minimises ``(1 - alpha) L(w) + alpha L(w + a(w))`` with two
    forward/backward passes.  Baseline and ACR runs with the same seed see the same batches.
    Returns the model (eval mode) and ``{"train_seconds", "final_loss", ...}``; with
    ``cache_root`` a finished run is saved there and reloaded instead of retrained.
    """
    folder = None if cache_root is None else cache_root / f"{task.name}-{config_key([task.config, recipe.key()])}"
    if folder is not None and (folder / "run.json").is_file():
        # Into a fresh model: from_pretrained would make Marian's sinusoidal position tables trainable.
        loader = AutoModelForSeq2SeqLM if task.name == "de_en" else AutoModelForCausalLM
        model = task.new_model(recipe.seed)
        model.load_state_dict(loader.from_pretrained(folder).state_dict())
        return model.eval(), json.loads((folder / "run.json").read_text())
    model = task.new_model(recipe.seed).train()
    optimizer = recipe.method.build(model, recipe.lr)
    batches = training_batches(task, recipe.seed, recipe.batch_size)
    done = fixed_steps(model, optimizer, batches, recipe.steps, recipe.method.driver, recipe.label)
    run = {
        "recipe": recipe.label,
        **recipe.key(),
        "train_seconds": done["train_seconds"],
        "final_loss": statistics.fmean(done["losses"][-50:]),
        "num_params": sum(p.numel() for p in model.parameters()),
    }
    model.eval()
    if folder is not None:
        model.save_pretrained(folder)
        (folder / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    return model, run


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
            "recipe": {**recipe.key(), "label": recipe.label, "optimizer": "AdamW, linear warmup 5% and decay"},
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
