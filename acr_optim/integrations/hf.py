r"""ACR training with the Hugging Face ``Trainer`` and its subclasses (``Seq2SeqTrainer``, TRL's ``SFTTrainer``
and ``DPOTrainer``, sentence-transformers' ``SentenceTransformerTrainer``, your own).

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

Trainer subclasses.  The replay calls the trainer's own ``training_step``, so a subclass's
``compute_loss`` (TRL's SFT and DPO losses, sentence-transformers' losses) defines the corrupted
objective too.  A subclass may wrap ``training_step`` in a ``(*args, **kwargs)`` method that passes
the call on (TRL's trainers do, to enter their activation-offload context); one that changes its
signature, or that overrides ``_prepare_inputs`` to build its batches inside ``training_step``
(TRL's online trainers, such as ``GRPOTrainer``, generate completions from the policy there, which
a replay cannot reproduce), is refused at attach time, naming the class.  What ``training_step``
and ``compute_loss`` count in the trainer's attributes is counted once, for the clean pass: every
attribute of the trainer that holds plain data (numbers, strings, one-element tensors, and lists,
tuples, sets, deques and dicts of them; not its datasets) is put back after the replay as it was
before it.  That covers TRL's ``_metrics`` (entropy, token accuracy, rewards, log-probabilities)
and ``_total_train_tokens``, and sentence-transformers' ``accum_loss_components``; counts kept in
other objects (a callback, the model, ``trainer.state``) are not covered.  ``state.total_flos``
counts the replay: each micro-batch's ``floating_point_ops`` is added once more for it.

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
are corrupted and trained: see :mod:`acr_optim.integrations.peft`).  At attach time these raise
``NotImplementedError``: DeepSpeed (its engine steps the optimizer inside ``backward``, before any
callback, so the corrupted pass has no place between the clean gradient and the step); FSDP
through the Trainer (not verified yet; :class:`~acr_optim.ACR` handles FSDP2 shards in your own
loop); tensor/context/sequence parallelism and models sharded at load time (their gradients are
sharded, and the corruption needs the global norm and top-n).  Under ``use_cpu``, accelerate turns
``--fsdp`` / ``--deepspeed`` into plain DDP; the callback warns once that it did, and trains on.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import inspect
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import transformers
from packaging.version import Version
from torch import Tensor
from torch.optim import Optimizer
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..buffers import preserved_buffers
from ..checks import check_alpha, check_eps, check_n, check_p
from ..fault_sets import fault_set
from ..optimizer import ACR
from ..replay import RNGState, replaying, rng_state

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


def _passes_on(method: Any) -> bool:
    """Whether ``method`` (a function in a class body) takes nothing but ``*args, **kwargs`` after ``self``.

    Such a wrapper hands its call on unchanged, as TRL's trainers wrap ``training_step`` to enter their
    activation-offload context before calling ``Trainer.training_step``.
    """
    if not callable(method):
        return False
    kinds = [parameter.kind for parameter in inspect.signature(method).parameters.values()][1:]
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return bool(kinds) and all(kind in variadic for kind in kinds)


def _defining_class(trainer: Trainer, name: str) -> type | None:
    """The class along ``type(trainer).__mro__`` whose attribute ``name`` the trainer really runs.

    Wrappers that pass their call on (:func:`_passes_on`) are looked through, so ``SFTTrainer.training_step``
    resolves to ``Trainer``.  None when no class defines ``name`` (an instance attribute, or missing).
    """
    classes = [cls for cls in type(trainer).__mro__ if name in vars(cls)]
    concrete = [cls for cls in classes if not _passes_on(vars(cls)[name])]
    return (concrete or classes or [None])[0]


def _training_step_parameters(trainer: Trainer) -> list[str]:
    """The parameters (without ``self``) of the ``training_step`` the trainer runs, seen through wrappers."""
    return _parameters(vars(_defining_class(trainer, "training_step"))["training_step"])[1:]


TRAINER_INTERNALS: dict[str, tuple[str, Callable[[Trainer], bool]]] = {
    "Trainer.training_step(model, inputs, num_items_in_batch)": (
        "training_step",
        lambda t: _training_step_parameters(t)[:3] == ["model", "inputs", "num_items_in_batch"],
    ),
    "Trainer.log(logs, ...)": ("log", lambda t: _parameters(t.log)[:1] == ["logs"]),
    "Trainer.create_optimizer()": ("create_optimizer", lambda t: callable(t.create_optimizer)),
    "Trainer.optimizer": ("optimizer", lambda t: hasattr(t, "optimizer")),
    "Trainer.callback_handler.callbacks": (
        "callback_handler",
        lambda t: isinstance(t.callback_handler.callbacks, list),
    ),
    "Trainer.accelerator (sync_gradients, no_sync, reduce, gradient_state.plugin_kwargs)": (
        "accelerator",
        lambda t: (
            all(hasattr(t.accelerator, name) for name in ("sync_gradients", "no_sync", "reduce"))
            and isinstance(t.accelerator.gradient_state.plugin_kwargs, dict)
        ),
    ),
    "Trainer.current_flos, Trainer.floating_point_ops(inputs)": (
        "floating_point_ops",
        lambda t: isinstance(t.current_flos, (int, float)) and _parameters(t.floating_point_ops)[:1] == ["inputs"],
    ),
    "Trainer.is_deepspeed_enabled, is_fsdp_enabled, get_tp_size(), get_cp_size(), get_sp_size()": (
        "is_fsdp_enabled",
        lambda t: all(
            hasattr(t, name)
            for name in ("is_deepspeed_enabled", "is_fsdp_enabled", "get_tp_size", "get_cp_size", "get_sp_size")
        ),
    ),
}
"""Description -> (the attribute concerned, its check), for each ``Trainer`` internal :class:`ACRCallback` uses
(see the comment above).  A ``Trainer`` subclass that overrides one of them must keep it; for ``training_step``
a ``(*args, **kwargs)`` wrapper that passes the call on (TRL's trainers) counts as keeping it."""


def _provides(trainer: Trainer, check: Callable[[Trainer], bool]) -> bool:
    try:
        return bool(check(trainer))
    except (AttributeError, TypeError, ValueError):  # a missing attribute, or a signature inspect cannot read
        return False


def _from_transformers(cls: type | None) -> bool:
    return cls is None or cls.__module__.split(".")[0] == "transformers"


def _check_trainer_internals(trainer: Trainer) -> None:
    """Raise naming what is missing: a subclass's override (named with its module), or transformers' own change."""
    missing = {what: name for what, (name, check) in TRAINER_INTERNALS.items() if not _provides(trainer, check)}
    if not missing:
        return
    owners = {what: _defining_class(trainer, name) for what, name in missing.items()}
    overridden = {what: owner for what, owner in owners.items() if not _from_transformers(owner)}
    if overridden:
        details = []
        for what, owner in overridden.items():
            name = missing[what]
            if callable(vars(owner)[name]):
                signature = inspect.signature(vars(owner)[name])
                name += str(signature.replace(parameters=list(signature.parameters.values())[1:]))  # without self
            details.append(f"{owner.__module__}.{owner.__qualname__} overrides {what} as {name}")
        raise RuntimeError(
            f"ACRCallback cannot train with {type(trainer).__name__}: {'; '.join(details)}. The callback relies on "
            "these Trainer internals (it replays training_step(model, inputs, num_items_in_batch) on each "
            "micro-batch for the corrupted pass), so a subclass must keep them; a (*args, **kwargs) wrapper "
            "that passes the call on is fine"
        )
    lo, hi = SUPPORTED_TRANSFORMERS
    raise RuntimeError(
        f"ACRCallback relies on Trainer internals that transformers {transformers.__version__} "
        f"({type(trainer).__name__}) does not provide as expected: {'; '.join(missing)}. It is tested with "
        f"transformers >= {lo}, < {hi}; please report this with your transformers version"
    )


def _check_replayable(trainer: Trainer) -> None:
    """Refuse trainers that build their batches inside ``training_step``: the replay would not see the clean batch."""
    owner = _defining_class(trainer, "_prepare_inputs")
    if not _from_transformers(owner):
        raise NotImplementedError(
            f"ACRCallback does not support {type(trainer).__name__}: {owner.__module__}.{owner.__qualname__} "
            "overrides Trainer._prepare_inputs, so training_step builds its own batches (TRL's online trainers, "
            "such as GRPOTrainer and RLOOTrainer, generate completions from the policy there), and the replay of "
            "training_step for the corrupted pass would not see the batch of the clean pass"
        )


def find_acr(optimizer: Optimizer | None) -> ACR | None:
    """The :class:`ACR` inside ``optimizer`` (itself, or under accelerate's ``AcceleratedOptimizer``), else None."""
    while optimizer is not None and not isinstance(optimizer, ACR):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


_PLAIN = (bool, int, float, complex, str, bytes, type(None))
_DATA = ("train_dataset", "eval_dataset")  # the Trainer's inputs, which training_step reads but does not count in


def _plain_tensors(value: Any) -> list[Tensor] | None:
    """The tensors inside ``value`` if it is plain data, else None.

    Plain data: numbers, strings, one-element tensors (not parameters), and lists, tuples, sets, deques and
    dicts of plain data.
    """
    if isinstance(value, _PLAIN):
        return []
    if isinstance(value, Tensor):
        return [value] if value.numel() == 1 and not isinstance(value, torch.nn.Parameter) else None
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, (list, tuple, set, frozenset, collections.deque)):
        items = list(value)
    else:
        return None
    found: list[Tensor] = []
    for item in items:
        inner = _plain_tensors(item)
        if inner is None:
            return None
        found += inner
    return found


