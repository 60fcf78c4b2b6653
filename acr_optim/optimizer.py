"""``ACR``: adversarial corruption-resistant training as a wrapper around any torch optimizer."""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .buffers import BufferSnapshot
from .checks import check_alpha, check_eps, check_n, check_p
from .corruption import (
    LpCorruption,
    NonFiniteGradientError,
    gather,
    support,
)
from .fault_sets import FaultSet, check_fault_settings, fault_set
from .replay import replaying, rng_state

__all__ = ["ACR"]


def _is_dtensor(t: Tensor) -> bool:
    # torch.distributed.tensor costs ~0.6 s to import; anyone holding a DTensor has imported it already.
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def _shard_group(params: list[Tensor]) -> Any:
    """The process group over which ``params`` are sharded (FSDP2 DTensors), or None for plain tensors.

    Raises ``NotImplementedError`` for layouts whose global norm ACR cannot form from the local
    shards: a mix of plain and sharded tensors, replicated placements, or a mesh of more than
    one dimension (HSDP, tensor parallelism).
    """
    sharded = [_is_dtensor(p) for p in params]
    if not any(sharded):
        return None
    from torch.distributed.tensor import Shard

    mesh = params[0].device_mesh
    if not all(sharded) or any(
        p.device_mesh != mesh or len(p.placements) != 1 or not isinstance(p.placements[0], Shard) for p in params
    ):
        raise NotImplementedError(
            "ACR supports sharded parameters only as FSDP2 lays them out (DTensors sharded on a 1-D mesh, every "
            "parameter of a param group sharded); replicated placements, HSDP and tensor parallelism are not supported"
        )
    return mesh.get_group()


def _put_(p: Tensor, flat_index: Tensor, values: Tensor, accumulate: bool = False) -> None:
    """``p.flatten()[flat_index] = values`` (or ``+=``) in place, whatever the strides of ``p``."""
    if p.is_contiguous():
        p.view(-1).index_put_((flat_index,), values, accumulate=accumulate)
    else:
        p.index_put_(torch.unravel_index(flat_index, p.shape), values, accumulate=accumulate)


def _combined_norm(parts: list[tuple[float, float]]) -> float:
    """``||a||_p`` of a corruption made of independent parts with norms ``eps_i`` in one ``p``; the
    sum of the ``eps_i`` (the L1 combination, an upper bound) when the parts use different ``p``."""
    ps = {p for _, p in parts}
    if len(ps) != 1:
        return sum(eps for eps, _ in parts)
    (p,) = ps
    return max(eps for eps, _ in parts) if math.isinf(p) else sum(eps**p for eps, _ in parts) ** (1 / p)


def _is_finite(loss: Any) -> bool:
    """False for a loss that is a non-finite number or tensor (``None`` and other returns count as finite)."""
    if isinstance(loss, Tensor):
        return bool(torch.isfinite(loss).all())
    return not isinstance(loss, float) or math.isfinite(loss)


@dataclass
class _Pending:
    """What :meth:`ACR.restore` must undo; never part of ``state_dict``."""

    dense_params: list[Tensor] = field(default_factory=list)
    dense_backups: list[Tensor] = field(default_factory=list)
    sparse: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)  # param, flat indices, old values
    grads: list[tuple[float, list[Tensor], list[Tensor]]] = field(default_factory=list)  # alpha, params, clean grads
    gradless: list[Tensor] = field(default_factory=list)
    buffers: BufferSnapshot | None = None  # module buffers as the clean pass left them


