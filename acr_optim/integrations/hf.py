r"""ACR training with the Hugging Face ``Trainer`` (and ``Seq2SeqTrainer`` or any subclass).

Usage, with an :class:`~acr_optim.ACR` optimizer you build (one param group: the corruption
constraint ``||a||_p = eps`` then covers the whole model)::

    from acr_optim import ACR, ACRCallback

    optimizer = ACR(torch.optim.AdamW(model.parameters(), lr=5e-5), eps=0.1, p=2, alpha=0.5)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizers=(optimizer, None), callbacks=[ACRCallback()])
    trainer.train()

or letting the callback wrap the optimizer the Trainer builds from ``TrainingArguments``::

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[ACRCallback(eps=0.1, p=2, alpha=0.5)])

(the Trainer's default AdamW has two param groups, with and without weight decay; they share
the ACR settings, so ACR corrupts them together under the one constraint ``||a||_p = eps``).

How it works.  The Trainer runs one forward/backward per micro-batch, clips, and calls
``optimizer.step()`` without a closure; clipping and the ``GradScaler`` unscale happen *before*
``on_pre_optimizer_step``, so the corrupted pass cannot wait for that event.  The callback
therefore wraps the Trainer's own ``training_step`` on the instance it is attached to.  It
records each micro-batch of the optimizer step (inputs, ``num_items_in_batch``, RNG state).
After the last one, whose backward leaves the accumulated clean gradient ``g`` in ``.grad``
(all-reduced under DDP), it calls ``optimizer.perturb()`` (``w <- w + a(g)``), replays
``training_step`` on the same micro-batches (same ``compute_loss``, loss scaling for gradient
accumulation and ``num_items_in_batch``, autocast, ``GradScaler``, DDP synchronisation on the
last micro-batch only) with the RNG restored so dropout draws the same masks, and
``optimizer.restore()`` leaves ``(1 - alpha) g + alpha g(w + a)`` in ``.grad``.  The Trainer then
clips that mixed gradient and steps as usual; the RNG continues as if ACR were absent.

The callback finds its Trainer when the Trainer calls ``on_init_end`` (or ``on_train_begin`` for
``trainer.add_callback``); call :meth:`ACRCallback.attach` yourself where that is not possible.

Logged with the Trainer's training logs (so TensorBoard, W&B, ``log_history`` see them), each
averaged over the optimizer steps since the previous log and over processes:

* ``acr/corrupted_loss``: the training loss at ``w + a`` (same micro-batches and dropout masks);
* ``acr/loss_gap``: corrupted minus clean loss, an online estimate of the corruption indicator;
* ``acr/first_order_gain``: its first-order prediction ``eps * ||top_n(g)||_{p/(p-1)}``;
* ``acr/corruption_norm``: ``||a||_p`` applied (:attr:`ACR.last_corruption_norm`: ``eps``, or
  several independently constrained groups combined as ``(sum eps_g^p)^(1/p)``).

Supported: ``transformers >= 5.0, < 6`` (:data:`SUPPORTED_TRANSFORMERS`; tested with 5.0.0 and
accelerate 1.3.0, and with the newest releases; the Trainer internals used are listed in
:data:`TRAINER_INTERNALS`), single process, DDP through ``accelerate`` (the perturbation is built
from the all-reduced gradient, or per replica with ``per_replica=True``), gradient accumulation,
``max_grad_norm``, bf16/fp16 mixed precision, LR schedulers, ``resume_from_checkpoint``,
``torch_compile=True``, and ``peft`` LoRA models (only the adapters, the parameters with gradients,
are corrupted and trained: see :mod:`acr_optim.integrations.peft`).  FSDP, DeepSpeed, tensor/context/sequence
parallelism and SageMaker model parallelism raise ``NotImplementedError`` at attach time: the
corruption would be computed from shards instead of the global gradient.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import transformers
from packaging.version import Version
from torch import Tensor
from torch.optim import Optimizer
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..corruption import check_eps, check_n, check_p
from ..optimizer import ACR, check_alpha

__all__ = ["SUPPORTED_TRANSFORMERS", "TRAINER_INTERNALS", "ACRCallback"]

SUPPORTED_TRANSFORMERS = (Version("5.0"), Version("6.0"))
"""``[lowest, highest)`` ``transformers`` versions whose ``Trainer`` loop ``ACRCallback`` relies on."""


def _check_transformers_version() -> None:
    lo, hi = SUPPORTED_TRANSFORMERS
    if not lo <= Version(transformers.__version__) < hi:
        raise RuntimeError(
            f"ACRCallback supports transformers >= {lo}, < {hi} (it wraps Trainer.training_step and relies on the "
            f"5.x training loop); found transformers {transformers.__version__}"
        )


# -- the Trainer internals ACRCallback relies on ---------------------------------------------------
# transformers 5.x (checked up to 5.24) has no public hook between the last micro-batch's backward and
# the gradient clipping, and does not hand callbacks their Trainer.  So the callback overrides
# training_step on the Trainer instance (the method the Trainer documents as "subclass and override"),
# and finds its Trainer as the `self` of a caller frame of on_init_end/on_train_begin (or is given it
# through attach()).  These are all the internals it uses; attach() checks them, so a transformers
# release that changes one fails there, naming it, rather than training wrongly.


def _parameters(method: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(method).parameters)


TRAINER_INTERNALS: dict[str, Callable[[Trainer], bool]] = {
    "Trainer.training_step(model, inputs, num_items_in_batch)": lambda t: (
        _parameters(t.training_step)[:3] == ["model", "inputs", "num_items_in_batch"]
    ),
    "Trainer.log(logs, ...)": lambda t: _parameters(t.log)[:1] == ["logs"],
    "Trainer.create_optimizer()": lambda t: callable(t.create_optimizer),
    "Trainer.optimizer": lambda t: hasattr(t, "optimizer"),
    "Trainer.callback_handler.callbacks": lambda t: isinstance(t.callback_handler.callbacks, list),
    "Trainer.accelerator (sync_gradients, no_sync, reduce, gradient_state.plugin_kwargs)": lambda t: (
        all(hasattr(t.accelerator, name) for name in ("sync_gradients", "no_sync", "reduce"))
        and isinstance(t.accelerator.gradient_state.plugin_kwargs, dict)
    ),
    "Trainer.is_deepspeed_enabled, is_fsdp_enabled, get_tp_size(), get_cp_size(), get_sp_size()": lambda t: all(
        hasattr(t, name)
        for name in ("is_deepspeed_enabled", "is_fsdp_enabled", "get_tp_size", "get_cp_size", "get_sp_size")
    ),
}
"""Description -> check, for each ``Trainer`` internal :class:`ACRCallback` uses (see the comment above)."""


def _provides(trainer: Trainer, check: Callable[[Trainer], bool]) -> bool:
    try:
        return bool(check(trainer))
    except (AttributeError, TypeError, ValueError):  # a missing attribute, or a signature inspect cannot read
        return False


def _check_trainer_internals(trainer: Trainer) -> None:
    missing = [what for what, check in TRAINER_INTERNALS.items() if not _provides(trainer, check)]
    if missing:
        lo, hi = SUPPORTED_TRANSFORMERS
        raise RuntimeError(
            f"ACRCallback relies on Trainer internals that transformers {transformers.__version__} "
            f"({type(trainer).__name__}) does not provide as expected: {'; '.join(missing)}. It is tested with "
            f"transformers >= {lo}, < {hi}; please report this with your transformers version"
        )


def find_acr(optimizer: Optimizer | None) -> ACR | None:
    """The :class:`ACR` inside ``optimizer`` (itself, or under accelerate's ``AcceleratedOptimizer``), else None."""
    while optimizer is not None and not isinstance(optimizer, ACR):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def _rng_state(device: torch.device) -> list[Tensor]:
    states = [torch.get_rng_state()]
    if device.type != "cpu":
        states.append(torch.get_device_module(device.type).get_rng_state())
    return states


def _set_rng_state(device: torch.device, states: list[Tensor]) -> None:
    torch.set_rng_state(states[0])
    if device.type != "cpu":
        torch.get_device_module(device.type).set_rng_state(states[1])


class ACRCallback(TrainerCallback):
    """Make a ``transformers.Trainer`` train with :class:`~acr_optim.ACR` (see the module docstring).

    Args:
        eps: when given, wrap the optimizer the Trainer creates (or was given, if it is not
            already an ``ACR``) in ``ACR(optimizer, eps, p, alpha, n)``.  With ``eps=None``
            (default) the Trainer's optimizer must already be an ``ACR``.
        p: the corruption norm of that ``ACR``.
        alpha: its weight of the corrupted loss.
        n: its limit on the number of corrupted parameters (``None``: all).
        per_replica: under DDP, build each process's corruption from its own gradient (no
            all-reduce before the corruption, "m-sharpness" in the SAM literature); the mixed
            gradients are still all-reduced.  Default False: corruption from the global gradient,
            the same result as one process with the same global batch.
    """

    def __init__(
        self,
        eps: float | None = None,
        p: float = 2.0,
        alpha: float = 0.5,
        n: int | None = None,
        *,
        per_replica: bool = False,
    ) -> None:
        _check_transformers_version()
        p, alpha, n = check_p(p), check_alpha(alpha), check_n(n)
        if eps is None and (p, alpha, n) != (2.0, 0.5, None):
            raise ValueError("ACRCallback: p, alpha and n configure the optimizer it wraps, so they need eps too")
        self.acr_config = None if eps is None else {"eps": check_eps(eps), "p": p, "alpha": alpha, "n": n}
        self.per_replica = bool(per_replica)
        self.trainer: Trainer | None = None
        self._own_acr: ACR | None = None
        self._batches: list[tuple[Any, Any, list[Tensor]]] = []
        self._clean_loss: Tensor | None = None
        self._reset_stats()

    # -- binding to the Trainer -----------------------------------------------------------------

    def attach(self, trainer: Trainer) -> Trainer:
        """Bind to ``trainer`` (adding the callback if needed) and return it; done automatically in the usual cases."""
        if self.trainer is trainer:
            return trainer
        if self.trainer is not None:
            raise RuntimeError("this ACRCallback is already attached to another Trainer; create one per Trainer")
        if not isinstance(trainer, Trainer):
            raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
        _check_trainer_internals(trainer)
        _check_unsupported_parallelism(trainer)
        if not any(cb is self for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        self.trainer = trainer
        trainer.training_step = self._wrap_training_step(trainer.training_step)
        trainer.log = self._wrap_log(trainer.log)
        if self.acr_config is not None:
            if find_acr(trainer.optimizer) is None and type(trainer.optimizer).__name__ == "AcceleratedOptimizer":
                raise RuntimeError(
                    "ACRCallback(eps=...) must be attached before training starts: pass it in Trainer(callbacks=[...])"
                )
            trainer.create_optimizer = self._wrap_create_optimizer(trainer.create_optimizer)
        return trainer

    def _discover_trainer(self) -> None:
        """Find the Trainer whose callback handler is calling us (the caller's frames), then :meth:`attach`."""
        frame = sys._getframe(1)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer) and any(cb is self for cb in owner.callback_handler.callbacks):
                self.attach(owner)
                return
            frame = frame.f_back
        raise RuntimeError(
            f"ACRCallback could not find its Trainer among its callers (transformers {transformers.__version__}): "
            "call ACRCallback.attach(trainer) before train()"
        )

    def _wrap_create_optimizer(self, create_optimizer: Callable[..., Optimizer]) -> Callable[..., Optimizer]:
        @functools.wraps(create_optimizer)
        def wrapped(*args: Any, **kwargs: Any) -> Optimizer:
            trainer = self.trainer
            create_optimizer(*args, **kwargs)
            acr = find_acr(trainer.optimizer)
            if acr is None:
                self._own_acr = trainer.optimizer = ACR(trainer.optimizer, **self.acr_config)
            elif acr is not self._own_acr:
                raise ValueError(
                    "ACRCallback(eps=...) wraps the Trainer's optimizer, but it already is an ACR optimizer: "
                    "use ACRCallback() without arguments, or pass a plain optimizer"
                )
            return trainer.optimizer

        return wrapped

    # -- the corrupted pass ---------------------------------------------------------------------

    def _wrap_training_step(self, training_step: Callable[..., Tensor]) -> Callable[..., Tensor]:
        @functools.wraps(training_step)
        def wrapped(model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None) -> Tensor:
            trainer = self.trainer
            rng = _rng_state(trainer.args.device)
            local = trainer.accelerator.no_sync(model) if self.per_replica else contextlib.nullcontext()
            with local:
                loss = training_step(model, inputs, num_items_in_batch)
            self._batches.append((inputs, num_items_in_batch, rng))
            self._clean_loss = loss if self._clean_loss is None else self._clean_loss + loss
            if trainer.accelerator.sync_gradients:  # the step's last micro-batch: the Trainer clips and steps next
                batches, clean, self._batches, self._clean_loss = self._batches, self._clean_loss, [], None
                self._corrupted_pass(training_step, model, batches, clean)
            return loss

        return wrapped

    def _corrupted_pass(
        self, training_step: Callable[..., Tensor], model: torch.nn.Module, batches: list, clean: Tensor
    ) -> None:
        trainer, acr = self.trainer, self._acr()
        device = trainer.args.device
        self._steps += 1
        perturbed = acr.perturb()
        replay = perturbed
        distributed = self.per_replica and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            # A rank whose gradient is zero or non-finite does not perturb; replaying at w keeps its contribution
            # right (zero) or non-finite (the GradScaler then skips the step), and keeps DDP's collectives aligned.
            flag = torch.tensor(float(perturbed), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            replay = bool(flag.item())
        if not replay:
            if distributed:
                _all_reduce_mean_grads(model)
            return
        after = _rng_state(device)
        corrupted = torch.zeros((), device=device)
        sync_each_batch = trainer.accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False)
        try:
            for i, (inputs, num_items_in_batch, rng) in enumerate(batches):
                _set_rng_state(device, rng)
                last = i == len(batches) - 1
                sync = contextlib.nullcontext() if last or sync_each_batch else trainer.accelerator.no_sync(model)
                with sync:
                    corrupted = corrupted + training_step(model, inputs, num_items_in_batch)
        finally:
            acr.restore()
            _set_rng_state(device, after)
        if perturbed:
            gain = acr.last_first_order_gain
            scaler = getattr(trainer.optimizer, "scaler", None)
            if scaler is not None and scaler.is_enabled():
                gain = gain / scaler.get_scale()  # the clean gradient is scaled by the GradScaler
            self._corrupted += 1
            self._corrupted_loss = self._corrupted_loss + corrupted.detach()
            self._gap = self._gap + (corrupted.detach() - clean)
            self._norm += acr.last_corruption_norm
            self._gain += gain

    def _acr(self) -> ACR:
        acr = find_acr(self.trainer.optimizer)
        if acr is None:
            raise TypeError(
                "ACRCallback needs an ACR optimizer: pass Trainer(optimizers=(ACR(base_optimizer, eps=...), None)) "
                "or use ACRCallback(eps=...) to wrap the Trainer's default optimizer"
            )
        return acr

    # -- logging --------------------------------------------------------------------------------

    def _reset_stats(self) -> None:
        self._steps = 0
        self._corrupted = 0
        self._corrupted_loss: Tensor | float = 0.0
        self._gap: Tensor | float = 0.0
        self._norm = 0.0
        self._gain = 0.0

    def _wrap_log(self, log: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(log)
        def wrapped(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "loss" in logs and self._steps:  # a training log, reached by every process at the same step
                logs.update(self._drain())
            return log(logs, *args, **kwargs)

        return wrapped

    def _drain(self) -> dict[str, float]:
        device = self.trainer.args.device
        sums = torch.stack(
            [
                torch.as_tensor(v, dtype=torch.float64, device=device)
                for v in (self._corrupted_loss, self._gap, self._norm, self._gain, self._corrupted)
            ]
        )
        self._reset_stats()
        sums = self.trainer.accelerator.reduce(sums, "sum").tolist()
        count = sums[-1]
        if not count:
            return {}
        names = ("acr/corrupted_loss", "acr/loss_gap", "acr/corruption_norm", "acr/first_order_gain")
        return {name: value / count for name, value in zip(names, sums)}

    # -- TrainerCallback events -----------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.trainer is None:
            self._discover_trainer()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.trainer is None:
            self._discover_trainer()
        self._acr()
        self._batches, self._clean_loss = [], None
        self._reset_stats()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._batches, self._clean_loss = [], None


def _all_reduce_mean_grads(model: torch.nn.Module) -> None:
    """Average ``.grad`` over processes, as DDP would have (used when the synchronised replay is skipped)."""
    world = dist.get_world_size()
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad.div_(world)


def _check_unsupported_parallelism(trainer: Trainer) -> None:
    """Raise for setups where ``.grad`` holds shards: the corruption needs the global norm and top-n."""
    unsupported = {
        "DeepSpeed": trainer.is_deepspeed_enabled,
        "FSDP": trainer.is_fsdp_enabled or getattr(trainer, "is_fsdp_xla_enabled", False),
        "models sharded at load time (DistributedConfig)": getattr(
            trainer, "is_distributed_loading_by_transformers", False
        ),
        "tensor/context/sequence parallelism": max(trainer.get_tp_size(), trainer.get_cp_size(), trainer.get_sp_size())
        > 1,
    }
    names = [name for name, enabled in unsupported.items() if enabled]
    if names:
        raise NotImplementedError(
            f"ACRCallback does not support {', '.join(names)}: gradients are sharded there, and the corruption "
            "needs the global gradient norm and top-n; use DDP (accelerate launch --num_processes N) instead"
        )