@contextlib.contextmanager
def _trainer_bookkeeping_kept(trainer: Trainer) -> Iterator[None]:
    """Put the trainer's plain-data attributes back as they were on entry (the replay's bookkeeping is dropped).

    ``training_step`` and the ``compute_loss`` it calls may count what they see in attributes of the trainer:
    TRL's trainers append entropy, token accuracy, rewards and log-probabilities to ``_metrics`` and add the
    batch's tokens to ``_total_train_tokens``; sentence-transformers adds loss components to
    ``accum_loss_components``.  Every attribute in ``vars(trainer)`` that holds plain data
    (:func:`_plain_tensors`), other than its datasets, is deep-copied on entry (its tensors detached from
    any graph) and the copy bound in its place on exit.  Not covered: counts kept in larger tensors or in
    other objects (callbacks, the model, ``trainer.state``).
    """
    saved = {}
    for name, value in vars(trainer).items():
        tensors = None if name in _DATA else _plain_tensors(value)
        if tensors is not None:
            saved[name] = copy.deepcopy(value, {id(t): t.detach().clone() for t in tensors})
    try:
        yield
    finally:
        vars(trainer).update(saved)


class ACRCallback(TrainerCallback):
    """Make a ``transformers.Trainer`` train with :class:`~acr_optim.ACR` (see the module docstring).

    Args:
        eps: when given, wrap the optimizer the Trainer creates (or was given, if it is not
            already an ``ACR``) in ``ACR(optimizer, eps, p, alpha, n)``.  With ``eps=None``
            (default) the Trainer's optimizer must already be an ``ACR``.
        p: the corruption norm of that ``ACR``.
        alpha: its weight of the corrupted loss.
        n: its limit on the number of corrupted parameters (``None``: all).
        fault: instead of ``eps``, wrap the optimizer in ``ACR(optimizer, alpha=alpha, fault=fault,
            fault_mode=fault_mode, fault_radius=fault_radius)``: train against the error set of a
            deployment fault (``"int4:g32"``, ``"fp8_e4m3"``, ``"flips:10:int8"``...; see
            :mod:`acr_optim.fault_sets`).
        fault_mode: ``"worst"`` (default), ``"actual"`` or ``"random"``.
        fault_radius: the radius factor of a quantization or cast box.
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
        fault: str | None = None,
        fault_mode: str = "worst",
        fault_radius: float = 1.0,
        per_replica: bool = False,
    ) -> None:
        _check_transformers_version()
        p, alpha, n = check_p(p), check_alpha(alpha), check_n(n)
        if fault is not None:
            if eps is not None:
                raise ValueError("ACRCallback: give eps (the Lp ball) or fault (a fault's error set), not both")
            fault_set(fault, fault_mode, fault_radius)  # a bad spec, mode or radius fails here, naming the argument
            self.acr_config = {
                "alpha": alpha,
                "n": n,
                "fault": fault,
                "fault_mode": fault_mode,
                "fault_radius": fault_radius,
            }
        elif eps is None and (p, alpha, n, fault_mode, fault_radius) != (2.0, 0.5, None, "worst", 1.0):
            raise ValueError(
                "ACRCallback: p, alpha, n and the fault settings configure the optimizer it wraps, so they need eps "
                "or fault too"
            )
        else:
            self.acr_config = None if eps is None else {"eps": check_eps(eps), "p": p, "alpha": alpha, "n": n}
        self.per_replica = bool(per_replica)
        self.trainer: Trainer | None = None
        self._own_acr: ACR | None = None
        self._batches: list[tuple[Any, Any, RNGState]] = []
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
        _check_replayable(trainer)
        _check_unsupported_parallelism(trainer)
        _warn_if_sharding_was_dropped(trainer)
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
            rng = rng_state([trainer.args.device])
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
        corrupted = torch.zeros((), device=device)
        sync_each_batch = trainer.accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False)
        try:
            # a rank replaying at w (it did not perturb) must leave its buffers as ACR's restore() leaves the others'
            unperturbed = contextlib.nullcontext() if perturbed else preserved_buffers()
            with _trainer_bookkeeping_kept(trainer), unperturbed:
                for i, (inputs, num_items_in_batch, rng) in enumerate(batches):
                    last = i == len(batches) - 1
                    sync = contextlib.nullcontext() if last or sync_each_batch else trainer.accelerator.no_sync(model)
                    with sync, replaying(rng):  # the clean pass's dropout masks (acr_optim.replay)
                        corrupted = corrupted + training_step(model, inputs, num_items_in_batch)
        finally:
            acr.restore()
        # The Trainer counts one forward and backward per micro-batch in total_flos; the replay ran one more.
        trainer.current_flos += sum(float(trainer.floating_point_ops(inputs)) for inputs, _, _ in batches)
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
    """Raise, with the reason, for the parallelism the callback does not support through the Trainer."""
    if trainer.is_deepspeed_enabled:
        raise NotImplementedError(
            "ACRCallback does not support DeepSpeed: its engine steps the optimizer inside backward() at the end "
            "of each gradient-accumulation cycle, before any callback runs, so the corrupted pass has no place "
            "between the clean gradient and the step; use DDP (accelerate launch --num_processes N) instead"
        )
    if trainer.is_fsdp_enabled or getattr(trainer, "is_fsdp_xla_enabled", False):
        raise NotImplementedError(
            "ACRCallback does not support FSDP through the Trainer yet: it is not verified there (the ACR optimizer "
            "itself handles FSDP2 shards, fully_shard, in your own loop); use DDP (accelerate launch "
            "--num_processes N) instead"
        )
    sharded = {
        "models sharded at load time (DistributedConfig)": getattr(
            trainer, "is_distributed_loading_by_transformers", False
        ),
        "tensor/context/sequence parallelism": max(trainer.get_tp_size(), trainer.get_cp_size(), trainer.get_sp_size())
        > 1,
    }
    names = [name for name, enabled in sharded.items() if enabled]
    if names:
        raise NotImplementedError(
            f"ACRCallback does not support {', '.join(names)}: gradients are sharded there, and the corruption "
            "needs the global gradient norm and top-n; use DDP (accelerate launch --num_processes N) instead"
        )


def _warn_if_sharding_was_dropped(trainer: Trainer) -> None:
    """Warn, on the main process, when ``use_cpu`` made accelerate run the FSDP or DeepSpeed asked for as DDP."""
    args = trainer.args
    dropped = [
        flag
        for flag, asked, enabled in (
            ("--fsdp", args.fsdp, trainer.is_fsdp_enabled),
            ("--deepspeed", args.deepspeed, trainer.is_deepspeed_enabled),
        )
        if asked and not enabled
    ]
    if args.use_cpu and dropped and args.process_index == 0:
        warnings.warn(
            f"{' and '.join(dropped)} ignored under use_cpu: accelerate enables FSDP and DeepSpeed on accelerator "
            "devices only and turned this run into plain DDP (every process holds the whole model and gradient); "
            "ACRCallback trains it as DDP",
            UserWarning,
            stacklevel=2,
        )