class ACR(Optimizer):
    r"""Adversarial Corruption-Resistant training (Sun et al., AAAI 2021) around a base optimizer.

    Each step minimises ``(1 - alpha) * L(w) + alpha * L(w + a(w))`` where ``a(w)`` is the
    first-order worst-case corruption of :func:`~acr_optim.gradient_corruption` in
    ``{||a||_p = eps, ||a||_0 <= n}``.  The update direction handed to the base optimizer is

        (1 - alpha) * g(w) + alpha * g(w + a)

    With ``alpha = 0`` this is the base optimizer bit for bit; with ``p = 2, alpha = 1, n = None``
    it is SAM with ``rho = eps``.  ``interval = k`` amortizes the cost: only every ``k``-th step
    is corrupted (two passes); the others are plain base steps with a single forward/backward.

    ``ACR`` shares ``param_groups`` and ``state`` with ``base_optimizer``, so LR schedulers,
    ``add_param_group`` and ``state_dict``/``load_state_dict`` act on both; ``defaults`` holds the
    base optimizer's defaults and ACR's (schedulers such as ``OneCycleLR`` read momentum or betas
    there).  The hooks of torch's optimizer registry registered on ``ACR`` fire as on any optimizer;
    global step hooks (``register_optimizer_step_pre_hook``) see ACR's step and, inside it, the base
    optimizer's.  ``deepcopy`` and pickle copy the base optimizer with it (refused while perturbed).
    Complex parameters are corrupted as their real view (``torch.view_as_real``), as torch's
    optimizers treat them; sparse gradients are refused.

    Module buffers: the corrupted forward runs in training mode at ``w + a`` and would update
    BatchNorm's running statistics (and any buffer a module updates in place) a second time.
    Between :meth:`perturb` and :meth:`restore` every buffer a forward reaches is recorded and then
    written back bit for bit (:class:`~acr_optim.buffers.BufferSnapshot`), so a step leaves the
    buffers as the clean pass left it, in every way of driving ACR.  (Not seen: a module compiled in
    place with ``module.compile()``, whose hooks run inside the compiled graph; ``torch.compile(model)``
    is covered.)  The settings live in
    each param group as ``acr_eps``, ``acr_p``, ``acr_alpha`` and ``acr_n`` (prefixed, because
    ``eps`` is already Adam's) and may be overridden per group.  All groups that share
    ``(acr_eps, acr_p, acr_n)`` are corrupted together as one vector under one constraint (so a
    weight-decay/no-decay split leaves the constraint on the whole model); a group that
    overrides any of them gets a constraint of its own.  ``acr_eps = 0`` keeps a group
    uncorrupted (it still receives the mixed gradient; ``acr_alpha`` is per group).
    Parameters without a gradient are skipped.  ``ACR(eps=0)`` corrupts nothing and is the base
    optimizer bit for bit, like ``alpha = 0``.  After :meth:`perturb`,
    ``last_first_order_gain`` holds the predicted loss increase ``a.g`` and
    ``last_corruption_norm`` the norm ``||a||_p`` applied.

    Fault-shaped corruption (``fault="int4:g32"``, ``fault_mode`` ``"worst"``/``"actual"``/``"random"``,
    ``fault_radius``): instead of the Lp ball, ``a`` is drawn from the error set of a deployment fault
    (:mod:`acr_optim.fault_sets`): the first-order worst case inside it, the fault itself
    (``a = fault(w) - w``; with ``alpha = 1`` quantization-aware training with a straight-through
    gradient), or a random draw.  ``eps``, ``p`` and ``n`` then do not apply; per group as
    ``acr_fault``, ``acr_fault_mode``, ``acr_fault_radius``.  The step restores ``w`` bit for bit as
    with the ball; ``last_corruption_norm`` is ``||a||_2``.

    FSDP2 (``fully_shard``): parameters sharded as DTensors on a 1-D mesh are supported with
    ``n = None`` and ``p > 1``; the norms are reduced across the shard group, so every process
    applies its shard of the same global corruption (2 processes == 1 process, tested).  Top-n
    across shards, HSDP and tensor parallelism raise ``NotImplementedError`` at construction.

    Two ways to drive it:

    * ``loss = opt.step(closure)``: the closure (forward + ``backward()``, returning the loss) is
      called once for the clean pass and, when a corruption is applied, a second time at
      ``w + a``; the returned loss is the clean one.  The closure must not reset gradients with
      ``model.zero_grad()`` between the passes (``opt.zero_grad()`` is ignored while perturbed).
    * Two-phase, for loops that run their own backward (AMP, accumulation, Trainer)::

          loss.backward()                      # clean gradient in .grad
          with opt.perturbed() as active:      # w <- w + a
              if active:
                  loss_fn(model(x), y).backward()  # corrupted gradient accumulates
          opt.step()                           # weights restored exactly, mixed gradient, base step

      ``perturb()``/``restore()`` are the same two halves as methods.

    Memory: between perturb and restore, a copy of the module buffers the corrupted forward
    reaches, one backup of the corrupted parameters (dense groups) or ``n`` indices and old
    values (top-n groups whose ``n`` makes that smaller); the clean
    gradient stays in ``.grad``, pre-scaled by ``(1 - alpha)/alpha`` so the corrupted backward
    accumulates onto it (with ``alpha = 1`` it is dropped and the corrupted backward writes
    fresh gradients).  Dense backups are kept between steps to avoid re-allocation; they are
    not part of ``state_dict``.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        eps: float = 0.05,
        p: float = 2.0,
        alpha: float = 0.5,
        n: int | None = None,
        *,
        interval: int = 1,
        fault: str | None = None,
        fault_mode: str = "worst",
        fault_radius: float = 1.0,
    ) -> None:
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        if isinstance(base_optimizer, ACR):
            raise TypeError("base_optimizer is already an ACR optimizer")
        # The base optimizer's defaults too: schedulers (OneCycleLR, CyclicLR) read momentum/betas from here.
        defaults = {
            **base_optimizer.defaults,
            "acr_eps": check_eps(eps, allow_zero=True),
            "acr_p": check_p(p),
            "acr_alpha": check_alpha(alpha),
            "acr_n": check_n(n),
            "acr_fault": fault,
            "acr_fault_mode": fault_mode,
            "acr_fault_radius": fault_radius,
        }
        check_fault_settings(fault_mode, fault_radius)  # also without a fault: groups may override acr_fault
        if fault is not None:
            fault_set(fault, fault_mode, fault_radius)  # a bad spec or combination fails here, naming the argument
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be a positive int (1 = corrupt every step), got {interval!r}")
        self.base_optimizer = base_optimizer
        self.interval = interval
        self._steps = 0  # optimizer steps taken, to place the corrupting ones of interval > 1
        self._pending: _Pending | None = None
        self._corrupted_this_step = False
        self._nonfinite = False  # perturb() met a non-finite clean gradient this step
        self._backups: dict[Tensor, Tensor] = {}
        self.skipped_steps = 0
        self.last_first_order_gain: float | None = None
        self.last_corruption_norm: float | None = None
        super().__init__(base_optimizer.param_groups, defaults)
        self.param_groups = base_optimizer.param_groups
        self.state = base_optimizer.state

    # -- param groups and state, shared with the base optimizer --------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        groups = self.base_optimizer.param_groups
        if not any(g is param_group for g in groups):  # a new group rather than a base group being linked
            self.base_optimizer.add_param_group(param_group)
        self._adopt_group(param_group)
        if self.param_groups is not groups:  # only while __init__ links the base groups
            self.param_groups.append(param_group)

    def _adopt_group(self, group: dict[str, Any]) -> None:
        """Give a base param group ACR's defaults for the settings it does not override, and validate them."""
        for name, default in self.defaults.items():
            group.setdefault(name, default)
        check_eps(group["acr_eps"], allow_zero=True, name="param group acr_eps")
        check_p(group["acr_p"], name="param group acr_p")
        check_alpha(group["acr_alpha"], name="param group acr_alpha")
        check_n(group["acr_n"], name="param group acr_n")
        sharded = _shard_group(group["params"]) is not None
        if sharded and (group["acr_n"] is not None or group["acr_p"] == 1):
            raise NotImplementedError(
                "ACR with sharded (FSDP2) parameters supports n=None and p > 1 only: a top-n selection across "
                "shards is not implemented"
            )
        if group["acr_fault"] is not None:
            where = f"param group {next((i for i, g in enumerate(self.param_groups) if g is group), len(self.param_groups))}"
            try:
                faults = self._fault_set(group)
            except ValueError as error:
                raise ValueError(f"{where} acr_fault/acr_fault_mode/acr_fault_radius: {error}") from None
            if group["acr_n"] is not None:
                raise ValueError(f"n applies to the Lp ball; with fault {group['acr_fault']!r} leave n=None ({where})")
            if sharded:
                raise NotImplementedError("fault-shaped corruption of sharded (FSDP2) parameters is not implemented")
            faults.check(group["params"], where)

    @staticmethod
    def _fault_set(group: dict[str, Any]) -> FaultSet:
        return fault_set(group["acr_fault"], group["acr_fault_mode"], group["acr_fault_radius"])

    @torch._disable_dynamo
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (its groups carry the ``acr_*`` settings) plus ACR's step count.

        Hooks registered on ``ACR`` (``register_state_dict_pre_hook``/``..._post_hook``) run around
        it as on any optimizer; hooks registered on the base optimizer run inside it.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = {**self.base_optimizer.state_dict(), "acr": {"steps": self._steps}}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            state_dict = state_dict if result is None else result
        return state_dict

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of the bare base optimizer (ACR settings then come from ``__init__``).

        ``register_load_state_dict_pre_hook``/``..._post_hook`` hooks run around it as on any optimizer.
        """
        if self._pending is not None:
            raise RuntimeError("load_state_dict() while the weights are perturbed: call restore() first")
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            state_dict = state_dict if result is None else dict(result)
        self._steps = state_dict.pop("acr", {}).get("steps", 0)
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            self._adopt_group(group)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles defaults, state and param_groups only; ACR also needs its base optimizer
        # (whose param_groups and state are the same objects, so pickle and deepcopy keep them shared).
        if self._pending is not None:
            raise RuntimeError("cannot pickle or copy ACR while the weights are perturbed: call restore() first")
        state = super().__getstate__()
        state.update(
            {
                name: self.__dict__[name]
                for name in ("base_optimizer", "interval", "_steps", "skipped_steps", "_corrupted_this_step")
            }
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._pending = None
        self._nonfinite = False
        self._backups = {}
        self.last_first_order_gain = self.last_corruption_norm = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset gradients, except while perturbed: then ``.grad`` holds the clean gradient ACR mixes in."""
        if self._pending is None:
            self.base_optimizer.zero_grad(set_to_none)

    # -- the virtual corruption step ------------------------------------------------------------

    @property
    def corrupts_this_step(self) -> bool:
        """Whether this step is a corrupting one: every step for ``interval = 1``, else every ``interval``-th."""
        return self._steps % self.interval == 0

    @property
    def is_perturbed(self) -> bool:
        """True between a successful :meth:`perturb` and :meth:`restore`."""
        return self._pending is not None

    def extra_memory_bytes(self) -> int:
        """Bytes ACR holds beyond the base optimizer: dense backups plus, while perturbed, top-n indices and values."""
        held = sum(b.numel() * b.element_size() for b in self._backups.values())
        if self._pending is not None:
            held += sum(i.numel() * i.element_size() + v.numel() * v.element_size() for _, i, v in self._pending.sparse)
        return held

    def _backup(self, owner: Tensor, p: Tensor) -> Tensor:
        buf = self._backups.get(owner)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = self._backups[owner] = torch.empty_like(p)
        return buf

    @torch.no_grad()
    def perturb(self) -> bool:
        """Move every corrupted group to ``w + a(g)`` with ``g`` the current ``.grad`` (the clean gradient).

        Returns ``True`` when a corruption was applied: run the corrupted forward/backward
        (gradients accumulate into ``.grad``), then :meth:`restore` or :meth:`step`.  Returns
        ``False``, touching neither weights nor gradients, when there is nothing to do (every
        ``alpha`` or ``eps`` is 0, zero gradients, a non-corrupting step of ``interval > 1``)
        or when the clean gradient is not finite (an fp16 overflow: the step is left for
        ``GradScaler``/the base optimizer to handle as without ACR); then skip the corrupted pass.

        The corruption is invariant to a positive scaling of ``g``, so gradients scaled by a
        ``GradScaler`` need no unscaling first.  Costs one pass over the gradients for the norm,
        one host synchronisation per group, and a backup copy of the corrupted weights.
        """
        if self._pending is not None:
            raise RuntimeError("perturb() called again before restore(): the weights are already perturbed")
        self._corrupted_this_step = True
        self._nonfinite = False
        self.last_first_order_gain = self.last_corruption_norm = None
        if not self.corrupts_this_step:
            return False
        # Groups with the same (eps, p, n) form one vector under one constraint; those with the same fault set one
        # vector under that fault (K flips, a pruning share, across the groups).
        vectors: dict[tuple[float, float, int | None], list[Tensor]] = {}
        fault_vectors: dict[FaultSet, list[Tensor]] = {}
        uses_corrupted_grad = False
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError(
                    "ACR does not support sparse gradients (nn.Embedding(sparse=True) and the like): use dense "
                    "gradients for the parameters ACR corrupts"
                )
            uses_corrupted_grad |= group["acr_alpha"] > 0
            if group["acr_fault"] is not None:
                fault_vectors.setdefault(self._fault_set(group), []).extend(params)
            elif group["acr_eps"] > 0:
                vectors.setdefault((group["acr_eps"], group["acr_p"], group["acr_n"]), []).extend(params)
        if not uses_corrupted_grad:
            return False
        plans = self._plan_balls(vectors)
        faulty = self._plan_faults(fault_vectors)
        if self._nonfinite or not (plans or faulty):
            return False
        self._apply_plans(plans, faulty)
        return self._pending is not None

    def _plan_balls(self, vectors: dict[tuple[float, float, int | None], list[Tensor]]) -> list[tuple]:
        """The Lp corruption of each vector, planned on its gradient; sets ``_nonfinite`` on a non-finite one."""
        plans = []
        for (eps, p_norm, n), params in vectors.items():
            owners = params
            # A complex number is two real ones, as torch's optimizers treat it: corrupt its real view.
            params = [torch.view_as_real(p) if p.is_complex() else p for p in params]
            grads = [torch.view_as_real(p.grad) if p.grad.is_complex() else p.grad for p in owners]
            shard_group = _shard_group(params)
            if shard_group is not None:  # FSDP2: work on this process's shards, reduce norms over the group
                params, grads = [p.to_local() for p in params], [g.to_local() for g in grads]
            indices = support(grads, n, p_norm)
            h = grads if indices is None else gather(grads, indices)
            try:
                plan = LpCorruption.plan(h, eps, p_norm, shard_group, params[0].device)
            except NonFiniteGradientError:
                self._nonfinite = True
                return []
            if plan is not None:
                plans.append((owners, params, indices, h, plan))
        return plans

    def _plan_faults(self, fault_vectors: dict[FaultSet, list[Tensor]]) -> list[tuple]:
        """``(fault set, targeted parameters, their gradients)`` of each fault vector; sets ``_nonfinite`` when any
        gradient of the vector (targeted or not: all of them reach the base step) is not finite."""
        faulty = []
        for faults, params in fault_vectors.items():
            if not bool(torch.stack([p.grad.isfinite().all() for p in params]).all()):  # one host sync, any dtype
                self._nonfinite = True
                continue
            targeted = [p for p in params if faults.fault.targets(p)]
            if targeted:
                faulty.append((faults, targeted, [p.grad for p in targeted]))
        return faulty

    def _apply_plans(self, plans: list[tuple], faulty: list[tuple]) -> None:
        """Move the weights to ``w + a`` (backing ``w`` up), stash the clean gradients, start the buffer snapshot;
        leaves ``_pending`` None (and ``_nonfinite`` set) when a fault's gain comes out non-finite."""
        pending = _Pending()
        fault_stats = []
        self._pending = pending
        try:
            for owners, params, indices, h, plan in plans:
                itemsize = params[0].element_size()
                if indices is None or sum(i.numel() for i in indices) * (8 + itemsize) > sum(
                    p.numel() * p.element_size() for p in params
                ):
                    self._perturb_dense(pending, owners, params, indices, h, plan)
                else:
                    for p, i, v in zip(params, indices, plan.values(h)):
                        if i.numel() == 0:
                            continue
                        old = p.reshape(-1)[i]
                        _put_(p, i, old + v)
                        pending.sparse.append((p, i, old))
            for faults, params, grads in faulty:
                backups = [self._backup(p, p) for p in params]
                torch._foreach_copy_(backups, params)
                pending.dense_params += params
                pending.dense_backups += backups
                fault_stats.append(faults.apply_([p.detach() for p in params], grads))
        except BaseException:
            self.restore()  # no weight stays corrupted by a corruption that failed half-way (an OOM in a backup...)
            raise
        if not all(math.isfinite(gain) for gain, _ in fault_stats):
            self.restore()
            self._nonfinite = True
            return
        self._stash_clean_grads(pending)
        pending.buffers = BufferSnapshot()
        self.last_first_order_gain = sum(plan.gain for *_, plan in plans) + sum(gain for gain, _ in fault_stats)
        self.last_corruption_norm = _combined_norm(
            [(plan.eps, plan.p) for *_, plan in plans] + [(norm, 2.0) for _, norm in fault_stats]
        )

    def _perturb_dense(
        self,
        pending: _Pending,
        owners: list[Tensor],
        params: list[Tensor],
        indices: list[Tensor] | None,
        h: list[Tensor],
        plan: LpCorruption,
    ) -> None:
        """``params`` (the parameters, or their local shards) <- ``w + a``, backing ``w`` up in buffers kept per owner."""
        backups = [self._backup(owner, p) for owner, p in zip(owners, params)]
        torch._foreach_copy_(backups, params)
        if indices is None and plan.linear_scale is not None:
            torch._foreach_add_(params, h, alpha=plan.linear_scale)
        elif indices is None:
            plan.write_(params, h)  # params now hold a; the backup holds w
            torch._foreach_add_(params, backups)
        else:
            for p, i, v in zip(params, indices, plan.values(h)):
                _put_(p, i, v, accumulate=True)
        pending.dense_params += params
        pending.dense_backups += backups

    def _stash_clean_grads(self, pending: _Pending) -> None:
        """Prepare ``.grad`` so the corrupted backward leaves ``(1-alpha)/alpha * g + g(w+a)`` there."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            pending.gradless += [p for p in group["params"] if p.grad is None and p.requires_grad]
            if not params:
                continue
            alpha, grads = group["acr_alpha"], [p.grad for p in params]
            if alpha == 1:
                # the clean gradient is not needed: drop it and let the corrupted backward write fresh
                # gradients (as after zero_grad(set_to_none=True)) instead of zeroing and accumulating
                grads = []
                for p in params:
                    p.grad = None
            elif alpha == 0:
                for p in params:
                    p.grad = None
            elif alpha != 0.5:  # at 0.5 the factor is exactly 1: skip a pass over the gradients
                torch._foreach_mul_(grads, (1 - alpha) / alpha)
            pending.grads.append((alpha, params, grads))

    @torch.no_grad()
    def restore(self) -> None:
        """Put the exact pre-corruption weights back and form ``(1-alpha) g(w) + alpha g(w+a)`` in ``.grad``.

        A no-op when nothing is perturbed.  Raises ``RuntimeError`` (after restoring the weights)
        if the gradients were reset between :meth:`perturb` and here (harmless, so not raised, for
        groups with ``alpha = 1``, which need no clean gradient).
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.dense_params:
            torch._foreach_copy_(pending.dense_params, pending.dense_backups)
        for p, index, old in pending.sparse:
            _put_(p, index, old)
        if pending.buffers is not None:
            pending.buffers.restore()
        reset = False
        for alpha, params, grads in pending.grads:
            if alpha == 0:
                for p, g in zip(params, grads):
                    p.grad = g
                continue
            if alpha == 1:  # a parameter the corrupted pass did not reach has a zero corrupted gradient
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                continue
            reset |= any(p.grad is not g for p, g in zip(params, grads))
            torch._foreach_mul_(grads, alpha)
        for p in pending.gradless:
            p.grad = None
        if reset:
            raise RuntimeError(
                "gradients were reset between perturb() and restore() (model.zero_grad() inside the closure?): "
                "the weights are restored but the gradients are not the ACR mixture; zero them and redo the step"
            )

    @contextmanager
    def perturbed(self) -> Iterator[bool]:
        """``with opt.perturbed() as active:``: :meth:`perturb` on entry, :meth:`restore` on exit (also on error)."""
        active = self.perturb()
        try:
            yield active
        finally:
            self.restore()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One ACR step.

        With a closure: clean pass (closure call 1), :meth:`perturb`, corrupted pass (closure
        call 2, from the random-number state call 1 started from, so dropout draws the same masks:
        :mod:`acr_optim.replay`; skipped when :meth:`perturb` returns False, e.g. on the
        non-corrupting steps of ``interval > 1``), :meth:`restore`, base step; returns the clean
        loss.  The generators then continue from where the clean pass left them.  Without one:
        :meth:`restore` if still perturbed, then the base step; it requires :meth:`perturb` to
        have run since the last step unless no group needs a corruption (all ``alpha`` or all
        ``eps`` zero, or a non-corrupting step of ``interval > 1``).

        A step whose clean or corrupted loss (closure) or clean gradient (as seen by
        :meth:`perturb`) is not finite is skipped, as ``GradScaler`` skips it under AMP: the base
        optimizer is not called, weights and optimizer state stay as they are, a ``RuntimeWarning``
        names the step and ``skipped_steps`` counts it.  (Under a ``GradScaler`` the scaler skips such
        steps before they reach ``step()``.)
        """
        if closure is None:
            self.restore()
            if not self._corrupted_this_step and self.corrupts_this_step and self._needs_corruption():
                raise TypeError(
                    "ACR.step() needs a closure: pass step(closure) with a closure that runs forward and "
                    "backward, or call perturb(), run the corrupted backward and restore() before step()"
                )
            loss = None
            finite = not self._nonfinite
        else:
            if self._pending is not None:
                raise RuntimeError("step(closure) while perturbed: call restore() first")
            # only a corrupting step replays (perturb() returns False on the others of interval > 1): no capture there
            rng = (
                rng_state({p.device for g in self.param_groups for p in g["params"]})
                if self.corrupts_this_step
                else None
            )
            with torch.enable_grad():
                loss = closure()
            finite = _is_finite(loss)
            if finite and self.perturb():
                try:
                    with torch.enable_grad(), replaying(rng):  # the clean pass's dropout masks (acr_optim.replay)
                        finite = _is_finite(closure())
                finally:
                    self.restore()
            finite &= not self._nonfinite
        self._corrupted_this_step = self._nonfinite = False
        if not finite:
            self.skipped_steps += 1
            warnings.warn(
                f"ACR skipped optimizer step {self._steps + self.skipped_steps}: the loss or the clean gradient is "
                f"not finite (weights and optimizer state untouched; {self.skipped_steps} skipped so far, "
                "see ACR.skipped_steps)",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss
        self._steps += 1
        self.base_optimizer.step()
        return loss

    def _needs_corruption(self) -> bool:
        groups = [g for g in self.param_groups if any(p.requires_grad for p in g["params"])]
        corrupted = any(g["acr_eps"] > 0 or g["acr_fault"] is not None for g in groups)
        return corrupted and any(g["acr_alpha"] > 0 for g in groups)

    def __repr__(self) -> str:
        d = self.defaults
        corruption = f"eps={d['acr_eps']}, p={d['acr_p']}"
        if d["acr_fault"] is not None:
            corruption = (
                f"fault={d['acr_fault']!r}, fault_mode={d['acr_fault_mode']!r}, fault_radius={d['acr_fault_radius']}"
            )
        return (
            f"ACR({corruption}, alpha={d['acr_alpha']}, n={d['acr_n']}, "
            f"interval={self.interval}, base={self.base_optimizer!r})"
        )
